"""Rewards: images (N, 3, H, W) in [-1, 1] + prompts -> scores (N,), behind one interface and a registry.

DrPO only ranks candidates, so a reward may be large, black-box or non-differentiable. Every reward is a
`Reward`: it validates its inputs, runs under `torch.no_grad` unless `with_grad=True` is asked of a
differentiable reward, and refuses to return NaN/inf (a NaN must never be silently ranked). Scores are raw;
tables apply `report_scale` (PickScore and CLIP score x 100) in the evaluation code.

Adding a reward is one subclass and one registry line:

    class AestheticReward(Reward):
        name = "aesthetic"
        differentiable = False

        def __init__(self, model_path: str, device: str = "cpu") -> None:
            self.model = load_my_predictor(model_path, device)      # local files only

        def _score(self, images, prompts, metadata):
            return self.model((images + 1) / 2).flatten()            # (N,)

    REWARDS["aesthetic"] = AestheticReward   # or add it to the dict literal below
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AutoModel, AutoProcessor

from drpo.ranking import ensemble_scores


class Reward(ABC):
    """A reward model. Subclasses set `name`, `differentiable` and implement `_score`."""

    name: str = "reward"
    differentiable: bool = False
    report_scale: float = 1.0

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
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"reward {self.name!r} expects images (N, 3, H, W), got shape {tuple(images.shape)}")
        self._check_lengths(images.shape[0], prompts, metadata, "images")
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

    def _check_lengths(self, n: int, prompts: list[str], metadata: list[dict] | None, what: str) -> None:
        if isinstance(prompts, str) or len(prompts) != n:
            got = "a single string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
            raise ValueError(f"reward {self.name!r}: got {n} {what} but {got}; pass one prompt per {what[:-1]}")
        if metadata is not None and len(metadata) != n:
            raise ValueError(f"reward {self.name!r}: got {n} {what} but {len(metadata)} metadata entries")

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

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class PickScoreReward(Reward):
    """PickScore: cosine similarity of L2-normalised CLIP image and text embeddings (no logit scale).

    Model (AutoModel, a CLIPModel) and processor (AutoProcessor: image processor + tokenizer) come from ONE
    local folder, as PickScore_v1 is used. Images are preprocessed in torch, so the score is differentiable:
    [-1, 1] -> [0, 1], bicubic antialiased resize of the short side to the processor's size, center crop to its
    crop size, normalisation with its mean/std. Tables report the score x `report_scale`.

    Args:
        model_path: folder with config.json, weights, preprocessor/processor config and tokenizer files.
        device: where the CLIP model runs; scores are returned on CPU.
        dtype: model dtype (torch dtype or its name, e.g. "float16"); preprocessing and the cosine are fp32.
        batch_size: images per forward pass.
    """

    name = "pickscore"
    differentiable = True
    report_scale = 100.0

    def __init__(
        self,
        model_path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
        batch_size: int = 32,
    ) -> None:
        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"reward {self.name!r}: no CLIP model folder at {path} (expected config.json, weights, processor and "
                "tokenizer files saved with save_pretrained)"
            )
        if batch_size < 1:
            raise ValueError(f"reward {self.name!r}: batch_size must be >= 1, got {batch_size}")
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype)
        self.model.to(self.device).eval().requires_grad_(False)
        self.dtype = dtype
        self.tokenizer = self.processor.tokenizer

        text_config = self.model.config.text_config
        # eos_token_id 2 is the legacy CLIP config value, for which transformers pools at the argmax token id.
        if text_config.eos_token_id not in (2, self.tokenizer.eos_token_id):
            raise ValueError(
                f"reward {self.name!r}: model text_config.eos_token_id={text_config.eos_token_id} differs from the "
                f"tokenizer's eos_token_id={self.tokenizer.eos_token_id} in {path}; text embeddings would be pooled "
                "at the wrong token"
            )
        self.max_length = min(self.tokenizer.model_max_length, text_config.max_position_embeddings)

        ip = self.processor.image_processor
        self.crop_size = (int(ip.crop_size["height"]), int(ip.crop_size["width"]))
        self.short_edge = int(ip.size.get("shortest_edge") or min(self.crop_size))
        self.image_mean = torch.tensor(ip.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.image_std = torch.tensor(ip.image_std, dtype=torch.float32).view(1, 3, 1, 1)

    def preprocess(self, images: Tensor) -> Tensor:
        """images (N, 3, H, W) in [-1, 1] -> pixel_values (N, 3, crop_h, crop_w) fp32 (differentiable)."""
        x = ((images.float() + 1) / 2).clamp(0, 1)
        h, w = x.shape[-2:]
        s = self.short_edge
        size = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
        ch, cw = self.crop_size
        if x.shape[-2] < ch or x.shape[-1] < cw:
            raise ValueError(
                f"reward {self.name!r}: resized image {tuple(x.shape[-2:])} is smaller than crop {self.crop_size}"
            )
        top, left = (x.shape[-2] - ch) // 2, (x.shape[-1] - cw) // 2
        x = x[..., top : top + ch, left : left + cw]
        return (x - self.image_mean.to(x.device)) / self.image_std.to(x.device)

    def _text_embeddings(self, prompts: list[str]) -> Tensor:
        """N prompts -> (N, D) L2-normalised fp32 embeddings."""
        tokens = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        out = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return F.normalize(out.pooler_output.float(), dim=-1)

    def _image_embeddings(self, images: Tensor) -> Tensor:
        """(n, 3, H, W) in [-1, 1] -> (n, D) L2-normalised fp32 embeddings."""
        pixel_values = self.preprocess(images.to(self.device)).to(self.dtype)
        out = self.model.get_image_features(pixel_values=pixel_values)
        return F.normalize(out.pooler_output.float(), dim=-1)

    @torch.no_grad()
    def embed_images(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, D) L2-normalised image embeddings on CPU (used for diversity)."""
        chunks = [self._image_embeddings(images[i : i + self.batch_size]).cpu()
                  for i in range(0, images.shape[0], self.batch_size)]
        return torch.cat(chunks)

    def _score(self, images: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        unique = {p: i for i, p in enumerate(dict.fromkeys(prompts))}  # embed each distinct prompt once
        text = self._text_embeddings(list(unique))
        text = text[torch.tensor([unique[p] for p in prompts], device=text.device)]  # (N, D)
        scores = []
        for start in range(0, images.shape[0], self.batch_size):
            image = self._image_embeddings(images[start : start + self.batch_size])
            scores.append((image * text[start : start + self.batch_size]).sum(dim=-1))
        return torch.cat(scores)


class CLIPScoreReward(PickScoreReward):
    """CLIP score (e.g. CLIP ViT-L/14): the same cosine as PickScore, with a plain CLIP folder; tables x 100."""

    name = "clip"


class EnsembleReward(Reward):
    """Weighted sum of per-reward z-scores within the candidates of one prompt (spec 2.4).

    `score_groups` z-scores over the K candidates of each group; `score` treats all images that share a prompt
    string as one group. Weights are normalised to sum 1. Differentiable iff every member is.
    """

    name = "ensemble"

    def __init__(self, rewards: dict[str, Reward], weights: dict[str, float]) -> None:
        if not rewards or set(rewards) != set(weights):
            raise ValueError(f"ensemble: reward names {sorted(rewards)} and weight names {sorted(weights)} must match")
        if not sum(weights.values()) > 0:
            raise ValueError(f"ensemble: weights must have a positive sum, got {weights}")
        self.rewards = dict(rewards)
        self.weights = dict(weights)
        self.differentiable = all(r.differentiable for r in rewards.values())

    def _score(self, images: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        # score() entered no_grad / enable_grad already; members follow the same mode.
        grad = torch.is_grad_enabled()
        raw = {n: r.score(images, prompts, metadata, with_grad=grad) for n, r in self.rewards.items()}
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p, []).append(i)
        combined = torch.cat(
            [ensemble_scores({n: s[idx][None] for n, s in raw.items()}, self.weights)[0] for idx in groups.values()]
        )
        order = torch.tensor([i for idx in groups.values() for i in idx])
        return combined[torch.argsort(order)]

    def _score_groups(self, images: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        grad = torch.is_grad_enabled()
        raw = {n: r.score_groups(images, prompts, metadata, with_grad=grad) for n, r in self.rewards.items()}
        return ensemble_scores(raw, self.weights)


REWARDS: dict[str, type[Reward]] = {
    "pickscore": PickScoreReward,
    "clip": CLIPScoreReward,
}


def build_reward(name: str, **kwargs: Any) -> Reward:
    """Instantiate the reward registered as `name` with `kwargs`; ValueError for unknown names."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; valid names: {sorted(REWARDS)}")
    return REWARDS[name](**kwargs)
