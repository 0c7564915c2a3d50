"""The offline methods (method spec section 7) on tiny real models: the distance scores against a plain computation,
the gradient subset, the objectives against online DrPO's and DPO-1step's own, and updates through the trainer."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from drpo.config import ConfigError, load_config, merge
from drpo.lora import add_lora
from drpo.methods import METHODS, build_method
from drpo.methods.base import PromptBatch
from drpo.methods.dpo import dpo_logit
from drpo.methods.drpo import preference_loss
from drpo.methods.offline_distance import distance_scores
from drpo.pipeline import load_models
from drpo.preferences import LatentCache, PreferenceSource, build_latent_cache
from drpo.ranking import feature_subset
from drpo.reference import OnlineReference
from drpo.train import TrainSettings, train

from conftest import PROMPTS

REPO = Path(__file__).resolve().parents[1]
OFFLINE = ("offline", "offline_distance", "dpo_offline")


# ------------------------------------------------------------------------------------------ distance scores
def _plain_scores(candidates, chosen, rejected, distance, score, combine):
    """The scores of distance_scores, written out with Python loops over plain lists."""
    def vector(t):
        return [float(v) for v in t.flatten()]

    def dist(a, b):
        return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    def z(values):
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        return [(v - mean) / (std + 1e-6) for v in values]

    def softmax(values):
        top = max(values)
        exps = [math.exp(v - top) for v in values]
        return [e / sum(exps) for e in exps]

    totals = [0.0] * len(candidates["a"])
    for key in candidates:
        xs = [vector(c) for c in candidates[key]]
        pos, neg = [vector(c) for c in chosen[key]], [vector(c) for c in rejected[key]]
        if score == "cosine_softmax_diff":
            pick = max if distance == "min" else (lambda v: sum(v) / len(v))
            near_pos = [pick([cos(x, p) for p in pos]) for x in xs]
            near_neg = [pick([cos(x, n) for n in neg]) for x in xs]
            key_scores = [a - b for a, b in zip(softmax(near_pos), softmax(near_neg))]
        else:
            pick = min if distance == "min" else (lambda v: sum(v) / len(v))
            d_pos = [pick([dist(x, p) for p in pos]) for x in xs]
            d_neg = [pick([dist(x, n) for n in neg]) for x in xs]
            if score == "margin":
                key_scores = z([n - p for p, n in zip(d_pos, d_neg)])
            else:
                key_scores = [a - b for a, b in zip(z(d_neg), z(d_pos))]
        totals = [t + s for t, s in zip(totals, key_scores)]
    return [t / len(candidates) for t in totals] if combine == "mean" else totals


@pytest.mark.parametrize("score", ["margin", "separate_zscore", "cosine_softmax_diff"])
@pytest.mark.parametrize("distance", ["mean", "min"])
@pytest.mark.parametrize("combine", ["mean", "sum"])
def test_distance_scores_match_a_plain_computation(score, distance, combine):
    g = torch.Generator().manual_seed(0)
    candidates = {"a": torch.randn(6, 3, 4, generator=g), "b": torch.randn(6, 1, 5, generator=g)}
    chosen = {"a": torch.randn(2, 3, 4, generator=g), "b": torch.randn(2, 1, 5, generator=g)}
    rejected = {"a": torch.randn(3, 3, 4, generator=g), "b": torch.randn(3, 1, 5, generator=g)}
    scores = distance_scores(candidates, chosen, rejected, distance=distance, score=score, combine=combine)
    expected = _plain_scores(candidates, chosen, rejected, distance, score, combine)
    torch.testing.assert_close(scores, torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_a_candidate_nearer_the_chosen_images_scores_higher():
    chosen, rejected = {"a": torch.zeros(1, 1, 2)}, {"a": torch.full((1, 1, 2), 10.0)}
    candidates = {"a": torch.tensor([[[9.0, 9.0]], [[1.0, 1.0]], [[5.0, 5.0]]])}
    for score in ("margin", "separate_zscore"):
        order = distance_scores(candidates, chosen, rejected, distance="mean", score=score, combine="mean")
        assert order.argsort(descending=True).tolist() == [1, 2, 0]
    with pytest.raises(ValueError, match=r"unknown offline_distance.score 'nearest'; valid: margin"):
        distance_scores(candidates, chosen, rejected, distance="mean", score="nearest", combine="mean")


def test_the_gradient_subset_is_the_top_fraction_minus_the_negatives():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3, 0.2, 0.8, 0.4])  # ranking: 1, 6, 3, 2, 7, 4, 5, 0
    assert feature_subset(scores, 0.5, torch.tensor([0, 5])).tolist() == [1, 6, 3, 2]
    assert feature_subset(scores, 0.5, torch.tensor([3, 2])).tolist() == [1, 6]  # negatives leave the top half
    assert feature_subset(scores, 0.25, torch.tensor([1, 6])).tolist() == [1]  # nothing left: the single best
    assert feature_subset(scores, 1.0, torch.tensor([0])).tolist() == list(range(8))  # every candidate
    assert feature_subset(scores, 0.3, torch.tensor([], dtype=torch.long)).tolist() == [1, 6, 3]  # ceil(2.4) = 3


# ------------------------------------------------------------------------------------------ the objectives
def _method(config, name):
    generator, reward, features = load_models(config)
    method = build_method(name, generator, reward, features, config)
    params = add_lora(generator.unet, rank=4, alpha=4)
    for p in params:  # adapters off the identity, so that the candidates differ from the base's samples
        torch.nn.init.normal_(p, std=0.05)
    return method, params


def _batch(method, prompt=PROMPTS[0], k=6, chosen=2, rejected=1):
    gen = method.generator
    g = torch.Generator().manual_seed(1)
    noise = gen.make_noise(k, generator=g)
    data = torch.randn(chosen + rejected, *gen.latent_shape, generator=g)
    reference = gen.sample(gen.encode_prompts([prompt]), noise, adapters=False)
    return PromptBatch(prompt, noise, reference, chosen=data[:chosen], rejected=data[chosen:])


def test_offline_is_online_drpos_objective_with_the_datas_anchors(tiny_config):
    config = merge(tiny_config, {"drpo": {"reference_l2_weight": 0.1}})
    method, _ = _method(config, "offline")
    batch = _batch(method)
    torch.manual_seed(0)
    loss, logs = method.loss(batch)
    gen, features, settings = method.generator, method.features, method.shared["drpo"]
    cond = gen.encode_prompts([batch.prompt])
    latents = gen.sample(cond.repeat_interleave(6), batch.noise)
    with torch.no_grad():
        data = features(torch.cat([batch.chosen, batch.rejected]), cond=cond)
        positives, negatives = ({key: value[part] for key, value in data.items()} for part in (slice(2), slice(2, 3)))
        reference = features(batch.reference, cond=cond)
    expected = preference_loss(settings, features(latents, cond=cond), reference, positives, negatives)
    expected = expected + 0.1 * F.mse_loss(latents, batch.reference)
    torch.testing.assert_close(loss, expected)
    assert logs == {"chosen": 2.0, "rejected": 1.0}


def test_dpo_offline_is_dpo_1steps_logit_on_the_datas_pair(tiny_config):
    method, _ = _method(tiny_config, "dpo_offline")
    batch = _batch(method)
    loss, logs = method.loss(batch)
    gen = method.generator
    latents = gen.sample(gen.encode_prompts([batch.prompt]), batch.noise)
    logit = dpo_logit(latents, batch.reference, batch.chosen, batch.rejected, tiny_config["dpo"]["beta"])
    torch.testing.assert_close(loss, -F.logsigmoid(logit))
    assert logs["dpo_logit"] == pytest.approx(logit.item())


@pytest.mark.parametrize("data_anchors", [False, True])
def test_offline_distance_trains_only_its_gradient_subset(tiny_config, data_anchors):
    config = merge(tiny_config, {"offline_distance": {"num_pos": 2, "num_neg": 2, "top_fraction": 0.5,
                                                      "data_anchors": data_anchors}})
    method, params = _method(config, "offline_distance")
    sampled = []
    sample = method.generator.sample

    def keep(*args, **kwargs):  # the generator's own sampling; its output kept to read its gradient
        out = sample(*args, **kwargs)
        if out.requires_grad:
            out.retain_grad()
            sampled.append(out)
        return out

    method.generator.sample = keep
    loss, logs = method.loss(_batch(method))
    loss.backward()
    latents = sampled[0]
    touched = latents.grad.flatten(1).abs().sum(dim=1) > 0
    with torch.no_grad():
        gen = method.generator
        cond = gen.encode_prompts([PROMPTS[0]])
        batch = _batch(method)
        feats = method.features(latents.detach(), cond=cond)
        data = method.features(torch.cat([batch.chosen, batch.rejected]), cond=cond)
    s = config["offline_distance"]
    scores = distance_scores(feats, {k: v[:2] for k, v in data.items()}, {k: v[2:] for k, v in data.items()},
                             distance=s["distance"], score=s["score"], combine=s["combine"])
    negatives = scores.argsort(descending=True, stable=True)[-2:]
    subset = feature_subset(scores, 0.5, negatives)
    assert sorted(touched.nonzero().flatten().tolist()) == sorted(subset.tolist())
    assert logs["gradient_set"] == len(subset) and logs["score_top"] > logs["score_bottom"]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_an_offline_method_without_data_says_what_it_needs(tiny_config):
    method, _ = _method(tiny_config, "offline")
    batch = _batch(method)
    batch.chosen = batch.rejected = None
    with pytest.raises(ValueError, match=r"method 'offline' trains from a preference dataset.*preferences.path"):
        method.loss(batch)


# ------------------------------------------------------------------------------------------ through the trainer
@pytest.fixture(scope="module")
def cache_folder(tiny_models, tmp_path_factory):
    """A latent cache of a 3-row JSONL dataset (the conftest prompts) encoded by the tiny generator's VAE."""
    from drpo.generators import load_generator

    root = tmp_path_factory.mktemp("preferences")
    rng = np.random.default_rng(0)
    rows = []
    for i, prompt in enumerate(PROMPTS):
        names = {role: [f"{i}_{role}_{k}.png" for k in range(2)] for role in ("chosen", "rejected")}
        for name in names["chosen"] + names["rejected"]:
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / name)
        rows.append(json.dumps({"prompt": prompt, **names}))
    (root / "pairs.jsonl").write_text("\n".join(rows) + "\n")
    generator = load_generator(tiny_models["generator"], "sd-turbo")
    build_latent_cache(root / "pairs.jsonl", root / "cache", generator.vae, resolution=generator.resolution,
                       log=lambda *_: None)
    return root / "cache"


@pytest.mark.parametrize("name", OFFLINE)
def test_an_offline_update_through_the_trainer(tiny_config, cache_folder, tmp_path, name):
    config = merge(tiny_config, {"train": {"methods": [name], "steps": 2, "checkpoint_every": 2}})
    generator, reward, features = load_models(config)
    method = build_method(name, generator, reward, features, config)
    cache = LatentCache(cache_folder)
    source = PreferenceSource(cache, OnlineReference(generator, cache.prompts, candidates=6, seed=0))
    settings = TrainSettings.from_config(config["train"], seed=0, method=name)
    train(method, source, settings, tmp_path / "run", identity={"run": name}, log=lambda *_: None)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(math.isfinite(m["loss"]) for m in metrics)
    assert all(m["grad_norm"] > 0 for m in metrics)
    weights = load_file(str(tmp_path / "run/checkpoints/checkpoint-2/pytorch_lora_weights.safetensors"))
    assert any(("lora_B" in key or "lora.up" in key) and value.abs().sum() > 0 for key, value in weights.items())


def test_the_pipeline_trains_an_offline_run_from_the_cache_with_the_prompts_tags(tiny_config, cache_folder, tmp_path):
    from drpo.pipeline import run_training
    from drpo.world.prompts import write_metadata_jsonl

    rows = [{"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": p} for p in PROMPTS]
    write_metadata_jsonl(rows, tmp_path / "train.jsonl")
    config = merge(tiny_config, {"train": {"methods": ["offline"], "steps": 1, "checkpoint_every": 1,
                                           "balance_tags": True}})
    run_training(config, "offline", 0, tmp_path / "train.jsonl", tmp_path / "run",
                 preferences_path=cache_folder / "done.json", log=lambda *_: None)
    identity = json.loads((tmp_path / "run" / "run.json").read_text())
    assert identity["preferences_sha256"] == LatentCache(cache_folder).digest and "drpo" in identity
    with pytest.raises(ValueError, match="trains from a preference dataset: give it the latent cache"):
        run_training(config, "offline", 0, tmp_path / "train.jsonl", tmp_path / "run2", log=lambda *_: None)


# ------------------------------------------------------------------------------------------ configuration
def test_methods_say_where_their_preferences_come_from():
    assert {name for name, cls in METHODS.items() if cls.uses_preference_data} == set(OFFLINE)


@pytest.mark.parametrize("override,message", [
    ({"train": {"methods": ["offline"]}, "drpo": {"objective": "drpo-awr"}},
     r"offline uses DrPO's binary objective, but drpo.objective is 'drpo-awr'"),
    ({"train": {"methods": ["offline_distance"]}, "drpo": {"rollout_rounds": 2}},
     r"offline_distance takes its anchors from a preference dataset, but drpo.rollout_rounds is 2"),
    ({"train": {"methods": ["dpo_offline"], "reference": "bank"}}, r"dpo_offline, which trains from a preference "
     r"dataset's rows, but train.reference is bank"),
    ({"train": {"methods": ["offline"]}, "world": {"enabled": False},
      "prompts": {"train": "a.txt", "test": "b.txt"}}, r"preferences.path is null and world.enabled is false"),
    ({"train": {"methods": ["offline_distance"], "candidates": 6}, "offline_distance": {"num_pos": 4, "num_neg": 4}},
     r"offline_distance.num_pos \(4\) \+ offline_distance.num_neg \(4\) must not exceed train.candidates"),
])
def test_offline_configs_that_cannot_run_fail_when_read(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "config.yaml", overrides=override)


def test_a_missing_dataset_is_listed_with_the_missing_models(tiny_config, tmp_path):
    from drpo.assets import missing_assets

    config = merge(tiny_config, {"preferences": {"path": str(tmp_path / "pickapic")}})
    assert missing_assets(config) == []  # no offline method: the dataset is not needed
    config["train"]["methods"] = ["drpo", "offline"]
    missing = missing_assets(config)
    assert [a.path for a in missing] == [str(tmp_path / "pickapic")]
    assert "preference dataset of offline" in missing[0].what and "Pick-a-Pic" in missing[0].what
