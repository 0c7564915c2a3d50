"""Offline DrPO by distances, "offline_distance" (method spec section 7, the authors' pseudo-online mode): rank the
generator's own candidates by how close they come to a preference dataset's chosen images and how far from its
rejected ones, then train on them as online DrPO trains on reward-ranked candidates.

Per row of the dataset: K candidates of the current generator for the prompt; without gradient, the features of
the candidates and of the row's chosen and rejected latents; :func:`distance_scores` scores every candidate; the top
``num_pos`` are positive anchors and the bottom ``num_neg`` negative anchors (disjoint); the gradient flows through
the top ``top_fraction`` of the candidates minus the negatives (drpo.ranking.feature_subset); ``data_anchors``
appends the chosen and rejected features to the anchor sets. The candidates' anchor features are taken as online
DrPO takes them (drpo.methods.drpo.anchor_features: a call of their own for a stochastic encoder). The loss is
online DrPO's (drpo_loss with the drpo section's weights, radii, kernel, aggregation, λ and latent L2; the reference
drift for the candidates in the gradient set). No reward model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from drpo.methods.base import PromptBatch
from drpo.methods.drpo import anchor_features, drpo_loss
from drpo.methods.offline import OfflineDrPO, candidates_and_data_features
from drpo.ranking import feature_subset, select_anchors, zscore

DISTANCES = ("mean", "min")
SCORES = ("margin", "separate_zscore", "cosine_softmax_diff")
COMBINES = ("mean", "sum")


@dataclass(frozen=True)
class OfflineDistanceSettings:
    num_pos: int
    num_neg: int
    distance: str
    score: str
    combine: str
    top_fraction: float
    data_anchors: bool


def distance_scores(candidates: Mapping[str, torch.Tensor], chosen: Mapping[str, torch.Tensor],
                    rejected: Mapping[str, torch.Tensor], *, distance: str, score: str, combine: str) -> torch.Tensor:
    """How much each candidate looks like the chosen images rather than the rejected ones: (K,), higher is better.

    candidates {key: (K, T, D)}, chosen {key: (P, T, D)}, rejected {key: (M, T, D)}. Per feature key every sample is
    flattened to one vector (T * D). d+ of a candidate is its Euclidean distance to the chosen vectors, d- to the
    rejected ones, reduced over them by ``distance`` (mean, or min: the nearest). ``score``:
    margin: z(d- - d+); separate_zscore: z(d-) - z(d+), z a z-score over the K candidates (population std);
    cosine_softmax_diff: softmax over K of the cosine to the chosen minus that of the cosine to the rejected (the
    cosines reduced by mean, or by max with distance "min"). The keys are combined by ``combine`` (mean or sum).
    """
    for name, value, valid in (("distance", distance, DISTANCES), ("score", score, SCORES),
                               ("combine", combine, COMBINES)):
        if value not in valid:
            raise ValueError(f"unknown offline_distance.{name} {value!r}; valid: {', '.join(valid)}")
    per_key = []
    for key, values in candidates.items():
        x = values.detach().flatten(1).float()
        if score == "cosine_softmax_diff":
            near = [_reduce(_cosine(x, anchors[key].flatten(1).float()), "max" if distance == "min" else "mean")
                    for anchors in (chosen, rejected)]
            per_key.append(near[0].softmax(dim=0) - near[1].softmax(dim=0))
            continue
        d_pos, d_neg = (_reduce((x[:, None] - anchors[key].flatten(1).float()[None]).norm(dim=-1), distance)
                        for anchors in (chosen, rejected))
        per_key.append(zscore(d_neg - d_pos) if score == "margin" else zscore(d_neg) - zscore(d_pos))
    total = torch.stack(per_key).sum(dim=0)
    return total / len(per_key) if combine == "mean" else total


def _cosine(x: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """(K, E) and (P, E) -> (K, P) cosine similarities."""
    return torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(anchors, dim=-1).T


def _reduce(values: torch.Tensor, how: str) -> torch.Tensor:
    """(K, P) -> (K,) over the data samples."""
    return {"mean": values.mean, "min": values.amin, "max": values.amax}[how](dim=1)


class OfflineDistanceDrPO(OfflineDrPO):
    """Offline DrPO's second mode: the same data, shared settings and config checks, its own anchors."""

    name = "offline_distance"
    settings_class = OfflineDistanceSettings

    def loss(self, batch: PromptBatch) -> tuple[torch.Tensor, dict[str, float]]:
        s, measure = self.settings, self.measure
        k = batch.noise.shape[0]
        if s.num_pos + s.num_neg > k:
            raise ValueError(f"offline_distance.num_pos ({s.num_pos}) + num_neg ({s.num_neg}) exceeds K ({k})")
        # features keep their gradient: a subset of the candidates is trained.
        prompt, cond, latents, features, data_chosen, data_rejected = candidates_and_data_features(self, batch)
        with measure("rank_select"):
            scores = distance_scores(features, data_chosen, data_rejected, distance=s.distance, score=s.score,
                                     combine=s.combine)
            pos, neg = (index[0] for index in select_anchors(scores.view(1, k), s.num_pos, s.num_neg))
            subset = feature_subset(scores, s.top_fraction, neg).to(latents.device)
        positives, negatives = (anchor_features(self, self.shared["drpo"], latents, features, cond, index)
                                for index in (pos.to(latents.device), neg.to(latents.device)))
        if s.data_anchors:
            positives = {key: torch.cat([value, data_chosen[key]]) for key, value in positives.items()}
            negatives = {key: torch.cat([value, data_rejected[key]]) for key, value in negatives.items()}
        generated = {key: value[subset] for key, value in features.items()}
        reference = batch.reference.to(latents.device)[subset]
        loss = drpo_loss(self, self.shared["drpo"], latents[subset], generated, reference, prompt, positives,
                         negatives)
        return loss, {"score_top": scores[pos].mean().item(), "score_bottom": scores[neg].mean().item(),
                      "gradient_set": float(len(subset))}
