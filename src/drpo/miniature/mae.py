"""The miniature's latent MAE: a drpo.features.latent_mae encoder trained by masked autoencoding on VAE latents.

Saved with drpo.features.latent_mae.save_checkpoint (the Drifting authors' flax export layout), so the DrPO trainer
reads it through LatentMAEFeatures exactly as it reads the paper's `mae_latent_256_torch.pth`. The small decoder is
stored alongside under "decoder.*" keys, which the feature loader ignores.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from drpo.features.latent_mae import LatentMAEEncoder, gn_groups, save_checkpoint
from drpo.miniature.autoencoder import encode, load_autoencoder
from drpo.miniature.data import render_pool, to_float, write_provenance
from drpo.world.spec import WorldSpec

CHECKPOINT_NAME = "mae_latent_torch.pth"


class MAEDecoder(nn.Module):
    """Reconstructs the latent from the encoder's stage maps: each map 1x1-projected, upsampled to full size, summed.

    maps: {"layer{k}": (N, widths[k-1], H / 2^(k-1), W / 2^(k-1))} -> (N, out_channels, H, W).
    """

    def __init__(self, widths: Sequence[int], out_channels: int, hidden: int = 64) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(w, hidden, 1) for w in widths)
        self.head = nn.Sequential(
            nn.GroupNorm(gn_groups(hidden), hidden),
            nn.SiLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(hidden, out_channels, 3, padding=1),
        )

    def forward(self, maps: dict[str, Tensor], size: tuple[int, int]) -> Tensor:
        total = sum(
            F.interpolate(proj(maps[f"layer{k + 1}"]), size=size, mode="nearest")
            for k, proj in enumerate(self.lateral)
        )
        return self.head(total)


def patch_mask(n: int, size: int, patch: int, ratio: float, generator: torch.Generator) -> Tensor:
    """Random mask (n, 1, size, size), 1 = hidden, over non-overlapping patch x patch cells; round(ratio * cells) hidden."""
    cells = (size // patch) ** 2
    hidden = round(ratio * cells)
    order = torch.rand(n, cells, generator=generator, device=generator.device).argsort(dim=1)
    mask = (order < hidden).float().view(n, 1, size // patch, size // patch)
    return F.interpolate(mask, scale_factor=patch, mode="nearest")


def train_mae(
    spec: WorldSpec,
    rows: Sequence[dict[str, Any]],
    *,
    autoencoder: str | Path,
    out_dir: str | Path,
    steps: int = 400,
    batch_size: int = 128,
    lr: float = 2e-3,
    layers: Sequence[int] = (1, 1, 1, 1),
    widths: Sequence[int] = (32, 64, 128, 128),
    mask_ratio: float = 0.5,
    mask_patch: int = 2,
    renders_per_row: int = 32,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, float]:
    """Train the latent MAE on VAE latents of renders of `rows`; write `out_dir`/mae_latent_torch.pth.

    Each step hides `mask_ratio` of the mask_patch x mask_patch latent cells (set to 0) and regresses the full
    latent; the loss weights hidden cells 1 and visible cells 0.1. The latents are a fixed pool of
    `renders_per_row` renders per row, encoded once. Metrics: masked-cell MSE against the latent variance
    (fraction of unexplained variance on the hidden cells) on a held-out pool.
    """
    started = time.time()
    arguments = {k: v for k, v in locals().items() if k not in ("spec", "rows", "started")}
    arguments |= {"spec": spec.to_dict(), "rows": len(rows), "autoencoder": str(autoencoder), "out_dir": str(out_dir)}
    torch.manual_seed(seed)
    generator = torch.Generator(device).manual_seed(seed)
    vae = load_autoencoder(autoencoder).to(device)
    latents = encode(vae, to_float(render_pool(rows, renders_per_row, spec, seed).flatten(0, 1)).to(device))
    held_out = encode(vae, to_float(render_pool(rows, 2, spec, seed + 1).flatten(0, 1)).to(device))
    channels, size = latents.shape[1], latents.shape[-1]

    encoder = LatentMAEEncoder(layers=layers, widths=widths, in_channels=channels).to(device)
    decoder = MAEDecoder(widths, channels).to(device)
    params = [*encoder.parameters(), *decoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)

    def masked_loss(x: Tensor) -> tuple[Tensor, Tensor]:
        mask = patch_mask(x.shape[0], size, mask_patch, mask_ratio, generator)
        recon = decoder(encoder(x * (1 - mask)), (size, size))
        err = (recon - x).square().mean(dim=1, keepdim=True)
        hidden = (err * mask).sum() / mask.sum().clamp_min(1)
        return hidden + 0.1 * (err * (1 - mask)).sum() / (1 - mask).sum().clamp_min(1), hidden

    for _ in tqdm(range(steps), desc="train mae", mininterval=30):
        batch = latents[torch.randint(len(latents), (batch_size,), generator=generator, device=device)]
        loss, _ = masked_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()

    encoder.eval().requires_grad_(False)
    decoder.eval().requires_grad_(False)
    with torch.no_grad():
        _, hidden = masked_loss(held_out)
    metrics = {
        "final_loss": loss.item(),
        "heldout_masked_mse": float(hidden),
        "heldout_masked_unexplained": float(hidden / held_out.var(dim=(0, 2, 3)).mean()),
    }
    out_dir = Path(out_dir)
    extra = {f"decoder.{k}": v.detach().cpu().clone() for k, v in decoder.state_dict().items()}
    save_checkpoint(encoder.cpu(), out_dir / CHECKPOINT_NAME, extra=extra)
    write_provenance(out_dir, function="drpo.miniature.mae.train_mae", arguments=arguments,
                     seed=seed, steps=steps, started=started, metrics=metrics)
    return metrics
