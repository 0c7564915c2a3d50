"""PSO, pairwise sample optimization ("spo" in the original code; method spec section 4).

The one-step output is made a Gaussian policy N(μ, std²) over "actions" in latent space. Per prompt:

* μ_θ = x_θ = G_θ(z_k, c) with gradient; the rollout mean x_old is its detached value (one update per
  rollout); μ_ref = x_ref, the frozen base's latent for the same noise (the bank).
* Action a_k = x_old,k + std·standardize(z_k): the per-sample z-scored initial noise, not fresh noise.
  Rewards are scored on D(a_k).
* log π(a | μ) = −½ mean_d ((a − μ)/std)²; log-ratio l_k = log π(a_k | μ_θ) − log π(a_k | μ_ref).
* The ratio e^l is clipped to [1 − ε, 1 + ε], i.e. l is clamped to [log(1 − ε), log(1 + ε)], so the
  gradient vanishes outside the trust region (the original's extra ±10 clamp of l is implied by it).
* Adjacent candidates (0, 1), (2, 3), … are pairs; logit = β(l_win − l_lose); the loss is the mean of
  −log σ(logit) over pairs whose rewards differ (all tied: zero loss, still attached to the graph).

Raising l_win pulls μ_θ toward the winner's action a_win.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from drpo.methods.base import Method, PromptBatch
from drpo.ranking import zscore


@dataclass(frozen=True)
class PSOSettings:
    action_std: float
    beta: float
    clip_range: float


def gaussian_log_prob(actions: torch.Tensor, means: torch.Tensor, std: float) -> torch.Tensor:
    """log π(a | μ) = −½ mean_d ((a − μ)/std)² (constants dropped); (K, ...) -> (K,)."""
    return -0.5 * ((actions - means) / std).flatten(1).square().mean(-1)


def clipped_log_ratio(current: torch.Tensor, reference: torch.Tensor, clip_range: float) -> torch.Tensor:
    """log of the ratio π_θ/π_ref clipped to [1 − ε, 1 + ε] (zero gradient outside); (K,) -> (K,)."""
    return (current - reference).clamp(math.log(1 - clip_range), math.log(1 + clip_range))


def pso_loss(log_ratio: torch.Tensor, rewards: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean −log σ(β(l_win − l_lose)) over the non-tied adjacent pairs and the mask of those pairs.

    log_ratio and rewards: (K,) with K even -> scalar loss, (K/2,) bool mask.
    """
    pairs = log_ratio.view(-1, 2)
    reward_pairs = rewards.view(-1, 2).to(pairs.device)
    sign = torch.sign(reward_pairs[:, 0] - reward_pairs[:, 1])  # +1: first wins, -1: second wins, 0: tie
    decided = sign != 0
    if not decided.any():
        return pairs.sum() * 0.0, decided
    logits = beta * sign * (pairs[:, 0] - pairs[:, 1])
    return -F.logsigmoid(logits[decided]).mean(), decided


class PSO(Method):
    name = "pso"
    settings_class = PSOSettings
    needs_reward_gradient = False

    def loss(self, batch: PromptBatch) -> tuple[torch.Tensor, dict[str, float]]:
        s, gen, measure = self.settings, self.generator, self.measure
        k = batch.noise.shape[0]
        if k % 2:
            raise ValueError(f"pso pairs candidates (0, 1), (2, 3), ...; K must be even, got K={k}")
        with measure("text_encode"):
            cond = gen.encode_prompts([batch.prompt])
        with measure("student_generate"):
            latents = gen.sample(cond, batch.noise)
        unit_noise = zscore(batch.noise.flatten(1).float()).view_as(batch.noise).to(latents.device)
        actions = latents.detach() + s.action_std * unit_noise
        scores = self.score_candidates(batch, actions)
        reference = batch.reference.to(latents.device, latents.dtype)
        with measure("loss"):
            log_ratio = clipped_log_ratio(gaussian_log_prob(actions, latents, s.action_std),
                                          gaussian_log_prob(actions, reference, s.action_std), s.clip_range)
            loss, decided = pso_loss(log_ratio, scores, s.beta)
        logs = {
            "reward_mean": scores.mean().item(),
            "reward_std": scores.std(unbiased=False).item(),
            "tied_fraction": 1 - decided.float().mean().item(),
            "log_ratio_mean": log_ratio.mean().item(),
        }
        return loss, logs
