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
    scored with it. Images are rounded to uint8 first, as the evaluation's PNGs are. A GenEval judge for the
    evaluation (drpo.evaluate), as the official worker: `score_verdicts` also returns the verdict per image.
    """

    name = "geneval_lite"
    requires_metadata = True
    report_scale = 100.0  # tables show the share of correct images in %

    def __init__(self, spec: WorldSpec | dict | None = None) -> None:
        self.spec = spec if isinstance(spec, WorldSpec) else WorldSpec.from_dict(spec or {})

    def _score(self, images: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        return self._judge(images, prompts, metadata)[0]

    def _judge(self, images: Tensor, prompts: list[str], metadata: list[dict]) -> tuple[Tensor, list[dict]]:
        for i, (prompt, row) in enumerate(zip(prompts, metadata)):
            validate_row(row, f"reward {self.name!r}: metadata row {i}")
            if row["prompt"] != prompt:
                raise ValueError(f"reward {self.name!r}: metadata row {i} is for {row['prompt']!r}, not {prompt!r}")
        verdicts = [judge(image, row, self.spec) for image, row in zip(self._to_uint8(images), metadata)]
        return (torch.tensor([float(correct) for correct, _ in verdicts]),
                [{"correct": bool(correct), "reason": reason} for correct, reason in verdicts])

    def score_verdicts(self, images: Tensor, prompts: list[str],
                       metadata: list[dict] | None = None) -> tuple[Tensor, list[dict]]:
        """(scores (N,), N verdicts {"correct": bool, "reason": str}), as the official GenEval worker's."""
        self._check_images(images, prompts, metadata)
        scores, verdicts = self._judge(images, list(prompts), metadata)
        return self._check_scores(scores, (images.shape[0],)), verdicts

