"""Frozen feature encoders phi: latents (N, C, H, W) -> dict of token sets key -> (N, T, D).

The drift field is computed in the feature space of a frozen encoder (spec 2.5). Every encoder here shares
one interface, `FeatureEncoder`: a fixed tuple of `keys`, a differentiable `__call__` that runs in fp32,
and frozen parameters. Encoders are looked up by name in `FEATURE_ENCODERS`; adding one is one subclass
that implements `maps()` plus one registry line.

| name | spec | input | needs |
|---|---|---|---|
| ``latent_mae`` | 2.5a | latent | checkpoint_path |
| ``teacher_unet`` | 2.5b | latent (+ noise) through the generator's frozen base U-Net | generator; cond at call time |
| ``vit_mae`` | 2.5c | VAE-decoded image | generator (VAE), checkpoint_path (HF folder) |
| ``dino`` | 2.5d | VAE-decoded image | generator (VAE), checkpoint_path (HF folder) |
| ``raw_latent`` | 2.5e | latent | -- |

Encoders with ``needs_generator`` borrow the generator's modules (never registered as submodules, so they
are not moved, saved or frozen through the encoder); `build_feature_encoder(name, generator=...)` passes
the generator only to them. Encoders with ``needs_condition`` take the prompt conditioning at call time,
``features(latents, cond=generator.encode_prompts(...))``; the others ignore ``cond``, so a caller can
always pass it.

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

Latent-MAE checkpoint layout (the Drifting authors' flax export, spec 2.5a and 12), one ``torch.save``'d flat
dict:

* ``encoder.conv1.kernel`` (3, 3, C_in, W_stem), HWIO; ``encoder.gn1.{scale,bias}``;
* ``encoder.stages_{s}.layers_{b}.{conv1,conv2,proj_conv}.kernel`` (HWIO) and
  ``encoder.stages_{s}.layers_{b}.{gn1,gn2,proj_gn}.{scale,bias}``, with s and b 0-based (flax list naming);
  ``proj_*`` only where the block changes shape;
* ``encoder.layer{k}_norm.{scale,bias}``, k 1-based, matching the feature map names ``layer1`` .. ``layer4``;
* ``metadata``: ``{"model_config": {"layers": [...], "widths": [...], "in_channels": C_in}}`` (optional; a
  sibling ``metadata.json`` is read instead when the key is absent). The architecture is always inferred from
  the weight names and shapes; the metadata, when present, must agree with it.

Any other key (e.g. ``decoder.*`` weights of the MAE) is ignored by the loader. A wrapped file
``{"state_dict": {...}, "metadata": {...}}`` is accepted too.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import Dinov2Model, PreTrainedModel, ViTMAEModel

from drpo.generators import OneStepGenerator, PromptEmbedding, adapters_disabled

STD_EPS = 1e-6
GN_EPS = 1e-5
SD_TURBO_MAE_KEYS = (
    "layer4_mean",
    "layer4_std",
    "layer4_mean_2",
    "layer4_std_2",
    "layer4_mean_4",
    "layer4_std_4",
)
RAW_LATENT_KEYS = (
    "latent",
    "latent_mean",
    "latent_std",
    "latent_mean_2",
    "latent_std_2",
    "latent_mean_4",
    "latent_std_4",
)
TEACHER_LAYERS = ("down_blocks.2", "mid_block", "up_blocks.0")
VIT_MAE_KEYS = ("layer12_patch_mean", "layer12_patch_std", "layer12_cls")
DINO_KEYS = tuple(f"layer{n}_{head}" for n in (3, 6, 9, 12) for head in ("patch_mean", "patch_std", "cls"))
MAX_LATENT_TOKENS = 1024
_KEY_RE = re.compile(r"^(?P<map>.+?)_(?P<stat>mean|std|flat)(?:_(?P<p>\d+))?$")
_STAGE_RE = re.compile(r"^encoder\.stages_(\d+)\.layers_(\d+)\.")


def gn_groups(channels: int) -> int:
    """Largest divisor of `channels` that is <= 32."""
    return next(g for g in range(min(32, channels), 0, -1) if channels % g == 0)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(gn_groups(channels), channels, eps=GN_EPS)


class BasicBlock(nn.Module):
    """ResNet basic block with GroupNorm: relu(shortcut(x) + gn2(conv2(relu(gn1(conv1(x))))))."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.gn1 = _group_norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.gn2 = _group_norm(out_ch)
        self.has_proj = stride != 1 or in_ch != out_ch
        if self.has_proj:
            self.proj_conv = nn.Conv2d(in_ch, out_ch, 1, stride=stride, padding=0, bias=False)
            self.proj_gn = _group_norm(out_ch)

    def forward(self, x: Tensor) -> Tensor:
        """(N, in_ch, H, W) -> (N, out_ch, H/stride, W/stride)."""
        y = F.relu(self.gn1(self.conv1(x)))
        y = self.gn2(self.conv2(y))
        shortcut = self.proj_gn(self.proj_conv(x)) if self.has_proj else x
        return F.relu(shortcut + y)


class LatentMAEEncoder(nn.Module):
    """ResNet/GroupNorm encoder of the Drifting latent MAE (spec 2.5a).

    Args:
        layers: basic blocks per stage (the paper's checkpoint: [3, 4, 6, 3]).
        widths: output channels per stage.
        in_channels: input channels (4 for SD latents).
        stem_width: channels of the stem conv; defaults to widths[0].
        block_stride: also expose the output of every `block_stride`-th block of a stage (except its last
            block) as "layer{k}_blk{b}" (b 1-based); 0 disables.
    """

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 6, 3),
        widths: Sequence[int] = (64, 128, 256, 512),
        in_channels: int = 4,
        stem_width: int | None = None,
        block_stride: int = 2,
    ) -> None:
        super().__init__()
        if len(layers) != len(widths) or not layers or min(layers) < 1:
            raise ValueError(
                f"layers {list(layers)} and widths {list(widths)} must be non-empty, equally long, >= 1 block each"
            )
        self.layers = [int(n) for n in layers]
        self.widths = [int(w) for w in widths]
        self.in_channels = int(in_channels)
        self.stem_width = int(stem_width if stem_width is not None else widths[0])
        self.block_stride = int(block_stride)
        self.conv1 = nn.Conv2d(self.in_channels, self.stem_width, 3, stride=1, padding=1, bias=False)
        self.gn1 = _group_norm(self.stem_width)
        self.stages = nn.ModuleList()
        ch = self.stem_width
        for s, (n_blocks, width) in enumerate(zip(self.layers, self.widths)):
            blocks = [BasicBlock(ch if b == 0 else width, width, 2 if s > 0 and b == 0 else 1) for b in range(n_blocks)]
            self.stages.append(nn.ModuleList(blocks))
            self.add_module(f"layer{s + 1}_norm", _group_norm(width))
            ch = width

    @property
    def model_config(self) -> dict[str, Any]:
        """The architecture as stored in checkpoint metadata."""
        return {
            "layers": self.layers,
            "widths": self.widths,
            "in_channels": self.in_channels,
            "stem_width": self.stem_width,
        }

    @property
    def map_names(self) -> tuple[str, ...]:
        """Names of the feature maps returned by forward, in order."""
        names = ["conv1"]
        for s, n_blocks in enumerate(self.layers):
            names += [f"layer{s + 1}_blk{b}" for b in self._tap_blocks(n_blocks)]
            names.append(f"layer{s + 1}")
        return tuple(names)

    def _tap_blocks(self, n_blocks: int) -> range:
        return range(self.block_stride, n_blocks, self.block_stride) if self.block_stride > 0 else range(0)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """(N, in_channels, H, W) -> {map name: (N, C, H', W')}; layer k is downsampled by 2^(k-1)."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"LatentMAEEncoder expects (N, {self.in_channels}, H, W) input, got {tuple(x.shape)}")
        maps = {"conv1": F.relu(self.gn1(self.conv1(x)))}
        h = maps["conv1"]
        for s, stage in enumerate(self.stages):
            taps = set(self._tap_blocks(len(stage)))
            for b, block in enumerate(stage, start=1):
                h = block(h)
                if b in taps:
                    maps[f"layer{s + 1}_blk{b}"] = h
            h = getattr(self, f"layer{s + 1}_norm")(h)
            maps[f"layer{s + 1}"] = h
        return maps

    @classmethod
    def from_checkpoint(cls, path: str | Path, block_stride: int = 2) -> LatentMAEEncoder:
        """Load an encoder from a checkpoint in the flax export layout (module docstring); frozen, eval mode."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"latent-MAE checkpoint not found: {path}")
        raw = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(raw, dict):
            raise ValueError(f"latent-MAE checkpoint {path} holds a {type(raw).__name__}, expected a flat dict")
        if isinstance(raw.get("state_dict"), dict):
            raw = {**raw["state_dict"], **({"metadata": raw["metadata"]} if "metadata" in raw else {})}
        params = {k: torch.as_tensor(v) for k, v in raw.items() if k.startswith("encoder.")}
        config = _infer_config(params, path)
        metadata = raw.get("metadata")
        if metadata is None and (path.parent / "metadata.json").is_file():
            metadata = json.loads((path.parent / "metadata.json").read_text(encoding="utf-8"))
        if isinstance(metadata, str):
            metadata = json.loads(metadata)
        _check_metadata(metadata, config, path)

        encoder = cls(**config, block_stride=block_stride)
        expected = {_to_flax_name(k, v): k for k, v in encoder.state_dict().items()}
        missing = sorted(set(expected) - set(params))
        unexpected = sorted(set(params) - set(expected))
        if missing or unexpected:
            raise KeyError(
                f"latent-MAE checkpoint {path} does not match the architecture {config}: "
                f"missing keys {missing}; unexpected keys {unexpected}"
            )
        state = {}
        for flax_name, torch_name in expected.items():
            value = params[flax_name].float()
            state[torch_name] = value.permute(3, 2, 0, 1) if value.ndim == 4 else value
        encoder.load_state_dict(state)
        return encoder.eval().requires_grad_(False)


def save_checkpoint(encoder: LatentMAEEncoder, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Write `encoder` in the flax export layout (module docstring) to `path` with torch.save.

    `extra` entries (e.g. the MAE decoder as "decoder.*") are stored alongside; their keys must not start with
    "encoder." nor be "metadata", so the loader can ignore them.
    """
    out: dict[str, Any] = {
        _to_flax_name(k, v): (v.permute(2, 3, 1, 0) if v.ndim == 4 else v).detach().cpu().contiguous()
        for k, v in encoder.state_dict().items()
    }
    for key in extra or {}:
        if key.startswith("encoder.") or key == "metadata":
            raise ValueError(f"extra checkpoint key {key!r} collides with the encoder layout; use another prefix")
    out.update(extra or {})
    out["metadata"] = {"format": "drifting-mae-encoder", "model_config": encoder.model_config}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)


def _to_flax_name(torch_name: str, value: Tensor) -> str:
    """"stages.0.1.conv1.weight" -> "encoder.stages_0.layers_1.conv1.kernel"; GN weight -> scale."""
    name = re.sub(r"^stages\.(\d+)\.(\d+)\.", r"stages_\1.layers_\2.", torch_name)
    if name.endswith(".weight"):
        name = name[: -len("weight")] + ("kernel" if value.ndim == 4 else "scale")
    return "encoder." + name


def _infer_config(params: dict[str, Tensor], path: Path) -> dict[str, Any]:
    """Architecture (layers, widths, in_channels, stem_width) from weight names and HWIO kernel shapes."""
    if "encoder.conv1.kernel" not in params:
        raise KeyError(
            f"latent-MAE checkpoint {path} has no 'encoder.conv1.kernel'; its encoder keys: {sorted(params)[:8]}"
        )
    blocks: dict[int, set[int]] = {}
    for key in params:
        if m := _STAGE_RE.match(key):
            blocks.setdefault(int(m[1]), set()).add(int(m[2]))
    if sorted(blocks) != list(range(len(blocks))) or not blocks:
        raise KeyError(f"latent-MAE checkpoint {path} has stages {sorted(blocks)}, expected stages_0..stages_N")
    layers = []
    for s in range(len(blocks)):
        if sorted(blocks[s]) != list(range(len(blocks[s]))):
            raise KeyError(f"latent-MAE checkpoint {path}: stages_{s} has blocks {sorted(blocks[s])}, expected 0..N")
        layers.append(len(blocks[s]))
    widths = []
    for s in range(len(layers)):
        key = f"encoder.stages_{s}.layers_0.conv1.kernel"
        if key not in params:
            raise KeyError(f"latent-MAE checkpoint {path} is missing {key!r}")
        widths.append(int(params[key].shape[3]))
    stem = params["encoder.conv1.kernel"].shape
    return {"layers": layers, "widths": widths, "in_channels": int(stem[2]), "stem_width": int(stem[3])}


def _check_metadata(metadata: Any, config: dict[str, Any], path: Path) -> None:
    model_config = (metadata or {}).get("model_config", {}) if isinstance(metadata, dict) else {}
    for field in ("layers", "widths", "in_channels"):
        if field in model_config:
            stored = [int(v) for v in model_config[field]] if field != "in_channels" else int(model_config[field])
            if stored != config[field]:
                raise ValueError(
                    f"latent-MAE checkpoint {path}: metadata model_config.{field}={stored} "
                    f"disagrees with the weights ({config[field]})"
                )


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
        """(N, C, H, W) any float dtype -> {key: (N, T, D) float32}; computed in fp32, in chunks of `chunk_size`.

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


class LatentMAEFeatures(FeatureEncoder):
    """Latent-MAE features (spec 2.5a) from a checkpoint in the flax export layout.

    Args:
        checkpoint_path: the .pth file (see module docstring).
        keys: feature keys; default the SD-Turbo recipe's six layer-4 keys.
        block_stride: exposes "layer{k}_blk{b}" maps every `block_stride` blocks (0 disables).
        chunk_size: encode at most this many latents at once (bounds activation memory).
    """

    def __init__(
        self,
        checkpoint_path: str | Path,
        keys: Sequence[str] = SD_TURBO_MAE_KEYS,
        block_stride: int = 2,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(keys, chunk_size)
        self.encoder = LatentMAEEncoder.from_checkpoint(checkpoint_path, block_stride=block_stride)
        self._check_keys()

    @classmethod
    def from_encoder(cls, encoder: LatentMAEEncoder, keys: Sequence[str] = SD_TURBO_MAE_KEYS,
                     chunk_size: int | None = None) -> "LatentMAEFeatures":
        """Features of an in-memory encoder (e.g. random weights at the real size, for cost counting)."""
        features = cls.__new__(cls)
        FeatureEncoder.__init__(features, keys, chunk_size)
        features.encoder = encoder
        features._check_keys()
        return features

    @property
    def map_names(self) -> tuple[str, ...]:
        return self.encoder.map_names

    def maps(self, x: Tensor) -> dict[str, Tensor]:
        return self.encoder(x)


class RawLatentFeatures(FeatureEncoder):
    """The latent itself as feature map "latent" (spec 2.5e, the "Latent" ablation).

    `spatial_stride` subsamples the positions of the raw "latent" key (4,096 tokens per 64x64 latent otherwise).
    Memory trap (spec 11 item 12): all tokens of a prompt's K samples form one point set, so the raw key at
    stride 1 on 64x64 latents makes a ~98k-point set for K = 24 and a distance matrix of tens of GiB. A call
    whose raw key has more than `max_latent_tokens` tokens per sample therefore raises a ValueError naming the
    smallest stride that fits; `max_latent_tokens=None` runs it anyway (the original's default behaviour).
    """

    def __init__(
        self,
        keys: Sequence[str] = RAW_LATENT_KEYS,
        spatial_stride: int = 1,
        chunk_size: int | None = None,
        max_latent_tokens: int | None = MAX_LATENT_TOKENS,
    ) -> None:
        super().__init__(keys, chunk_size, spatial_stride)
        if max_latent_tokens is not None and max_latent_tokens < 1:
            raise ValueError(f"RawLatentFeatures: max_latent_tokens must be >= 1 or None, got {max_latent_tokens}")
        self.max_latent_tokens = max_latent_tokens
        self._check_keys()

    @property
    def map_names(self) -> tuple[str, ...]:
        return ("latent",)

    def maps(self, x: Tensor) -> dict[str, Tensor]:
        return {"latent": x}

    def forward(self, latents: Tensor, cond: PromptEmbedding | None = None) -> dict[str, Tensor]:
        if latents.ndim == 4 and "latent" in self.keys and self.max_latent_tokens is not None:
            self._check_token_budget(*latents.shape)
        return super().forward(latents, cond)

    def _check_token_budget(self, n: int, c: int, h: int, w: int) -> None:
        def tokens(stride: int) -> int:
            return -(-h // stride) * -(-w // stride)

        stride = self.spatial_stride
        if tokens(stride) <= self.max_latent_tokens:
            return
        fits = next(s for s in range(stride + 1, max(h, w) + 1) if tokens(s) <= self.max_latent_tokens)
        points = n * tokens(stride)
        raise ValueError(
            f"raw_latent key 'latent' at spatial_stride {stride} gives {tokens(stride)} tokens per {h}x{w} latent: "
            f"the {n} samples of a prompt form a {points:,}-point set, and the drift's distance matrix has at "
            f"least {points:,}^2 entries ({points**2 * 4 / 2**30:.1f} GiB in fp32; spec 11 item 12). Use "
            f"spatial_stride >= {fits} (<= {self.max_latent_tokens} tokens per sample), or max_latent_tokens=None "
            "to run it anyway."
        )


@contextmanager
def _checkpointing_disabled(module: nn.Module) -> Iterator[None]:
    """Switch off diffusers' block-level gradient checkpointing inside `module`, restoring the flags afterwards."""
    flags = [(m, m.gradient_checkpointing) for m in module.modules() if getattr(m, "gradient_checkpointing", False)]
    for m, _ in flags:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m, flag in flags:
            m.gradient_checkpointing = flag


def pool_flatten(fmap: Tensor, pool: int) -> Tensor:
    """(N, C, H, W) -> (N, C * (H // pool) * (W // pool)): average pool with kernel = stride = `pool`.

    A map smaller than `pool` on either side is pooled to 1 x 1 instead, giving (N, C).
    """
    if min(fmap.shape[-2:]) < pool:
        return fmap.mean((2, 3))
    return F.avg_pool2d(fmap, pool).flatten(1)


class _AllCaptured(Exception):
    """Raised by the last forward hook: the rest of the U-Net forward is not needed."""


class TeacherUNetFeatures(FeatureEncoder):
    """The generator's frozen base U-Net as encoder (spec 2.5b; the SDXL-Turbo default).

    Per call, u = x + noise_std * eps with eps ~ N(0, I) drawn fresh from the global RNG on every call, as in
    the original, or from `fixed_noise_seed` on every call for deterministic features (a deliberate, documented
    deviation: spec 11 item 7). One U-Net forward on u at integer timestep `timestep` (no scale_model_input)
    with the prompt's hidden states (SDXL: plus pooled text embeds and the generator's time ids), LoRA adapters
    disabled, so the features always come from the base weights. Forward hooks capture the outputs of the
    modules named in `keys` (tuple outputs -> first element); each key is one token per sample, the map
    average-pooled with kernel = stride = `pool` (1 x 1 when the map is smaller) and flattened:
    D = C * (H // pool) * (W // pool), e.g. 20,480 for SDXL's down_blocks.2 at 512^2. The forward stops after
    the last hooked module. Gradients flow through the frozen U-Net to x. The feature noise is drawn over the
    whole batch, so `chunk_size` does not change the features.

    Memory: the U-Net is the generator's own, never copied. Diffusers' block-level gradient checkpointing
    (`unet.enable_gradient_checkpointing()`, for the trainable pass) is switched off during this pass, since its
    recomputation would run in backward with the adapters enabled again. `gradient_checkpointing=True` instead
    checkpoints the whole teacher pass as one segment whose recomputation disables the adapters again: only u
    and the pooled features are kept between forward and backward, at the price of a second teacher forward
    (the original keeps every activation; spec 11 item 12).

    Args:
        generator: one-step generator whose `unet` is the teacher (its LoRA, if any, is ignored here).
        keys: U-Net module names to hook (`unet.named_modules()` names); paper: down_blocks.2, mid_block,
            up_blocks.0.
        noise_std, timestep, pool: see above; paper: 0.1, 100, 4.
        fixed_noise_seed: seed the feature noise identically on every call instead of drawing it fresh.
        chunk_size: run the U-Net on at most this many latents at once.
        gradient_checkpointing: checkpoint the teacher pass (see Memory).
    """

    needs_generator = True
    needs_condition = True

    def __init__(
        self,
        generator: OneStepGenerator,
        keys: Sequence[str] = TEACHER_LAYERS,
        noise_std: float = 0.1,
        timestep: int = 100,
        pool: int = 4,
        fixed_noise_seed: int | None = None,
        chunk_size: int | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__(keys, chunk_size)
        modules = dict(generator.unet.named_modules())
        unknown = [k for k in self.keys if k not in modules]
        if unknown or len(set(self.keys)) != len(self.keys):
            blocks = [n for n, m in modules.items() if n and n.count(".") <= 1 and not isinstance(m, nn.ModuleList)]
            raise ValueError(
                f"TeacherUNetFeatures: keys must be distinct U-Net module names; unknown {unknown} in "
                f"{list(self.keys)}. Top-level modules: {blocks}"
            )
        if pool < 1 or noise_std < 0:
            raise ValueError(f"TeacherUNetFeatures: need pool >= 1 and noise_std >= 0, got {pool}, {noise_std}")
        self.generator = generator  # not an nn.Module: the U-Net stays out of this encoder's parameters
        self.noise_std = float(noise_std)
        self.timestep = int(timestep)
        self.pool = int(pool)
        self.fixed_noise_seed = fixed_noise_seed
        self.gradient_checkpointing = gradient_checkpointing

    @property
    def map_names(self) -> tuple[str, ...]:
        return self.keys

    def forward(self, latents: Tensor, cond: PromptEmbedding | None = None) -> dict[str, Tensor]:
        if latents.ndim == 4:
            x = latents.float()
            if self.fixed_noise_seed is None:
                eps = torch.randn_like(x)
            else:
                rng = torch.Generator(x.device).manual_seed(self.fixed_noise_seed)
                eps = torch.randn(x.shape, generator=rng, device=x.device)
            latents = x + self.noise_std * eps
        return super().forward(latents, cond)

    def maps(self, x: Tensor, cond: PromptEmbedding) -> dict[str, Tensor]:
        """Noisy latents (N, C, H, W) -> {key: (N, D, 1, 1)} pooled, flattened hooked outputs."""
        gen, unet = self.generator, self.generator.unet
        n = x.shape[0]
        cond = (cond.repeat_interleave(n) if len(cond) == 1 else cond).to(gen.device, unet.dtype)
        inputs = [x.to(gen.device, unet.dtype), cond.hidden]
        if cond.pooled is not None:
            inputs += [cond.pooled, gen.time_ids.expand(n, -1).to(unet.dtype)]
        if self.gradient_checkpointing and torch.is_grad_enabled():
            pooled = checkpoint(self._teacher_pass, *inputs, use_reentrant=False)
        else:
            pooled = self._teacher_pass(*inputs)
        return {k: v[:, :, None, None] for k, v in zip(self.keys, pooled)}

    def _teacher_pass(
        self, sample: Tensor, hidden: Tensor, text_embeds: Tensor | None = None, time_ids: Tensor | None = None
    ) -> tuple[Tensor, ...]:
        """Base-weight U-Net forward up to the last hooked module -> pooled features (N, D_k) per key, fp32."""
        unet = self.generator.unet
        captured: dict[str, Tensor] = {}

        def hook(name: str):
            def capture(module: nn.Module, args: Any, output: Any) -> None:
                fmap = output[0] if isinstance(output, tuple) else output
                captured[name] = pool_flatten(fmap.float(), self.pool)
                if len(captured) == len(self.keys):
                    raise _AllCaptured

            return capture

        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        handles = [unet.get_submodule(k).register_forward_hook(hook(k)) for k in self.keys]
        try:
            with adapters_disabled(unet), _checkpointing_disabled(unet):
                unet(sample, self.timestep, encoder_hidden_states=hidden, added_cond_kwargs=added)
        except _AllCaptured:
            pass
        finally:
            for handle in handles:
                handle.remove()
        missing = [k for k in self.keys if k not in captured]
        if missing:
            raise RuntimeError(f"TeacherUNetFeatures: modules {missing} did not run in the U-Net forward")
        return tuple(captured[k] for k in self.keys)


def _processor_settings(path: Path) -> tuple[tuple[int, int], list[float], list[float]]:
    """(target (h, w), image_mean, image_std) from a model folder's preprocessor_config.json.

    The target is the crop size when the processor center-crops (DINOv2), else its size (ViT-MAE).
    """
    config_path = path / "preprocessor_config.json"
    cfg = json.loads(config_path.read_text(encoding="utf-8"))
    size = cfg["crop_size"] if cfg.get("do_center_crop") and cfg.get("crop_size") else cfg.get("size")
    if isinstance(size, int):
        target = (size, size)
    elif isinstance(size, dict) and "height" in size and "width" in size:
        target = (int(size["height"]), int(size["width"]))
    elif isinstance(size, dict) and "shortest_edge" in size:
        target = (int(size["shortest_edge"]),) * 2
    else:
        raise ValueError(f"{config_path}: cannot read an image size from size/crop_size {size!r}")
    mean, std = cfg.get("image_mean"), cfg.get("image_std")
    if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == 3):
        raise ValueError(f"{config_path}: image_mean and image_std must be lists of 3 values, got {mean!r}, {std!r}")
    return target, [float(v) for v in mean], [float(v) for v in std]


class _ViTImageFeatures(FeatureEncoder):
    """Image encoders on decoded latents (spec 2.5c, 2.5d): VAE decode -> [0, 1] -> resize -> normalise -> ViT.

    Maps per depth L (hidden_states[L]: 0 = embeddings, L = output of block L before the final LayerNorm):
    "layer{L}_patch" (N, D, 1, T), the patch tokens, and "layer{L}_cls" (N, D, 1, 1), the CLS token; so
    "layer{L}_patch_mean" / "layer{L}_patch_std" are the mean / std over the patch tokens and "layer{L}_cls" the
    CLS token, 1 token of D dims each.

    Preprocessing follows the folder's preprocessor_config.json: a bicubic resize straight to the target of
    `_processor_settings` (224 for both paper checkpoints; antialiased like the processors' PIL resize), then
    normalisation with its image_mean / image_std. The VAE decode (the generator's, clamped to [-1, 1]) runs in
    chunks of `decode_chunk_size` and is differentiable, so generated latents get gradients.
    """

    needs_generator = True
    model_class: type[PreTrainedModel]

    def __init__(
        self,
        generator: OneStepGenerator,
        checkpoint_path: str | Path,
        keys: Sequence[str],
        chunk_size: int | None,
        decode_chunk_size: int | None,
    ) -> None:
        super().__init__(keys, chunk_size)
        path = Path(checkpoint_path)
        missing = [f for f in ("config.json", "preprocessor_config.json") if not (path / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{type(self).__name__}: model folder {path} lacks {missing}")
        self.generator = generator  # not an nn.Module: the VAE stays out of this encoder's parameters
        self.decode_chunk_size = decode_chunk_size
        self.model = self.model_class.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        self.model.eval().requires_grad_(False)
        self.image_size, mean, std = _processor_settings(path)
        self.register_buffer("image_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self._check_keys()

    @property
    def map_names(self) -> tuple[str, ...]:
        depths = range(self.model.config.num_hidden_layers + 1)
        return tuple(f"layer{d}_{part}" for d in depths for part in ("patch", "cls"))

    def preprocess(self, images: Tensor) -> Tensor:
        """Images (N, 3, H, W) in [-1, 1] -> normalised pixel values (N, 3, *image_size), fp32, differentiable."""
        x = (images.float().to(self.image_mean.device) + 1) / 2
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False, antialias=True)
        return (x - self.image_mean) / self.image_std

    @abstractmethod
    def hidden_states(self, pixels: Tensor) -> tuple[Tensor, ...]:
        """Pixel values (N, 3, h, w) -> per depth 0..L the tokens (N, 1 + T, D), CLS token first."""

    def maps(self, x: Tensor) -> dict[str, Tensor]:
        states = self.hidden_states(self.preprocess(self.generator.decode(x, self.decode_chunk_size)))
        maps = {}
        for name, _, _ in self._parsed.values():
            depth, part = name.removeprefix("layer").split("_")
            tokens = states[int(depth)][:, 1:] if part == "patch" else states[int(depth)][:, :1]
            maps[name] = tokens.transpose(1, 2).unsqueeze(2)
        return maps


class ViTMAEFeatures(_ViTImageFeatures):
    """Pixel ViT-MAE features (spec 2.5c; the SDXL "mae" recipe), `ViTMAEModel` from a local folder.

    facebook/vit-mae-base ships a ViTMAEForPreTraining checkpoint; its encoder loads here (decoder ignored).
    Masking: ViTMAEModel keeps a random (1 - mask_ratio) share of the patches on every forward (global RNG).
    The original keeps the checkpoint's 0.75, so its features see a random 49 of 196 patches plus CLS, drawn
    anew on every call (spec 11 item 7); `mask_ratio=None` (default) keeps that. `mask_ratio=0.0` disables the
    masking (all patches, in order) and makes the features deterministic -- a documented deviation.

    Args:
        generator: one-step generator whose VAE decodes the latents.
        checkpoint_path: local folder with config.json, weights and preprocessor_config.json.
        keys: "layer{L}_patch_mean", "layer{L}_patch_std", "layer{L}_cls" (any depth L; paper: L = 12).
        mask_ratio: None keeps the model config's ratio; otherwise in [0, 1).
        chunk_size: ViT batch size (paper: 4); decode_chunk_size: VAE batch size (paper: 1).
    """

    model_class = ViTMAEModel

    def __init__(
        self,
        generator: OneStepGenerator,
        checkpoint_path: str | Path,
        keys: Sequence[str] = VIT_MAE_KEYS,
        mask_ratio: float | None = None,
        chunk_size: int | None = 4,
        decode_chunk_size: int | None = 1,
    ) -> None:
        super().__init__(generator, checkpoint_path, keys, chunk_size, decode_chunk_size)
        if mask_ratio is not None:
            if not 0 <= mask_ratio < 1:
                raise ValueError(f"ViTMAEFeatures: mask_ratio must be in [0, 1) or None, got {mask_ratio}")
            self.model.config.mask_ratio = float(mask_ratio)  # the embeddings read it from this config object
        self.mask_ratio = float(self.model.config.mask_ratio)
        side = self.model.config.image_size
        self.interpolate_pos_encoding = self.image_size != (side, side)

    def hidden_states(self, pixels: Tensor) -> tuple[Tensor, ...]:
        noise = None
        if self.mask_ratio == 0:
            # Ascending noise makes the "shuffle" the identity: all patches in order, bit-for-bit deterministic.
            patch = self.model.config.patch_size
            count = (pixels.shape[-2] // patch) * (pixels.shape[-1] // patch)
            noise = torch.arange(count, device=pixels.device, dtype=torch.float32).expand(len(pixels), -1)
        out = self.model(
            pixel_values=pixels,
            noise=noise,
            interpolate_pos_encoding=self.interpolate_pos_encoding,
            output_hidden_states=True,
        )
        return out.hidden_states


class DinoFeatures(_ViTImageFeatures):
    """VAE decode + DINOv2 features (spec 2.5d; the SD-Turbo "DINOv2" ablation), `Dinov2Model` from a local folder.

    Position embeddings are interpolated to the processor's crop size by the model. Default keys: patch mean,
    patch std and CLS at depths 3, 6, 9, 12 (12 keys, 1 token each). No masking: deterministic.

    Args:
        generator: one-step generator whose VAE decodes the latents.
        checkpoint_path: local folder with config.json, weights and preprocessor_config.json (facebook/dinov2-base).
        keys: "layer{L}_patch_mean", "layer{L}_patch_std", "layer{L}_cls" for any depths L.
        chunk_size: ViT batch size; decode_chunk_size: VAE batch size (paper: 1 for both).
    """

    model_class = Dinov2Model

    def __init__(
        self,
        generator: OneStepGenerator,
        checkpoint_path: str | Path,
        keys: Sequence[str] = DINO_KEYS,
        chunk_size: int | None = 1,
        decode_chunk_size: int | None = 1,
    ) -> None:
        super().__init__(generator, checkpoint_path, keys, chunk_size, decode_chunk_size)

    def hidden_states(self, pixels: Tensor) -> tuple[Tensor, ...]:
        return self.model(pixel_values=pixels, output_hidden_states=True).hidden_states


FEATURE_ENCODERS: dict[str, type[FeatureEncoder]] = {
    "latent_mae": LatentMAEFeatures,
    "teacher_unet": TeacherUNetFeatures,
    "vit_mae": ViTMAEFeatures,
    "dino": DinoFeatures,
    "raw_latent": RawLatentFeatures,
}


def build_feature_encoder(name: str, generator: OneStepGenerator | None = None, **kwargs: Any) -> FeatureEncoder:
    """Instantiate the encoder registered as `name` with `kwargs`; ValueError for unknown names.

    `generator` is passed to the encoders that need one (`needs_generator`; required there) and ignored by the
    others, so a caller can always pass it.
    """
    if name not in FEATURE_ENCODERS:
        raise ValueError(f"unknown feature encoder {name!r}; valid names: {sorted(FEATURE_ENCODERS)}")
    cls = FEATURE_ENCODERS[name]
    if cls.needs_generator:
        if generator is None:
            raise ValueError(
                f"feature encoder {name!r} needs the generator: build_feature_encoder({name!r}, generator=...)"
            )
        kwargs["generator"] = generator
    return cls(**kwargs)
