"""Per-method train settings (train.per_method) and the paper's per-method recipes as presets (issue 17, item 2):
configs/sd-turbo-recipes.yaml and configs/sdxl-turbo-recipes.yaml, each merged over its paper preset."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from drpo.assets import required_assets
from drpo.config import ConfigError, load_config, merge, method_train, validate_config, variant_config
from drpo.pipeline import run_identity, run_settings
from drpo.train import TrainSettings

from conftest import paper_prompts_override

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--directory", str(REPO), "--snakefile", str(REPO / "Snakefile")]
METHODS = ["drpo", "draft", "dpo", "grpo", "pso", "vggflow"]
# (steps, processes, prompts per update, K, learning rate, precision) of each method's script.
SD_TURBO = {  # method spec 3.1 and 3.3
    "drpo": (1000, 4, 32, 24, 1e-4, "fp16"), "draft": (1000, 4, 32, 24, 1e-5, "fp16"),
    "dpo": (1000, 4, 32, 24, 1e-4, "fp16"), "grpo": (5000, 8, 32, 24, 1e-5, "bf16"),
    "pso": (1000, 4, 32, 24, 1e-5, "fp16"), "vggflow": (1000, 4, 32, 8, 1e-4, "fp16"),
}
SDXL_TURBO = {  # method spec 3.2 and 3.4; dpo, pso and vggflow: the preset's decision (no SDXL trainers)
    "drpo": (5000, 4, 32, 16, 1e-5, "bf16"), "draft": (5000, 4, 32, 24, 1e-5, "bf16"),
    "grpo": (5000, 4, 32, 24, 1e-5, "bf16"), "dpo": (5000, 4, 32, 24, 1e-5, "bf16"),
    "pso": (5000, 4, 32, 24, 1e-5, "bf16"), "vggflow": (5000, 4, 32, 8, 1e-5, "bf16"),
}
PRESETS = {"sd-turbo": SD_TURBO, "sdxl-turbo": SDXL_TURBO}


def _recipes(base: str, overrides: dict | None = None) -> dict:
    return load_config(REPO / "config.yaml", CONFIGS / f"{base}.yaml", CONFIGS / f"{base}-recipes.yaml",
                       overrides=overrides)


@pytest.mark.parametrize("base", PRESETS)
def test_each_method_resolves_to_its_own_script(base):
    config = _recipes(base)
    assert config["train"]["methods"] == METHODS
    for method, (steps, processes, prompts, k, lr, precision) in PRESETS[base].items():
        train = method_train(config["train"], method)
        assert (train["steps"], train["processes"], train["prompts_per_step"], train["candidates"],
                train["learning_rate"], train["mixed_precision"]) == (steps, processes, prompts, k, lr, precision), \
            method
        settings = TrainSettings.from_config(config["train"], seed=42, method=method)
        assert (settings.steps, settings.candidates, settings.learning_rate) == (steps, k, lr)


def test_grpo_runs_on_its_script_under_the_sd_turbo_recipes():
    config = _recipes("sd-turbo")
    train = run_settings(config, "grpo", 42)["train"]
    assert (train["steps"], train["mixed_precision"], train["learning_rate"]) == (5000, "bf16", 1e-5)
    assert method_train(config["train"], "grpo")["processes"] == 8
    assert run_settings(config, "grpo", 42)["grpo"]["reference_l2_weight"] == 0.02
    assert run_settings(config, "draft", 42)["train"]["steps"] == 1000
    # The matched-budget preset: DrPO's budget for every method, each with its own learning rate.
    matched = load_config(REPO / "config.yaml", CONFIGS / "sd-turbo.yaml",
                          overrides={"train": {"methods": METHODS}})
    for method in METHODS:
        train = method_train(matched["train"], method)
        assert (train["steps"], train["processes"], train["candidates"], train["mixed_precision"]) == (
            1000, 4, 24, "fp16"), method
        assert train["learning_rate"] == SD_TURBO[method][4], method


@pytest.mark.parametrize("base", PRESETS)
def test_drpo_keeps_the_base_presets_run(base):
    # Every value of DrPO's entry equals the base preset's: same params (repr, as Snakemake compares them), same run
    # identity, so a finished DrPO run of the base preset is resumed, not retrained.
    recipes, plain = _recipes(base), load_config(REPO / "config.yaml", CONFIGS / f"{base}.yaml")
    rows = [{"prompt": "a photo of a cat"}]
    assert repr(run_settings(recipes, "drpo", 42)) == repr(run_settings(plain, "drpo", 42))
    assert run_identity(recipes, "drpo", 42, rows) == run_identity(plain, "drpo", 42, rows)


@pytest.mark.parametrize("base", PRESETS)
def test_every_recipe_value_cites_the_spec(base):
    # Each value under train.per_method and in the method sections carries a comment naming its spec section.
    lines = (CONFIGS / f"{base}-recipes.yaml").read_text().splitlines()
    values = [line for line in lines if re.match(r"^\s+\w+: [^\s#{]", line) and "methods:" not in line]
    assert len(values) > 40
    assert [line for line in values if not re.search(r"# spec \d(\.\d)?\b", line)] == []


@pytest.mark.parametrize("base", PRESETS)
def test_the_asset_check_lists_what_the_recipes_need(base):
    # The recipes change training only: every model file each method needs is the base preset's (generator,
    # features, the PickScore target that DRaFT and VGGFlow differentiate, every evaluation reward).
    recipes, plain = _recipes(base), load_config(REPO / "config.yaml", CONFIGS / f"{base}.yaml")
    assets = [(a.path, a.what) for a in required_assets(recipes)]
    assert assets == [(a.path, a.what) for a in required_assets(plain)]
    paths = " ".join(path for path, _ in assets)
    for needed in (recipes["models"]["generator"]["path"], recipes["models"]["reward"]["path"], "CLIP-ViT-L-14",
                   "ImageReward"):
        assert needed in paths, needed


# ----------------------------------------------------------------------------------- bad entries fail when read
@pytest.mark.parametrize("per_method,methods,message", [
    ({"grpo": {"seeds": [1]}}, None, r"train.per_method.grpo.seeds: seeds cannot be set per method"),
    ({"grpo": {"methods": ["grpo"]}}, None, r"train.per_method.grpo.methods: methods cannot be set per method"),
    ({"drpo": {"reference": "bank"}}, None, r"train.per_method.drpo.reference: reference cannot be set per method"),
    ({"grpo": {"step": 5000}}, None, r"train.per_method.grpo.step: not a train setting; .* may set: steps, "),
    ({"grp0": {"steps": 5000}}, None, r"train.per_method: unknown method 'grp0'; valid names: \[.*'grpo'"),
    ({"grpo": {"mixed_precision": "fp8"}}, None, r"train.per_method.grpo.mixed_precision: 'fp8' is not one of"),
    ({"grpo": {"lora": {"rnk": 4}}}, None, r"train.per_method.grpo.lora: Additional properties .*'rnk'"),
    ({"grpo": {"steps": 50}}, ["drpo", "grpo"],
     r"train.checkpoint_every \(100\) exceeds train.per_method.grpo.steps \(50\)"),
    ({"grpo": {"processes": 3}}, ["grpo"],
     r"train.prompts_per_step \(32\) must be a multiple of train.per_method.grpo.processes \(3\)"),
    ({"pso": {"candidates": 7}}, ["pso"], r"train.per_method.pso.candidates must be even \(K = 7\)"),
    ({"dpo": {"candidates": 12}}, ["dpo"],
     r"dpo.num_pos \(8\) \+ dpo.num_neg \(8\) must not exceed train.per_method.dpo.candidates \(K = 12\)"),
])
def test_bad_per_method_entries_fail_when_the_config_is_read(per_method, methods, message):
    overrides = {"train": {"per_method": per_method} | ({"methods": methods} if methods else {})}
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "config.yaml", CONFIGS / "sd-turbo.yaml", overrides=overrides)


def test_a_command_line_entry_is_read_as_yaml_and_null_drops_a_presets_entry():
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["train"]["per_method"] = {"grpo": {"steps": "300", "lora": {"rank": "4"}}, "pso": None}
    validate_config(config)
    assert method_train(config["train"], "grpo")["steps"] == 300
    assert method_train(config["train"], "grpo")["lora"]["rank"] == 4
    assert method_train(config["train"], "pso") == config["train"]


def test_a_config_written_with_train_learning_rates_reads_as_per_method_entries():
    # A run's config.resolved.yaml from before train.per_method (scripts/judge_checkpoints.py reads them).
    current = load_config(REPO / "config.yaml", CONFIGS / "sd-turbo.yaml")
    old = merge(current, {"train": {"per_method": None}})
    del old["train"]["per_method"]
    old["train"]["learning_rates"] = {"draft": 1e-5, "grpo": 1e-5, "pso": 1e-5}
    with pytest.warns(FutureWarning, match="train.learning_rates is now train.per_method"):
        validate_config(old)
    assert old["train"]["per_method"] == current["train"]["per_method"]
    for method in METHODS:
        assert run_settings(old, method, 42) == run_settings(current, method, 42)


def test_an_ablation_variants_train_keys_win_over_drpos_entry():
    config = merge(_recipes("sd-turbo"), {"ablations": {"studies": {"k": {
        "title": "K", "plot": "line", "axis": "K", "variants": {"8": {"train": {"candidates": 8}},
                                                                "24": {"train": {"candidates": 24}}}}}}})
    config = merge(config, {"train": {"per_method": {"drpo": {"candidates": 16}}}})
    assert method_train(variant_config(config, "k", "8")["train"], "drpo")["candidates"] == 8
    assert method_train(variant_config(config, "k", "24")["train"], "drpo")["candidates"] == 24


# ----------------------------------------------------------------------------------- the workflow
def _dry_run(tmp_path, base):
    configfiles = [CONFIGS / f"{base}.yaml", CONFIGS / f"{base}-recipes.yaml", paper_prompts_override(tmp_path)]
    return subprocess.run([*SNAKEMAKE, "-n", "--cores", "1", "--configfile", *map(str, configfiles)],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("base", PRESETS)
def test_the_recipes_dag_trains_each_method_on_its_budget(tmp_path, base):
    result = _dry_run(tmp_path, base)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = {line.split()[0]: int(line.split()[1]) for line in result.stdout.splitlines()
            if len(line.split()) == 2 and line.split()[1].isdigit()}
    recipes = PRESETS[base]
    # Each method's checkpoints, every 100 updates up to its own last one, are evaluated; plus the base.
    assert jobs["evaluate"] == 1 + sum(steps // 100 for steps, *_ in recipes.values())
    assert jobs["train"] == len(METHODS) and jobs["grid"] == len(METHODS) and jobs["check_assets"] == 1
    # The train jobs' messages: each method's updates, batch, precision, learning rate and GPUs (its processes).
    trained = {match[0]: match[1:] for match in re.findall(
        r"Training (\w+), seed 42: (\d+) updates of (\d+) prompts x K=(\d+), (\w+), lr ([\d.e-]+), GPUs: (\d+)",
        result.stdout)}
    assert set(trained) == set(METHODS)
    for method, (steps, processes, prompts, k, lr, precision) in recipes.items():
        assert trained[method] == (str(steps), str(prompts), str(k), precision, repr(lr), str(processes)), method
    for method, (steps, *_) in recipes.items():
        assert f"/eval/{method}/seed42/step{steps}/summary.json" in result.stdout
        assert f"/eval/{method}/seed42/step{steps + 100}/" not in result.stdout
