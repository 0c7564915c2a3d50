"""Black-box reward protocol: WorkerReward against the reference worker and small inline workers.

Every failure mode gets a clear WorkerError naming the reward and its command: crash, hang, NaN, wrong count,
malformed output, error replies, startup failures; crashed workers restart on next use up to max_restarts.
"""

import gc
import re
import sys
import textwrap

import pytest
import torch

from drpo.rewards.worker import (
    WORKERS_DIR,
    GenEvalWorker,
    HPSv2Worker,
    HPSv3OfficialWorker,
    ImageRewardWorker,
    WorkerError,
    WorkerReward,
)
from drpo.rewards import REWARDS, build_reward_from_config

BRIGHTNESS = [sys.executable, str(WORKERS_DIR / "mean_brightness_worker.py")]
HANDSHAKE = "import json, sys; print(json.dumps({'ready': True, 'protocol': 1, 'name': 'inline'}), flush=True)\n"


def _inline(body: str) -> list[str]:
    """A worker given as Python source: a valid handshake, then `body`."""
    return [sys.executable, "-c", HANDSHAKE + textwrap.dedent(body)]


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _expected(images: torch.Tensor) -> torch.Tensor:
    """Mean brightness of the uint8 PNGs the client sends."""
    return ((images + 1) * 127.5).round().mean(dim=(1, 2, 3)) / 255


@pytest.fixture()
def brightness():
    with WorkerReward(BRIGHTNESS, timeout_s=2, batch_size=3) as reward:
        yield reward


def test_scores_round_trip_in_batches_with_metadata(brightness):
    assert brightness.name == "mean_brightness" and not brightness.differentiable
    assert brightness.worker_info == {"name": "mean_brightness", "version": "1"}
    images = _images(5)
    torch.testing.assert_close(brightness.score(images, ["a"] * 5), _expected(images))  # two requests of 3 + 2
    offsets = [{"offset": float(i)} for i in range(5)]
    torch.testing.assert_close(brightness.score(images, ["a"] * 5, offsets), _expected(images) + torch.arange(5.0))
    grouped = brightness.score_groups(images[:4].view(2, 2, 3, 8, 8), ["a", "b"], [{"offset": 0}, {"offset": 1}])
    torch.testing.assert_close(grouped, _expected(images[:4]).view(2, 2) + torch.tensor([[0.0], [1.0]]))


def test_bad_replies_fail_the_call_but_keep_the_worker(brightness):
    pid = brightness._proc.pid
    command = " ".join(BRIGHTNESS)
    with pytest.raises(WorkerError, match=r"'mean_brightness'.*failed in the worker: ValueError: asked to fail") as err:
        brightness.score(_images(2), ["a", "!error"])
    assert command in str(err.value)
    # the worker's traceback tail, down to the line that raised, is in the error the trainer sees
    assert re.search(r"(?s)worker traceback \(last lines\):\n.*mean_brightness_worker.py.*in score\n"
                     r".*raise ValueError\(\"asked to fail\"\)\nValueError: asked to fail$", str(err.value))
    with pytest.raises(WorkerError, match=r"non-finite scores at indices \[1\].*refusing to rank"):
        brightness.score(_images(2), ["a", "!nan"])
    with pytest.raises(WorkerError, match="returned 1 scores for 2 images"):
        brightness.score(_images(2), ["a", "!count"])
    assert brightness._proc.pid == pid
    torch.testing.assert_close(brightness.score(_images(2), ["a", "b"]), _expected(_images(2)))


def test_error_reply_traceback_is_optional_and_trimmed():
    """A third-party worker may send no traceback, or a long one: the error keeps its last lines only."""
    reply = ("for i, line in enumerate(sys.stdin):\n"
             "    tb = None if i == 0 else '\\n'.join(f'frame {k}' for k in range(100))\n"
             "    print(json.dumps({'id': json.loads(line)['id'], 'error': 'E: no', 'traceback': tb}), flush=True)")
    with WorkerReward(_inline(reply), timeout_s=5) as reward:
        with pytest.raises(WorkerError, match=r"failed in the worker: E: no$"):
            reward.score(_images(1), ["a"])
        with pytest.raises(WorkerError) as err:
            reward.score(_images(1), ["a"])
    tail = str(err.value).split("worker traceback (last lines):\n")[1].splitlines()
    assert tail == [f"frame {k}" for k in range(80, 100)]


def test_crash_reports_exit_code_and_stderr_then_restarts(brightness):
    first = brightness._proc
    with pytest.raises(WorkerError, match=r"(?s)exited with code 3 .*crashing on purpose"):
        brightness.score(_images(2), ["!crash", "a"])
    assert first.poll() == 3 and brightness._proc is None
    torch.testing.assert_close(brightness.score(_images(2), ["a", "b"]), _expected(_images(2)))
    assert brightness._proc.pid != first.pid


def test_hang_is_killed_after_the_timeout(brightness):
    brightness.timeout_s = 1
    hung = brightness._proc
    with pytest.raises(WorkerError, match=r"no reply to request \d+ within 1 s; killed the worker"):
        brightness.score(_images(1), ["!hang"])
    assert hung.poll() is not None  # killed, not left running
    torch.testing.assert_close(brightness.score(_images(1), ["a"]), _expected(_images(1)))


def test_restarts_are_limited():
    with WorkerReward(BRIGHTNESS, timeout_s=2, max_restarts=0) as reward:
        with pytest.raises(WorkerError, match="exited with code 3"):
            reward.score(_images(1), ["!crash"])
        with pytest.raises(WorkerError, match=r"(?s)not restarted after 1 failures; last error:.*exited with code 3"):
            reward.score(_images(1), ["a"])


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (BRIGHTNESS + ["--fail-load"], r"could not load its model: RuntimeError: asked to fail while loading"),
        ([sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(2)"],
         r"(?s)exited with code 2 before sending its handshake.*boom"),
        ([sys.executable, "-c", "import time; time.sleep(30)"], r"no handshake within 1 s; killed the worker"),
        ([sys.executable, "-c", "print('hello')"], r"malformed handshake \(not a JSON object\): 'hello'"),
        ([sys.executable, "-c", "print('{\"ready\": true, \"protocol\": 9}')"], r"speaks protocol 9, expected 1"),
        (["/nonexistent/python"], r"could not start"),
    ],
    ids=["load-error", "exit", "hang", "not-json", "protocol", "missing-command"],
)
def test_startup_failures(command, message):
    with pytest.raises(WorkerError, match=message) as err:
        WorkerReward(command, startup_timeout_s=1)
    assert "reward worker 'worker' (command: " in str(err.value)


def test_malformed_and_out_of_step_replies_stop_the_worker():
    garbage = _inline("sys.stdin.readline(); print('not json', flush=True); sys.stdin.readline()")
    with WorkerReward(garbage, timeout_s=2) as reward:
        proc = reward._proc
        with pytest.raises(WorkerError, match=r"(?s)'inline'.*malformed reply to request 1 \(not a JSON object\)"):
            reward.score(_images(1), ["a"])
        assert proc.poll() is not None
    wrong_id = _inline("sys.stdin.readline(); print(json.dumps({'id': 999, 'scores': [0.5]}), flush=True)")
    with WorkerReward(wrong_id, timeout_s=2) as reward, pytest.raises(WorkerError, match="reply id 999 does not"):
        reward.score(_images(1), ["a"])


def test_subclass_checks_the_announced_name():
    class Brightness(WorkerReward):
        name = "brightness"

    with pytest.raises(WorkerError, match="serves reward 'mean_brightness', expected 'brightness'"):
        Brightness(BRIGHTNESS)


def test_input_checks(brightness):
    images = _images(2)
    images[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'mean_brightness': images \[1\] contain non-finite pixel values"):
        brightness.score(images, ["a", "b"])
    with pytest.raises(ValueError, match="'mean_brightness' is not differentiable"):
        brightness.score(_images(2), ["a", "b"], with_grad=True)
    with pytest.raises(ValueError, match="metadata is not JSON-serialisable"):
        brightness.score(_images(1), ["a"], [{"offset": object()}])
    with pytest.raises(ValueError, match="command must be a non-empty list"):
        WorkerReward("python worker.py")


def test_close_context_manager_and_garbage_collection():
    reward = WorkerReward(BRIGHTNESS, timeout_s=2)
    first = reward._proc
    reward.close()
    assert first.poll() == 0  # closing stdin lets the worker exit cleanly
    torch.testing.assert_close(reward.score(_images(1), ["a"]), _expected(_images(1)))  # restarted on use
    second = reward._proc
    del reward
    gc.collect()
    assert second.poll() == 0


def test_registry_and_config():
    assert {"worker", "imagereward", "hpsv2", "geneval", "hpsv3_official"} <= set(REWARDS)
    reward = build_reward_from_config({"name": "worker", "command": BRIGHTNESS, "timeout_s": 2, "report_scale": 10})
    with reward:
        assert isinstance(reward, WorkerReward) and reward.report_scale == 10
        torch.testing.assert_close(reward.score(_images(2), ["a", "b"]), _expected(_images(2)))
    assert (ImageRewardWorker.report_scale, HPSv2Worker.report_scale) == (10.0, 100.0)
    assert GenEvalWorker.requires_metadata


@pytest.mark.parametrize(
    ("cls", "files", "package"),
    [
        (ImageRewardWorker, ("checkpoint_path", "med_config", "tokenizer_path"), "ImageReward"),
        (HPSv2Worker, ("clip_checkpoint", "checkpoint_path"), "open_clip"),
        (GenEvalWorker, ("geneval_dir", "detector_checkpoint", "clip_checkpoint"), "mmdet"),
        (HPSv3OfficialWorker, ("model_path", "checkpoint_path"), "hpsv3"),
    ],
)
def test_real_workers_check_files_and_report_a_missing_package(tmp_path, cls, files, package):
    """The real worker scripts run here up to their package import, which fails in this environment."""
    paths = {name: tmp_path / name for name in files}
    with pytest.raises(FileNotFoundError, match=rf"reward '{cls.name}': missing local files: {files[0]}="):
        cls(sys.executable, **paths)
    for path in paths.values():
        path.touch()
    with pytest.raises(WorkerError, match=rf"'{cls.name}'.*could not load its model: ModuleNotFoundError.*{package}"):
        cls(sys.executable, **paths, device="cpu")
