"""The Snakemake DAG resolves for the default config and the paper presets; bad configs fail early."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import paper_prompts_override

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--directory", str(REPO), "--snakefile", str(REPO / "Snakefile")]


def _dry_run(tmp_path, *configfiles, extra=()):
    return subprocess.run([*SNAKEMAKE, "-n", "--cores", "1", "--configfile", *map(str, configfiles), *extra],
                          capture_output=True, text=True, timeout=300)


# The SDXL-Turbo preset's judge compares DrPO with the base on Pick-a-Pic v2 and Parti-Prompts.
@pytest.mark.parametrize("preset,evaluations,trains,judged", [("sd-turbo", 11, 1, 0), ("sdxl-turbo", 51, 1, 2)])
def test_paper_presets_resolve_the_full_dag(tmp_path, preset, evaluations, trains, judged):
    result = _dry_run(tmp_path, REPO / "configs" / f"{preset}.yaml", paper_prompts_override(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = dict(line.split() for line in result.stdout.splitlines()
                if len(line.split()) == 2 and line.split()[1].isdigit())
    assert jobs["check_assets"] == "1" and jobs["train"] == str(trains) and jobs["report"] == "1"
    assert jobs["evaluate"] == str(evaluations)  # base + every checkpoint
    # Pick-a-Pic v2 and Parti-Prompts, the base and the run's last checkpoint on each; their files are missing
    # here, so check_assets (which every model-using job waits for) names them instead of the DAG failing.
    assert jobs["evaluate_prompt_set"] == "4" and jobs["breakdowns"] == "1"
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


GENEVAL_PRESET = (REPO / "configs" / "sd-turbo.yaml", REPO / "configs" / "sd-turbo-geneval.yaml")
# GenEval-style metadata rows, one of each task (the preset reads GenEval's evaluation_metadata.jsonl).
GENEVAL_ROWS = [
    {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"},
    {"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}],
     "prompt": "a photo of a dog and a cat"},
    {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}],
     "prompt": "a photo of two dogs"},
    {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "red"}], "prompt": "a photo of a red dog"},
    {"tag": "position", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1,
                                                                   "position": ["right of", 0]}],
     "prompt": "a photo of a cat right of a dog"},
    {"tag": "color_attr", "include": [{"class": "dog", "count": 1, "color": "red"},
                                      {"class": "cat", "count": 1, "color": "blue"}],
     "prompt": "a photo of a red dog and a blue cat"},
]


def test_the_geneval_preset_resolves_training_and_evaluating_on_genevals_prompts(tmp_path):
    metadata = tmp_path / "evaluation_metadata.jsonl"
    metadata.write_text("".join(json.dumps(row) + "\n" for row in GENEVAL_ROWS))
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({"results_dir": str(tmp_path / "results"),
                                        "prompts": {"train": str(metadata), "test": str(metadata)}}))
    result = _dry_run(tmp_path, *GENEVAL_PRESET, override)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = _job_counts(result.stdout)
    assert jobs["check_assets"] == 1 and jobs["train"] == 1 and jobs["report"] == 1
    assert jobs["evaluate"] == 11  # base + a checkpoint every 100 of 1000 updates
    assert not {"world_prompts", "miniature_reward", "miniature_heldout_reward"} & set(jobs)  # paper scale
    # GenEval per task on its prompts (tables/geneval_test); sd-turbo.yaml's Pick-a-Pic and Parti sets are off.
    assert jobs["breakdowns"] == 1 and "evaluate_prompt_set" not in jobs
    assert "tables/geneval_test.html" in result.stdout and "tables/prompt_sets" not in result.stdout


def test_the_geneval_preset_is_the_papers_recipe_and_its_asset_check_names_every_file(tmp_path, monkeypatch):
    from drpo.assets import missing_assets, required_assets
    from drpo.config import load_config

    config = load_config(REPO / "config.yaml", *GENEVAL_PRESET)
    sd_turbo = load_config(REPO / "config.yaml", GENEVAL_PRESET[0])
    # Method spec 2.10 / 3.1 / 5.6: train = test = GenEval's prompts, the official judge as target, K 24, pools of
    # 8 + 8 over up to 4 rounds, lambda 0.2 and latent L2 0.2, 4 images per prompt.
    assert config["prompts"]["train"] == config["prompts"]["test"] and config["prompts"]["test"].endswith(
        "evaluation_metadata.jsonl")
    assert config["models"]["reward"]["name"] == "geneval" and config["train"]["candidates"] == 24
    drpo = config["drpo"]
    assert (drpo["rollout_rounds"], drpo["num_pos"], drpo["num_neg"]) == (4, 8, 8)
    assert drpo["reference_loss_weight"] == drpo["reference_l2_weight"] == 0.2
    assert config["evaluate"]["seeds"] == [42, 43, 44, 45] and config["evaluate"]["min_images_per_tag"] == 0
    for section in ("generator", "features"):
        assert config["models"][section] == sd_turbo["models"][section]
    assert {k: v for k, v in config["drpo"].items() if k not in ("rollout_rounds", "reference_l2_weight")} == {
        k: v for k, v in sd_turbo["drpo"].items() if k not in ("rollout_rounds", "reference_l2_weight")}

    monkeypatch.chdir(tmp_path)
    paths = {asset.path: asset.what for asset in required_assets(config)}
    reward = config["models"]["reward"]
    assert {f"{reward['geneval_dir']}/evaluation/evaluate_images.py",
            f"{reward['geneval_dir']}/evaluation/object_names.txt", reward["detector_checkpoint"],
            reward["clip_checkpoint"], reward["python"], config["prompts"]["test"]} <= set(paths)
    assert "worker's python" in paths[reward["python"]]
    assert not any("PickScore" in path or "HPS" in path or "ImageReward" in path for path in paths)
    # With a file at every listed path (the fake local assets), nothing is missing.
    assert len(missing_assets(config)) == len(paths)
    for path in paths:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).touch()
    assert missing_assets(config) == []


def test_the_ci_config_judges_with_the_tiny_judge_and_the_default_has_no_judge(tmp_path):
    root = tmp_path / "results"
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({"results_dir": str(root), "judge": {"model": str(root / "miniature/judge")}}))
    result = _dry_run(tmp_path, REPO / "config.yaml", REPO / "configs" / "ci.yaml", override)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = _job_counts(result.stdout)
    # On the world's stand-ins of Pick-a-Pic v2 and Parti-Prompts, as the paper's figures are.
    assert jobs["miniature_judge"] == jobs["judge_table"] == 1 and jobs["judge"] == 2
    assert all(f"{root}/judge/{s}/drpo_vs_base/summary.json" in result.stdout for s in ("parti", "pickapic_v2"))
    assert f"{root}/tables/judge.html" in result.stdout

    override.write_text(yaml.safe_dump({"results_dir": str(root)}))
    result = _dry_run(tmp_path, REPO / "config.yaml", override)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not {"judge", "judge_table", "miniature_judge"} & set(_job_counts(result.stdout))
