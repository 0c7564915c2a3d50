"""The shared training loop with DrPO on tiny real models: updates, checkpoints, resume, bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file

from drpo.config import checkpoint_steps, merge
from drpo.drift import AWR_VARIANTS
from drpo.lora import add_lora
from drpo.methods import build_method
from drpo.methods.base import Method, PromptBatch
from drpo.pipeline import load_models
from drpo.reference import OnlineReference, ReferenceBank, build_reference_bank
from drpo.run_folder import latest_checkpoint
from drpo.train import PromptSchedule, TrainSettings, train

from conftest import PROMPTS

RUN = {"run": "one training configuration"}  # the identity the tests' run folders belong to


def _setup(config):
    generator, reward, features = load_models(config)
    method = build_method("drpo", generator, reward, features, config)
    bank = build_reference_bank(generator, PROMPTS, candidates=config["train"]["candidates"],
                                noise_sets=1, seed=0, batch_size=8)
    return method, bank


def test_checkpoint_steps_include_the_last():
    assert checkpoint_steps(10, 4) == [4, 8, 10]
    assert checkpoint_steps(8, 4) == [4, 8]


def test_reference_bank_is_the_base_model_and_round_trips(tiny_config, tmp_path):
    method, bank = _setup(tiny_config)
    noise, latents = bank.cell(1, 0)
    gen = method.generator
    expected = gen.sample(gen.encode_prompts([PROMPTS[1]] * noise.shape[0]), noise, adapters=False)
    torch.testing.assert_close(latents, expected.float(), rtol=1e-5, atol=1e-5)
    bank.save(tmp_path / "bank.safetensors")
    loaded = ReferenceBank.load(tmp_path / "bank.safetensors")
    assert loaded.prompts == PROMPTS
    torch.testing.assert_close(loaded.latents, bank.latents)


def test_drpo_loss_is_finite_and_reaches_lora_only(tiny_config):
    method, bank = _setup(tiny_config)
    from drpo.lora import add_lora

    params = add_lora(method.generator.unet, rank=4, alpha=4)
    noise, reference = bank.cell(0, 0)
    loss, logs = method.loss(PromptBatch(PROMPTS[0], noise, reference))
    loss.backward()
    assert torch.isfinite(loss)
    assert logs["reward_top"] >= logs["reward_mean"] >= logs["reward_bottom"]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    frozen = [p for n, p in method.generator.unet.named_parameters() if "lora" not in n]
    assert all(p.grad is None for p in frozen)


@pytest.mark.parametrize("objective", AWR_VARIANTS)
def test_reward_weighted_objectives_train_through_drpo(tiny_config, objective):
    config = merge(tiny_config, {"drpo": {"objective": objective}})
    generator, reward, features = load_models(config)
    method = build_method("drpo", generator, reward, features, config)
    params = add_lora(generator.unet, rank=4, alpha=4)
    noise = generator.make_noise(6, generator=torch.Generator().manual_seed(0))
    reference = generator.sample(generator.encode_prompts([PROMPTS[0]]), noise, adapters=False)
    loss, logs = method.loss(PromptBatch(PROMPTS[0], noise, reference))
    loss.backward()
    assert torch.isfinite(loss) and "reward_mean" in logs
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_training_writes_diffusers_checkpoints_and_metrics(tiny_config, tmp_path):
    method, bank = _setup(tiny_config)
    settings = TrainSettings.from_config(tiny_config["train"], seed=0)
    done = train(method, bank, settings, tmp_path / "run", identity=RUN, log=lambda *_: None)
    assert json.loads(done.read_text())["steps"] == 4
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["checkpoint-2", "checkpoint-4"]
    weights = load_file(str(tmp_path / "run" / "checkpoints" / "checkpoint-4" / "pytorch_lora_weights.safetensors"))
    assert weights and all(key.startswith("unet.") for key in weights)
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_killed_run_resumes_and_matches_an_uninterrupted_run(tiny_config, tmp_path):
    settings = TrainSettings.from_config(tiny_config["train"], seed=0)
    method, bank = _setup(tiny_config)
    train(method, bank, settings, tmp_path / "straight", identity=RUN, log=lambda *_: None)

    # "Kill" after update 3: run 3 updates, drop the last checkpoint's successor state, then rerun to 4.
    method, bank = _setup(tiny_config)
    short = TrainSettings.from_config(tiny_config["train"] | {"steps": 3}, seed=0)
    train(method, bank, short, tmp_path / "resumed", identity=RUN, log=lambda *_: None)
    (tmp_path / "resumed" / "train_done.json").unlink()
    import shutil

    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "checkpoint-3")  # died before saving update 3
    messages = []
    method, bank = _setup(tiny_config)
    train(method, bank, settings, tmp_path / "resumed", identity=RUN, log=messages.append)
    assert any("resuming from" in m and "checkpoint-2" in m for m in messages)
    assert latest_checkpoint(tmp_path / "resumed").name == "checkpoint-4"
    final = "checkpoints/checkpoint-4/pytorch_lora_weights.safetensors"
    a = load_file(str(tmp_path / "straight" / final))
    b = load_file(str(tmp_path / "resumed" / final))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_bank_with_wrong_k_is_refused(tiny_config, tmp_path):
    method, bank = _setup(tiny_config)
    settings = TrainSettings.from_config(tiny_config["train"] | {"candidates": 8}, seed=0)
    with pytest.raises(ValueError, match="K=6"):
        train(method, bank, settings, tmp_path / "run", identity=RUN, log=lambda *_: None)


def test_nan_reward_stops_training_with_a_clear_error(tiny_config):
    method, bank = _setup(tiny_config)

    class NaNReward(type(method.reward)):
        def _score(self, images, prompts, metadata):
            scores = super()._score(images, prompts, metadata)
            scores[2] = float("nan")
            return scores

    method.reward.__class__ = NaNReward
    noise, reference = bank.cell(0, 0)
    with pytest.raises(RuntimeError, match="nan|NaN"):
        method.loss(PromptBatch(PROMPTS[0], noise, reference))


def test_online_reference_matches_the_bank(tiny_config):
    method, bank = _setup(tiny_config)
    online = OnlineReference(method.generator, PROMPTS, candidates=bank.candidates, seed=0)
    for cell in [(0, 0), (2, 0)]:
        noise_a, ref_a = bank.cell(*cell)
        noise_b, ref_b = online.cell(*cell)
        torch.testing.assert_close(noise_a, noise_b)
        torch.testing.assert_close(ref_a, ref_b.float(), rtol=1e-4, atol=1e-4)  # batching changes float sums


def test_a_method_can_have_its_own_train_settings(tiny_config):
    train_section = tiny_config["train"] | {"learning_rate": 1e-3, "per_method": {
        "draft": {"learning_rate": 1e-5, "steps": 6, "mixed_precision": "bf16", "lora": {"rank": 2}}}}
    draft = TrainSettings.from_config(train_section, seed=0, method="draft")
    assert (draft.learning_rate, draft.steps, draft.mixed_precision) == (1e-5, 6, "bf16")
    assert draft.lora == tiny_config["train"]["lora"] | {"rank": 2}  # merged key by key
    assert TrainSettings.from_config(train_section, seed=0, method="drpo") == TrainSettings.from_config(
        tiny_config["train"] | {"learning_rate": 1e-3}, seed=0)


def test_prompt_schedule_cycles_every_prompt_once_per_epoch_without_tags():
    schedule = PromptSchedule(5, noise_sets=2, seed=3)
    first, second = [schedule(m) for m in range(5)], [schedule(m) for m in range(5, 10)]
    assert sorted(p for p, _ in first) == list(range(5)) and {n for _, n in first} == {0}
    assert [p for p, _ in second] == [p for p, _ in first] and {n for _, n in second} == {1}


def test_prompt_schedule_gives_every_tag_an_equal_share():
    tags = ["big"] * 8 + ["small"] * 2 + ["mid"] * 3
    schedule = PromptSchedule(len(tags), noise_sets=2, seed=0, tags=tags)
    picks = [schedule(m) for m in range(60)]
    shares = {tag: sum(tags[p] == tag for p, _ in picks) for tag in set(tags)}
    assert shares == {"big": 20, "small": 20, "mid": 20}
    small = [(p, n) for p, n in picks if tags[p] == "small"]
    # each small prompt comes once per epoch of its tag, and its noise set follows that epoch
    assert sorted(p for p, _ in small[:2]) == [8, 9] and [n for _, n in small[:4]] == [0, 0, 1, 1]
    assert picks == [PromptSchedule(len(tags), 2, 0, tags=tags)(m) for m in range(60)]  # a pure function
    with pytest.raises(ValueError, match="2 tags for 3 prompts"):
        PromptSchedule(3, 1, 0, tags=["a", "b"])


def _pool_method(tiny_config, rule, **drpo):
    """DrPO (pass/fail pools unless `drpo` says otherwise) on a real pixel rule: an image passes when
    rule(mean brightness) holds."""
    from drpo.rewards import Reward

    class PassFail(Reward):
        name = "brightness_rule"

        def _score(self, images, prompts, metadata):
            brightness = images.mean(dim=(1, 2, 3))
            return rule(brightness).float()

    drpo = {"rollout_rounds": 3, "reference_l2_weight": 0.2} | drpo
    method, bank = _setup(tiny_config | {"drpo": tiny_config["drpo"] | drpo})
    method.reward = PassFail()
    return method, bank


@pytest.mark.parametrize("reference_loss_weight", [0.0, 0.2])
def test_ranked_pass_fail_reward_with_every_candidate_alike_trains_no_preference(tiny_config, reference_loss_weight):
    from drpo.lora import add_lora

    method, bank = _pool_method(tiny_config, lambda b: b > 10.0, rollout_rounds=0, reference_l2_weight=0.0,
                                reference_loss_weight=reference_loss_weight)  # images are in [-1, 1]: all fail
    params = add_lora(method.generator.unet, rank=4, alpha=4)
    for p in params:  # adapters off the identity, so the reference term has a gradient
        torch.nn.init.normal_(p, std=0.05)
    noise, reference = bank.cell(0, 0)
    loss, logs = method.loss(PromptBatch(PROMPTS[0], noise, reference))
    loss.backward()
    assert logs["tied"] == 1.0
    moved = any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    if reference_loss_weight:  # the reference drift alone
        assert loss > 0 and moved
    else:  # nothing to learn from this prompt
        assert loss.item() == 0.0 and not moved


def test_ranked_pass_fail_reward_keeps_the_passing_candidates_as_positives(tiny_config):
    method, bank = _pool_method(tiny_config, lambda b: b > b.median(), rollout_rounds=0, reference_l2_weight=0.0)
    noise, reference = bank.cell(0, 0)
    loss, logs = method.loss(PromptBatch(PROMPTS[0], noise, reference))
    assert logs["tied"] == 0.0 and logs["reward_top"] == 1.0 and logs["reward_bottom"] == 0.0 and loss > 0


def test_pass_fail_pools_train_the_positives_only(tiny_config):
    from drpo.lora import add_lora

    method, bank = _pool_method(tiny_config, lambda b: b > b.median())
    params = add_lora(method.generator.unet, rank=4, alpha=4)
    noise, reference = bank.cell(0, 0)
    loss, logs = method.loss(PromptBatch(PROMPTS[0], noise, reference))
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    # K = 6 with 3 above the median: both pools (2 each) fill in the first round.
    assert logs == {"pass_rate": 0.5, "rollouts": 1.0, "skipped": 0.0}
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_pass_fail_pools_skip_a_prompt_that_never_passes(tiny_config):
    from drpo.lora import add_lora

    method, bank = _pool_method(tiny_config, lambda b: b > 10.0)  # images are in [-1, 1]
    params = add_lora(method.generator.unet, rank=4, alpha=4)
    noise, reference = bank.cell(0, 0)
    loss, logs = method.loss(PromptBatch(PROMPTS[0], noise, reference))
    loss.backward()
    assert logs == {"pass_rate": 0.0, "rollouts": 3.0, "skipped": 1.0}
    assert loss.item() == 0.0 and all(p.grad is None or p.grad.abs().sum() == 0 for p in params)


def test_pass_fail_pools_refuse_a_graded_reward(tiny_config):
    config = tiny_config | {"drpo": tiny_config["drpo"] | {"rollout_rounds": 2}}
    method, bank = _setup(config)  # the tiny PickScore gives graded scores
    noise, reference = bank.cell(0, 0)
    with pytest.raises(ValueError, match="pass/fail reward"):
        method.loss(PromptBatch(PROMPTS[0], noise, reference))


def test_the_perceptual_term_is_the_feature_mse_to_the_frozen_base(tiny_config):
    config = merge(tiny_config, {"drpo": {"reference_loss_weight": 0.0}})
    generator, reward, features = load_models(config)
    params = add_lora(generator.unet, rank=4, alpha=4)
    with torch.no_grad():
        for p in params:  # adapters off the identity, so the candidates differ from the base
            p.add_(0.05 * torch.randn_like(p))
    noise = generator.make_noise(6, generator=torch.Generator().manual_seed(0))
    cond = generator.encode_prompts([PROMPTS[0]])
    reference = generator.sample(cond, noise, adapters=False)
    batch = PromptBatch(PROMPTS[0], noise, reference)
    losses = {}
    for weight in (0.0, 2.0):
        method = build_method("drpo", generator, reward, features, merge(config, {"drpo": {"feature_l2_weight": weight}}))
        losses[weight] = method.loss(batch)[0].item()
    with torch.no_grad():
        ours = features(generator.sample(cond.repeat_interleave(6), noise).float(), cond=cond)
        base = features(reference.float(), cond=cond)
        mse = sum(torch.nn.functional.mse_loss(ours[k], base[k]).item() for k in ours)
    assert mse > 0 and losses[2.0] - losses[0.0] == pytest.approx(2.0 * mse, rel=1e-4)


def _encoder_calls(features) -> list[tuple[int, bool]]:
    """(batch size, with gradient) of each call of the encoder from now on, recorded by a forward hook."""
    calls = []
    features.register_forward_hook(lambda module, args, output: calls.append((len(args[0]), torch.is_grad_enabled())))
    return calls


@pytest.mark.parametrize(("encoder", "share", "anchor_calls"), [
    ("teacher_unet", True, [(2, False), (2, False)]),  # stochastic: its own calls for positives and negatives
    ("latent_mae", True, []),  # deterministic: the candidates' features, one pass saved
    ("latent_mae", False, [(2, False), (2, False)]),
])
def test_anchor_features_are_fresh_calls_for_a_stochastic_encoder(tiny_config, encoder, share, anchor_calls):
    features = {"name": "teacher_unet", "checkpoint": None, "keys": ["mid_block"]} if encoder == "teacher_unet" else {}
    config = merge(tiny_config, {"models": {"features": features}, "drpo": {"share_anchor_features": share}})
    method, bank = _setup(config)
    assert method.features.stochastic == (encoder == "teacher_unet")
    calls = _encoder_calls(method.features)
    noise, reference = bank.cell(0, 0)
    loss, _ = method.loss(PromptBatch(PROMPTS[0], noise, reference))
    assert torch.isfinite(loss)
    # K = 6 candidates with gradient, then the anchors (num_pos = num_neg = 2), then the base's samples for lambda.
    assert calls == [(6, True), *anchor_calls, (6, False)]


def test_shared_and_fresh_anchor_features_agree_for_a_deterministic_encoder(tiny_config):
    losses = []
    for share in (True, False):
        method, bank = _setup(merge(tiny_config, {"drpo": {"share_anchor_features": share}}))
        noise, reference = bank.cell(0, 0)
        losses.append(method.loss(PromptBatch(PROMPTS[0], noise, reference))[0].item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


class _SmallGradient(Method):
    """A loss whose gradient, 1e-7 x the latents' mean square, rounds to zero in the generator's fp16 activations
    unless the loss is scaled."""

    name = "small_gradient"

    def loss(self, batch: PromptBatch) -> tuple[torch.Tensor, dict[str, float]]:
        gen = self.generator
        return 1e-7 * gen.sample(gen.encode_prompts([batch.prompt]), batch.noise).square().mean(), {}


def test_fp16_training_scales_the_loss_so_that_small_gradients_survive(tiny_config, tmp_path):
    norms = {}
    for precision in ("no", "fp16"):
        generator, reward, _ = load_models(tiny_config, features=False)
        bank = build_reference_bank(generator, PROMPTS, candidates=6, noise_sets=1, seed=0, batch_size=8)
        settings = TrainSettings.from_config(tiny_config["train"] | {"steps": 2, "mixed_precision": precision}, seed=0)
        train(_SmallGradient(generator, reward, None), bank, settings, tmp_path / precision, identity=RUN,
              log=lambda *_: None)
        records = [json.loads(line) for line in (tmp_path / precision / "metrics.jsonl").read_text().splitlines()]
        norms[precision] = [r["grad_norm"] for r in records]
    assert all(n > 0 for n in norms["fp16"]) and norms["fp16"] == pytest.approx(norms["no"], rel=0.05)
    saved = tmp_path / "fp16" / "checkpoints" / "checkpoint-2" / "training_state.json"
    state = json.loads(saved.read_text())
    assert state["grad_scaler"]["scale"] == 2.0**16  # no overflow, so the initial scale
    # A resume restores the scale (set by hand here to tell it from a fresh scaler's).
    saved.write_text(json.dumps(state | {"grad_scaler": state["grad_scaler"] | {"scale": 1024.0}}))
    (tmp_path / "fp16" / "train_done.json").unlink()
    generator, reward, _ = load_models(tiny_config, features=False)
    train(_SmallGradient(generator, reward, None), bank, TrainSettings.from_config(
        tiny_config["train"] | {"steps": 3, "mixed_precision": "fp16"}, seed=0), tmp_path / "fp16", identity=RUN,
        log=lambda *_: None)
    resumed = json.loads((tmp_path / "fp16" / "checkpoints" / "checkpoint-3" / "training_state.json").read_text())
    assert resumed["grad_scaler"]["scale"] == 1024.0
