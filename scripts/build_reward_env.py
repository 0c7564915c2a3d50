"""Build a reward worker's environment from envs/<name>.yaml as a Python venv at envs/.<name>, without conda.

Reads the yaml's python version and pip pins, creates the venv with that python (`python3.X` on PATH, or
--python), installs the pins in one pip call and runs `pip check`. The worker then runs with
envs/.<name>/bin/python (the `python:` of its reward in the config). A yaml with conda-only packages (GenEval's
CUDA 11.3 torch) is refused with the conda command that builds it. Check a built environment end to end with
scripts/check_reward_envs.py.

    python scripts/build_reward_env.py hpsv2            # or: make reward-env-hpsv2
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
ENVS = ROOT / "envs"


def read_spec(name: str) -> tuple[str, list[str], list[str]]:
    """envs/<name>.yaml -> (python version, pip pins, conda-only packages). The pins keep pip's option lines
    (e.g. --find-links=URL, written with "=" so that each is one argument of `pip install`)."""
    spec = yaml.safe_load((ENVS / f"{name}.yaml").read_text())
    python, pins, conda_only = None, [], []
    for dependency in spec["dependencies"]:
        if isinstance(dependency, dict):
            pins += dependency.get("pip", [])
        elif dependency.startswith("python="):
            python = dependency.split("=", 1)[1]
        elif dependency != "pip":
            conda_only.append(dependency)
    if python is None:
        raise SystemExit(f"envs/{name}.yaml states no python version (python=3.X)")
    return python, pins, conda_only


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="an environment of envs/, e.g. hpsv2, imagereward, hpsv3")
    parser.add_argument("--python", help="interpreter for the venv (default: python<version of the yaml> on PATH)")
    args = parser.parse_args()
    if not (ENVS / f"{args.name}.yaml").is_file():
        names = sorted(path.stem for path in ENVS.glob("*.yaml"))
        raise SystemExit(f"no envs/{args.name}.yaml; environments: {', '.join(names)}")
    version, pins, conda_only = read_spec(args.name)
    target = ENVS / f".{args.name}"
    if conda_only:
        raise SystemExit(f"envs/{args.name}.yaml lists conda packages ({', '.join(conda_only)}), which a venv cannot "
                         f"hold; build it with conda as its header says (conda env create -f envs/{args.name}.yaml "
                         f"-p {target.relative_to(ROOT)})")
    python = args.python or shutil.which(f"python{version}")
    if python is None:
        raise SystemExit(f"envs/{args.name}.yaml needs Python {version}: no python{version} on PATH (pass --python)")
    probe = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                           capture_output=True, text=True)  # a pyenv shim of an inactive version fails here
    if probe.returncode or probe.stdout.strip() != version:
        raise SystemExit(f"{python} is not a working Python {version} ({(probe.stdout + probe.stderr).strip()[:200]}); "
                         f"envs/{args.name}.yaml needs {version}: pass --python")

    start = time.monotonic()
    subprocess.run([python, "-m", "venv", str(target)], check=True)
    env_python = str(target / "bin" / "python")
    print(f"installing into {target.relative_to(ROOT)}: {' '.join(pins)}", flush=True)
    subprocess.run([env_python, "-m", "pip", "install", "--quiet", *pins], check=True)
    subprocess.run([env_python, "-m", "pip", "check"], check=True)
    size = subprocess.run(["du", "-sh", str(target)], capture_output=True, text=True).stdout.split("\t")[0]
    print(f"built {target.relative_to(ROOT)} in {time.monotonic() - start:.0f} s ({size}); reward python: "
          f"{target.relative_to(ROOT)}/bin/python; check it: python scripts/check_reward_envs.py {args.name}")


if __name__ == "__main__":
    sys.exit(main())
