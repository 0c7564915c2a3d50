"""The miniature world's trainers: each runs a few steps at tiny size and its output loads through the real loader."""

import json

import numpy as np
import pytest
import torch

from drpo.features.latent_mae import LatentMAEFeatures
from drpo.generators import load_generator
from drpo.images import to_uint8
from drpo.miniature.autoencoder import decode, encode, load_autoencoder, train_autoencoder
from drpo.miniature.data import (
    max_prompt_tokens,
    pair_batch,
    render_pool,
    to_float,
    to_tensor,
    vocabulary,
)
from drpo.miniature.distill import distill_generator, solve_flow
from drpo.miniature.generator import mae_keys, train_generator
from drpo.miniature.mae import CHECKPOINT_NAME, patch_mask, train_mae
from drpo.miniature.reward_model import gaussian_blur, train_reward_model
from drpo.rewards import PickScoreReward
from drpo.tiny import build_clip_tokenizer
from drpo.world.prompts import all_prompts, make_splits
from drpo.world.spec import WorldSpec

SPEC = WorldSpec()


@pytest.fixture(scope="module")
def splits():
    return make_splits(SPEC, n_train=40, n_test=12, seed=0)


@pytest.fixture(scope="module")
def autoencoder_dir(tmp_path_factory, splits):
    out = tmp_path_factory.mktemp("autoencoder")
    train_autoencoder(SPEC, splits[0], out_dir=out, steps=2, batch_size=4, block_out_channels=(8, 16),
                      eval_rows=splits[1][:4])
    return out


@pytest.fixture(scope="module")
def mae_dir(tmp_path_factory, splits, autoencoder_dir):
    out = tmp_path_factory.mktemp("mae")
    train_mae(SPEC, splits[0][:8], autoencoder=autoencoder_dir, out_dir=out, steps=2, batch_size=8,
              layers=(1, 1, 1, 1), widths=(8, 8, 16, 16), renders_per_row=2)
    return out


def test_image_conversions_round_trip():
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    x = to_tensor(images)
    assert x.shape == (3, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    np.testing.assert_array_equal(to_uint8(x).numpy(), images)


def test_render_pool_and_pairs_follow_the_rows(splits):
    rows = splits[0][:3]
    pool = render_pool(rows, 2, SPEC, seed=0)
    assert pool.shape == (3, 2, 3, 32, 32) and pool.dtype == torch.uint8
    assert torch.equal(pool, render_pool(rows, 2, SPEC, seed=0))  # deterministic in the seed
    assert to_float(pool).abs().max() <= 1
    positives, negatives, kinds = pair_batch(rows, np.random.default_rng(0), SPEC)
    assert positives.shape == negatives.shape == (3, 3, 32, 32) and len(kinds) == 3
    assert not torch.equal(positives, negatives)


def test_vocabulary_gives_one_token_per_word():
    tokenizer = build_clip_tokenizer(vocabulary(SPEC), model_max_length=max_prompt_tokens(SPEC))
    for row in all_prompts(SPEC)[::37]:
        ids = tokenizer(row["prompt"]).input_ids
        assert len(ids) == len(row["prompt"].split()) + 2 <= max_prompt_tokens(SPEC)


def test_patch_mask_hides_the_asked_fraction():
    mask = patch_mask(5, 8, 2, 0.5, torch.Generator().manual_seed(0))
    assert mask.shape == (5, 1, 8, 8)
    assert torch.all(mask.sum(dim=(1, 2, 3)) == 32)  # 8 of 16 cells of 2 x 2


def test_autoencoder_folder_loads_and_scales_latents(autoencoder_dir, splits):
    vae = load_autoencoder(autoencoder_dir)
    provenance = json.loads((autoencoder_dir / "provenance.json").read_text())
    assert provenance["steps"] == 2 and provenance["function"].endswith("train_autoencoder")
    assert vae.config.scaling_factor == pytest.approx(provenance["metrics"]["scaling_factor"])
    images = to_float(render_pool(splits[0][:16], 4, SPEC, seed=1).flatten(0, 1))
    latents = encode(vae, images)
    assert latents.shape == (64, 4, 16, 16)  # factor 2: 32 px renders, 16 x 16 latents
    assert 0.5 < latents.std().item() < 2.0  # scaling_factor normalises the latents to about unit std
    assert decode(vae, latents).shape == images.shape


def test_mae_checkpoint_loads_as_latent_mae_features(mae_dir):
    features = LatentMAEFeatures(mae_dir / CHECKPOINT_NAME, keys=mae_keys(("layer1", "layer4")), block_stride=0)
    out = features(torch.randn(3, 4, 16, 16))
    assert out["layer1"].shape == (3, 256, 8) and out["layer4_mean"].shape == (3, 1, 16)
    raw = torch.load(mae_dir / CHECKPOINT_NAME, weights_only=True)
    assert any(key.startswith("decoder.") for key in raw)
    assert json.loads((mae_dir / "provenance.json").read_text())["steps"] == 2


def test_reward_model_folder_loads_as_pickscore(tmp_path, splits):
    metrics = train_reward_model(SPEC, splits[0], out_dir=tmp_path, eval_rows=splits[1][:4], steps=2,
                                 batch_size=8, hidden=16)
    assert 0 <= metrics["pairwise_accuracy"] <= 1
    reward = PickScoreReward(tmp_path)
    positives, _, _ = pair_batch(splits[1][:2], np.random.default_rng(0), SPEC)
    scores = reward.score(positives, [row["prompt"] for row in splits[1][:2]])
    assert scores.shape == (2,) and torch.all(scores.abs() <= 1 + 1e-5)
    assert json.loads((tmp_path / "provenance.json").read_text())["metrics"]["pairwise_accuracy"] == metrics[
        "pairwise_accuracy"
    ]


def test_generator_folder_loads_and_samples_like_sd_turbo(tmp_path, splits, autoencoder_dir, mae_dir):
    metrics = train_generator(
        SPEC, splits[0][:6], autoencoder=autoencoder_dir, mae=mae_dir, out_dir=tmp_path, steps=2,
        prompts_per_step=2, samples_per_prompt=3, positives_per_prompt=3, renders_per_row=3,
        unet_channels=(16, 32), text_hidden=16, mae_maps=("layer1", "layer2"), eval_rows=splits[1][:3],
        eval_seeds=(0,),
    )
    assert set(metrics["geneval_lite"]) >= {"overall"} and 0 <= metrics["geneval_lite"]["overall"] <= 1
    generator = load_generator(tmp_path, "sd-turbo")
    a_t = generator.constants[0]
    assert a_t == pytest.approx(0.5, abs=0.01)  # the miniature's schedule (beta_end 0.002), not SD-2.x's 0.068
    cond = generator.encode_prompts([splits[1][0]["prompt"]])
    noise = generator.make_noise(seeds=[0, 1])
    latents = generator.sample(cond, noise)
    assert latents.shape == (2, 4, 16, 16) and torch.isfinite(latents).all()
    assert not torch.allclose(latents[0], latents[1])
    assert generator.decode(latents).shape == (2, 3, 32, 32)
    assert json.loads((tmp_path / "provenance.json").read_text())["arguments"]["beta_end"] == 0.002


class _PointField(torch.nn.Module):
    """The exact flow-matching velocity of a single data point c, (x - c) / t, read from the "text" embedding."""

    def forward(self, x, timestep, encoder_hidden_states):
        c = encoder_hidden_states[:, 0].view_as(x)
        return type("Out", (), {"sample": (x - c) / (timestep / 999).view(-1, 1, 1, 1)})()


@pytest.mark.parametrize("steps", [1, 3])
def test_solve_flow_lands_on_the_guided_point(steps):
    noise = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    c = torch.randn(2, 1, 36, generator=torch.Generator().manual_seed(1))
    c0 = torch.randn(1, 1, 36, generator=torch.Generator().manual_seed(2))
    for guidance in (1.0, 2.5):
        x0 = solve_flow(_PointField(), noise, c, c0, steps=steps, guidance=guidance)
        expected = (c0 + guidance * (c - c0)).view_as(noise)  # guided field of two points: c0 + w (c - c0)
        torch.testing.assert_close(x0, expected, atol=1e-5, rtol=1e-5)


def test_distilled_generator_folder_loads_and_samples_like_sd_turbo(tmp_path, splits, autoencoder_dir):
    metrics = distill_generator(
        SPEC, splits[0][:6], autoencoder=autoencoder_dir, out_dir=tmp_path, teacher_steps=2, student_steps=2,
        batch_size=4, renders_per_row=3, pairs_per_row=2, ode_steps=2, unet_channels=(16, 32), text_hidden=16,
        eval_rows=splits[1][:3], eval_seeds=(0,),
    )
    assert 0 <= metrics["teacher_geneval_lite"]["overall"] <= 1 and 0 <= metrics["geneval_lite"]["overall"] <= 1
    generator = load_generator(tmp_path, "sd-turbo")
    latents = generator.sample(generator.encode_prompts([splits[1][0]["prompt"]]), generator.make_noise(seeds=[0, 1]))
    assert latents.shape == (2, 4, 16, 16) and torch.isfinite(latents).all()
    record = json.loads((tmp_path / "provenance.json").read_text())
    assert record["function"] == "drpo.miniature.distill.distill_generator" and record["steps"] == 4


def test_gaussian_blur_keeps_mass_and_leaves_sigma_zero_unchanged():
    images = torch.zeros(2, 3, 11, 11)
    images[:, :, 5, 5] = 1.0
    blurred = gaussian_blur(images, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(blurred[0], images[0])
    torch.testing.assert_close(blurred[1].sum(dim=(1, 2)), torch.ones(3))
    assert blurred[1, 0, 5, 5] == pytest.approx(1 / (2 * np.pi), rel=0.05)  # the 2-D Gaussian's peak at sigma 1
    assert torch.equal(blurred[1, 0], blurred[1, 0].T)  # separable and isotropic


def test_reward_model_trains_on_blurred_pairs(tmp_path, splits):
    metrics = train_reward_model(SPEC, splits[0], out_dir=tmp_path, eval_rows=splits[1][:4], steps=2,
                                 batch_size=8, hidden=16, blur=1.0)
    assert 0 <= metrics["pairwise_accuracy"] <= 1
    assert json.loads((tmp_path / "provenance.json").read_text())["arguments"]["blur"] == 1.0
