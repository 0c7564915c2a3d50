"""Procedural object detector and GenEval-style judge for the miniature world.

The detector plays the role of GenEval's Mask2Former + CLIP colour classifier:
1. Every pixel is explained as `background + alpha * (colour - background)` with the palette colour whose
   direction from the background (in RGB) is closest; pixels further than MAX_COLOR_ANGLE_DEG from every
   palette direction (grey, white, muddy blobs) get alpha 0. Anti-aliasing and blur mix a colour with the
   background, which changes alpha but not the direction, so edges keep their colour.
2. Objects are 4-connected components of alpha >= 0.5 (any colour) of at least MIN_AREA_FRACTION of the
   smallest object's bounding square; an object's colour is the alpha-weighted majority of its pixels.
3. The shape is classified from cumulants of order 3 and 4 of the object's soft silhouette: alpha minus
   ALPHA_FLOOR, divided by the object's interior level, over the component and a RING_PX ring of pixels
   of its colour that no other object could claim. A Gaussian blur adds only to cumulants of order 2, so
   these barely change under blur; divided by powers of the area they do not depend on the object's size.
   Per shape they are known in closed form (SHAPE_PROTOTYPES). The confidence is the posterior of a
   Gaussian model around each prototype, times a penalty for silhouettes far from every prototype
   (merged, elongated or malformed blobs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from drpo.world.spec import WorldSpec

# GenEval's settings (djghosh13/geneval evaluation/evaluate_images.py): detection score thresholds,
# objects kept per class, and the position margin as a fraction of the two boxes' summed extents.
CONFIDENCE_THRESHOLD = 0.3
COUNTING_CONFIDENCE_THRESHOLD = 0.9
MAX_OBJECTS = 16
POSITION_THRESHOLD = 0.1

MAX_COLOR_ANGLE_DEG = 35.0
MIN_AREA_FRACTION = 0.25
RING_PX = 3
# Alpha below this is treated as background in the ring around an object (noise would otherwise add mass
# far from the centre, where the 4th-order cumulants weigh it most).
ALPHA_FLOOR = 0.1
# 1000 x (k40 / A^2, k04 / A^2, k03 / A^1.5, k22 / A^2) of each shape, with k_pq the joint cumulants of
# (x, y) over the silhouette (y down) and A its area: exact values for the continuous shapes.
SHAPE_PROTOTYPES = {
    "square": (-1000 / 120, -1000 / 120, 0.0, 0.0),
    "circle": (-1000 / (16 * np.pi**2), -1000 / (16 * np.pi**2), 0.0, -1000 / (48 * np.pi**2)),
    "triangle": (-1000 / 240, -1000 / 135, -1000 * 2**1.5 / 135, -1000 / 540),  # apex up
    "diamond": (-1000 / 240, -1000 / 240, 0.0, -1000 / 240),
}
# Spread of the Gaussian shape model: renders blurred with sigma 1 px or with pixel noise (std 4) stay
# within OUTLIER_DISTANCE of their prototype; the closest prototypes (circle to square or diamond) are
# about 6 spreads apart.
SHAPE_SPREAD = (0.7, 0.7, 2.5, 0.45)
# Silhouettes further than this (in spreads) from their prototype lose confidence.
OUTLIER_DISTANCE = 3.0


@dataclass(frozen=True)
class Detection:
    """One detected object. Coordinates are pixels, x to the right, y down, origin at the image corner."""

    shape: str
    color: str
    confidence: float
    bbox: tuple[float, float, float, float]  # x0, y0, x1, y1
    centroid: tuple[float, float]  # x, y of the alpha-weighted centre of mass
    area: float  # alpha-weighted, in pixels


def _alpha(image: np.ndarray, spec: WorldSpec) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: palette index of the closest colour direction, and the mixing weight alpha (>= 0)."""
    offsets = image.astype(np.float32) - np.asarray(spec.background, np.float32)
    palette = np.asarray([rgb for _, rgb in spec.colors], np.float32) - np.asarray(spec.background, np.float32)
    dots = offsets @ palette.T  # (H, W, K)
    norms = np.linalg.norm(offsets, axis=-1, keepdims=True) * np.linalg.norm(palette, axis=-1)
    cos = dots / np.maximum(norms, 1e-6)
    label = cos.argmax(axis=-1)
    best_cos = np.take_along_axis(cos, label[..., None], axis=-1)[..., 0]
    alpha = np.take_along_axis(dots, label[..., None], axis=-1)[..., 0] / (palette**2).sum(-1)[label]
    alpha = np.where(best_cos >= np.cos(np.radians(MAX_COLOR_ANGLE_DEG)), np.maximum(alpha, 0.0), 0.0)
    return label, alpha


def _components(mask: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """4-connected components of a boolean mask, as (rows, cols) index arrays (min-label propagation)."""
    height, width = mask.shape
    none = height * width
    labels = np.where(mask, np.arange(none).reshape(height, width), none)
    while True:
        new = labels.copy()
        new[1:] = np.minimum(new[1:], labels[:-1])
        new[:-1] = np.minimum(new[:-1], labels[1:])
        new[:, 1:] = np.minimum(new[:, 1:], labels[:, :-1])
        new[:, :-1] = np.minimum(new[:, :-1], labels[:, 1:])
        new = np.where(mask, new, none)
        if np.array_equal(new, labels):
            break
        labels = new
    return [np.nonzero(labels == value) for value in np.unique(labels[mask])]


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Dilation by a (2 radius + 1)-pixel square."""
    out = mask.copy()
    for _ in range(radius):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        out = grown.copy()
        out[:, 1:] |= grown[:, :-1]
        out[:, :-1] |= grown[:, 1:]
    return out


def shape_features(alpha: np.ndarray) -> np.ndarray:
    """1000 x (k40 / A^2, k04 / A^2, k03 / A^1.5, k22 / A^2) of a soft silhouette (alpha patch, 1 inside).

    k_pq are the joint cumulants of the pixel coordinates (x right, y down) weighted by alpha; A = sum(alpha).
    """
    area = alpha.sum()
    ys, xs = np.indices(alpha.shape, dtype=np.float64)
    w = alpha / area
    x = xs - (w * xs).sum()
    y = ys - (w * ys).sum()

    def moment(p: int, q: int) -> float:
        return float((w * x**p * y**q).sum())

    k40 = moment(4, 0) - 3 * moment(2, 0) ** 2
    k04 = moment(0, 4) - 3 * moment(0, 2) ** 2
    k03 = moment(0, 3)
    k22 = moment(2, 2) - moment(2, 0) * moment(0, 2) - 2 * moment(1, 1) ** 2
    return 1000 * np.array([k40 / area**2, k04 / area**2, k03 / area**1.5, k22 / area**2])


def classify_shape(features: np.ndarray, shapes: tuple[str, ...]) -> tuple[str, float]:
    """The most likely shape among `shapes` for shape_features() values, and its confidence in [0, 1]."""
    prototypes = np.array([SHAPE_PROTOTYPES[s] for s in shapes])
    d2 = (((features - prototypes) / np.array(SHAPE_SPREAD)) ** 2).sum(axis=1)
    posterior = np.exp(-0.5 * (d2 - d2.min()))
    posterior /= posterior.sum()
    best = int(d2.argmin())
    outlier = max(np.sqrt(d2[best]) - OUTLIER_DISTANCE, 0.0)
    return shapes[best], float(posterior[best] * np.exp(-0.5 * outlier**2))


def detect(image: np.ndarray, spec: WorldSpec) -> list[Detection]:
    """Objects in an (H, W, 3) uint8 image, most confident first."""
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    label, alpha = _alpha(image, spec)
    core = alpha >= 0.5
    scale = image.shape[0] / spec.image_size
    min_area = MIN_AREA_FRACTION * (spec.object_size[0] * spec.image_size * scale) ** 2
    components = _components(core)
    # Each object is measured over its component and a ring around it; ring pixels that two objects could
    # claim, and other objects' pixels, are left out.
    masks = np.zeros((len(components), *core.shape), bool)
    for k, (ys, xs) in enumerate(components):
        masks[k, ys, xs] = True
    regions = np.stack([_dilate(m, RING_PX) for m in masks]) if components else masks
    claimed = regions.sum(axis=0)
    detections = []
    for k, (ys, xs) in enumerate(components):
        votes = np.bincount(label[ys, xs], weights=alpha[ys, xs], minlength=len(spec.colors))
        color = int(votes.argmax())
        region = regions[k] & (((claimed == 1) & (label == color)) | masks[k])
        level = float(np.percentile(alpha[ys, xs], 90))
        rows, cols = np.nonzero(region)
        y0, y1, x0, x1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
        soft = np.where(region[y0:y1, x0:x1], np.maximum(alpha[y0:y1, x0:x1] - ALPHA_FLOOR, 0.0), 0.0)
        soft /= level - ALPHA_FLOOR
        area = float(soft.sum())
        if area < min_area:
            continue
        shape, confidence = classify_shape(shape_features(soft), spec.shapes)
        # Extents: sums of the column and row maxima (sub-pixel; exact for anti-aliased boxes).
        cols_max, rows_max = soft.max(axis=0), soft.max(axis=1)
        width, height = float(cols_max.sum()), float(rows_max.sum())
        x_mid = x0 + float(cols_max @ (np.arange(x1 - x0) + 0.5)) / width
        y_mid = y0 + float(rows_max @ (np.arange(y1 - y0) + 0.5)) / height
        detections.append(
            Detection(
                shape=shape,
                color=spec.color_names[color],
                confidence=confidence,
                bbox=(x_mid - width / 2, y_mid - height / 2, x_mid + width / 2, y_mid + height / 2),
                centroid=(
                    x0 + float(soft.sum(axis=0) @ (np.arange(x1 - x0) + 0.5)) / area,
                    y0 + float(soft.sum(axis=1) @ (np.arange(y1 - y0) + 0.5)) / area,
                ),
                area=area,
            )
        )
    return sorted(detections, key=lambda d: -d.confidence)


def relation_direction(offset: np.ndarray, extent: np.ndarray, threshold: float = POSITION_THRESHOLD) -> np.ndarray:
    """GenEval's relative-position vector: the centre offset (..., 2) of a from b with `threshold` times
    the boxes' summed extents (2,) taken off each axis (not below 0), divided by the offset's length."""
    revised = np.maximum(np.abs(offset) - threshold * extent, 0.0) * np.sign(offset)
    return revised / np.maximum(np.linalg.norm(offset, axis=-1, keepdims=True), 1e-9)


def relative_position(box_a: tuple[float, ...], box_b: tuple[float, ...]) -> set[str]:
    """Relations of box a to box b (x0, y0, x1, y1), as GenEval decides them from box centres and sizes."""
    a, b = np.asarray(box_a[:4], float).reshape(2, 2), np.asarray(box_b[:4], float).reshape(2, 2)
    extent = (a[1] - a[0]) + (b[1] - b[0])
    dx, dy = relation_direction(a.mean(0) - b.mean(0), extent)
    if abs(dx) < 1e-3 and abs(dy) < 1e-3:
        return set()
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def objects_by_class(detections: list[Detection], tag: str) -> dict[str, list[Detection]]:
    """Detections GenEval would keep for a prompt of `tag`: above the tag's confidence threshold (0.9 for
    counting, else 0.3), at most MAX_OBJECTS per class, grouped by class, most confident first."""
    threshold = COUNTING_CONFIDENCE_THRESHOLD if tag == "counting" else CONFIDENCE_THRESHOLD
    objects: dict[str, list[Detection]] = {}
    for det in sorted(detections, key=lambda d: -d.confidence):
        if det.confidence > threshold and len(objects.setdefault(det.shape, [])) < MAX_OBJECTS:
            objects[det.shape].append(det)
    return {cls: dets for cls, dets in objects.items() if dets}


def judge_detections(detections: list[Detection], row: dict[str, Any], spec: WorldSpec) -> tuple[bool, str]:
    """GenEval's verdict on a row given the image's detections: (correct, reasons joined by newlines).

    Only the detections kept by objects_by_class count. Each include entry needs `count` of its class;
    when it names a colour, that many of those (the most confident `count`) must have it; when it has a
    position, each of them must stand in the relation to every object matched by the referenced entry.
    Exclude entries need fewer than `count` of their class.
    """
    for entry in row["include"] + row.get("exclude", []):
        if entry["class"] not in spec.shapes:
            raise ValueError(f"class {entry['class']!r} of prompt {row['prompt']!r} is not a shape of this world")
    objects = objects_by_class(detections, row["tag"])
    correct = True
    reasons: list[str] = []
    matched: list[list[Detection] | None] = []
    for entry in row["include"]:
        cls, count = entry["class"], entry["count"]
        found = objects.get(cls, [])[:count]
        ok = len(found) >= count
        if not ok:
            reasons.append(f"expected {cls}>={count}, found {len(found)}")
        elif "color" in entry:
            colors = [det.color for det in found]
            hits = colors.count(entry["color"])
            if hits < count:
                ok = False
                seen = ", ".join(f"{colors.count(c)} {c}" for c in spec.color_names if c in colors)
                reasons.append(f"expected {entry['color']} {cls}>={count}, found {hits} {entry['color']}; and {seen}")
        if ok and "position" in entry:
            relation, target = entry["position"]
            if matched[target] is None:
                ok = False
                reasons.append(f"no target for {cls} to be {relation}")
            else:
                for det in found:
                    for other in matched[target]:
                        actual = relative_position(det.bbox, other.bbox)
                        if relation not in actual:
                            ok = False
                            seen = " and ".join(sorted(actual)) or "no relation to"
                            reasons.append(f"expected {cls} {relation} target, found {seen} target")
                            break
                    if not ok:
                        break
        matched.append(found if ok else None)
        correct &= ok
    for entry in row.get("exclude", []):
        cls, count = entry["class"], entry["count"]
        n = len(objects.get(cls, []))
        if n >= count:
            correct = False
            reasons.append(f"expected {cls}<{count}, found {n}")
    return correct, "\n".join(reasons)


def judge(image: np.ndarray, row: dict[str, Any], spec: WorldSpec) -> tuple[bool, str]:
    """Is `image` a correct rendition of the GenEval metadata `row`? (correct, reason); see judge_detections."""
    return judge_detections(detect(image, spec), row, spec)


@dataclass(frozen=True)
class Verdict:
    """GenEval's verdict on an image (`correct`, `reason`) and the objects it holds against those its row asks
    for (the sum of the include counts). GenEval passes an included object present *at least* so many times;
    `strict` also fails an image with more objects than asked, so that extra shapes drawn to please the judge
    show."""

    correct: bool
    reason: str
    objects: int
    asked: int

    @property
    def strict(self) -> bool:
        return self.correct and self.objects <= self.asked


def judge_image(image: np.ndarray, row: dict[str, Any], spec: WorldSpec) -> Verdict:
    """The full verdict on `image` for the GenEval metadata `row` (one detection pass)."""
    detections = detect(image, spec)
    correct, reason = judge_detections(detections, row, spec)
    return Verdict(correct, reason, len(detections), sum(entry["count"] for entry in row["include"]))


def judge_by_tag(images, rows: list[dict[str, Any]], spec: WorldSpec) -> dict[str, dict[str, float]]:
    """Per GenEval tag of the rows: "correct", the share of images the judge passes; "strict", the share it passes
    with no more objects than asked; "objects", the mean number of objects detected; "extra", the share of images
    with more objects than the row asks (Verdict). `images`: (H, W, 3) uint8 images, one per row.
    """
    per_tag: dict[str, list[tuple[bool, bool, int, bool]]] = {}
    for image, row in zip(images, rows, strict=True):
        v = judge_image(image, row, spec)
        per_tag.setdefault(row["tag"], []).append((v.correct, v.strict, v.objects, v.objects > v.asked))
    return {tag: dict(zip(("correct", "strict", "objects", "extra"), np.mean(values, axis=0).tolist()))
            for tag, values in per_tag.items()}
