"""The reward workers refuse weights that are not their model's (workers/weights.py and every real worker script).

The real worker scripts run here against small fake packages of the same interface (tests/fake_reward_packages/,
put first on the worker's PYTHONPATH), since the real packages live in their own environments.
"""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from drpo.rewards.worker import (
    WORKERS_DIR,
    GenEvalWorker,
    HPSv2Worker,
    HPSv3OfficialWorker,
    ImageRewardWorker,
    WorkerError,
)
FAKE_PACKAGES = Path(__file__).parent / "fake_reward_packages"


def _module(path: Path):
    """A module of a file that the test process must not import by name (it lives beside the fake packages)."""
    spec = importlib.util.spec_from_file_location(f"_test_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


weights = _module(WORKERS_DIR / "weights.py")
TinyModel = _module(FAKE_PACKAGES / "fake_tiny.py").TinyModel

# Per worker: its local files (a weights file as a function of the state dict, in the layout its loader reads; a
# text file's content; None for a folder; a Path as it is), and the device to ask for (the fakes ignore it).
STATE_DICT = lambda state: state  # noqa: E731 - a file of the bare state dict
FAKES = {
    "imagereward": {"files": {"checkpoint_path": STATE_DICT, "med_config": "{}", "tokenizer_path": None},
                    "device": "cpu"},
    "hpsv2": {"files": {"clip_checkpoint": STATE_DICT, "checkpoint_path": lambda state: {"state_dict": state}},
              "device": "cpu"},
    "geneval": {"files": {"geneval_dir": FAKE_PACKAGES / "geneval",
                          "detector_checkpoint": lambda state: {"meta": {}, "state_dict": {  # as mmdet saves it
                              f"module.{key}": value for key, value in state.items()}},
                          "clip_checkpoint": STATE_DICT, "detector_config": "# mmdet config"},
                "device": "cpu"},
    "hpsv3_official": {"files": {"model_path": None, "checkpoint_path": STATE_DICT}, "device": "cuda"},
}


def _load(state: dict) -> tuple[list[str], list[str]]:
    return torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.LayerNorm(3)).load_state_dict(state, strict=False)


def test_check_weights_accepts_the_model_and_refuses_others_naming_the_file():
    model_state = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.LayerNorm(3)).state_dict()
    weights.check_weights("good.pt", *_load(model_state))
    with pytest.raises(weights.WeightsMismatch, match=r"^none.pt is not this model's weights file: it lacks 4 of the "
                                                      r"model's tensors \(e.g. \['0.weight', '0.bias', '1.weight'"):
        weights.check_weights("none.pt", *_load({}))
    extra = {**model_state, "head.weight": torch.zeros(1)}
    with pytest.raises(weights.WeightsMismatch, match=r"extra.pt .* holds 1 tensors the model does not have "
                                                      r"\(e.g. \['head.weight'\]\); refusing"):
        weights.check_weights("extra.pt", *_load(extra))
    partial = {key: value for key, value in extra.items() if not key.startswith("1.")}
    with pytest.raises(weights.WeightsMismatch, match=r"lacks 2 .* and holds 1 tensors"):
        weights.check_weights("partial.pt", *_load(partial))
    weights.check_weights("partial.pt", *_load(partial), allow_missing=["1.*"], allow_unexpected=["head.*"])
    with pytest.raises(weights.WeightsMismatch, match=r"lacks 1 of the model's tensors \(e.g. \['1.bias'\]\)"):
        weights.check_weights("partial.pt", *_load(partial), allow_missing=["1.weight"], allow_unexpected=["*"])


WORKERS = {cls.name: cls for cls in (ImageRewardWorker, HPSv2Worker, GenEvalWorker, HPSv3OfficialWorker)}
WEIGHTS_FILES = [(name, argument) for name, fake in FAKES.items()
                 for argument, content in fake["files"].items() if callable(content)]


def _files(name: str, folder: Path, broken: str | None = None) -> dict[str, Path]:
    """The worker's local files; weights files hold TinyModel's tensors, the `broken` one lacks one of them."""
    files = {}
    for argument, content in FAKES[name]["files"].items():
        files[argument] = path = content if isinstance(content, Path) else folder / argument
        if callable(content):
            state = TinyModel().state_dict()
            if argument == broken:
                del state["proj.bias"]
            torch.save(content(state), path)
        elif isinstance(content, str):
            path.write_text(content)
        elif content is None:
            path.mkdir()
    return files


def _start(name: str, files: dict[str, Path], device: str):
    return WORKERS[name](sys.executable, **files, device=device, env={"PYTHONPATH": str(FAKE_PACKAGES)},
                         startup_timeout_s=60)


@pytest.mark.parametrize("name", FAKES)
def test_every_worker_scores_with_its_model_weights(tmp_path, name):
    metadata = [{"tag": "single_object", "prompt": prompt, "include": [{"class": "person", "count": 1}]}
                for prompt in ("a cat", "a dog")] if WORKERS[name].requires_metadata else None
    with _start(name, _files(name, tmp_path), FAKES[name]["device"]) as reward:
        assert torch.isfinite(reward.score(torch.rand(2, 3, 8, 8) * 2 - 1, ["a cat", "a dog"], metadata)).all()


@pytest.mark.parametrize(("name", "broken"), WEIGHTS_FILES, ids=[f"{n}-{a}" for n, a in WEIGHTS_FILES])
def test_every_worker_refuses_a_weights_file_missing_model_tensors(tmp_path, name, broken):
    files = _files(name, tmp_path, broken)
    with pytest.raises(WorkerError, match=rf"(?s)could not load its model: WeightsMismatch: {files[broken]} is not "
                                          r".*weights file.*proj\.bias"):
        _start(name, files, FAKES[name]["device"])


def test_official_hpsv3_refuses_a_cpu_device_with_its_reason(tmp_path):
    with pytest.raises(WorkerError, match=r"could not load its model: RuntimeError: hpsv3 1.0.0 needs a CUDA device "
                                          r"\(got --device cpu\): it casts its reward head's input to fp32 only"):
        _start("hpsv3_official", _files("hpsv3_official", tmp_path), "cpu")
