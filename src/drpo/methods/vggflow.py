"""VGGFlow, one-step adaptation (method spec section 4): regress onto reference + clipped reward gradient.

Per prompt: x_k = G_θ(z_k, c) with gradient; g_k = ∇_x [s · r(D(x), c)] at a detached copy of x_k
(s = PickScore's logit scale, as the original differentiates the logit-scaled score); each g_k is
clipped to norm at most τ; the target is x*_k = x_ref,k + η·λ·clip(g_k) with η = 1 (the original's
constant η mode, the only one its recipe uses) and λ the reward scale; loss = mean_k,d (x_k − sg(x*_k))².

τ starts at ``clip_threshold`` and after every optimizer update (the shared loop calls
:meth:`VGGFlow.end_update` in every process) becomes the ``clip_quantile`` quantile of the unclipped norms ‖g_k‖
of the update's last micro-step, gathered over all processes, as the original does at each sync step: one τ
in every process. τ is training state: see :meth:`VGGFlow.state_dict`. No value network, no multi-step flow.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from drpo.methods.base import Measure, Method, PromptBatch, unmeasured


@dataclass(frozen=True)
class VGGFlowSettings:
    score_scale: float
    reward_scale: float
    clip_threshold: float
    clip_quantile: float
    decode_chunk_size: int


def reward_gradient(generator, reward, latents: torch.Tensor, prompt: str, metadata: dict | None, *,
                    score_scale: float, chunk_size: int,
                    measure: Measure = unmeasured) -> tuple[torch.Tensor, torch.Tensor]:
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
            with measure("vae_decode"):
                images = generator.decode(leaf)
            with measure("reward_score"):
                score = reward.score(images, [prompt] * n, rows, with_grad=True)
            with measure("backward"):
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
    settings_class = VGGFlowSettings
    needs_reward_gradient = True

    def __init__(self, generator, reward, settings: VGGFlowSettings, features=None) -> None:
        super().__init__(generator, reward, settings, features)
        self.clip_threshold = settings.clip_threshold
        self._last_norms: torch.Tensor | None = None  # ‖g_k‖ of the latest micro-step (K,)

    def end_update(self) -> None:
        """τ becomes the ``clip_quantile`` quantile of the last micro-step's gradient norms of every process."""
        norms = self._last_norms
        if norms is None:
            return
        if dist.is_initialized():
            # Every process holds K norms; the gather runs on the training device (NCCL needs CUDA tensors).
            local = norms.to(self.generator.device)
            gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, local)
            norms = torch.cat(gathered).cpu()
        self.clip_threshold = torch.quantile(norms, self.settings.clip_quantile).item()
        self._last_norms = None

    def state_dict(self) -> dict[str, float]:
        """The running clip threshold τ (saved with a checkpoint, taken at an update boundary)."""
        return {"clip_threshold": self.clip_threshold}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.clip_threshold = float(state["clip_threshold"])
        self._last_norms = None

    def loss(self, batch: PromptBatch) -> tuple[torch.Tensor, dict[str, float]]:
        s, gen, measure = self.settings, self.generator, self.measure
        with measure("text_encode"):
            cond = gen.encode_prompts([batch.prompt])
        with measure("student_generate"):
            latents = gen.sample(cond, batch.noise)
        scores, gradient = reward_gradient(gen, self.reward, latents, batch.prompt, batch.metadata,
                                           score_scale=s.score_scale, chunk_size=s.decode_chunk_size,
                                           measure=measure)
        threshold = self.clip_threshold
        reference = batch.reference.to(latents.device, torch.float32)
        with measure("loss"):
            target = vggflow_target(reference, gradient.to(latents.device), reward_scale=s.reward_scale,
                                    threshold=threshold)
            loss = (latents - target).square().mean()
        norms = gradient.flatten(1).norm(dim=1).cpu()
        self._last_norms = norms
        logs = {
            "reward_mean": scores.mean().item(),
            "reward_std": scores.std(unbiased=False).item(),
            "reward_grad_norm": norms.mean().item(),
            "clipped_fraction": (norms > threshold).float().mean().item(),
            "clip_threshold": threshold,
        }
        return loss, logs
