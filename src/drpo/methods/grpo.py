"""GRPO-1step, "Neighbor GRPO" (method spec section 4): a PPO surrogate on a neighbour policy over candidates.

A one-step generator has no per-step Gaussian policy, so the policy is defined over the group itself:
given an anchor latent x_a, candidate k is chosen with probability

    π(k | a) = softmax_k(−mean_d (x_k^old − x_a)² / T),

the K candidates x_k^old being fixed (detached) rollout samples. Per prompt:

1. Correlated group noise z_k = sqrt(1 − σ²)·z_base + σ·δ_k. z_base is the batch's first noise;
   δ_1..δ_K and the anchor indices come from a torch.Generator seeded with a hash of the batch's
   noise, so a micro-step is a pure function of its batch (runs are reproducible and resume exactly).
2. Rollout without gradient: x_k^old = G_θ(z_k, c); rewards r_k of the decoded candidates.
3. Advantages A = sqrt(K)·(r − mean r)/‖r − mean r‖_p (p-quasi-norm, p = 0.8), clipped to ±5;
   all-equal rewards give A = 0.
4. The ``num_anchors`` anchors are regenerated with gradient (x_a^θ) and by the frozen base (x_a^ref).
5. ratio_{a,k} = π_θ(k|a)/π_old(k|a) (π_old uses the detached x_a^old; one update per rollout, so the
   ratio is 1 with a gradient), log-ratio clamped to ±``max_log_ratio``; loss
   −mean_{a,k} min(ratio·A_k, clip(ratio, 1 ± ε)·A_k) + w·mean (x_a^θ − x_a^ref)².

At ratio 1, −∇_{x_a} loss ∝ Σ_k A_k (x_k^old − x_a) − (Σ_k A_k)·E_π[x^old − x_a], which with centred
advantages pulls each anchor toward the reward-weighted candidates.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from drpo.methods.base import Method, PromptBatch


@dataclass(frozen=True)
class GRPOSettings:
    neighbor_sigma: float
    num_anchors: int
    advantage_p: float
    advantage_clip: float
    temperature: float
    clip_range: float
    max_log_ratio: float
    reference_l2_weight: float


def neighbor_group(noise: torch.Tensor, sigma: float, num_anchors: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Correlated noises (K, C, H, W) around noise[0] and ``num_anchors`` distinct anchor indices.

    δ and the anchors are drawn from a generator seeded with a hash of ``noise`` (deterministic per batch).
    """
    digest = hashlib.sha256(noise.detach().float().cpu().contiguous().numpy().tobytes()).digest()
    rng = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    deltas = torch.randn(noise.shape, generator=rng)
    anchors = torch.randperm(noise.shape[0], generator=rng)[:num_anchors]
    group = math.sqrt(1 - sigma**2) * noise[:1].detach().float().cpu() + sigma * deltas
    return group, anchors


def quasi_norm_advantages(rewards: torch.Tensor, p: float, clip: float, eps: float = 1e-6) -> torch.Tensor:
    """A = sqrt(K)·(r − mean r)/‖r − mean r‖_p clipped to ±clip; (K,) -> (K,), zeros when all r are equal."""
    centred = rewards.float() - rewards.float().mean()
    norm = centred.abs().pow(p).sum().pow(1 / p)
    if norm <= eps:
        return torch.zeros_like(centred)
    return (math.sqrt(rewards.numel()) * centred / norm).clamp(-clip, clip)


def neighbor_log_probs(candidates: torch.Tensor, anchors: torch.Tensor, temperature: float) -> torch.Tensor:
    """log π(k | a) = log_softmax_k(−mean_d (x_k − x_a)² / T); candidates (K, ...), anchors (A, ...) -> (A, K)."""
    distances = (candidates.flatten(1)[None] - anchors.flatten(1)[:, None]).square().mean(-1)
    return torch.log_softmax(-distances / temperature, dim=-1)


def neighbor_grpo_loss(candidates: torch.Tensor, anchors: torch.Tensor, old_anchors: torch.Tensor,
                       advantages: torch.Tensor, *, temperature: float, clip_range: float,
                       max_log_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped PPO surrogate −mean_{a,k} min(ratio·A_k, clip(ratio)·A_k) and the ratios (A, K).

    candidates (K, ...) and old_anchors (A, ...) are treated as constants; gradient flows into anchors (A, ...).
    """
    current = neighbor_log_probs(candidates.detach(), anchors, temperature)
    with torch.no_grad():
        old = neighbor_log_probs(candidates.detach(), old_anchors.detach(), temperature)
    ratio = (current - old).clamp(-max_log_ratio, max_log_ratio).exp()
    clipped = ratio.clamp(1 - clip_range, 1 + clip_range)
    surrogate = torch.minimum(ratio * advantages, clipped * advantages)
    return -surrogate.mean(), ratio.detach()


class GRPO(Method):
    name = "grpo"
    settings_class = GRPOSettings
    needs_reward_gradient = False

    def loss(self, batch: PromptBatch) -> tuple[torch.Tensor, dict[str, float]]:
        s, gen, measure = self.settings, self.generator, self.measure
        k = batch.noise.shape[0]
        if s.num_anchors > k:
            raise ValueError(f"grpo: num_anchors ({s.num_anchors}) exceeds K ({k})")
        noise, anchors = neighbor_group(batch.noise, s.neighbor_sigma, s.num_anchors)
        with measure("text_encode"):
            cond = gen.encode_prompts([batch.prompt])
        with torch.no_grad(), measure("student_generate"):
            old = gen.sample(cond, noise)
        scores = self.score_candidates(batch, old)
        advantages = quasi_norm_advantages(scores, s.advantage_p, s.advantage_clip).to(old.device)
        index = anchors.to(old.device)
        with measure("student_generate"):
            current = gen.sample(cond, noise[anchors])
        with measure("reference_generate"):
            reference = gen.sample(cond, noise[anchors], adapters=False)
        with measure("loss"):
            policy_loss, ratio = neighbor_grpo_loss(old, current, old[index], advantages,
                                                    temperature=s.temperature, clip_range=s.clip_range,
                                                    max_log_ratio=s.max_log_ratio)
            reference_l2 = F.mse_loss(current, reference)
        logs = {
            "reward_mean": scores.mean().item(),
            "reward_std": scores.std(unbiased=False).item(),
            "policy_loss": policy_loss.item(),
            "ratio_mean": ratio.mean().item(),
            "reference_l2": reference_l2.item(),
        }
        return policy_loss + s.reference_l2_weight * reference_l2, logs
