"""The miniature world's stand-ins for the paper's evaluation prompt sets: its test split written in the forms the
real sets ship in, so that evaluation reads them through the same readers (drpo.prompt_files) as at paper scale.

- "parti": a Parti-Prompts TSV (Prompt, Category, Challenge, Note). Category is the prompt's first object class (Parti
  groups by content: Animals, Vehicles, ...); Challenge is named after the GenEval task, in Parti's vocabulary.
- "pickapic_v2": a folder of two Parquet shards shaped like Pick-a-Pic v2's test_unique split: one row per comparison,
  so a caption repeats over rows (1-3 times here), with the columns caption, ranking_id, label_0 and label_1. The
  image columns are left out: evaluation reads only the captions.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

# The GenEval task of a prompt, as the nearest Parti-Prompts challenge.
CHALLENGES = {"single_object": "Basic", "two_object": "Complex", "counting": "Quantity", "colors": "Simple Detail",
              "position": "Properties & Positioning", "color_attr": "Fine-grained Detail"}


def write_parti_tsv(rows: list[dict], path: str | Path) -> None:
    """``rows`` (GenEval metadata rows) as a Parti-Prompts TSV."""
    with Path(path).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(["Prompt", "Category", "Challenge", "Note"])
        for row in rows:
            writer.writerow([row["prompt"], row["include"][0]["class"].capitalize(), CHALLENGES[row["tag"]], ""])


def write_pickapic_shards(rows: list[dict], out_dir: str | Path, *, seed: int = 0, shards: int = 2) -> None:
    """``rows``' prompts as Pick-a-Pic v2-style Parquet shards (``test_unique-0000k-of-0000n.parquet``), each caption
    repeated over 1-3 comparison rows and the rows shuffled, so that a reader has to deduplicate them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    captions = [row["prompt"] for row in rows for _ in range(int(rng.integers(1, 4)))]
    order = rng.permutation(len(captions))
    labels = rng.integers(0, 2, len(captions))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for k, part in enumerate(np.array_split(order, shards)):
        table = pa.table({"ranking_id": [int(i) for i in part], "caption": [captions[i] for i in part],
                          "label_0": [float(labels[i]) for i in part], "label_1": [float(1 - labels[i]) for i in part]})
        pq.write_table(table, out_dir / f"test_unique-{k:05d}-of-{shards:05d}.parquet")
