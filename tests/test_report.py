"""Tables and curves regenerated from evaluation summaries (drpo.report)."""

import json

import pandas as pd
import pytest

from drpo.report import collect, final_table, markdown_table, plot_curves, write_tables


def _summary(method, seed, step, reward, held_out=None):
    row = {"method": method, "seed": seed, "step": step, "reward": reward, "diversity": 0.3,
           "geneval_overall": reward / 10}
    if held_out is not None:
        row["reward_heldout"] = held_out
    return row


@pytest.fixture
def summaries(tmp_path):
    rows = [_summary("base", 0, 0, 50.0, 40.0)]
    for seed, final in ((0, 52.0), (1, 54.0)):
        rows += [_summary("drpo", seed, 5, 51.0, 40.0), _summary("drpo", seed, 10, final, 41.0)]
    rows += [_summary("draft", 0, 10, 60.0, 30.0)]
    paths = []
    for i, row in enumerate(rows):
        paths.append(tmp_path / f"summary{i}.json")
        paths[-1].write_text(json.dumps(row))
    return paths


def test_final_table_reports_the_last_step_mean_and_std_over_seeds(summaries):
    table = final_table(collect(summaries)).set_index("method")
    assert list(table.index) == ["base", "drpo", "draft"]  # base, gradient-free, then reward-gradient methods
    assert table.loc["drpo", "reward"] == pytest.approx(53.0)
    assert table.loc["drpo", "reward_std"] == pytest.approx(1.0)  # population std of 52 and 54
    assert table.loc["drpo", "seeds"] == 2 and table.loc["drpo", "steps"] == 10
    assert table.loc["drpo", "reward_heldout"] == pytest.approx(41.0)
    assert table.loc["draft", "uses_reward_grad"] == "yes"
    assert table.loc["drpo", "uses_reward_grad"] == "no"
    assert table.loc["base", "uses_reward_grad"] == "-"


def test_markdown_table_has_the_main_table_columns(summaries):
    text = markdown_table(final_table(collect(summaries)))
    header = text.splitlines()[0]
    for column in ("method", "steps", "reward grad.", "seeds", "target reward ×100", "held-out reward: heldout",
                   "GenEval-lite overall (%)", "diversity"):
        assert column in header
    assert "| drpo | 10 | no | 2 | 53.00 ± 1.00 |" in text


def test_write_tables_and_curves(summaries, tmp_path):
    steps = collect(summaries)
    write_tables(steps, tmp_path / "tables")
    assert pd.read_csv(tmp_path / "tables" / "summary.csv")["method"].tolist() == ["base", "drpo", "draft"]
    assert pd.read_parquet(tmp_path / "tables" / "steps.parquet").shape[0] == len(summaries)
    plot_curves(steps, ["reward", "reward_heldout"], tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_collect_refuses_an_empty_list():
    with pytest.raises(ValueError, match="no evaluation summaries"):
        collect([])


def test_a_table_with_offline_methods_says_where_each_methods_preferences_come_from(summaries, tmp_path):
    steps = collect(summaries)
    assert "data" not in final_table(steps)  # online methods only: the table keeps its columns
    offline = pd.DataFrame([_summary("offline", 0, 10, 51.0, 40.0), _summary("dpo_offline", 0, 10, 49.0, 39.0)])
    table = final_table(pd.concat([steps, offline], ignore_index=True)).set_index("method")
    assert list(table.index) == ["base", "drpo", "dpo_offline", "offline", "draft"]
    assert table["data"].to_dict() == {"base": "-", "drpo": "online ranking", "dpo_offline": "preference dataset",
                                       "offline": "preference dataset", "draft": "online ranking"}
    lines = markdown_table(table.reset_index()).splitlines()
    assert lines[0].startswith("| method | steps | reward grad. | data | seeds |")
    assert lines[5].startswith("| offline | 10 | no | preference dataset | 1 |")
