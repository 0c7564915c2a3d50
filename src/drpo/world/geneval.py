"""GenEval's file formats for the miniature world: sample folders, results JSONL and summary scores.

Sample folder layout (as GenEval's generation scripts write it):
    <out_dir>/<index:05d>/metadata.jsonl      the prompt's metadata row (one line)
    <out_dir>/<index:05d>/samples/<k:04d>.png  the images generated for it
Results rows follow GenEval's evaluate_images.py output: filename, tag, prompt, correct, reason, metadata
(the row as a JSON string) and details (JSON string: class -> [[x0, y0, x1, y1, confidence], ...] of the
detections kept for the verdict); "colors" (JSON string: class -> colour of each of those detections) is
this detector's addition.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from drpo.world.detect import detect, judge_detections, objects_by_class
from drpo.world.prompts import TAGS, read_metadata_jsonl, validate_row
from drpo.world.spec import WorldSpec


def write_sample_folder(
    out_dir: str | Path, rows: list[dict[str, Any]], images_per_row: list[list[np.ndarray]],
    indices: list[int] | None = None,
) -> None:
    """Write GenEval's sample folder layout: one folder per row (named by its index in the metadata file,
    default 0, 1, ...), its images as PNG."""
    if len(rows) != len(images_per_row):
        raise ValueError(f"got {len(rows)} rows but {len(images_per_row)} image lists")
    out_dir = Path(out_dir)
    indices = list(range(len(rows))) if indices is None else list(indices)
    for index, row, images in zip(indices, rows, images_per_row, strict=True):
        validate_row(row, f"row {index}")
        samples = out_dir / f"{index:05d}" / "samples"
        samples.mkdir(parents=True, exist_ok=True)
        (samples.parent / "metadata.jsonl").write_text(json.dumps(row) + "\n")
        for k, image in enumerate(images):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(f"row {index} image {k}: expected (H, W, 3) uint8, got {image.shape} {image.dtype}")
            Image.fromarray(image).save(samples / f"{k:04d}.png")


def iter_sample_folder(out_dir: str | Path) -> Iterator[tuple[dict[str, Any], list[Path]]]:
    """(metadata row, sorted PNG paths) of each prompt folder of a GenEval sample folder, in index order."""
    out_dir = Path(out_dir)
    folders = sorted(p for p in out_dir.iterdir() if p.is_dir() and p.name.isdigit()) if out_dir.is_dir() else []
    if not folders:
        raise ValueError(f"{out_dir} has no GenEval prompt folders (<index:05d>/metadata.jsonl)")
    for folder in folders:
        rows = read_metadata_jsonl(folder / "metadata.jsonl")
        if len(rows) != 1:
            raise ValueError(f"{folder / 'metadata.jsonl'} has {len(rows)} rows, expected 1")
        yield rows[0], sorted((folder / "samples").glob("*.png"))


def evaluate_folder(out_dir: str | Path, spec: WorldSpec) -> list[dict[str, Any]]:
    """Judge every image of a GenEval sample folder; one GenEval results row per image."""
    results = []
    for row, paths in iter_sample_folder(out_dir):
        for path in paths:
            image = np.asarray(Image.open(path).convert("RGB"))
            detections = detect(image, spec)
            correct, reason = judge_detections(detections, row, spec)
            kept = objects_by_class(detections, row["tag"])
            results.append(
                {
                    "filename": str(path),
                    "tag": row["tag"],
                    "prompt": row["prompt"],
                    "correct": correct,
                    "reason": reason,
                    "metadata": json.dumps(row),
                    "details": json.dumps(
                        {cls: [[*det.bbox, det.confidence] for det in dets] for cls, dets in kept.items()}
                    ),
                    "colors": json.dumps({cls: [det.color for det in dets] for cls, dets in kept.items()}),
                }
            )
    return results


def write_results_jsonl(results: list[dict[str, Any]], path: str | Path) -> None:
    """Write results rows as JSONL (GenEval's results.jsonl)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in results))


def read_results_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a results JSONL; every row needs "tag", "metadata" and "correct"."""
    path = Path(path)
    results = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {lineno}: invalid JSON ({err.msg})") from None
        missing = [key for key in ("tag", "metadata", "correct") if not isinstance(row, dict) or key not in row]
        if missing:
            raise ValueError(f"{path} line {lineno}: missing keys {missing}")
        results.append(row)
    if not results:
        raise ValueError(f"{path} is empty: expected one results row a line")
    return results


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """GenEval's summary scores.

    per_tag: accuracy (fraction of correct images), correct and total per tag (TAGS order, then others);
    overall: the mean of the per-tag accuracies (GenEval's "overall score", each task weighs the same);
    images / image_accuracy over all images; prompts (distinct metadata) / prompt_accuracy: the fraction
    of prompts with at least one correct image.
    """
    if not results:
        raise ValueError("no results to summarize")
    per_tag: dict[str, dict[str, float]] = {}
    by_prompt: dict[str, bool] = {}
    for r in results:
        stats = per_tag.setdefault(r["tag"], {"correct": 0, "total": 0})
        stats["correct"] += bool(r["correct"])
        stats["total"] += 1
        by_prompt[r["metadata"]] = by_prompt.get(r["metadata"], False) or bool(r["correct"])
    order = [t for t in TAGS if t in per_tag] + [t for t in per_tag if t not in TAGS]
    per_tag = {t: {**per_tag[t], "accuracy": per_tag[t]["correct"] / per_tag[t]["total"]} for t in order}
    n_correct = sum(s["correct"] for s in per_tag.values())
    return {
        "overall": float(np.mean([s["accuracy"] for s in per_tag.values()])),
        "per_tag": per_tag,
        "images": len(results),
        "image_accuracy": n_correct / len(results),
        "prompts": len(by_prompt),
        "prompt_accuracy": sum(by_prompt.values()) / len(by_prompt),
    }
