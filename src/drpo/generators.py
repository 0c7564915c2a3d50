"""One-step text-to-image generators (SD-Turbo, SDXL-Turbo) behind one small interface.

A generator maps (prompt conditioning, noise) to latents in UNet space (already multiplied by the VAE scaling
factor) with a single UNet call, and decodes latents to images. The trainable model is `generator.unet`; the
frozen base generator G_ref is the same UNet with its LoRA adapters disabled (`sample(..., adapters=False)`), so
no copy of the UNet is ever made. Everything is loaded from a local diffusers folder, nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # loaded in load_generator: checking a config imports this module and must stay fast
    from diffusers import AutoencoderKL, DDPMScheduler, EulerAncestralDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

KINDS = ("sd-turbo", "sdxl-turbo")
EVAL_SEED_STRIDE = 1_000_000


def image_seed(seed: int, prompt_id: int) -> int:
    """Evaluation noise seed of one image: `seed * 1_000_000 + prompt_id` (prompt_id = 0-based prompt line)."""
    return seed * EVAL_SEED_STRIDE + prompt_id


@dataclass
class PromptEmbedding:
    """Text conditioning for a batch of B prompts.

    hidden: (B, L, D) cross-attention states; pooled: (B, P) pooled text embeds (SDXL only, else None).
    """

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def __getitem__(self, index: int | slice | Sequence[int] | torch.Tensor) -> PromptEmbedding:
        """Select prompts; an int keeps the batch dimension (returns a batch of one)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return PromptEmbedding(self.hidden[index], None if self.pooled is None else self.pooled[index])

    def repeat_interleave(self, k: int) -> PromptEmbedding:
        """Repeat each prompt k times in place order: (B, ...) -> (B*k, ...), e.g. one prompt to K candidates."""
        return PromptEmbedding(
            self.hidden.repeat_interleave(k, dim=0),
            None if self.pooled is None else self.pooled.repeat_interleave(k, dim=0),
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> PromptEmbedding:
        return PromptEmbedding(
            self.hidden.to(device=device, dtype=dtype),
            None if self.pooled is None else self.pooled.to(device=device, dtype=dtype),
        )


def _token_ids(tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids (B, model_max_length), padded and truncated as the diffusers pipelines do."""
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


@contextlib.contextmanager
def adapters_disabled(unet: UNet2DConditionModel) -> Iterator[None]:
    """Run the UNet as its base model: LoRA adapters off, requires_grad flags restored afterwards.

    PEFT's disable/enable toggles also flip requires_grad of the adapter weights, hence the explicit restore.
    """
    if not getattr(unet, "_hf_peft_config_loaded", False):
        yield
        return
    flags = [(p, p.requires_grad) for p in unet.parameters()]
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()
        for p, flag in flags:
            p.requires_grad_(flag)


class OneStepGenerator(ABC):
    """A one-step latent generator G(z, c) plus its frozen VAE.

    Attributes: unet (trainable UNet2DConditionModel), vae (frozen AutoencoderKL), latent_shape (C, H, W),
    resolution (image side in pixels), device, dtype (weights of the UNet / text encoders / VAE).
    """

    kind: str

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        *,
        resolution: int | None,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.unet = unet
        self.vae = vae
        self.device = device
        self.dtype = dtype
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.resolution = resolution or unet.config.sample_size * self.vae_scale_factor
        if self.resolution % self.vae_scale_factor:
            raise ValueError(
                f"resolution {self.resolution} is not a multiple of the VAE factor {self.vae_scale_factor}"
            )
        side = self.resolution // self.vae_scale_factor
        self.latent_shape = (unet.config.in_channels, side, side)

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> PromptEmbedding:
        """Frozen text conditioning of B prompts (computed without gradient)."""

    @abstractmethod
    def _one_step(self, cond: PromptEmbedding, noise: torch.Tensor) -> torch.Tensor:
        """The single UNet step: (B, C, H, W) noise -> (B, C, H, W) float32 latents."""

    def sample(self, cond: PromptEmbedding, noise: torch.Tensor, *, adapters: bool = True) -> torch.Tensor:
        """Generate latents in UNet space (VAE-scaled) with one UNet call.

        cond: B prompts, or one prompt broadcast to all noises; noise: (B, C, H, W) from `make_noise`.
        Returns float32 latents (B, C, H, W). adapters=True runs the trainable model (differentiable w.r.t. the
        LoRA weights when grad is enabled); adapters=False runs the frozen base model (LoRA off) under no_grad.
        """
        if noise.shape[1:] != self.latent_shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} does not match (B, *{self.latent_shape})")
        if len(cond) == 1 and noise.shape[0] > 1:
            cond = PromptEmbedding(
                cond.hidden.expand(noise.shape[0], -1, -1),
                None if cond.pooled is None else cond.pooled.expand(noise.shape[0], -1),
            )
        elif len(cond) != noise.shape[0]:
            raise ValueError(f"{len(cond)} prompt embeddings for {noise.shape[0]} noises (need equal counts or 1)")
        cond = cond.to(self.device, self.dtype)
        noise = noise.to(self.device, self.dtype)
        if adapters:
            return self._one_step(cond, noise)
        with torch.no_grad(), adapters_disabled(self.unet):
            return self._one_step(cond, noise)

    def make_noise(
        self,
        n: int | None = None,
        *,
        generator: torch.Generator | None = None,
        seeds: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Standard normal noise (n, C, H, W) in float32 on `self.device`.

        Training: `generator` (a torch.Generator stream, noise drawn on the generator's device). Evaluation:
        `seeds` (one per image, e.g. `image_seed(seed, prompt_id)`), each image drawn on the CPU from its own
        torch.Generator, so an image's noise does not depend on the batch it is in nor on the device.
        Not scaled by any init sigma (SDXL applies scheduler.init_noise_sigma inside `sample`).
        """
        if (generator is None) == (seeds is None):
            raise ValueError("pass exactly one of generator= or seeds=")
        if seeds is not None:
            if n is not None and n != len(seeds):
                raise ValueError(f"n={n} but {len(seeds)} seeds")
            noise = [
                torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds
            ]
            return torch.stack(noise).to(self.device)
        if n is None:
            raise ValueError("n is required with generator=")
        return torch.randn((n, *self.latent_shape), generator=generator, device=generator.device).to(self.device)

    def decode(self, latents: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """VAE-decode UNet-space latents (B, C, H, W) to float32 images (B, 3, res, res) in [-1, 1].

        Differentiable w.r.t. the latents when grad is enabled; `chunk_size` bounds how many images the VAE
        decodes at once.
        """
        scale = self.vae.config.scaling_factor
        chunks = latents.split(chunk_size or latents.shape[0])
        images = [self.vae.decode((c / scale).to(self.device, self.vae.dtype)).sample for c in chunks]
        return torch.cat(images).float().clamp(-1, 1)


class SDTurboGenerator(OneStepGenerator):
    """SD-Turbo: epsilon UNet at integer timestep 999 on the CLIP last hidden state (spec 2.2).

    x = sqrt(a_0) * (z - sqrt(1 - a_T) * eps) / sqrt(a_T) + sqrt(1 - a_0) * eps with a = the plain (not
    zero-terminal-SNR) alphas_cumprod and T = 999: the x0 estimate re-noised to t = 0.
    """

    kind = "sd-turbo"

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        scheduler: DDPMScheduler,
        *,
        resolution: int | None = None,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        super().__init__(unet, vae, resolution=resolution, device=device, dtype=dtype)
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.timestep = scheduler.config.num_train_timesteps - 1
        alphas = scheduler.alphas_cumprod.double()
        # (sqrt(a_T), sqrt(1 - a_T), sqrt(a_0), sqrt(1 - a_0)) = (0.0683, 0.9977, 0.9996, 0.0292) for SD-2.x.
        self.constants = tuple(
            math.sqrt(v) for v in (alphas[-1], 1 - alphas[-1], alphas[0], 1 - alphas[0])
        )

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbedding:
        """CLIP last hidden state (B, 77, D)."""
        ids = _token_ids(self.tokenizer, prompts).to(self.device)
        return PromptEmbedding(self.text_encoder(ids)[0].to(self.dtype))

    def _one_step(self, cond: PromptEmbedding, noise: torch.Tensor) -> torch.Tensor:
        eps = self.unet(noise, self.timestep, encoder_hidden_states=cond.hidden).sample.float()
        sqrt_a_t, sqrt_1m_a_t, sqrt_a_0, sqrt_1m_a_0 = self.constants
        return sqrt_a_0 * (noise.float() - sqrt_1m_a_t * eps) / sqrt_a_t + sqrt_1m_a_0 * eps


class SDXLTurboGenerator(OneStepGenerator):
    """SDXL-Turbo: one Euler-ancestral step at the trailing timestep 999, as StableDiffusionXLPipeline does.

    sample = z * init_noise_sigma; eps = UNet(sample / sqrt(sigma^2 + 1), t, text, pooled, time ids);
    x = sample - sigma * eps. With one trailing step the next sigma is 0, so the ancestral noise term vanishes and
    `scheduler.step` reduces to this deterministic, differentiable expression (computed here directly so that no
    global RNG draw or scheduler step counter is involved).
    """

    kind = "sdxl-turbo"

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoders: tuple[CLIPTextModel, CLIPTextModelWithProjection],
        tokenizers: tuple[CLIPTokenizer, CLIPTokenizer],
        scheduler: EulerAncestralDiscreteScheduler,
        *,
        resolution: int | None = None,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        super().__init__(unet, vae, resolution=resolution, device=device, dtype=dtype)
        if scheduler.config.prediction_type != "epsilon":
            raise ValueError(f"SDXL-Turbo expects an epsilon scheduler, got {scheduler.config.prediction_type!r}")
        self.text_encoders = text_encoders
        self.tokenizers = tokenizers
        self.scheduler = scheduler
        scheduler.set_timesteps(1)
        self.timestep = scheduler.timesteps[0]
        self.sigma = float(scheduler.sigmas[0])
        self.init_noise_sigma = float(scheduler.init_noise_sigma)
        # [original H, W, crop top, left, target H, W]
        res = self.resolution
        self.time_ids = torch.tensor([[res, res, 0, 0, res, res]], device=device, dtype=dtype)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbedding:
        """Penultimate hidden states of both encoders concatenated (B, 77, D1 + D2); pooled (B, P) from encoder 2."""
        hidden = []
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            out = encoder(_token_ids(tokenizer, prompts).to(self.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
        pooled = out.text_embeds
        return PromptEmbedding(torch.cat(hidden, dim=-1).to(self.dtype), pooled.to(self.dtype))

    def _one_step(self, cond: PromptEmbedding, noise: torch.Tensor) -> torch.Tensor:
        sample = noise * self.init_noise_sigma
        eps = self.unet(
            sample / math.sqrt(self.sigma**2 + 1),
            self.timestep.to(self.device),
            encoder_hidden_states=cond.hidden,
            added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": self.time_ids.expand(len(cond), -1)},
        ).sample
        return sample.float() - self.sigma * eps.float()


def _check_folder(path: Path, kind: str) -> None:
    """Raise FileNotFoundError listing every missing piece of a diffusers folder."""
    needed = {
        "unet": "config.json",
        "vae": "config.json",
        "text_encoder": "config.json",
        "tokenizer": None,
        "scheduler": "scheduler_config.json",
    }
    if kind == "sdxl-turbo":
        needed |= {"text_encoder_2": "config.json", "tokenizer_2": None}
    if not path.is_dir():
        raise FileNotFoundError(f"{kind} model folder not found: {path}")
    missing = []
    for sub, config in needed.items():
        if not (path / sub).is_dir():
            missing.append(f"{sub}/")
        elif config is not None and not (path / sub / config).is_file():
            missing.append(f"{sub}/{config}")
    if missing:
        raise FileNotFoundError(f"{kind} model folder {path} is missing: {', '.join(missing)}")


def _frozen(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    return module.to(device).eval().requires_grad_(False)


def load_generator(
    path: str | Path,
    kind: str = "sd-turbo",
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    resolution: int | None = None,
    variant: str | None = None,
) -> OneStepGenerator:
    """Load a one-step generator from a local diffusers folder (local files only).

    kind: "sd-turbo" or "sdxl-turbo". resolution: image side in pixels (default: the UNet's sample_size times the
    VAE factor; the paper uses 512 for both models, which for SDXL-Turbo differs from its config). variant: weight
    file variant such as "fp16". Text encoders, VAE and UNet are frozen (eval, requires_grad False); LoRA adds the
    trainable parameters. Missing folder pieces raise FileNotFoundError naming each of them.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, EulerAncestralDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if kind not in KINDS:
        raise ValueError(f"unknown generator kind {kind!r}; expected one of {KINDS}")
    path = Path(path)
    _check_folder(path, kind)
    device = torch.device(device)
    hf = {"local_files_only": True, "variant": variant}
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, **hf)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, **hf)
    unet, vae = _frozen(unet, device), _frozen(vae, device)
    text_encoder = _frozen(CLIPTextModel.from_pretrained(path / "text_encoder", dtype=dtype, **hf), device)
    tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
    if kind == "sd-turbo":
        # The schedule only supplies alphas_cumprod; the folder may name any DDPM-compatible scheduler class.
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
        return SDTurboGenerator(
            unet, vae, text_encoder, tokenizer, scheduler, resolution=resolution, device=device, dtype=dtype
        )
    text_encoder_2 = _frozen(
        CLIPTextModelWithProjection.from_pretrained(path / "text_encoder_2", dtype=dtype, **hf), device
    )
    tokenizer_2 = CLIPTokenizer.from_pretrained(path / "tokenizer_2", local_files_only=True)
    scheduler = EulerAncestralDiscreteScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
    return SDXLTurboGenerator(
        unet,
        vae,
        (text_encoder, text_encoder_2),
        (tokenizer, tokenizer_2),
        scheduler,
        resolution=resolution,
        device=device,
        dtype=dtype,
    )
