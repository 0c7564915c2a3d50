"""The `Reward` base class: images (N, 3, H, W) in [-1, 1] + prompts -> scores (N,), with checked inputs and scores.

DrPO only ranks candidates, so a reward may be large, black-box or non-differentiable. Every reward is a
`Reward`: it validates its inputs, runs under `torch.no_grad` unless `with_grad=True` is asked of a
differentiable reward, and refuses to return NaN/inf (a NaN must never be silently ranked). Scores are raw;
tables apply `report_scale` (PickScore, CLIP score and HPSv2 x 100, ImageReward x 10) in the evaluation code.
Every model is loaded from local files only; nothing is downloaded.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
from torch import Tensor

from drpo.images import to_uint8


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype, or its name (e.g. "float16", as configs give it), -> the torch dtype."""
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


class Reward(ABC):
    """A reward model. Subclasses set `name`, `differentiable` and implement `_score`.

    `requires_metadata`: the reward needs one metadata dict per image (per prompt in `score_groups`).
    `takes_device`: the constructor takes a `device` argument, so a config build can place the reward on the
    workflow's device (`build_reward_from_config(spec, device=...)`); a reward without one runs where it runs.
    A GenEval judge (geneval, geneval_lite) also has `score_verdicts(images, prompts, metadata) -> (scores (N,),
    [{"correct": bool, "reason": str}] * N)`, from which the evaluation takes GenEval's per-task table.
    """

    name: str = "reward"
    differentiable: bool = False
    report_scale: float = 1.0
    requires_metadata: bool = False
    takes_device: bool = False

    @abstractmethod
    def _score(self, images: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        """images (N, 3, H, W) in [-1, 1], N prompts, optional N metadata dicts -> scores (N,)."""

    def _score_groups(self, images: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        """(B, K, 3, H, W), B prompts, optional B metadata dicts -> (B, K); default: flatten and `_score`."""
        b, k = images.shape[:2]
        flat_prompts = [p for p in prompts for _ in range(k)]
        flat_metadata = [m for m in metadata for _ in range(k)] if metadata is not None else None
        return self._score(images.flatten(0, 1), flat_prompts, flat_metadata).reshape(b, k)

    def score(
        self, images: Tensor, prompts: list[str], metadata: list[dict] | None = None, *, with_grad: bool = False
    ) -> Tensor:
        """Score N images against their N prompts -> (N,) float32 on CPU.

        `with_grad=True` (differentiable rewards only) keeps the graph back to `images`.
        """
        self._check_grad(with_grad)
        self._check_images(images, prompts, metadata)
        with torch.set_grad_enabled(with_grad):
            scores = self._score(images, list(prompts), metadata)
        return self._check_scores(scores, (images.shape[0],))

    def score_groups(
        self, images: Tensor, prompts: list[str], metadata: list[dict] | None = None, *, with_grad: bool = False
    ) -> Tensor:
        """Score K candidates for each of B prompts: images (B, K, 3, H, W) -> (B, K) float32 on CPU.

        `metadata` holds one dict per prompt (e.g. GenEval's task metadata).
        """
        self._check_grad(with_grad)
        if images.ndim != 5 or images.shape[2] != 3:
            raise ValueError(f"reward {self.name!r} expects images (B, K, 3, H, W), got shape {tuple(images.shape)}")
        self._check_lengths(images.shape[0], prompts, metadata, "prompt groups")
        with torch.set_grad_enabled(with_grad):
            scores = self._score_groups(images, list(prompts), metadata)
        return self._check_scores(scores, tuple(images.shape[:2]))

    def _check_grad(self, with_grad: bool) -> None:
        if with_grad and not self.differentiable:
            raise ValueError(f"reward {self.name!r} is not differentiable; with_grad=True is not available for it")

    def _check_images(self, images: Tensor, prompts: list[str], metadata: list[dict] | None) -> None:
        """`score`'s argument checks (also those of the GenEval judges' `score_verdicts`): images (N, 3, H, W), one
        prompt and, when given, one metadata row per image."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"reward {self.name!r} expects images (N, 3, H, W), got shape {tuple(images.shape)}")
        self._check_lengths(images.shape[0], prompts, metadata, "images")

    def _check_lengths(self, n: int, prompts: list[str], metadata: list[dict] | None, what: str) -> None:
        if isinstance(prompts, str) or len(prompts) != n:
            got = "a single string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
            raise ValueError(f"reward {self.name!r}: got {n} {what} but {got}; pass one prompt per {what[:-1]}")
        if metadata is not None and len(metadata) != n:
            raise ValueError(f"reward {self.name!r}: got {n} {what} but {len(metadata)} metadata entries")
        if metadata is None and self.requires_metadata:
            raise ValueError(
                f"reward {self.name!r} needs metadata: pass one GenEval-style row (tag, include, exclude, prompt) "
                f"per {what[:-1]}"
            )

    def _check_scores(self, scores: Tensor, shape: tuple[int, ...]) -> Tensor:
        if tuple(scores.shape) != shape:
            raise RuntimeError(f"reward {self.name!r} returned scores of shape {tuple(scores.shape)}, expected {shape}")
        scores = scores.float().cpu()
        bad = (~torch.isfinite(scores.detach())).nonzero().tolist()
        if bad:
            raise RuntimeError(
                f"reward {self.name!r} returned non-finite scores at indices {bad} "
                f"(values {[scores[tuple(i)].item() for i in bad[:8]]}); refusing to rank them"
            )
        return scores

    def _to_uint8(self, images: Tensor) -> np.ndarray:
        """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8, rounded as the evaluation rounds the PNGs it writes."""
        bad = (~torch.isfinite(images.detach())).flatten(1).any(dim=1).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"reward {self.name!r}: images {bad} contain non-finite pixel values")
        return to_uint8(images).numpy()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"

