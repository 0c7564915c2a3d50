"""Benchmark of our drift estimator (drpo.drift) at paper sizes against a plain transcription of spec 2.6.

Sizes of the SD-Turbo recipe (spec 2.6, 3.1): K = 24 candidates, 8 positives, 8 negatives, one prompt; the
feature key layer4_mean_2 has 16 tokens per sample, so X is 384 points, the anchors 128 each, the reference
384; the width D is that of the latent MAE-256's last stage (2048, drpo.cost.architectures.MAE_WIDTHS). Cases:

* pref: the preference drift of one key (targets [X; Q; P] = 640 points), forward and backward into X;
* ref: the reference drift of one key (targets [X; sg(X); XR] = 1152 points, self mask), forward and backward;
* objective: DrPO's objective (drpo.methods.drpo.preference_loss) over the six SD-Turbo keys (1, 1, 16, 16, 4, 4
  tokens), with the settings of ``--config`` (default: the SD-Turbo preset, reference weight 0.2).

Per case: median seconds over ``--repeats`` calls after one warm-up, peak memory of a call
(drpo.cost.profile.peak_memory), and the largest relative difference of loss and gradient between the two
implementations. Then the objective's share of a DrPO update in FLOPs (SD-Turbo + HPSv3, drpo.cost.flops) and,
with ``--update-seconds`` (a measured DrPO update on the same device), in time.

    python benchmarks/drift_bench.py --out results/cost/drift_bench.csv            # CPU
    python benchmarks/drift_bench.py --device cuda --update-seconds 3.1 --out ...   # GPU
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor

from drpo.config import load_config
from drpo.cost.architectures import MAE_WIDTHS
from drpo.cost.profile import peak_memory
from drpo.drift import drift_loss
from drpo.features.base import parse_feature_key
from drpo.features.latent_mae import SD_TURBO_MAE_KEYS
from drpo.methods.base import settings_from_section
from drpo.methods.drpo import DrPOSettings, preference_loss

REPO = Path(__file__).resolve().parents[1]

LATENT_SIDE = 64  # 512 px / VAE factor 8
LAYER4_SIDE = LATENT_SIDE // 8  # layer 4 of the MAE is downsampled 8x: 8 x 8


def plain_drift_loss(x: Tensor, positive: Tensor, negative: Tensor, positive_weight: float,
                     negative_weight: float, radii: Sequence[float], mask_negative_self: bool = False) -> Tensor:
    """Spec 2.6 step by step for one prompt: x (N, D) with grad, positive (P, D), negative (M, D) -> loss ()."""
    n, d = x.shape
    xs = x.detach()
    targets = torch.cat([xs, negative, positive])
    omega = torch.cat([torch.ones(n), torch.full((len(negative),), negative_weight),
                       torch.full((len(positive),), positive_weight)]).to(x)
    dist = torch.cdist(xs, targets).clamp_min(1e-4)  # = sqrt(max(d^2, 1e-8))
    scale = ((dist * omega).mean() / omega.mean()).clamp_min(1e-3)
    sigma = (scale / math.sqrt(d)).clamp_min(1e-3)
    mask = torch.zeros_like(dist)
    mask[range(n), range(n)] = 1.0
    if mask_negative_self:
        mask[range(n), [n + i for i in range(n)]] = 1.0
    split = n + len(negative)
    field = torch.zeros_like(xs)
    for r in radii:
        logits = -dist / (scale * r) - (100.0 / r) * mask
        affinity = omega * (logits.softmax(dim=1) * logits.softmax(dim=0)).clamp_min(1e-6).sqrt()
        a_neg, a_pos = affinity[:, :split], affinity[:, split:]
        s_neg, s_pos = a_neg.sum(1, keepdim=True), a_pos.sum(1, keepdim=True)
        # the sum of dipoles A_ip A_in (p - n) = S- (A+ @ P) - S+ (A- @ N), in units of sigma
        f = (s_neg * (a_pos @ positive) - s_pos * (a_neg @ targets[:split])) / sigma
        field = field + f / f.square().mean().clamp_min(1e-8).sqrt()
    goal = (xs / sigma + field).detach()
    return (x / sigma - goal).square().mean()


def _timed(fn: Callable[[], Tensor], repeats: int, device: torch.device) -> tuple[float, Tensor]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    seconds = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), out


def _with_grad(loss_fn: Callable[[Tensor], Tensor], x: Tensor) -> Callable[[], Tensor]:
    """A call computing loss_fn(x) and its gradient; returns the loss followed by the gradient, flattened."""
    def call() -> Tensor:
        leaf = x.detach().requires_grad_(True)
        loss = loss_fn(leaf)
        loss.backward()
        return torch.cat([loss.detach().reshape(1), leaf.grad.flatten()])
    return call


def _tokens(key: str) -> int:
    _, stat, patch = parse_feature_key(key)
    return 1 if patch is None else (LAYER4_SIDE // patch) ** 2


def cases(k: int, pos: int, neg: int, tokens: int, dim: int, device: torch.device,
          settings: DrPOSettings) -> dict[str, tuple[Callable[[], Tensor], Callable[[], Tensor]]]:
    """Case name -> (ours, plain), each a call returning [loss, grad...]."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(k * tokens, dim, generator=g).to(device)
    xr = (x.cpu() + 0.5 * torch.randn(k * tokens, dim, generator=g)).to(device)
    p, q = x[: pos * tokens] + 0.1, x[-neg * tokens:] - 0.1
    w, radii = settings.positive_weight, settings.radii
    if settings.kernel not in ("laplacian", "exponential") or {settings.negative_weight, settings.reference_weight,
                                                                settings.reference_negative_weight} != {w}:
        raise ValueError("the plain transcription covers the laplacian kernel with one weight for every anchor")
    out = {
        "pref": (_with_grad(lambda v: drift_loss(v[None], p[None], q[None], positive_weight=w, negative_weight=w,
                                                 radii=radii, kernel=settings.kernel)[0].sum(), x),
                 _with_grad(lambda v: plain_drift_loss(v, p, q, w, w, radii), x)),
        "ref": (_with_grad(lambda v: drift_loss(v[None], xr[None], v.detach()[None], positive_weight=w,
                                                negative_weight=w, radii=radii, kernel=settings.kernel,
                                                mask_negative_self=True)[0].sum(), x),
                _with_grad(lambda v: plain_drift_loss(v, xr, v.detach(), w, w, radii, True), x)),
    }
    feats = {key: torch.randn(k, _tokens(key), dim, generator=g).to(device) for key in SD_TURBO_MAE_KEYS}
    refs = {key: torch.randn(k, _tokens(key), dim, generator=g).to(device) for key in SD_TURBO_MAE_KEYS}
    positives, negatives = torch.arange(pos, device=device), torch.arange(k - neg, k, device=device)

    def plain_objective(values: dict[str, Tensor]) -> Tensor:
        total = 0.0
        for key, v in values.items():
            flat, ref = v.flatten(0, 1), refs[key].flatten(0, 1)
            total = total + plain_drift_loss(flat, v.detach()[positives].flatten(0, 1),
                                             v.detach()[negatives].flatten(0, 1), w, w, radii)
            total = total + settings.reference_loss_weight * plain_drift_loss(flat, ref, flat.detach(), w, w,
                                                                                radii, True)
        return total

    def objective(fn: Callable[[dict[str, Tensor]], Tensor]) -> Callable[[], Tensor]:
        def call() -> Tensor:
            leaves = {key: v.detach().requires_grad_(True) for key, v in feats.items()}
            loss = fn(leaves)
            loss.backward()
            return torch.cat([loss.detach().reshape(1)] + [v.grad.flatten() for v in leaves.values()])
        return call

    def ours(values: dict[str, Tensor]) -> Tensor:
        negative_features = {key: v.detach()[negatives] for key, v in values.items()}
        return preference_loss(settings, values, refs if settings.reference_loss_weight else None, positives,
                               negative_features)

    out["objective (6 keys)"] = (objective(ours), objective(plain_objective))
    return out


def update_flop_share(settings: DrPOSettings, candidates: int) -> float:
    """FLOPs of DrPO's objective / FLOPs of a DrPO micro-step, SD-Turbo + HPSv3 at paper size (meta device)."""
    from drpo.cost.flops import UpdateShape, micro_step_flops, paper_models

    shape = UpdateShape(processes=1, accumulation=1, candidates=candidates, drpo=settings, online_reference=True,
                        reward_checkpointing=False)
    flops = micro_step_flops("drpo", paper_models("sd-turbo", "hpsv3"), shape)
    return flops["loss"] / sum(flops.values())


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--config", nargs="+", default=[str(REPO / "config.yaml"), str(REPO / "configs/sd-turbo.yaml")],
                        help="config files, each merged over the previous; DrPO's settings come from their drpo section")
    parser.add_argument("--candidates", type=int, default=24)
    parser.add_argument("--num-pos", type=int, default=8)
    parser.add_argument("--num-neg", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16, help="tokens per sample of the pref/ref key")
    parser.add_argument("--dim", type=int, default=MAE_WIDTHS[-1], help="feature width")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--update-seconds", type=float, help="a measured DrPO update (2 prompts) on this device")
    parser.add_argument("--accumulation", type=int, default=2, help="prompts per update behind --update-seconds")
    parser.add_argument("--no-share", action="store_true", help="skip the FLOP share (counts a meta DrPO step)")
    parser.add_argument("--out", help="CSV to write")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    drpo = load_config(*args.config)["drpo"] | {"num_pos": args.num_pos, "num_neg": args.num_neg}
    settings = settings_from_section(DrPOSettings, drpo)
    rows = []
    for name, (ours, plain) in cases(args.candidates, args.num_pos, args.num_neg, args.tokens, args.dim, device,
                                     settings).items():
        row = {"case": name, "device": str(device), "candidates": args.candidates, "dim": args.dim}
        for label, fn in (("ours", ours), ("plain", plain)):
            row[f"{label}_s"], result = _timed(fn, args.repeats, device)
            row[f"{label}_peak_mb"] = peak_memory(fn, device)[1] / 2**20
            row[f"{label}_result"] = result
        a, b = row.pop("ours_result"), row.pop("plain_result")
        row["loss_rel_diff"] = float((a[0] - b[0]).abs() / b[0].abs())
        row["grad_rel_diff"] = float((a[1:] - b[1:]).norm() / b[1:].norm())
        row["speedup_vs_plain"] = row["plain_s"] / row["ours_s"]
        if name.startswith("objective") and args.update_seconds:
            row["update_time_share"] = args.accumulation * row["ours_s"] / args.update_seconds
        rows.append(row)
    table = pd.DataFrame.from_records(rows)
    if not args.no_share:
        share = update_flop_share(settings, args.candidates)
        table.loc[table["case"].str.startswith("objective"), "update_flop_share"] = share
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index=False)
    return table


if __name__ == "__main__":
    main()
