"""The miniature world's preference datasets (drpo.world.preferences): both kinds, both layouts, and both readers of
drpo.preferences on them; chosen images pass the detector for their prompt, rejected ones fail it."""

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from drpo.preferences import ReadStats, read_preferences
from drpo.world.detect import judge
from drpo.world.preferences import (
    generated_preferences,
    render_preferences,
    write_jsonl_dataset,
    write_pickapic_dataset,
)
from drpo.world.prompts import make_splits
from drpo.world.spec import WorldSpec

REPO = Path(__file__).resolve().parents[1]
SPEC = WorldSpec()


@pytest.fixture(scope="module")
def split():
    train, test = make_splits(SPEC, n_train=240, n_test=120, seed=0)
    by_tag = {}
    for row in train:
        by_tag.setdefault(row["tag"], row)
    return list(by_tag.values()), {row["prompt"] for row in train}, {row["prompt"] for row in test}


def _pixels(ref) -> np.ndarray:
    return np.asarray(Image.open(ref.path if ref.path is not None else io.BytesIO(ref.data)).convert("RGB"))


def _check(rows, meta_by_prompt, train_prompts, test_prompts):
    assert rows and {r.prompt for r in rows} <= train_prompts and not {r.prompt for r in rows} & test_prompts
    for row in rows:
        meta = meta_by_prompt[row.prompt]
        assert all(judge(_pixels(ref), meta, SPEC)[0] for ref in row.chosen), row.where
        assert not any(judge(_pixels(ref), meta, SPEC)[0] for ref in row.rejected), row.where


def test_renders_and_near_misses_in_both_layouts(split, tmp_path):
    rows, train_prompts, test_prompts = split
    meta = {row["prompt"]: row for row in rows}
    counts = write_jsonl_dataset(render_preferences(rows, SPEC, chosen=2, rejected=3, seed=0), tmp_path / "j/pairs.jsonl")
    assert counts == {"rows": 6, "chosen": 12, "rejected": 18}
    jsonl = list(read_preferences(tmp_path / "j/pairs.jsonl"))
    assert [len(r.chosen) for r in jsonl] == [2] * 6 and [len(r.rejected) for r in jsonl] == [3] * 6
    _check(jsonl, meta, train_prompts, test_prompts)

    counts = write_pickapic_dataset(render_preferences(rows, SPEC, chosen=2, rejected=2, seed=0), tmp_path / "p",
                                    SPEC, seed=0)
    assert counts["pairs"] == 12 and counts["ties"] == 6 and counts["rows"] == 18
    stats = ReadStats()
    pickapic = list(read_preferences(tmp_path / "p", "auto", stats))
    assert len(pickapic) == 12 and stats.ties == 6
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["train-00000-of-00001.parquet"]
    _check(pickapic, meta, train_prompts, test_prompts)


def test_the_base_generators_own_samples_judged_by_the_detector(split, tmp_path):
    from drpo.generators import load_generator

    rows, train_prompts, test_prompts = split
    generator = load_generator(REPO / "resources/miniature/generator", "sd-turbo")
    stats = {}
    preferences = generated_preferences(rows, SPEC, generator, chosen=1, rejected=2, candidates=16, seed=0,
                                        batch_size=16, stats=stats)
    counts = write_jsonl_dataset(preferences, tmp_path / "pairs.jsonl")
    assert counts["rows"] + stats["prompts_left_out"] == len(rows) and counts["rows"] >= 3
    loaded = list(read_preferences(tmp_path / "pairs.jsonl"))
    assert all(len(r.chosen) == 1 and 1 <= len(r.rejected) <= 2 for r in loaded)
    _check(loaded, {row["prompt"]: row for row in rows}, train_prompts, test_prompts)
