"""GenEval sample folders, results JSONL and summary scores."""

import json

import numpy as np
import pytest
from PIL import Image

from drpo.world.geneval import (
    evaluate_folder,
    iter_sample_folder,
    read_results_jsonl,
    summarize,
    write_results_jsonl,
    write_sample_folder,
)
from drpo.world.prompts import all_prompts
from drpo.world.render import render, render_negative
from drpo.world.spec import WorldSpec

SPEC = WorldSpec()


def test_sample_folder_round_trip_and_evaluation(tmp_path):
    rows = all_prompts(SPEC)[::40]
    rng = np.random.default_rng(0)
    images = [[render(row, rng, SPEC), render_negative(row, rng, SPEC)[0]] for row in rows]
    write_sample_folder(tmp_path, rows, images)

    assert (tmp_path / "00000" / "metadata.jsonl").read_text() == json.dumps(rows[0]) + "\n"
    read_back = list(iter_sample_folder(tmp_path))
    assert [row for row, _ in read_back] == rows
    for (_, paths), originals in zip(read_back, images):
        assert [p.name for p in paths] == ["0000.png", "0001.png"]
        for path, original in zip(paths, originals):
            assert np.array_equal(np.asarray(Image.open(path)), original)

    results = evaluate_folder(tmp_path, SPEC)
    assert len(results) == 2 * len(rows)
    assert [r["correct"] for r in results] == [True, False] * len(rows)
    first = results[0]
    assert first["filename"].endswith("00000/samples/0000.png")
    assert json.loads(first["metadata"]) == rows[0]
    assert (first["tag"], first["prompt"], first["reason"]) == (rows[0]["tag"], rows[0]["prompt"], "")
    (box,) = json.loads(first["details"])["circle"]
    assert len(box) == 5 and box[4] > 0.3 and box[0] < box[2]
    assert len(json.loads(first["colors"])["circle"]) == 1
    assert all(r["reason"] for r in results[1::2])

    path = tmp_path / "results.jsonl"
    write_results_jsonl(results, path)
    assert read_results_jsonl(path) == results
    summary = summarize(results)
    assert summary["images"] == len(results) and summary["prompts"] == len(rows)
    assert summary["image_accuracy"] == 0.5 and summary["prompt_accuracy"] == 1.0


def test_summary_is_the_mean_of_per_tag_accuracies():
    def result(tag: str, prompt: str, correct: bool) -> dict:
        metadata = json.dumps({"tag": tag, "prompt": prompt})
        return {"tag": tag, "prompt": prompt, "metadata": metadata, "correct": correct}

    results = (
        [result("single_object", "a", True)] * 4
        + [result("counting", "b", True), result("counting", "b", False)]
        + [result("counting", "c", False)] * 2
        + [result("position", "d", True)] + [result("position", "d", False)] * 3
    )
    summary = summarize(results)
    assert list(summary["per_tag"]) == ["single_object", "counting", "position"]
    assert summary["per_tag"]["counting"] == {"correct": 1, "total": 4, "accuracy": 0.25}
    assert summary["overall"] == pytest.approx((1.0 + 0.25 + 0.25) / 3)
    assert summary["image_accuracy"] == pytest.approx(6 / 12)
    assert summary["prompts"] == 4 and summary["prompt_accuracy"] == pytest.approx(3 / 4)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="no results"):
        summarize([])
    with pytest.raises(ValueError, match="no GenEval prompt folders"):
        list(iter_sample_folder(tmp_path))
    with pytest.raises(ValueError, match="2 image lists"):
        write_sample_folder(tmp_path, all_prompts(SPEC)[:1], [[], []])
    (tmp_path / "00000").mkdir()
    (tmp_path / "00000" / "metadata.jsonl").write_text('{"tag": "single_object", "prompt": "x"}\n')
    with pytest.raises(ValueError, match="00000/metadata.jsonl line 1: missing keys \\['include'\\]"):
        list(iter_sample_folder(tmp_path))
    bad = tmp_path / "results.jsonl"
    bad.write_text('{"tag": "colors", "correct": true}\n')
    with pytest.raises(ValueError, match="results.jsonl line 1: missing keys \\['metadata'\\]"):
        read_results_jsonl(bad)
