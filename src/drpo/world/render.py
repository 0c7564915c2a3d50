"""Procedural renderer: images that satisfy a GenEval metadata row, and near-miss negatives."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from drpo.world.detect import relation_direction
from drpo.world.spec import WorldSpec

SUPERSAMPLE = 4
# Relations are drawn with more room than the judge asks for (threshold 0.1, direction 0.5), so that they
# survive bounding-box estimation error and blur.
RENDER_POSITION_THRESHOLD = 0.25
RENDER_DIRECTION = 0.65
CANDIDATES_PER_ROUND = 64
PLACEMENT_ROUNDS = 40
CORRUPTIONS = ("wrong_color", "wrong_shape", "wrong_count", "swapped_relation", "missing_object")
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@dataclass
class _Scene:
    """Objects to draw, and relations (i, relation, j): object i stands in relation to object j."""

    shapes: list[str] = field(default_factory=list)
    colors: list[str] = field(default_factory=list)
    relations: list[tuple[int, str, int]] = field(default_factory=list)
    entries: list[list[int]] = field(default_factory=list)  # object indices of each include entry


def _scene(row: dict[str, Any], rng: np.random.Generator, spec: WorldSpec) -> _Scene:
    scene = _Scene()
    for entry in row["include"]:
        if entry["class"] not in spec.shapes:
            raise ValueError(f"class {entry['class']!r} of prompt {row['prompt']!r} is not a shape of this world")
        color = entry.get("color")
        if color is not None and color not in spec.color_names:
            raise ValueError(f"color {color!r} of prompt {row['prompt']!r} is not a color of this world")
        first = len(scene.shapes)
        for _ in range(entry["count"]):
            scene.shapes.append(entry["class"])
            scene.colors.append(color if color is not None else _random_color(rng, spec))
        scene.entries.append(list(range(first, len(scene.shapes))))
    for k, entry in enumerate(row["include"]):
        if "position" in entry:
            relation, target = entry["position"]
            scene.relations += [(i, relation, j) for i in scene.entries[k] for j in scene.entries[target]]
    return scene


def _random_color(rng: np.random.Generator, spec: WorldSpec, exclude: str | None = None) -> str:
    names = [c for c in spec.color_names if c != exclude]
    return names[rng.integers(len(names))]


def _place(scene: _Scene, rng: np.random.Generator, spec: WorldSpec) -> tuple[np.ndarray, np.ndarray]:
    """Random sizes and centres (pixels) with gaps between bounding boxes and the scene's relations held.

    Objects are placed one after the other, each at the first of a batch of random candidates that keeps
    its gaps and relations to the objects already placed; when one cannot be placed, all start again a
    little smaller.
    """
    n = len(scene.shapes)
    size = spec.image_size
    gap = spec.min_gap * size
    lo, hi = spec.object_size[0] * size, spec.object_size[1] * size
    sizes = rng.uniform(lo, hi, n)
    for _ in range(PLACEMENT_ROUNDS):
        margin = gap / 2 + sizes / 2
        centres = np.empty((n, 2))
        for k in range(n):
            candidates = rng.uniform(margin[k], size - margin[k], (CANDIDATES_PER_ROUND, 2))
            ok = np.ones(CANDIDATES_PER_ROUND, bool)
            for j in range(k):
                ok &= (np.abs(candidates - centres[j]) >= (sizes[k] + sizes[j]) / 2 + gap).any(axis=-1)
            for i, relation, j in scene.relations:
                if max(i, j) == k:
                    offset = candidates - centres[j] if i == k else centres[i] - candidates
                    direction = relation_direction(offset, np.full(2, sizes[i] + sizes[j]), RENDER_POSITION_THRESHOLD)
                    ok &= _holds(direction, relation)
            if not ok.any():
                break
            centres[k] = candidates[np.argmax(ok)]
        else:
            return sizes, centres
        sizes = np.maximum(sizes * 0.95, lo)
    raise RuntimeError(f"could not place {n} objects with relations {scene.relations} in {size}x{size} px")


def _holds(direction: np.ndarray, relation: str) -> np.ndarray:
    dx, dy = direction[..., 0], direction[..., 1]
    return {
        "left of": dx < -RENDER_DIRECTION,
        "right of": dx > RENDER_DIRECTION,
        "above": dy < -RENDER_DIRECTION,
        "below": dy > RENDER_DIRECTION,
    }[relation]


def _coverage(shape: str, u: np.ndarray, v: np.ndarray, half: float) -> np.ndarray:
    """Inside-test of sub-pixel sample offsets (u right, v down) from the object's centre."""
    if shape == "circle":
        return u**2 + v**2 <= half**2
    if shape == "square":
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    if shape == "triangle":  # upright: apex at the top edge, base on the bottom edge
        return (v <= half) & (np.abs(u) <= (v + half) / 2)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= half
    raise ValueError(f"unknown shape {shape!r}")


def _draw(scene: _Scene, rng: np.random.Generator, spec: WorldSpec) -> np.ndarray:
    size = spec.image_size
    image = np.empty((size, size, 3), np.float32)
    image[:] = spec.background
    if scene.shapes:
        sizes, centres = _place(scene, rng, spec)
        jitter = rng.integers(-spec.color_jitter, spec.color_jitter + 1, (len(scene.shapes), 3))
        for shape, color, s, (cx, cy), dc in zip(scene.shapes, scene.colors, sizes, centres, jitter):
            x0, x1 = max(int(cx - s / 2), 0), min(int(np.ceil(cx + s / 2)), size)
            y0, y1 = max(int(cy - s / 2), 0), min(int(np.ceil(cy + s / 2)), size)
            u = x0 + (np.arange((x1 - x0) * SUPERSAMPLE) + 0.5) / SUPERSAMPLE - cx
            v = y0 + (np.arange((y1 - y0) * SUPERSAMPLE) + 0.5) / SUPERSAMPLE - cy
            inside = _coverage(shape, u[None, :], v[:, None], s / 2)
            cover = inside.reshape(y1 - y0, SUPERSAMPLE, x1 - x0, SUPERSAMPLE).mean(axis=(1, 3))
            rgb = np.clip(np.asarray(spec.rgb(color)) + dc, 0, 255)
            patch = image[y0:y1, x0:x1]
            patch += cover[..., None] * (rgb - patch)
    return np.rint(image).astype(np.uint8)


def render(row: dict[str, Any], rng: np.random.Generator, spec: WorldSpec) -> np.ndarray:
    """An image (H, W, 3) uint8 that satisfies `row`.

    Objects get random sizes and positions (bounding boxes never closer than spec.min_gap), relations hold
    with a margin, colours not fixed by the row are random, and every colour gets a small jitter.
    Shapes are drawn anti-aliased (SUPERSAMPLE x SUPERSAMPLE samples a pixel).
    """
    return _draw(_scene(row, rng, spec), rng, spec)


def corruption_kinds(row: dict[str, Any]) -> list[str]:
    """The corruptions of CORRUPTIONS that make an image of `row` wrong."""
    kinds = []
    if any("color" in entry for entry in row["include"]):
        kinds.append("wrong_color")
    kinds.append("wrong_shape")
    if row["tag"] == "counting":
        kinds.append("wrong_count")  # a missing object is a wrong count here
    if any("position" in entry for entry in row["include"]):
        kinds.append("swapped_relation")
    if row["tag"] != "counting":
        kinds.append("missing_object")
    return kinds


def render_negative(
    row: dict[str, Any], rng: np.random.Generator, spec: WorldSpec, kind: str | None = None
) -> tuple[np.ndarray, str]:
    """A near miss of `row`: an image with exactly one attribute wrong, and the corruption's name.

    kind (default: random among corruption_kinds(row)):
    wrong_color: one object of a coloured entry gets another colour;
    wrong_shape: one object becomes another shape;
    wrong_count: a counting prompt's n objects become n - 1 or n + 1 (at most max_count + 1);
    swapped_relation: the opposite relation is drawn;
    missing_object: one object is left out.
    """
    kinds = corruption_kinds(row)
    if kind is None:
        kind = kinds[rng.integers(len(kinds))]
    elif kind not in kinds:
        raise ValueError(f"corruption {kind!r} does not apply to a {row['tag']} prompt; possible: {kinds}")
    scene = _scene(row, rng, spec)
    if kind == "wrong_color":
        coloured = [k for k, entry in enumerate(row["include"]) if "color" in entry]
        objects = scene.entries[coloured[rng.integers(len(coloured))]]
        i = objects[rng.integers(len(objects))]
        scene.colors[i] = _random_color(rng, spec, exclude=scene.colors[i])
    elif kind == "wrong_shape":
        i = rng.integers(len(scene.shapes))
        others = [s for s in spec.shapes if s != scene.shapes[i]]
        scene.shapes[i] = others[rng.integers(len(others))]
    elif kind == "wrong_count":
        n = len(scene.shapes)
        options = [n - 1] + ([n + 1] if n + 1 <= spec.max_count + 1 else [])
        new = options[rng.integers(len(options))]
        scene.shapes = [scene.shapes[0]] * new
        scene.colors = (scene.colors + [_random_color(rng, spec)])[:new]
    elif kind == "swapped_relation":
        scene.relations = [(i, _OPPOSITE[rel], j) for i, rel, j in scene.relations]
    else:  # missing_object
        drop = rng.integers(len(scene.shapes))
        del scene.shapes[drop], scene.colors[drop]
        scene.relations = [
            (i - (i > drop), rel, j - (j > drop)) for i, rel, j in scene.relations if drop not in (i, j)
        ]
    return _draw(scene, rng, spec), kind
