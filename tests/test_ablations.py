"""Ablation studies: variant configs, which variants share the default run, tables and figures from summaries."""

import json

import pandas as pd
import pytest
from PIL import Image

from drpo.ablations import is_shared, study_table, write_study
from drpo.config import ConfigError, load_config, merge, variant_config, variants
from drpo.paper import FINDINGS, compare, verdict, write_comparison

STUDIES = {"kernel": {"title": "Kernel", "plot": "bars", "axis": None,
                      "variants": {"laplacian": {"drpo": {"kernel": "laplacian"}}, "rbf": {"drpo": {"kernel": "rbf"}}}},
           "weight": {"title": "Anchor weight", "plot": "line", "axis": "eta",
                      "variants": {"1000": {"drpo": {"positive_weight": 1000.0}},
                                   "3000": {"drpo": {"positive_weight": 3000.0}}}}}


@pytest.fixture(scope="module")
def config():
    return load_config("config.yaml", overrides={"ablations": {"studies": STUDIES, "evaluate": {
        "rewards": {"detector": {"name": "geneval_lite"}}}}})


def test_a_variant_is_its_fragment_over_the_config_training_drpo_on_the_ablation_seeds(config):
    cfg = variant_config(config, "kernel", "rbf")
    assert cfg["drpo"]["kernel"] == "rbf" and cfg["drpo"]["radii"] == config["drpo"]["radii"]
    assert cfg["train"]["methods"] == ["drpo"] and cfg["train"]["seeds"] == config["ablations"]["seeds"]
    assert set(cfg["evaluate"]["rewards"]) == {"pickscore", "heldout", "detector"}
    assert variants(config) == [("kernel", "laplacian"), ("kernel", "rbf"), ("weight", "1000"), ("weight", "3000")]


def test_only_variants_with_the_default_training_settings_share_the_default_run(config):
    shared = {pair for pair in variants(config) if is_shared(config, *pair)}
    assert shared == {("kernel", "laplacian"), ("weight", "3000")}
    # The evaluation is not a training setting.
    assert is_shared(merge(config, {"evaluate": {"seeds": [1]}}), "kernel", "laplacian")


def test_a_bad_variant_fails_when_the_config_is_read_and_is_named():
    studies = {"kernel": STUDIES["kernel"] | {"variants": {"rbf": {"drpo": {"kernal": "rbf"}}}}}
    with pytest.raises(ConfigError, match=r"ablations.studies.kernel.variants.rbf.*\n.*kernal"):
        load_config("config.yaml", overrides={"ablations": {"studies": studies}})
    studies = {"kernel": STUDIES["kernel"] | {"variants": {"no/slash": {}}}}
    with pytest.raises(ConfigError, match="no/slash"):
        load_config("config.yaml", overrides={"ablations": {"studies": studies}})


def _summary(tmp_path, name, seed, **metrics):
    path = tmp_path / f"{name}_{seed}.json"
    path.write_text(json.dumps({"method": "drpo", "seed": seed, "step": 75, **metrics}))
    return str(path)


@pytest.fixture
def summaries(tmp_path):
    pairs = [("base", _summary(tmp_path, "base", 0, reward_detector=40.0, reward_pickscore=60.0,
                               geneval_overall=30.0, geneval_strict_overall=25.0, diversity=0.2))]
    for variant, detector in (("1000", 44.0), ("3000", 48.0)):
        pairs += [(variant, _summary(tmp_path, variant, seed, reward_detector=detector + seed, reward_pickscore=59.0,
                                     geneval_overall=35.0 + seed, geneval_strict_overall=26.0, diversity=0.19))
                  for seed in (0, 1, 2)]
    return pairs


def test_the_study_table_has_a_row_per_variant_with_mean_and_std_over_seeds(summaries):
    table = study_table(summaries).set_index("variant")
    assert list(table.index) == ["base", "1000", "3000"]
    assert table.loc["3000", "reward_detector"] == pytest.approx(49.0)
    assert table.loc["3000", "reward_detector_std"] == pytest.approx((2 / 3) ** 0.5)
    assert table.loc["3000", "seeds"] == 3 and table.loc["base", "steps"] == 75


@pytest.mark.parametrize("plot", ["line", "bars", "matrix"])
def test_write_study_writes_the_table_markdown_and_a_figure(summaries, tmp_path, plot):
    out = {ext: tmp_path / f"{plot}.{ext}" for ext in ("csv", "md", "html", "png")}
    write_study(summaries, {"title": "Anchor weight", "plot": plot, "axis": "eta"}, out["csv"], out["md"], out["html"],
                out["png"])
    assert "<td>49.00 ± 0.82</td>" in out["html"].read_text()
    assert pd.read_csv(out["csv"])["variant"].astype(str).tolist() == ["base", "1000", "3000"]
    assert "| 3000 | 75 | 3 | 49.00 ± 0.82 |" in out["md"].read_text()
    width, height = Image.open(out["png"]).size
    assert width > 600 and height > 300


def test_verdicts_follow_the_papers_ordering_beyond_the_seed_spread():
    assert verdict(1.0, 2.0, 0.5) == "agrees"
    assert verdict(1.0, -2.0, 0.5) == "disagrees"
    assert verdict(1.0, 0.3, 0.5) == "within seed spread"


def test_paper_vs_ours_reads_the_tables_present_and_marks_the_rest_not_run(tmp_path):
    metrics = {"reward": (50.0, 1.0), "reward_heldout": (60.0, 0.5), "geneval_overall": (40.0, 0.1)}
    rows = [{"method": method, "seeds": seeds, **{m: value + offset for m, (value, _) in metrics.items()},
             **{f"{m}_std": std for m, (_, std) in metrics.items()}}
            for method, offset, seeds in (("base", 0.0, 1), ("drpo", 5.0, 3))]
    pd.DataFrame(rows).to_csv(tmp_path / "summary.csv", index=False)
    table = write_comparison(tmp_path, "miniature", tmp_path / "paper_vs_ours.md")
    assert len(table) == len(FINDINGS)
    drpo_vs_base = table[(table["paper: higher > lower"] == "DrPO > base") & (table["our metric"].str.startswith(
        "target"))].iloc[0]
    assert drpo_vs_base["ours"] == "55.00 vs 50.00" and drpo_vs_base["verdict"] == "agrees"
    assert drpo_vs_base["our seeds"] == 3  # DrPO's training seeds, not the untrained base's single row
    assert (table["topic"] == "kernel").sum() and set(table.loc[table["topic"] == "kernel", "verdict"]) == {
        "not run (ablation_kernel)"}
    assert "Verdicts:" in (tmp_path / "paper_vs_ours.md").read_text()
    assert (tmp_path / "paper_vs_ours.csv").exists() and "<table" in (tmp_path / "paper_vs_ours.html").read_text()
    assert compare(tmp_path / "nothing", "miniature")["verdict"].str.startswith("not run").all()
