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
    assert pins and all("==" in pin for pin in pins), pins  # a pin left open has broken an environment before
    assert bool(conda_only) == (name == "geneval")  # the others build as venvs


def test_a_conda_only_environment_is_refused_with_the_conda_command():
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "build_reward_env.py"), "geneval"],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "lists conda packages (pytorch=1.12.1" in result.stderr
    assert "conda env create -f envs/geneval.yaml -p envs/.geneval" in result.stderr
