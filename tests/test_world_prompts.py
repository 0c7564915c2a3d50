"""WorldSpec config round trip and the GenEval-style prompt grammar, splits and metadata files."""

import json
from collections import Counter

import pytest

from drpo.world.prompts import (
    TAGS,
    all_prompts,
    make_splits,
    read_metadata_jsonl,
    read_prompts,
    validate_row,
    write_metadata_jsonl,
)
from drpo.world.spec import WorldSpec


def test_spec_round_trip_and_partial_dict():
    spec = WorldSpec()
    assert WorldSpec.from_dict(spec.to_dict()) == spec
    assert json.loads(json.dumps(spec.to_dict())) == spec.to_dict()
    small = WorldSpec.from_dict({"image_size": 64, "colors": {"red": [220, 40, 40], "blue": [40, 90, 230]}})
    assert small.image_size == 64 and small.color_names == ("red", "blue") and small.shapes == spec.shapes
    assert small.rgb("blue") == (40, 90, 230)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"image_sise": 32, "colour": {}}, "unknown WorldSpec keys \\['colour', 'image_sise'\\]"),
        ({"shapes": ["circle", "star"]}, "unsupported shapes \\['star'\\]"),
        ({"colors": {"red": [220, 40, 40], "darkred": [200, 30, 30]}}, "'red' and 'darkred' are too similar"),
        ({"colors": {"grey": [130, 130, 130], "red": [220, 40, 40]}}, "'grey' .* too close to the background"),
        ({"max_count": 9}, "cover 0.90 of the image"),
        ({"object_size": [0.3, 0.2]}, "object_size"),
    ],
)
def test_spec_rejects_bad_values(data, message):
    with pytest.raises(ValueError, match=message):
        WorldSpec.from_dict(data)


def test_grammar_counts_per_tag_and_unique_prompts():
    spec = WorldSpec()
    rows = all_prompts(spec)
    s, c, r = len(spec.shapes), len(spec.colors), len(spec.relations)
    expected = {
        "single_object": s,
        "two_object": s * (s - 1),
        "counting": s * (spec.max_count - 1),
        "colors": s * c,
        "position": s * (s - 1) * r,
        "color_attr": s * (s - 1) * c * (c - 1),
    }
    assert Counter(row["tag"] for row in rows) == expected
    assert len(rows) == 456
    assert len({row["prompt"] for row in rows}) == len(rows)
    for i, row in enumerate(rows):
        validate_row(row, f"row {i}")


def test_grammar_uses_geneval_phrasing_and_metadata():
    by_prompt = {row["prompt"]: row for row in all_prompts(WorldSpec())}
    assert by_prompt["a photo of a circle"]["include"] == [{"class": "circle", "count": 1}]
    assert by_prompt["a photo of three triangles"] == {
        "tag": "counting",
        "include": [{"class": "triangle", "count": 3}],
        "exclude": [{"class": "triangle", "count": 4}],
        "prompt": "a photo of three triangles",
    }
    assert by_prompt["a photo of a red circle"]["include"] == [{"class": "circle", "count": 1, "color": "red"}]
    # The positioned object is named first and refers to include entry 0.
    assert by_prompt["a photo of a circle right of a square"]["include"] == [
        {"class": "square", "count": 1},
        {"class": "circle", "count": 1, "position": ["right of", 0]},
    ]
    assert by_prompt["a photo of a red circle and a blue square"]["tag"] == "color_attr"
    assert "a photo of a square and a circle" in by_prompt
    assert all("exclude" not in row for row in by_prompt.values() if row["tag"] != "counting")


def test_an_before_vowels():
    spec = WorldSpec.from_dict({"colors": {"red": [220, 40, 40], "orange": [240, 160, 0], "blue": [40, 90, 230]}})
    prompts = {row["prompt"] for row in all_prompts(spec)}
    assert "a photo of an orange square" in prompts


def test_splits_disjoint_deterministic_and_balanced():
    spec = WorldSpec()
    train, test = make_splits(spec, n_train=240, n_test=120, seed=0)
    assert len(train) == 240 and len(test) == 120
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert make_splits(spec, n_train=240, n_test=120, seed=0) == (train, test)
    assert make_splits(spec, n_train=240, n_test=120, seed=1)[1] != test
    test_counts = Counter(r["tag"] for r in test)
    train_counts = Counter(r["tag"] for r in train)
    assert [test_counts[t] for t in TAGS] == [2, 6, 4, 12, 24, 72]
    assert [train_counts[t] for t in TAGS] == [2, 6, 4, 12, 24, 192]


def test_small_test_split_still_has_every_tag():
    train, test = make_splits(WorldSpec(), n_train=10, n_test=6, seed=3)
    assert Counter(r["tag"] for r in test) == Counter(TAGS)
    assert len(train) == 10


def test_splits_refuse_more_prompts_than_the_grammar_has():
    with pytest.raises(ValueError, match="only 456 prompts"):
        make_splits(WorldSpec(), n_train=400, n_test=100, seed=0)
    with pytest.raises(ValueError, match="one per tag"):
        make_splits(WorldSpec(), n_train=10, n_test=5, seed=0)


def test_metadata_round_trip(tmp_path):
    rows = all_prompts(WorldSpec())[::7]
    path = tmp_path / "meta" / "evaluation_metadata.jsonl"
    write_metadata_jsonl(rows, path)
    assert read_metadata_jsonl(path) == rows
    assert read_prompts(path) == [r["prompt"] for r in rows]


def test_metadata_errors_name_file_and_line(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl is empty"):
        read_metadata_jsonl(empty)

    good = json.dumps(all_prompts(WorldSpec())[0])
    cases = {
        '{"tag": "single_object", "prompt": "a photo of a circle"}': "line 2: missing keys \\['include'\\]",
        '{"tag": "counting_objects", "include": [{"class": "circle", "count": 1}], "prompt": "x"}': (
            "line 2: unknown tag 'counting_objects'"
        ),
        '{"tag": "position", "include": [{"class": "circle", "count": 1, "position": ["left of", 0]}], '
        '"prompt": "x"}': "line 2: include\\[0\\] position",
        '{"tag": "counting", "include": [{"class": "circle", "count": 0}], "prompt": "x"}': (
            "line 2: include\\[0\\] count must be"
        ),
        "{not json": "line 2: invalid JSON",
    }
    for bad, message in cases.items():
        path = tmp_path / "bad.jsonl"
        path.write_text(good + "\n" + bad + "\n")
        with pytest.raises(ValueError, match=f"bad.jsonl {message}"):
            read_metadata_jsonl(path)


def test_read_prompts_txt_and_errors(tmp_path):
    txt = tmp_path / "prompts.txt"
    txt.write_text("a photo of a circle\n\n  a photo of two squares  \n")
    assert read_prompts(txt) == ["a photo of a circle", "a photo of two squares"]
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match="p.jsonl line 2"):
        read_prompts(bad)
    with pytest.raises(ValueError, match="unsupported prompt file type '.csv'"):
        read_prompts(tmp_path / "p.csv")
