"""Prompt grammar of the miniature world, in GenEval's metadata format.

A row is a dict exactly as in GenEval's `evaluation_metadata.jsonl`:
    {"tag": ..., "include": [{"class", "count", optional "color", optional "position"}],
     optional "exclude": [{"class", "count"}], "prompt": ...}
Only counting rows carry "exclude" (as in GenEval): "exactly n" is "at least n included, fewer than n + 1".
"position": [relation, j] says this entry's objects stand in `relation` to the objects of include entry j;
the prompt names the positioned object first: include [square, circle with ["right of", 0]] is
"a photo of a circle right of a square" (the circle's centre is to the right of the square's).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from itertools import permutations
from pathlib import Path
from typing import Any

import numpy as np

from drpo.world.spec import NUMBER_WORDS, SUPPORTED_RELATIONS, WorldSpec

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _plural(word: str) -> str:
    return word + "es" if word.endswith(("s", "x", "ch", "sh")) else word + "s"


def _row(tag: str, include: list[dict[str, Any]], prompt: str, exclude: list | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"tag": tag, "include": include}
    if exclude is not None:
        row["exclude"] = exclude
    row["prompt"] = prompt
    return row


def all_prompts(spec: WorldSpec) -> list[dict[str, Any]]:
    """Every prompt of the grammar (each prompt text once), grouped by tag in TAGS order.

    Per tag, with S shapes, C colours, R relations and counts 2..max_count:
    single_object S; two_object S(S-1) (ordered pairs of distinct shapes: both word orders);
    counting S(max_count-1); colors S*C; position S(S-1)R; color_attr S(S-1)C(C-1) (distinct shapes,
    distinct colours). Defaults (4, 6, 4, 2..3): 4 + 12 + 8 + 24 + 48 + 360 = 456 prompts.
    """
    shapes, colors = spec.shapes, spec.color_names
    rows = [_row("single_object", [{"class": s, "count": 1}], f"a photo of {_a(s)}") for s in shapes]
    rows += [
        _row("two_object", [{"class": s, "count": 1}, {"class": t, "count": 1}], f"a photo of {_a(s)} and {_a(t)}")
        for s, t in permutations(shapes, 2)
    ]
    rows += [
        _row(
            "counting",
            [{"class": s, "count": n}],
            f"a photo of {NUMBER_WORDS[n]} {_plural(s)}",
            exclude=[{"class": s, "count": n + 1}],
        )
        for s in shapes
        for n in range(2, spec.max_count + 1)
    ]
    rows += [
        _row("colors", [{"class": s, "count": 1, "color": c}], f"a photo of {_a(c)} {s}")
        for s in shapes
        for c in colors
    ]
    rows += [
        _row(
            "position",
            [{"class": ref, "count": 1}, {"class": obj, "count": 1, "position": [rel, 0]}],
            f"a photo of {_a(obj)} {rel} {_a(ref)}",
        )
        for obj, ref in permutations(shapes, 2)
        for rel in spec.relations
    ]
    rows += [
        _row(
            "color_attr",
            [{"class": s, "count": 1, "color": c}, {"class": t, "count": 1, "color": d}],
            f"a photo of {_a(c)} {s} and {_a(d)} {t}",
        )
        for s, t in permutations(shapes, 2)
        for c, d in permutations(colors, 2)
    ]
    return rows


def _round_robin(n: int, caps: list[int]) -> list[int]:
    """Spread n as evenly as possible over bins with the given capacities (water filling)."""
    alloc = [0] * len(caps)
    while n > 0:
        for i, cap in enumerate(caps):
            if n > 0 and alloc[i] < cap:
                alloc[i] += 1
                n -= 1
    return alloc


def make_splits(
    spec: WorldSpec, *, n_train: int, n_test: int, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Disjoint train/test prompt sets (by prompt text), deterministic in `seed`.

    Allocation per tag: GenEval weighs its six tasks equally, so both splits are spread as evenly as
    possible across tags (water filling: small tags are used up, large tags take the rest).
    - test first, each tag capped at half its prompts (at least 1) so that train keeps every tag; when
      those caps cannot hold n_test the caps become the tags' full sizes. Every tag gets >= 1 test prompt.
    - train from what each tag has left.
    With the default world (456 prompts) and 240/120: test 2/6/4/12/24/72 and train 2/6/4/12/24/192
    (single_object/two_object/counting/colors/position/color_attr).
    Which prompts of a tag go where is a seeded random permutation; both lists keep grammar order.
    """
    rows = all_prompts(spec)
    if n_train < 0 or n_test < len(TAGS):
        raise ValueError(f"need n_train >= 0 and n_test >= {len(TAGS)} (one per tag), got {n_train}, {n_test}")
    if n_train + n_test > len(rows):
        raise ValueError(
            f"the grammar has only {len(rows)} prompts, fewer than n_train + n_test = {n_train + n_test}; "
            "enlarge the world (shapes, colors, max_count) or ask for fewer prompts"
        )
    by_tag = [[i for i, row in enumerate(rows) if row["tag"] == tag] for tag in TAGS]
    sizes = [len(idx) for idx in by_tag]
    half_caps = [max(1, s // 2) for s in sizes]
    caps = half_caps if sum(half_caps) >= n_test else sizes
    n_test_per_tag = _round_robin(n_test, caps)
    n_train_per_tag = _round_robin(n_train, [s - t for s, t in zip(sizes, n_test_per_tag)])
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for idx, k_test, k_train in zip(by_tag, n_test_per_tag, n_train_per_tag):
        perm = [idx[j] for j in rng.permutation(len(idx))]
        test_idx += perm[:k_test]
        train_idx += perm[k_test : k_test + k_train]
    return [rows[i] for i in sorted(train_idx)], [rows[i] for i in sorted(test_idx)]


def validate_row(row: Any, where: str = "row") -> None:
    """Raise ValueError (prefixed by `where`) unless `row` is well-formed GenEval metadata."""

    def fail(problem: str) -> None:
        raise ValueError(f"{where}: {problem}")

    if not isinstance(row, dict):
        fail(f"expected a JSON object, got {type(row).__name__}")
    missing = [key for key in ("tag", "include", "prompt") if key not in row]
    if missing:
        fail(f"missing keys {missing}")
    if row["tag"] not in TAGS:
        fail(f"unknown tag {row['tag']!r}; known tags are {list(TAGS)}")
    if not isinstance(row["prompt"], str) or not row["prompt"].strip():
        fail(f"prompt must be a non-empty string, got {row['prompt']!r}")
    include = row["include"]
    if not isinstance(include, list) or not include:
        fail(f"include must be a non-empty list, got {include!r}")
    for i, entry in enumerate(include):
        _check_entry(entry, f"include[{i}]", fail)
        if "color" in entry and not isinstance(entry["color"], str):
            fail(f"include[{i}] color must be a string, got {entry['color']!r}")
        if "position" in entry:
            pos = entry["position"]
            if (
                not isinstance(pos, list)
                or len(pos) != 2
                or pos[0] not in SUPPORTED_RELATIONS
                or not isinstance(pos[1], int)
                or not 0 <= pos[1] < i
            ):
                fail(f"include[{i}] position must be [relation, index of an earlier include entry], got {pos!r}")
    exclude = row.get("exclude", [])
    if not isinstance(exclude, list):
        fail(f"exclude must be a list, got {exclude!r}")
    for i, entry in enumerate(exclude):
        _check_entry(entry, f"exclude[{i}]", fail)


def _check_entry(entry: Any, name: str, fail) -> None:
    if not isinstance(entry, dict) or not isinstance(entry.get("class"), str):
        fail(f"{name} must be an object with a string 'class', got {entry!r}")
    count = entry.get("count")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        fail(f"{name} count must be a positive integer, got {count!r}")


def write_metadata_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> None:
    """Write rows as GenEval metadata JSONL (one JSON object a line)."""
    rows = list(rows)
    for i, row in enumerate(rows):
        validate_row(row, f"row {i}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(json.dumps(row) + "\n" for row in rows))


def _read_jsonl(path: Path) -> list[tuple[int, Any]]:
    items = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append((lineno, json.loads(line)))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {lineno}: invalid JSON ({err.msg})") from None
    if not items:
        raise ValueError(f"{path} is empty: expected one JSON object a line")
    return items


def read_metadata_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate GenEval metadata JSONL; errors name the file and line."""
    path = Path(path)
    rows = []
    for lineno, row in _read_jsonl(path):
        validate_row(row, f"{path} line {lineno}")
        rows.append(row)
    return rows


def read_prompts(path: str | Path) -> list[str]:
    """Prompt texts from a .txt file (one per non-empty line) or a .jsonl file (its "prompt" fields)."""
    path = Path(path)
    if path.suffix == ".txt":
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"{path} has no prompts")
        return prompts
    if path.suffix == ".jsonl":
        prompts = []
        for lineno, row in _read_jsonl(path):
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
                raise ValueError(f"{path} line {lineno}: expected an object with a non-empty string 'prompt'")
            prompts.append(row["prompt"])
        return prompts
    raise ValueError(f"{path}: unsupported prompt file type {path.suffix!r}; use .txt or .jsonl")
