"""The paper's baselines (DRaFT, VGGFlow, DPO-1step, GRPO-1step, PSO): the direction each loss pushes,
its edge cases, the refusal of non-differentiable rewards, and short runs through the shared loop."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from drpo.config import merge
from drpo.lora import add_lora
from drpo.methods import build_method
from drpo.methods.base import PromptBatch
from drpo.methods.dpo import dpo_logit, set_score
from drpo.methods.draft import differentiable_scores
from drpo.methods.grpo import neighbor_group, neighbor_grpo_loss, neighbor_log_probs, quasi_norm_advantages
from drpo.methods.pso import clipped_log_ratio, gaussian_log_prob, pso_loss
from drpo.methods.vggflow import clip_by_norm, reward_gradient, vggflow_target
from drpo.pipeline import load_models
from drpo.reference import build_reference_bank
from drpo.rewards import Reward
from drpo.train import TrainSettings, train

from conftest import PROMPTS


class Brightness(Reward):
    """A black-box reward: mean pixel value (not differentiable by declaration)."""

    name = "brightness"

    def _score(self, images, prompts, metadata):
        return images.mean(dim=(1, 2, 3))


def _models(config):
    generator, reward, _ = load_models(config, features=False)
    return generator, reward


def _batch(generator, k=4, prompt=PROMPTS[0], seed=0):
    noise = generator.make_noise(k, generator=torch.Generator().manual_seed(seed))
    reference = generator.sample(generator.encode_prompts([prompt]), noise, adapters=False)
    return PromptBatch(prompt, noise, reference)


def _sgd(params, lr):
    with torch.no_grad():
        for p in params:
            p -= lr * p.grad
            p.grad = None


# ----------------------------------------------------------------------------------- DPO-1step
def test_dpo_step_moves_policy_toward_chosen_and_away_from_rejected():
    torch.manual_seed(0)
    policy = torch.randn(6, 4, 2, 2, requires_grad=True)
    reference = torch.randn(6, 4, 2, 2)
    chosen, rejected = torch.randn(2, 4, 2, 2) + 1, torch.randn(2, 4, 2, 2) - 1
    (-F.logsigmoid(dpo_logit(policy, reference, chosen, rejected, beta=30.0))).backward()
    # The quadratic terms cancel: every latent moves along mean(C) - mean(R).
    direction = (chosen.mean(0) - rejected.mean(0)).flatten()
    for g in policy.grad:
        assert F.cosine_similarity(-g.flatten(), direction, dim=0) > 0.999
    before = (set_score(policy, chosen).item(), set_score(policy, rejected).item())
    _sgd([policy], lr=0.1)
    assert set_score(policy, chosen) > before[0] and set_score(policy, rejected) < before[1]


def test_dpo_with_every_candidate_alike_has_no_preference_to_learn(tiny_config):
    class AllFail(Reward):
        name = "all_fail"

        def _score(self, images, prompts, metadata):
            return torch.zeros(len(images))

    generator, _ = _models(tiny_config)
    params = add_lora(generator.unet, rank=4, alpha=4)
    method = build_method("dpo", generator, AllFail(), None, tiny_config | {"dpo": {"num_pos": 2, "num_neg": 2,
                                                                                   "beta": 30.0}})
    loss, logs = method.loss(_batch(generator))
    loss.backward()
    assert logs["tied"] == 1.0 and loss.item() == 0.0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in params)


def test_dpo_set_score_averages_over_all_pairs():
    points, targets = torch.tensor([[0.0, 0.0], [2.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    assert set_score(points, targets).item() == pytest.approx(-(2.0 + 4.0) / 2)


# ----------------------------------------------------------------------------------- GRPO-1step
def test_grpo_advantages_are_quasi_norm_scaled_clipped_and_zero_for_ties():
    rewards = torch.tensor([3.0, 1.0, 1.0, 1.0])
    centred = torch.tensor([1.5, -0.5, -0.5, -0.5])
    norm = (1.5**0.8 + 3 * 0.5**0.8) ** (1 / 0.8)
    torch.testing.assert_close(quasi_norm_advantages(rewards, p=0.8, clip=5.0), 2 * centred / norm)
    torch.testing.assert_close(quasi_norm_advantages(2 * rewards + 3, p=0.8, clip=5.0),
                               quasi_norm_advantages(rewards, p=0.8, clip=5.0))
    assert quasi_norm_advantages(rewards, p=0.8, clip=0.3).abs().max().item() == pytest.approx(0.3)
    assert torch.equal(quasi_norm_advantages(torch.full((5,), 0.7), p=0.8, clip=5.0), torch.zeros(5))


def test_grpo_neighbor_noise_is_correlated_and_deterministic_per_batch():
    noise = torch.randn(8, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    group, anchors = neighbor_group(noise, sigma=0.3, num_anchors=4)
    again, same_anchors = neighbor_group(noise.clone(), sigma=0.3, num_anchors=4)
    other, _ = neighbor_group(noise + 1e-3, sigma=0.3, num_anchors=4)
    assert torch.equal(group, again) and torch.equal(anchors, same_anchors)
    assert not torch.allclose(group - math.sqrt(1 - 0.09) * noise[:1], other - math.sqrt(1 - 0.09) * noise[:1])
    assert len(set(anchors.tolist())) == 4 and anchors.max() < 8
    deltas = (group - math.sqrt(1 - 0.09) * noise[:1]) / 0.3
    assert deltas.std().item() == pytest.approx(1.0, abs=0.05)  # 8192 N(0, 1) draws
    assert group.std().item() == pytest.approx(1.0, abs=0.05)  # each z_k is still N(0, I)


def test_grpo_step_moves_anchor_toward_the_high_advantage_candidate():
    e = torch.zeros(1, 4, 2, 2)
    e[0, 0] = 1.0
    candidates = torch.cat([e, -e, 0.5 * e.roll(1, dims=1)])
    anchor = torch.zeros(1, 4, 2, 2, requires_grad=True)
    advantages = torch.tensor([1.0, -1.0, 0.0])
    loss, ratio = neighbor_grpo_loss(candidates, anchor, anchor.detach(), advantages,
                                     temperature=1.0, clip_range=0.2, max_log_ratio=10.0)
    torch.testing.assert_close(ratio, torch.ones(1, 3))  # one update per rollout: ratio starts at 1
    loss.backward()
    distance = lambda x, c: (x - c).square().mean().item()  # noqa: E731
    before = (distance(anchor, candidates[0]), distance(anchor, candidates[1]))
    probs = neighbor_log_probs(candidates, anchor, 1.0).exp()
    _sgd([anchor], lr=1.0)
    assert distance(anchor, candidates[0]) < before[0] and distance(anchor, candidates[1]) > before[1]
    after = neighbor_log_probs(candidates, anchor, 1.0).exp()
    assert after[0, 0] > probs[0, 0] and after[0, 1] < probs[0, 1]


def test_grpo_rolls_out_the_neighbor_group_and_regularises_anchors_to_the_base(tiny_config):
    generator, reward = _models(tiny_config)
    batch = _batch(generator, k=6)
    config = tiny_config | {"grpo": tiny_config["grpo"] | {"num_anchors": 3}}
    loss, logs = build_method("grpo", generator, reward, None, config).loss(batch)
    group, _ = neighbor_group(batch.noise, sigma=0.3, num_anchors=3)
    latents = generator.sample(generator.encode_prompts([batch.prompt]), group, adapters=False)
    expected = reward.score(generator.decode(latents), [batch.prompt] * 6)
    assert logs["reward_mean"] == pytest.approx(expected.mean().item(), rel=1e-5)
    # The ratio starts at 1 up to float32 noise: the old samples come from a batch of K, the current ones from a batch
    # of the anchors, and the kernel's log-probabilities amplify a few ulps (0.999997 on a 2-core machine).
    assert logs["ratio_mean"] == pytest.approx(1.0, abs=1e-4) and logs["reference_l2"] == pytest.approx(0.0, abs=1e-12)
    advantages = quasi_norm_advantages(expected, p=0.8, clip=5.0)
    assert loss.item() == pytest.approx(-advantages.mean().item(), abs=1e-6)  # ratio 1: loss = −mean A


def test_grpo_zero_advantages_give_zero_gradient():
    candidates = torch.randn(5, 4, 2, 2)
    anchors = torch.randn(2, 4, 2, 2, requires_grad=True)
    loss, _ = neighbor_grpo_loss(candidates, anchors, anchors.detach(), torch.zeros(5),
                                 temperature=1.0, clip_range=0.2, max_log_ratio=10.0)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(anchors.grad) == 0


# ----------------------------------------------------------------------------------- PSO
def test_pso_step_raises_the_winners_log_ratio():
    torch.manual_seed(0)
    reference = torch.randn(2, 4, 2, 2)
    means = (reference + 0.001 * torch.randn_like(reference)).requires_grad_(True)
    actions = means.detach() + 0.05 * torch.randn_like(reference)
    rewards = torch.tensor([0.2, 0.9])  # the second sample wins

    def log_ratio():
        return clipped_log_ratio(gaussian_log_prob(actions, means, 0.05),
                                 gaussian_log_prob(actions, reference, 0.05), clip_range=0.1)

    before = log_ratio().detach()
    loss, decided = pso_loss(log_ratio(), rewards, beta=50.0)
    loss.backward()
    assert decided.tolist() == [True]
    _sgd([means], lr=1e-5)
    after = log_ratio().detach()
    assert after[1] > before[1] and after[0] < before[0]


def test_pso_gradient_vanishes_outside_the_clip_range_and_ties_give_zero_loss():
    reference = torch.zeros(4, 4, 2, 2)
    actions = torch.zeros(4, 4, 2, 2)
    far = torch.full((4, 4, 2, 2), 0.05, requires_grad=True)  # log-ratio −0.5, far below log(0.9)
    ratio = clipped_log_ratio(gaussian_log_prob(actions, far, 0.05),
                              gaussian_log_prob(actions, reference, 0.05), clip_range=0.1)
    torch.testing.assert_close(ratio, torch.full((4,), math.log(0.9)))
    pso_loss(ratio, torch.tensor([1.0, 0.0, 0.0, 1.0]), beta=50.0)[0].backward()
    assert torch.count_nonzero(far.grad) == 0

    near = torch.full((4, 4, 2, 2), 0.001, requires_grad=True)
    tied = clipped_log_ratio(gaussian_log_prob(actions, near, 0.05),
                             gaussian_log_prob(actions, reference, 0.05), clip_range=0.1)
    loss, decided = pso_loss(tied, torch.tensor([0.5, 0.5, 0.3, 0.3]), beta=50.0)
    assert loss.item() == 0.0 and loss.grad_fn is not None and not decided.any()
    loss.backward()
    assert torch.count_nonzero(near.grad) == 0


def test_pso_scores_actions_around_the_sample_along_the_standardized_noise(tiny_config):
    generator, reward = _models(tiny_config)
    batch = _batch(generator, k=4)
    _, logs = build_method("pso", generator, reward, None, tiny_config).loss(batch)
    dims = (1, 2, 3)
    unit = (batch.noise - batch.noise.mean(dims, keepdim=True)) / batch.noise.std(dims, keepdim=True, correction=0)
    expected = reward.score(generator.decode(batch.reference + 0.05 * unit), [batch.prompt] * 4)
    assert logs["reward_mean"] == pytest.approx(expected.mean().item(), rel=1e-5)
    assert logs["log_ratio_mean"] == pytest.approx(0.0, abs=1e-6)  # without LoRA the policy is the reference


def test_pso_odd_k_raises(tiny_config):
    generator, reward = _models(tiny_config)
    method = build_method("pso", generator, reward, None, tiny_config)
    with pytest.raises(ValueError, match="K must be even, got K=3"):
        method.loss(_batch(generator, k=3))


# ----------------------------------------------------------------------------------- VGGFlow
def test_clip_by_norm_caps_large_gradients_only():
    g = torch.stack([torch.full((4, 2, 2), 3.0), torch.full((4, 2, 2), 0.01)])  # norms 12 and 0.04
    clipped = clip_by_norm(g, threshold=1.0)
    torch.testing.assert_close(clipped.flatten(1).norm(dim=1), torch.tensor([1.0, 0.04]))
    torch.testing.assert_close(clipped[0], g[0] / 12)


def test_vggflow_target_is_reference_plus_scaled_clipped_reward_gradient(tiny_config):
    generator, reward = _models(tiny_config)
    method = build_method("vggflow", generator, reward, None, merge(tiny_config, {"vggflow": {"decode_chunk_size": 3}}))
    batch = _batch(generator, k=4)
    latents = generator.sample(generator.encode_prompts([batch.prompt]), batch.noise, adapters=False)
    scores, g = reward_gradient(generator, reward, latents, batch.prompt, None, score_scale=100.0, chunk_size=3)

    # The chunked gradient is the gradient of 100 x the reward, and it increases the reward.
    leaf = latents.clone().requires_grad_(True)
    full = reward.score(generator.decode(leaf), [batch.prompt] * 4, with_grad=True)
    torch.testing.assert_close(g, torch.autograd.grad(100 * full.sum(), leaf)[0], rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(scores, full.detach())
    step = 1e-2 * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert (reward.score(generator.decode(latents + step), [batch.prompt] * 4) > scores).all()

    tau = g.flatten(1).norm(dim=1).median().item()  # some samples clipped, some not
    target = vggflow_target(batch.reference, g, reward_scale=1000.0, threshold=tau)
    expected = [batch.reference[i] + 1000.0 * g[i] * min(1.0, tau / g[i].norm().item()) for i in range(4)]
    torch.testing.assert_close(target, torch.stack(expected))

    # The method's loss regresses its (LoRA-free = base) latents onto exactly this target at tau = 1.
    loss, logs = method.loss(batch)
    target = vggflow_target(batch.reference, g, reward_scale=1000.0, threshold=1.0)
    assert loss.item() == pytest.approx((latents - target).square().mean().item(), rel=1e-4)
    assert logs["clip_threshold"] == 1.0


def test_vggflow_threshold_becomes_the_quantile_of_the_last_micro_step_norms(tiny_config):
    generator, reward = _models(tiny_config)
    method = build_method("vggflow", generator, reward, None, tiny_config)
    batches = [_batch(generator, prompt=PROMPTS[i], seed=i) for i in range(3)]
    b = batches[1]  # the update's last micro-step (the original's sync step)
    latents = generator.sample(generator.encode_prompts([b.prompt]), b.noise, adapters=False)
    _, g = reward_gradient(generator, reward, latents, b.prompt, None, score_scale=100.0, chunk_size=4)
    expected = torch.quantile(g.flatten(1).norm(dim=1), 0.8).item()

    logs = [method.loss(b)[1] for b in batches[:2]]
    method.end_update()  # the shared loop calls it after the optimizer step
    logs.append(method.loss(batches[2])[1])
    # Both micro-steps of update 1 use the initial tau; tau changes only once the update is complete.
    assert [entry["clip_threshold"] for entry in logs] == [1.0, 1.0, pytest.approx(expected, rel=1e-4)]
    restored = build_method("vggflow", generator, reward, None, tiny_config)
    restored.load_state_dict(method.state_dict())
    assert restored.clip_threshold == method.clip_threshold == pytest.approx(expected, rel=1e-4)


def test_vggflow_threshold_is_one_value_from_the_norms_of_every_process(tiny_config, tmp_path):
    # Two CPU processes (torchrun, gloo) train two updates of two micro-steps each through the shared loop.
    config = merge(tiny_config, {"train": {"steps": 2, "prompts_per_step": 4, "candidates": 4, "checkpoint_every": 1}})
    (tmp_path / "config.json").write_text(json.dumps(config))
    worker = Path(__file__).with_name("vggflow_process.py")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(worker),
                    str(tmp_path / "config.json"), str(tmp_path)], check=True, timeout=600,
                   env=os.environ | {"OMP_NUM_THREADS": "1"})
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(len(r["norms"]) == 4 for r in ranks)  # 2 updates x 2 micro-steps in each process
    assert ranks[0]["norms"][1] != ranks[1]["norms"][1]  # the processes trained different prompts
    for update in (1, 2):
        last = torch.tensor([ranks[r]["norms"][2 * update - 1] for r in range(2)]).flatten()
        expected = torch.quantile(last, 0.8).item()
        checkpoint = tmp_path / "run" / "checkpoints" / f"checkpoint-{update}"
        state = json.loads((checkpoint / "training_state.json").read_text())
        assert state["method_state"]["clip_threshold"] == pytest.approx(expected, rel=1e-6)
    assert ranks[0]["tau"] == ranks[1]["tau"] == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------------- DRaFT
def test_draft_gradient_step_increases_the_reward(tiny_config):
    generator, reward = _models(tiny_config)
    params = add_lora(generator.unet, rank=4, alpha=4)
    method = build_method("draft", generator, reward, None, merge(tiny_config, {"draft": {"decode_chunk_size": 3}}))
    batch = _batch(generator, k=4)

    def mean_reward() -> float:
        with torch.no_grad():
            latents = generator.sample(generator.encode_prompts([batch.prompt]), batch.noise)
            return reward.score(generator.decode(latents), [batch.prompt] * 4).mean().item()

    before = mean_reward()
    loss, logs = method.loss(batch)
    assert loss.item() == pytest.approx(-100 * logs["reward_mean"], rel=1e-5)
    assert logs["reference_l2"] == pytest.approx(0.0, abs=1e-10)  # LoRA starts as the identity
    loss.backward()
    norm = torch.sqrt(sum(p.grad.square().sum() for p in params))
    assert norm > 0
    _sgd(params, lr=1e-2 / norm.item())
    assert mean_reward() > before


def test_draft_chunked_scores_match_one_pass_with_the_same_gradient(tiny_config):
    generator, reward = _models(tiny_config)
    batch = _batch(generator, k=4)
    grads, values = [], []
    for chunk in (1, 4):
        leaf = batch.reference.clone().requires_grad_(True)
        scores = differentiable_scores(generator, reward, leaf, batch.prompt, None, chunk)
        scores.sum().backward()
        grads.append(leaf.grad)
        values.append(scores.detach())
    torch.testing.assert_close(values[0], values[1])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-9)


# ----------------------------------------------------------------------------------- refusal
@pytest.mark.parametrize("name", ["draft", "vggflow"])
def test_reward_gradient_methods_refuse_a_non_differentiable_reward(tiny_config, name):
    generator, _ = _models(tiny_config)
    with pytest.raises(ValueError, match=f"'{name}'.*'brightness'"):
        build_method(name, generator, Brightness(), None, tiny_config)


def test_ranking_methods_accept_a_non_differentiable_reward(tiny_config):
    generator, _ = _models(tiny_config)
    add_lora(generator.unet, rank=4, alpha=4)
    build_method("drpo", generator, Brightness(), None, tiny_config)
    config = tiny_config | {"dpo": {"num_pos": 1, "num_neg": 1, "beta": 30.0}}
    for name in ("dpo", "grpo", "pso"):
        method = build_method(name, generator, Brightness(), None, config)
        loss, _ = method.loss(_batch(generator, k=4))
        assert torch.isfinite(loss) and loss.requires_grad


# ----------------------------------------------------------------------------------- shared loop
@pytest.mark.parametrize("name", ["draft", "vggflow", "dpo", "grpo", "pso"])
def test_two_updates_through_the_training_loop(tiny_config, tmp_path, name):
    config = tiny_config | {
        "train": tiny_config["train"] | {"steps": 2, "prompts_per_step": 1, "candidates": 4, "checkpoint_every": 1},
        "dpo": {"num_pos": 1, "num_neg": 1, "beta": 30.0},
        "grpo": tiny_config["grpo"] | {"num_anchors": 2},
    }
    generator, reward = _models(config)
    method = build_method(name, generator, reward, None, config)
    bank = build_reference_bank(generator, PROMPTS[:2], candidates=4, noise_sets=1, seed=0, batch_size=8)
    train(method, bank, TrainSettings.from_config(config["train"], seed=0), tmp_path, identity={"method": name},
          log=lambda *_: None)

    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["checkpoint-1", "checkpoint-2"]
    weights = load_file(str(tmp_path / "checkpoints" / "checkpoint-2" / "pytorch_lora_weights.safetensors"))
    assert any(key.endswith("lora.up.weight") and value.abs().sum() > 0 for key, value in weights.items())
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in records)
