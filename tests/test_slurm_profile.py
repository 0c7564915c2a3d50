"""profiles/slurm as the Slurm executor plugin turns it into sbatch calls, against stand-in Slurm commands.

No cluster is needed: a fake `sbatch` records its arguments and refuses the job, so Snakemake stops after one
submission. Skipped where the plugin is not installed (`make setup-slurm`). .ci/slurm.sh runs the profile on a
real single-node Slurm.
"""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("snakemake_executor_plugin_slurm")

REPO = Path(__file__).resolve().parents[1]

FAKES = {
    # Records each call and refuses the job: Snakemake reports the failure and stops.
    "sbatch": 'printf "%s\\n" "$*" >> "$FAKE_SLURM_LOG"; echo "fake sbatch: recorded" >&2; exit 1',
    "sinfo": 'echo "cpu*"; echo gpu',
    "scontrol": 'echo "MinJobAge               = 600 sec"',
    "squeue": "exit 0",
    "sacct": "exit 0",
    "sacctmgr": "exit 0",
    "sshare": "exit 0",
    "scancel": "exit 0",
}


def _fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKES.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _sbatch_of_train(tmp_path, device):
    """The sbatch arguments that profiles/slurm gives the SD-Turbo preset's train job (4 GPUs when cuda)."""
    results = tmp_path / "results"
    (results / "provenance").mkdir(parents=True)
    (results / "provenance" / "assets.json").write_text("{}\n")  # train's input besides the prompts
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n")
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({"results_dir": str(results), "device": device,
                                        "prompts": {"train": str(prompts), "test": str(prompts)}}))
    log = tmp_path / "sbatch.log"
    env = dict(os.environ, PATH=f"{_fake_slurm(tmp_path)}{os.pathsep}{os.environ['PATH']}",
               FAKE_SLURM_LOG=str(log))
    target = results / "runs" / "drpo" / "seed42" / "train_done.json"
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--directory", str(REPO), "--snakefile", str(REPO / "Snakefile"),
         "--workflow-profile", str(REPO / "profiles" / "slurm"),
         "--configfile", str(REPO / "configs" / "sd-turbo.yaml"), str(override),
         "--retries", "0", "--slurm-init-seconds-before-status-checks", "1", "--slurm-logdir", str(tmp_path / "logs"),
         "--nolock", str(target)],  # no lock: a run of the workflow in this checkout may be going on
        capture_output=True, text=True, timeout=300, env=env)
    assert log.exists(), result.stdout[-3000:] + result.stderr[-3000:]
    calls = log.read_text().splitlines()
    assert len(calls) == 1, calls
    return shlex.split(calls[0].split(" --wrap=")[0])


def _option(args, name):
    values = [a.split("=", 1)[1] for a in args if a.startswith(name + "=")]
    values += [args[i + 1] for i, a in enumerate(args[:-1]) if a == name]
    return values


def test_a_gpu_train_job_is_one_task_on_one_node_with_its_gpus_and_cpus_per_gpu(tmp_path):
    args = _sbatch_of_train(tmp_path, "cuda")
    assert _option(args, "-p") == ["gpu"]
    assert _option(args, "--nodes") == ["1"] and _option(args, "--gpus") == ["4"]
    assert _option(args, "--cpus-per-gpu") == ["8"] and _option(args, "--mem") == ["120000"]
    assert _option(args, "-t") == ["1440"]
    # One task holds every GPU: no task per GPU, and no CPUs per task that would override the CPUs per GPU.
    assert not [a for a in args if a.startswith(("--ntasks", "--cpus-per-task"))]


def test_with_device_cpu_a_gpu_rule_is_a_cpu_job_sized_by_default_resources(tmp_path):
    args = _sbatch_of_train(tmp_path, "cpu")
    assert _option(args, "-p") == ["cpu"]
    assert _option(args, "--mem") == ["2000"] and _option(args, "--cpus-per-task") == ["1"]
    assert _option(args, "--ntasks") == ["1"] and _option(args, "-t") == ["60"]
    assert not [a for a in args if a.startswith(("--gpus", "--cpus-per-gpu", "--nodes"))]
