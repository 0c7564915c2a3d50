"""Every default lives in config.yaml: the schema states no values, settings classes and the drift functions
take none, and each settings class reads exactly its config section."""

import dataclasses
import inspect
import typing
from pathlib import Path

import pytest
import yaml

from drpo import drift
from drpo.config import SCHEMA_PATH, ConfigError, load_config, validate_config
from drpo.cost.flops import UpdateShape
from drpo.methods import METHODS
from drpo.train import TrainSettings

REPO = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((REPO / "config.yaml").read_text())
SCHEMA = yaml.safe_load(SCHEMA_PATH.read_text())


def _walk(node, path=""):
    """(path, schema node) of every node of the schema."""
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{path}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk(value, f"{path}/{index}")


def _schema_keys(node: dict, prefix: str = "") -> set[str]:
    """Dotted paths of every key the schema lists under `properties` (following $refs to $defs)."""
    if "$ref" in node:
        node = SCHEMA["$defs"][node["$ref"].rsplit("/", 1)[1]]
    keys = set()
    for name, child in node.get("properties", {}).items():
        keys.add(prefix + name)
        keys |= _schema_keys(child, f"{prefix}{name}.")
    return keys


def _config_keys(node: dict, schema_keys: set[str], prefix: str = "") -> set[str]:
    keys = set()
    for name, value in node.items():
        path = prefix + name
        keys.add(path)
        if isinstance(value, dict) and any(key.startswith(path + ".") for key in schema_keys):
            keys |= _config_keys(value, schema_keys, path + ".")
    return keys


def test_the_schema_states_no_values():
    assert [path for path, node in _walk(SCHEMA) if isinstance(node, dict) and "default" in node] == []


def test_config_yaml_sets_exactly_the_keys_the_schema_lists():
    schema_keys = _schema_keys(SCHEMA)
    assert _config_keys(CONFIG, schema_keys) == schema_keys
    validate_config(yaml.safe_load((REPO / "config.yaml").read_text()))


def test_a_config_without_config_yaml_fails_naming_the_missing_keys():
    preset = yaml.safe_load((REPO / "configs" / "sd-turbo.yaml").read_text())
    with pytest.raises(ConfigError, match=r"drpo: 'rollout_rounds' is missing"):
        validate_config(preset)


def _settings_classes():
    classes = {f"method {name}": method.settings_class for name, method in METHODS.items()}
    return classes | {"TrainSettings": TrainSettings, "UpdateShape": UpdateShape}


@pytest.mark.parametrize("label,cls", _settings_classes().items())
def test_settings_classes_take_no_defaults(label, cls):
    nested = [t for t in typing.get_type_hints(cls).values() if dataclasses.is_dataclass(t)]
    for klass in (cls, *nested):
        with_defaults = [f.name for f in dataclasses.fields(klass)
                         if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING]
        assert with_defaults == [], f"{klass.__name__} states defaults for {with_defaults}; config.yaml holds them"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_method_reads_exactly_its_config_section(name):
    fields = [f.name for f in dataclasses.fields(METHODS[name].settings_class)]
    assert sorted(fields) == sorted(CONFIG[name])


def test_train_settings_read_the_train_section():
    run_level = {"seed"}  # a run's seed: one of train.seeds
    # Read by the workflow around a run (which runs, which noises, how many processes); per_method resolves a
    # method's train section before TrainSettings reads it.
    workflow_level = {"methods", "seeds", "per_method", "reference", "reference_noise_sets", "processes",
                      "main_process_port"}
    fields = {f.name for f in dataclasses.fields(TrainSettings)}
    assert fields - run_level == set(CONFIG["train"]) - workflow_level


@pytest.mark.parametrize("function", [drift.drift_field, drift.drift_loss, drift.drpo_objective,
                                      drift.awr_drift_loss])
def test_the_drift_functions_take_their_settings_without_defaults(function):
    optional = {name for name, p in inspect.signature(function).parameters.items()
                if p.default is not inspect.Parameter.empty}
    assert optional <= {"mask_negative_self"}, f"{function.__name__} states defaults for {optional}"


def test_presets_resolve_over_config_yaml():
    for preset in sorted((REPO / "configs").glob("*.yaml")):
        # configs/<base>-recipes.yaml is merged over configs/<base>.yaml.
        base = preset.with_name(preset.name.replace("-recipes", ""))
        config = load_config(REPO / "config.yaml", *dict.fromkeys([base, preset]))
        assert config["results_dir"]


# Every name a config uses is checked when it is read, before any job (issue 14, fault 10), with the valid choices.
@pytest.mark.parametrize("override,message", [
    ({"train": {"methods": ["drpo", "drp0"]}}, r"train.methods: unknown method 'drp0'; valid names: \[.*'draft'"),
    ({"train": {"per_method": {"dpo1": {"learning_rate": 1e-4}}}},
     r"train.per_method: unknown method 'dpo1'; valid names: \[.*'dpo'"),
    ({"models": {"reward": {"name": "pickscor"}}}, r"models.reward: unknown reward 'pickscor'; valid names"),
    ({"models": {"features": {"name": "latent_maee"}}}, r"models.features: unknown feature encoder 'latent_maee'"),
    ({"models": {"features": {"keys": ["layer4_mean", "layer4_mea"]}}},
     r"models.features.keys: feature encoder 'latent_mae' has no map for \['layer4_mea'\]"),
    ({"models": {"features": {"options": {"block_strid": 2}}}},
     r"feature encoder 'latent_mae' takes no 'block_strid'; it takes: block_stride, checkpoint_path"),
    ({"evaluate": {"rewards": {"brightness": {"name": "worker", "command": ["python", "w.py"], "timout_s": 5}}}},
     r"evaluate.rewards.brightness: reward 'worker' takes no 'timout_s'; it takes: .*timeout_s"),
    # A worker merged over config.yaml's held-out CLIP scorer keeps its model folder: the message says what to do.
    ({"evaluate": {"rewards": {"heldout": {"name": "worker", "command": ["python", "w.py"]}}}},
     r"reward 'worker' takes no 'model_path'.*set path: null"),
    ({"evaluate": {"rewards": {"mix": {"ensemble": {"pickscore": {"weight": 1, "path": "m", "batch_sze": 8}}}}}},
     r"ensemble member 'pickscore': reward 'pickscore' takes no 'batch_sze'"),
])
def test_unknown_names_and_arguments_fail_when_the_config_is_read(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "config.yaml", overrides=override)


def test_nested_values_given_with_snakemake_config_are_read_as_yaml():
    # `snakemake --config drpo='{reference_loss_weight: 0.5}'` merges the key but leaves '0.5' a string (issue 14,
    # fault 12); the schema's type tells what it is.
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["drpo"]["reference_loss_weight"] = "0.5"
    config["train"]["seeds"] = "[3, 4]"
    config["evaluate"]["rewards"]["heldout"]["batch_size"] = "8"  # free-form reward arguments stay as given
    validate_config(config)
    assert config["drpo"]["reference_loss_weight"] == 0.5 and config["train"]["seeds"] == [3, 4]
    assert config["evaluate"]["rewards"]["heldout"]["batch_size"] == "8"
    with pytest.raises(ConfigError, match=r"drpo: got the string .* for a whole section"):
        validate_config(yaml.safe_load((REPO / "config.yaml").read_text()) | {"drpo": "reference_loss_weight"})


def test_prompt_files_are_refused_while_the_miniature_world_provides_the_prompts():
    with pytest.raises(ConfigError, match=r"prompts.train / prompts.test are set, but world.enabled is true"):
        load_config(REPO / "config.yaml", overrides={"prompts": {"train": "my_prompts.txt"}})
