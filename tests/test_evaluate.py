"""Evaluation on tiny real models: seeds per tag, and prompts evaluated in groups keep their split indices."""

import pandas as pd
import torch

from drpo.evaluate import evaluation_seeds, sample_latents, score_latents, summarize
from drpo.pipeline import load_models

from conftest import PROMPTS


def test_evaluation_seeds_reach_the_minimum_images_of_every_tag():
    rows = [{"tag": "single_object"}] * 2 + [{"tag": "color_attr"}] * 40 + [{"prompt": "untagged"}]
    seeds = evaluation_seeds(rows, [42, 43, 44, 45], min_images_per_tag=100)
    assert seeds[0] == seeds[1] == list(range(42, 92))  # 2 prompts x 50 seeds = 100 images
    assert seeds[2] == [42, 43, 44, 45]  # 40 prompts x 4 seeds = 160 >= 100: unchanged
    assert seeds[-1] == [42, 43, 44, 45]  # no tag: unchanged
    assert evaluation_seeds(rows, [42, 43, 44, 45]) == [[42, 43, 44, 45]] * len(rows)


def test_a_group_of_prompts_is_scored_as_in_the_whole_split(tiny_config):
    generator, reward, _ = load_models(tiny_config, features=False)
    rows = [{"prompt": p} for p in PROMPTS]
    seeds = [1, 2, 3]
    whole = score_latents(generator, reward, sample_latents(generator, PROMPTS, seeds, batch_size=8), rows, seeds,
                          batch_size=8)
    indices = [0, 2]
    group = score_latents(generator, reward,
                          sample_latents(generator, [PROMPTS[i] for i in indices], seeds, batch_size=8,
                                         prompt_indices=indices),
                          [rows[i] for i in indices], seeds, batch_size=8, prompt_indices=indices)
    for full, part in zip(whole, group):
        expected = full[full["prompt_index"].isin(indices)].reset_index(drop=True)
        torch.testing.assert_close(torch.tensor(part.select_dtypes("number").to_numpy()),
                                   torch.tensor(expected.select_dtypes("number").to_numpy()), rtol=1e-4, atol=1e-5)
    # Rewards are means over prompts: a prompt with more images does not weigh more.
    per_image, per_prompt = whole
    doubled = per_image[per_image["prompt_index"] == 1].assign(seed=lambda t: t["seed"] + 100)
    lopsided = summarize(pd.concat([per_image, doubled]), per_prompt, reward_scale=1.0)
    assert abs(lopsided["reward"] - summarize(per_image, per_prompt, reward_scale=1.0)["reward"]) < 1e-9


def test_diversity_comes_from_a_held_out_reward_when_the_target_has_no_image_embeddings(tiny_config):
    from drpo.rewards import Reward

    class Brightness(Reward):  # a model-free target, as the detector is
        name = "brightness"

        def _score(self, images, prompts, metadata):
            return images.mean(dim=(1, 2, 3))

    generator, clip, _ = load_models(tiny_config, features=False)
    rows, seeds = [{"prompt": p} for p in PROMPTS], [1, 2, 3]
    latents = sample_latents(generator, PROMPTS, seeds, batch_size=8)
    _, with_clip = score_latents(generator, clip, latents, rows, seeds, batch_size=8)
    _, borrowed = score_latents(generator, Brightness(), latents, rows, seeds, batch_size=8, held_out={"clip": clip})
    _, without = score_latents(generator, Brightness(), latents, rows, seeds, batch_size=8)
    torch.testing.assert_close(torch.tensor(borrowed["diversity"].to_numpy()),
                               torch.tensor(with_clip["diversity"].to_numpy()))
    assert without["diversity"].isna().all() and len(without) == len(PROMPTS)
