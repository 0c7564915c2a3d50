"""The Drifting latent MAE's encoder as feature encoder (spec 2.5a): network, checkpoint format, features.

`LatentMAEEncoder` is the ResNet/GroupNorm encoder (`BasicBlock`s); `LatentMAEEncoder.from_checkpoint` loads
and `save_checkpoint` writes the checkpoint layout below; `LatentMAEFeatures` computes feature keys on its maps.

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from drpo.features.base import FeatureEncoder

GN_EPS = 1e-5
SD_TURBO_MAE_KEYS = (
    "layer4_mean",
    "layer4_std",
    "layer4_mean_2",
    "layer4_std_2",
    "layer4_mean_4",
    "layer4_std_4",
)
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


class LatentMAEFeatures(FeatureEncoder):
    """Latent-MAE features (spec 2.5a) from a checkpoint in the flax export layout.

    Args:
        checkpoint_path: the .pth file (see module docstring).
        keys: feature keys; default the SD-Turbo recipe's six layer-4 keys.
        block_stride: exposes "layer{k}_blk{b}" maps every `block_stride` blocks (0 disables).
        chunk_size: encode at most this many latents at once (bounds activation memory).
    """

    map_pattern = r"conv1|layer\d+(_blk\d+)?"

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
