"""The paper's models at their real sizes, built from published configs without any weights.

Every builder takes a ``device``: "meta" gives shape-only modules for FLOP counting (no memory, no data), a real
device gives randomly initialised modules (bf16 on a GPU) for timing. The builders return the package's own
objects (drpo.generators generators, drpo.rewards rewards, drpo.features encoders), so counting and timing run
the code that training runs. Numbers below are copied from each model's published config; the source is named
next to each table. Sizes can be overridden (``overrides``) to get tiny stand-ins with the same code path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, EulerAncestralDiscreteScheduler, UNet2DConditionModel
from torch import Tensor, nn
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    Qwen2VLConfig,
    Qwen2VLModel,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids

from drpo.features.latent_mae import SD_TURBO_MAE_KEYS, LatentMAEEncoder, LatentMAEFeatures
from drpo.generators import OneStepGenerator, SDTurboGenerator, SDXLTurboGenerator
from drpo.lora import add_lora
from drpo.rewards import HPSv3Reward, PickScoreReward, Reward
from drpo.tiny import SD_VAE_SCALING, SDXL_VAE_SCALING, build_clip_tokenizer, turbo_scheduler_config

# Prompt words for the stand-in tokenizers: a FLOP or a millisecond depends on how many tokens there are, not on
# which ids they have, and the real vocabularies are not available offline.
WORDS = ("a", "photo", "of", "cat", "dog", "red", "blue", "sitting", "on", "the", "table", "in", "garden", "at",
         "night", "with", "hat", "painting", "portrait", "landscape")
PROMPT = "a photo of a red cat sitting on the table in the garden at night"
RESOLUTION = 512  # the paper trains and profiles both generators at 512 x 512 (spec 2.2, 6)

# stabilityai/sd-turbo unet/config.json (the SD-2.1 UNet); sample_size 64 = 512 px / VAE factor 8.
SD_TURBO_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],  # diffusers' legacy name: number of heads per block
    "use_linear_projection": True,
    "norm_num_groups": 32,
}
# stabilityai/sdxl-turbo unet/config.json (the SDXL-base UNet): 2816 = 1280 pooled text + 6 time ids x 256.
SDXL_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 2048,
    "attention_head_dim": [5, 10, 20],
    "use_linear_projection": True,
    "norm_num_groups": 32,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
# vae/config.json of sd-turbo (SD-2.x) and sdxl-turbo: the same architecture, different scaling factors.
SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": RESOLUTION,
}
# text_encoder/config.json of sd-turbo: OpenCLIP ViT-H/14 text tower with its last layer dropped (23 of 24).
SD2_TEXT = {"vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
            "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 512}
# sdxl-turbo text_encoder (OpenAI CLIP ViT-L/14 text) and text_encoder_2 (OpenCLIP ViT-bigG/14 text).
SDXL_TEXT = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
             "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
             "projection_dim": 768}
SDXL_TEXT_2 = {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
               "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu",
               "projection_dim": 1280}
# PickScore_v1 = laion/CLIP-ViT-H-14-laion2B-s32B-b79K architecture (config.json): 224 px, patch 14.
CLIP_H_TEXT = {"vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
               "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu"}
CLIP_H_VISION = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16,
                 "image_size": 224, "patch_size": 14, "hidden_act": "gelu"}
CLIP_H_PROJECTION = 1024
# OpenAI CLIP normalisation: PickScore's processor and Qwen2-VL's image processor both use it.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Qwen/Qwen2-VL-7B-Instruct config.json, written out because transformers 5's Qwen2VLConfig defaults to 72B.
QWEN2_VL_7B_TEXT = {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                    "num_attention_heads": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-6,
                    "max_position_embeddings": 32768,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}}
QWEN2_VL_7B_VISION = {"depth": 32, "embed_dim": 1280, "hidden_size": 3584, "num_heads": 16, "mlp_ratio": 4,
                      "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3,
                      "hidden_act": "quick_gelu"}
# HPSv3 (hpsv3 1.0.0, inference.py) resizes every image to min_pixels = max_pixels = 256 * 28 * 28, i.e. 448 x 448
# for a square image: 32 x 32 patches of 14 px, merged 2 x 2 into 256 visual tokens.
HPSV3_MAX_PIXELS = 256 * 28 * 28
# Our estimate of the text tokens around the image (only their number matters here): Qwen2-VL's chat template
# (~25), HPSv3's rating instruction as drpo.rewards.hpsv3.HPSV3_INSTRUCTION has it (2,585 characters, 378 words
# and the "<|Reward|>" suffix: ~500 Qwen2 tokens) and a Pick-a-Pic prompt (~15).
HPSV3_TEXT_TOKENS = 540
# HPSv3's "ranknet" rm_head on the "<|Reward|>" token's last hidden state: 3584 -> 1024 -> 16 -> 2 (mean, std).
HPSV3_HEAD = (1024, 16, 2)
# The Drifting authors' latent MAE ("mae_latent_256", spec 2.5a): we read "256" as the base width, so the four
# ResNet-34-like stages ([3, 4, 6, 3] blocks) are 256, 512, 1024, 2048 wide; "layer4" features are 2048-d.
MAE_LAYERS = (3, 4, 6, 3)
MAE_WIDTHS = (256, 512, 1024, 2048)
LORA_RANK = 16  # spec 2.11: r 16, alpha 16 on to_q, to_k, to_v, to_out.0

_TINY_TEXT = {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "max_position_embeddings": 77, "hidden_act": "gelu", "projection_dim": 32}
# Tiny stand-ins with the same code paths (tests, and scripts/profile_gpu.py --tiny): keyword arguments of
# build_generator / build_hpsv3 / build_pickscore / build_mae.
TINY = {
    "generator": {"overrides": {
        "unet": {**SD_TURBO_UNET, "sample_size": 8, "block_out_channels": [32, 64], "layers_per_block": 1,
                 "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                 "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 32,
                 "attention_head_dim": 2},
        "vae": {**SD_VAE, "block_out_channels": [16, 32], "down_block_types": ["DownEncoderBlock2D"] * 2,
                "up_block_types": ["UpDecoderBlock2D"] * 2, "layers_per_block": 1, "norm_num_groups": 16,
                "sample_size": 16},
        "text": [_TINY_TEXT]}},
    "hpsv3": {"text_tokens": 8, "max_pixels": 56 * 56, "overrides": {
        "text": {"vocab_size": 1000, "bos_token_id": None, "eos_token_id": None, "hidden_size": 64,
                 "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "max_position_embeddings": 512,
                 "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}},
        "vision": {**QWEN2_VL_7B_VISION, "depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2,
                   "mlp_ratio": 2}}},
    "pickscore": {"overrides": {
        "text": {**CLIP_H_TEXT, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                 "num_attention_heads": 2},
        "vision": {**CLIP_H_VISION, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                   "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        "projection": 16}},
    "mae": {"layers": (1, 1, 1, 1), "widths": (8, 8, 16, 16),
            "keys": ("layer4_mean", "layer4_std", "layer2_mean_2", "layer2_std_2")},
}


@contextlib.contextmanager
def _building(device: torch.device | str, dtype: torch.dtype) -> Iterator[None]:
    """Create parameters directly on ``device`` in ``dtype`` (no fp32 copy of a 7B model on the host)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _frozen(module: nn.Module) -> nn.Module:
    return module.eval().requires_grad_(False)


def build_generator(
    kind: str = "sd-turbo",
    *,
    device: torch.device | str = "meta",
    dtype: torch.dtype = torch.float32,
    lora_rank: int = LORA_RANK,
    overrides: dict | None = None,
) -> tuple[OneStepGenerator, list[nn.Parameter]]:
    """SD-Turbo or SDXL-Turbo at their real sizes with LoRA on the UNet; returns (generator, LoRA parameters).

    ``overrides`` replaces whole component configs: {"unet": ..., "vae": ..., "text": [...]} (tiny stand-ins).
    The tokenizer is a stand-in with a small vocabulary (ids are valid for the real embedding tables).
    """
    if kind not in ("sd-turbo", "sdxl-turbo"):
        raise ValueError(f"unknown generator kind {kind!r}; expected 'sd-turbo' or 'sdxl-turbo'")
    sdxl = kind == "sdxl-turbo"
    configs = {"unet": SDXL_UNET if sdxl else SD_TURBO_UNET, "vae": SD_VAE,
               "text": [SDXL_TEXT, SDXL_TEXT_2] if sdxl else [SD2_TEXT]} | (overrides or {})
    tokenizer = build_clip_tokenizer(WORDS, model_max_length=configs["text"][0]["max_position_embeddings"])
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    scaling = SDXL_VAE_SCALING if sdxl else SD_VAE_SCALING
    with _building(device, dtype):
        unet = _frozen(UNet2DConditionModel(**configs["unet"]))
        vae = _frozen(AutoencoderKL(**configs["vae"], scaling_factor=scaling))
        encoders = [_frozen(cls(CLIPTextConfig(**config, **special)))
                    for cls, config in zip((CLIPTextModel, CLIPTextModelWithProjection), configs["text"])]
    params = add_lora(unet, rank=lora_rank, alpha=lora_rank)
    vae_factor = 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
    resolution = configs["unet"]["sample_size"] * vae_factor
    common = {"resolution": resolution, "device": torch.device(device), "dtype": dtype}
    if sdxl:
        scheduler = EulerAncestralDiscreteScheduler(**turbo_scheduler_config())
        return SDXLTurboGenerator(unet, vae, tuple(encoders), (tokenizer, tokenizer), scheduler, **common), params
    scheduler = DDPMScheduler(**turbo_scheduler_config())
    return SDTurboGenerator(unet, vae, encoders[0], tokenizer, scheduler, **common), params


class HPSv3CostModel(HPSv3Reward):
    """HPSv3's computation (Qwen2-VL-7B + its ranknet head) on random weights: a cost model, not a trained scorer.

    drpo.rewards.HPSv3Reward without its files: the same preprocessing (``preprocess``) and batching (``_score``),
    and a forward that also runs on the meta device, whose tensors have no values for the real scorer's tokenizer
    checks and grid look-ups: the vision tower gets its positions from the CPU grid, and ``text_tokens``
    placeholder embeddings stand for the tokenized instruction and prompt (the cost depends on their number only).
    """

    def __init__(self, model: Qwen2VLModel, head: nn.Module, *, text_tokens: int = HPSV3_TEXT_TOKENS,
                 max_pixels: int = HPSV3_MAX_PIXELS, batch_size: int = 1) -> None:
        self.model = model
        self.head = head
        self.text_tokens = text_tokens
        self.max_pixels = self.min_pixels = max_pixels
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        vision = model.config.vision_config
        self.patch, self.merge, self.temporal = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
        self.image_mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        self.image_std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)

    def visual_tokens(self, height: int, width: int) -> int:
        """Visual tokens the language model reads for one image of this size."""
        h, w = smart_resize(height, width, factor=self.patch * self.merge, min_pixels=self.min_pixels,
                            max_pixels=self.max_pixels)
        return (h // self.patch) * (w // self.patch) // self.merge**2

    def _forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        patches, grid = self.preprocess(images.to(self.device))
        n = images.shape[0]
        visual = self.model.visual(
            patches.to(self.model.dtype), grid_thw=grid, cu_seqlens=get_vision_cu_seqlens(grid),
            position_ids=get_vision_position_ids(grid, self.merge).to(self.device),
        ).pooler_output.view(n, -1, self.model.config.text_config.hidden_size)
        ids = torch.zeros(n, self.text_tokens, dtype=torch.long, device=self.device)
        embeds = torch.cat([visual, self.model.get_input_embeddings()(ids)], dim=1)
        positions = torch.arange(embeds.shape[1], device=self.device).expand(3, n, -1)
        hidden = self.model.language_model(inputs_embeds=embeds, position_ids=positions, use_cache=False)
        return self.head(hidden.last_hidden_state[:, -1].float())[:, 0]


def build_hpsv3(
    *,
    device: torch.device | str = "meta",
    dtype: torch.dtype = torch.float32,
    text_tokens: int = HPSV3_TEXT_TOKENS,
    max_pixels: int = HPSV3_MAX_PIXELS,
    batch_size: int = 1,
    overrides: dict | None = None,
) -> HPSv3CostModel:
    """HPSv3 at its real size (Qwen2-VL-7B without the LM head); ``overrides`` = {"text": ..., "vision": ...}."""
    sizes = {"text": QWEN2_VL_7B_TEXT, "vision": QWEN2_VL_7B_VISION} | (overrides or {})
    config = Qwen2VLConfig(text_config=dict(sizes["text"]), vision_config=dict(sizes["vision"]))
    config._attn_implementation = "sdpa"
    config.text_config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    hidden = config.text_config.hidden_size
    widths = (hidden, *HPSV3_HEAD)
    with _building(device, dtype):
        model = _frozen(Qwen2VLModel(config))
    with _building(device, torch.float32):  # the head runs in fp32, as in HPSv3Reward
        layers: list[nn.Module] = []
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        head = _frozen(nn.Sequential(*layers[:-1]))
    return HPSv3CostModel(model, head, text_tokens=text_tokens, max_pixels=max_pixels, batch_size=batch_size)


class PickScoreModel(PickScoreReward):
    """PickScore's scoring code (drpo.rewards.PickScoreReward) on an in-memory CLIPModel instead of a folder."""

    def __init__(self, model: CLIPModel, *, image_size: int, batch_size: int = 32) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.batch_size = batch_size
        self.tokenizer = build_clip_tokenizer(WORDS, model_max_length=model.config.text_config.max_position_embeddings)
        self.max_length = self.tokenizer.model_max_length
        self.crop_size = (image_size, image_size)
        self.short_edge = image_size
        self.image_mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        self.image_std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)

    def _text_embeddings(self, prompts: list[str]) -> Tensor:
        if self.device.type != "meta":
            return super()._text_embeddings(prompts)
        # Meta tensors have no values for transformers to inspect a padding mask; all-ones masks change nothing.
        ids = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt").input_ids
        if ids.shape[0] > 1 and (ids == self.tokenizer.pad_token_id).any():
            raise ValueError("prompts of different token lengths cannot be embedded on the meta device")
        out = self.model.get_text_features(input_ids=ids.to(self.device))
        return F.normalize(out.pooler_output.float(), dim=-1)


def build_pickscore(
    *,
    device: torch.device | str = "meta",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 32,
    overrides: dict | None = None,
) -> PickScoreModel:
    """PickScore at its real size (CLIP ViT-H/14); ``overrides`` = {"text": ..., "vision": ..., "projection": d}."""
    sizes = {"text": CLIP_H_TEXT, "vision": CLIP_H_VISION, "projection": CLIP_H_PROJECTION} | (overrides or {})
    tokenizer = build_clip_tokenizer(WORDS, model_max_length=sizes["text"]["max_position_embeddings"])
    text = dict(sizes["text"], bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    config = CLIPConfig(text_config=text, vision_config=dict(sizes["vision"]), projection_dim=sizes["projection"])
    config._attn_implementation = "sdpa"
    with _building(device, dtype):
        model = _frozen(CLIPModel(config))
    return PickScoreModel(model, image_size=sizes["vision"]["image_size"], batch_size=batch_size)


def build_mae(
    *,
    device: torch.device | str = "meta",
    layers: Sequence[int] = MAE_LAYERS,
    widths: Sequence[int] = MAE_WIDTHS,
    keys: Sequence[str] = SD_TURBO_MAE_KEYS,
    chunk_size: int | None = None,
) -> LatentMAEFeatures:
    """The latent MAE used as DrPO's feature space; always fp32, as the paper runs its extractor."""
    with _building(device, torch.float32):
        encoder = _frozen(LatentMAEEncoder(layers=layers, widths=widths, in_channels=4))
    return LatentMAEFeatures.from_encoder(encoder, keys, chunk_size).eval().requires_grad_(False)


def build_reward(name: str, **kwargs) -> Reward:
    """"hpsv3" or "pickscore" at real size (kwargs as build_hpsv3 / build_pickscore)."""
    builders = {"hpsv3": build_hpsv3, "pickscore": build_pickscore}
    if name not in builders:
        raise ValueError(f"unknown reward {name!r}; expected one of {sorted(builders)}")
    return builders[name](**kwargs)
