"""Shared fixtures: tiny real models in the real on-disk formats, built once per test session."""

from pathlib import Path

import pytest
import torch

# Tests run many tiny ops; on a 2-core machine shared with other jobs one thread is much faster.
torch.set_num_threads(1)

WORDS = ["a", "photo", "of", "red", "blue", "green", "circle", "square", "triangle", "and", "two", "three"]
PROMPTS = ["a photo of a red circle", "a photo of a blue square", "a photo of two green triangles"]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """A tiny SD-Turbo-layout generator, latent-MAE checkpoint and CLIP reward folder."""
    from drpo.features.latent_mae import LatentMAEEncoder, save_checkpoint
    from drpo.tiny import write_tiny_clip, write_tiny_sd_turbo

    root = tmp_path_factory.mktemp("tiny_models")
    generator = write_tiny_sd_turbo(root / "generator", words=WORDS, model_max_length=16, block_out_channels=(16, 32))
    torch.manual_seed(0)
    mae = root / "mae" / "mae_latent.pth"
    mae.parent.mkdir()
    save_checkpoint(LatentMAEEncoder(layers=(1, 1, 1, 1), widths=(8, 8, 16, 16), in_channels=4), mae)
    reward = write_tiny_clip(root / "reward", words=WORDS, image_size=16, patch_size=4)
    return {"generator": generator, "mae": mae, "reward": reward}


@pytest.fixture()
def tiny_config(tiny_models, tmp_path) -> dict:
    """A validated workflow config pointing at the tiny models, with a tiny training budget."""
    from drpo.config import load_config

    repo = Path(__file__).resolve().parents[1]
    overrides = {
        "results_dir": str(tmp_path / "results"),
        "device": "cpu",
        "models": {
            "generator": {"path": str(tiny_models["generator"]), "kind": "sd-turbo"},
            "features": {"name": "latent_mae", "checkpoint": str(tiny_models["mae"]),
                         "keys": ["layer2_mean", "layer2_std", "layer4_mean"]},
            "reward": {"name": "pickscore", "path": str(tiny_models["reward"])},
        },
        "train": {"seeds": [0], "steps": 4, "prompts_per_step": 2, "candidates": 6, "checkpoint_every": 2,
                  "reference_noise_sets": 1, "lora": {"rank": 4, "alpha": 4}},
        # The paper's lambda, so that every DrPO test also runs the reference drift (the default's is 0), and
        # the tiny reward as the only CLIP scorer besides the held-out one.
        "drpo": {"num_pos": 2, "num_neg": 2, "reference_loss_weight": 0.2},
        "offline_distance": {"num_pos": 2, "num_neg": 2},
        "evaluate": {"seeds": [1, 2], "batch_size": 8, "rewards": {"pickscore": None}},
    }
    return load_config(repo / "config.yaml", overrides=overrides)


def paper_prompts_override(tmp_path: Path) -> Path:
    """An override config for a paper preset's dry run: results under ``tmp_path`` and one-prompt train and test
    files there (the presets name prompt files that are not in the repository)."""
    import yaml

    for split in ("train", "test"):
        (tmp_path / f"{split}.txt").write_text("a photo of a cat\n")
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({
        "results_dir": str(tmp_path / "results"),
        "prompts": {"train": str(tmp_path / "train.txt"), "test": str(tmp_path / "test.txt")},
    }))
    return override
