"""Geometry and vocabulary of the miniature world (DESIGN.md section 3)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

SUPPORTED_SHAPES = ("circle", "square", "triangle", "diamond")
SUPPORTED_RELATIONS = ("left of", "right of", "above", "below")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

# The detector tells colours apart by the direction of (pixel - background) in RGB; below these limits
# anti-aliased edges and a blurry generator's colour drift would make colours ambiguous.
MIN_COLOR_CONTRAST = 64.0
MIN_COLOR_ANGLE_DEG = 40.0
# Largest share of the image that max_count + 1 smallest objects with their gaps may cover.
MAX_PLACEMENT_DENSITY = 0.5

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class WorldSpec:
    """What the miniature world can contain; every length is a fraction of `image_size`.

    Defaults and why:
    - 32 px images: the tiny generator and reward model train on a laptop CPU in minutes.
    - Four shapes (circle, square, upright triangle, diamond), axis-aligned, whose silhouettes differ in
      cumulants of order 3 and 4, which blur leaves unchanged (drpo.world.detect); with four shapes the
      grammar is large enough for the default 240/120 train/test prompts.
    - Six colours far apart in their direction from the mid-grey background (at least MIN_COLOR_ANGLE_DEG;
      the closest pair, blue and purple, is 54 degrees apart), so that anti-aliasing (a mix with the
      background) keeps a pixel's colour class and a moderate colour drift does not change it. The
      background is achromatic, so a grey, black or white blob is never taken for a coloured object.
    - Objects of 0.24-0.34 of the image (7.7-10.9 px at 32 px, large enough for their shape to survive
      blur) with at least 0.06 of the image (about 2 px) between their bounding boxes, which keeps objects
      apart after a blur of sigma about 1 px. max_count + 1 objects (counting negatives draw one too many)
      of the smallest size with their gaps cover 4 x 0.3^2 = 0.36 of the image, below the
      MAX_PLACEMENT_DENSITY up to which random placement reliably finds room.
    - max_count 3: counting prompts ask for 2..max_count objects.
    With these defaults the prompt grammar has 456 prompts (see drpo.world.prompts.all_prompts).
    """

    image_size: int = 32
    shapes: tuple[str, ...] = SUPPORTED_SHAPES
    colors: tuple[tuple[str, RGB], ...] = (
        ("red", (220, 40, 40)),
        ("yellow", (230, 210, 40)),
        ("green", (40, 170, 60)),
        ("blue", (40, 90, 230)),
        ("purple", (150, 60, 210)),
        ("pink", (245, 125, 195)),
    )
    background: RGB = (128, 128, 128)
    max_count: int = 3
    object_size: tuple[float, float] = (0.24, 0.34)
    min_gap: float = 0.06
    relations: tuple[str, ...] = SUPPORTED_RELATIONS
    color_jitter: int = 12

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or self.image_size < 16:
            raise ValueError(f"image_size must be an integer >= 16, got {self.image_size!r}")
        _check_names("shapes", self.shapes, SUPPORTED_SHAPES, minimum=2)
        _check_names("relations", self.relations, SUPPORTED_RELATIONS, minimum=1)
        if not 2 <= self.max_count < len(NUMBER_WORDS) - 1:
            raise ValueError(f"max_count must be in 2..{len(NUMBER_WORDS) - 2}, got {self.max_count!r}")
        lo, hi = self.object_size
        if not 0 < lo <= hi <= 0.45:
            raise ValueError(f"object_size must satisfy 0 < min <= max <= 0.45, got {self.object_size!r}")
        if not 0 <= self.min_gap < 0.5:
            raise ValueError(f"min_gap must be in [0, 0.5), got {self.min_gap!r}")
        # Random sequential placement reliably finds room up to this density (measured up to max_count 9).
        density = (self.max_count + 1) * (lo + self.min_gap) ** 2
        if density > MAX_PLACEMENT_DENSITY:
            raise ValueError(
                f"max_count + 1 = {self.max_count + 1} objects of size {lo} with gap {self.min_gap} cover "
                f"{density:.2f} of the image (> {MAX_PLACEMENT_DENSITY}) and may not fit; "
                "lower max_count, object_size or min_gap"
            )
        if not 0 <= self.color_jitter <= 64:
            raise ValueError(f"color_jitter must be in 0..64, got {self.color_jitter!r}")
        _check_rgb("background", self.background)
        names = [name for name, _ in self.colors]
        if len(names) < 2 or len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"colors need at least 2 distinct non-empty names, got {names!r}")
        offsets = {}
        for name, rgb in self.colors:
            _check_rgb(f"color {name!r}", rgb)
            offset = np.asarray(rgb, float) - np.asarray(self.background, float)
            if np.linalg.norm(offset) < MIN_COLOR_CONTRAST:
                raise ValueError(
                    f"color {name!r} {rgb} is too close to the background {self.background} "
                    f"(distance {np.linalg.norm(offset):.0f} < {MIN_COLOR_CONTRAST:.0f})"
                )
            for other, other_offset in offsets.items():
                cos = offset @ other_offset / (np.linalg.norm(offset) * np.linalg.norm(other_offset))
                angle = math.degrees(math.acos(float(np.clip(cos, -1, 1))))
                if angle < MIN_COLOR_ANGLE_DEG:
                    raise ValueError(
                        f"colors {other!r} and {name!r} are too similar as seen from the background "
                        f"({angle:.0f} degrees apart < {MIN_COLOR_ANGLE_DEG:.0f})"
                    )
            offsets[name] = offset

    @property
    def color_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.colors)

    def rgb(self, color: str) -> RGB:
        """RGB value of a colour name."""
        for name, rgb in self.colors:
            if name == color:
                return rgb
        raise ValueError(f"unknown color {color!r}; this world has {list(self.color_names)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON/YAML-serialisable form; `WorldSpec.from_dict(spec.to_dict()) == spec`."""
        return {
            "image_size": self.image_size,
            "shapes": list(self.shapes),
            "colors": {name: list(rgb) for name, rgb in self.colors},
            "background": list(self.background),
            "max_count": self.max_count,
            "object_size": list(self.object_size),
            "min_gap": self.min_gap,
            "relations": list(self.relations),
            "color_jitter": self.color_jitter,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorldSpec:
        """Build from a config mapping; missing keys keep their defaults, unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown WorldSpec keys {unknown}; known keys are {sorted(known)}")
        kwargs = dict(data)
        for key in ("shapes", "relations"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        for key in ("background", "object_size"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        if "colors" in kwargs:
            colors = kwargs["colors"]
            if not isinstance(colors, dict):
                raise ValueError(f"colors must be a mapping name -> [r, g, b], got {colors!r}")
            kwargs["colors"] = tuple((name, tuple(rgb)) for name, rgb in colors.items())
        return cls(**kwargs)


def _check_names(field: str, values: tuple[str, ...], supported: tuple[str, ...], minimum: int) -> None:
    unknown = [v for v in values if v not in supported]
    if unknown:
        raise ValueError(f"unsupported {field} {unknown}; supported are {list(supported)}")
    if len(set(values)) != len(values) or len(values) < minimum:
        raise ValueError(f"{field} must be at least {minimum} distinct values, got {list(values)}")


def _check_rgb(what: str, rgb: Any) -> None:
    if len(rgb) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in rgb):
        raise ValueError(f"{what} must be three integers in 0..255, got {rgb!r}")
