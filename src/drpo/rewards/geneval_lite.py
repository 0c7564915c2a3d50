"""GenEval-lite: the miniature world's procedural GenEval detector as a reward (1.0 correct, 0.0 not)."""

from __future__ import annotations

import torch
from torch import Tensor

from drpo.rewards.base import Reward
from drpo.world.detect import judge
from drpo.world.prompts import validate_row
from drpo.world.spec import WorldSpec


class GenEvalLiteReward(Reward):
    """The miniature world's GenEval: 1.0 if the procedural detector judges the image correct, else 0.0.

    Needs one GenEval metadata row per image (tag, include, exclude, prompt); a row's prompt must match the prompt
    scored with it. Images are rounded to uint8 first, as the evaluation's PNGs are.
    """

    name = "geneval_lite"
    requires_metadata = True
    report_scale = 100.0  # tables show the share of correct images in %

    def __init__(self, spec: WorldSpec | dict | None = None) -> None:
        self.spec = spec if isinstance(spec, WorldSpec) else WorldSpec.from_dict(spec or {})

    def _score(self, images: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        for i, (prompt, row) in enumerate(zip(prompts, metadata)):
            validate_row(row, f"reward {self.name!r}: metadata row {i}")
            if row["prompt"] != prompt:
                raise ValueError(f"reward {self.name!r}: metadata row {i} is for {row['prompt']!r}, not {prompt!r}")
        pixels = self._to_uint8(images)
        return torch.tensor([float(judge(image, row, self.spec)[0]) for image, row in zip(pixels, metadata)])

