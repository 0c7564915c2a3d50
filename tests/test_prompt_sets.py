"""Evaluation prompt sets: the paper's file forms are read, the world writes stand-ins of them, and the breakdown
tables (per prompt set, per Parti category, per GenEval task) come out of evaluation summaries."""

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from drpo.breakdowns import write_category_table, write_geneval_table, write_prompt_set_table
from drpo.config import ConfigError, load_config
from drpo.evaluate import GENEVAL_TAGS, summarize
from drpo.prompt_files import prompt_file_kind, read_rows
from drpo.world.prompt_sets import write_parti_tsv, write_pickapic_shards
from drpo.world.prompts import make_splits
from drpo.world.spec import WorldSpec

REPO_CONFIG = "config.yaml"


def test_a_parti_prompts_tsv_is_read_as_it_ships(tmp_path):
    path = tmp_path / "PartiPrompts.tsv"
    path.write_text("Prompt\tCategory\tChallenge\tNote\n"
                    "a red bicycle\tVehicles\tSimple Detail\t\n"
                    "\tAnimals\tBasic\tempty prompt row\n"
                    "two dogs on a sofa\tAnimals\tQuantity\tfrom DrawBench\n")
    assert read_rows(path) == [
        {"prompt": "a red bicycle", "category": "Vehicles", "challenge": "Simple Detail"},
        {"prompt": "two dogs on a sofa", "category": "Animals", "challenge": "Quantity"}]
    path.write_text("prompt\tcategory\nx\ty\n")
    with pytest.raises(ValueError, match="needs the columns Prompt, Category, Challenge; missing Prompt"):
        read_rows(path)


def test_pickapic_shards_give_their_unique_captions_in_first_seen_order(tmp_path):
    folder = tmp_path / "test_unique"
    folder.mkdir()
    pq.write_table(pa.table({"caption": ["b cat", "a dog", "b cat"], "label_0": [1.0, 0.0, 0.5]}),
                   folder / "test_unique-00000-of-00002.parquet")
    pq.write_table(pa.table({"caption": ["a dog", " ", "c fox"], "label_0": [1.0, 0.0, 0.5]}),
                   folder / "test_unique-00001-of-00002.parquet")
    assert [row["prompt"] for row in read_rows(folder)] == ["b cat", "a dog", "c fox"]
    assert [row["prompt"] for row in read_rows(folder / "test_unique-00001-of-00002.parquet")] == ["a dog", "c fox"]
    pq.write_table(pa.table({"prompt": ["x"]}), folder / "test_unique-00002-of-00002.parquet")
    with pytest.raises(ValueError, match="no 'caption' column"):
        read_rows(folder)


def test_prompt_file_forms_are_told_by_their_path():
    assert [prompt_file_kind(p) for p in ("a.txt", "a.jsonl", "a.tsv", "a.parquet", "data/test_unique")] == \
        ["txt", "geneval", "parti", "pickapic", "pickapic"]
    with pytest.raises(ValueError, match="unsupported prompt file type '.csv'"):
        prompt_file_kind("prompts.csv")


def test_the_worlds_stand_ins_hold_the_test_split(tmp_path):
    _, test = make_splits(WorldSpec(), n_train=12, n_test=18, seed=0)
    write_parti_tsv(test, tmp_path / "parti.tsv")
    parti = read_rows(tmp_path / "parti.tsv")
    assert [row["prompt"] for row in parti] == [row["prompt"] for row in test]
    assert [row["category"] for row in parti] == [row["include"][0]["class"].capitalize() for row in test]
    write_pickapic_shards(test, tmp_path / "pickapic")
    shards = sorted((tmp_path / "pickapic").glob("*.parquet"))
    assert len(shards) == 2
    captions = pd.concat([pd.read_parquet(shard) for shard in shards])["caption"]
    assert len(captions) > len(test)  # captions repeat over comparison rows, as in Pick-a-Pic
    assert sorted(row["prompt"] for row in read_rows(tmp_path / "pickapic")) == sorted(r["prompt"] for r in test)


def test_summaries_break_rewards_down_by_category():
    per_image = pd.DataFrame({"prompt_index": [0, 0, 1, 1, 2, 2], "seed": [1, 2] * 3,
                              "reward": [0.1, 0.3, 0.5, 0.5, 0.2, 0.2], "reward_aux": [1.0] * 6,
                              "category": ["Animals", "Animals", "Animals", "Animals", "Vehicles", "Vehicles"]})
    per_prompt = pd.DataFrame({"prompt_index": [0, 1, 2], "diversity": [0.1, 0.2, 0.3]})
    summary = summarize(per_image, per_prompt, reward_scale=100, held_out_scales={"aux": 10})
    assert summary["categories"]["Animals"] == pytest.approx({"prompts": 2, "reward": 35.0, "reward_aux": 10.0})
    assert summary["categories"]["Vehicles"] == pytest.approx({"prompts": 1, "reward": 20.0, "reward_aux": 10.0})
    assert summary["reward"] == pytest.approx(100 * (0.2 + 0.5 + 0.2) / 3)


def _summary(tmp_path, name, method, seed, step, reward, **extra):
    path = tmp_path / f"{name}_{method}_{seed}_{step}.json"
    path.write_text(json.dumps({"method": method, "seed": seed, "step": step, "reward": reward,
                                "diversity": 0.1, **extra}))
    return str(path)


def _outputs(tmp_path, name):
    return {"table": tmp_path / f"{name}.csv", "markdown": tmp_path / f"{name}.md", "html": tmp_path / f"{name}.html"}


def test_the_category_table_has_a_row_per_category_and_a_column_per_model(tmp_path):
    def categories(animals, vehicles):
        return {"categories": {"Animals": {"prompts": 2, "reward": animals}, "Vehicles": {"prompts": 1,
                                                                                         "reward": vehicles}}}

    files = [_summary(tmp_path, "parti", "base", 0, 0, 20, **categories(20, 10)),
             _summary(tmp_path, "parti", "drpo", 0, 100, 30, **categories(30, 12)),
             _summary(tmp_path, "parti", "drpo", 1, 100, 34, **categories(34, 16))]
    frame = write_category_table(files, "parti", _outputs(tmp_path, "categories_parti"))
    assert list(frame["category"]) == ["Animals", "Vehicles"] and list(frame["prompts"]) == [2, 1]
    assert list(frame["base"]) == [20, 10] and list(frame["drpo"]) == [32, 14] and list(frame["drpo_std"]) == [
        2.0, 2.0]  # std over seeds as the main table's
    assert "| Animals | 2 | 20.00 ± 0.00 | 32.00 ± 2.00 |" in (tmp_path / "categories_parti.md").read_text()
    with pytest.raises(ValueError, match="no per-category scores"):
        write_category_table([_summary(tmp_path, "pick", "base", 0, 0, 20)], "pick", _outputs(tmp_path, "x"))


def test_the_geneval_table_has_the_six_tasks_and_their_mean(tmp_path):
    def tasks(values):
        return {f"geneval_{tag}": v for tag, v in zip(GENEVAL_TAGS, values)} | {"geneval_overall": np.mean(values)}

    files = [_summary(tmp_path, "test", "base", 0, 0, 20, **tasks([90, 40, 30, 80, 10, 10])),
             _summary(tmp_path, "test", "drpo", 0, 50, 25, **tasks([100, 50, 40, 90, 20, 10]))]
    frame = write_geneval_table(files, "test", _outputs(tmp_path, "geneval_test"))
    assert list(frame["method"]) == ["base", "drpo"]
    assert frame.loc[1, "geneval_overall"] == pytest.approx(310 / 6)
    assert "| drpo | 50 | 1 | 100.00 ± 0.00 | 50.00 ± 0.00 |" in (tmp_path / "geneval_test.md").read_text()
    with pytest.raises(ValueError, match="no GenEval verdicts"):
        write_geneval_table([_summary(tmp_path, "t", "base", 0, 0, 20)], "t", _outputs(tmp_path, "y"))


def test_the_prompt_set_table_has_a_row_per_set_and_model(tmp_path):
    summaries = {"pickapic_v2": [_summary(tmp_path, "p", "base", 0, 0, 20, reward_clip=30),
                                 _summary(tmp_path, "p", "drpo", 0, 75, 24, reward_clip=31)],
                 "parti": [_summary(tmp_path, "q", "base", 0, 0, 18),
                           _summary(tmp_path, "q", "drpo", 0, 75, 21)]}
    frame = write_prompt_set_table(summaries, _outputs(tmp_path, "prompt_sets"))
    assert list(zip(frame["prompt_set"], frame["method"], frame["reward"])) == [
        ("pickapic_v2", "base", 20), ("pickapic_v2", "drpo", 24), ("parti", "base", 18), ("parti", "drpo", 21)]
    assert "reward_clip" not in frame  # only metrics every set has


def test_prompt_set_names_and_forms_are_checked_when_the_config_is_read(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(REPO_CONFIG, "configs/ci.yaml", overrides={"evaluate": {"prompt_sets": {
            "test": "a.txt", "parti": "b.tsv", "mine": "prompts.csv"}}})
    message = str(error.value)
    assert "evaluate.prompt_sets.test: the name is taken by the test prompts" in message
    assert "evaluate.prompt_sets.parti: the name is taken by a stand-in of world.prompt_sets" in message
    assert "evaluate.prompt_sets.mine: prompts.csv: unsupported prompt file type '.csv'" in message


def test_sets_of_plain_prompts_are_refused_with_a_reward_that_needs_geneval_rows():
    """The default target (the GenEval detector) scores an image by its prompt's GenEval row, which Parti and
    Pick-a-Pic prompts do not have: that fails when the config is read, not after training."""
    with pytest.raises(ConfigError, match=r"world.prompt_sets \(parti\), evaluate.prompt_sets.mine: no GenEval "
                                          r"metadata, which models.reward \(geneval_lite\) needs"):
        load_config(REPO_CONFIG, overrides={"world": {"prompt_sets": ["parti"]},
                                            "evaluate": {"prompt_sets": {"mine": "prompts.txt", "gen": "g.jsonl"}}})
    load_config(REPO_CONFIG, overrides={"evaluate": {"prompt_sets": {"gen": "g.jsonl"}}})  # GenEval rows: fine


def test_the_asset_check_names_missing_prompt_set_files():
    from drpo.assets import missing_assets

    config = load_config(REPO_CONFIG, "configs/sd-turbo.yaml")
    missing = {asset.path: asset.what for asset in missing_assets(config)}
    assert "Pick-a-Pic" in missing["resources/data/pickapic_v2/test_unique"]
    assert "evaluation prompt set 'parti'" in missing["resources/data/parti/PartiPrompts.tsv"]
