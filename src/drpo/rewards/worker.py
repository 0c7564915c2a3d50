"""Black-box rewards: any command that reads images + prompts and writes scores, started once and kept alive.

WorkerReward (the client, registered as "worker") and WorkerError; the named worker rewards ImageRewardWorker,
HPSv2Worker, GenEvalWorker and HPSv3OfficialWorker, which start the scripts in workers/ beside this module. They
share the module (which makes it a little under 500 lines) because each is only the command line of its script.

A reward whose package clashes with ours (ImageReward: timm 0.6.13; HPSv2: open_clip; GenEval: mmdet 2.x;
the official HPSv3: transformers 4.45) runs as a worker in its own environment (envs/*.yaml). The line protocol
(version 1; server side in workers/protocol.py, which workers copy or import):

    worker -> {"ready": true, "protocol": 1, "name": "imagereward", "version": "1.5"}     first line (handshake)
    client -> {"id": 7, "prompts": [...], "images": [base64 PNG, ...], "metadata": [...] or null,
               "details": true (optional; only `score_with_details` asks)}
    worker -> {"id": 7, "scores": [...], "details": [{...}, ...] (only if asked, and the worker has them)}
              or {"id": 7, "error": "...", "traceback": "..." (optional)}
    client closes stdin -> worker exits 0

One JSON object per line on stdin/stdout; stdout carries nothing else, stderr is the worker's log. Images are
8-bit RGB PNGs rounded like the evaluation's PNGs, so a worker scores what the tables score.

Lifecycle and failures (never a guessed score; every error names the reward and its command):
- The worker starts when the reward is built, so a missing package or model file fails early, with the worker's
  own message. It must send its handshake within `startup_timeout_s`.
- Crash (stdout closes: exit code + last stderr lines), hang (no reply within `timeout_s`: its process group is
  killed), a line that is not JSON, or a reply to another request id: the worker is stopped and WorkerError is
  raised. The next call starts a fresh worker, at most `max_restarts` times over the reward's life; after that
  every call fails at once with the last error.
- An error reply (its message and the worker's traceback tail go into the error), the wrong number of scores, or
  non-numeric / non-finite scores: WorkerError for that call; the worker, still in step with the client, stays up.
- `close()` (also `with reward:`, garbage collection and interpreter exit) closes stdin, waits
  `shutdown_timeout_s`, then kills the process group. A closed reward restarts its worker on next use.
"""

from __future__ import annotations

import base64
import collections
import functools
import io
import json
import logging
import math
import os
import queue
import shlex
import signal
import subprocess
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, NoReturn

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from drpo.processes import child_ends_with_parent
from drpo.rewards.base import Reward

PROTOCOL_VERSION = 1
# The worker scripts: package data next to this module. They stay plain scripts, run by another environment's
# python that cannot import drpo, so they are not a subpackage.
WORKERS_DIR = Path(__file__).resolve().parent / "workers"
STDERR_TAIL_LINES = 20

log = logging.getLogger(__name__)


class WorkerError(RuntimeError):
    """A black-box reward worker failed; the message names the reward, the command and what happened."""


def encode_png(pixels: np.ndarray) -> str:
    """(H, W, 3) uint8 -> base64 PNG string."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _pump(stream: IO[bytes], sink: Callable[[str | None], None]) -> None:
    """Feed the decoded lines of `stream` to `sink`, then None at end of stream (runs in a thread)."""
    for raw in iter(stream.readline, b""):
        sink(raw.decode("utf-8", errors="replace").rstrip("\n"))
    sink(None)


def _keep_stderr(tail: collections.deque, label: str, line: str | None) -> None:
    if line is not None:
        tail.append(line)
        log.info("[%s] %s", label, line)


def _kill(proc: subprocess.Popen) -> None:
    """Kill the worker's process group (it runs in its own session) and reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _close_pipes(proc: subprocess.Popen) -> None:
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        try:
            stream.close()
        except OSError:
            pass


def _shutdown(proc: subprocess.Popen, timeout_s: float) -> None:
    """Close stdin so the worker exits on its own; kill it if it has not after `timeout_s`."""
    try:
        proc.stdin.close()
        proc.wait(timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired):
        pass
    _kill(proc)


class WorkerReward(Reward):
    """A reward computed by a long-lived worker process (protocol in the module docstring); non-differentiable.

    Args:
        command: the worker's command line, e.g. ["envs/.imagereward/bin/python",
            "<WORKERS_DIR>/imagereward_worker.py", "--checkpoint", ...].
        cwd: working directory of the worker (default: ours).
        env: variables added to our environment for the worker (e.g. CUDA_VISIBLE_DEVICES).
        timeout_s: seconds to wait for each reply (one request holds up to `batch_size` images).
        startup_timeout_s: seconds to wait for the handshake (model loading).
        shutdown_timeout_s: seconds a closing worker gets to exit before it is killed.
        batch_size: images per request.
        max_restarts: fresh workers started after failures, over the reward's life.
        report_scale: table multiplier (subclasses set theirs).
    The generic reward takes the name the worker announces; a subclass checks that the worker announces its name.
    """

    name = "worker"

    def __init__(
        self,
        command: Sequence[str | os.PathLike],
        *,
        cwd: str | os.PathLike | None = None,
        env: Mapping[str, str] | None = None,
        timeout_s: float = 600.0,
        startup_timeout_s: float = 1800.0,
        shutdown_timeout_s: float = 10.0,
        batch_size: int = 32,
        max_restarts: int = 2,
        report_scale: float | None = None,
    ) -> None:
        if isinstance(command, (str, os.PathLike)) or not command:
            raise ValueError(f"reward {self.name!r}: command must be a non-empty list of arguments, got {command!r}")
        if batch_size < 1:
            raise ValueError(f"reward {self.name!r}: batch_size must be >= 1, got {batch_size}")
        self.command = [os.fspath(part) for part in command]
        self.cwd = cwd
        self.env = None if env is None else {**os.environ, **{k: str(v) for k, v in env.items()}}
        self.timeout_s = timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.shutdown_timeout_s = shutdown_timeout_s
        self.batch_size = batch_size
        self.max_restarts = max_restarts
        if report_scale is not None:
            self.report_scale = report_scale
        self.worker_info: dict[str, Any] = {}
        self._proc: subprocess.Popen | None = None
        self._lines: queue.Queue = queue.Queue()
        self._stderr: collections.deque = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._threads: list[threading.Thread] = []
        self._finalizer: weakref.finalize | None = None
        self._next_id = 0
        self._failures = 0
        self._last_error = ""
        self._start()

    # ------------------------------------------------------------------------------------------ process
    def _who(self) -> str:
        return f"reward worker {self.name!r} (command: {shlex.join(self.command)})"

    def _start(self) -> None:
        self._stderr.clear()
        self._lines = queue.Queue()
        try:
            # The worker runs in a session of its own (its whole group can be killed) and dies with this process.
            proc = subprocess.Popen(self.command, cwd=self.cwd, env=self.env, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                    preexec_fn=child_ends_with_parent())
        except OSError as exc:
            raise WorkerError(f"{self._who()}: could not start: {exc}") from exc
        self._proc = proc
        # The threads and the finalizer hold the process and buffers, never `self`, so the reward can be collected.
        self._finalizer = weakref.finalize(self, _shutdown, proc, self.shutdown_timeout_s)
        self._threads = [
            threading.Thread(target=_pump, args=(proc.stdout, self._lines.put), daemon=True),
            threading.Thread(target=_pump, args=(proc.stderr, functools.partial(_keep_stderr, self._stderr, self.name)),
                             daemon=True),
        ]
        for thread in self._threads:
            thread.start()

        hello = self._read_message("handshake", self.startup_timeout_s)
        if hello.get("ready") is not True:
            self._fail(f"the worker could not load its model: {hello.get('error', hello)}")
        if hello.get("protocol") != PROTOCOL_VERSION:
            self._fail(f"the worker speaks protocol {hello.get('protocol')!r}, expected {PROTOCOL_VERSION}")
        announced = str(hello.get("name") or "")
        if type(self).name == WorkerReward.name:
            self.name = announced or self.name
        elif announced != self.name:
            self._fail(f"the command serves reward {announced!r}, expected {self.name!r}")
        self.worker_info = {"name": announced, "version": str(hello.get("version", ""))}

    def _fail(self, problem: str) -> NoReturn:
        """Stop the worker, remember the error, raise it with the worker's last stderr lines."""
        proc, self._proc = self._proc, None
        if proc is not None:
            self._finalizer.detach()
            _kill(proc)
            self._join(proc)
        self._failures += 1
        tail = "\n".join(self._stderr)
        self._last_error = f"{self._who()}: {problem}\n" + (
            f"last stderr lines:\n{tail}" if tail else "(the worker wrote nothing to stderr)")
        raise WorkerError(self._last_error)

    def _join(self, proc: subprocess.Popen) -> None:
        """After the worker is gone: let the reader threads drain its output, then close the pipes."""
        for thread in self._threads:
            thread.join(timeout=2)
        _close_pipes(proc)

    def _exit_code(self) -> int | None:
        try:
            return self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return None  # stdout closed but the process lives on; _fail kills it

    def _read_message(self, what: str, timeout_s: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            self._fail(f"no {what} within {timeout_s:g} s; killed the worker")
        if line is None:
            self._fail(f"the worker exited with code {self._exit_code()} before sending its {what}")
        try:
            message = json.loads(line)
        except json.JSONDecodeError:
            message = None
        if not isinstance(message, dict):
            self._fail(f"malformed {what} (not a JSON object): {line[:200]!r}")
        return message

    def close(self) -> None:
        """Stop the worker (close stdin, wait, kill); the next call starts a new one."""
        proc, self._proc = self._proc, None
        if proc is not None:
            self._finalizer()
            self._join(proc)

    def __enter__(self) -> WorkerReward:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ scoring
    def _request(self, prompts: list[str], pixels: np.ndarray, metadata: list | None,
                 details: bool = False) -> tuple[list[float], list | None]:
        """Scores of one request and, when ``details`` is asked and the worker sends them, its per-image details."""
        if self._proc is None:
            if self._failures > self.max_restarts:
                raise WorkerError(f"{self._who()}: not restarted after {self._failures} failures; last error:\n"
                                  f"{self._last_error}")
            self._start()
        self._next_id += 1
        request_id = self._next_id
        try:
            request = {"id": request_id, "prompts": prompts, "images": [encode_png(p) for p in pixels],
                       "metadata": metadata}
            line = json.dumps(request | ({"details": True} if details else {}), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"reward {self.name!r}: metadata is not JSON-serialisable: {exc}") from exc
        self._send(line.encode("utf-8") + b"\n", request_id)

        reply = self._read_message(f"reply to request {request_id}", self.timeout_s)
        if "error" in reply and reply.get("id") in (request_id, None):
            raise WorkerError(f"{self._who()}: request {request_id} failed in the worker: {reply['error']}"
                              + _traceback_note(reply.get("traceback")))
        if reply.get("id") != request_id:
            self._fail(f"reply id {reply.get('id')!r} does not match request id {request_id}")
        scores = reply.get("scores")
        if not isinstance(scores, list) or len(scores) != len(prompts):
            got = f"{len(scores)} scores" if isinstance(scores, list) else f"no score list ({str(reply)[:200]})"
            raise WorkerError(f"{self._who()}: returned {got} for {len(prompts)} images")
        if not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
            raise WorkerError(f"{self._who()}: returned non-numeric scores {scores[:8]}")
        bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
        if bad:
            raise WorkerError(f"{self._who()}: returned non-finite scores at indices {bad} "
                              f"(values {[scores[i] for i in bad[:8]]}); refusing to rank them")
        per_image = reply.get("details") if details else None
        if per_image is not None and (not isinstance(per_image, list) or len(per_image) != len(prompts)):
            got = f"{len(per_image)} details" if isinstance(per_image, list) else f"details {str(per_image)[:200]}"
            raise WorkerError(f"{self._who()}: returned {got} for {len(prompts)} images")
        return scores, per_image

    def _send(self, data: bytes, request_id: int) -> None:
        """Write a request; in a thread, because a worker that stops reading would block a large write forever."""
        stdin, broken = self._proc.stdin, []

        def write() -> None:
            try:
                stdin.write(data)
                stdin.flush()
            except OSError as exc:
                broken.append(exc)

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        writer.join(self.timeout_s)
        if writer.is_alive():
            self._fail(f"the worker did not read request {request_id} within {self.timeout_s:g} s; killed the worker")
        if broken:
            self._fail(f"the worker exited with code {self._exit_code()} before it took request {request_id}")

    def _score(self, images: Tensor, prompts: list[str], metadata: list[dict] | None) -> Tensor:
        return self._batches(images, prompts, metadata, details=False)[0]

    def _batches(self, images: Tensor, prompts: list[str], metadata: list[dict] | None,
                 details: bool) -> tuple[Tensor, list | None]:
        """Every image through requests of at most `batch_size`: (scores (N,), N details or None if any request
        came back without them)."""
        pixels = self._to_uint8(images)
        scores: list[float] = []
        per_image: list | None = []
        for start in range(0, len(prompts), self.batch_size):
            end = start + self.batch_size
            batch_scores, batch_details = self._request(prompts[start:end], pixels[start:end],
                                                        None if metadata is None else list(metadata[start:end]),
                                                        details)
            scores += batch_scores
            per_image = None if per_image is None or batch_details is None else per_image + batch_details
        return torch.tensor(scores, dtype=torch.float64).float(), per_image

    def score_with_details(self, images: Tensor, prompts: list[str],
                           metadata: list[dict] | None = None) -> tuple[Tensor, list]:
        """`score` plus the worker's per-image details (one JSON object per image, what the worker defines), in
        one pass: (scores (N,) float32 on CPU, N details). Training calls `score`, whose requests ask for none.
        WorkerError if the worker sends none."""
        self._check_images(images, prompts, metadata)
        with torch.no_grad():
            scores, per_image = self._batches(images, list(prompts), metadata, details=True)
        if per_image is None:
            raise WorkerError(f"{self._who()}: sent no per-image details, which were asked for (its protocol "
                              "replies lack \"details\")")
        return self._check_scores(scores, (images.shape[0],)), per_image


def _traceback_note(tail: object) -> str:
    """The worker's traceback tail of an error reply (optional in the protocol), for the error we raise."""
    if not tail:
        return ""
    lines = str(tail).splitlines()[-STDERR_TAIL_LINES:]  # a third-party worker may send a whole traceback
    return "\nworker traceback (last lines):\n" + "\n".join(lines)


def _worker_command(python: str | os.PathLike | Sequence[str], script: str, *args: str | os.PathLike) -> list[str]:
    """[interpreter, WORKERS_DIR/<script>, *args]. `python` is the worker environment's interpreter: a path, or a
    launcher such as ["conda", "run", "--no-capture-output", "-n", "drpo-imagereward", "python"]."""
    path = WORKERS_DIR / script
    if not path.is_file():
        raise FileNotFoundError(f"worker script {path} not found; this drpo installation lacks its package data "
                                "(drpo/rewards/workers/*.py)")
    launcher = [python] if isinstance(python, (str, os.PathLike)) else list(python)
    return [*map(os.fspath, launcher), str(path), *map(os.fspath, args)]


def _require_files(reward: str, **paths: str | os.PathLike | None) -> None:
    missing = [f"{key}={value}" for key, value in paths.items() if value is not None and not Path(value).exists()]
    if missing:
        raise FileNotFoundError(f"reward {reward!r}: missing local files: {', '.join(missing)}")


class ImageRewardWorker(WorkerReward):
    """ImageReward (THUDM, package image-reward 1.5) in envs/imagereward.yaml; workers/imagereward_worker.py.

    Score: the package's normalised reward ((r - mean) / std with the model's stored statistics); tables x 10.
    `tokenizer_path` is a local bert-base-uncased folder (the package would download it).
    """

    name = "imagereward"
    report_scale = 10.0
    takes_device = True

    def __init__(self, python: str | Sequence[str], checkpoint_path: str, med_config: str, tokenizer_path: str, *,
                 device: str = "cuda", **kwargs: Any) -> None:
        _require_files(self.name, checkpoint_path=checkpoint_path, med_config=med_config, tokenizer_path=tokenizer_path)
        command = _worker_command(python, "imagereward_worker.py", "--checkpoint", checkpoint_path,
                                  "--med-config", med_config, "--tokenizer", tokenizer_path, "--device", device)
        super().__init__(command, **kwargs)


class HPSv2Worker(WorkerReward):
    """HPSv2 (open_clip ViT-H-14 + HPS_v2_compressed.pt) in envs/hpsv2.yaml; workers/hpsv2_worker.py.

    Score: cosine of the normalised image and text embeddings; tables x 100.
    """

    name = "hpsv2"
    report_scale = 100.0
    takes_device = True

    def __init__(self, python: str | Sequence[str], clip_checkpoint: str, checkpoint_path: str, *,
                 device: str = "cuda", **kwargs: Any) -> None:
        _require_files(self.name, clip_checkpoint=clip_checkpoint, checkpoint_path=checkpoint_path)
        command = _worker_command(python, "hpsv2_worker.py", "--clip-checkpoint", clip_checkpoint,
                                  "--checkpoint", checkpoint_path, "--device", device)
        super().__init__(command, **kwargs)


class GenEvalWorker(WorkerReward):
    """The official GenEval judge (Mask2Former + CLIP colour check) in envs/geneval.yaml; workers/geneval_worker.py.

    Score per image: 1.0 if GenEval judges it correct, else 0.0; needs one GenEval metadata row per image.
    `geneval_dir` is a local clone of djghosh13/geneval; `detector_config` defaults to mmdet's own config file.
    A GenEval judge for the evaluation (drpo.evaluate): `score_verdicts` also returns GenEval's verdict per image.
    """

    name = "geneval"
    requires_metadata = True
    takes_device = True
    report_scale = 100.0  # tables show the share of correct images in %, as geneval_lite's

    def __init__(self, python: str | Sequence[str], geneval_dir: str, detector_checkpoint: str, clip_checkpoint: str,
                 *, detector_config: str | None = None, device: str = "cuda", **kwargs: Any) -> None:
        _require_files(self.name, geneval_dir=geneval_dir, detector_checkpoint=detector_checkpoint,
                       clip_checkpoint=clip_checkpoint, detector_config=detector_config)
        config = [] if detector_config is None else ["--detector-config", detector_config]
        command = _worker_command(python, "geneval_worker.py", "--geneval-dir", geneval_dir, "--detector-checkpoint",
                                  detector_checkpoint, "--clip-checkpoint", clip_checkpoint, *config,
                                  "--device", device)
        super().__init__(command, **kwargs)

    def score_verdicts(self, images: Tensor, prompts: list[str],
                       metadata: list[dict] | None = None) -> tuple[Tensor, list[dict]]:
        """(scores (N,), N verdicts {"correct": bool, "reason": str}): GenEval's per-image results, one pass."""
        scores, verdicts = self.score_with_details(images, prompts, metadata)
        for i, (score, verdict) in enumerate(zip(scores.tolist(), verdicts)):
            if not (isinstance(verdict, dict) and isinstance(verdict.get("correct"), bool)
                    and isinstance(verdict.get("reason"), str)) or score != float(verdict["correct"]):
                raise WorkerError(f"{self._who()}: image {i}: score {score} with verdict {str(verdict)[:200]}, "
                                  "expected {\"correct\": bool, \"reason\": str} agreeing with the score")
        return scores, [{"correct": v["correct"], "reason": v["reason"]} for v in verdicts]


class HPSv3OfficialWorker(WorkerReward):
    """The official hpsv3 1.0.0 package in envs/hpsv3.yaml (transformers 4.45); workers/hpsv3_worker.py.

    A cross-check of the in-process "hpsv3" reward, which reimplements it on transformers 5.
    """

    name = "hpsv3_official"
    takes_device = True

    def __init__(self, python: str | Sequence[str], model_path: str, checkpoint_path: str, *,
                 device: str = "cuda", **kwargs: Any) -> None:
        _require_files(self.name, model_path=model_path, checkpoint_path=checkpoint_path)
        command = _worker_command(python, "hpsv3_worker.py", "--model", model_path, "--checkpoint", checkpoint_path,
                                  "--device", device)
        super().__init__(command, **kwargs)
