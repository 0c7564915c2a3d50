# Helpers shared by the rules: config validation, output paths, target lists.
from pathlib import Path

from drpo.config import checkpoint_steps, validate_config
from drpo.pipeline import run_settings

validate_config(config)

R = config["results_dir"]
RUN = R + "/runs/{method}/seed{seed}"
EVAL = R + "/eval/{method}/seed{seed}/step{step}"


wildcard_constraints:
    method="[a-z0-9_]+",
    seed=r"\d+",
    step=r"\d+",


def sections(*names):
    """The config sections a rule's script reads, passed as its params: they show the rule's data flow, and a
    change to any of them reruns the rule (Snakemake's params trigger)."""
    return {name: config[name] for name in names}


def train_prompts():
    if config["world"]["enabled"]:
        return f"{R}/world/train_metadata.jsonl"
    return config["prompts"]["train"]


def test_prompts():
    if config["world"]["enabled"]:
        return f"{R}/world/test_metadata.jsonl"
    return config["prompts"]["test"]


def eval_reward_path(label):
    """The folder of a miniature CLIP scorer that evaluation reads as evaluate.rewards.<label> (built by a
    miniature_* rule), or None: when the world is off, or that reward is not a pickscore folder."""
    spec = config["evaluate"]["rewards"].get(label)
    if not config["world"]["enabled"] or not spec or spec.get("name", label) != "pickscore":
        return None
    return spec.get("path")


def model_inputs(wildcards=None):
    """What the model-using rules depend on: the miniature's model files (built by rules when absent),
    or, with your own weights, the asset check that lists every missing file before any GPU job."""
    if not config["world"]["enabled"]:
        return {"assets": f"{R}/provenance/assets.json"}
    models = config["models"]
    files = {"generator": models["generator"]["path"] + "/model_index.json"}
    if models["reward"].get("path"):  # none for an ensemble or a model-free reward such as geneval_lite
        files["reward"] = models["reward"]["path"] + "/config.json"
    if models["features"].get("checkpoint"):
        files["features"] = models["features"]["checkpoint"]
    return files


def eval_summaries():
    out = [f"{R}/eval/base/seed0/step0/summary.json"]
    steps = checkpoint_steps(config["train"]["steps"], config["train"]["checkpoint_every"])
    for method in config["train"]["methods"]:
        for seed in config["train"]["seeds"]:
            out += [EVAL.format(method=method, seed=seed, step=s) + "/summary.json" for s in steps]
    return out


def final_outputs():
    world = [f"{R}/figures/geneval_vs_step.png"] if config["world"]["enabled"] else []
    return world + [
        f"{R}/tables/summary.csv",
        f"{R}/figures/reward_vs_step.png",
        *[f"{R}/figures/grid_base_vs_{method}_seed{config['train']['seeds'][0]}.png"
          for method in config["train"]["methods"]],
        f"{R}/provenance/config.resolved.yaml",
    ] + ([f"{R}/cost/cost_table.csv", f"{R}/cost/cost_components.png"] if config["cost"]["enabled"] else [])


def run_settings_of(wildcards):
    """The settings one (method, seed) run depends on: the train rule's params."""
    return run_settings(config, wildcards.method, int(wildcards.seed))
