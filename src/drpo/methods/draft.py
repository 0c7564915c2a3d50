"""DRaFT, one-step (method spec section 4): backpropagate the reward into the generator.

Per prompt: x_k = G_θ(z_k, c) with gradient, images D(x_k) with gradient, and

    loss = −s · mean_k r(D(x_k), c) + w · mean (x − x_ref)²

s is the reward scale: the original maximises PickScore times CLIP's logit scale (exp(logit_scale)
≈ 100) while our PickScore returns the bare cosine, so s = 100 reproduces its gradient magnitude.
w is the latent L2 weight to the frozen base's samples of the same noises (0 in the SD-Turbo
recipe, 0.02 in the SDXL one). The loss is a mean over candidates, so the shared loop may back-propagate a
prompt's candidates in groups of ``candidates_per_backward`` (the SDXL recipe's chunks of 8, the paper
profiler's one at a time): the same gradient in less memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from drpo.methods.base import Measure, Method, PromptBatch, unmeasured


@dataclass(frozen=True)
class DRaFTSettings:
    reward_scale: float
    reference_l2_weight: float
    decode_chunk_size: int
    candidates_per_backward: int | None


def differentiable_scores(generator, reward, latents: torch.Tensor, prompt: str,
                          metadata: dict | None, chunk_size: int, measure: Measure = unmeasured) -> torch.Tensor:
    """Reward of each decoded latent, differentiable w.r.t. the latents: (K, C, H, W) -> (K,) on CPU.

    Decoder and reward run on chunks of ``chunk_size`` latents under activation checkpointing, so the
    backward pass holds one chunk's decoder/reward activations at a time (recomputed), not K images'.
    """
    def score(chunk: torch.Tensor) -> torch.Tensor:
        n = chunk.shape[0]
        rows = None if metadata is None else [metadata] * n
        with measure("vae_decode"):
            images = generator.decode(chunk)
        with measure("reward_score"):
            return reward.score(images, [prompt] * n, rows, with_grad=True)

    return torch.cat([checkpoint(score, chunk, use_reentrant=False) for chunk in latents.split(chunk_size)])


class DRaFT(Method):
    name = "draft"
    settings_class = DRaFTSettings
    needs_reward_gradient = True

    @property
    def candidates_per_backward(self) -> int | None:
        return self.settings.candidates_per_backward

    def loss(self, batch: PromptBatch) -> tuple[torch.Tensor, dict[str, float]]:
        s, gen, measure = self.settings, self.generator, self.measure
        with measure("text_encode"):
            cond = gen.encode_prompts([batch.prompt])
        with measure("student_generate"):
            latents = gen.sample(cond, batch.noise)
        scores = differentiable_scores(gen, self.reward, latents, batch.prompt, batch.metadata,
                                       s.decode_chunk_size, measure)
        with measure("loss"):
            reference_l2 = F.mse_loss(latents, batch.reference.to(latents.device, latents.dtype))
            loss = -s.reward_scale * scores.mean().to(latents.device) + s.reference_l2_weight * reference_l2
        logs = {
            "reward_mean": scores.mean().item(),
            "reward_std": scores.std(unbiased=False).item(),
            "reference_l2": reference_l2.item(),
        }
        return loss, logs
