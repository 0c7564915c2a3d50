"""Rewards by name: images (N, 3, H, W) in [-1, 1] + prompts -> scores (N,), behind one interface (`Reward`).

Registry (`REWARDS`, `build_reward(name, **kwargs)`):

    name           where it runs                      constructor arguments (besides device, dtype, batch_size)
    pickscore      in process, HF CLIP folder         model_path
    clip           in process, HF CLIP folder         model_path (CLIP ViT-L/14)
    aesthetic      in process, HF CLIP folder + MLP   model_path (CLIP ViT-L/14), head_path (.pth)
    hpsv3          in process, Qwen2-VL folder        model_path (Qwen2-VL-7B-Instruct), checkpoint_path
    geneval_lite   in process, procedural detector   spec (drpo.world WorldSpec or its dict); needs metadata
    worker         any command (drpo.rewards.worker)  command, cwd, env, timeouts
    imagereward, hpsv2, geneval, hpsv3_official       black-box workers in their own environments (envs/*.yaml),
                                                      see drpo.rewards.worker

Config shape (`build_reward_from_config`), a single reward or a weighted ensemble (spec 2.4):

    {"name": "pickscore", "path": "models/PickScore_v1", "device": "cuda"}     # "path" means model_path
    {"ensemble": {
        "pickscore": {"weight": 0.5, "path": "models/PickScore_v1"},
        "aesthetic": {"weight": 0.5, "path": "models/CLIP-ViT-L-14", "head_path": "models/Aesthetic/...pth"},
        "ir": {"name": "imagereward", "weight": 1.0, "python": "envs/.imagereward/bin/python", ...}}}

Every other key is passed to the reward's constructor. An ensemble member's key is its registry name unless the
member sets "name" (so one registry entry can appear twice under two keys). `build_reward_from_config(spec,
device=...)` gives that device to every reward and member whose class sets `takes_device` and whose spec names no
"device" of its own.

Adding a reward is one subclass in a member module (which imports drpo.rewards.base, never this package) and one
entry in REWARDS here:

    class MyReward(Reward):
        name = "mine"
        differentiable = False

        def __init__(self, model_path: str, device: str = "cpu") -> None:
            self.model = load_my_model(model_path, device)          # local files only

        def _score(self, images, prompts, metadata):
            return self.model((images + 1) / 2).flatten()            # (N,)

    REWARDS = {..., "mine": MyReward}
"""

from __future__ import annotations

from typing import Any

from drpo.rewards.base import Reward
from drpo.rewards.clip import AestheticReward, CLIPImageReward, CLIPScoreReward, PickScoreReward
from drpo.rewards.ensemble import EnsembleReward
from drpo.rewards.geneval_lite import GenEvalLiteReward
from drpo.rewards.hpsv3 import HPSv3Reward
from drpo.rewards.worker import (
    GenEvalWorker,
    HPSv2Worker,
    HPSv3OfficialWorker,
    ImageRewardWorker,
    WorkerError,
    WorkerReward,
)

REWARDS: dict[str, type[Reward]] = {
    "pickscore": PickScoreReward,
    "clip": CLIPScoreReward,
    "aesthetic": AestheticReward,
    "hpsv3": HPSv3Reward,
    "geneval_lite": GenEvalLiteReward,
    "worker": WorkerReward,
    "imagereward": ImageRewardWorker,
    "hpsv2": HPSv2Worker,
    "geneval": GenEvalWorker,
    "hpsv3_official": HPSv3OfficialWorker,
}


def build_reward(name: str, **kwargs: Any) -> Reward:
    """Instantiate the reward registered as `name` with `kwargs`; ValueError for unknown names."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; valid names: {sorted(REWARDS)}")
    return REWARDS[name](**kwargs)


def _build_member(spec: dict[str, Any], where: str, device: str | None) -> Reward:
    if not isinstance(spec.get("name"), str):
        raise ValueError(f"{where}: needs a 'name' (one of {sorted(REWARDS)}), got {spec}")
    # path: null (a config merged over one that names a model folder) means the reward has no model folder.
    kwargs = {k: v for k, v in spec.items() if k != "name" and not (k == "path" and v is None)}
    if "path" in kwargs:
        if "model_path" in kwargs:
            raise ValueError(f"{where}: give 'path' or 'model_path', not both")
        kwargs["model_path"] = kwargs.pop("path")
    reward_class = REWARDS.get(spec["name"])  # an unknown name fails in build_reward
    if device is not None and "device" not in kwargs and reward_class is not None and reward_class.takes_device:
        kwargs["device"] = device
    return build_reward(spec["name"], **kwargs)


def build_reward_from_config(spec: dict[str, Any], device: str | None = None) -> Reward:
    """A reward, or a weighted ensemble, from its config mapping (shape in the module docstring).

    `device` goes to every reward (every ensemble member) whose constructor takes one (`Reward.takes_device`)
    and whose spec names no device of its own.
    """
    if not isinstance(spec, dict):
        raise ValueError(f"reward config must be a mapping, got {type(spec).__name__}")
    if "ensemble" not in spec:
        return _build_member(spec, "reward config", device)
    # A preset's ensemble merged over config.yaml's single reward keeps that reward's name and path beside it, and
    # a held-out ensemble gets its label as name: the ensemble ignores both.
    if set(spec) - {"ensemble", "name", "path"} or not isinstance(spec["ensemble"], dict) or not spec["ensemble"]:
        raise ValueError(f"reward config: an ensemble is {{'ensemble': {{key: {{'weight': w, ...}}, ...}}}} and "
                         f"nothing else, got {spec}")
    rewards, weights = {}, {}
    for key, member in spec["ensemble"].items():
        where = f"reward config: ensemble member {key!r}"
        if not isinstance(member, dict) or not isinstance(member.get("weight"), (int, float)):
            raise ValueError(f"{where}: needs a numeric 'weight', got {member}")
        weights[key] = float(member["weight"])
        rewards[key] = _build_member({"name": key} | {k: v for k, v in member.items() if k != "weight"}, where,
                                     device)
    return EnsembleReward(rewards, weights)


__all__ = [
    "REWARDS",
    "AestheticReward",
    "CLIPImageReward",
    "CLIPScoreReward",
    "EnsembleReward",
    "GenEvalLiteReward",
    "GenEvalWorker",
    "HPSv2Worker",
    "HPSv3OfficialWorker",
    "HPSv3Reward",
    "ImageRewardWorker",
    "PickScoreReward",
    "Reward",
    "WorkerError",
    "WorkerReward",
    "build_reward",
    "build_reward_from_config",
]
