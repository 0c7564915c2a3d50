"""Online DrPO (method spec sections 2.3-2.7): rank K candidates by reward, drift toward the best.

Per prompt: sample K candidates x_k = G_θ(z_k, c) with gradient; score the decoded images with the
target reward (ranking only, never differentiated); the top ``num_pos`` are positive anchors and
the bottom ``num_neg`` negative anchors; embed candidates, anchors and the frozen base's samples
for the same noises in a frozen feature space φ; regress φ(x) onto sg(φ(x) + V) where
V = V_pref + λ·V_ref (drpo.drift.drpo_objective).

The anchors' features come from an encoder call of their own when the encoder is stochastic (teacher_unet's fresh
noise, vit_mae's random mask): as in the authors' trainers, an anchor is then a differently perturbed copy of its
candidate. A deterministic encoder's anchors are the candidates' own features, detached, unless
``share_anchor_features`` is off (the same values, one encoder pass saved).

With ``rollout_rounds > 0`` the anchors come from a pass/fail reward instead (spec 2.10, the paper's
GenEval-reward trainer): up to ``rollout_rounds`` batches of K candidates are drawn without gradient
until ``num_pos`` passing and ``num_neg`` failing noises are pooled; the passing ones are re-generated
with gradient (they are the generated set and, detached, the positives) and the failing ones are the
negatives. A prompt with an empty pool after the last round is skipped for this update. Where the
authors' trainer wants full pools we take what was found (at least one of each): with K = 16 and 4
rounds, prompts the base rarely gets right (position: 4 % here) would otherwise never train.

Ranked anchors that tie across the cut (a pass/fail reward scoring every candidate alike) carry no preference
and are dropped (drpo.ranking.drop_tied_anchors); a prompt with nothing preferred trains the reference term only.

``objective`` other than "binary" selects one of the authors' reward-weighted variants (spec 2.8,
drpo.drift.awr_drift_loss): every candidate is in the generated set, weighted by its z-scored reward; no
separate reference drift loss is added; the loss is scaled by ``awr.loss_weight``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from drpo.drift import awr_drift_loss, drpo_objective
from drpo.features.base import FeatureEncoder
from drpo.methods.base import Method, PromptBatch
from drpo.ranking import drop_tied_anchors, select_anchors, zscore


@dataclass(frozen=True)
class AWRSettings:
    alpha: float
    logit_clip: float
    top_fraction: float
    force_scale: float
    loss_weight: float


@dataclass(frozen=True)
class DrPOSettings:
    num_pos: int
    num_neg: int
    positive_weight: float
    negative_weight: float
    reference_weight: float
    reference_negative_weight: float
    reference_loss_weight: float
    radii: tuple[float, ...]
    reference_radii: tuple[float, ...]
    kernel: str
    aggregation: str
    rollout_rounds: int
    reference_l2_weight: float
    feature_l2_weight: float
    objective: str
    awr: AWRSettings
    share_anchor_features: bool


def preference_loss(settings: DrPOSettings, generated: Mapping[str, torch.Tensor],
                    reference: Mapping[str, torch.Tensor] | None,
                    positives: torch.Tensor | Mapping[str, torch.Tensor] | None,
                    negatives: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
    """The binary DrPO objective of one prompt: preference field + λ·reference drift, summed or averaged over keys.

    generated: the candidates' features with gradient, {key: (S, T, D)}; reference: the frozen base's features
    for the same noises (None when λ = 0); positives: indices into the candidates (P,), whose detached features
    are the positive anchors, or the anchors' features themselves {key: (P, T, D)} (the offline modes' data
    anchors); negatives: detached features {key: (M, T, D)}. positives and negatives None: no preference term
    (every anchor tied). Returns a scalar.
    """
    s = settings
    feats = {name: value.unsqueeze(0) for name, value in generated.items()}
    if positives is None:
        anchors = None
    elif isinstance(positives, Mapping):
        anchors = {name: value.detach().unsqueeze(0) for name, value in positives.items()}
    else:
        anchors = {name: value.detach()[:, positives] for name, value in feats.items()}
    loss, _ = drpo_objective(
        feats, None if reference is None else {name: value.unsqueeze(0) for name, value in reference.items()},
        anchors,
        None if negatives is None else {name: value.unsqueeze(0) for name, value in negatives.items()},
        positive_weight=s.positive_weight, negative_weight=s.negative_weight,
        reference_weight=s.reference_weight, reference_negative_weight=s.reference_negative_weight,
        reference_loss_weight=s.reference_loss_weight, pref_radii=s.radii,
        ref_radii=s.reference_radii, kernel=s.kernel, aggregation=s.aggregation,
    )
    return loss.mean()


def fresh_anchor_pass(features: FeatureEncoder, settings: DrPOSettings) -> bool:
    """Whether the anchors get an encoder call of their own: always for a stochastic encoder (its anchor copy of a
    candidate is then a differently perturbed point, as in the authors' trainers); for a deterministic one unless
    ``share_anchor_features``, since the call would give the candidates' own features again."""
    return features.stochastic or not settings.share_anchor_features


def anchor_features(method: Method, settings: DrPOSettings, latents: torch.Tensor,
                    generated: Mapping[str, torch.Tensor], cond, indices: torch.Tensor) -> dict[str, torch.Tensor]:
    """The detached features {key: (A, T, D)} of the candidates ``indices`` (A,) as anchors: a call of the encoder
    on their latents (``cond``: one conditioning per candidate) or, where :func:`fresh_anchor_pass` says no, their
    rows of the generated features {key: (K, T, D)}."""
    if not fresh_anchor_pass(method.features, settings):
        return {name: value.detach()[indices] for name, value in generated.items()}
    with method.measure("features"), torch.no_grad():
        return method.features(latents.detach()[indices].float(), cond=cond[indices])


def reward_weighted_loss(settings: DrPOSettings, generated: Mapping[str, torch.Tensor],
                         reference: Mapping[str, torch.Tensor], scores: torch.Tensor) -> torch.Tensor:
    """An AWR objective (spec 2.8) of one prompt: generated and reference {key: (K, T, D)}, scores (K,) z-scored.

    Per key, every candidate's tokens form the generated cloud; the keys are aggregated as in the binary
    objective and the total is multiplied by ``awr.loss_weight``. Returns a scalar.
    """
    s, awr = settings, settings.awr
    losses = []
    for name, value in generated.items():
        k, t, d = value.shape
        loss, _ = awr_drift_loss(
            value.reshape(1, k * t, d), reference[name].reshape(1, k * t, d), scores.view(1, k),
            variant=s.objective, alpha=awr.alpha, logit_clip=awr.logit_clip, top_fraction=awr.top_fraction,
            force_scale=awr.force_scale, positive_weight=s.positive_weight, negative_weight=s.negative_weight,
            radii=s.radii, kernel=s.kernel)
        losses.append(loss)
    total = torch.stack(losses).sum(dim=0)
    if s.aggregation == "mean":
        total = total / len(losses)
    return awr.loss_weight * total.mean()


def drpo_loss(method: Method, settings: DrPOSettings, latents: torch.Tensor, generated: Mapping[str, torch.Tensor],
              reference: torch.Tensor, cond, positives: torch.Tensor | Mapping[str, torch.Tensor],
              negatives: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """DrPO's loss of one prompt's generated set: preference + λ·reference drift over the feature keys (+ the
    optional latent and feature L2 to the base), computed with ``method``'s feature encoder and timed by its
    ``measure`` hook. Online DrPO and the offline modes (drpo.methods.offline, offline_distance) share it.

    latents: the generated set (S, C, H, W) with gradient; generated: their features {key: (S, T, D)}; reference:
    the base's latents for the same noises; cond: their conditioning; positives: indices into the generated set or
    anchor features (see :func:`preference_loss`), empty when every anchor tied (the reference terms alone);
    negatives: detached features {key: (M, T, D)}.
    """
    s, measure = settings, method.measure
    # An empty index set: every anchor tied, the reference terms alone.
    preferred = not isinstance(positives, torch.Tensor) or len(positives) > 0
    reference_features = None
    if s.reference_loss_weight or s.feature_l2_weight:
        with measure("features"), torch.no_grad():
            reference_features = method.features(reference.float(), cond=cond)
    with measure("loss"):
        loss = latents.sum() * 0.0
        if preferred or s.reference_loss_weight:
            loss = preference_loss(s, generated, reference_features if s.reference_loss_weight else None,
                                   positives if preferred else None, negatives if preferred else None)
        if s.reference_l2_weight:
            loss = loss + s.reference_l2_weight * F.mse_loss(latents.float(), reference.float())
        if s.feature_l2_weight:
            loss = loss + s.feature_l2_weight * sum(F.mse_loss(generated[key], reference_features[key])
                                                    for key in generated)
    return loss


class DrPO(Method):
    name = "drpo"
    settings_class = DrPOSettings
    needs_reward_gradient = False

    def loss(self, batch: PromptBatch) -> tuple[torch.Tensor, dict[str, float]]:
        s, gen, measure = self.settings, self.generator, self.measure
        if s.rollout_rounds:
            return self._pool_loss(batch)
        k = batch.noise.shape[0]
        if s.objective == "binary" and s.num_pos + s.num_neg > k:
            raise ValueError(f"num_pos ({s.num_pos}) + num_neg ({s.num_neg}) exceeds K ({k})")
        with measure("text_encode"):
            cond = gen.encode_prompts([batch.prompt]).repeat_interleave(k)  # encode once, one copy per candidate
        with measure("student_generate"):
            latents = gen.sample(cond, batch.noise.to(gen.device, gen.dtype))
        scores = self.score_candidates(batch, latents)
        reference = batch.reference.to(latents.device)
        if s.objective != "binary":
            return self._reward_weighted_loss(latents, reference, cond, scores)
        with measure("rank_select"):
            pos, neg = select_anchors(scores.view(1, k), s.num_pos, s.num_neg)
            pos, neg = drop_tied_anchors(scores, pos[0], neg[0])
        ranked = scores.sort(descending=True).values
        logs = {
            "reward_mean": scores.mean().item(),
            "reward_std": scores.std(unbiased=False).item(),
            "reward_top": ranked[: s.num_pos].mean().item(),
            "reward_bottom": ranked[-s.num_neg:].mean().item(),
            "tied": float(len(pos) == 0),
        }
        with measure("features"):
            generated = self.features(latents.float(), cond=cond)
        pos, neg = pos.to(latents.device), neg.to(latents.device)
        if len(pos) == 0:  # every anchor tied: no anchor features are needed
            return drpo_loss(self, s, latents, generated, reference, cond, pos, {}), logs
        positives, negatives = (anchor_features(self, s, latents, generated, cond, index) for index in (pos, neg))
        return drpo_loss(self, s, latents, generated, reference, cond, positives, negatives), logs

    def _reward_weighted_loss(self, latents, reference, cond, scores) -> tuple[torch.Tensor, dict[str, float]]:
        s, measure = self.settings, self.measure
        logs = {"reward_mean": scores.mean().item(), "reward_std": scores.std(unbiased=False).item()}
        with measure("rank_select"):
            normalised = zscore(scores.to(latents.device).float())
        with measure("features"):
            generated = self.features(latents.float(), cond=cond)
            with torch.no_grad():
                reference_features = self.features(reference.float(), cond=cond)
        with measure("loss"):
            loss = reward_weighted_loss(s, generated, reference_features, normalised)
            if s.reference_l2_weight:
                loss = loss + s.reference_l2_weight * F.mse_loss(latents.float(), reference.float())
        return loss, logs

    def _pool_loss(self, batch: PromptBatch) -> tuple[torch.Tensor, dict[str, float]]:
        s, gen, measure = self.settings, self.generator, self.measure
        k = batch.noise.shape[0]
        with measure("text_encode"):
            cond = gen.encode_prompts([batch.prompt])
        passing, failing, drawn = [], [], 0
        for round_ in range(s.rollout_rounds):
            noise = batch.noise if round_ == 0 else torch.randn_like(batch.noise)
            noise = noise.to(gen.device, gen.dtype)
            with torch.no_grad(), measure("student_generate"):
                candidates = gen.sample(cond.repeat_interleave(k), noise)
            scores = self.score_candidates(batch, candidates)
            if not bool(((scores == 0) | (scores == 1)).all()):
                raise ValueError(f"drpo.rollout_rounds needs a pass/fail reward (scores 0 or 1, such as "
                                 f"geneval_lite); reward {self.reward.name!r} gave {scores.tolist()[:4]}")
            passing += list(noise[scores == 1])  # re-generated below, with gradient
            failing += list(candidates[scores == 0])  # the negatives' latents, kept
            drawn += k
            if len(passing) >= s.num_pos and len(failing) >= s.num_neg:
                break
        logs = {"pass_rate": len(passing) / drawn, "rollouts": drawn / k,
                "skipped": float(not passing or not failing)}
        if logs["skipped"]:
            return torch.zeros((), device=gen.device, requires_grad=True), logs
        with measure("rank_select"):
            positives = _subsample(passing, s.num_pos)
            negatives = _subsample(failing, s.num_neg)
        pos_cond = cond.repeat_interleave(len(positives))
        with measure("student_generate"):
            latents = gen.sample(pos_cond, positives)
        with torch.no_grad():
            with measure("features"):
                negative_features = self.features(negatives.float(), cond=cond.repeat_interleave(len(negatives)))
            with measure("reference_generate"):
                reference = gen.sample(pos_cond, positives, adapters=False)
        with measure("features"):
            generated = self.features(latents.float(), cond=pos_cond)
        every = torch.arange(len(positives), device=latents.device)
        anchors = anchor_features(self, s, latents, generated, pos_cond, every)
        return drpo_loss(self, s, latents, generated, reference, pos_cond, anchors, negative_features), logs


def _subsample(pool: list[torch.Tensor], cap: int) -> torch.Tensor:
    """At most ``cap`` members of the pool, chosen at random (the training RNG), stacked."""
    if len(pool) > cap:
        pool = [pool[i] for i in torch.randperm(len(pool))[:cap].tolist()]
    return torch.stack(pool)
