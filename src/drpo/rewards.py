"""Rewards: images (N, 3, H, W) in [-1, 1] + prompts -> scores (N,), behind one interface and a registry.

DrPO only ranks candidates, so a reward may be large, black-box or non-differentiable. Every reward is a
`Reward`: it validates its inputs, runs under `torch.no_grad` unless `with_grad=True` is asked of a
differentiable reward, and refuses to return NaN/inf (a NaN must never be silently ranked). Scores are raw;
tables apply `report_scale` (PickScore, CLIP score and HPSv2 x 100, ImageReward x 10) in the evaluation code.
Every model is loaded from local files only; nothing is downloaded.

Registry (`REWARDS`, `build_reward(name, **kwargs)`):

    name           where it runs                      constructor arguments (besides device, dtype, batch_size)
    pickscore      in process, HF CLIP folder         model_path
    clip           in process, HF CLIP folder         model_path (CLIP ViT-L/14)
    aesthetic      in process, HF CLIP folder + MLP   model_path (CLIP ViT-L/14), head_path (.pth)
    hpsv3          in process, Qwen2-VL folder        model_path (Qwen2-VL-7B-Instruct), checkpoint_path
    geneval_lite   in process, procedural detector   spec (drpo.world WorldSpec or its dict); needs metadata
    worker         any command (drpo.reward_worker)   command, cwd, env, timeouts
    imagereward, hpsv2, geneval, hpsv3_official       black-box workers in their own environments (envs/*.yaml),
                                                      see drpo.reward_worker

Config shape (`build_reward_from_config`), a single reward or a weighted ensemble (spec 2.4):

    {"name": "pickscore", "path": "models/PickScore_v1", "device": "cuda"}     # "path" means model_path
    {"ensemble": {
        "pickscore": {"weight": 0.5, "path": "models/PickScore_v1"},
        "aesthetic": {"weight": 0.5, "path": "models/CLIP-ViT-L-14", "head_path": "models/Aesthetic/...pth"},
        "ir": {"name": "imagereward", "weight": 1.0, "python": "envs/.imagereward/bin/python", ...}}}

Every other key is passed to the reward's constructor. An ensemble member's key is its registry name unless the
member sets "name" (so one registry entry can appear twice under two keys).

Adding a reward is one subclass and one registry line:

    class MyReward(Reward):
        name = "mine"
        differentiable = False

        def __init__(self, model_path: str, device: str = "cpu") -> None:
            self.model = load_my_model(model_path, device)          # local files only

        def _score(self, images, prompts, metadata):
            return self.model((images + 1) / 2).flatten()            # (N,)

    REWARDS["mine"] = MyReward
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn
from transformers import AutoImageProcessor, AutoModel, AutoProcessor, AutoTokenizer, Qwen2VLModel
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from drpo.ranking import ensemble_scores
from drpo.world.detect import judge
from drpo.world.prompts import validate_row
from drpo.world.spec import WorldSpec


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


class Reward(ABC):
    """A reward model. Subclasses set `name`, `differentiable` and implement `_score`.

    `requires_metadata`: the reward needs one metadata dict per image (per prompt in `score_groups`).
    """

    name: str = "reward"
    differentiable: bool = False
    report_scale: float = 1.0
    requires_metadata: bool = False

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
        pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return pixels.permute(0, 2, 3, 1).cpu().numpy()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


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
        self.dtype = _dtype(dtype)
        self.device = torch.device(device)
        self.batch_size = batch_size
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


# HPSv3 (MizzenAI/HPSv3, package hpsv3 1.0.0): Qwen2-VL-7B-Instruct fine-tuned as a reward model. The image and a
# rating instruction go through the chat template; a special token "<|Reward|>" is added to the tokenizer (the
# embedding table is resized to the tokenizer's length) and the head reads the language model's last hidden state
# at that token. Images are resized so that min_pixels = max_pixels = 256 * 28 * 28 (448 x 448 for a square).
# Position ids are sequential for every token (HPSv3 calls the language model without Qwen2-VL's 3-D mRoPE image
# positions), which is what transformers' Qwen2VLTextModel does when it gets no position ids.
HPSV3_REWARD_TOKEN = "<|Reward|>"
HPSV3_MAX_PIXELS = 256 * 28 * 28
# The rating instruction of hpsv3/dataset/data_collator_qwen.py (INSTRUCTION + prompt_with_special_token), with its
# exact whitespace: every character is a token the model was trained on.
HPSV3_INSTRUCTION = (
    "\nYou are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a "
    "overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst "
    "and 10 being the best. \n"
    "\n"
    "**Visual Quality:**  \n"
    "Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:\n"
    "- **Reasonableness:** The image should not contain any significant biological or logical errors, such as "
    "abnormal body structures or nonsensical environmental setups.\n"
    "- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to "
    "interpret, with no blurring or indistinct areas.\n"
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual "
    "elements (e.g., hair, clothing, shadows).\n"
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, "
    "composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of "
    "harmony and balance.\n"
    "- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or "
    "adult material. If such content is present, the image quality and satisfaction score should be the lowest "
    "possible. \n"
    "\n"
    "**Text Alignment:**  \n"
    "Assess how well the image matches the textual prompt across the following sub-dimensions:\n"
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) "
    "align with the textual description. The subject should match the description in terms of number, appearance, "
    "and behavior.\n"
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the "
    "image adheres to this style.\n"
    "- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image "
    "logically fit the scenario described in the prompt. The environment should support and enhance the subject "
    "without contradictions.\n"
    "- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, "
    "accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be "
    "acceptable, but critical attributes should be preserved.\n"
    "- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the "
    "image. The generated content should not introduce elements that conflict with or distort the original "
    "description.\n"
    "Textual prompt - {prompt}\n"
    "\n"
    "\n"
    "\n"
    "Please provide the overall ratings of this image: <|Reward|>\n"
    "\n"
    "END\n"
)
# rm_head layouts of hpsv3's Qwen2VLRewardModelBT: "ranknet" without kwargs (HPSv3_7B.yaml) is
# Sequential(Linear(hidden, 1024), ReLU, Dropout(0.05), Linear(1024, 16), ReLU, Linear(16, 2)): Linear layers at
# 0, 3, 5; "default" is one bias-free Linear(hidden, output_dim).
HPSV3_RANKNET_KEYS = frozenset(f"{i}.{p}" for i in (0, 3, 5) for p in ("weight", "bias"))


def hpsv3_checkpoint_key(key: str) -> tuple[str, str]:
    """A key of HPSv3.safetensors -> ("model" | "head" | "skip", key in Qwen2VLModel or in the head).

    HPSv3.safetensors was saved with transformers 4.45 (`visual.*`, `model.*` for the language model, `lm_head.*`,
    `rm_head.*`); newer transformers nest both under `model.` (`model.visual.*`, `model.language_model.*`). Both
    layouts are accepted. The LM head is not needed to score and is skipped.
    """
    if key.startswith("rm_head."):
        return "head", key.removeprefix("rm_head.")
    if key.startswith("lm_head."):
        return "skip", key
    for old, new in (("model.visual.", "visual."), ("model.language_model.", "language_model."),
                     ("visual.", "visual."), ("model.", "language_model.")):
        if key.startswith(old):
            return "model", new + key.removeprefix(old)
    return "model", key


def _hpsv3_head(state: dict[str, Tensor], path: Path) -> nn.Module:
    if set(state) == {"weight"}:
        head: nn.Module = nn.Linear(state["weight"].shape[1], state["weight"].shape[0], bias=False)
    elif set(state) == HPSV3_RANKNET_KEYS:
        (h1, d), (h2, _), (out, _) = (state[f"{i}.weight"].shape for i in (0, 3, 5))
        head = nn.Sequential(nn.Linear(d, h1), nn.ReLU(), nn.Dropout(0.05), nn.Linear(h1, h2), nn.ReLU(),
                             nn.Linear(h2, out))
    else:
        raise ValueError(f"reward 'hpsv3': unknown rm_head layout in {path}: keys {sorted(state)}")
    head.load_state_dict(state)
    return head


def load_hpsv3_weights(model: Qwen2VLModel, path: str | Path) -> nn.Module:
    """Copy HPSv3.safetensors into `model` (strict: every model tensor, no unknown key); return the fp32 head.

    The embedding table is first resized to the checkpoint's rows (the base vocabulary + "<|Reward|>"). Tensors
    are read one at a time, so the 16 GB checkpoint is never held in memory twice.
    """
    path = Path(path)
    with safe_open(path, framework="pt") as f:
        targets = {key: hpsv3_checkpoint_key(key) for key in f.keys()}
        embed = [key for key, (_, name) in targets.items() if name == "language_model.embed_tokens.weight"]
        if embed:
            rows = f.get_slice(embed[0]).get_shape()[0]
            if rows != model.get_input_embeddings().weight.shape[0]:
                model.resize_token_embeddings(rows)
        own = model.state_dict()
        head_state, loaded, unexpected = {}, set(), []
        for key, (kind, name) in targets.items():
            if kind == "skip":
                continue
            if kind == "head":
                head_state[name] = f.get_tensor(key).float()
            elif name in own:
                tensor = f.get_tensor(key)
                if tensor.shape != own[name].shape:
                    raise ValueError(
                        f"reward 'hpsv3': {key} in {path} has shape {tuple(tensor.shape)} but the Qwen2-VL model "
                        f"expects {tuple(own[name].shape)}; is the model folder Qwen2-VL-7B-Instruct (HPSv3 is 7B)?"
                    )
                with torch.no_grad():
                    own[name].copy_(tensor)
                loaded.add(name)
            else:
                unexpected.append(key)
    missing = sorted(set(own) - loaded)
    if unexpected or missing or not head_state:
        raise ValueError(
            f"reward 'hpsv3': {path} does not match the Qwen2-VL model: {len(missing)} model tensors missing "
            f"{missing[:5]}, {len(unexpected)} unknown keys {unexpected[:5]}, reward head "
            f"{'found' if head_state else 'missing (no rm_head.* keys)'}"
        )
    return _hpsv3_head(head_state, path)


def _chat_template(path: Path, tokenizer) -> str:
    """The processor's chat template (what HPSv3 renders with), else the tokenizer's."""
    if (path / "chat_template.json").is_file():
        return json.loads((path / "chat_template.json").read_text())["chat_template"]
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if tokenizer.chat_template:
        return tokenizer.chat_template
    raise FileNotFoundError(f"reward 'hpsv3': no chat template in {path} (chat_template.json or tokenizer_config.json)")


class HPSv3Reward(Reward):
    """HPSv3: Qwen2-VL-7B-Instruct + the HPSv3 reward head; score = the predicted preference mean (raw, ~5-10).

    Differentiable: the image goes through Qwen2-VL's preprocessing in torch (resize to the `smart_resize` size
    with min_pixels = max_pixels, bicubic with antialiasing like PIL's, normalisation, 14 x 14 patches repeated
    over the temporal patch of 2), so reward-gradient baselines can backpropagate into the image.

    Args:
        model_path: local Qwen/Qwen2-VL-7B-Instruct folder (config, tokenizer, preprocessor config, chat template;
            its weights are loaded, then replaced by the checkpoint's).
        checkpoint_path: HPSv3.safetensors (the fine-tuned Qwen2-VL and `rm_head`).
        device: where the model runs; scores are returned on CPU.
        dtype: model dtype (HPSv3 runs in bfloat16); the head and the score are fp32.
        batch_size: images per forward pass.
        max_pixels, min_pixels: processed image area (HPSv3: both 256 * 28 * 28; min_pixels None = max_pixels).
        instruction: the text around the prompt ("{prompt}" is replaced); must contain the reward token once.
    """

    name = "hpsv3"
    differentiable = True

    def __init__(
        self,
        model_path: str | Path,
        checkpoint_path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.bfloat16,
        batch_size: int = 4,
        max_pixels: int = HPSV3_MAX_PIXELS,
        min_pixels: int | None = None,
        instruction: str = HPSV3_INSTRUCTION,
    ) -> None:
        path, checkpoint = Path(model_path), Path(checkpoint_path)
        missing = [str(p) for p in (path / "config.json", checkpoint) if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"reward {self.name!r}: missing local files {missing} (model_path = the "
                                    "Qwen2-VL-7B-Instruct folder, checkpoint_path = HPSv3.safetensors)")
        if instruction.count(HPSV3_REWARD_TOKEN) != 1 or "{prompt}" not in instruction:
            raise ValueError(
                f"reward {self.name!r}: instruction must contain '{{prompt}}' and {HPSV3_REWARD_TOKEN} once"
            )
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.instruction = instruction
        self.max_pixels = max_pixels
        self.min_pixels = max_pixels if min_pixels is None else min_pixels

        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token_id is None:
            raise ValueError(f"reward {self.name!r}: the tokenizer in {path} has no pad token")
        self.tokenizer.add_special_tokens({"additional_special_tokens": [HPSV3_REWARD_TOKEN]})
        self.reward_token_id = self.tokenizer.convert_tokens_to_ids(HPSV3_REWARD_TOKEN)
        self.chat_template = _chat_template(path, self.tokenizer)

        self.model = Qwen2VLModel.from_pretrained(path, local_files_only=True, dtype=_dtype(dtype))
        self.head = load_hpsv3_weights(self.model, checkpoint)
        self.model.to(self.device).eval().requires_grad_(False)
        self.head.to(self.device).eval().requires_grad_(False)

        config = self.model.config
        hidden = config.text_config.hidden_size
        head_in = next(m for m in self.head.modules() if isinstance(m, nn.Linear)).in_features
        if head_in != hidden:
            raise ValueError(f"reward {self.name!r}: the head in {checkpoint} reads {head_in}-d states but the model "
                             f"in {path} has hidden size {hidden} (HPSv3 needs Qwen2-VL-7B, hidden size 3584)")
        if self.reward_token_id >= self.model.get_input_embeddings().weight.shape[0]:
            raise ValueError(f"reward {self.name!r}: token {HPSV3_REWARD_TOKEN} has id {self.reward_token_id}, beyond "
                             f"the checkpoint's embedding table; tokenizer and checkpoint do not belong together")
        self.image_token_id = config.image_token_id
        self.image_token = self.tokenizer.convert_ids_to_tokens(self.image_token_id)

        vision = config.vision_config
        self.patch, self.merge, self.temporal = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
        ip = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        if (ip.patch_size, ip.merge_size, ip.temporal_patch_size) != (self.patch, self.merge, self.temporal):
            raise ValueError(
                f"reward {self.name!r}: image processor and vision config disagree on patch sizes in {path}"
            )
        self.image_mean = torch.tensor(ip.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.image_std = torch.tensor(ip.image_std, dtype=torch.float32).view(1, 3, 1, 1)

    def preprocess(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(n, 3, H, W) in [-1, 1] -> patches (n * gh * gw, 3 * temporal * patch^2) fp32 and grid_thw (n, 3)."""
        n, c, height, width = images.shape
        h, w = smart_resize(height, width, factor=self.patch * self.merge, min_pixels=self.min_pixels,
                            max_pixels=self.max_pixels)
        x = ((images.float() + 1) / 2).clamp(0, 1)
        if (h, w) != (height, width):
            # clamp: PIL clips the bicubic overshoot to the uint8 range
            x = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        x = (x - self.image_mean.to(x.device)) / self.image_std.to(x.device)
        p, m, t = self.patch, self.merge, self.temporal
        gh, gw = h // p, w // p
        # Qwen2-VL's patch order: 2 x 2 merge blocks row-major, then per patch (channel, time, row, column).
        x = x.reshape(n, c, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
        x = x.unsqueeze(6).expand(n, gh // m, gw // m, m, m, c, t, p, p)
        grid = torch.tensor([[1, gh, gw]] * n)
        return x.reshape(n * gh * gw, c * t * p * p), grid

    def tokenize(self, prompts: list[str], image_tokens: int) -> tuple[Tensor, Tensor]:
        """Chat-formatted prompts with `image_tokens` image placeholders each -> (input_ids, attention_mask)."""
        texts = []
        for prompt in prompts:
            content = [{"type": "image"}, {"type": "text", "text": self.instruction.replace("{prompt}", prompt)}]
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                      add_generation_prompt=True, chat_template=self.chat_template)
            texts.append(text.replace(self.image_token, self.image_token * image_tokens))
        tokens = self.tokenizer(texts, padding=True, return_tensors="pt")
        return tokens["input_ids"], tokens["attention_mask"]

    def _forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        patches, grid = self.preprocess(images.to(self.device))
        per_image = int(grid[0].prod()) // self.merge**2
        ids, mask = (t.to(self.device) for t in self.tokenize(prompts, per_image))
        if not ((ids == self.image_token_id).sum(1) == per_image).all() or not (
            (ids == self.reward_token_id).sum(1) == 1
        ).all():
            raise ValueError(f"reward {self.name!r}: a prompt contains the image or reward token itself: {prompts}")
        visual = self.model.visual(patches.to(self.model.dtype), grid_thw=grid.to(self.device)).pooler_output
        embeds = self.model.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter((ids == self.image_token_id)[..., None], visual.to(embeds.dtype))
        hidden = self.model.language_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
        return self.head(hidden[ids == self.reward_token_id].float())[:, 0]

    def _score(self, images: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        return torch.cat([self._forward(images[i : i + self.batch_size], prompts[i : i + self.batch_size])
                          for i in range(0, images.shape[0], self.batch_size)])


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
        self.requires_metadata = any(r.requires_metadata for r in rewards.values())

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
    "aesthetic": AestheticReward,
    "hpsv3": HPSv3Reward,
    "geneval_lite": GenEvalLiteReward,
    # "worker", "imagereward", "hpsv2", "geneval", "hpsv3_official": registered by drpo.reward_worker (below)
}


def build_reward(name: str, **kwargs: Any) -> Reward:
    """Instantiate the reward registered as `name` with `kwargs`; ValueError for unknown names."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; valid names: {sorted(REWARDS)}")
    return REWARDS[name](**kwargs)


def _build_member(spec: dict[str, Any], where: str) -> Reward:
    if not isinstance(spec.get("name"), str):
        raise ValueError(f"{where}: needs a 'name' (one of {sorted(REWARDS)}), got {spec}")
    # path: null (a config merged over one that names a model folder) means the reward has no model folder.
    kwargs = {k: v for k, v in spec.items() if k != "name" and not (k == "path" and v is None)}
    if "path" in kwargs:
        if "model_path" in kwargs:
            raise ValueError(f"{where}: give 'path' or 'model_path', not both")
        kwargs["model_path"] = kwargs.pop("path")
    return build_reward(spec["name"], **kwargs)


def build_reward_from_config(spec: dict[str, Any]) -> Reward:
    """A reward, or a weighted ensemble, from its config mapping (shape in the module docstring)."""
    if not isinstance(spec, dict):
        raise ValueError(f"reward config must be a mapping, got {type(spec).__name__}")
    if "ensemble" not in spec:
        return _build_member(spec, "reward config")
    if set(spec) != {"ensemble"} or not isinstance(spec["ensemble"], dict) or not spec["ensemble"]:
        raise ValueError(f"reward config: an ensemble is {{'ensemble': {{key: {{'weight': w, ...}}, ...}}}} and "
                         f"nothing else, got {spec}")
    rewards, weights = {}, {}
    for key, member in spec["ensemble"].items():
        where = f"reward config: ensemble member {key!r}"
        if not isinstance(member, dict) or not isinstance(member.get("weight"), (int, float)):
            raise ValueError(f"{where}: needs a numeric 'weight', got {member}")
        weights[key] = float(member["weight"])
        rewards[key] = _build_member({"name": key} | {k: v for k, v in member.items() if k != "weight"}, where)
    return EnsembleReward(rewards, weights)


import drpo.reward_worker  # noqa: E402,F401  (registers the worker rewards; it needs Reward and REWARDS above)
