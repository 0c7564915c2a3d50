"""Check the reward worker environments end to end, with random weights in the real formats.

For each environment of envs/ that is built (envs/.<name>/bin/python): makes random weights of its model at the
real size with that environment's own packages (scripts/random_reward_weights.py, cached under --scratch), starts
the worker as a config would (drpo.rewards.build_reward_from_config), scores --images images twice, and checks that
a weights file holding none of the model's tensors is refused. Reports the handshake time (start + model load),
the scoring time, the worker's peak resident memory and the environment's size, and names the environments that
are missing with the command that builds them. A GPU-only environment on a CPU device is checked for its import
and its refusal. Not in CI (each environment is 5-6 GB); run it after building or changing one (docs/reward-envs.md).

    python scripts/check_reward_envs.py                  # every environment, on CPU
    python scripts/check_reward_envs.py hpsv2 --device cuda
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from drpo.rewards import build_reward_from_config
from drpo.rewards.worker import WorkerError

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a photo of a red apple on a wooden table", "two dogs playing in the snow",
           "a watercolor painting of a lighthouse at dusk", "an astronaut riding a horse on the moon"]
# environment -> its reward's registry name, how to build it, whether it needs CUDA (and its worker says so on a CPU
# device), whether random weights can be made for it (scripts/random_reward_weights.py).
ENVIRONMENTS = {
    "hpsv2": {"reward": "hpsv2", "build": "make reward-env-hpsv2", "cuda_only": False, "weights": True},
    "imagereward": {"reward": "imagereward", "build": "make reward-env-imagereward", "cuda_only": False,
                    "weights": True},
    "hpsv3": {"reward": "hpsv3_official", "build": "make reward-env-hpsv3", "cuda_only": True,
              "refuses_cpu": True, "weights": False},
    "geneval": {"reward": "geneval", "build": "PIP_NO_BUILD_ISOLATION=0 MMCV_WITH_OPS=1 conda env create -f "
                "envs/geneval.yaml -p envs/.geneval (its header says what it needs)", "cuda_only": True,
                "refuses_cpu": False, "weights": False},
}
# Placeholder local files of a GPU-only worker, enough to reach its CUDA refusal on a CPU device.
PLACEHOLDERS = {"hpsv3_official": {"model_path": "dir", "checkpoint_path": "file"}}


def images(count: int, size: int) -> torch.Tensor:
    """Smooth random images in [-1, 1], (count, 3, size, size)."""
    coarse = torch.rand(count, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic").clamp(0, 1) * 2 - 1


def peak_memory_gib(pid: int) -> float:
    """The process's peak resident set (VmHWM), GiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def env_size(folder: Path) -> str:
    return subprocess.run(["du", "-sh", str(folder)], capture_output=True, text=True).stdout.split("\t")[0]


def random_weights(name: str, python: Path, scratch: Path) -> dict:
    """The files written by random_reward_weights.py in the environment, made once and cached."""
    out = scratch / name
    made = out / "files.json"
    if not made.is_file():
        print(f"[{name}] making random weights in {out} ...", flush=True)
        result = subprocess.run([str(python), str(ROOT / "scripts" / "random_reward_weights.py"), name, str(out)],
                                check=True, stdout=subprocess.PIPE, text=True)
        made.write_text(result.stdout.strip().splitlines()[-1])
    return json.loads(made.read_text())


def placeholders(reward: str, scratch: Path) -> dict:
    folder = scratch / "placeholders" / reward
    files = {}
    for argument, kind in PLACEHOLDERS[reward].items():
        path = files[argument] = folder / argument
        if kind == "dir":
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
    return {key: str(value) for key, value in files.items()}


def start(reward: str, python: Path, files: dict, device: str):
    """(the reward, seconds from start to handshake)."""
    began = time.monotonic()
    built = build_reward_from_config({"name": reward, "python": str(python), **files, "startup_timeout_s": 3600,
                                      "timeout_s": 3600}, device=device)
    return built, time.monotonic() - began


def worker_message(error: Exception, marker: str) -> str:
    """The worker's own message in a WorkerError: its first line from `marker` on (or the error's first line)."""
    line = next((line for line in str(error).splitlines() if marker in line), str(error).splitlines()[0])
    return line[line.index(marker):][:200] if marker in line else line[:200]


def check(name: str, spec: dict, args: argparse.Namespace) -> dict:
    folder = ROOT / "envs" / f".{name}"
    python = folder / "bin" / "python"
    row = {"environment": name, "reward": spec["reward"]}
    if not python.exists():
        return row | {"result": f"missing: build it with `{spec['build']}`"}
    row["size"] = env_size(folder)
    if spec["cuda_only"] and not args.device.startswith("cuda"):
        if not spec["refuses_cpu"]:
            return row | {"result": "built; needs a GPU, not checked on CPU"}
        try:
            start(spec["reward"], python, placeholders(spec["reward"], args.scratch), args.device)[0].close()
            return row | {"result": "started on CPU although it needs CUDA: FAILED"}
        except WorkerError as error:
            return row | {"result": "imports; refuses CPU: " + worker_message(error, "RuntimeError")}
    if not spec["weights"]:
        return row | {"result": "built; no random weights can be made for it yet (scripts/random_reward_weights.py)"}

    made = random_weights(name, python, args.scratch)
    batch = images(args.images, args.size)
    prompts = (PROMPTS * args.images)[:args.images]
    reward, handshake = start(spec["reward"], python, made["files"], args.device)
    with reward:
        began = time.monotonic()
        scores = reward.score(batch, prompts)
        scoring = time.monotonic() - began
        began = time.monotonic()
        repeat = reward.score(batch, prompts)
        scoring_repeat = time.monotonic() - began
        peak = peak_memory_gib(reward._proc.pid)
        version = reward.worker_info.get("version", "")
    row |= {"handshake_s": handshake, "scoring_s": scoring, "repeat_s": scoring_repeat, "peak_gib": peak,
            "scores": [round(s, 6) for s in scores.tolist()], "version": version,
            "finite": bool(torch.isfinite(scores).all()), "stable": bool(torch.equal(scores, repeat)),
            "distinct": len(set(scores.tolist())) == len(scores)}
    try:
        start(spec["reward"], python, made["files"] | made["broken"], args.device)[0].close()
        row["refuses_bad_weights"] = "NO: a file of none of the model's tensors was accepted"
    except WorkerError as error:
        row["refuses_bad_weights"] = worker_message(error, "WeightsMismatch")
    refused = row["refuses_bad_weights"].startswith("WeightsMismatch")
    ok = row["finite"] and row["stable"] and row["distinct"] and refused
    return row | {"result": "ok" if ok else "FAILED"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", default=list(ENVIRONMENTS), help="environments (default: all)")
    parser.add_argument("--device", default="cpu", help="the workers' device (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--images", type=int, default=4, help="images scored per call")
    parser.add_argument("--size", type=int, default=512, help="image side, pixels")
    parser.add_argument("--scratch", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "drpo-reward-envs",
                        help="where random weights are made and cached (GBs)")
    args = parser.parse_args()
    unknown = set(args.names) - set(ENVIRONMENTS)
    if unknown:
        parser.error(f"unknown environments {sorted(unknown)}; known: {', '.join(ENVIRONMENTS)}")
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit}, "
          f"{os.cpu_count()} CPUs, device {args.device}: {shlex.join(['python', *sys.argv])}", flush=True)
    rows = []
    for name in args.names:
        row = check(name, ENVIRONMENTS[name], args)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(f"\n| environment | size | handshake | scoring {args.images} images ({args.size} px): first, repeat | "
          "worker peak memory | result |\n|---|---|---|---|---|---|")
    for row in rows:
        timing = (f"{row['handshake_s']:.1f} s", f"{row['scoring_s']:.1f} s, {row['repeat_s']:.1f} s",
                  f"{row['peak_gib']:.1f} GiB") if "handshake_s" in row else ("", "", "")
        print(f"| {row['environment']} | {row.get('size', '')} | {' | '.join(timing)} | {row['result']} |")
    return 1 if any("FAILED" in row["result"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
