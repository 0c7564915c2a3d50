"""Provenance written next to every result: the resolved config and the versions that made it."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

TRACKED_PACKAGES = (
    "drpo", "torch", "diffusers", "transformers", "peft", "accelerate", "safetensors",
    "snakemake", "numpy", "pandas", "pyarrow", "pillow",
)


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit(repo: Path | None = None) -> str:
    """The checkout's commit (with '-dirty' when it has uncommitted changes), or 'unknown'."""
    cwd = repo or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def environment() -> dict[str, Any]:
    import torch

    return {
        "versions": package_versions(),
        "git_commit": git_commit(),
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_provenance(out_dir: str | Path, config: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    """Write ``config.resolved.yaml`` and ``environment.json`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.resolved.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    info = environment() | (extra or {})
    (out_dir / "environment.json").write_text(json.dumps(info, indent=2) + "\n")
