"""VGGFlow, one-step adaptation (method spec section 4): regress onto reference + clipped reward gradient.

Per prompt: x_k = G_θ(z_k, c) with gradient; g_k = ∇_x [s · r(D(x), c)] at a detached copy of x_k
(s = PickScore's logit scale, as the original differentiates the logit-scaled score); each g_k is
clipped to norm at most τ; the target is x*_k = x_ref,k + η·λ·clip(g_k) with η = 1 (the original's
constant η mode, the only one its recipe uses) and λ the reward scale; loss = mean_k,d (x_k − sg(x*_k))².

τ starts at ``clip_threshold`` and after every optimizer update becomes the ``clip_quantile``
quantile of the unclipped norms ‖g_k‖ seen during that update. The method counts its
``prompts_per_update`` loss calls to know where an update ends (the original gathers the last
micro-step's norms of every process at each sync step; one process here sees all the update's
prompts). τ is training state: see :meth:`VGGFlow.state_dict`. No value network, no multi-step flow.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from drpo.methods.base import Method, PromptBatch


@dataclass(frozen=True)
class VGGFlowSettings:
    score_scale: float = 100.0
    reward_scale: float = 1000.0
    clip_threshold: float = 1.0
    clip_quantile: float = 0.8
    decode_chunk_size: int = 4


def reward_gradient(generator, reward, latents: torch.Tensor, prompt: str, metadata: dict | None, *,
                    score_scale: float, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (K,) on CPU and g = ∇_x [score_scale · r(D(x))] (K, C, H, W) fp32 at detached latents.

    Chunks of ``chunk_size`` latents are decoded and differentiated one at a time (bounded memory);
    the returned gradient carries no graph.
    """
    scores, grads = [], []
    for chunk in latents.detach().float().split(chunk_size):
        leaf = chunk.clone().requires_grad_(True)
        n = leaf.shape[0]
        rows = None if metadata is None else [metadata] * n
        with torch.enable_grad():
            score = reward.score(generator.decode(leaf), [prompt] * n, rows, with_grad=True)
            (grad,) = torch.autograd.grad(score_scale * score.sum(), leaf)
        scores.append(score.detach())
        grads.append(grad.float())
    return torch.cat(scores), torch.cat(grads)


def clip_by_norm(gradient: torch.Tensor, threshold: float) -> torch.Tensor:
    """Scale each sample of (K, ...) so its L2 norm is at most ``threshold`` (smaller ones unchanged)."""
    norms = gradient.flatten(1).norm(dim=1).clamp_min(1e-12)
    scale = (threshold / norms).clamp(max=1.0)
    return gradient * scale.view(-1, *[1] * (gradient.dim() - 1))


def vggflow_target(reference: torch.Tensor, gradient: torch.Tensor, *, reward_scale: float,
                   threshold: float) -> torch.Tensor:
    """x* = x_ref + λ·clip_τ(g) (η = 1); all (K, C, H, W)."""
    return reference + reward_scale * clip_by_norm(gradient, threshold)


class VGGFlow(Method):
    name = "vggflow"
    needs_reward_gradient = True

    def __init__(self, generator, reward, settings: VGGFlowSettings, prompts_per_update: int = 1) -> None:
        super().__init__(generator, reward)
        self.settings = settings
        self.prompts_per_update = prompts_per_update
        self.clip_threshold = settings.clip_threshold
        self._norms: list[torch.Tensor] = []

    @classmethod
    def from_config(cls, generator, reward, features, config: dict) -> "VGGFlow":
        return cls(generator, reward, VGGFlowSettings(**config["vggflow"]),
                   prompts_per_update=config["train"]["prompts_per_step"])

    def state_dict(self) -> dict[str, float]:
        """The running clip threshold τ (saved with a checkpoint, taken at an update boundary)."""
        return {"clip_threshold": self.clip_threshold}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.clip_threshold = float(state["clip_threshold"])
        self._norms = []

    def loss(self, batch: PromptBatch) -> tuple[torch.Tensor, dict[str, float]]:
        s, gen = self.settings, self.generator
        latents = gen.sample(gen.encode_prompts([batch.prompt]), batch.noise)
        scores, gradient = reward_gradient(gen, self.reward, latents, batch.prompt, batch.metadata,
                                           score_scale=s.score_scale, chunk_size=s.decode_chunk_size)
        threshold = self.clip_threshold
        reference = batch.reference.to(latents.device, torch.float32)
        target = vggflow_target(reference, gradient.to(latents.device), reward_scale=s.reward_scale,
                                threshold=threshold)
        loss = (latents - target).square().mean()

        norms = gradient.flatten(1).norm(dim=1).cpu()
        self._norms.append(norms)
        if len(self._norms) == self.prompts_per_update:
            self.clip_threshold = torch.quantile(torch.cat(self._norms), s.clip_quantile).item()
            self._norms = []
        logs = {
            "reward_mean": scores.mean().item(),
            "reward_std": scores.std(unbiased=False).item(),
            "reward_grad_norm": norms.mean().item(),
            "clipped_fraction": (norms > threshold).float().mean().item(),
            "clip_threshold": threshold,
        }
        return loss, logs
