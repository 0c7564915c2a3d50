"""envs/*.yaml as scripts/build_reward_env.py reads them: a stated python, exact pins, conda-only packages refused."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("build_reward_env", REPO / "scripts" / "build_reward_env.py")
build_reward_env = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build_reward_env)


@pytest.mark.parametrize("name", ["hpsv2", "imagereward", "hpsv3", "geneval"])
def test_every_environment_states_its_python_and_pins_every_package(name):
    python, pins, conda_only = build_reward_env.read_spec(name)
    assert python.count(".") == 1
    packages = [pin for pin in pins if not pin.startswith("-")]  # pip options such as --find-links=URL
    assert packages and all("==" in pin for pin in packages), pins  # a pin left open has broken an environment
    assert all(" " not in pin for pin in pins), pins  # one argument each, for a venv's `pip install`
    assert bool(conda_only) == (name == "geneval")  # the others build as venvs


def test_a_conda_only_environment_is_refused_with_the_conda_command():
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "build_reward_env.py"), "geneval"],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "lists conda packages (pytorch=1.12.1=py3.9_cuda11.3*" in result.stderr
    assert "conda env create -f envs/geneval.yaml -p envs/.geneval" in result.stderr


def test_the_geneval_environment_pins_what_genevals_instructions_state():
    """djghosh13/geneval's README and environment.yml: Python 3.9, torch 1.12.1 for CUDA 11.3 with its nvcc (mmcv-full
    compiles against it), mmcv-full 1.7.1, mmdet 2.27.0, open_clip 2.20.0, clip-benchmark 1.4.0."""
    python, pins, conda_only = build_reward_env.read_spec("geneval")
    assert python == "3.9"
    assert {"pytorch=1.12.1=py3.9_cuda11.3*", "torchvision=0.13.1", "cudatoolkit=11.3", "cuda-nvcc=11.3.58"} <= set(
        conda_only)
    assert {"mmcv-full==1.7.1", "mmdet==2.27.0", "open-clip-torch==2.20.0", "clip-benchmark==1.4.0"} <= set(pins)
    # mmcv 1.x's Config calls yapf's FormatCode(..., verify=True), which yapf 0.40.2 removed.
    assert "yapf==0.40.1" in pins
    assert "--find-links=https://download.openmmlab.com/mmcv/dist/cu113/torch1.12/index.html" in pins
    header = (REPO / "envs" / "geneval.yaml").read_text()
    assert "PIP_NO_BUILD_ISOLATION=0 MMCV_WITH_OPS=1 conda env create -f envs/geneval.yaml -p envs/.geneval" in header
