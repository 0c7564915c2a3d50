"""A preference dataset of the miniature world, in the authors' JSONL or in Pick-a-Pic v2's Parquet layout, so that
the offline methods and both readers of drpo.preferences run in the default world.

For every training prompt (GenEval metadata row) a chosen image is one the world's detector passes for the prompt
and a rejected image one it fails. Two kinds:

* ``renders``: clean renders and their near misses (render_negative: one wrong colour, shape, count or relation, or
  a missing object, cycling over the corruptions that apply), each judged by the detector;
* ``generated``: the base generator's own samples for the prompt, judged by the detector, as Pick-a-Pic holds
  generated images judged by people; a prompt without both a passing and a failing sample is left out.

JSONL: ``pairs.jsonl`` with one row per prompt (lists of chosen and rejected PNGs under ``images/``). Pick-a-Pic:
shards ``train-<i>-of-<n>.parquet`` with one pair a row (caption, jpg_0, jpg_1 as JPEG bytes, label_0, label_1, the
preferred side at random) and, for a prompt with two chosen images, one tie row (0.5 / 0.5) as Pick-a-Pic has ties.
A JPEG is judged again as stored; an image whose verdict the compression flips is left out.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from drpo.world.detect import judge
from drpo.world.render import corruption_kinds, render, render_negative
from drpo.world.spec import WorldSpec

KINDS = ("renders", "generated")
FORMATS = ("jsonl", "pickapic")
MAX_TRIES = 50  # renders drawn for one image before giving up (renders pass, near misses fail, nearly always)
DATASET_SEED_BASE = 10_000  # generated kind: image seeds far from the evaluation's (42, 43, ...)
ROWS_PER_SHARD = 256
JPEG_OPTIONS = {"format": "JPEG", "quality": 95, "subsampling": 0}  # 4:4:4: the detector reads colours at edges


@dataclass
class WorldPreference:
    """One prompt's metadata row with its chosen and rejected images (uint8 (H, W, 3))."""

    row: dict[str, Any]
    chosen: list[np.ndarray]
    rejected: list[np.ndarray]


def render_preferences(rows: list[dict], spec: WorldSpec, *, chosen: int, rejected: int,
                       seed: int) -> Iterator[WorldPreference]:
    """Renders the detector passes and near misses it fails, for every row."""
    for index, row in enumerate(rows):
        rng = np.random.default_rng((seed, index))
        kinds = corruption_kinds(row)
        yield WorldPreference(
            row,
            [_draw_until(lambda: render(row, rng, spec), True, row, spec) for _ in range(chosen)],
            [_draw_until(lambda j=j: render_negative(row, rng, spec, kinds[j % len(kinds)])[0], False, row, spec)
             for j in range(rejected)])


def _draw_until(draw, verdict: bool, row: dict, spec: WorldSpec) -> np.ndarray:
    for _ in range(MAX_TRIES):
        image = draw()
        if judge(image, row, spec)[0] == verdict:
            return image
    raise RuntimeError(f"no {'passing render' if verdict else 'failing near miss'} of {row['prompt']!r} in "
                       f"{MAX_TRIES} tries")


def generated_preferences(rows: list[dict], spec: WorldSpec, generator, *, chosen: int, rejected: int, candidates: int,
                          seed: int, batch_size: int, stats: dict) -> Iterator[WorldPreference]:
    """The base generator's samples of every row, the first ``chosen`` the detector passes and the first ``rejected``
    it fails; rows without both are counted in ``stats["prompts_left_out"]`` and left out."""
    from drpo.evaluate import sample_images

    seeds = [DATASET_SEED_BASE + seed * candidates + j for j in range(candidates)]
    stats.setdefault("prompts_left_out", 0)
    for index, row in enumerate(rows):
        images = sample_images(generator, [row["prompt"]], seeds, batch_size=batch_size, adapters=False,
                               prompt_indices=[index])
        verdicts = [judge(image, row, spec)[0] for image in images]
        passing = [image for image, ok in zip(images, verdicts) if ok][:chosen]
        failing = [image for image, ok in zip(images, verdicts) if not ok][:rejected]
        if passing and failing:
            yield WorldPreference(row, passing, failing)
        else:
            stats["prompts_left_out"] += 1


def write_jsonl_dataset(preferences: Iterable[WorldPreference], out: str | Path) -> dict[str, int]:
    """The authors' JSONL at ``out`` (its images in ``images/`` beside it); returns counts."""
    out = Path(out)
    images = out.parent / "images"
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir(parents=True)
    tmp = out.with_suffix(".tmp")
    counts = {"rows": 0, "chosen": 0, "rejected": 0}
    with tmp.open("w") as handle:
        for i, pref in enumerate(preferences):
            names = {}
            for role in ("chosen", "rejected"):
                names[role] = [f"images/{i:05d}_{role}_{k}.png" for k in range(len(getattr(pref, role)))]
                for name, image in zip(names[role], getattr(pref, role)):
                    Image.fromarray(image).save(out.parent / name)
                counts[role] += len(names[role])
            handle.write(json.dumps({"prompt": pref.row["prompt"], **names}) + "\n")
            counts["rows"] += 1
    tmp.replace(out)
    return counts


def _jpeg(image: np.ndarray) -> tuple[bytes, np.ndarray]:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, **JPEG_OPTIONS)
    data = buffer.getvalue()
    return data, np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def write_pickapic_dataset(preferences: Iterable[WorldPreference], folder: str | Path, spec: WorldSpec, *,
                           seed: int) -> dict[str, int]:
    """Pick-a-Pic v2's layout in ``folder`` (its shards replaced); returns counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    counts = {"rows": 0, "pairs": 0, "ties": 0, "jpeg_flipped": 0}
    shards: list[Path] = []
    buffer: list[dict] = []

    def flush() -> None:
        if buffer:
            shards.append(folder / f"part-{len(shards):05d}.parquet")
            pq.write_table(pa.Table.from_pylist(buffer), shards[-1])
            buffer.clear()

    for pref in preferences:
        stored = {}
        for role, verdict in (("chosen", True), ("rejected", False)):
            stored[role] = []
            for image in getattr(pref, role):
                data, pixels = _jpeg(image)
                if judge(pixels, pref.row, spec)[0] == verdict:
                    stored[role].append(data)
                else:
                    counts["jpeg_flipped"] += 1
        pairs = [(good, bad, rng.integers(2)) for good, bad in zip(stored["chosen"], stored["rejected"])]
        rows = [{"caption": pref.row["prompt"], "jpg_0": (good, bad)[side], "jpg_1": (bad, good)[side],
                 "label_0": float(side == 0), "label_1": float(side == 1)} for good, bad, side in pairs]
        if len(stored["chosen"]) >= 2:
            rows.append({"caption": pref.row["prompt"], "jpg_0": stored["chosen"][0], "jpg_1": stored["chosen"][1],
                         "label_0": 0.5, "label_1": 0.5})
            counts["ties"] += 1
        counts["pairs"] += len(pairs)
        counts["rows"] += len(rows)
        buffer += rows
        if len(buffer) >= ROWS_PER_SHARD:
            flush()
    flush()
    for i, shard in enumerate(shards):  # Hugging Face's shard names, now that their number is known
        shard.rename(folder / f"train-{i:05d}-of-{len(shards):05d}.parquet")
    return counts
