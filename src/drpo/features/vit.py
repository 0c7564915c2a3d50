"""ViT feature encoders on VAE-decoded images (spec 2.5c, 2.5d): `ViTMAEFeatures` and `DinoFeatures`.

Both share `_ViTImageFeatures`: decode, resize and normalise as the model folder's preprocessor_config.json
says, then read patch and CLS tokens from the ViT's hidden states.
"""

from __future__ import annotations

import json
from abc import abstractmethod
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from drpo.features.base import FeatureEncoder
from drpo.generators import OneStepGenerator

VIT_MAE_KEYS = ("layer12_patch_mean", "layer12_patch_std", "layer12_cls")
DINO_KEYS = tuple(f"layer{n}_{head}" for n in (3, 6, 9, 12) for head in ("patch_mean", "patch_std", "cls"))


def _processor_config(path: Path) -> tuple[Path, dict]:
    """The image processor settings of a model folder: preprocessor_config.json, or the "image_processor" of the
    processor_config.json that transformers 5 writes for a processor (CLIP's). FileNotFoundError naming both."""
    if (path / "preprocessor_config.json").is_file():
        config_path = path / "preprocessor_config.json"
        return config_path, json.loads(config_path.read_text(encoding="utf-8"))
    config_path = path / "processor_config.json"
    if config_path.is_file() and "image_processor" in (cfg := json.loads(config_path.read_text(encoding="utf-8"))):
        return config_path, cfg["image_processor"]
    raise FileNotFoundError(f"model folder {path} has no image processor settings (preprocessor_config.json, or "
                            "processor_config.json with an image_processor)")


def _processor_settings(path: Path) -> tuple[tuple[int, int], list[float], list[float]]:
    """(target (h, w), image_mean, image_std) from a model folder's image processor settings.

    The target is the crop size when the processor center-crops (DINOv2, CLIP), else its size (ViT-MAE).
    """
    config_path, cfg = _processor_config(path)
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
    map_pattern = r"layer\d+_(patch|cls)"
    #: The transformers class of the model folder, imported when an encoder is built (checking a config imports
    #: this module and stays fast).
    model_class_name: str

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
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{type(self).__name__}: model folder {path} lacks config.json")
        self.image_size, mean, std = _processor_settings(path)  # before the model: a wrong folder fails here
        self.generator = generator  # not an nn.Module: the VAE stays out of this encoder's parameters
        self.decode_chunk_size = decode_chunk_size
        import transformers

        model_class = getattr(transformers, self.model_class_name)
        self.model = model_class.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        self.model.eval().requires_grad_(False)
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

    model_class_name = "ViTMAEModel"

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

    @property
    def stochastic(self) -> bool:
        return self.mask_ratio > 0

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

    model_class_name = "Dinov2Model"

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


class CLIPImageFeatures(_ViTImageFeatures):
    """VAE decode + the vision tower of a CLIP model (`CLIPVisionModel` from a local CLIP folder): decoded pixels
    through an image encoder where no DINOv2 is at hand, as in the miniature world, whose CLIP reward folder holds
    one. Keys and maps as DinoFeatures ("layer{L}_patch_mean", "layer{L}_patch_std", "layer{L}_cls"). Deterministic.

    Args:
        generator: one-step generator whose VAE decodes the latents.
        checkpoint_path: a CLIP model folder (config.json, weights, preprocessor_config.json).
        keys: feature keys (no default: the depths depend on the model).
        chunk_size: ViT batch size; decode_chunk_size: VAE batch size.
    """

    model_class_name = "CLIPVisionModel"

    def __init__(
        self,
        generator: OneStepGenerator,
        checkpoint_path: str | Path,
        keys: Sequence[str],
        chunk_size: int | None = None,
        decode_chunk_size: int | None = None,
    ) -> None:
        super().__init__(generator, checkpoint_path, keys, chunk_size, decode_chunk_size)

    def hidden_states(self, pixels: Tensor) -> tuple[Tensor, ...]:
        return self.model(pixel_values=pixels, output_hidden_states=True).hidden_states
