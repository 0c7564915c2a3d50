"""The CLIP-based rewards, which read a local Hugging Face CLIP folder and preprocess images in torch.

CLIPImageReward (the shared image side), PickScoreReward and CLIPScoreReward (cosine of image and text
embeddings) and AestheticReward (the LAION aesthetic MLP on the image embedding, with its head loaders).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from drpo.rewards.base import Reward, as_dtype


class CLIPImageReward(Reward):
    """The image side shared by the CLIP-based rewards: a Hugging Face CLIP folder and torch preprocessing.

    Model (AutoModel, a CLIPModel) and processor (AutoProcessor: image processor + tokenizer) come from ONE
    local folder, as PickScore_v1 is used. Images are preprocessed in torch, so scores are differentiable:
    [-1, 1] -> [0, 1], bicubic antialiased resize of the short side to the processor's size, center crop to its
    crop size, normalisation with its mean/std.

    Args:
        model_path: folder with config.json, weights, preprocessor/processor config and tokenizer files.
        device: where the CLIP model runs; scores are returned on CPU.
        dtype: model dtype (torch dtype or its name, e.g. "float16"); preprocessing and the cosine are fp32.
        batch_size: images per forward pass.
    """

    takes_device = True

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
        self.dtype = as_dtype(dtype)
        self.device = torch.device(device)
        self.batch_size = batch_size
        from transformers import AutoModel, AutoProcessor  # here: checking a config imports this module

        self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True, dtype=self.dtype)
        self.model.to(self.device).eval().requires_grad_(False)

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


class PickScoreReward(CLIPImageReward):
    """PickScore: cosine similarity of L2-normalised CLIP image and text embeddings (no logit scale).

    See CLIPImageReward for loading and preprocessing. Tables report the score x `report_scale`.
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
        super().__init__(model_path, device, dtype, batch_size)
        self.tokenizer = self.processor.tokenizer
        text_config = self.model.config.text_config
        # eos_token_id 2 is the legacy CLIP config value, for which transformers pools at the argmax token id.
        if text_config.eos_token_id not in (2, self.tokenizer.eos_token_id):
            raise ValueError(
                f"reward {self.name!r}: model text_config.eos_token_id={text_config.eos_token_id} differs from the "
                f"tokenizer's eos_token_id={self.tokenizer.eos_token_id} in {model_path}; text embeddings would be "
                "pooled at the wrong token"
            )
        self.max_length = min(self.tokenizer.model_max_length, text_config.max_position_embeddings)

    def _text_embeddings(self, prompts: list[str]) -> Tensor:
        """N prompts -> (N, D) L2-normalised fp32 embeddings."""
        tokens = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        out = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return F.normalize(out.pooler_output.float(), dim=-1)

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


# LAION aesthetic predictor v2 (christophschuhmann/improved-aesthetic-predictor, `sac+logos+ava1-l14-linearMSE.pth`):
# an nn.Sequential stored under the attribute `layers`: Linear(768, 1024), Dropout(0.2), Linear(1024, 128),
# Dropout(0.2), Linear(128, 64), Dropout(0.1), Linear(64, 16), Linear(16, 1). Its ReLUs are commented out in the
# published code, so the head is affine; the Linear layers sit at indices 0, 2, 4, 6, 7 (the dropouts at 1, 3, 5).
AESTHETIC_LINEAR_INDICES = (0, 2, 4, 6, 7)


def aesthetic_mlp(in_features: int = 768) -> nn.Sequential:
    """The LAION aesthetic MLP (its dropouts are inactive in eval mode)."""
    return nn.Sequential(nn.Linear(in_features, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                         nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))


def load_aesthetic_head(path: str | Path, in_features: int) -> nn.Sequential:
    """Load `sac+logos+ava1-l14-linearMSE.pth` (a state dict with keys layers.{0,2,4,6,7}.{weight,bias})."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reward 'aesthetic': no head checkpoint at {path} (sac+logos+ava1-l14-linearMSE.pth)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    expected = {f"layers.{i}.{p}" for i in AESTHETIC_LINEAR_INDICES for p in ("weight", "bias")}
    if not isinstance(state, dict) or set(state) != expected:
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"reward 'aesthetic': {path} is not the LAION aesthetic MLP; expected keys "
                         f"{sorted(expected)}, got {got}")
    if state["layers.0.weight"].shape[1] != in_features:
        raise ValueError(
            f"reward 'aesthetic': the head in {path} takes {state['layers.0.weight'].shape[1]}-d embeddings but the "
            f"CLIP model gives {in_features}-d ones (the predictor needs CLIP ViT-L/14, 768-d)"
        )
    head = aesthetic_mlp(in_features)
    head.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()})
    return head


class AestheticReward(CLIPImageReward):
    """LAION aesthetic score: the aesthetic MLP on the L2-normalised CLIP ViT-L/14 image embedding; raw (~5-7).

    Args:
        model_path: Hugging Face CLIP ViT-L/14 folder (openai/clip-vit-large-patch14 layout).
        head_path: `sac+logos+ava1-l14-linearMSE.pth`.
        device, dtype, batch_size: as CLIPImageReward; the head runs in fp32.
    """

    name = "aesthetic"
    differentiable = True

    def __init__(
        self,
        model_path: str | Path,
        head_path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
        batch_size: int = 32,
    ) -> None:
        super().__init__(model_path, device, dtype, batch_size)
        self.head = load_aesthetic_head(head_path, self.model.config.projection_dim)
        self.head.to(self.device).eval().requires_grad_(False)

    def _score(self, images: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        return torch.cat([self.head(self._image_embeddings(chunk)).squeeze(-1)
                          for chunk in images.split(self.batch_size)])

