"""Reproduce the paper's HPSv3 efficiency table on one GPU, without any weights.

Random-initialised models at their real sizes in bf16 (SD-Turbo UNet with LoRA r16, SD VAE, OpenCLIP-H text
encoder, HPSv3's Qwen2-VL-7B, PickScore's CLIP-H; the latent MAE-256 in fp32) run real DrPO and DRaFT updates
(the training code's methods and update step, built from the config) under the paper's per-component timing
protocol (drpo.cost.profile), the two methods taking turns. One process does what one of the paper's four GPUs
did: the config's ``cost.analytic`` protocol (accumulation 2 x K = 24 candidates per update, DrPO anchors 12 / 12),
DrPO without its reference drift (λ 0, as the paper's profiler adds none), DRaFT streaming one candidate per
backward with decode and reward recomputed in its backward pass. Below 100 GiB of GPU memory the UNet is
checkpointed too (for both methods), as DrPO's 24 UNet forwards kept for backward do not fit next to HPSv3 on an
80 GB card. The CSV (device name, per method and component: median, min, max seconds, peak memory) is rewritten
after each reward, and no update starts after --max-minutes, so a long run keeps what it measured.

    python scripts/profile_gpu.py --out results/cost/gpu_profile.csv      # one H100: about 5 minutes
    python scripts/profile_gpu.py --tiny --out /tmp/gpu_tiny.csv           # CPU smoke test, seconds
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from drpo.config import load_config, merge
from drpo.cost.architectures import TINY, build_generator, build_mae, build_reward
from drpo.cost.profile import device_name, profile_updates, summarize
from drpo.methods import build_method
from drpo.reference import OnlineReference
from drpo.train import TrainSettings

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "a photo of an astronaut riding a horse on the moon",
    "a watercolor painting of a fox in a snowy forest",
    "a close-up portrait of an old fisherman, dramatic lighting",
    "a cozy cabin by a lake at sunset, highly detailed",
]
METHODS = ("drpo", "draft")
TINY_PROTOCOL = {"candidates": 4, "accumulation": 1, "num_pos": 1, "num_neg": 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="CSV to write (one row per setting, method and component)")
    parser.add_argument("--config", nargs="+", default=[str(REPO / "config.yaml"), str(REPO / "configs/sd-turbo.yaml")],
                        help="config files, each merged over the previous (the methods' settings, cost.analytic)")
    parser.add_argument("--generator", default="sd-turbo", choices=["sd-turbo", "sdxl-turbo"])
    parser.add_argument("--rewards", nargs="+", default=["hpsv3", "pickscore"], choices=["hpsv3", "pickscore"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--candidates", type=int, help="K per prompt (default: cost.analytic; --tiny: 4)")
    parser.add_argument("--accumulation", type=int, help="prompts per update (default: cost.analytic; --tiny: 1)")
    parser.add_argument("--num-pos", type=int, help="DrPO positives (default: cost.analytic; --tiny: 1)")
    parser.add_argument("--num-neg", type=int, help="DrPO negatives (default: cost.analytic; --tiny: 1)")
    parser.add_argument("--warmup", type=int, default=1, help="updates run before timing")
    parser.add_argument("--updates", type=int, default=3, help="timed updates per method")
    parser.add_argument("--draft-chunk", type=int, default=1, help="DRaFT candidates per backward (paper: 1)")
    parser.add_argument("--decode-chunk", type=int, default=1, help="DRaFT images per VAE decode call (paper: 1)")
    parser.add_argument("--reward-batch", type=int, default=1, help="images per reward call (paper: 1)")
    parser.add_argument("--unet-checkpointing", choices=["auto", "on", "off"], default="auto",
                        help="activation checkpointing of the UNet, for both methods; auto: on below 100 GiB of GPU "
                             "memory (DrPO keeps 24 UNet forwards for backward: ~60 GiB next to HPSv3's ~16 GiB)")
    parser.add_argument("--max-minutes", type=float, default=9.0,
                        help="stop starting new updates after this many minutes (the CSV keeps finished blocks)")
    parser.add_argument("--tiny", action="store_true", help="tiny stand-in models on the CPU (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def profiled_config(args: argparse.Namespace) -> dict:
    """The config with the profiling protocol: cost.analytic's (or --tiny's) K, accumulation and anchors,
    overridden by the command line, one process, DrPO without reference drift, DRaFT's chunks."""
    config = load_config(*args.config)
    protocol = {key: config["cost"]["analytic"][key] for key in TINY_PROTOCOL}
    protocol |= TINY_PROTOCOL if args.tiny else {}
    protocol |= {key: value for key in TINY_PROTOCOL if (value := getattr(args, key)) is not None}
    return merge(config, {
        "device": "cpu" if args.tiny else "cuda",
        "train": {"candidates": protocol["candidates"], "prompts_per_step": protocol["accumulation"],
                  "processes": 1, "mixed_precision": "no"},
        "drpo": {"num_pos": protocol["num_pos"], "num_neg": protocol["num_neg"], "reference_loss_weight": 0.0},
        "draft": {"candidates_per_backward": args.draft_chunk, "decode_chunk_size": args.decode_chunk},
    })


def profile_reward(methods: list, params: list, source: OnlineReference, settings: TrainSettings,
                   args: argparse.Namespace, deadline: float) -> pd.DataFrame | None:
    """Summary of interleaved DrPO / DRaFT updates with one reward, or None if they ran out of GPU memory."""
    reward = methods[0].reward
    began = time.monotonic()
    try:
        timings = profile_updates(methods, params, source, settings, warmup=args.warmup, updates=args.updates,
                                  online_reference=True, deadline=deadline)
    except torch.OutOfMemoryError as error:
        print(f"{reward.name}: out of memory ({error}); skipped", flush=True)
        return None
    summary = summarize(timings)
    for method, part in summary.groupby("method", sort=False):
        update = part.set_index("component").loc["update"]
        print(f"{reward.name} {method}: median update {update['median_s']:.2f} s (min {update['min_s']:.2f}, "
              f"max {update['max_s']:.2f}, {update['updates']} updates), peak {update['peak_memory_gb']:.1f} GiB",
              flush=True)
    print(f"{reward.name}: {time.monotonic() - began:.0f} s", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    deadline = time.monotonic() + 60 * args.max_minutes
    if not args.tiny and not torch.cuda.is_available():
        print("error: CUDA is not available on this machine; scripts/profile_gpu.py needs a GPU "
              "(use --tiny for a CPU smoke test)", file=sys.stderr)
        return 2
    config = profiled_config(args)
    device = torch.device(config["device"])
    if args.tiny:
        torch.set_num_threads(1)  # tiny models on a shared CPU: more threads only contend
    dtype = torch.float32 if args.tiny else torch.bfloat16
    sizes = TINY if args.tiny else {}
    settings = TrainSettings.from_config(config["train"], args.seed)
    torch.manual_seed(args.seed)
    generator, params = build_generator(args.generator, device=device, dtype=dtype, **sizes.get("generator", {}))
    unet_checkpointing = args.unet_checkpointing == "on" or (
        args.unet_checkpointing == "auto" and device.type == "cuda"
        and torch.cuda.get_device_properties(device).total_memory < 100 * 2**30)
    if unet_checkpointing:
        generator.unet.enable_gradient_checkpointing()
    features = build_mae(device=device, **sizes.get("mae", {}))
    source = OnlineReference(generator, PROMPTS, candidates=settings.candidates, seed=args.seed)
    name = device_name(device)
    print(f"{name}: {args.generator}, {settings.prompts_per_step} x K={settings.candidates} per update, "
          f"{args.warmup} warm-up + {args.updates} timed updates per method, UNet checkpointing "
          f"{'on' if unet_checkpointing else 'off'}", flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    blocks: list[pd.DataFrame] = []
    for reward_name in args.rewards:
        if time.monotonic() > deadline:
            print(f"--max-minutes reached: {reward_name} not run", flush=True)
            break
        reward = build_reward(reward_name, device=device, dtype=dtype, batch_size=args.reward_batch,
                              **sizes.get(reward_name, {}))
        methods = [build_method(method, generator, reward, features, config) for method in args.methods]
        summary = profile_reward(methods, params, source, settings, args, deadline)
        if summary is not None:
            setting = (f"gpu profile: {args.generator} + {reward_name}, {settings.prompts_per_step} x "
                       f"K={settings.candidates}, DRaFT {args.draft_chunk} per backward, UNet ckpt "
                       f"{'on' if unet_checkpointing else 'off'}")
            blocks.append(summary.assign(setting=setting, device=name, dtype=str(dtype).removeprefix("torch."),
                                         torch=torch.__version__))
            pd.concat(blocks, ignore_index=True).to_csv(out, index=False)
        del reward, methods
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not blocks:
        print("error: nothing was measured", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
