"""Online DrPO (method spec sections 2.3-2.7): rank K candidates by reward, drift toward the best.

Per prompt: sample K candidates x_k = G_θ(z_k, c) with gradient; score the decoded images with the
target reward (ranking only, never differentiated); the top ``num_pos`` are positive anchors and
the bottom ``num_neg`` negative anchors; embed candidates, anchors and the frozen base's samples
for the same noises in a frozen feature space φ; regress φ(x) onto sg(φ(x) + V) where
V = V_pref + λ·V_ref (drpo.drift.drpo_objective).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from drpo.drift import drpo_objective
from drpo.methods.base import Method, PromptBatch
from drpo.ranking import select_anchors


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

        generated = self.features(latents.float(), cond=cond)
        with torch.no_grad():
            reference = self.features(batch.reference.to(latents.device).float(), cond=cond)
        # Anchors are the candidates' own features, detached (no second encoder pass).
        feats = {name: value.unsqueeze(0) for name, value in generated.items()}
        refs = {name: value.unsqueeze(0) for name, value in reference.items()}
        pos, neg = pos[0].to(latents.device), neg[0].to(latents.device)
        positives = {name: value.detach()[:, pos] for name, value in feats.items()}
        negatives = {name: value.detach()[:, neg] for name, value in feats.items()}
        loss, info = drpo_objective(
            feats, refs, positives, negatives,
            positive_weight=s.positive_weight, negative_weight=s.negative_weight,
            reference_weight=s.reference_weight, reference_negative_weight=s.reference_negative_weight,
            reference_loss_weight=s.reference_loss_weight, pref_radii=s.radii,
            ref_radii=s.reference_radii, kernel=s.kernel, aggregation=s.aggregation,
        )
        ranked = scores.sort(descending=True).values
        logs = {
            "reward_mean": scores.mean().item(),
            "reward_std": scores.std(unbiased=False).item(),
            "reward_top": ranked[: s.num_pos].mean().item(),
            "reward_bottom": ranked[-s.num_neg:].mean().item(),
        }
        return loss.mean(), logs
