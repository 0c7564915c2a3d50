"""Which local weight files a config needs, and which of them are missing.

Nothing is ever downloaded: every model is read from a path named in the config. `check_assets`
lists every missing file with its expected path and what it is, so a paper-scale run fails on the
login node in seconds instead of on a GPU after the queue wait.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Asset:
    path: str
    what: str
    #: Alternatives: the asset is present when any one of these exists (e.g. fp16 or fp32 weights).
    alternatives: tuple[str, ...] = ()

    def present(self) -> bool:
        return any(Path(p).exists() for p in (self.path, *self.alternatives))


def _weights(folder: str, what: str, stem: str) -> Asset:
    return Asset(f"{folder}/{stem}.safetensors", what,
                 (f"{folder}/{stem}.fp16.safetensors", f"{folder}/{stem}.bin"))


def generator_assets(path: str, kind: str) -> list[Asset]:
    """A diffusers pipeline folder: model_index.json, configs and weights of every component."""
    name = "SD-Turbo" if kind == "sd-turbo" else "SDXL-Turbo"
    assets = [Asset(f"{path}/model_index.json", f"{name} pipeline index (diffusers folder)"),
              Asset(f"{path}/scheduler/scheduler_config.json", f"{name} scheduler config")]
    for component, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                            ("text_encoder", "model")):
        assets.append(Asset(f"{path}/{component}/config.json", f"{name} {component} config"))
        assets.append(_weights(f"{path}/{component}", f"{name} {component} weights", stem))
    assets.append(Asset(f"{path}/tokenizer/tokenizer_config.json", f"{name} CLIP tokenizer"))
    if kind == "sdxl-turbo":
        assets.append(Asset(f"{path}/text_encoder_2/config.json", f"{name} second text encoder config"))
        assets.append(_weights(f"{path}/text_encoder_2", f"{name} second text encoder weights", "model"))
        assets.append(Asset(f"{path}/tokenizer_2/tokenizer_config.json", f"{name} second tokenizer"))
    return assets


def hf_folder(path: str, what: str) -> list[Asset]:
    """A Hugging Face model folder saved with save_pretrained."""
    return [Asset(f"{path}/config.json", f"{what} config"), _weights(path, f"{what} weights", "model")]


def feature_assets(spec: dict) -> list[Asset]:
    name, checkpoint = spec["name"], spec.get("checkpoint")
    if name == "latent_mae":
        return [Asset(checkpoint, "latent-MAE encoder (Drifting export, e.g. mae_latent_256_torch.pth)")]
    if name == "vit_mae":
        return hf_folder(checkpoint, "ViT-MAE (facebook/vit-mae-base)") + [
            Asset(f"{checkpoint}/preprocessor_config.json", "ViT-MAE image processor config")]
    if name == "dino":
        return hf_folder(checkpoint, "DINOv2 (dinov2-base)") + [
            Asset(f"{checkpoint}/preprocessor_config.json", "DINOv2 image processor config")]
    return []  # teacher_unet and raw_latent need nothing beyond the generator


_FILE_KEYS = ("_path", "_checkpoint", "_config", "_dir", "checkpoint")
# Folder arguments that stand for the files a worker reads in them (an empty folder is not the asset).
_FOLDER_FILES = {
    "geneval_dir": {"evaluation/evaluate_images.py": "GenEval's judge script (a clone of djghosh13/geneval)",
                    "evaluation/object_names.txt": "GenEval's detector class names (a clone of djghosh13/geneval)"},
}


def reward_assets(spec: dict) -> list[Asset]:
    """Files of a reward spec ({"name", "path", ...kwargs} or an ensemble), read off its arguments:
    a model folder ("path"/"model_path"), every *_path/*_checkpoint/*_config/*_dir argument (the files a worker
    reads in a folder of _FOLDER_FILES, e.g. GenEval's clone), and the python of a worker's environment."""
    if "ensemble" in spec:
        return [asset for key, member in spec["ensemble"].items()
                for asset in reward_assets({"name": key} | member)]
    name = spec["name"]
    assets = []
    for key, value in spec.items():
        if not isinstance(value, str):
            continue
        if key in ("path", "model_path"):
            assets += [Asset(f"{value}/config.json", f"{name} reward model config"),
                       Asset(f"{value}/model.safetensors", f"{name} reward model weights",
                             (f"{value}/model.safetensors.index.json", f"{value}/pytorch_model.bin"))]
        elif key in _FOLDER_FILES:
            assets += [Asset(f"{value}/{file}", f"{name} reward: {key}: {what}")
                       for file, what in _FOLDER_FILES[key].items()]
        elif key.endswith(_FILE_KEYS):
            assets.append(Asset(value, f"{name} reward: {key}"))
        elif key == "python":
            assets.append(Asset(value, f"{name} worker's python (build its environment from envs/)"))
    return assets


def preference_assets(config: dict) -> list[Asset]:
    """The preference dataset named by preferences.path, when a method of train.methods trains from one."""
    from drpo.methods import METHODS

    path = config.get("preferences", {}).get("path")
    methods = config.get("train", {}).get("methods", [])
    offline = [m for m in methods if m in METHODS and METHODS[m].uses_preference_data]
    if not path or not offline:
        return []
    return [Asset(path, f"preference dataset of {', '.join(offline)} (preferences.path: the authors' JSONL, or a "
                        "Pick-a-Pic v2 folder of Parquet shards with caption, jpg_0, jpg_1, label_0, label_1)")]


PROMPT_FORMS = ("a .txt of prompts, GenEval .jsonl, Parti-Prompts .tsv, or Pick-a-Pic v2 .parquet shards (a file or "
                "a folder: its test_unique split's)")


def judge_assets(config: dict) -> list[Asset]:
    """The pairwise judge's model folder (judge.model, e.g. Qwen3-VL-8B-Instruct), when the judge stage is on."""
    path = config.get("judge", {}).get("model")
    if not path:
        return []
    what = "judge (judge.model: a transformers image-text-to-text folder such as Qwen/Qwen3-VL-8B-Instruct)"
    return [Asset(f"{path}/config.json", f"{what} config"),
            Asset(f"{path}/model.safetensors", f"{what} weights", (f"{path}/model.safetensors.index.json",)),
            Asset(f"{path}/tokenizer_config.json", f"{what} tokenizer", (f"{path}/tokenizer.json",)),
            Asset(f"{path}/preprocessor_config.json", f"{what} image processor config")]


def required_assets(config: dict) -> list[Asset]:
    models = config["models"]
    assets = generator_assets(models["generator"]["path"], models["generator"]["kind"])
    assets += feature_assets(models["features"])
    assets += reward_assets(models["reward"])
    for label, spec in config.get("evaluate", {}).get("rewards", {}).items():
        if spec is not None:
            assets += reward_assets({"name": label} | spec)
    if not config.get("world", {}).get("enabled", True):
        assets += [Asset(config["prompts"][split], f"{split} prompts ({PROMPT_FORMS})") for split in ("train", "test")]
    for name, path in config.get("evaluate", {}).get("prompt_sets", {}).items():
        if path is not None:
            assets.append(Asset(path, f"evaluation prompt set {name!r} ({PROMPT_FORMS})"))
    assets += preference_assets(config)
    assets += judge_assets(config)
    return list({asset.path: asset for asset in reversed(assets)}.values())[::-1]  # first mention wins


def missing_assets(config: dict) -> list[Asset]:
    return [asset for asset in required_assets(config) if not asset.present()]


def check_assets(config: dict) -> None:
    """Raise FileNotFoundError listing every missing file, its expected path and what it is."""
    missing = missing_assets(config)
    if missing:
        lines = [f"  {asset.path}\n      {asset.what}" for asset in missing]
        raise FileNotFoundError(
            f"{len(missing)} model file(s) missing (nothing is downloaded; put them at these paths or "
            "change the paths in the config):\n" + "\n".join(lines))
