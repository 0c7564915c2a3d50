"""Rendered training data for the miniature world's models, and the provenance record every trainer writes."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from drpo.images import from_uint8
from drpo.provenance import environment
from drpo.world.prompts import all_prompts
from drpo.world.render import render, render_negative
from drpo.world.spec import WorldSpec


def to_tensor(images: np.ndarray | Sequence[np.ndarray]) -> Tensor:
    """uint8 images (N, H, W, 3) -> float32 (N, 3, H, W) in [-1, 1]."""
    return from_uint8(np.stack(images) if not isinstance(images, np.ndarray) else images)


def render_batch(rows: Sequence[dict[str, Any]], rng: np.random.Generator, spec: WorldSpec) -> Tensor:
    """One fresh render per row: (len(rows), 3, H, W) in [-1, 1]."""
    return to_tensor([render(row, rng, spec) for row in rows])


def pair_batch(
    rows: Sequence[dict[str, Any]], rng: np.random.Generator, spec: WorldSpec
) -> tuple[Tensor, Tensor, list[str]]:
    """A correct render and a near miss (one attribute wrong) per row: two (N, 3, H, W) batches and the corruptions."""
    negatives = [render_negative(row, rng, spec) for row in rows]
    return render_batch(rows, rng, spec), to_tensor([image for image, _ in negatives]), [kind for _, kind in negatives]


def render_pool(rows: Sequence[dict[str, Any]], per_row: int, spec: WorldSpec, seed: int) -> Tensor:
    """`per_row` renders of every row as uint8 (len(rows), per_row, 3, H, W) (compact; see `to_float`)."""
    rng = np.random.default_rng(seed)
    images = np.stack([render(row, rng, spec) for row in rows for _ in range(per_row)])
    size = spec.image_size
    return torch.from_numpy(images).reshape(len(rows), per_row, size, size, 3).permute(0, 1, 4, 2, 3).contiguous()


def to_float(pool: Tensor) -> Tensor:
    """uint8 images (..., 3, H, W) -> float32 in [-1, 1]."""
    return pool.float() / 127.5 - 1.0


def sample_rows(rows: Sequence[dict[str, Any]], n: int, rng: np.random.Generator) -> list[int]:
    """Indices of n rows, distinct when n <= len(rows) (so no prompt is its own in-batch negative)."""
    return rng.choice(len(rows), size=n, replace=n > len(rows)).tolist()


def vocabulary(spec: WorldSpec) -> list[str]:
    """Every word of the world's prompt grammar, in first-seen order (one token each in the tiny tokenizers)."""
    words: dict[str, None] = {}
    for row in all_prompts(spec):
        words.update(dict.fromkeys(re.findall(r"[a-z]+", row["prompt"].lower())))
    return list(words)


def max_prompt_tokens(spec: WorldSpec) -> int:
    """Longest prompt of the grammar in tokens (one per word), plus the start and end tokens."""
    return max(len(re.findall(r"[a-z]+", row["prompt"].lower())) for row in all_prompts(spec)) + 2


def write_provenance(
    out_dir: str | Path,
    *,
    function: str,
    arguments: dict[str, Any],
    seed: int,
    steps: int,
    started: float,
    metrics: dict[str, Any],
) -> dict[str, Any]:
    """Write `provenance.json` (function, arguments, seed, steps, wall time, environment, final metrics)."""
    record = {
        "function": function,
        "arguments": arguments,
        "seed": seed,
        "steps": steps,
        "wall_time_s": round(time.time() - started, 2),
        "metrics": metrics,
        "environment": environment(),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "provenance.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record
