"""Rewards: PickScore on a tiny real CLIP folder, the Reward contract, ensembles, registry."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor

from drpo.rewards import (
    REWARDS,
    CLIPScoreReward,
    EnsembleReward,
    PickScoreReward,
    Reward,
    build_reward,
)
from drpo.tiny import write_tiny_clip

WORDS = ["a", "red", "blue", "green", "circle", "square", "triangle"]
PROMPTS = ["a red circle", "a blue square", "a green triangle", "a red square"]


def _write_tiny_clip(out_dir: Path, eos_token_id: int | None = None) -> Path:
    write_tiny_clip(out_dir, words=WORDS)
    if eos_token_id is not None:
        config = json.loads((out_dir / "config.json").read_text())
        config["text_config"]["eos_token_id"] = eos_token_id
        (out_dir / "config.json").write_text(json.dumps(config))
    return out_dir


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return _write_tiny_clip(tmp_path_factory.mktemp("pickscore"))


@pytest.fixture(scope="module")
def pickscore(clip_dir) -> PickScoreReward:
    return PickScoreReward(clip_dir, batch_size=3)


def _uint8_images(n: int, seed: int = 0, size: int = 32) -> tuple[np.ndarray, torch.Tensor]:
    """Random uint8 images (n, H, W, 3) and the same images as tensors (n, 3, H, W) in [-1, 1], exactly."""
    pixels = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    return pixels, images


class MeanBrightness(Reward):
    """A small non-differentiable reward: mean pixel value."""

    name = "brightness"

    def _score(self, images, prompts, metadata):
        return images.mean(dim=(1, 2, 3))


def test_preprocess_matches_clip_image_processor(pickscore):
    pixels, images = _uint8_images(2)
    ref = CLIPImageProcessor(size=32, crop_size=32)([Image.fromarray(p) for p in pixels], return_tensors="pt")
    torch.testing.assert_close(pickscore.preprocess(images), ref["pixel_values"], rtol=1e-5, atol=1e-5)


def test_preprocess_resizes_short_side_and_center_crops(pickscore):
    images = torch.rand(2, 3, 48, 96) * 2 - 1
    images.requires_grad_()
    out = pickscore.preprocess(images)
    assert out.shape == (2, 3, 32, 32)
    out.sum().backward()
    assert images.grad[..., :, :20].abs().sum() == 0  # left of the 64-wide crop of the 32x64 resize
    assert images.grad[..., :, 30:66].abs().sum() > 0


def test_score_is_clip_cosine_without_logit_scale(clip_dir, pickscore):
    pixels, images = _uint8_images(4, seed=1)
    scores = pickscore.score(images, PROMPTS)
    assert scores.shape == (4,) and scores.dtype == torch.float32 and scores.device.type == "cpu"
    assert (scores.abs() <= 1 + 1e-6).all()
    assert scores.std() > 0

    # Reference: Hugging Face processor on PIL images + CLIPModel logits, divided by the logit scale.
    model = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(clip_dir, local_files_only=True)
    inputs = processor(text=PROMPTS, images=[Image.fromarray(p) for p in pixels], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
    torch.testing.assert_close(scores, logits.diagonal() / model.logit_scale.exp(), rtol=1e-4, atol=1e-5)


def test_permutation_invariance(pickscore):
    _, images = _uint8_images(4, seed=2)
    scores = pickscore.score(images, PROMPTS)
    perm = torch.tensor([2, 0, 3, 1])
    permuted = pickscore.score(images[perm], [PROMPTS[i] for i in perm])
    torch.testing.assert_close(permuted, scores[perm], rtol=1e-5, atol=1e-6)


def test_differentiable_path(pickscore):
    _, images = _uint8_images(2, seed=3)
    images.requires_grad_()
    assert not pickscore.score(images, PROMPTS[:2]).requires_grad  # no_grad by default
    scores = pickscore.score(images, PROMPTS[:2], with_grad=True)
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in pickscore.model.parameters())


def test_nan_guard_names_reward_and_index(pickscore):
    _, images = _uint8_images(3, seed=4)
    images[1, 0, 5, 5] = float("nan")
    with pytest.raises(RuntimeError, match=r"'pickscore'.*non-finite scores at indices \[\[1\]\]"):
        pickscore.score(images, PROMPTS[:3])


def test_input_validation(pickscore):
    _, images = _uint8_images(3, seed=5)
    with pytest.raises(ValueError, match="got 3 images but 2 prompts"):
        pickscore.score(images, PROMPTS[:2])
    with pytest.raises(ValueError, match="got 3 images but a single string"):
        pickscore.score(images, "a red circle")
    with pytest.raises(ValueError, match="3 images but 1 metadata"):
        pickscore.score(images, PROMPTS[:3], metadata=[{}])
    with pytest.raises(ValueError, match=r"expects images \(N, 3, H, W\)"):
        pickscore.score(images[0], PROMPTS[:3])
    with pytest.raises(ValueError, match="'brightness' is not differentiable"):
        MeanBrightness().score(images, PROMPTS[:3], with_grad=True)


def test_score_groups_matches_flat_scores(pickscore):
    _, images = _uint8_images(6, seed=6)
    grouped = pickscore.score_groups(images.view(2, 3, 3, 32, 32), PROMPTS[:2])
    flat = pickscore.score(images, [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3)
    assert grouped.shape == (2, 3)
    torch.testing.assert_close(grouped.flatten(), flat, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="got 2 prompt groups but 3 prompts"):
        pickscore.score_groups(images.view(2, 3, 3, 32, 32), PROMPTS[:3])


def _zscore(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(-1, keepdim=True)) / (x.std(-1, correction=0, keepdim=True) + 1e-6)


def test_ensemble_zscores_within_groups(pickscore):
    _, images = _uint8_images(6, seed=7)
    groups = images.view(2, 3, 3, 32, 32)
    prompts = PROMPTS[:2]
    bright = MeanBrightness()
    ensemble = EnsembleReward({"pickscore": pickscore, "brightness": bright}, {"pickscore": 3.0, "brightness": 1.0})
    got = ensemble.score_groups(groups, prompts)
    ps, br = pickscore.score_groups(groups, prompts), bright.score_groups(groups, prompts)
    torch.testing.assert_close(got, 0.75 * _zscore(ps) + 0.25 * _zscore(br), rtol=1e-4, atol=1e-5)

    # Flat scoring groups images by prompt string, whatever their order.
    order = torch.tensor([3, 0, 4, 1, 5, 2])
    flat = ensemble.score(images[order], [prompts[int(i) // 3] for i in order])
    torch.testing.assert_close(flat, got.flatten()[order], rtol=1e-4, atol=1e-5)

    assert not ensemble.differentiable
    with pytest.raises(ValueError, match="'ensemble' is not differentiable"):
        ensemble.score_groups(groups, prompts, with_grad=True)
    with pytest.raises(ValueError, match="must match"):
        EnsembleReward({"pickscore": pickscore}, {"clip": 1.0})


def test_registry_and_loading_errors(clip_dir, tmp_path):
    assert set(REWARDS) >= {"pickscore", "clip"}
    clip = build_reward("clip", model_path=clip_dir)
    assert isinstance(clip, CLIPScoreReward) and clip.name == "clip" and clip.report_scale == 100.0
    assert PickScoreReward.report_scale == 100.0
    with pytest.raises(ValueError, match=r"unknown reward 'hpsv9'.*'clip'.*'pickscore'"):
        build_reward("hpsv9")
    with pytest.raises(FileNotFoundError, match="no CLIP model folder"):
        build_reward("pickscore", model_path=tmp_path / "missing")
    bad = _write_tiny_clip(tmp_path / "bad_eos", eos_token_id=3)
    with pytest.raises(ValueError, match="eos_token_id=3"):
        PickScoreReward(bad)
