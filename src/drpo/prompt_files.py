"""Prompt files in the forms the paper's prompt sets ship in, read into prompt rows (dicts with at least "prompt").

- ``.txt``: one prompt a non-empty line (the authors' PickScore splits and pickapicv2_test_unique.txt).
- ``.jsonl``: GenEval metadata rows (prompt, tag, include, exclude), validated; per-task GenEval needs them.
- ``.tsv``: Parti-Prompts as it ships (PartiPrompts.tsv: columns Prompt, Category, Challenge, Note); rows get
  "category" and "challenge", so that scores can be broken down by category.
- ``.parquet``, or a folder of ``.parquet`` shards: Pick-a-Pic v2 (e.g. its ``test_unique`` split); the prompts are
  the unique values of the ``caption`` column, in first-seen order over the shards sorted by name. Only that column
  is read: the shards also hold the images.
"""

from __future__ import annotations

import csv
from pathlib import Path

PARTI_COLUMNS = ("Prompt", "Category", "Challenge")
PICKAPIC_CAPTION = "caption"


def prompt_file_kind(path: str | Path) -> str:
    """"txt", "geneval", "parti" or "pickapic", by the path's form (a folder is a Pick-a-Pic shard folder)."""
    path = Path(path)
    kinds = {".txt": "txt", ".jsonl": "geneval", ".tsv": "parti", ".parquet": "pickapic"}
    if path.suffix in kinds:
        return kinds[path.suffix]
    if path.is_dir() or not path.suffix:
        return "pickapic"
    raise ValueError(f"{path}: unsupported prompt file type {path.suffix!r}; use .txt (a prompt a line), GenEval "
                     ".jsonl, a Parti-Prompts .tsv, or Pick-a-Pic .parquet shards (a file or a folder of them)")


def read_rows(path: str | Path) -> list[dict]:
    """The prompt rows of a prompt file of any form above; errors name the file and what is wrong."""
    from drpo.world.prompts import read_metadata_jsonl, read_prompts

    path = Path(path)
    kind = prompt_file_kind(path)
    if kind == "geneval":
        return read_metadata_jsonl(path)
    if kind == "parti":
        return read_parti_tsv(path)
    if kind == "pickapic":
        return [{"prompt": caption} for caption in read_pickapic_captions(path)]
    return [{"prompt": prompt} for prompt in read_prompts(path)]


def read_parti_tsv(path: str | Path) -> list[dict]:
    """Parti-Prompts rows: {"prompt", "category", "challenge"} for every row with a non-empty Prompt."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        missing = [column for column in PARTI_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: a Parti-Prompts TSV needs the columns {', '.join(PARTI_COLUMNS)}; "
                             f"missing {', '.join(missing)} (header: {reader.fieldnames})")
        rows = [{"prompt": row["Prompt"].strip(), "category": (row["Category"] or "").strip(),
                 "challenge": (row["Challenge"] or "").strip()}
                for row in reader if (row["Prompt"] or "").strip()]
    if not rows:
        raise ValueError(f"{path} has no prompts")
    return rows


def read_pickapic_captions(path: str | Path) -> list[str]:
    """The unique non-empty captions of Pick-a-Pic Parquet shards, in first-seen order."""
    import pyarrow.parquet as pq

    from drpo.preferences.read import pickapic_shards

    captions: dict[str, None] = {}
    for shard in pickapic_shards(Path(path)):
        if PICKAPIC_CAPTION not in pq.read_schema(shard).names:
            raise ValueError(f"{shard}: no {PICKAPIC_CAPTION!r} column; Pick-a-Pic v2 shards hold the prompts there")
        for caption in pq.read_table(shard, columns=[PICKAPIC_CAPTION]).column(0).to_pylist():
            if caption and caption.strip():
                captions.setdefault(caption.strip(), None)
    if not captions:
        raise ValueError(f"{path}: no captions in its shards")
    return list(captions)
