"""The miniature's PickScore: a tiny transformers CLIPModel trained contrastively on (render, prompt) pairs.

The model, its CLIPImageProcessor and its CLIP tokenizer are saved together with save_pretrained in one folder,
the layout of PickScore_v1, and read by drpo.rewards.PickScoreReward (cosine of normalised embeddings).
Near misses from render_negative (one attribute wrong) are hard negative images, so that the score ranks a
correct image above an almost-correct one, which is what DrPO's ranking needs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from drpo.miniature.data import max_prompt_tokens, pair_batch, sample_rows, vocabulary, write_provenance
from drpo.rewards import PickScoreReward
from drpo.tiny import build_clip_tokenizer, tiny_text_config
from drpo.world.spec import WorldSpec

# OpenAI CLIP's normalisation, as PickScore_v1's processor has it.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_reward_model(
    spec: WorldSpec, *, hidden: int = 64, text_layers: int = 2, vision_layers: int = 3, patch_size: int = 4
) -> tuple[CLIPModel, CLIPProcessor]:
    """A randomly initialised tiny CLIPModel and its processor for the world's images and prompt vocabulary."""
    tokenizer = build_clip_tokenizer(vocabulary(spec), model_max_length=max_prompt_tokens(spec))
    text = tiny_text_config(tokenizer, hidden_size=hidden, num_layers=text_layers, num_heads=2, projection_dim=hidden)
    vision = {
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": vision_layers,
        "num_attention_heads": 4,
        "image_size": spec.image_size,
        "patch_size": patch_size,
        "projection_dim": hidden,
    }
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=hidden))
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _normalise(images: Tensor) -> Tensor:
    """(N, 3, H, W) in [-1, 1] -> CLIP pixel values (what PickScoreReward.preprocess does at the native size)."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return ((images + 1) / 2 - mean) / std


@torch.no_grad()
def pairwise_accuracy(
    reward: PickScoreReward, rows: Sequence[dict[str, Any]], spec: WorldSpec, *, per_row: int = 4, seed: int = 0
) -> dict[str, float]:
    """How often the reward scores a correct render above a near miss of the same prompt, overall and per corruption."""
    rng = np.random.default_rng(seed)
    rows = [row for row in rows for _ in range(per_row)]
    positives, negatives, kinds = pair_batch(rows, rng, spec)
    prompts = [row["prompt"] for row in rows]
    wins = (reward.score(positives, prompts) > reward.score(negatives, prompts)).numpy()
    result = {"pairwise_accuracy": float(wins.mean())}
    for kind in sorted(set(kinds)):
        result[f"pairwise_accuracy/{kind}"] = float(wins[[k == kind for k in kinds]].mean())
    return result


def gaussian_blur(images: Tensor, sigma: Tensor) -> Tensor:
    """Blur each image (N, C, H, W) with its own Gaussian of standard deviation sigma (N,) pixels (0: unchanged)."""
    radius = max(1, int(torch.ceil(3 * sigma.max()).item()))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (offsets[None] / sigma.clamp_min(1e-6)[:, None]) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (N, 2r + 1); sigma -> 0 gives a delta
    n, c, h, w = images.shape
    x = F.pad(images.reshape(1, n * c, h, w), (radius,) * 4, mode="replicate")
    weight = kernel.repeat_interleave(c, dim=0)
    x = F.conv2d(x, weight.view(n * c, 1, 1, -1), groups=n * c)
    x = F.conv2d(x, weight.view(n * c, 1, -1, 1), groups=n * c)
    return x.view(n, c, h, w)


def train_reward_model(
    spec: WorldSpec,
    rows: Sequence[dict[str, Any]],
    *,
    out_dir: str | Path,
    eval_rows: Sequence[dict[str, Any]] | None = None,
    steps: int = 800,
    batch_size: int = 96,
    lr: float = 1e-3,
    hidden: int = 64,
    vision_layers: int = 3,
    patch_size: int = 4,
    text_layers: int = 2,
    blur: float = 0.0,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, float]:
    """Train the CLIP reward contrastively on renders of `rows` and save model + processor to `out_dir`.

    Each step draws `batch_size` distinct prompts, one render and one near miss each. Loss: text -> image
    cross-entropy over all 2B images (B renders, B near misses) plus image -> text cross-entropy of the
    renders over the B prompts, with CLIP's learnable temperature. The saved folder is reloaded through
    PickScoreReward to measure the pairwise accuracy (render above near miss) on `eval_rows` (default `rows`).
    `hidden`, `vision_layers`, `patch_size` and `text_layers` set the architecture (build_reward_model), so a
    second, independently trained scorer (the miniature's held-out reward) can differ from the target one.
    `blur` > 0 blurs each render and its near miss alike with a Gaussian of standard deviation drawn from
    U(0, blur) pixels, so that the score judges shapes as soft as a generator draws them, not only crisp renders.
    """
    started = time.time()
    arguments = {"spec": spec.to_dict(), "rows": len(rows), "out_dir": str(out_dir), "steps": steps,
                 "batch_size": batch_size, "lr": lr, "hidden": hidden, "vision_layers": vision_layers,
                 "patch_size": patch_size, "text_layers": text_layers, "blur": blur, "seed": seed, "device": device}
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model, processor = build_reward_model(spec, hidden=hidden, text_layers=text_layers,
                                          vision_layers=vision_layers, patch_size=patch_size)
    tokenizer: CLIPTokenizer = processor.tokenizer
    prompts = [row["prompt"] for row in rows]
    tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    tokens = tokens.to(device)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    model.train()
    targets = torch.arange(batch_size, device=device)
    for _ in tqdm(range(steps), desc="train reward", mininterval=30):
        index = sample_rows(rows, batch_size, rng)
        positives, negatives, _ = pair_batch([rows[i] for i in index], rng, spec)
        if blur > 0:
            sigma = torch.from_numpy(rng.uniform(0.0, blur, len(index))).float()
            positives, negatives = gaussian_blur(positives, sigma), gaussian_blur(negatives, sigma)
        text = model.get_text_features(
            input_ids=tokens.input_ids[index], attention_mask=tokens.attention_mask[index]
        ).pooler_output
        pixels = _normalise(torch.cat([positives, negatives])).to(device)
        image = model.get_image_features(pixel_values=pixels).pooler_output
        logits = model.logit_scale.exp() * F.normalize(text, dim=-1) @ F.normalize(image, dim=-1).T  # (B, 2B)
        loss = F.cross_entropy(logits, targets) + F.cross_entropy(logits[:, : len(index)].T, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)  # CLIP's cap: temperature >= 1/100

    out_dir = Path(out_dir)
    model.cpu().eval().save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    reward = PickScoreReward(out_dir)
    metrics = {"final_loss": loss.item(), "logit_scale": model.logit_scale.exp().item()}
    metrics |= pairwise_accuracy(reward, eval_rows if eval_rows is not None else rows, spec, seed=seed + 1)
    write_provenance(out_dir, function="drpo.miniature.reward_model.train_reward_model", arguments=arguments,
                     seed=seed, steps=steps, started=started, metrics=metrics)
    return metrics
