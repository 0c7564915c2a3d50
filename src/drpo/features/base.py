"""The interface of the frozen feature encoders, `FeatureEncoder`, and the feature-key grammar.

An encoder maps latents (N, C, H, W) to a dict of token sets key -> (N, T, D): it has a fixed tuple of `keys`,
a differentiable `__call__` that runs in fp32 (autocast off, whatever the training's mixed precision), and frozen
parameters. A subclass names its feature maps (N, C, H, W) in `map_names` and computes them in `maps()`;
`FeatureEncoder` chunks the batch and turns the maps into the keys' token sets with `feature_head`.

Feature keys follow the grammar ``<map>_<stat>[_<p>]`` over the encoder's named feature maps
(N, C, H, W):

* ``<map>_mean`` / ``<map>_std``: spatial mean / ``sqrt(population var + 1e-6)``, 1 token of C dims;
* ``<map>_mean_<p>`` / ``<map>_std_<p>``: the same inside non-overlapping p x p patches,
  (H/p)(W/p) tokens in row-major patch order;
* ``<map>``: every spatial position as a token (H*W tokens; the raw-latent encoder can subsample them);
* ``<map>_flat`` / ``<map>_flat_<p>``: the whole map (average-pooled over p x p first) as one token of
  C*(H/p)*(W/p) dims. Not in the paper's recipes: the tokens of the keys above form one point set per prompt,
  so no key above tells where in the image a feature is; a flat key keeps the layout (as the SDXL
  teacher features of spec 2.5b do).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from contextlib import nullcontext
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from drpo.generators import PromptEmbedding

STD_EPS = 1e-6
_KEY_RE = re.compile(r"^(?P<map>.+?)_(?P<stat>mean|std|flat)(?:_(?P<p>\d+))?$")


def parse_feature_key(key: str) -> tuple[str, str | None, int | None]:
    """Split a feature key into (map, stat, patch).

    "layer4_std_2" -> ("layer4", "std", 2); "layer4_mean" -> ("layer4", "mean", None); "latent" -> ("latent", None, None).
    """
    m = _KEY_RE.match(key)
    if m is None:
        return key, None, None
    return m["map"], m["stat"], int(m["p"]) if m["p"] is not None else None


def feature_head(fmap: Tensor, stat: str | None, patch: int | None, spatial_stride: int = 1, key: str = "") -> Tensor:
    """One feature head on a map (N, C, H, W) -> tokens (N, T, C).

    stat None: every `spatial_stride`-th position, T = ceil(H/s)*ceil(W/s); "mean"/"std" without patch: T = 1;
    with patch p: statistics inside non-overlapping p x p patches, T = (H/p)(W/p). std = sqrt(var_pop + 1e-6).
    "flat": T = 1, the map average-pooled over p x p patches (p = 1 without patch) and flattened.
    """
    n, c, h, w = fmap.shape
    if stat is None:
        return fmap[:, :, ::spatial_stride, ::spatial_stride].flatten(2).transpose(1, 2)
    if stat == "flat":
        if patch is not None and (patch < 1 or h % patch or w % patch):
            raise ValueError(f"feature key {key!r}: patch size {patch} must divide the {h}x{w} map")
        return F.avg_pool2d(fmap, patch or 1).flatten(1).unsqueeze(1)
    if patch is None:
        groups = fmap.flatten(2).unsqueeze(1)  # (N, 1, C, H*W)
    else:
        if patch < 1 or patch > h or patch > w or h % patch or w % patch:
            raise ValueError(f"feature key {key!r}: patch size {patch} must divide the {h}x{w} map and be <= it")
        groups = fmap.reshape(n, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
        groups = groups.reshape(n, (h // patch) * (w // patch), c, patch * patch)
    if stat == "mean":
        return groups.mean(dim=-1)
    return (groups.var(dim=-1, unbiased=False) + STD_EPS).sqrt()


class FeatureEncoder(nn.Module, ABC):
    """Frozen feature encoder: latents (N, C, H, W) -> {key: (N, T, D) fp32}, differentiable w.r.t. latents.

    Subclasses implement `maps(x)` (fp32 (N, C, H, W) -> named maps) and list their map names in
    `map_names`; the heads of section "key grammar" (module docstring) are applied here. Subclasses that set
    `needs_condition` implement `maps(x, cond)` instead and receive the conditioning of their chunk.
    """

    needs_generator: bool = False
    needs_condition: bool = False
    #: What this encoder's map names look like (a regular expression), known before any model is loaded: a key
    #: whose map cannot match is refused when the config is read; a built encoder checks its real maps.
    map_pattern: str = r".+"
    #: Whether two calls on the same latents give different features (fresh noise or a random mask per call):
    #: DrPO then calls the encoder again for its anchors, as the authors' trainers do (drpo.methods.drpo).
    stochastic: bool = False

    @classmethod
    def impossible_keys(cls, keys: Sequence[str]) -> list[str]:
        """The keys whose map no encoder of this class can have."""
        return [k for k in keys if not re.fullmatch(cls.map_pattern, parse_feature_key(k)[0])]

    def __init__(self, keys: Sequence[str], chunk_size: int | None = None, spatial_stride: int = 1) -> None:
        super().__init__()
        if isinstance(keys, str) or not keys:
            raise ValueError(f"{type(self).__name__}: keys must be a non-empty sequence of feature keys, got {keys!r}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"{type(self).__name__}: chunk_size must be >= 1 or None, got {chunk_size}")
        if spatial_stride < 1:
            raise ValueError(f"{type(self).__name__}: spatial_stride must be >= 1, got {spatial_stride}")
        self.keys = tuple(keys)
        self.chunk_size = chunk_size
        self.spatial_stride = spatial_stride
        self._parsed = {k: parse_feature_key(k) for k in self.keys}

    def _check_keys(self) -> None:
        unknown = [k for k, (m, _, _) in self._parsed.items() if m not in self.map_names]
        if unknown:
            raise ValueError(
                f"{type(self).__name__}: unknown feature keys {unknown}; maps are {list(self.map_names)}, "
                "keys are <map>, <map>_mean, <map>_std, <map>_mean_<p>, <map>_std_<p>, <map>_flat, <map>_flat_<p>"
            )

    @property
    @abstractmethod
    def map_names(self) -> tuple[str, ...]:
        """Names of the feature maps `maps` returns."""

    @abstractmethod
    def maps(self, x: Tensor) -> dict[str, Tensor]:
        """fp32 latents (N, C, H, W) -> {map name: (N, C', H', W')}."""

    def forward(self, latents: Tensor, cond: PromptEmbedding | None = None) -> dict[str, Tensor]:
        """(N, C, H, W) any float dtype -> {key: (N, T, D) float32}; computed in fp32 (also inside an autocast
        region), in chunks of `chunk_size`.

        cond: prompt conditioning, one per latent or one for all; required when `needs_condition`, else ignored.
        """
        if latents.ndim != 4:
            raise ValueError(f"{type(self).__name__} expects latents (N, C, H, W), got shape {tuple(latents.shape)}")
        x = latents.float()
        if not self.needs_condition:
            cond = None
        elif cond is None:
            raise ValueError(
                f"{type(self).__name__} needs the prompt conditioning: call it as "
                "features(latents, cond=generator.encode_prompts(prompts))"
            )
        elif len(cond) not in (1, x.shape[0]):
            raise ValueError(f"{len(cond)} prompt embeddings for {x.shape[0]} latents (need equal counts or 1)")
        chunks = x.split(self.chunk_size) if self.chunk_size else (x,)
        parts, start = [], 0
        # Outside the training step's autocast: the authors' extractor runs in fp32 whatever the mixed precision
        # (the cost report's meta tensors have no autocast to leave).
        device = x.device.type
        fp32 = torch.autocast(device_type=device, enabled=False) if torch.amp.is_autocast_available(device) else None
        with fp32 or nullcontext():
            for chunk in chunks:
                part_cond = cond if cond is None or len(cond) == 1 else cond[start : start + len(chunk)]
                parts.append(self._features(chunk, part_cond))
                start += len(chunk)
        return {k: torch.cat([p[k] for p in parts]) if len(parts) > 1 else parts[0][k] for k in self.keys}

    def _features(self, x: Tensor, cond: PromptEmbedding | None) -> dict[str, Tensor]:
        fmaps = self.maps(x, cond) if self.needs_condition else self.maps(x)
        return {
            k: feature_head(fmaps[m], stat, p, self.spatial_stride if stat is None else 1, key=k)
            for k, (m, stat, p) in self._parsed.items()
        }
