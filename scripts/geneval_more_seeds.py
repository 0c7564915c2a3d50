"""GenEval-lite of the base and of LoRA checkpoints on many more noises than the evaluation rule uses.

The miniature's test split has 2 single-object and 4 counting prompts, so with the default 8 evaluation seeds one
image moves the single-object score by 6 points and the overall score by 1. This re-judges chosen checkpoints on
`--seeds` fresh noises per prompt (seeds from `--first-seed`, disjoint from the evaluation's 42-49), on the
small tags by default, so that a difference between base and DrPO can be told from noise.

    python scripts/geneval_more_seeds.py results/runs/drpo/seed*/checkpoints/checkpoint-300
"""

from __future__ import annotations

import argparse

import torch

from drpo.generators import load_generator
from drpo.lora import load_lora
from drpo.miniature.generator import geneval_lite
from drpo.pipeline import read_rows
from drpo.world.spec import WorldSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="*", help="LoRA checkpoint folders (the base is always judged)")
    parser.add_argument("--generator", default="resources/miniature/generator")
    parser.add_argument("--prompts", default="results/world/test_metadata.jsonl")
    parser.add_argument("--seeds", type=int, default=32)
    parser.add_argument("--first-seed", type=int, default=1000)
    parser.add_argument("--tags", default="single_object,two_object,counting,colors,position",
                        help="comma-separated tags to judge (color_attr has 72 test prompts and is left out)")
    args = parser.parse_args()

    tags = set(args.tags.split(","))
    rows = [row for row in read_rows(args.prompts) if row["tag"] in tags]
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    print(f"{len(rows)} prompts x {len(seeds)} seeds; GenEval-lite (%) per tag, overall = mean of these tags")
    for name in ["base", *args.checkpoints]:
        generator = load_generator(args.generator, "sd-turbo", device="cpu")
        if name != "base":
            load_lora(generator.unet, name)
        with torch.no_grad():
            scores = geneval_lite(generator, rows, WorldSpec(), seeds)
        print(name, {tag: round(100 * value, 2) for tag, value in scores.items()}, flush=True)


if __name__ == "__main__":
    main()
