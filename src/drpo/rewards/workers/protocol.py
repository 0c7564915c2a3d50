"""Server side of the DrPO black-box reward protocol (version 1), self-contained: a worker imports `serve`.

Workers run in their own environments, which cannot import `drpo`; this file needs only the standard
library and Pillow. A worker script next to it does

    from protocol import serve          # the script's folder is on sys.path when it is run as a script

    def load():                         # heavy imports and model loading go here, not at module level
        import my_package
        model = my_package.load("/local/path")
        return lambda images, prompts, metadata: [model.score(p, im) for im, p in zip(images, prompts)]

    serve(load, name="my_reward", version="1.0")

The protocol: one JSON object per line, UTF-8, on stdin (requests) and stdout (handshake and responses).
- Handshake, the worker's first line: {"ready": true, "protocol": 1, "name": str, "version": str};
  if loading fails: {"ready": false, "error": str}, then exit code 1.
- Request: {"id": int, "prompts": [str] * N, "images": [base64 PNG] * N, "metadata": [object] * N or null,
  "details": true (optional: the client wants per-image details; absent or false: scores only)}.
- Response: {"id": <same>, "scores": [float] * N} or {"id": <same>, "error": str, "traceback": str}, the
  traceback being the last lines of the worker's own, so the client's error shows where the worker failed.
  To a request with "details": true, a worker that has them adds "details": [object] * N (e.g. GenEval's
  {"correct": bool, "reason": str} per image); one without them answers with scores alone.
- The client closes stdin to stop the worker; the worker then exits 0.
Nothing else may reach stdout, so `serve` points file descriptor 1 (and sys.stdout) at stderr before it calls
`load`: prints and library logs of the worker go to stderr, which the client shows in its error messages.
"""

from __future__ import annotations

import base64
import io
import json
import os
import sys
import traceback
from typing import Any, Callable, Dict, List, Optional, TextIO, Union

from PIL import Image

PROTOCOL_VERSION = 1
TRACEBACK_LINES = 20  # the innermost frames and the exception: where the worker failed

# score_fn(RGB images, prompts, metadata (one object per image) or None) -> one float per image, or
# {"scores": [float] * N, "details": [object] * N} for a worker with per-image details (sent only when asked for,
# so that a training request, which wants scores only, carries nothing more)
ScoreFn = Callable[[List[Image.Image], List[str], Optional[list]], Union[List[float], Dict[str, list]]]


def _claim_stdout() -> TextIO:
    """A private copy of stdout for protocol lines; fd 1 and sys.stdout then write to stderr."""
    sys.stdout.flush()
    channel = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return channel


def _send(channel: TextIO, message: dict[str, Any]) -> None:
    channel.write(json.dumps(message) + "\n")
    channel.flush()


def decode_image(data: str) -> Image.Image:
    """A base64 PNG string -> RGB PIL image."""
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


def _answer(request: dict[str, Any], score_fn: ScoreFn) -> dict[str, Any]:
    images = [decode_image(data) for data in request["images"]]
    result = score_fn(images, list(request["prompts"]), request.get("metadata"))
    scores, details = (result["scores"], result.get("details")) if isinstance(result, dict) else (result, None)
    reply = {"id": request["id"], "scores": [float(s) for s in scores]}
    if request.get("details") and details is not None:
        reply["details"] = list(details)
    return reply


def _traceback_tail() -> str:
    """The last lines of the exception being handled, as Python prints it."""
    return "\n".join(traceback.format_exc().rstrip("\n").splitlines()[-TRACEBACK_LINES:])


def serve(load: Callable[[], ScoreFn], *, name: str, version: str = "") -> None:
    """Load the scorer with `load()`, announce it, then answer requests until stdin closes."""
    channel = _claim_stdout()
    try:
        score_fn = load()
    except BaseException as exc:  # noqa: BLE001 - reported to the client, then exit
        traceback.print_exc()
        _send(channel, {"ready": False, "error": f"{type(exc).__name__}: {exc}"})
        sys.exit(1)
    _send(channel, {"ready": True, "protocol": PROTOCOL_VERSION, "name": name, "version": version})
    for line in sys.stdin:
        request_id = None
        try:
            request = json.loads(line)
            request_id = request["id"]
            reply = _answer(request, score_fn)
        except Exception as exc:  # noqa: BLE001 - one failed request must not kill the worker
            traceback.print_exc()
            reply = {"id": request_id, "error": f"{type(exc).__name__}: {exc}", "traceback": _traceback_tail()}
        _send(channel, reply)
