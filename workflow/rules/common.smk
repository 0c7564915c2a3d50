# Helpers shared by the rules: config validation, output paths, target lists.
import os
from pathlib import Path

from drpo.config import checkpoint_steps, method_train, validate_config
from drpo.methods import METHODS
from drpo.pipeline import run_settings

validate_config(config)

R = config["results_dir"]
RUN = R + "/runs/{method}/seed{seed}"
EVAL = R + "/eval/{method}/seed{seed}/step{step}"
# An evaluation on one of the further prompt sets (evaluate.prompt_sets and the world's stand-ins).
EVAL_SET = R + "/eval_sets/{prompt_set}/{method}/seed{seed}/step{step}"
# The preference dataset's VAE latents (rule preference_latents), read by the offline methods' runs.
PREFERENCE_CACHE = R + "/preferences/latents"


wildcard_constraints:
    method="[a-z0-9_]+",
    seed=r"\d+",
    step=r"\d+",
    prompt_set="[a-z0-9_]+",


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


def prompt_sets():
    """The evaluation prompt sets besides the test prompts, name -> prompt file: the world's stand-ins (rule
    world_prompt_sets) and evaluate.prompt_sets."""
    sets = {}
    if config["world"]["enabled"]:
        files = {"parti": "parti_prompts.tsv", "pickapic_v2": "pickapic_v2_test_unique"}
        sets = {name: f"{R}/world/prompt_sets/{files[name]}" for name in config["world"]["prompt_sets"]}
    return sets | {name: path for name, path in config["evaluate"]["prompt_sets"].items() if path is not None}


def prompt_file_input(path):
    """{"prompts": path} when a rule writes the prompt file (the world's) or it exists, else {}: a missing file of
    your own is listed by check_assets, which the models' inputs (models_of) then are."""
    return {"prompts": path} if config["world"]["enabled"] or Path(path).exists() else {}


def geneval_judged():
    """Whether evaluation gives GenEval verdicts per image: the miniature's detector, or a GenEval reward (the target
    or an evaluation reward), for prompts with GenEval metadata."""
    rewards = [config["models"]["reward"], *[spec for spec in config["evaluate"]["rewards"].values() if spec]]
    return config["world"]["enabled"] or any(spec.get("name") in ("geneval", "geneval_lite") for spec in rewards)


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


def train_of(method, cfg=None):
    """The train section as ``method``'s runs use it (train.per_method merged over train)."""
    return method_train((cfg or config)["train"], method)


def eval_summaries():
    out = [f"{R}/eval/base/seed0/step0/summary.json"]
    for method in config["train"]["methods"]:
        train = train_of(method)  # each method's own steps and checkpoints
        steps = checkpoint_steps(train["steps"], train["checkpoint_every"])
        for seed in config["train"]["seeds"]:
            out += [EVAL.format(method=method, seed=seed, step=s) + "/summary.json" for s in steps]
    return out


def last_step_summaries(pattern, **fields):
    """The summaries of the base (seed 0, step 0) and of every run's last checkpoint, by the EVAL-like ``pattern``."""
    out = [pattern.format(method="base", seed=0, step=0, **fields) + "/summary.json"]
    for method in config["train"]["methods"]:
        train = train_of(method)
        last = checkpoint_steps(train["steps"], train["checkpoint_every"])[-1]
        out += [pattern.format(method=method, seed=seed, step=last, **fields) + "/summary.json"
                for seed in config["train"]["seeds"]]
    return out


def breakdown_outputs():
    """The breakdown tables (rule breakdowns), name -> {table, markdown, html}: every prompt set's row in one table,
    per category for Parti-Prompts TSV sets, per GenEval task for the test prompts and GenEval .jsonl sets when a
    GenEval judge scores them."""
    from drpo.prompt_files import prompt_file_kind

    names = ["prompt_sets"] if prompt_sets() else []
    names += [f"categories_{name}" for name, path in prompt_sets().items() if prompt_file_kind(path) == "parti"]
    if geneval_judged():
        names += ["geneval_test"] if prompt_file_kind(test_prompts()) == "geneval" else []
        names += [f"geneval_{name}" for name, path in prompt_sets().items() if prompt_file_kind(path) == "geneval"]
    return {name: {"table": f"{R}/tables/{name}.csv", "markdown": f"{R}/tables/{name}.md",
                   "html": f"{R}/tables/{name}.html"} for name in names}


def ablation_outputs():
    """Every ablation study's table and figure (none without studies: configs/ablations.yaml has the paper's)."""
    return [f"{R}/{kind}/ablation_{study}.{ext}" for study in config["ablations"]["studies"]
            for kind, ext in (("tables", "csv"), ("tables", "html"), ("figures", "png"))]


def judge_outputs():
    """The pairwise judge's table (rule judge_table), when judge.model names a judge."""
    if config["judge"]["model"] is None:
        return []
    return [f"{R}/tables/judge.{ext}" for ext in ("csv", "md", "html")]


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
        *[files["html"] for files in breakdown_outputs().values()],
        f"{R}/tables/paper_vs_ours.html",
        *judge_outputs(),
    ] + ([f"{R}/cost/cost_table.html", f"{R}/cost/cost_components.png"] if config["cost"]["enabled"] else [])


def run_settings_of(wildcards):
    """The settings one (method, seed) run depends on: the train rule's params."""
    return run_settings(config, wildcards.method, int(wildcards.seed))


def world_preference_dataset(format):
    """Where the miniature world writes its preference dataset in ``format``: the JSONL file, or the shard folder."""
    return f"{R}/world/preferences/jsonl/pairs.jsonl" if format == "jsonl" else f"{R}/world/preferences/pickapic"


def preference_dataset():
    """The offline methods' dataset: preferences.path, or the miniature world's in preferences.world.format."""
    return config["preferences"]["path"] or world_preference_dataset(config["preferences"]["world"]["format"])


def preference_inputs(wildcards=None):
    """The latent cache's inputs: the models, and the dataset when a rule writes it (the world's) or it exists. A
    missing dataset of your own is listed by check_assets with the missing models, as model_inputs leaves them."""
    inputs = dict(model_inputs())
    path = config["preferences"]["path"]
    if (not path and config["world"]["enabled"]) or (path and Path(path).exists()):
        inputs["dataset"] = preference_dataset()
    return inputs


def world_preference_settings():
    """What the world's preference dataset depends on (its rules' params): the world and preferences.world, and for
    the generated kind the base generator that samples it."""
    world = config["preferences"]["world"]
    settings = {"world": config["world"], "preferences": {"world": world}}
    if world["kind"] == "generated":
        settings |= {"device": config["device"], "models": {"generator": config["models"]["generator"]},
                     "evaluate": {"batch_size": config["evaluate"]["batch_size"]}}
    return settings


def uses_preference_data(method):
    return METHODS[method].uses_preference_data


def offline_asset_settings():
    """What check_assets reads of the offline methods: which methods of train.methods train from a dataset and its
    path ({} without any, so that the check's params, and what depends on it, do not change for online runs)."""
    offline = [method for method in config["train"]["methods"] if uses_preference_data(method)]
    if not offline:
        return {}
    return {"train": {"methods": offline}, "preferences": {"path": config["preferences"]["path"]}}


def judge_asset_settings():
    """What check_assets reads of the judge: its model folder ({} when the stage is off, so that the check's params
    do not change for a config without a judge)."""
    return {"judge": {"model": config["judge"]["model"]}} if config["judge"]["model"] else {}
