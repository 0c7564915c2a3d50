"""A training run's folder: one trainer writes it at a time, it belongs to one training configuration, and its
checkpoints are written atomically and resumed from the newest one that is whole.

Layout::

    run.json          the identity the folder belongs to (the settings that shape the run, the prompts' digest)
    checkpoints/checkpoint-<step>/pytorch_lora_weights.safetensors, lora_config.json, optimizer.pt,
                                  training_state.json
    metrics.jsonl     one JSON line per update
    .lock             held (POSIX lock) by the trainer writing the folder

A trainer started with another identity than the folder's (a changed hyper-parameter, other prompts, or a folder
from before identities were recorded) does not resume: the old run moves aside to ``<folder>.superseded-<time>``
and training starts afresh, so results never mix settings.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from drpo.lora import LORA_WEIGHTS

CHECKPOINT_PREFIX = "checkpoint-"
_CHECKPOINT_NAME = re.compile(rf"{CHECKPOINT_PREFIX}(\d+)")
IDENTITY_FILE = "run.json"
# What a run folder holds besides the job's log: moved aside together when the folder changes hands.
RUN_FILES = ("checkpoints", "metrics.jsonl", "train_done.json", "config.resolved.yaml", "environment.json",
             IDENTITY_FILE)


class RunFolderBusy(RuntimeError):
    """Another trainer holds the run folder's lock."""


def checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's checkpoint folders ``checkpoint-<step>``, newest first (temporary ``*.tmp`` folders excluded)."""
    folder = Path(run_dir) / "checkpoints"
    found = [p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and _CHECKPOINT_NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)), reverse=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step (it has its training_state.json), or None."""
    return next((p for p in checkpoints(run_dir) if (p / "training_state.json").is_file()), None)


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(training state, optimizer state) of a checkpoint, after checking that it is whole: ValueError naming the
    file that is missing or damaged."""
    weights = path / LORA_WEIGHTS
    try:
        load_file(weights)
    except Exception as error:  # safetensors raises its own error type for a truncated file
        raise ValueError(f"{weights} is missing or damaged: {error}") from error
    try:
        state = json.loads((path / "training_state.json").read_text())
        if state["step"] != int(path.name.removeprefix(CHECKPOINT_PREFIX)):
            raise ValueError(f"it records step {state['step']}")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path / 'training_state.json'} is missing or damaged: {error}") from error
    try:
        optimizer = torch.load(path / "optimizer.pt", weights_only=True)
    except Exception as error:  # torch raises several types for a truncated or foreign file
        raise ValueError(f"{path / 'optimizer.pt'} is missing or damaged: {error}") from error
    return state, optimizer


def save_checkpoint(run_dir: Path, step: int, write: Callable[[Path], None]) -> Path:
    """Write checkpoint ``step`` through ``write(folder)`` into a temporary folder and rename it into place, so
    that a killed job leaves at most a ``*.tmp`` folder, never a half checkpoint."""
    final = run_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{step}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def remove_temporaries(run_dir: Path, log: Callable[[str], None]) -> None:
    """Delete the ``*.tmp`` checkpoint folders a killed job left behind."""
    for tmp in sorted((run_dir / "checkpoints").glob("*.tmp")):
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"removed {tmp}, an unfinished checkpoint of a job that was killed while writing it")


def claim(run_dir: Path, identity: dict[str, Any], log: Callable[[str], None]) -> None:
    """Make ``run_dir`` belong to ``identity``: a folder that holds a run of another identity (or of none
    recorded) moves it aside to ``<run_dir>.superseded-<time>`` first; an empty folder just records it."""
    recorded = run_dir / IDENTITY_FILE
    previous = json.loads(recorded.read_text()) if recorded.is_file() else None
    held = [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
    if previous != identity and held:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = next(folder for n in range(1, 1000) if not (folder := run_dir.with_name(
            f"{run_dir.name}.superseded-{stamp}" + (f"-{n}" if n > 1 else ""))).exists())
        aside.mkdir(parents=True)
        for path in held:
            path.rename(aside / path.name)
        changed = _differences(previous, identity) if previous else ["no settings were recorded"]
        log(f"{run_dir} held a run of other settings ({'; '.join(changed[:6])}): moved it to {aside} and starting "
            "afresh")
    run_dir.mkdir(parents=True, exist_ok=True)
    recorded.write_text(json.dumps(identity, indent=1, sort_keys=True) + "\n")


def _differences(old: Any, new: Any, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for key in sorted(set(old) | set(new))
                for d in _differences(old.get(key), new.get(key), f"{path}.{key}" if path else key)]
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]


class Lock:
    """``with Lock(run_dir):`` holds the run folder's lock; a second holder gets RunFolderBusy naming the first.

    A POSIX lock (fcntl.lockf, which NFS supports) on ``.lock``; the operating system drops it when the process
    ends, however it ends.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self.handle = None

    def __enter__(self) -> Lock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "an unknown process"
            handle.close()
            raise RunFolderBusy(f"{self.path.parent} is being written by another trainer ({holder}); two trainers "
                                "would interleave its checkpoints and metrics: let it finish or stop it") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self.handle = handle
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.handle is not None:
            fcntl.lockf(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None
