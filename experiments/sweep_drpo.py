"""Train many DrPO variants at once and judge each on GenEval-lite with 32 fresh seeds per test prompt.

The "What moves GenEval-lite here" tables of docs/results.md come from these variants, run on one H100 with 16 CPU cores
(each variant its own process; the detector judges on the CPU) by a scratch copy of this script, and the
"uniform" ones on 2 CPU cores:

    python experiments/sweep_drpo.py --sweep features --jobs 12 --out /tmp/sweep   # one seed per variant
    python experiments/sweep_drpo.py --sweep detector --jobs 10 --out /tmp/sweep   # λ x 3 seeds, detector reward
    python experiments/sweep_drpo.py --sweep uniform --jobs 2 --out /tmp/sweep     # the previous detector recipe
    python experiments/sweep_drpo.py --sweep batch --jobs 2 --out /tmp/sweep       # 8 prompts per update, seeds 100-102

Each variant overrides the resolved config of the default run (results/runs/drpo/seed0/config.resolved.yaml,
so run `make run` first) with its target reward, λ, feature keys, updates, prompts per update, learning rate
and prompt schedule (an equal share per tag unless the variant says otherwise). Every checkpoint (two per run)
is judged on the test prompts x seeds 1000-1031 (disjoint from the evaluation's 42-49): GenEval-lite per tag
and overall, and the CLIP reward (x100). One JSON line per checkpoint goes to OUT/sweep.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CONFIG = Path("results/runs/drpo/seed0/config.resolved.yaml")
WORLD = Path("results/world")
MAE = ("latent_mae", ["layer2_mean_2", "layer2_std_2", "layer3_mean", "layer3_std", "layer4_mean", "layer4_std"], {})
MAE_FLAT = ("latent_mae", ["layer2_flat_2", "layer3_flat", "layer4_flat"], {})
TEACHER = ("teacher_unet", ["down_blocks.1", "mid_block", "up_blocks.0"], {"pool": 2})
RAW_FLAT = ("raw_latent", ["latent_flat", "latent_flat_2", "latent_mean", "latent_std"], {})
CLIP, DETECTOR = "pickscore", "geneval_lite"


def variant(name, features=MAE, reward=CLIP, lam=0.2, seed=0, split="train", steps=300, prompts=2, lr=1e-3,
            pools=False, balanced=True):
    return dict(name=name, features=features, reward=reward, lam=lam, seed=seed, split=split, steps=steps,
                prompts=prompts, lr=lr, pools=pools, balanced=balanced)


SWEEPS = {
    "features": [
        variant("clip_mae_l0.2"), variant("clip_teacher_l0.2", TEACHER), variant("clip_teacher_l0", TEACHER, lam=0.0),
        variant("clip_mae_l0", lam=0.0), variant("det_teacher_l0", TEACHER, DETECTOR, 0.0),
        variant("det_teacher_l0.2", TEACHER, DETECTOR), variant("clip_rawflat_l0.2", RAW_FLAT),
        variant("clip_maeflat_l0.2", MAE_FLAT),
        variant("det_teacher_l0_testsplit", TEACHER, DETECTOR, 0.0, split="test"),
        variant("det_mae_l0_testsplit", MAE, DETECTOR, 0.0, split="test"),
        variant("det_teacher_pools_testsplit", TEACHER, DETECTOR, split="test", pools=True),
        variant("det_rawflat_l0", RAW_FLAT, DETECTOR, 0.0),
        *[variant(f"clip_teacher_l0.2_s{s}", TEACHER, seed=s) for s in (1, 2)],
        *[variant(f"clip_teacher_l0_s{s}", TEACHER, lam=0.0, seed=s) for s in (1, 2)],
    ],
    "detector": [variant(f"det_mae_l{lam}_s{seed}", MAE, DETECTOR, lam, seed=seed)
                 for seed in (0, 1, 2) for lam in (0.0, 0.05, 0.2)],
    # The previous detector recipe: prompts cycled uniformly instead of an equal share per tag.
    "uniform": [variant(f"det_mae_l0_uniform_s{seed}", MAE, DETECTOR, 0.0, seed=seed, steps=150, balanced=False)
                for seed in (0, 1, 2)],
    # 8 prompts per update, on training seeds the tables do not report (the first variant is the default run's).
    "batch": [v for seed in (100, 101, 102) for v in (
        variant(f"det_mae_l0_b8_uniform_s{seed}", MAE, DETECTOR, 0.0, seed=seed, steps=75, prompts=8, balanced=False),
        variant(f"det_mae_l0_b8_equal_s{seed}", MAE, DETECTOR, 0.0, seed=seed, steps=75, prompts=8),
        variant(f"clip_mae_l0.2_b8_s{seed}", seed=seed, steps=75, prompts=8),
        variant(f"clip_mae_l0_b8_s{seed}", lam=0.0, seed=seed, steps=75, prompts=8))],
}


def run_one(sweep: str, index: int, out: Path, eval_seeds: int, steps: int | None) -> None:
    """Train variant `index` of `sweep` (the base when -1), judge its checkpoints, append to OUT/sweep.jsonl."""
    import torch
    import yaml

    from drpo.evaluate import sample_latents
    from drpo.generators import load_generator
    from drpo.lora import load_lora
    from drpo.miniature.generator import judge_latents
    from drpo.pipeline import run_training
    from drpo.prompt_files import read_rows
    from drpo.rewards import build_reward_from_config
    from drpo.world.spec import WorldSpec

    torch.set_num_threads(1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = yaml.safe_load(CONFIG.read_text())
    rows = read_rows(WORLD / "test_metadata.jsonl")
    seeds = list(range(1000, 1000 + eval_seeds))
    prompts = [row["prompt"] for row in rows for _ in seeds]
    clip = build_reward_from_config({"name": CLIP, "path": "resources/miniature/reward", "device": device})

    def judge(name, step, checkpoint, train_seconds):
        generator = load_generator(config["models"]["generator"]["path"], "sd-turbo", device=device)
        if checkpoint is not None:
            load_lora(generator.unet, checkpoint)
        with torch.no_grad():
            latents = sample_latents(generator, [row["prompt"] for row in rows], seeds, batch_size=512)
            scores = judge_latents(generator, latents, [row for row in rows for _ in seeds], WorldSpec())
            clip_scores = torch.cat([
                clip.score(generator.decode(latents[i:i + 512].to(device)), prompts[i:i + 512])
                for i in range(0, len(latents), 512)])
        line = {"name": name, "step": step, "train_s": train_seconds,
                "clip_reward": round(100 * clip_scores.mean().item(), 3),
                **{tag: round(100 * value, 2) for tag, value in scores.items()}}
        with open(out / "sweep.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")

    if index < 0:
        return judge("base", 0, None, 0)
    v = SWEEPS[sweep][index] | ({"steps": steps} if steps else {})
    name, keys, options = v["features"]
    config["device"] = device
    mae = config["models"]["features"]["checkpoint"]
    config["models"]["features"] = {"name": name, "keys": keys, "options": options,
                                    "checkpoint": mae if name == "latent_mae" else None}
    clip_spec = {"name": CLIP, "path": "resources/miniature/reward"}
    config["models"]["reward"] = clip_spec if v["reward"] == CLIP else {"name": DETECTOR}
    config["drpo"].update(reference_loss_weight=v["lam"], rollout_rounds=4 if v["pools"] else 0,
                          reference_l2_weight=0.2 if v["pools"] else 0.0)
    config["train"].update(steps=v["steps"], checkpoint_every=v["steps"] // 2, prompts_per_step=v["prompts"],
                           learning_rate=v["lr"], balance_tags=v["balanced"])
    run_dir = out / "runs" / v["name"]
    start = time.time()
    run_training(config, "drpo", v["seed"], WORLD / f"{v['split']}_metadata.jsonl", run_dir, log=lambda *a: None)
    seconds = round(time.time() - start)
    for checkpoint in sorted((run_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: -int(p.name.split("-")[1])):
        judge(v["name"], int(checkpoint.name.split("-")[1]), checkpoint, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", choices=sorted(SWEEPS), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--jobs", type=int, default=2, help="variants trained at once, each its own process")
    parser.add_argument("--eval-seeds", type=int, default=32)
    parser.add_argument("--steps", type=int, help="updates of every variant (default: each variant's own)")
    parser.add_argument("--index", type=int, help=argparse.SUPPRESS)  # one variant, in a child process
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.index is not None:
        return run_one(args.sweep, args.index, args.out, args.eval_seeds, args.steps)

    def launch(index: int) -> None:
        log = args.out / f"variant{index}.log"
        command = [sys.executable, __file__, "--sweep", args.sweep, "--out", str(args.out), "--jobs", "1",
                   "--eval-seeds", str(args.eval_seeds), "--index", str(index)]
        command += ["--steps", str(args.steps)] if args.steps else []
        with open(log, "w") as f:
            if subprocess.call(command, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ, TQDM_DISABLE="1")):
                print(f"variant {index} failed; see {log}", flush=True)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(launch, [-1, *range(len(SWEEPS[args.sweep]))]))
    print((args.out / "sweep.jsonl").read_text())


if __name__ == "__main__":
    main()
