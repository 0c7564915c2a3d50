"""Judge the base generator and LoRA checkpoints with the miniature's detector on many fresh noises, per GenEval tag.

The evaluation rule judges every checkpoint on the test prompts x evaluate.seeds; the miniature's smallest tags
(2 single-object test prompts) then move by several points per image. This tool judges chosen checkpoints on
more noises (seeds disjoint from the evaluation's by default) and prints, per tag and model: GenEval-lite (%,
GenEval's semantics), the mean number of objects the detector finds, and the share of images with more objects
than the prompt asks for (GenEval passes an included object present *at least* so many times, so drawing extra
shapes can raise GenEval-lite without drawing better ones; "strict" also fails those images). The overall scores
are the means of the tags judged.

    python scripts/judge_checkpoints.py --config results/runs/drpo/seed0/config.resolved.yaml \
        --prompts results/world/test_metadata.jsonl --seeds 1000:1032 \
        results/runs/drpo/seed*/checkpoints/checkpoint-75

--config is a config file (a run's config.resolved.yaml, or config.yaml and presets merged in order): its
generator, device, world spec and evaluation batch size are used. --out writes the table as CSV too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch

from drpo.config import load_config
from drpo.evaluate import sample_images
from drpo.pipeline import load_generator_at, world_spec
from drpo.prompt_files import read_rows
from drpo.world.detect import judge_by_tag
from drpo.world.prompts import TAGS


def seed_range(text: str) -> list[int]:
    """"1000:1032" -> [1000, ..., 1031]."""
    start, _, stop = text.partition(":")
    seeds = list(range(int(start), int(stop)))
    if not seeds:
        raise argparse.ArgumentTypeError(f"empty seed range {text!r}; give START:STOP with STOP > START")
    return seeds


def judge_checkpoints(config: dict, rows: list[dict], seeds: list[int], checkpoints: list[str | None]) -> pd.DataFrame:
    """One row per (model, tag): geneval and strict (%), objects, extra (%); model "base" for a checkpoint None."""
    spec = world_spec(config)
    if spec is None:
        raise ValueError("the detector judges the miniature world's images: this config has world.enabled false")
    records = []
    for checkpoint in checkpoints:
        generator = load_generator_at(config, checkpoint)
        images = sample_images(generator, [row["prompt"] for row in rows], seeds,
                               batch_size=config["evaluate"]["batch_size"])
        verdicts = judge_by_tag(images, [row for row in rows for _ in seeds], spec)
        model = "base" if checkpoint is None else str(checkpoint)
        for tag in (tag for tag in TAGS if tag in verdicts):
            v = verdicts[tag]
            records.append({"model": model, "tag": tag, "geneval": 100 * v["correct"], "strict": 100 * v["strict"],
                            "objects": v["objects"], "extra": 100 * v["extra"]})
        records.append({"model": model, "tag": "overall",
                        "geneval": sum(100 * v["correct"] for v in verdicts.values()) / len(verdicts),
                        "strict": sum(100 * v["strict"] for v in verdicts.values()) / len(verdicts)})
    return pd.DataFrame.from_records(records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="*", help="LoRA checkpoint folders (the base is always judged)")
    parser.add_argument("--config", nargs="+", required=True, help="config file(s), merged in order")
    parser.add_argument("--prompts", required=True, help="GenEval metadata .jsonl of the prompts to judge")
    parser.add_argument("--seeds", type=seed_range, default=seed_range("1000:1032"),
                        help="noise seeds START:STOP per prompt (default 1000:1032, disjoint from evaluate.seeds)")
    parser.add_argument("--tags", help="comma-separated GenEval tags to judge (default: all)")
    parser.add_argument("--out", help="also write the table as CSV")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the detector and a tiny generator: more threads only contend on a shared CPU
    config = load_config(*args.config)
    rows = read_rows(args.prompts)
    if args.tags:
        rows = [row for row in rows if row.get("tag") in set(args.tags.split(","))]
    if not rows:
        print(f"error: no prompts of tags {args.tags} in {args.prompts}", file=sys.stderr)
        return 2
    table = judge_checkpoints(config, rows, args.seeds, [None, *args.checkpoints])
    print(f"{len(rows)} prompts x {len(args.seeds)} seeds; geneval, strict and extra in %")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
