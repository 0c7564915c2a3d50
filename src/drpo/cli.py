"""Command line entry points for stages that run under a launcher (multi-GPU training).

    accelerate launch --num_processes 4 -m drpo.cli train --config run/config.resolved.yaml \\
        --method drpo --seed 0 --prompts prompts.txt --run-dir run [--bank bank.safetensors]
        [--preferences results/preferences/latents/done.json]

The workflow's train rule calls this itself when the method's train.processes (train.per_method) > 1; users
can too, on any cluster.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m drpo.cli")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train one (method, seed) run; resumes from its checkpoints")
    train.add_argument("--config", required=True, help="workflow config YAML (validated)")
    train.add_argument("--method", required=True)
    train.add_argument("--seed", type=int, required=True)
    train.add_argument("--prompts", required=True, help="training prompts (.txt or GenEval .jsonl)")
    train.add_argument("--run-dir", required=True)
    train.add_argument("--bank", default=None, help="reference bank; omit to sample the base online")
    train.add_argument("--preferences", default=None,
                       help="an offline method's latent cache (the preference_latents rule's done.json)")
    args = parser.parse_args(argv)

    from drpo.config import load_config
    from drpo.pipeline import run_training

    config = load_config(args.config)
    run_training(config, args.method, args.seed, args.prompts, args.run_dir, bank_path=args.bank,
                 preferences_path=args.preferences)


if __name__ == "__main__":
    main(sys.argv[1:])
