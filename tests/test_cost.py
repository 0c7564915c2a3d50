"""Compute-cost report: real architectures on the meta device, FLOP counting, the timing protocol, the table,
the GPU profiling command and the drift benchmark (tiny real models; nothing asserts on wall time)."""

import importlib.util
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from drpo.cost.architectures import (
    HPSV3_TEXT_TOKENS,
    build_generator,
    build_hpsv3,
    build_pickscore,
)
from drpo.config import load_config, merge
from drpo.cost.flops import Models, UpdateShape, analytic_table, count, micro_step_flops, paper_models, speedups
from drpo.cost.profile import SectionTimer, peak_memory, profile_updates, summarize
from drpo.cost.report import PAPER, cost_table, drpo_settings, measure_miniature, write_report
from drpo.drift import drift_loss
from drpo.features.latent_mae import LatentMAEFeatures
from drpo.generators import load_generator
from drpo.lora import add_lora
from drpo.methods import build_method
from drpo.methods.base import COMPONENTS
from drpo.reference import OnlineReference, build_reference_bank
from drpo.rewards import PickScoreReward
from drpo.train import TrainSettings, grad_scaler, prompt_batches, update

from conftest import PROMPTS

REPO = Path(__file__).resolve().parents[1]
DEFAULT = load_config(REPO / "config.yaml")
TINY_UPDATE = UpdateShape(processes=4, accumulation=2, candidates=4, drpo=drpo_settings(DEFAULT, 1, 1),
                          online_reference=True, reward_checkpointing=True)


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _base_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for name, p in module.named_parameters() if ".lora_" not in name)


def test_real_architectures_have_the_published_parameter_counts():
    sd, lora = build_generator("sd-turbo")
    sdxl, _ = build_generator("sdxl-turbo")
    assert _base_params(sd.unet) == 865_910_724  # SD-2.1 UNet
    assert _base_params(sdxl.unet) == 2_567_463_684  # SDXL UNet
    assert sum(p.numel() for p in lora) == 3_319_808  # r16 on to_q/k/v/out.0 of the SD-2.1 UNet
    assert all(p.device.type == "meta" and p.dtype == torch.float32 for p in lora)
    # Qwen2-VL-7B-Instruct is 8.29 B parameters with its 152064 x 3584 LM head, which HPSv3 does not use.
    hpsv3 = build_hpsv3()
    assert sum(p.numel() for p in hpsv3.model.parameters()) == 8_291_375_616 - 152064 * 3584
    clip_h = sum(p.numel() for p in build_pickscore().model.parameters())
    assert abs(clip_h - 986.1e6) < 1e6  # OpenCLIP ViT-H/14


def test_hpsv3_sees_256_visual_tokens_of_a_512px_image():
    reward = build_hpsv3()
    assert reward.visual_tokens(512, 512) == 256
    patches, grid = reward.preprocess(torch.zeros(2, 3, 512, 512, device="meta"))
    assert tuple(patches.shape) == (2 * 32 * 32, 3 * 2 * 14 * 14)
    assert grid.tolist() == [[1, 32, 32]] * 2


def test_hpsv3_forward_flops_are_two_per_parameter_and_token():
    reward = build_hpsv3()
    visual = sum(p.numel() for p in reward.model.visual.parameters())
    language = sum(p.numel() for p in reward.model.language_model.parameters())
    language -= reward.model.language_model.embed_tokens.weight.numel()  # a lookup, no FLOPs
    _, flops = count(reward._score, torch.zeros(1, 3, 512, 512, device="meta"), ["a cat"], None)
    dense = 2 * (visual * 32 * 32 + language * (256 + HPSV3_TEXT_TOKENS))
    assert 1.0 < flops / dense < 1.15  # the rest is attention scores


def test_flops_of_the_two_methods_differ_only_where_the_reward_is_differentiated():
    models = paper_models("sd-turbo", "pickscore", tiny=True)
    drpo = micro_step_flops("drpo", models, TINY_UPDATE)
    plain = micro_step_flops("draft", models, replace(TINY_UPDATE, reward_checkpointing=False))
    ckpt = micro_step_flops("draft", models, TINY_UPDATE)
    for component in ("text_encode", "student_generate", "reference_generate", "vae_decode", "reward_score"):
        assert drpo[component] == plain[component] == ckpt[component] > 0
    assert drpo["features"] > 0 and drpo["loss"] > 0 and plain["features"] == plain["loss"] == 0
    assert plain["backward"] > drpo["backward"]
    # checkpointing recomputes the reward's layers in backward: up to one extra reward forward
    extra = ckpt["backward"] - plain["backward"]
    assert 0.5 * drpo["reward_score"] < extra <= drpo["reward_score"]
    doubled = micro_step_flops("drpo", models, replace(TINY_UPDATE, candidates=8))
    assert doubled["student_generate"] == 2 * drpo["student_generate"]


def test_analytic_table_scales_a_micro_step_to_the_matched_batch():
    table = analytic_table(["sd-turbo"], ["hpsv3"], TINY_UPDATE, tiny=True, log=lambda _: None)
    assert set(table["component"]) == set(COMPONENTS)
    assert len(table) == 3 * len(COMPONENTS)  # DrPO, DRaFT, DRaFT with checkpointing
    ratios = speedups(table)
    assert list(ratios["reward_checkpointing"]) == [False, True]
    assert (ratios["speedup"] > 1).all()
    assert ratios["speedup"].iloc[1] > ratios["speedup"].iloc[0]


@pytest.fixture()
def tiny_cpu_models(tiny_models) -> Models:
    generator = load_generator(tiny_models["generator"], "sd-turbo")
    params = add_lora(generator.unet, rank=4, alpha=4)
    reward = PickScoreReward(tiny_models["reward"])
    features = LatentMAEFeatures(tiny_models["mae"], keys=["layer2_mean", "layer2_std", "layer4_mean"])
    return Models(generator, params, reward, features)


def _profiled(tiny_config, models, names, **draft):
    """The methods and train settings the cost report would profile: the training code's, K = 4, 2 prompts."""
    config = merge(tiny_config, {"train": {"candidates": 4, "prompts_per_step": 2},
                                 "drpo": {"num_pos": 1, "num_neg": 1}, "draft": draft})
    methods = [build_method(name, models.generator, models.reward, models.features, config) for name in names]
    return methods, TrainSettings.from_config(config["train"], seed=0)


@pytest.mark.parametrize("method", ["drpo", "draft"])
def test_profiled_updates_time_every_component_and_train_the_lora(tiny_config, tiny_cpu_models, method):
    before = [p.detach().clone() for p in tiny_cpu_models.params]
    methods, settings = _profiled(tiny_config, tiny_cpu_models, [method])
    source = OnlineReference(tiny_cpu_models.generator, PROMPTS, candidates=4, seed=0)
    timings = profile_updates(methods, tiny_cpu_models.params, source, settings, warmup=0, updates=2,
                              online_reference=True)
    summary = summarize(timings).set_index("component")
    assert list(summary.index) == [*COMPONENTS, "update"]
    assert (summary["updates"] == 2).all()
    ran = {"drpo": set(COMPONENTS), "draft": set(COMPONENTS) - {"rank_select", "features"}}[method]
    assert (summary.loc[sorted(ran), "min_s"] > 0).all()
    assert (summary.loc[sorted(set(COMPONENTS) - ran), "max_s"] == 0).all()
    parts = summary.loc[list(COMPONENTS), "median_s"].sum()
    assert parts <= summary.loc["update", "max_s"] * len(timings["update"].unique())  # sections never overlap
    assert any(not torch.equal(a, b) for a, b in zip(before, tiny_cpu_models.params))
    assert methods[0].measure("loss").__class__.__name__ == "nullcontext"  # the timer is detached afterwards


def test_the_timed_update_computes_the_methods_own_loss(tiny_config, tiny_cpu_models):
    methods, settings = _profiled(tiny_config, tiny_cpu_models, ["drpo", "draft"])
    source = OnlineReference(tiny_cpu_models.generator, PROMPTS, candidates=4, seed=0)
    cells = [(0, 0), (1, 0)]  # the first profiled update: prompts 0 and 1, noise set 0
    for method in methods:  # one at a time: each update moves the shared LoRA
        losses = [method.loss(batch)[0].item() for batch in prompt_batches(source, cells, None)]
        timings = profile_updates([method], tiny_cpu_models.params, source, settings, warmup=0, updates=1,
                                  online_reference=True)
        assert timings["loss"].iloc[0] == pytest.approx(sum(losses) / len(losses), rel=1e-6)


def test_draft_streamed_one_candidate_per_backward_gives_the_same_update(tiny_config, tiny_cpu_models):
    params = tiny_cpu_models.params
    start = [p.detach().clone() for p in params]
    bank = build_reference_bank(tiny_cpu_models.generator, PROMPTS[:2], candidates=4, noise_sets=1, seed=0,
                                batch_size=8)
    steps = []
    for chunk in (None, 1):
        (method,), settings = _profiled(tiny_config, tiny_cpu_models, ["draft"], candidates_per_backward=chunk)
        logs = update(method, prompt_batches(bank, [(0, 0), (1, 0)], None), params,
                      torch.optim.SGD(params, lr=1.0), grad_scaler(settings, method.generator.device), settings)
        steps.append((torch.cat([(p - s).flatten() for p, s in zip(params, start)]), logs))
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
    (whole, whole_logs), (streamed, streamed_logs) = steps
    assert whole.abs().sum() > 0
    assert (whole - streamed).norm() < 1e-5 * whole.norm()
    assert streamed_logs["loss"] == pytest.approx(whole_logs["loss"], rel=1e-6)


def test_bank_protocol_samples_the_reference_before_the_timer(tiny_config, tiny_cpu_models):
    methods, settings = _profiled(tiny_config, tiny_cpu_models, ["drpo"])
    source = OnlineReference(tiny_cpu_models.generator, PROMPTS, candidates=4, seed=0)
    summary = summarize(profile_updates(methods, tiny_cpu_models.params, source, settings, warmup=0, updates=1,
                                        online_reference=False))
    assert summary.set_index("component").loc["reference_generate", "max_s"] == 0


def test_nested_sections_count_toward_the_outer_one():
    timer = SectionTimer("cpu")
    with timer("backward"):
        with timer("reward_score"):  # e.g. a checkpointed reward recomputed inside the backward pass
            pass
    assert set(timer.seconds) == {"backward"}
    with pytest.raises(ValueError, match="unknown component"):
        with timer("forward"):
            pass


def test_peak_memory_counts_live_tensors_on_cpu():
    def work():
        a = torch.ones(1000, 1000)  # 4 MB
        b = a * 2  # 4 MB more while a is alive
        del a
        return b + 1  # a is gone: still 8 MB at most

    out, peak = peak_memory(work, "cpu")
    assert peak == 8_000_000 and out.shape == (1000, 1000)


def test_cost_table_and_figure(tmp_path, tiny_config, tiny_cpu_models):
    analytic = analytic_table(["sd-turbo"], ["pickscore"], TINY_UPDATE, tiny=True, log=lambda _: None)
    analytic.to_csv(tmp_path / "analytic.csv", index=False)
    methods, settings = _profiled(tiny_config, tiny_cpu_models, ["drpo", "draft"])
    source = OnlineReference(tiny_cpu_models.generator, PROMPTS, candidates=4, seed=0)
    measured = summarize(profile_updates(methods, tiny_cpu_models.params, source, settings, warmup=0, updates=1,
                                         online_reference=True))
    measured = measured.assign(setting="tiny", device="cpu")
    measured.to_csv(tmp_path / "measured.csv", index=False)
    table = write_report(tmp_path / "analytic.csv", [tmp_path / "measured.csv"], tmp_path / "table.csv",
                         tmp_path / "figure.png")
    assert list(table["source"].unique()) == ["analytic (ours)", "measured (ours)", "paper"]
    assert (table[table["method"] == "draft"]["speedup"] == 1).all()
    paper = table[table["source"] == "paper"].set_index("method")
    assert paper.loc["drpo", "speedup"] == pytest.approx(PAPER["draft"]["update"] / PAPER["drpo"]["update"])
    assert paper.loc["drpo", "backward_share"] == pytest.approx(0.34 / 6.17)
    analytic_rows = table[table["source"] == "analytic (ours)"]
    assert list(analytic_rows["update"]) == pytest.approx(list(analytic_rows[list(COMPONENTS)].sum(axis=1)))
    assert pd.read_csv(tmp_path / "table.csv").shape == table.shape
    assert Image.open(tmp_path / "figure.png").size[0] > 500


def test_measured_miniature_writes_one_block_per_draft_chunk(tiny_config, tmp_path):
    tiny_config["cost"]["measured"] = {
        "candidates": 4, "accumulation": 1, "num_pos": 1, "num_neg": 1, "warmup": 0, "updates": 1, "seed": 0,
        "online_reference": True, "draft_chunks": [1, 4], "reward_hidden": 48, "reward_layers": 2, "threads": 1}
    rows = [{"prompt": prompt} for prompt in PROMPTS]
    summary = measure_miniature(tiny_config, rows, tmp_path / "measured.csv", log=lambda _: None)
    settings = list(summary["setting"].unique())
    assert len(settings) == 2
    assert "DRaFT 1 candidate per backward" in settings[0] and "DRaFT 4 candidates per backward" in settings[1]
    assert settings[0].startswith("configured models + reward CLIP 48x2")  # configured models, sized reward
    table = cost_table(None, [summary])
    assert len(table) == 6  # two measured blocks and the paper's


def test_gpu_command_fails_fast_without_cuda_and_runs_tiny_on_cpu(tmp_path, capsys):
    script = _load(REPO / "scripts" / "profile_gpu.py", "profile_gpu")
    if not torch.cuda.is_available():
        assert script.main(["--out", str(tmp_path / "gpu.csv")]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    out = tmp_path / "tiny.csv"
    assert script.main(["--tiny", "--out", str(out), "--rewards", "pickscore", "--candidates", "2",
                        "--num-pos", "1", "--num-neg", "1", "--accumulation", "1", "--warmup", "0",
                        "--updates", "1"]) == 0
    csv = pd.read_csv(out)
    assert set(csv["method"]) == {"drpo", "draft"}
    assert csv["device"].str.startswith("cpu").all()
    assert {"setting", "median_s", "min_s", "max_s", "peak_memory_gb"} <= set(csv.columns)


def test_plain_drift_reference_agrees_with_ours():
    bench = _load(REPO / "benchmarks" / "drift_bench.py", "drift_bench")
    settings = drpo_settings(load_config(REPO / "config.yaml", REPO / "configs" / "sd-turbo.yaml"), 2, 2)
    for name, (ours, plain) in bench.cases(6, 2, 2, 4, 32, torch.device("cpu"), settings).items():
        a, b = ours(), plain()  # [loss, gradient...]
        assert torch.isclose(a[0], b[0], rtol=1e-5), name
        assert (a[1:] - b[1:]).norm() < 1e-4 * b[1:].norm(), name
    g = torch.Generator().manual_seed(1)
    x, p, q = (torch.randn(n, 16, generator=g) for n in (12, 4, 4))
    ours_loss, _ = drift_loss(x[None], p[None], q[None], positive_weight=3.0, negative_weight=2.0,
                              radii=(0.02, 0.05, 0.2), kernel="laplacian")
    assert torch.allclose(ours_loss[0], bench.plain_drift_loss(x, p, q, 3.0, 2.0, (0.02, 0.05, 0.2)), rtol=1e-5)
