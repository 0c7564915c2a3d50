"""Build one of the miniature's models from the workflow config (the miniature_* rules call this)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from drpo.config import resolve_device
from drpo.world.prompts import all_prompts, make_splits
from drpo.world.spec import WorldSpec

# "heldout_reward" is a second CLIP scorer trained like "reward" but with its own seed and architecture: the
# evaluation's held-out reward (evaluate.rewards.heldout), against which hacking of the target reward shows.
PARTS = ("autoencoder", "mae", "reward", "heldout_reward", "generator", "judge")
# The base generator's recipes: "distillation" (a flow-matching teacher, then a one-step student; drpo.miniature.distill)
# or "drifting" (one-step Drifting from scratch; drpo.miniature.generator), chosen by miniature.generator.recipe.
GENERATOR_RECIPES = ("distillation", "drifting")


def build_model(part: str, config: dict, *, out_dir: str | Path, inputs: dict[str, Path]) -> dict[str, Any]:
    """Train ``part`` with the trainer's keyword arguments from ``config["miniature"][part]``.

    The models learn the whole grammar (the miniature's "pre-training data", as SD-Turbo saw the
    concepts of GenEval's prompts); the test split only serves the metrics in provenance.json.
    """
    from drpo.miniature.autoencoder import train_autoencoder
    from drpo.miniature.distill import distill_generator
    from drpo.miniature.generator import train_generator
    from drpo.miniature.judge import build_miniature_judge
    from drpo.miniature.mae import train_mae
    from drpo.miniature.reward_model import train_reward_model

    if part not in PARTS:
        raise ValueError(f"unknown miniature model {part!r}; one of {', '.join(PARTS)}")
    world = config["world"]
    spec = WorldSpec.from_dict(world["spec"])
    rows = all_prompts(spec)
    _, test_rows = make_splits(spec, n_train=world["n_train_prompts"], n_test=world["n_test_prompts"],
                               seed=world["split_seed"])
    common = {"out_dir": out_dir, "seed": config["miniature"]["seed"], "device": resolve_device(config["device"])}
    kwargs = dict(config["miniature"][part])
    if part == "autoencoder":
        return train_autoencoder(spec, rows, eval_rows=test_rows, **common, **kwargs)
    if part == "mae":
        return train_mae(spec, rows, autoencoder=inputs["autoencoder"], **common, **kwargs)
    if part == "reward":
        return train_reward_model(spec, rows, eval_rows=test_rows, **common, **kwargs)
    if part == "judge":  # random weights, the world's prompt words in its vocabulary
        return build_miniature_judge(spec, rows, **common, **kwargs)
    if part == "heldout_reward":  # its settings may override the common ones (its own seed, above all)
        return train_reward_model(spec, rows, eval_rows=test_rows, **(common | kwargs))
    recipe = kwargs.pop("recipe", GENERATOR_RECIPES[0])
    if recipe == "distillation":
        return distill_generator(spec, rows, autoencoder=inputs["autoencoder"], eval_rows=test_rows, **common, **kwargs)
    if recipe == "drifting":
        return train_generator(spec, rows, autoencoder=inputs["autoencoder"], mae=inputs["mae"],
                               eval_rows=test_rows, **common, **kwargs)
    raise ValueError(f"miniature.generator.recipe must be one of {', '.join(GENERATOR_RECIPES)}, got {recipe!r}")
