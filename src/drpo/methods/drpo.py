"""Online DrPO (method spec sections 2.3-2.7): rank K candidates by reward, drift toward the best.

Per prompt: sample K candidates x_k = G_θ(z_k, c) with gradient; score the decoded images with the
target reward (ranking only, never differentiated); the top ``num_pos`` are positive anchors and
the bottom ``num_neg`` negative anchors; embed candidates, anchors and the frozen base's samples
for the same noises in a frozen feature space φ; regress φ(x) onto sg(φ(x) + V) where
V = V_pref + λ·V_ref (drpo.drift.drpo_objective).

With ``rollout_rounds > 0`` the anchors come from a pass/fail reward instead (spec 2.10, the paper's
GenEval-reward trainer): up to ``rollout_rounds`` batches of K candidates are drawn without gradient
until ``num_pos`` passing and ``num_neg`` failing noises are pooled; the passing ones are re-generated
with gradient (they are the generated set and, detached, the positives) and the failing ones are the
negatives. A prompt with an empty pool after the last round is skipped for this update. Where the
authors' trainer wants full pools we take what was found (at least one of each): with K = 16 and 4
rounds, prompts the base rarely gets right (position: 4 % here) would otherwise never train.

Ranked anchors that tie across the cut (a pass/fail reward scoring every candidate alike) carry no preference
and are dropped (drpo.ranking.drop_tied_anchors); a prompt with nothing preferred trains the reference term only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from drpo.drift import drpo_objective
from drpo.methods.base import Method, PromptBatch
from drpo.ranking import drop_tied_anchors, select_anchors


@dataclass(frozen=True)
class DrPOSettings:
    num_pos: int = 8
    num_neg: int = 8
    positive_weight: float = 3000.0
    negative_weight: float = 3000.0
    reference_weight: float = 3000.0
    reference_negative_weight: float = 3000.0
    reference_loss_weight: float = 0.2
    radii: tuple[float, ...] = (0.02, 0.05, 0.2)
    reference_radii: tuple[float, ...] = (0.02, 0.05, 0.2)
    kernel: str = "laplacian"
    aggregation: str = "sum"
    # Pass/fail pools (spec 2.10); 0 ranks the K candidates of the bank's noises instead.
    rollout_rounds: int = 0
    # Weight of the latent MSE to the frozen base's output (ref_model_l2_weight; 0.2 in the GenEval recipe).
    reference_l2_weight: float = 0.0


class DrPO(Method):
    name = "drpo"
    needs_reward_gradient = False

    def __init__(self, generator, reward, features, settings: DrPOSettings) -> None:
        super().__init__(generator, reward)
        self.features = features
        self.settings = settings

    @classmethod
    def from_config(cls, generator, reward, features, config: dict) -> "DrPO":
        section = dict(config["drpo"])
        section["radii"] = tuple(section["radii"])
        section["reference_radii"] = tuple(section["reference_radii"])
        return cls(generator, reward, features, DrPOSettings(**section))

    def loss(self, batch: PromptBatch) -> tuple[torch.Tensor, dict[str, float]]:
        if self.settings.rollout_rounds:
            return self._pool_loss(batch)
        s, gen = self.settings, self.generator
        k = batch.noise.shape[0]
        if s.num_pos + s.num_neg > k:
            raise ValueError(f"num_pos ({s.num_pos}) + num_neg ({s.num_neg}) exceeds K ({k})")
        cond = gen.encode_prompts([batch.prompt]).repeat_interleave(k)  # encode once, one copy per candidate
        latents = gen.sample(cond, batch.noise.to(gen.device, gen.dtype))

        with torch.no_grad():
            images = gen.decode(latents.detach())
            metadata = [batch.metadata] * k if batch.metadata is not None else None
            scores = self.reward.score(images, [batch.prompt] * k, metadata=metadata)
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
        reference = batch.reference.to(latents.device)
        generated = self.features(latents.float(), cond=cond)
        # Anchors are the candidates' own features, detached (no second encoder pass).
        pos, neg = pos.to(latents.device), neg.to(latents.device)
        negatives = {name: value.detach()[neg] for name, value in generated.items()}
        return self._objective(latents, generated, reference, cond, pos, negatives), logs

    def _objective(self, latents, generated, reference, cond, positives, negatives) -> torch.Tensor:
        """Preference + λ·reference drift over the feature keys (+ the optional latent L2 to the base).

        generated: features of ``latents`` with gradient, {key: (S, T, D)}; positives: indices into them;
        negatives: detached features {key: (M, T, D)}; reference: the base's latents for the same noises.
        """
        s = self.settings
        preferred = len(positives) > 0  # else every anchor tied: the reference terms alone
        loss = latents.sum() * 0.0
        if preferred or s.reference_loss_weight:
            loss = self._drift_loss(generated, reference, cond, positives, negatives, preferred)
        if s.reference_l2_weight:
            loss = loss + s.reference_l2_weight * F.mse_loss(latents.float(), reference.float())
        return loss

    def _drift_loss(self, generated, reference, cond, positives, negatives, preferred: bool) -> torch.Tensor:
        s = self.settings
        with torch.no_grad():
            reference_features = self.features(reference.float(), cond=cond)
        feats = {name: value.unsqueeze(0) for name, value in generated.items()}
        loss, _ = drpo_objective(
            feats, {name: value.unsqueeze(0) for name, value in reference_features.items()},
            {name: value.detach()[:, positives] for name, value in feats.items()} if preferred else None,
            {name: value.unsqueeze(0) for name, value in negatives.items()} if preferred else None,
            positive_weight=s.positive_weight, negative_weight=s.negative_weight,
            reference_weight=s.reference_weight, reference_negative_weight=s.reference_negative_weight,
            reference_loss_weight=s.reference_loss_weight, pref_radii=s.radii,
            ref_radii=s.reference_radii, kernel=s.kernel, aggregation=s.aggregation,
        )
        return loss.mean()

    def _pool_loss(self, batch: PromptBatch) -> tuple[torch.Tensor, dict[str, float]]:
        s, gen = self.settings, self.generator
        k = batch.noise.shape[0]
        cond = gen.encode_prompts([batch.prompt])
        metadata = [batch.metadata] * k if batch.metadata is not None else None
        passing, failing, drawn = [], [], 0
        for round_ in range(s.rollout_rounds):
            noise = batch.noise if round_ == 0 else torch.randn_like(batch.noise)
            noise = noise.to(gen.device, gen.dtype)
            with torch.no_grad():
                candidates = gen.sample(cond.repeat_interleave(k), noise)
                scores = self.reward.score(gen.decode(candidates), [batch.prompt] * k, metadata=metadata)
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
        positives = _subsample(passing, s.num_pos)
        negatives = _subsample(failing, s.num_neg)
        pos_cond = cond.repeat_interleave(len(positives))
        latents = gen.sample(pos_cond, positives)
        with torch.no_grad():
            negative_features = self.features(negatives.float(), cond=cond.repeat_interleave(len(negatives)))
            reference = gen.sample(pos_cond, positives, adapters=False)
        generated = self.features(latents.float(), cond=pos_cond)
        every = torch.arange(len(positives), device=latents.device)
        return self._objective(latents, generated, reference, pos_cond, every, negative_features), logs


def _subsample(pool: list[torch.Tensor], cap: int) -> torch.Tensor:
    """At most ``cap`` members of the pool, chosen at random (the training RNG), stacked."""
    if len(pool) > cap:
        pool = [pool[i] for i in torch.randperm(len(pool))[:cap].tolist()]
    return torch.stack(pool)
