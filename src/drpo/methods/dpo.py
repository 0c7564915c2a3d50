"""DPO-1step (method spec section 4): Diffusion-DPO with a one-step pseudo log-likelihood in latent space.

Per prompt: the K policy latents x_θ = G_θ(z_k, c) (with gradient) and the K reference latents
x_ref = G_ref(z_k, c) of the same noises (the bank). Candidates are ranked by reward (never
differentiated); the chosen set C is the top ``num_pos`` policy latents and the rejected set R the
bottom ``num_neg``, both detached. With the set score

    sc(Y; T) = −mean_{y∈Y, t∈T} mean_d (y − t)²

(Y is the whole set of K latents, chosen and rejected included, as in the original), the logit is
β[(sc(x_θ; C) − sc(x_θ; R)) − (sc(x_ref; C) − sc(x_ref; R))] and the loss −log σ(logit). Its gradient
moves every policy latent along mean(C) − mean(R) (the quadratic terms in y cancel); the reference
term only sets where on the sigmoid the pair sits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from drpo.methods.base import Method, PromptBatch
from drpo.ranking import drop_tied_anchors, select_anchors


@dataclass(frozen=True)
class DPOSettings:
    num_pos: int
    num_neg: int
    beta: float


def set_score(points: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sc(Y; T) = −mean over all pairs (y, t) of mean_d (y − t)²; points (N, ...), targets (M, ...) -> scalar."""
    diff = points.flatten(1)[:, None] - targets.flatten(1)[None]
    return -diff.square().mean()


def dpo_logit(policy: torch.Tensor, reference: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor,
              beta: float) -> torch.Tensor:
    """β[(sc(policy; C) − sc(policy; R)) − (sc(reference; C) − sc(reference; R))] -> scalar.

    policy and reference (K, ...), chosen (P, ...), rejected (N, ...); the loss is −log σ(logit).
    """
    policy_margin = set_score(policy, chosen) - set_score(policy, rejected)
    reference_margin = set_score(reference, chosen) - set_score(reference, rejected)
    return beta * (policy_margin - reference_margin)


class DPO(Method):
    name = "dpo"
    settings_class = DPOSettings
    needs_reward_gradient = False

    def loss(self, batch: PromptBatch) -> tuple[torch.Tensor, dict[str, float]]:
        s, gen, measure = self.settings, self.generator, self.measure
        k = batch.noise.shape[0]
        with measure("text_encode"):
            cond = gen.encode_prompts([batch.prompt])
        with measure("student_generate"):
            latents = gen.sample(cond, batch.noise)
        scores = self.score_candidates(batch, latents)
        with measure("rank_select"):
            pos, neg = select_anchors(scores.view(1, k), s.num_pos, s.num_neg)
        logs = {
            "reward_mean": scores.mean().item(),
            "reward_std": scores.std(unbiased=False).item(),
            "reward_top": scores[pos[0]].mean().item(),
            "reward_bottom": scores[neg[0]].mean().item(),
        }
        pos, neg = drop_tied_anchors(scores, pos[0], neg[0])  # as DrPO: no preference between equals
        logs["tied"] = float(len(pos) == 0)
        if len(pos) == 0:
            return latents.sum() * 0.0, logs
        chosen = latents.detach()[pos.to(latents.device)]
        rejected = latents.detach()[neg.to(latents.device)]
        reference = batch.reference.to(latents.device, latents.dtype)
        with measure("loss"):
            logit = dpo_logit(latents, reference, chosen, rejected, s.beta)
        logs["dpo_logit"] = logit.item()
        return -F.logsigmoid(logit), logs
