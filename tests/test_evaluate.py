"""Evaluation on tiny real models: seeds per tag, and prompts evaluated in groups keep their split indices."""

import pandas as pd
import torch

from drpo.evaluate import evaluation_seeds, sample_latents, score_latents, summarize
from drpo.pipeline import load_models
from drpo.rewards import Reward

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


def _tagged_rows() -> list[dict]:
    """One GenEval metadata row of each task (the miniature's grammar)."""
    from drpo.evaluate import GENEVAL_TAGS
    from drpo.world.prompts import all_prompts
    from drpo.world.spec import WorldSpec

    rows = all_prompts(WorldSpec())
    return [next(row for row in rows if row["tag"] == tag) for tag in GENEVAL_TAGS]


class _Judge(Reward):
    """A GenEval judge as the official worker is (a reward with score_verdicts), judging by colour: an image is
    correct when its red channel outweighs its blue one. Records what it is asked."""

    name = "geneval"
    requires_metadata = True
    report_scale = 100.0

    def __init__(self):
        self.calls = []

    def _verdicts(self, images):
        red, blue = images[:, 0].mean(dim=(1, 2)), images[:, 2].mean(dim=(1, 2))
        return (red > blue).float(), [{"correct": bool(r > b), "reason": "" if r > b else "blue"}
                                      for r, b in zip(red.tolist(), blue.tolist())]

    def _score(self, images, prompts, metadata):
        self.calls.append("score")
        return self._verdicts(images)[0]

    def score_verdicts(self, images, prompts, metadata=None):
        self.calls.append("score_verdicts")
        return self._verdicts(images)


def test_a_geneval_reward_fills_the_verdict_columns_without_the_world_and_the_detector_keeps_precedence(
        tiny_config):
    from drpo.world.spec import WorldSpec

    generator, clip, _ = load_models(tiny_config, features=False)
    rows, seeds = _tagged_rows(), [1, 2]
    latents = sample_latents(generator, [row["prompt"] for row in rows], seeds, batch_size=8)
    batches = -(-len(rows) * len(seeds) // 5)

    target = _Judge()  # the target reward is the judge: one pass per batch gives the reward and the verdicts
    per_image, _ = score_latents(generator, target, latents, rows, seeds, batch_size=5)
    assert target.calls == ["score_verdicts"] * batches
    assert per_image["reward"].tolist() == per_image["correct"].astype(float).tolist()
    assert per_image["reason"].tolist() == ["" if c else "blue" for c in per_image["correct"]]
    assert per_image["tag"].tolist() == [row["tag"] for row in rows for _ in seeds]

    held_out = _Judge()  # an evaluation reward is the judge; the target is the CLIP reward
    judged, _ = score_latents(generator, clip, latents, rows, seeds, batch_size=5, held_out={"geneval": held_out})
    assert held_out.calls == ["score_verdicts"] * batches
    assert judged["correct"].tolist() == per_image["correct"].tolist()
    assert judged["reward_geneval"].tolist() == judged["correct"].astype(float).tolist()

    # With the world on, the detector gives the verdicts (and its strict verdict and object counts); the judge only
    # scores.
    world = _Judge()
    detected, _ = score_latents(generator, clip, latents, rows, seeds, batch_size=5, world_spec=WorldSpec(),
                                held_out={"geneval": world})
    assert world.calls == ["score"] * batches
    assert {"correct_strict", "objects"} <= set(detected) and {"correct_strict", "objects"}.isdisjoint(judged)


def test_the_miniature_geneval_reward_judges_as_the_detector(tiny_config):
    from drpo.rewards import GenEvalLiteReward
    from drpo.world.spec import WorldSpec

    generator, clip, _ = load_models(tiny_config, features=False)
    rows, seeds = _tagged_rows(), [1, 2]
    latents = sample_latents(generator, [row["prompt"] for row in rows], seeds, batch_size=8)
    detector, _ = score_latents(generator, clip, latents, rows, seeds, batch_size=8, world_spec=WorldSpec())
    judged, _ = score_latents(generator, GenEvalLiteReward(), latents, rows, seeds, batch_size=8)
    assert judged["correct"].tolist() == detector["correct"].tolist()
    assert judged["reason"].tolist() == detector["reason"].tolist()
    assert judged["reward"].tolist() == judged["correct"].astype(float).tolist()


def test_the_per_task_table_at_paper_scale_from_a_geneval_rewards_verdicts():
    """GenEval's 553 prompts x 4 images (method spec 5.6), verdicts as the paper's DrPO row has them: each task is
    its images' accuracy, overall the mean of the six tasks."""
    from drpo.evaluate import GENEVAL_TAGS

    prompts = dict(zip(GENEVAL_TAGS, (80, 99, 80, 94, 100, 100)))
    correct = dict(zip(GENEVAL_TAGS, (320, 220, 136, 328, 52, 52)))  # of 320 396 320 376 400 400 images
    records, index = [], 0
    for tag in GENEVAL_TAGS:
        verdicts = [True] * correct[tag] + [False] * (4 * prompts[tag] - correct[tag])
        for i in range(prompts[tag]):
            for seed in range(4):
                ok = verdicts[4 * i + seed]
                records.append({"prompt_index": index + i, "seed": seed, "tag": tag, "reward": float(ok),
                                "correct": ok, "reason": "" if ok else "expected dog>=1, found 0"})
        index += prompts[tag]
    per_image = pd.DataFrame.from_records(records)
    assert len(per_image) == 4 * 553
    per_prompt = pd.DataFrame({"prompt_index": range(553), "diversity": 0.1})
    summary = summarize(per_image, per_prompt, reward_scale=100.0)
    expected = {"single_object": 100.0, "two_object": 55.56, "counting": 42.5, "colors": 87.23, "position": 13.0,
                "color_attr": 13.0}
    for tag, value in expected.items():
        assert round(summary[f"geneval_{tag}"], 2) == value
    assert abs(summary["geneval_overall"] - sum(100 * correct[t] / (4 * prompts[t]) for t in GENEVAL_TAGS) / 6) < 1e-9
    assert round(summary["geneval_overall"], 2) == 51.88
    assert "geneval_strict_overall" not in summary  # no strict verdict outside the miniature
