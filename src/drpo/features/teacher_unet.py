"""The generator's frozen base U-Net as feature encoder (spec 2.5b): `TeacherUNetFeatures`.

Also holds `pool_flatten`, its pooling of the hooked maps, and the context that switches off diffusers'
block-level gradient checkpointing during the teacher pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from drpo.features.base import FeatureEncoder
from drpo.generators import OneStepGenerator, PromptEmbedding, adapters_disabled

TEACHER_LAYERS = ("down_blocks.2", "mid_block", "up_blocks.0")


@contextmanager
def _checkpointing_disabled(module: nn.Module) -> Iterator[None]:
    """Switch off diffusers' block-level gradient checkpointing inside `module`, restoring the flags afterwards."""
    flags = [(m, m.gradient_checkpointing) for m in module.modules() if getattr(m, "gradient_checkpointing", False)]
    for m, _ in flags:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m, flag in flags:
            m.gradient_checkpointing = flag


def pool_flatten(fmap: Tensor, pool: int) -> Tensor:
    """(N, C, H, W) -> (N, C * (H // pool) * (W // pool)): average pool with kernel = stride = `pool`.

    A map smaller than `pool` on either side is pooled to 1 x 1 instead, giving (N, C).
    """
    if min(fmap.shape[-2:]) < pool:
        return fmap.mean((2, 3))
    return F.avg_pool2d(fmap, pool).flatten(1)


class _AllCaptured(Exception):
    """Raised by the last forward hook: the rest of the U-Net forward is not needed."""


class TeacherUNetFeatures(FeatureEncoder):
    """The generator's frozen base U-Net as encoder (spec 2.5b; the SDXL-Turbo default).

    Per call, u = x + noise_std * eps with eps ~ N(0, I) drawn fresh from the global RNG on every call, as in
    the original, or from `fixed_noise_seed` on every call for deterministic features (a deliberate, documented
    deviation: spec 11 item 7). One U-Net forward on u at integer timestep `timestep` (no scale_model_input)
    with the prompt's hidden states (SDXL: plus pooled text embeds and the generator's time ids), LoRA adapters
    disabled, so the features always come from the base weights. Forward hooks capture the outputs of the
    modules named in `keys` (tuple outputs -> first element); each key is one token per sample, the map
    average-pooled with kernel = stride = `pool` (1 x 1 when the map is smaller) and flattened:
    D = C * (H // pool) * (W // pool), e.g. 20,480 for SDXL's down_blocks.2 at 512^2. The forward stops after
    the last hooked module. Gradients flow through the frozen U-Net to x. The feature noise is drawn over the
    whole batch, so `chunk_size` does not change the features.

    Memory: the U-Net is the generator's own, never copied. Diffusers' block-level gradient checkpointing
    (`unet.enable_gradient_checkpointing()`, for the trainable pass) is switched off during this pass, since its
    recomputation would run in backward with the adapters enabled again. `gradient_checkpointing=True` instead
    checkpoints the whole teacher pass as one segment whose recomputation disables the adapters again: only u
    and the pooled features are kept between forward and backward, at the price of a second teacher forward
    (the original keeps every activation; spec 11 item 12).

    Args:
        generator: one-step generator whose `unet` is the teacher (its LoRA, if any, is ignored here).
        keys: U-Net module names to hook (`unet.named_modules()` names); paper: down_blocks.2, mid_block,
            up_blocks.0.
        noise_std, timestep, pool: see above; paper: 0.1, 100, 4.
        fixed_noise_seed: seed the feature noise identically on every call instead of drawing it fresh.
        chunk_size: run the U-Net on at most this many latents at once.
        gradient_checkpointing: checkpoint the teacher pass (see Memory).
    """

    needs_generator = True
    needs_condition = True
    map_pattern = r"[A-Za-z_]\w*(\.\w+)*"  # U-Net module names, checked against the U-Net when built

    def __init__(
        self,
        generator: OneStepGenerator,
        keys: Sequence[str] = TEACHER_LAYERS,
        noise_std: float = 0.1,
        timestep: int = 100,
        pool: int = 4,
        fixed_noise_seed: int | None = None,
        chunk_size: int | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__(keys, chunk_size)
        modules = dict(generator.unet.named_modules())
        unknown = [k for k in self.keys if k not in modules]
        if unknown or len(set(self.keys)) != len(self.keys):
            blocks = [n for n, m in modules.items() if n and n.count(".") <= 1 and not isinstance(m, nn.ModuleList)]
            raise ValueError(
                f"TeacherUNetFeatures: keys must be distinct U-Net module names; unknown {unknown} in "
                f"{list(self.keys)}. Top-level modules: {blocks}"
            )
        if pool < 1 or noise_std < 0:
            raise ValueError(f"TeacherUNetFeatures: need pool >= 1 and noise_std >= 0, got {pool}, {noise_std}")
        self.generator = generator  # not an nn.Module: the U-Net stays out of this encoder's parameters
        self.noise_std = float(noise_std)
        self.timestep = int(timestep)
        self.pool = int(pool)
        self.fixed_noise_seed = fixed_noise_seed
        self.gradient_checkpointing = gradient_checkpointing

    @property
    def map_names(self) -> tuple[str, ...]:
        return self.keys

    @property
    def stochastic(self) -> bool:
        return self.fixed_noise_seed is None and self.noise_std > 0

    def forward(self, latents: Tensor, cond: PromptEmbedding | None = None) -> dict[str, Tensor]:
        if latents.ndim == 4:
            x = latents.float()
            if self.fixed_noise_seed is None:
                eps = torch.randn_like(x)
            else:
                rng = torch.Generator(x.device).manual_seed(self.fixed_noise_seed)
                eps = torch.randn(x.shape, generator=rng, device=x.device)
            latents = x + self.noise_std * eps
        return super().forward(latents, cond)

    def maps(self, x: Tensor, cond: PromptEmbedding) -> dict[str, Tensor]:
        """Noisy latents (N, C, H, W) -> {key: (N, D, 1, 1)} pooled, flattened hooked outputs."""
        gen, unet = self.generator, self.generator.unet
        n = x.shape[0]
        cond = (cond.repeat_interleave(n) if len(cond) == 1 else cond).to(gen.device, unet.dtype)
        inputs = [x.to(gen.device, unet.dtype), cond.hidden]
        if cond.pooled is not None:
            inputs += [cond.pooled, gen.time_ids.expand(n, -1).to(unet.dtype)]
        if self.gradient_checkpointing and torch.is_grad_enabled():
            pooled = checkpoint(self._teacher_pass, *inputs, use_reentrant=False)
        else:
            pooled = self._teacher_pass(*inputs)
        return {k: v[:, :, None, None] for k, v in zip(self.keys, pooled)}

    def _teacher_pass(
        self, sample: Tensor, hidden: Tensor, text_embeds: Tensor | None = None, time_ids: Tensor | None = None
    ) -> tuple[Tensor, ...]:
        """Base-weight U-Net forward up to the last hooked module -> pooled features (N, D_k) per key, fp32."""
        unet = self.generator.unet
        captured: dict[str, Tensor] = {}

        def hook(name: str):
            def capture(module: nn.Module, args: Any, output: Any) -> None:
                fmap = output[0] if isinstance(output, tuple) else output
                captured[name] = pool_flatten(fmap.float(), self.pool)
                if len(captured) == len(self.keys):
                    raise _AllCaptured

            return capture

        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        handles = [unet.get_submodule(k).register_forward_hook(hook(k)) for k in self.keys]
        try:
            with adapters_disabled(unet), _checkpointing_disabled(unet):
                unet(sample, self.timestep, encoder_hidden_states=hidden, added_cond_kwargs=added)
        except _AllCaptured:
            pass
        finally:
            for handle in handles:
                handle.remove()
        missing = [k for k in self.keys if k not in captured]
        if missing:
            raise RuntimeError(f"TeacherUNetFeatures: modules {missing} did not run in the U-Net forward")
        return tuple(captured[k] for k in self.keys)
