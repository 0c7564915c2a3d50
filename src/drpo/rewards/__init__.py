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

from drpo.registry import check_arguments, lookup
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
    return lookup(REWARDS, name, "reward")(**kwargs)


def reward_members(spec: dict[str, Any], where: str) -> list[tuple[str, str, dict[str, Any], float | None]]:
    """(where, registry name, constructor arguments, ensemble weight or None) of each reward a config mapping
    names (shape in the module docstring); ValueError naming the first problem: no or an unknown name, an
    argument the reward does not take, an ensemble member without a numeric weight."""
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: a reward config is a mapping, got {type(spec).__name__}")
    if "ensemble" not in spec:
        return [_member(spec, where, None)]
    # A preset's ensemble merged over config.yaml's single reward keeps that reward's name and path beside it, and
    # a held-out ensemble gets its label as name: the ensemble ignores both.
    if set(spec) - {"ensemble", "name", "path"} or not isinstance(spec["ensemble"], dict) or not spec["ensemble"]:
        raise ValueError(f"{where}: an ensemble is {{'ensemble': {{key: {{'weight': w, ...}}, ...}}}} and "
                         f"nothing else, got {spec}")
    members = []
    for key, member in spec["ensemble"].items():
        member_where = f"{where}: ensemble member {key!r}"
        if not isinstance(member, dict) or not isinstance(member.get("weight"), (int, float)):
            raise ValueError(f"{member_where}: needs a numeric 'weight', got {member}")
        named = {"name": key} | {k: v for k, v in member.items() if k != "weight"}
        members.append(_member(named, member_where, float(member["weight"])))
    return members


def _member(spec: dict[str, Any], where: str, weight: float | None) -> tuple[str, str, dict[str, Any], float | None]:
    if not isinstance(spec.get("name"), str):
        raise ValueError(f"{where}: needs a 'name' (one of {', '.join(sorted(REWARDS))}), got {spec}")
    # path: null (a config merged over one that names a model folder) means the reward has no model folder.
    kwargs = {k: v for k, v in spec.items() if k != "name" and not (k == "path" and v is None)}
    if "path" in kwargs:
        if "model_path" in kwargs:
            raise ValueError(f"{where}: give 'path' or 'model_path', not both")
        kwargs["model_path"] = kwargs.pop("path")
    reward_class = lookup(REWARDS, spec["name"], "reward", where)
    try:
        check_arguments(reward_class, kwargs, f"{where}: reward {spec['name']!r}")
    except ValueError as error:
        hint = (" (its 'path' is the model folder of another reward: a preset merged over a reward section keeps "
                "the keys it does not set, so set path: null)" if "model_path" in str(error) and "path" in spec else "")
        raise ValueError(f"{error}{hint}") from None
    return where, spec["name"], kwargs, weight


def build_reward_from_config(spec: dict[str, Any], device: str | None = None) -> Reward:
    """A reward, or a weighted ensemble, from its config mapping (shape in the module docstring).

    `device` goes to every reward (every ensemble member) whose constructor takes one (`Reward.takes_device`)
    and whose spec names no device of its own.
    """
    rewards, weights = {}, {}
    for where, name, kwargs, weight in reward_members(spec, "reward config"):
        if device is not None and "device" not in kwargs and REWARDS[name].takes_device:
            kwargs = kwargs | {"device": device}
        if weight is None:
            return build_reward(name, **kwargs)
        key = where.rsplit("'", 2)[1]  # the ensemble member's key
        rewards[key], weights[key] = build_reward(name, **kwargs), weight
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
