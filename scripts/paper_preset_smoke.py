"""Run every stage of a paper preset on CPU with tiny stand-ins of its models, at reduced size.

The stand-ins are randomly initialised models of the same classes and file layouts as the real weights
(diffusers folders, the latent-MAE export, Hugging Face CLIP folders, the aesthetic head), written to a
scratch folder; the preset itself is used unchanged except for paths and budgets (an override config).
Black-box rewards (HPSv2, ImageReward) are replaced by the reference worker, since their environments
need the real packages.

With ``--offline`` the preset switches to its offline mode as a user would, by naming a preference dataset: a tiny
Pick-a-Pic v2 folder of Parquet shards (stand-in JPEGs, one tie) trains the offline method next to DrPO.

    python scripts/paper_preset_smoke.py --preset sd-turbo --out /tmp/smoke-sd
    python scripts/paper_preset_smoke.py --preset sdxl-turbo --out /tmp/smoke-sdxl
    python scripts/paper_preset_smoke.py --preset sd-turbo --offline --out /tmp/smoke-sd-offline
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "car", "on", "the", "street"]
PROMPTS = ["a photo of a cat", "a red car on the street", "a blue dog", "a photo of a dog"]


def write_stand_ins(root: Path, preset: str) -> dict:
    from drpo.features.latent_mae import LatentMAEEncoder, save_checkpoint
    from drpo.miniature.judge import build_tiny_judge
    from drpo.rewards.clip import aesthetic_mlp
    from drpo.tiny import write_tiny_clip, write_tiny_sd_turbo, write_tiny_sdxl_turbo

    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        (root / f"{split}.txt").write_text("\n".join(PROMPTS) + "\n")
    # The paper's evaluation sets as they ship: Parti-Prompts' TSV and Pick-a-Pic v2's test_unique Parquet shards.
    (root / "PartiPrompts.tsv").write_text("Prompt\tCategory\tChallenge\tNote\n" + "".join(
        f"{prompt}\t{'Animals' if 'cat' in prompt or 'dog' in prompt else 'Vehicles'}\tBasic\t\n" for prompt in PROMPTS))
    write_captions(root / "pickapic_test_unique", PROMPTS[::-1] + PROMPTS[:2])
    # 32x32 latents, so layer4 of the MAE is 4x4 and the recipe's patch-4 keys exist.
    if preset == "sd-turbo":
        generator = write_tiny_sd_turbo(root / "sd-turbo", words=WORDS, sample_size=32, model_max_length=16,
                                        block_out_channels=(16, 32))
    else:
        generator = write_tiny_sdxl_turbo(root / "sdxl-turbo", words=WORDS, sample_size=16, model_max_length=16,
                                          block_out_channels=(16, 32, 32))
    torch.manual_seed(0)
    mae = root / "mae_latent_256_torch.pth"
    save_checkpoint(LatentMAEEncoder(layers=(1, 1, 1, 1), widths=(8, 8, 16, 16), in_channels=4), mae)
    pickscore = write_tiny_clip(root / "PickScore_v1", words=WORDS, image_size=32, patch_size=8)
    clip = write_tiny_clip(root / "CLIP-ViT-L-14", words=WORDS, image_size=32, patch_size=8, seed=1)
    head = root / "aesthetic_head.pth"
    state = aesthetic_mlp(16).state_dict()
    torch.save({f"layers.{k}": v for k, v in state.items()}, head)
    # The pairwise judge (Qwen3-VL-8B-Instruct in the SDXL-Turbo preset): a random tiny Qwen2-VL folder.
    build_tiny_judge(root / "judge", words=WORDS)
    return {"generator": str(generator), "mae": str(mae), "pickscore": str(pickscore), "clip": str(clip),
            "head": str(head), "judge": str(root / "judge")}


def write_captions(folder: Path, captions: list[str]) -> None:
    """A Pick-a-Pic v2 test_unique-like shard: one row per comparison (captions repeat), images left out."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"caption": captions, "label_0": [1.0] * len(captions)}),
                   folder / "test_unique-00000-of-00001.parquet")


def write_pickapic_stand_in(folder: Path) -> Path:
    """A Pick-a-Pic v2 shard of the stand-in prompts: random JPEGs larger than the generator's images, one pair per
    prompt and one tie."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)

    def jpeg() -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(buffer, format="JPEG")
        return buffer.getvalue()

    labels = [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (1.0, 0.0)]
    rows = [{"caption": prompt, "jpg_0": jpeg(), "jpg_1": jpeg(), "label_0": a, "label_1": b, "user_id": i}
            for i, (prompt, (a, b)) in enumerate(zip(PROMPTS, labels))]
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "train-00000-of-00001.parquet")
    return folder


def override(root: Path, files: dict, preset: str) -> dict:
    from drpo.rewards.worker import WORKERS_DIR

    python = sys.executable
    return {
        "results_dir": str(root / "results"),
        "device": "cpu",
        "prompts": {"train": str(root / "train.txt"), "test": str(root / "test.txt")},
        "models": {
            "generator": {"path": files["generator"]},
            **({"features": {"name": "latent_mae", "checkpoint": files["mae"],
                             "keys": ["layer4_mean", "layer4_std", "layer4_mean_2", "layer4_std_2",
                                      "layer4_mean_4", "layer4_std_4"], "options": {}}}
               if preset == "sd-turbo" else {}),
            "reward": {"name": "pickscore", "path": files["pickscore"]},
        },
        "train": {"steps": 2, "checkpoint_every": 1, "processes": 1, "prompts_per_step": 2, "candidates": 4,
                  "mixed_precision": "no", "lora": {"rank": 4, "alpha": 4}},
        "drpo": {"num_pos": 1, "num_neg": 1},
        "evaluate": {"seeds": [42, 43], "batch_size": 8, "prompt_sets": {
            "pickapic_v2": str(root / "pickapic_test_unique"), "parti": str(root / "PartiPrompts.tsv")}, "rewards": {
            "clip": {"path": files["clip"]},
            "aesthetic": {"path": files["clip"], "head_path": files["head"]},
            "brightness": {"name": "worker", "command": [python, str(WORKERS_DIR / "mean_brightness_worker.py")]},
            "hpsv2": None,
            "imagereward": None,
        }},
        "report": {"grid_prompts": [0, 1], "grid_seeds": [42]},
        **({"judge": {"model": files["judge"], "max_pairs": 2, "max_new_tokens": 8, "dtype": "float32"}}
           if preset == "sdxl-turbo" else {}),
        "cost": {"analytic": {"generators": [preset], "rewards": ["pickscore"]},
                 "measured": {"updates": 1, "warmup": 0, "candidates": 4, "num_pos": 1, "num_neg": 1,
                              "accumulation": 1, "draft_chunks": [4], "reward_hidden": 32, "reward_layers": 1}},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=["sd-turbo", "sdxl-turbo"], required=True)
    parser.add_argument("--out", required=True, help="scratch folder for stand-ins and results")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--offline", action="store_true",
                        help="name a Pick-a-Pic stand-in dataset and train the offline method next to DrPO")
    args = parser.parse_args()
    root = Path(args.out).resolve()
    files = write_stand_ins(root, args.preset)
    settings = override(root, files, args.preset)
    if args.offline:
        settings["preferences"] = {"path": str(write_pickapic_stand_in(root / "pickapic"))}
        settings["train"]["methods"] = ["drpo", "offline"]
    override_file = root / "override.yaml"
    override_file.write_text(yaml.safe_dump(settings, sort_keys=False))
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(REPO),
               "--cores", str(args.cores), "--configfile", str(REPO / "configs" / f"{args.preset}.yaml"),
               str(override_file)]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True)
    for table in ("summary", "prompt_sets", "categories_parti"):
        print((root / "results" / "tables" / f"{table}.md").read_text())


if __name__ == "__main__":
    main()
