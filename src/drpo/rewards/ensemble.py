"""EnsembleReward: a weighted sum of member rewards' z-scores within each prompt's candidates (spec 2.4)."""

from __future__ import annotations

import torch
from torch import Tensor

from drpo.ranking import ensemble_scores
from drpo.rewards.base import Reward


class EnsembleReward(Reward):
    """Weighted sum of per-reward z-scores within the candidates of one prompt (spec 2.4).

    `score_groups` z-scores over the K candidates of each group; `score` treats all images that share a prompt
    string as one group. Weights are normalised to sum 1. Differentiable iff every member is.
    """

    name = "ensemble"

    def __init__(self, rewards: dict[str, Reward], weights: dict[str, float]) -> None:
        if not rewards or set(rewards) != set(weights):
            raise ValueError(f"ensemble: reward names {sorted(rewards)} and weight names {sorted(weights)} must match")
        if not sum(weights.values()) > 0:
            raise ValueError(f"ensemble: weights must have a positive sum, got {weights}")
        self.rewards = dict(rewards)
        self.weights = dict(weights)
        self.differentiable = all(r.differentiable for r in rewards.values())
        self.requires_metadata = any(r.requires_metadata for r in rewards.values())

    def _score(self, images: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        # score() entered no_grad / enable_grad already; members follow the same mode.
        grad = torch.is_grad_enabled()
        raw = {n: r.score(images, prompts, metadata, with_grad=grad) for n, r in self.rewards.items()}
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p, []).append(i)
        combined = torch.cat(
            [ensemble_scores({n: s[idx][None] for n, s in raw.items()}, self.weights)[0] for idx in groups.values()]
        )
        order = torch.tensor([i for idx in groups.values() for i in idx])
        return combined[torch.argsort(order)]

    def _score_groups(self, images: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        grad = torch.is_grad_enabled()
        raw = {n: r.score_groups(images, prompts, metadata, with_grad=grad) for n, r in self.rewards.items()}
        return ensemble_scores(raw, self.weights)

