# Helpers shared by the rules: config validation, output paths, target lists.
import os
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


# The setting every result belongs to, as tables and captions label it.
if config["world"]["enabled"]:
    SETTING = "miniature"
else:
    SETTING = f"paper scale ({config['models']['generator']['kind']})"


def caption_facts(seeds):
    """What a report caption says of the result it describes: the setting, the training seeds and the command
    that made it (params of the rules whose outputs are in the report)."""
    if config["world"]["enabled"]:
        setting = "the miniature world (CPU-sized models built by this workflow)"
    else:
        setting = f"{SETTING}, generator {config['models']['generator']['path']}"
    presets = "".join(f" --configfile {os.path.relpath(path)}" for path in workflow.overwrite_configfiles)
    return {"setting": setting, "seeds": ", ".join(map(str, seeds)), "command": f"snakemake --cores 2{presets}"}


def train_prompts():
    if config["world"]["enabled"]:
        return f"{R}/world/train_metadata.jsonl"
    return config["prompts"]["train"]


def test_prompts():
    if config["world"]["enabled"]:
        return f"{R}/world/test_metadata.jsonl"
    return config["prompts"]["test"]


def eval_reward_path(cfg, label):
    """The folder of a miniature CLIP scorer that evaluation reads as evaluate.rewards.<label> (built by a
    miniature_* rule), or None: when the world is off, or that reward is not a pickscore folder."""
    spec = cfg["evaluate"]["rewards"].get(label)
    if not cfg["world"]["enabled"] or not spec or spec.get("name", label) != "pickscore":
        return None
    return spec.get("path")


def models_of(cfg):
    """What the model-using rules depend on: the miniature's model files (built by rules when absent),
    or, with your own weights, the asset check that lists every missing file before any GPU job."""
    if not cfg["world"]["enabled"]:
        return {"assets": f"{R}/provenance/assets.json"}
    models = cfg["models"]
    files = {"generator": models["generator"]["path"] + "/model_index.json"}
    if models["reward"].get("path"):  # none for an ensemble or a model-free reward such as geneval_lite
        files["reward"] = models["reward"]["path"] + "/config.json"
    if checkpoint := models["features"].get("checkpoint"):
        # An image encoder's model folder stands for itself by its config file.
        files["features"] = checkpoint if Path(checkpoint).suffix else checkpoint + "/config.json"
    return files


def model_inputs(wildcards=None):
    return models_of(config)


def evaluation_inputs(cfg, done=None):
    """What an evaluation with config ``cfg`` reads: the models, the test prompts, the evaluation-only scorers (the
    held-out one, and the CLIP reward when the target is the detector) and, for a trained run, its train_done."""
    inputs = dict(models_of(cfg), prompts=test_prompts())
    for label in cfg["evaluate"]["rewards"]:
        if path := eval_reward_path(cfg, label):
            inputs[f"reward_{label}"] = path + "/config.json"
    if done is not None:
        inputs["done"] = done
    return inputs


def eval_summaries():
    out = [f"{R}/eval/base/seed0/step0/summary.json"]
    steps = checkpoint_steps(config["train"]["steps"], config["train"]["checkpoint_every"])
    for method in config["train"]["methods"]:
        for seed in config["train"]["seeds"]:
            out += [EVAL.format(method=method, seed=seed, step=s) + "/summary.json" for s in steps]
    return out


def ablation_outputs():
    """Every ablation study's table and figure (none without studies: configs/ablations.yaml has the paper's)."""
    return [f"{R}/{kind}/ablation_{study}.{ext}" for study in config["ablations"]["studies"]
            for kind, ext in (("tables", "csv"), ("tables", "html"), ("figures", "png"))]


def final_outputs():
    world = [f"{R}/figures/geneval_vs_step.png"] if config["world"]["enabled"] else []
    return world + [
        f"{R}/tables/summary.csv",
        f"{R}/tables/summary.html",
        f"{R}/figures/reward_vs_step.png",
        *[f"{R}/figures/grid_base_vs_{method}_seed{config['train']['seeds'][0]}.png"
          for method in config["train"]["methods"]],
        f"{R}/provenance/config.resolved.yaml",
        *ablation_outputs(),
        f"{R}/tables/paper_vs_ours.html",
    ] + ([f"{R}/cost/cost_table.html", f"{R}/cost/cost_components.png"] if config["cost"]["enabled"] else [])


def run_settings_of(wildcards):
    """The settings one (method, seed) run depends on: the train rule's params."""
    return run_settings(config, wildcards.method, int(wildcards.seed))
