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
    _read_command_line_strings(config, schema, schema)
    errors = sorted(_validator_requiring_every_key()(schema).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"  {_location(e)}: {e.message}" for e in errors]
        raise ConfigError("invalid configuration:\n" + "\n".join(lines))
    _check_consistency(config)
    _check_names(config)
    if variants:
        _check_ablation_variants(config)
    return config


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
    checks += [lambda name=name: lookup(METHODS, name, "method", "train.learning_rates")
               for name in config["train"]["learning_rates"]]
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
    from drpo.judge import judged_methods
    from drpo.methods import METHODS

    train = config["train"]
    k = train["candidates"]
    problems = []
    # A method that only the judge compares is trained for it, so its settings are checked as train.methods' are.
    trained = list(dict.fromkeys([*train["methods"], *judged_methods(config)]))
    for method in trained:
        section = config.get(method, {})
        if "num_pos" in section and section["num_pos"] + section["num_neg"] > k:
            problems.append(
                f"{method}.num_pos ({section['num_pos']}) + {method}.num_neg ({section['num_neg']}) must not "
                f"exceed train.candidates (K = {k})"
            )
    if train["prompts_per_step"] % train["processes"]:
        problems.append(f"train.prompts_per_step ({train['prompts_per_step']}) must be a multiple of "
                        f"train.processes ({train['processes']})")
    if "grpo" in trained and config["grpo"]["num_anchors"] > k:
        problems.append(f"grpo.num_anchors ({config['grpo']['num_anchors']}) exceeds train.candidates (K = {k})")
    if "pso" in trained and k % 2:
        problems.append(f"pso pairs adjacent candidates, so train.candidates must be even (K = {k})")
    if train["checkpoint_every"] > train["steps"]:
        problems.append(
            f"train.checkpoint_every ({train['checkpoint_every']}) exceeds train.steps ({train['steps']})"
        )
    if not config["world"]["enabled"] and not (config["prompts"]["train"] and config["prompts"]["test"]):
        problems.append("world.enabled is false, so prompts.train and prompts.test must name prompt files")
    if config["world"]["enabled"] and (config["prompts"]["train"] or config["prompts"]["test"]):
        problems.append("prompts.train / prompts.test are set, but world.enabled is true and the miniature world's "
                        "splits would be used instead: set world.enabled: false to train on prompt files")
    label = config["evaluate"]["diversity_from"]
    if label is not None and config["evaluate"]["rewards"].get(label) is None:
        problems.append(f"evaluate.diversity_from ({label!r}) names no reward of evaluate.rewards "
                        f"({[name for name, spec in config['evaluate']['rewards'].items() if spec is not None]})")
    problems += _judge_problems(config)
    # Methods that train from a preference dataset (unknown names are reported by _check_names).
    for name in [m for m in trained if m in METHODS]:
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


def _judge_problems(config: dict[str, Any]) -> list[str]:
    judge, train = config["judge"], config["train"]
    problems = [f"judge.pairs compares {a} with itself" for a, b in judge["pairs"] if a == b]
    steps = checkpoint_steps(train["steps"], train["checkpoint_every"])
    if judge["step"] is not None and judge["step"] not in steps:
        problems.append(f"judge.step ({judge['step']}) is not a checkpoint of train.steps / train.checkpoint_every "
                        f"({steps}); null judges the last one")
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
    return shared_config(merge(config, override))


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
