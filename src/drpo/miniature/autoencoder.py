"""The miniature's VAE: a tiny diffusers AutoencoderKL trained as a (lightly KL-regularised) autoencoder on renders.

Default: 32 x 32 x 3 renders <-> 16 x 16 x 4 latents (two blocks, factor 2; SD's VAE has factor 8). With factor 4
(8 x 8 latents) a VAE trainable in minutes on a CPU rounds the corners of 8-px diamonds and triangles, and the
detector then reads them as circles: the VAE would cap every generator's shape accuracy. After training,
`scaling_factor` is set to 1 / std of the latent means over fresh renders, so that UNet-space latents (mean x
scaling_factor) have unit std, as SD's 0.18215 does for its VAE.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import Tensor
from tqdm import tqdm

from drpo.images import to_uint8
from drpo.miniature.data import render_batch, sample_rows, write_provenance
from drpo.tiny import tiny_vae_config
from drpo.world.detect import judge
from drpo.world.spec import WorldSpec


@torch.no_grad()
def encode(vae: AutoencoderKL, images: Tensor, batch_size: int = 256) -> Tensor:
    """Images (N, 3, H, W) in [-1, 1] -> UNet-space latents (N, C, h, w): posterior mean x scaling_factor."""
    chunks = [vae.encode(chunk).latent_dist.mode() for chunk in images.split(batch_size)]
    return torch.cat(chunks) * vae.config.scaling_factor


@torch.no_grad()
def decode(vae: AutoencoderKL, latents: Tensor, batch_size: int = 256) -> Tensor:
    """UNet-space latents (N, C, h, w) -> images (N, 3, H, W) clamped to [-1, 1]."""
    chunks = [vae.decode(chunk / vae.config.scaling_factor).sample for chunk in latents.split(batch_size)]
    return torch.cat(chunks).clamp(-1, 1)


@torch.no_grad()
def evaluate_autoencoder(
    vae: AutoencoderKL, rows: Sequence[dict[str, Any]], spec: WorldSpec, *, per_row: int = 2, seed: int = 0
) -> dict[str, float]:
    """Reconstruction quality on fresh renders of `rows`: pixel MSE, judge accuracy of renders and of reconstructions."""
    rng = np.random.default_rng(seed)
    rows = [row for row in rows for _ in range(per_row)]
    images = render_batch(rows, rng, spec)
    recon = decode(vae, encode(vae, images))
    originals, rebuilt = to_uint8(images).numpy(), to_uint8(recon).numpy()
    return {
        "mse": float((recon - images).square().mean()),
        "judge_renders": float(np.mean([judge(im, row, spec)[0] for im, row in zip(originals, rows)])),
        "judge_reconstructions": float(np.mean([judge(im, row, spec)[0] for im, row in zip(rebuilt, rows)])),
    }


def _pixel_weights(images: Tensor, background: Tensor, object_weight: float) -> Tensor:
    """(N, 1, H, W) loss weights: 1, plus `object_weight` on pixels of (or next to) an object."""
    objects = ((images - background).abs().amax(dim=1, keepdim=True) > 0.02).float()
    return 1.0 + object_weight * F.max_pool2d(objects, 3, stride=1, padding=1)


def train_autoencoder(
    spec: WorldSpec,
    rows: Sequence[dict[str, Any]],
    *,
    out_dir: str | Path,
    steps: int = 700,
    batch_size: int = 64,
    lr: float = 2e-3,
    kl_weight: float = 1e-4,
    object_weight: float = 4.0,
    block_out_channels: Sequence[int] = (16, 32),
    latent_channels: int = 4,
    eval_rows: Sequence[dict[str, Any]] | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, float]:
    """Train the VAE on fresh renders of `rows` and save it (diffusers AutoencoderKL folder) to `out_dir`.

    Loss: per-pixel L1 + MSE, each pixel weighted 1 + `object_weight` on and around objects (where the render
    differs from the background, dilated by 1 px: the edges that decide a shape), + `kl_weight` x per-element KL
    of the posterior to N(0, I), with a sampled latent. AdamW with one-cycle cosine decay. Metrics (on `eval_rows`, default `rows`): reconstruction MSE, judge accuracy of the
    renders and of their reconstructions (the ceiling for any generator decoding through this VAE), latent std.
    """
    started = time.time()
    arguments = {k: v for k, v in locals().items() if k not in ("spec", "rows", "eval_rows", "started")}
    arguments |= {"spec": spec.to_dict(), "rows": len(rows)}
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n_blocks = len(block_out_channels)
    vae = AutoencoderKL(
        **tiny_vae_config(
            latent_channels=latent_channels,
            block_out_channels=block_out_channels,
            latent_size=spec.image_size // 2 ** (n_blocks - 1),
            scaling_factor=1.0,
        )
    ).to(device)
    background = (torch.tensor(spec.background, dtype=torch.float32) / 127.5 - 1.0).view(1, 3, 1, 1).to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    vae.train()
    for _ in tqdm(range(steps), desc="train autoencoder", mininterval=30):
        images = render_batch([rows[i] for i in sample_rows(rows, batch_size, rng)], rng, spec).to(device)
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample
        kl = 0.5 * (posterior.mean.square() + posterior.var - 1.0 - posterior.logvar).mean()
        err = recon - images
        loss = (_pixel_weights(images, background, object_weight) * (err.abs() + err.square())).mean()
        loss = loss + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    vae.eval().requires_grad_(False)

    vae.cpu()
    probe = render_batch([rows[i] for i in sample_rows(rows, 512, rng)], rng, spec)
    std = float(encode(vae, probe).std())
    vae.register_to_config(scaling_factor=1.0 / std)
    metrics = evaluate_autoencoder(vae, eval_rows if eval_rows is not None else rows, spec, seed=seed + 1)
    metrics |= {"latent_std_before_scaling": std, "scaling_factor": 1.0 / std, "final_loss": loss.item()}
    vae.save_pretrained(out_dir, safe_serialization=True)
    write_provenance(out_dir, function="drpo.miniature.autoencoder.train_autoencoder", arguments=arguments,
                     seed=seed, steps=steps, started=started, metrics=metrics)
    return metrics


def load_autoencoder(path: str | Path) -> AutoencoderKL:
    """The trained VAE from its folder (local files only), frozen, in eval mode."""
    return AutoencoderKL.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)
