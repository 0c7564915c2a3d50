"""The official GenEval worker end to end, against a fake GenEval clone, mmdet and open_clip of the same interface.

The real worker script (src/drpo/rewards/workers/geneval_worker.py) runs under this environment's python with
tests/fake_reward_packages/ first on its PYTHONPATH: it imports the clone's evaluation/evaluate_images.py, finds
the detector config where the mmdet wheel keeps it (mmdet/.mim/configs/), checks both weights files and sets the
script's globals. The fake judge is deterministic and reads the image (one detected object per quadrant dominated by
a colour channel, class 0 "person" red, 1 "bicycle" green, 2 "car" blue; tests/fake_reward_packages/mmdet/apis.py).
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from drpo.rewards.worker import WORKERS_DIR, GenEvalWorker, WorkerError, WorkerReward, encode_png

FAKE_PACKAGES = Path(__file__).parent / "fake_reward_packages"
ENV = {"PYTHONPATH": str(FAKE_PACKAGES)}


def _tiny_state() -> dict:
    """The fake models' state dict (fake_tiny.TinyModel, loaded by its path: the fakes stay out of this process)."""
    spec = importlib.util.spec_from_file_location("_test_geneval_fake_tiny", FAKE_PACKAGES / "fake_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TinyModel().state_dict()


def _weights(folder: Path, detector_state: dict | None = None, clip_state: dict | None = None) -> dict[str, Path]:
    """The worker's files: the fake clone, an mmdet-style detector checkpoint and an open_clip state dict file."""
    detector, clip = folder / "mask2former.pth", folder / "open_clip_vit_l_14.bin"
    state = _tiny_state()
    torch.save({"meta": {}, "state_dict": {f"module.{k}": v for k, v in (detector_state or state).items()}}, detector)
    torch.save(clip_state or state, clip)
    return {"geneval_dir": FAKE_PACKAGES / "geneval", "detector_checkpoint": detector, "clip_checkpoint": clip}


def _image(quadrants: list[tuple[int, int, int]], size: int = 16) -> torch.Tensor:
    """(3, size, size) in [-1, 1] whose quadrants (top-left, top-right, bottom-left, bottom-right) have these RGB."""
    image = torch.zeros(3, size, size)
    half = size // 2
    for (y, x), rgb in zip(((0, 0), (0, half), (half, 0), (half, half)), quadrants):
        image[:, y:y + half, x:x + half] = torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1)
    return image / 127.5 - 1


RED, GREEN, BLUE, BLACK, DIM_RED = (255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 0, 0), (200, 0, 0)
# (image, GenEval metadata row, expected correct, expected reason), as GenEval's rows of each task look.
CASES = [
    ([RED] * 4, {"tag": "counting", "prompt": "a photo of two persons",
                 "include": [{"class": "person", "count": 2}], "exclude": [{"class": "person", "count": 3}]},
     False, "expected person<3, found 4"),
    ([RED, GREEN, RED, GREEN], {"tag": "two_object", "prompt": "a photo of a person and a bicycle",
                                "include": [{"class": "person", "count": 1}, {"class": "bicycle", "count": 1}]},
     True, ""),
    ([DIM_RED, BLACK, BLACK, BLACK], {"tag": "single_object", "prompt": "a photo of a person",
                                      "include": [{"class": "person", "count": 1}]},
     True, ""),  # confidence 0.78 > GenEval's threshold 0.3
    ([DIM_RED, BLACK, BLACK, BLACK], {"tag": "counting", "prompt": "a photo of one person",
                                      "include": [{"class": "person", "count": 1}],
                                      "exclude": [{"class": "person", "count": 2}]},
     False, "expected person>=1, found 0"),  # 0.78 < GenEval's counting threshold 0.9
    ([BLUE] * 4, {"tag": "two_object", "prompt": "a photo of a bicycle and a person",
                  "include": [{"class": "bicycle", "count": 1}, {"class": "person", "count": 1}]},
     False, "expected bicycle>=1, found 0\nexpected person>=1, found 0"),
]


@pytest.fixture(scope="module")
def geneval(tmp_path_factory):
    # No detector_config: the worker finds mmdet's own (the fake wheel's .mim/configs); 2 images a request.
    with GenEvalWorker(sys.executable, **_weights(tmp_path_factory.mktemp("geneval")), device="cpu", env=ENV,
                       batch_size=2, startup_timeout_s=60) as reward:
        yield reward


def test_the_worker_returns_genevals_verdict_per_image(geneval):
    images = torch.stack([_image(quadrants) for quadrants, *_ in CASES])
    rows = [row for _, row, *_ in CASES]
    prompts = [row["prompt"] for row in rows]
    scores, verdicts = geneval.score_verdicts(images, prompts, rows)  # three requests: 2 + 2 + 1 images
    assert verdicts == [{"correct": correct, "reason": reason} for *_, correct, reason in CASES]
    assert scores.tolist() == [1.0 if correct else 0.0 for *_, correct, _ in CASES]
    # Training's path, scores only: the same scores.
    assert geneval.score(images, prompts, rows).tolist() == scores.tolist()
    assert geneval.worker_info["name"] == "geneval"
    with pytest.raises(ValueError, match="needs metadata"):
        geneval.score_verdicts(images, prompts)


def test_details_cross_the_protocol_only_when_asked(tmp_path):
    command = [sys.executable, str(WORKERS_DIR / "geneval_worker.py"), "--device", "cpu",
               *[arg for key, path in _weights(tmp_path).items() for arg in (f"--{key.replace('_', '-')}", path)]]
    quadrants, row, *_ = CASES[3]
    png = encode_png(((_image(quadrants) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
    requests = [{"id": 1, "prompts": [row["prompt"]], "images": [png], "metadata": [row]},
                {"id": 2, "prompts": [row["prompt"]], "images": [png], "metadata": [row], "details": True}]
    out = subprocess.run(command, input="".join(json.dumps(r) + "\n" for r in requests), capture_output=True,
                         text=True, env={**os.environ, **ENV}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    hello, plain, detailed = map(json.loads, out.stdout.splitlines())
    assert hello["ready"] and hello["name"] == "geneval"
    assert plain == {"id": 1, "scores": [0.0]}
    assert detailed == {"id": 2, "scores": [0.0],
                        "details": [{"correct": False, "reason": "expected person>=1, found 0"}]}


@pytest.mark.parametrize("broken", ["detector_checkpoint", "clip_checkpoint"])
def test_the_worker_still_refuses_weights_of_another_model(tmp_path, broken):
    other = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4)).state_dict()  # not TinyModel's keys
    files = _weights(tmp_path, **{broken.split("_")[0] + "_state": other})
    with pytest.raises(WorkerError, match=rf"(?s)could not load its model: WeightsMismatch: {files[broken]} is not "
                                          r"this model's weights file: it lacks 2 of the model's tensors"):
        GenEvalWorker(sys.executable, **files, device="cpu", env=ENV, startup_timeout_s=60)


def test_a_worker_without_details_says_so_when_they_are_asked():
    with WorkerReward([sys.executable, str(WORKERS_DIR / "mean_brightness_worker.py")], timeout_s=30) as reward:
        with pytest.raises(WorkerError, match="sent no per-image details"):
            reward.score_with_details(-torch.ones(2, 3, 8, 8), ["a", "b"])
        assert reward.score(-torch.ones(2, 3, 8, 8), ["a", "b"]).tolist() == [0.0, 0.0]  # still in step


def test_the_evaluation_takes_its_geneval_columns_from_the_worker(geneval, tiny_config):
    """The official worker as an evaluation reward at paper scale (no world): its verdicts are the per-image
    correct / reason columns and the per-task table, in the pass that scores it."""
    from drpo.evaluate import GENEVAL_TAGS, sample_latents, score_latents, summarize
    from drpo.pipeline import load_models

    generator, clip, _ = load_models(tiny_config, features=False)
    rows, seeds = [row for _, row, *_ in CASES], [1, 2]
    latents = sample_latents(generator, [row["prompt"] for row in rows], seeds, batch_size=8)
    per_image, per_prompt = score_latents(generator, clip, latents, rows, seeds, batch_size=4,
                                          held_out={"geneval": geneval})
    assert per_image["reward_geneval"].tolist() == per_image["correct"].astype(float).tolist()
    assert (per_image["reason"] == "").tolist() == per_image["correct"].tolist()
    assert per_image["reason"].str.startswith("expected ").tolist() == (~per_image["correct"]).tolist()
    summary = summarize(per_image, per_prompt, reward_scale=100.0, held_out_scales={"geneval": 100.0})
    by_tag = per_image.groupby("tag")["correct"].mean() * 100
    assert summary["geneval_overall"] == pytest.approx(by_tag.mean())
    assert [summary[f"geneval_{tag}"] for tag in ("counting", "single_object", "two_object")] == pytest.approx(
        [by_tag[tag] for tag in ("counting", "single_object", "two_object")])
    assert all(summary[f"geneval_{tag}"] != summary[f"geneval_{tag}"] for tag in GENEVAL_TAGS
               if tag not in by_tag)  # NaN: no prompt of that task here
