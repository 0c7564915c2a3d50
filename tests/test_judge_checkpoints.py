"""scripts/judge_checkpoints.py: the base and LoRA checkpoints judged per GenEval tag on fresh noises."""

import importlib.util
from pathlib import Path

import pandas as pd
import yaml

from drpo.lora import add_lora, save_lora
from drpo.pipeline import load_generator_at
from drpo.world.prompts import TAGS, make_splits, write_metadata_jsonl
from drpo.world.spec import WorldSpec

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("judge_checkpoints", REPO / "scripts" / "judge_checkpoints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_fresh_lora_judges_like_the_base_on_every_tag(tiny_config, tmp_path):
    generator = load_generator_at(tiny_config)
    add_lora(generator.unet, rank=4, alpha=4)  # LoRA starts as the identity (its up-projection is zero)
    checkpoint = tmp_path / "checkpoint-0"
    save_lora(generator.unet, checkpoint, kind="sd-turbo")
    _, rows = make_splits(WorldSpec(), n_train=12, n_test=12, seed=0)
    write_metadata_jsonl(rows, tmp_path / "test_metadata.jsonl")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tiny_config))

    out = tmp_path / "judged.csv"
    assert _script().main(["--config", str(tmp_path / "config.yaml"), "--prompts", str(tmp_path / "test_metadata.jsonl"),
                           "--seeds", "0:2", "--out", str(out), str(checkpoint)]) == 0
    table = pd.read_csv(out)
    assert set(table["model"]) == {"base", str(checkpoint)}
    assert list(table[table["model"] == "base"]["tag"]) == [*TAGS, "overall"]
    base, tuned = (table[table["model"] == m].set_index("tag") for m in ("base", str(checkpoint)))
    pd.testing.assert_frame_equal(base.drop(columns="model"), tuned.drop(columns="model"))
    assert base["geneval"].between(0, 100).all() and base.loc[list(TAGS), "objects"].ge(0).all()
