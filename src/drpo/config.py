"""Loading and validating the workflow configuration.

``config.yaml`` is the one home of every default: each key with its value and what it means. Presets are
merged over it (Snakemake's ``--configfile``, or :func:`load_config` with overrides). The JSON schema shipped
in this package (``config.schema.yaml``) holds types and ranges only, and every key it lists is required, so a
config that does not start from config.yaml fails naming what it lacks instead of falling back on a second set
of defaults. This module applies the schema and the cross-field checks it cannot express; the Snakefile and
the tests both go through :func:`validate_config`.
"""

from __future__ import annotations

import copy
import functools
import os
import warnings
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")


@functools.cache
def _schema() -> dict[str, Any]:
    """The parsed schema (read once: every ablation variant is validated too; never modified)."""
    return yaml.safe_load(SCHEMA_PATH.read_text())


class ConfigError(ValueError):
    """A configuration that cannot run; the message names every offending key."""


def _validator_requiring_every_key() -> type:
    base = jsonschema.Draft202012Validator

    def every_key_required(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name in properties:
                if name not in instance:
                    yield jsonschema.ValidationError(f"{name!r} is missing (config.yaml sets every key; "
                                                     "a preset is merged over it)")
        yield from base.VALIDATORS["properties"](validator, properties, instance, schema)

    return jsonschema.validators.extend(base, {"properties": every_key_required})


def _location(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "<top level>"


def validate_config(config: dict[str, Any], *, variants: bool = True) -> dict[str, Any]:
    """Check ``config`` against the schema and the cross-field rules, and (``variants``) the config of every
    ablation variant; return it.

    ``snakemake --config drpo='{reference_loss_weight: 0.5}'`` merges the nested key but leaves its value a string:
    a string where the schema wants no string is read as YAML, in place. Raises :class:`ConfigError` listing every
    problem as ``<key path>: <reason>``.
    """
    schema = _schema()
    # A whole section given as a string would replace config.yaml's section instead of merging into it.
    replaced = [f"  {key}: got the string {value!r} for a whole section; set keys inside it as "
                f"--config {key}='{{key: value}}' or in a small YAML file passed with --configfile"
                for key, value in config.items()
                if isinstance(value, str) and schema["properties"].get(key, {}).get("type") == "object"]
    if replaced:
        raise ConfigError("invalid configuration:\n" + "\n".join(replaced))
    _read_renamed_keys(config)
    _read_command_line_strings(config, schema, schema)
    errors = sorted(_validator_requiring_every_key()(schema).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"  {_location(e)}: {e.message}" for e in errors]
        raise ConfigError("invalid configuration:\n" + "\n".join(lines))
    _check_per_method(config, schema)
    _check_consistency(config)
    _check_names(config)
    if variants:
        _check_ablation_variants(config)
    return config


# ----------------------------------------------------------------------------------- per-method train settings
#: Keys of `train` that train.per_method cannot set for one method, and why.
NOT_PER_METHOD = {
    "methods": "it lists the methods to train; a method's entry in per_method does not add it",
    "seeds": "every method trains the same seeds, so that the tables compare methods seed for seed",
    "per_method": "per_method does not nest",
    "reference": "the frozen base's samples (online, or the one reference bank) are shared by every method",
    "reference_noise_sets": "the one reference bank is shared by every method",
}


def _read_renamed_keys(config: dict[str, Any]) -> None:
    """Configs written before train.per_method (a run's config.resolved.yaml, an older preset) set per-method
    learning rates as train.learning_rates {method: rate}: read, in place, as per_method entries setting
    learning_rate (an entry's own learning_rate wins), with a warning; the run settings are the same."""
    train = config.get("train")
    if not isinstance(train, dict) or "learning_rates" not in train:
        return
    rates = train.pop("learning_rates") or {}
    if isinstance(rates, str):  # given with snakemake --config
        rates = yaml.safe_load(rates) or {}
    per_method = train.setdefault("per_method", {})
    for method, rate in rates.items():
        per_method[method] = {"learning_rate": rate} | (per_method.get(method) or {})
    warnings.warn("train.learning_rates is now train.per_method: read {method: rate} as "
                  "{method: {learning_rate: rate}}; write it so", FutureWarning, stacklevel=3)


def method_train(train: dict[str, Any], method: str) -> dict[str, Any]:
    """The ``train`` section as ``method``'s runs use it: ``train.per_method[method]`` merged over it key by key
    (``lora`` merges key by key too); ``train`` itself when the method has no entry (or null)."""
    return merge(train, train["per_method"].get(method) or {})


def method_config(config: dict[str, Any], method: str) -> dict[str, Any]:
    """``config`` as one run of ``method`` reads it: ``train`` replaced by :func:`method_train` (its
    ``per_method`` kept, so that resolving again changes nothing)."""
    return {**config, "train": method_train(config["train"], method)}


def _check_per_method(config: dict[str, Any], schema: dict[str, Any]) -> None:
    """Each entry of train.per_method sets only per-run train keys, each valid where train's is (the same
    schema); a value given as a string on the command line is read as YAML, as everywhere."""
    train_schema = schema["properties"]["train"]
    problems = []
    for method, fragment in config["train"]["per_method"].items():
        if fragment is None:
            continue
        where = f"train.per_method.{method}"
        for name in fragment:
            if name in NOT_PER_METHOD:
                problems.append(f"  {where}.{name}: {name} cannot be set per method: {NOT_PER_METHOD[name]}")
            elif name not in train_schema["properties"]:
                allowed = [k for k in train_schema["properties"] if k not in NOT_PER_METHOD]
                problems.append(f"  {where}.{name}: not a train setting; a method's entry may set: "
                                + ", ".join(allowed))
        if problems:
            continue
        _read_command_line_strings(fragment, train_schema, schema)
        # The whole config with this method's train: the rest was valid above, so every error is in the fragment.
        resolved = {**config, "train": method_train(config["train"], method)}
        for error in sorted(_validator_requiring_every_key()(schema).iter_errors(resolved),
                            key=lambda e: list(e.absolute_path)):
            path = ".".join(str(p) for p in list(error.absolute_path)[1:])
            problems.append(f"  {where}{'.' + path if path else ''}: {error.message}")
    if problems:
        raise ConfigError("invalid configuration:\n" + "\n".join(problems))


def _check_ablation_variants(config: dict[str, Any]) -> None:
    """Every ablation variant merged over ``config`` is itself a valid config, so that a typo in a variant fails
    when the config is read, not in its training job."""
    problems = []
    for study, variant in variants(config):
        try:
            validate_config(variant_config(config, study, variant), variants=False)
        except ConfigError as error:
            reasons = str(error).removeprefix("invalid configuration:\n")
            problems.append(f"  ablations.studies.{study}.variants.{variant} gives an invalid config:\n"
                            + "\n".join("  " + line for line in reasons.splitlines()))
    if problems:
        raise ConfigError("invalid configuration:\n" + "\n".join(problems))


def _read_command_line_strings(value: Any, node: dict, schema: dict) -> Any:
    """``value`` with every string the schema does not allow there read as YAML (dicts and lists in place)."""
    if "$ref" in node:
        node = schema["$defs"][node["$ref"].rsplit("/", 1)[1]]
    types = node.get("type", [])
    types = [types] if isinstance(types, str) else types
    if isinstance(value, str) and types and "string" not in types:
        parsed = yaml.safe_load(value)
        return value if isinstance(parsed, str) else parsed
    if isinstance(value, dict):
        for key in value:
            child = node.get("properties", {}).get(key, node.get("additionalProperties"))
            if isinstance(child, dict):
                value[key] = _read_command_line_strings(value[key], child, schema)
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        value[:] = [_read_command_line_strings(item, node["items"], schema) for item in value]
    return value


def _check_names(config: dict[str, Any]) -> None:
    """Every method, reward, feature encoder, feature key and constructor argument the config names exists, so a
    typo fails when the config is read, before any job starts; each message lists the valid choices."""
    from drpo.features import features_arguments
    from drpo.methods import METHODS
    from drpo.registry import lookup
    from drpo.rewards import reward_members

    checks = [lambda: features_arguments(config["models"]["features"]),
              lambda: reward_members(config["models"]["reward"], "models.reward")]
    checks += [lambda name=name: lookup(METHODS, name, "method", "train.methods") for name in config["train"]["methods"]]
    checks += [lambda name=name: lookup(METHODS, name, "method", "train.per_method")
               for name in config["train"]["per_method"]]
    checks += [lambda label=label, spec=spec: reward_members({"name": label} | spec, f"evaluate.rewards.{label}")
               for label, spec in config["evaluate"]["rewards"].items() if spec is not None]
    checks += [lambda name=name: lookup(METHODS, name, "method", 'judge.pairs (or "base")')
               for name in dict.fromkeys(n for pair in config["judge"]["pairs"] for n in pair) if name != "base"]
    problems = []
    for check in checks:
        try:
            check()
        except ValueError as error:
            problems.append(f"  {error}")
    if problems:
        raise ConfigError("invalid configuration:\n" + "\n".join(problems))


def _check_consistency(config: dict[str, Any]) -> None:
    from drpo.methods import METHODS

    problems = []
    # Each method's runs use train.per_method.<method> merged over train: every check holds for each method's
    # resolved settings, and names the key where its value comes from.
    for method in config["train"]["methods"]:
        train, overrides = method_train(config["train"], method), config["train"]["per_method"].get(method) or {}

        def key(name: str) -> str:
            return f"train.per_method.{method}.{name}" if name in overrides else f"train.{name}"

        k = train["candidates"]
        if train["prompts_per_step"] % train["processes"]:
            problems.append(f"{key('prompts_per_step')} ({train['prompts_per_step']}) must be a multiple of "
                            f"{key('processes')} ({train['processes']})")
        if train["checkpoint_every"] > train["steps"]:
            problems.append(f"{key('checkpoint_every')} ({train['checkpoint_every']}) exceeds {key('steps')} "
                            f"({train['steps']})")
        if train["reference"] == "bank" and k != config["train"]["candidates"]:
            problems.append(f"{key('candidates')} ({k}) differs from train.candidates "
                            f"({config['train']['candidates']}), but train.reference is bank: one reference bank, "
                            "built for train.candidates, serves every method; use train.reference: online")
        section = config.get(method, {})
        if "num_pos" in section and section["num_pos"] + section["num_neg"] > k:
            problems.append(
                f"{method}.num_pos ({section['num_pos']}) + {method}.num_neg ({section['num_neg']}) must not "
                f"exceed {key('candidates')} (K = {k})"
            )
        if method == "grpo" and config["grpo"]["num_anchors"] > k:
            problems.append(f"grpo.num_anchors ({config['grpo']['num_anchors']}) exceeds {key('candidates')} "
                            f"(K = {k})")
        if method == "pso" and k % 2:
            problems.append(f"pso pairs adjacent candidates, so {key('candidates')} must be even (K = {k})")
    problems = list(dict.fromkeys(problems))  # methods without overrides share train's problems: name each once
    train = config["train"]
    if not config["world"]["enabled"] and not (config["prompts"]["train"] and config["prompts"]["test"]):
        problems.append("world.enabled is false, so prompts.train and prompts.test must name prompt files")
    if config["world"]["enabled"] and (config["prompts"]["train"] or config["prompts"]["test"]):
        problems.append("prompts.train / prompts.test are set, but world.enabled is true and the miniature world's "
                        "splits would be used instead: set world.enabled: false to train on prompt files")
    label = config["evaluate"]["diversity_from"]
    if label is not None and config["evaluate"]["rewards"].get(label) is None:
        problems.append(f"evaluate.diversity_from ({label!r}) names no reward of evaluate.rewards "
                        f"({[name for name, spec in config['evaluate']['rewards'].items() if spec is not None]})")
    problems += _prompt_set_problems(config)
    problems += _judge_problems(config)
    # Methods that train from a preference dataset (unknown names are reported by _check_names).
    for name in [m for m in train["methods"] if m in METHODS]:
        problems += METHODS[name].config_problems(config)
        if not METHODS[name].uses_preference_data:
            continue
        if not config["preferences"]["path"] and not config["world"]["enabled"]:
            problems.append(f"train.methods has {name}, which trains from a preference dataset, but "
                            "preferences.path is null and world.enabled is false: name a JSONL file or a "
                            "Pick-a-Pic v2 folder of Parquet shards")
        if train["reference"] == "bank":
            problems.append(f"train.methods has {name}, which trains from a preference dataset's rows, but "
                            "train.reference is bank (built for the training prompts): use train.reference: online")
    if problems:
        raise ConfigError("invalid configuration:\n" + "\n".join(f"  {p}" for p in problems))


def _prompt_set_problems(config: dict[str, Any]) -> list[str]:
    """Evaluation prompt sets: names unique and not "test" (the test prompts' label), files of a form read."""
    from drpo.prompt_files import prompt_file_kind

    problems = []
    world_sets = config["world"]["prompt_sets"] if config["world"]["enabled"] else []
    plain = [f"world.prompt_sets ({name})" for name in world_sets]  # the stand-ins hold prompts, no GenEval rows
    for name, path in config["evaluate"]["prompt_sets"].items():
        if path is None:
            continue
        if name == "test" or name in world_sets:
            problems.append(f"evaluate.prompt_sets.{name}: the name is taken by "
                            f"{'the test prompts' if name == 'test' else 'a stand-in of world.prompt_sets'}")
        try:
            if prompt_file_kind(path) != "geneval":
                plain.append(f"evaluate.prompt_sets.{name}")
        except ValueError as error:
            problems.append(f"evaluate.prompt_sets.{name}: {error}")
    if plain and (needing := _rewards_needing_metadata(config)):
        problems.append(f"{', '.join(plain)}: no GenEval metadata, which {', '.join(needing)} needs to score an "
                        "image; drop the set(s) or score with rewards that read prompts alone")
    return problems


def _rewards_needing_metadata(config: dict[str, Any]) -> list[str]:
    """The evaluation's rewards (the target and evaluate.rewards) that score with a metadata row per image (GenEval's
    judges); misnamed rewards are left to _check_names."""
    from drpo.rewards import REWARDS, reward_members

    specs = [(config["models"]["reward"], "models.reward")]
    specs += [({"name": label} | spec, f"evaluate.rewards.{label}")
              for label, spec in config["evaluate"]["rewards"].items() if spec is not None]
    needing = []
    for spec, where in specs:
        try:
            members = reward_members(spec, where)
        except ValueError:
            continue
        needing += [f"{where} ({name})" for _, name, _, _ in members if REWARDS[name].requires_metadata]
    return needing


def _judge_problems(config: dict[str, Any]) -> list[str]:
    """The judge compares runs the workflow trains anyway (train.methods), at a checkpoint each of them has."""
    judge = config["judge"]
    problems = [f"judge.pairs compares {a} with itself" for a, b in judge["pairs"] if a == b]
    sets = ["test", *(config["world"]["prompt_sets"] if config["world"]["enabled"] else []),
            *[name for name, path in config["evaluate"]["prompt_sets"].items() if path is not None]]
    problems += [f"judge.prompt_sets names {name!r}, which is no evaluation prompt set ({sets})"
                 for name in judge["prompt_sets"] or [] if name not in sets]
    from drpo.methods import METHODS

    judged = dict.fromkeys(name for pair in judge["pairs"] for name in pair if name != "base")
    for method in [m for m in judged if m in METHODS and judge["model"]]:  # unknown names: _check_names
        if method not in config["train"]["methods"]:
            problems.append(f"judge.pairs names {method}, which train.methods does not train "
                            f"({config['train']['methods']}): add it there or drop the pair")
            continue
        train = method_train(config["train"], method)
        steps = checkpoint_steps(train["steps"], train["checkpoint_every"])
        if judge["step"] is not None and judge["step"] not in steps:
            problems.append(f"judge.step ({judge['step']}) is not a checkpoint of {method} ({steps}); null judges "
                            "each run's last one")
    return problems


def load_config(*paths: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read YAML configs, each merged over the previous one as ``snakemake --configfile`` merges them (nested
    dicts merge key by key), then ``overrides``; validate the result. E.g. ``load_config("config.yaml",
    "configs/sd-turbo.yaml")``, or a run's complete ``config.resolved.yaml`` alone."""
    if not paths:
        raise ValueError("load_config needs at least one config file")
    config: dict[str, Any] = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        config = merge(config, yaml.safe_load(path.read_text()) or {})
    return validate_config(merge(config, overrides or {}))


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` updated recursively with ``update`` (dicts merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# ----------------------------------------------------------------------------------- ablation variants
# The method every ablation study trains: the default recipe's.
ABLATION_METHOD = "drpo"


def variant_config(config: dict[str, Any], study: str, variant: str) -> dict[str, Any]:
    """The workflow config of one variant: its fragment merged over ``config``, training DrPO on the ablations'
    seeds, and judged with the ablations' evaluation settings."""
    ablations = config["ablations"]
    override = ablations["studies"][study]["variants"][variant]
    # DrPO's train.per_method entry is resolved first, so that a variant's train keys (K, steps) win over it.
    return shared_config(merge(resolved_for(config, ABLATION_METHOD), override))


def resolved_for(config: dict[str, Any], method: str) -> dict[str, Any]:
    """``config`` with ``method``'s train.per_method entry merged into train and then dropped (null), so that what
    is merged over it afterwards wins; ``method``'s runs resolve to the same settings as from ``config``."""
    return {**config, "train": merge(method_train(config["train"], method), {"per_method": {method: None}})}


def shared_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` as the ablations train and judge it: DrPO on the ablations' seeds, judged with the ablations'
    evaluation settings merged over `evaluate` (the default recipe's runs are judged again with this config)."""
    ablations = config["ablations"]
    return merge(config, {"train": {"methods": [ABLATION_METHOD], "seeds": ablations["seeds"]},
                          "evaluate": ablations["evaluate"]})


def variants(config: dict[str, Any]) -> list[tuple[str, str]]:
    """Every (study, variant) of the config, in the config's order."""
    return [(study, variant) for study, spec in config["ablations"]["studies"].items() for variant in spec["variants"]]


def checkpoint_steps(steps: int, every: int) -> list[int]:
    """Update indices at which training writes (and evaluation reads) checkpoints; the last is always one."""
    return sorted({*range(every, steps + 1, every), steps})


def resolve_device(name: str) -> str:
    """Map the config's device ("auto", "cpu", "cuda") to a torch device string."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device is 'cuda' but torch sees no CUDA device; use device: cpu or auto")
        # Under `accelerate launch` every process drives the GPU of its local rank.
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return name
