"""How many objects the miniature's detector finds per image, per GenEval tag: the base vs each run's last checkpoint.

A check for a known way to hack GenEval's semantics: an included object passes when it appears *at least* so
many times, so a generator that draws extra shapes gains on single and two objects without drawing better ones.
Reads the default run's layout (make run first):

    python scripts/count_objects.py                       # results/, 16 seeds (2000-2015) per test prompt
    python scripts/count_objects.py --results results/pickscore --seeds 32

Prints, per tag, the mean number of detected objects and the share of images with more objects than the prompt
asks for (the sum of its include counts).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

from drpo.evaluate import sample_latents
from drpo.generators import load_generator
from drpo.lora import load_lora
from drpo.pipeline import read_rows
from drpo.world.detect import object_counts
from drpo.world.prompts import TAGS
from drpo.world.spec import WorldSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--method", default="drpo")
    parser.add_argument("--seeds", type=int, default=16, help="noise seeds per test prompt, from 2000")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = sorted((args.results / "runs" / args.method).glob("seed*"))
    if not runs:
        raise SystemExit(f"no runs under {args.results / 'runs' / args.method}: run the workflow first")
    config = yaml.safe_load((runs[0] / "config.resolved.yaml").read_text())
    spec = WorldSpec(**config["world"]["spec"])
    rows = read_rows(args.results / "world" / "test_metadata.jsonl")
    seeds = list(range(2000, 2000 + args.seeds))
    generator_spec = config["models"]["generator"]
    checkpoints = [None] + [max((run / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
                            for run in runs]
    for checkpoint in checkpoints:
        generator = load_generator(generator_spec["path"], generator_spec["kind"], device="cpu")
        if checkpoint is not None:
            load_lora(generator.unet, checkpoint)
        with torch.no_grad():
            latents = sample_latents(generator, [row["prompt"] for row in rows], seeds, batch_size=256)
            images = generator.to_uint8(generator.decode(latents, chunk_size=256)).numpy()
        counts = object_counts(images, [row for row in rows for _ in seeds], spec)  # prompt-major, as sampled
        name = "base" if checkpoint is None else f"{checkpoint.parents[1].name} {checkpoint.name}"
        print(f"{name:28s}", "  ".join(f"{tag} {counts[tag][0]:.2f} ({100 * counts[tag][1]:.0f} % extra)"
                                       for tag in TAGS if tag in counts), flush=True)


if __name__ == "__main__":
    main()
