"""Builders of tiny, randomly initialised diffusers folders with the exact layout of SD-Turbo / SDXL-Turbo.

Used by the tests and by the miniature world: everything is made locally (tokenizer included), nothing is
downloaded. Model configs are exposed as plain dicts so that trained miniature models share the layout.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from tokenizers import pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from drpo.generators import KINDS

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
SD_VAE_SCALING = 0.18215
SDXL_VAE_SCALING = 0.13025
SDXL_TIME_EMBED_DIM = 8


def add_merges_for_word(symbols: list[str], ranks: dict[tuple[str, str], int], merges: list[tuple[str, str]],
                        vocab: dict[str, int]) -> None:
    """Extend ``merges`` (and ``ranks``, ``vocab``) so that the word ``symbols`` becomes one token. New merges rank
    after all existing ones, so earlier words keep their single-token path."""
    symbols = bpe_merge(symbols, ranks)
    while len(symbols) > 1:
        pair = (symbols[0], symbols[1])
        ranks[pair] = len(merges)
        merges.append(pair)
        vocab.setdefault(pair[0] + pair[1], len(vocab))
        symbols[:2] = [pair[0] + pair[1]]


def bpe_merge(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges the way `tokenizers` does: repeatedly the lowest-rank adjacent pair, leftmost first."""
    symbols = list(symbols)
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), math.inf), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == math.inf:
            break
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def build_clip_tokenizer(
    words: Iterable[str], out_dir: str | Path | None = None, model_max_length: int = 77
) -> CLIPTokenizer:
    """Build a real CLIP byte-level BPE tokenizer in which every given word is a single token.

    Vocabulary (CLIP's order): the 256 byte-level characters, the same with the "</w>" end-of-word suffix, one token
    per merge, then <|startoftext|> and <|endoftext|>. Any other text still tokenizes (character fallback).
    Words are normalised and split exactly as the tokenizer does (lower case; letters, digits and punctuation
    separate), so e.g. "red-ball" contributes the tokens "red", "-" and "ball".
    If `out_dir` is given, saves tokenizer.json and tokenizer_config.json (what transformers 5 writes) plus
    vocab.json and merges.txt (what the original CLIP / SD-Turbo folders ship).
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for token in alphabet + [c + END_OF_WORD for c in alphabet]:
        vocab[token] = len(vocab)
    base = CLIPTokenizer(vocab={**vocab, BOS_TOKEN: len(vocab), EOS_TOKEN: len(vocab) + 1}, merges=[])
    normalizer, splitter = base.backend_tokenizer.normalizer, base.backend_tokenizer.pre_tokenizer

    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        for piece, _ in splitter.pre_tokenize_str(normalizer.normalize_str(word)):
            add_merges_for_word([*piece[:-1], piece[-1] + END_OF_WORD], ranks, merges, vocab)
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)

    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    if out_dir is not None:
        save_clip_tokenizer(tokenizer, out_dir)
    return tokenizer


def save_clip_tokenizer(tokenizer: CLIPTokenizer, out_dir: str | Path) -> Path:
    """Save a CLIP tokenizer with transformers' files plus the classic vocab.json / merges.txt."""
    out_dir = Path(out_dir)
    tokenizer.save_pretrained(out_dir)
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    (out_dir / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    lines = [" ".join(pair) if isinstance(pair, list) else pair for pair in model["merges"]]
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(line + "\n" for line in lines))
    return out_dir


def _groups(channels: Sequence[int]) -> int:
    """Largest GroupNorm group count <= 32 that divides every width."""
    return math.gcd(32, *channels)


def tiny_text_config(
    tokenizer: CLIPTokenizer,
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    projection_dim: int | None = None,
) -> dict:
    """CLIPTextConfig kwargs matched to `tokenizer` (vocab size, special ids, max positions = model_max_length)."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": 4 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "max_position_embeddings": tokenizer.model_max_length,
        "hidden_act": "gelu",
        "projection_dim": projection_dim if projection_dim is not None else hidden_size,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def tiny_vae_config(
    *,
    latent_channels: int = 4,
    block_out_channels: Sequence[int] = (16, 32),
    layers_per_block: int = 1,
    scaling_factor: float = SD_VAE_SCALING,
    latent_size: int = 8,
) -> dict:
    """AutoencoderKL kwargs; the spatial factor is 2 ** (len(block_out_channels) - 1)."""
    n = len(block_out_channels)
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(block_out_channels),
        "layers_per_block": layers_per_block,
        "latent_channels": latent_channels,
        "norm_num_groups": _groups(block_out_channels),
        "sample_size": latent_size * 2 ** (n - 1),
        "scaling_factor": scaling_factor,
    }


def tiny_unet_config(
    *,
    sample_size: int = 8,
    latent_channels: int = 4,
    block_out_channels: Sequence[int] = (32, 64),
    cross_attention_dim: int = 32,
    layers_per_block: int = 1,
    attention_heads: int = 2,
    pooled_dim: int | None = None,
) -> dict:
    """UNet2DConditionModel kwargs with cross-attention (to_q/to_k/to_v/to_out.0) and linear projections (SD-2.x).

    SD layout (cross-attention in all but the last down block) when `pooled_dim` is None; SDXL layout (no
    attention in the first block, "text_time" added conditioning from pooled text embeds + 6 time ids) otherwise.
    """
    n = len(block_out_channels)
    if pooled_dim is None:
        down = ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"]
        extra = {}
    else:
        down = ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (n - 1)
        extra = {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": SDXL_TIME_EMBED_DIM,
            "projection_class_embeddings_input_dim": 6 * SDXL_TIME_EMBED_DIM + pooled_dim,
        }
    up = [block.replace("Down", "Up") for block in reversed(down)]
    return {
        "sample_size": sample_size,
        "in_channels": latent_channels,
        "out_channels": latent_channels,
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": list(block_out_channels),
        "layers_per_block": layers_per_block,
        "norm_num_groups": _groups(block_out_channels),
        "cross_attention_dim": cross_attention_dim,
        # diffusers' legacy name: this is the number of heads, not the head width.
        "attention_head_dim": attention_heads,
        "use_linear_projection": True,
        **extra,
    }


def turbo_scheduler_config() -> dict:
    """The noise schedule SD-Turbo and SDXL-Turbo ship: SD-2.x scaled-linear betas, epsilon, trailing spacing."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "timestep_spacing": "trailing",
        "steps_offset": 1,
    }


def write_pipeline_folder(
    out_dir: str | Path,
    *,
    kind: str,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    scheduler: SchedulerMixin,
    text_encoder_2: CLIPTextModelWithProjection | None = None,
    tokenizer_2: CLIPTokenizer | None = None,
) -> Path:
    """Save already-built components as a diffusers folder (model_index.json + one subfolder each, safetensors).

    kind "sd-turbo" writes a StableDiffusionPipeline folder; "sdxl-turbo" a StableDiffusionXLPipeline folder and
    needs `text_encoder_2` (CLIPTextModelWithProjection) and `tokenizer_2`.
    """
    if kind == "sd-turbo":
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        tokenizer_dirs = ["tokenizer"]
    elif kind == "sdxl-turbo":
        if text_encoder_2 is None or tokenizer_2 is None:
            raise ValueError("kind 'sdxl-turbo' needs text_encoder_2 and tokenizer_2")
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            add_watermarker=False,
        )
        tokenizer_dirs = ["tokenizer", "tokenizer_2"]
    else:
        raise ValueError(f"unknown generator kind {kind!r}; expected one of {KINDS}")
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    for name in tokenizer_dirs:
        save_clip_tokenizer(getattr(pipe, name), out_dir / name)
    return out_dir


def write_tiny_sd_turbo(
    out_dir: str | Path,
    *,
    words: Iterable[str],
    sample_size: int = 8,
    latent_channels: int = 4,
    block_out_channels: Sequence[int] = (32, 64),
    text_hidden: int = 32,
    model_max_length: int = 77,
    vae_config: dict | None = None,
    text_config: dict | None = None,
    seed: int = 0,
) -> Path:
    """Write a randomly initialised SD-Turbo-layout folder (StableDiffusionPipeline) and return its path.

    The UNet cross-attends to the text encoder's last hidden state, so its cross_attention_dim is the text
    hidden size (`text_hidden`, or `text_config["hidden_size"]`). VAE scaling 0.18215 unless `vae_config` says
    otherwise; scheduler: EulerDiscreteScheduler with the SD-Turbo config. The global RNG is left untouched.
    """
    tokenizer = build_clip_tokenizer(words, model_max_length=model_max_length)
    text_config = text_config or tiny_text_config(tokenizer, hidden_size=text_hidden)
    vae_config = vae_config or tiny_vae_config(latent_channels=latent_channels, latent_size=sample_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
        vae = AutoencoderKL(**vae_config)
        unet = UNet2DConditionModel(
            **tiny_unet_config(
                sample_size=sample_size,
                latent_channels=latent_channels,
                block_out_channels=block_out_channels,
                cross_attention_dim=text_config["hidden_size"],
            )
        )
    return write_pipeline_folder(
        out_dir,
        kind="sd-turbo",
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=EulerDiscreteScheduler(**turbo_scheduler_config()),
    )


def write_tiny_sdxl_turbo(
    out_dir: str | Path,
    *,
    words: Iterable[str],
    sample_size: int = 8,
    latent_channels: int = 4,
    block_out_channels: Sequence[int] = (32, 64),
    text_hidden: tuple[int, int] = (32, 32),
    projection_dim: int = 32,
    model_max_length: int = 77,
    vae_config: dict | None = None,
    seed: int = 0,
) -> Path:
    """Write a randomly initialised SDXL-Turbo-layout folder (StableDiffusionXLPipeline) and return its path.

    Two text encoders (CLIPTextModel with `text_hidden[0]`, CLIPTextModelWithProjection with `text_hidden[1]` and
    `projection_dim`) sharing one vocabulary; UNet cross_attention_dim = sum(text_hidden), "text_time" added
    conditioning; VAE scaling 0.13025; EulerAncestralDiscreteScheduler with trailing spacing.
    """
    words = list(words)
    tokenizer = build_clip_tokenizer(words, model_max_length=model_max_length)
    tokenizer_2 = build_clip_tokenizer(words, model_max_length=model_max_length)
    vae_config = vae_config or tiny_vae_config(
        latent_channels=latent_channels, scaling_factor=SDXL_VAE_SCALING, latent_size=sample_size
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_text_config(tokenizer, hidden_size=text_hidden[0])))
        text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig(**tiny_text_config(tokenizer_2, hidden_size=text_hidden[1], projection_dim=projection_dim))
        )
        vae = AutoencoderKL(**vae_config)
        unet = UNet2DConditionModel(
            **tiny_unet_config(
                sample_size=sample_size,
                latent_channels=latent_channels,
                block_out_channels=block_out_channels,
                cross_attention_dim=sum(text_hidden),
                pooled_dim=projection_dim,
            )
        )
    return write_pipeline_folder(
        out_dir,
        kind="sdxl-turbo",
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=EulerAncestralDiscreteScheduler(**turbo_scheduler_config()),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )


def write_tiny_clip(out_dir: str | Path, *, words: Iterable[str], image_size: int = 32, hidden: int = 32,
                    projection_dim: int = 16, patch_size: int = 8, layers: int = 1,
                    model_max_length: int = 16, seed: int = 0) -> Path:
    """A random CLIPModel + CLIPProcessor saved in one folder, the layout PickScore_v1 has."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(words, model_max_length=model_max_length)
    text_config = tiny_text_config(tokenizer, hidden_size=hidden, num_layers=layers, projection_dim=projection_dim)
    vision_config = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=2, image_size=image_size, patch_size=patch_size)
    model = CLIPModel(CLIPConfig(text_config=text_config, vision_config=vision_config,
                                 projection_dim=projection_dim))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size=image_size, crop_size=image_size),
                              tokenizer=tokenizer)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
