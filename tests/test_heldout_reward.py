"""The miniature's evaluation rewards: the held-out CLIP scorer (built by the same trainer with its own seed
and architecture, read as evaluate.rewards.heldout) and the CLIP reward, which the default scores beside its
detector target and the CLIP-target presets rank by; the paper presets switch both off."""

import json
from pathlib import Path

import numpy as np
import torch
import yaml

from drpo.assets import required_assets
from drpo.config import load_config, merge, validate_config
from drpo.miniature.build import PARTS, build_model
from drpo.miniature.data import pair_batch
from drpo.rewards import PickScoreReward
from drpo.world.prompts import make_splits
from drpo.world.spec import WorldSpec

REPO = Path(__file__).resolve().parents[1]


def _yaml(name):
    return yaml.safe_load((REPO / name).read_text())


def test_heldout_reward_builds_at_tiny_size_and_loads_as_pickscore(tmp_path):
    config = load_config(REPO / "config.yaml", overrides={
        "device": "cpu",
        "world": {"n_train_prompts": 24, "n_test_prompts": 12},
        "miniature": {"heldout_reward": {"steps": 2, "batch_size": 8, "hidden": 16}},
    })
    assert "heldout_reward" in PARTS
    metrics = build_model("heldout_reward", config, out_dir=tmp_path, inputs={})
    assert 0 <= metrics["pairwise_accuracy"] <= 1

    provenance = json.loads((tmp_path / "provenance.json").read_text())
    arguments = provenance["arguments"]
    # Its own seed overrides miniature.seed (0); the architecture of config.yaml, hidden from the override.
    assert config["miniature"]["seed"] == 0 and provenance["seed"] == arguments["seed"] == 1
    assert (arguments["hidden"], arguments["vision_layers"], arguments["text_layers"], arguments["patch_size"]) == (
        16, 2, 1, 4)
    assert provenance["metrics"]["pairwise_accuracy"] == metrics["pairwise_accuracy"]
    model_config = json.loads((tmp_path / "config.json").read_text())
    assert model_config["vision_config"]["num_hidden_layers"] == 2
    assert model_config["vision_config"]["patch_size"] == 4
    assert model_config["text_config"]["num_hidden_layers"] == 1
    assert model_config["text_config"]["hidden_size"] == 16

    spec = WorldSpec()
    rows = make_splits(spec, n_train=24, n_test=12, seed=0)[1][:2]
    reward = PickScoreReward(tmp_path)
    positives, _, _ = pair_batch(rows, np.random.default_rng(0), spec)
    scores = reward.score(positives, [row["prompt"] for row in rows])
    assert scores.shape == (2,) and torch.all(scores.abs() <= 1 + 1e-5)


def test_default_config_scores_the_heldout_reward_and_builds_it_independently():
    config = validate_config(_yaml("config.yaml"))
    assert config["evaluate"]["rewards"]["heldout"] == {"name": "pickscore",
                                                        "path": "resources/miniature/heldout_reward"}
    settings = config["miniature"]["heldout_reward"]
    assert settings["seed"] != config["miniature"]["seed"]
    assert (settings["hidden"], settings["vision_layers"], settings["text_layers"]) != (64, 3, 2)  # the target's


def test_ci_builds_its_own_heldout_reward():
    config = validate_config(merge(_yaml("config.yaml"), _yaml("configs/ci.yaml")))
    assert config["evaluate"]["rewards"]["heldout"] == {"name": "pickscore",
                                                        "path": "results/ci/miniature/heldout_reward"}
    assert config["miniature"]["heldout_reward"]["steps"] == 4


def test_paper_presets_do_not_inherit_the_miniature_heldout_reward():
    for preset in ("sd-turbo", "sdxl-turbo"):
        # Snakemake merges --configfile files over config.yaml key by key, as drpo.config.merge does.
        config = merge(_yaml("config.yaml"), _yaml(f"configs/{preset}.yaml"))
        assert config["world"]["enabled"] is False
        assert config["evaluate"]["rewards"]["heldout"] is None, preset
        assert config["evaluate"]["rewards"]["pickscore"] is None, preset
        assert not any("resources/miniature" in str(asset.path) for asset in required_assets(config)), preset


def test_the_default_ranks_by_the_detector_and_scores_the_clip_reward():
    config = validate_config(_yaml("config.yaml"))
    assert config["models"]["reward"] == {"name": "geneval_lite", "path": None}
    assert config["evaluate"]["rewards"]["pickscore"]["path"] == "resources/miniature/reward"
    assert config["drpo"]["reference_loss_weight"] == 0.0 and config["train"]["balance_tags"] is False


def test_clip_target_presets_rank_by_the_clip_reward_and_do_not_score_it_twice():
    for preset in ("pickscore", "compare"):
        config = validate_config(merge(_yaml("config.yaml"), _yaml(f"configs/{preset}.yaml")))
        assert config["models"]["reward"] == {"name": "pickscore", "path": "resources/miniature/reward"}
        assert config["evaluate"]["rewards"]["pickscore"] is None, preset
        assert config["drpo"]["reference_loss_weight"] == 0.2 and config["train"]["balance_tags"] is True
        assert config["train"]["prompts_per_step"] == 2, preset
