"""The Snakemake DAG resolves for the default config and both paper presets; bad configs fail early."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--directory", str(REPO), "--snakefile", str(REPO / "Snakefile")]


def _dry_run(tmp_path, *configfiles, extra=()):
    return subprocess.run([*SNAKEMAKE, "-n", "--cores", "1", "--configfile", *map(str, configfiles), *extra],
                          capture_output=True, text=True, timeout=300)


# The SDXL-Turbo preset's judge compares DrPO with the base and four baselines, which are trained for it (seed 42).
@pytest.mark.parametrize("preset,evaluations,trains,judged", [("sd-turbo", 11, 1, 0), ("sdxl-turbo", 51, 5, 5)])
def test_paper_presets_resolve_the_full_dag(tmp_path, preset, evaluations, trains, judged):
    for split in ("train", "test"):
        (tmp_path / f"{split}.txt").write_text("a photo of a cat\n")
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({
        "results_dir": str(tmp_path / "results"),
        "prompts": {"train": str(tmp_path / "train.txt"), "test": str(tmp_path / "test.txt")},
    }))
    result = _dry_run(tmp_path, REPO / "configs" / f"{preset}.yaml", override)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = dict(line.split() for line in result.stdout.splitlines()
                if len(line.split()) == 2 and line.split()[1].isdigit())
    assert jobs["check_assets"] == "1" and jobs["train"] == str(trains) and jobs["report"] == "1"
    assert jobs["evaluate"] == str(evaluations)  # base + every checkpoint
    assert jobs.get("judge", "0") == str(judged) and jobs.get("judge_table", "0") == str(min(judged, 1))


def test_default_config_resolves(tmp_path):
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({"results_dir": str(tmp_path / "results")}))
    result = _dry_run(tmp_path, REPO / "config.yaml", override)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train" in result.stdout and "reference_bank" not in result.stdout  # fresh noises, no bank
    override.write_text(yaml.safe_dump({"results_dir": str(tmp_path / "results"), "train": {"reference": "bank"}}))
    result = _dry_run(tmp_path, REPO / "config.yaml", override)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _job_counts(result.stdout)["reference_bank"] == 1


def _job_counts(stdout: str) -> dict[str, int]:
    return {line.split()[0]: int(line.split()[1]) for line in stdout.splitlines()
            if len(line.split()) == 2 and line.split()[1].isdigit()}


def test_the_comparison_trains_every_method_on_matched_budgets(tmp_path):
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({"results_dir": str(tmp_path / "results")}))
    result = _dry_run(tmp_path, REPO / "config.yaml", REPO / "configs" / "compare.yaml", override)
    assert result.returncode == 0, result.stderr[-3000:]
    compare = yaml.safe_load((REPO / "configs" / "compare.yaml").read_text())["train"]
    methods, seeds = compare["methods"], compare["seeds"]
    assert set(methods) == {"drpo", "draft", "vggflow", "dpo", "grpo", "pso"} and len(seeds) >= 3
    jobs = _job_counts(result.stdout)
    checkpoints = compare["steps"] // compare["checkpoint_every"]
    assert jobs["train"] == len(methods) * len(seeds)
    assert jobs["evaluate"] == 1 + len(methods) * len(seeds) * checkpoints
    assert jobs["grid"] == len(methods) and "cost_measured" not in jobs
    # No bank: fresh noises seeded by (run seed, prompt, visit), so every method's run of one seed sees the
    # same prompts and noises.
    assert "reference_bank" not in jobs


def test_a_mistyped_key_stops_the_run_and_is_named(tmp_path):
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({"train": {"learning_rte": 1e-4}}))
    result = _dry_run(tmp_path, REPO / "config.yaml", override)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "learning_rte" in output and "Additional properties" in output


def test_the_default_builds_the_clip_reward_where_evaluation_reads_it(tmp_path):
    # A model-free target (geneval_lite): the miniature's CLIP reward is then built for evaluation only.
    override = tmp_path / "override.yaml"
    clip = tmp_path / "clip_reward"
    override.write_text(yaml.safe_dump({"results_dir": str(tmp_path / "results"),
                                        "evaluate": {"rewards": {"pickscore": {"path": str(clip)}}}}))
    result = _dry_run(tmp_path, REPO / "config.yaml", override)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = _job_counts(result.stdout)
    assert jobs["miniature_reward"] == 1 and f"{clip}/config.json" in result.stdout
    train = yaml.safe_load((REPO / "config.yaml").read_text())["train"]
    assert jobs["evaluate"] == 1 + len(train["seeds"]) * (train["steps"] // train["checkpoint_every"])


def test_the_pickscore_preset_builds_its_target_and_no_evaluation_copy(tmp_path):
    override = tmp_path / "override.yaml"
    clip = tmp_path / "clip_reward"
    override.write_text(yaml.safe_dump({"results_dir": str(tmp_path / "results"),
                                        "models": {"reward": {"path": str(clip)}}}))
    result = _dry_run(tmp_path, REPO / "config.yaml", REPO / "configs" / "pickscore.yaml", override)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _job_counts(result.stdout)["miniature_reward"] == 1 and f"{clip}/config.json" in result.stdout


def test_a_misspelt_name_fails_the_dry_run_and_a_nested_value_can_be_set_on_the_command_line(tmp_path):
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({"train": {"methods": ["drpo", "grp0"]}}))
    result = _dry_run(tmp_path, REPO / "config.yaml", override)
    assert result.returncode != 0 and "unknown method 'grp0'" in result.stdout + result.stderr
    result = _dry_run(tmp_path, REPO / "config.yaml", extra=["--config", "drpo={reference_loss_weight: 0.5}"])
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_cost_measurement_waits_for_the_models_being_built(tmp_path):
    # configs/ci.yaml builds its miniature models under results_dir: here none exists yet (issue 14, fault 11).
    override = tmp_path / "override.yaml"
    root = tmp_path / "results"
    override.write_text(yaml.safe_dump({
        "results_dir": str(root),
        "models": {"generator": {"path": str(root / "miniature/generator")},
                   "features": {"checkpoint": str(root / "miniature/mae/mae_latent_torch.pth")},
                   "reward": {"path": str(root / "miniature/reward")}},
        "evaluate": {"rewards": {"heldout": {"path": str(root / "miniature/heldout_reward")}}}}))
    result = subprocess.run([*SNAKEMAKE, "--dag", "--cores", "1", "--configfile", str(REPO / "configs" / "ci.yaml"),
                             str(override)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    labels = dict(re.findall(r'^\s*(\d+)\[label = "(\w+)', result.stdout, flags=re.M))
    edges = {(labels[a], labels[b]) for a, b in re.findall(r"^\s*(\d+) -> (\d+)", result.stdout, flags=re.M)}
    assert {("miniature_generator", "cost_measured"), ("miniature_mae", "cost_measured")} <= edges


def test_the_ablations_share_the_default_recipe_and_the_tables_target_runs_nothing_else(tmp_path):
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({"results_dir": str(tmp_path / "results")}))
    presets = [REPO / "config.yaml", REPO / "configs" / "ablations.yaml", override]
    result = subprocess.run([*SNAKEMAKE, "-n", "--cores", "1", "ablations", "--configfile", *map(str, presets)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = _job_counts(result.stdout)
    studies = yaml.safe_load((REPO / "configs" / "ablations.yaml").read_text())["ablations"]["studies"]
    variants = sum(len(study["variants"]) for study in studies.values())
    # One variant a study has the default recipe's settings: it trains no run of its own, and the default run's
    # three seeds and the base are judged once for every study.
    assert jobs["ablation_train"] == jobs["ablation_evaluate"] == (variants - len(studies)) * 3
    assert jobs["train"] == 3 and jobs["ablation_evaluate_default_recipe"] == 4
    assert jobs["ablation_table"] == len(studies) and jobs["paper_vs_ours"] == 1

    result = subprocess.run([*SNAKEMAKE, "-n", "--cores", "1", "tables", "--configfile", *map(str, presets)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _job_counts(result.stdout) == {"tables": 1, "total": 1}


def test_the_ablations_target_without_studies_says_where_they_are(tmp_path):
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({"results_dir": str(tmp_path / "results")}))
    result = subprocess.run([*SNAKEMAKE, "-n", "--cores", "1", "ablations", "--configfile", str(override)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "--configfile configs/ablations.yaml" in result.stdout + result.stderr


def test_the_offline_preset_trains_every_offline_method_next_to_online_drpo_as_the_comparison(tmp_path):
    from drpo.config import load_config

    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({"results_dir": str(tmp_path / "results")}))
    result = _dry_run(tmp_path, REPO / "config.yaml", REPO / "configs" / "offline.yaml", override)
    assert result.returncode == 0, result.stderr[-3000:]
    offline = load_config(REPO / "config.yaml", REPO / "configs" / "offline.yaml")
    train = offline["train"]
    assert set(train["methods"]) == {"drpo", "offline", "offline_distance", "dpo_offline"} and len(train["seeds"]) == 3
    jobs = _job_counts(result.stdout)
    checkpoints = train["steps"] // train["checkpoint_every"]
    assert jobs["train"] == 12 and jobs["evaluate"] == 1 + 12 * checkpoints
    assert jobs["world_preferences_pickapic"] == 1 and jobs["preference_latents"] == 1
    assert "world_preferences_jsonl" not in jobs and "reference_bank" not in jobs
    # Everything but the methods and the dataset as in the main comparison, so that its rows compare with it.
    compare = load_config(REPO / "config.yaml", REPO / "configs" / "compare.yaml")
    for section in ("models", "world", "drpo", "evaluate", "report"):
        assert offline[section] == compare[section], section
    assert {k: v for k, v in train.items() if k != "methods"} == {
        k: v for k, v in compare["train"].items() if k != "methods"}


def test_the_sd_turbo_preset_switches_to_an_offline_mode_by_naming_a_dataset(tmp_path):
    for split in ("train", "test"):
        (tmp_path / f"{split}.txt").write_text("a photo of a cat\n")
    (tmp_path / "pickapic").mkdir()
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({
        "results_dir": str(tmp_path / "results"),
        "prompts": {"train": str(tmp_path / "train.txt"), "test": str(tmp_path / "test.txt")},
        "train": {"methods": ["offline"]}, "preferences": {"path": str(tmp_path / "pickapic")}}))
    result = _dry_run(tmp_path, REPO / "configs" / "sd-turbo.yaml", override)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = _job_counts(result.stdout)
    assert jobs["check_assets"] == 1 and jobs["preference_latents"] == 1 and jobs["train"] == 1
    assert "world_preferences_pickapic" not in jobs


def test_the_ci_config_judges_with_the_tiny_judge_and_the_default_has_no_judge(tmp_path):
    root = tmp_path / "results"
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({"results_dir": str(root), "judge": {"model": str(root / "miniature/judge")}}))
    result = _dry_run(tmp_path, REPO / "config.yaml", REPO / "configs" / "ci.yaml", override)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = _job_counts(result.stdout)
    assert jobs["miniature_judge"] == jobs["judge"] == jobs["judge_table"] == 1
    assert f"{root}/judge/test/drpo_vs_base/summary.json" in result.stdout
    assert f"{root}/tables/judge.html" in result.stdout

    override.write_text(yaml.safe_dump({"results_dir": str(root)}))
    result = _dry_run(tmp_path, REPO / "config.yaml", override)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not {"judge", "judge_table", "miniature_judge"} & set(_job_counts(result.stdout))
