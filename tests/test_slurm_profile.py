"""profiles/slurm: an entry for every GPU rule, and the sbatch calls the Slurm executor plugin makes of it.

The sbatch tests need no cluster: a fake `sbatch` records its arguments and refuses the job, so Snakemake stops
after one submission. They are skipped where the plugin is not installed (`make setup-slurm`; .ci/slurm.sh runs
them, then the profile on a real single-node Slurm).
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PROFILE = yaml.safe_load((REPO / "profiles" / "slurm" / "profile.yaml").read_text())


def _gpu_rules():
    """The rules that declare a `gpu` resource in workflow/rules/*.smk."""
    names = set()
    for smk in (REPO / "workflow" / "rules").glob("*.smk"):
        for block in re.split(r"\n(?=[ \t]*rule \w+:)", smk.read_text()):
            name = re.match(r"\s*rule (\w+):", block)
            resources = re.search(r"^([ \t]+)resources:\n((?:\1[ \t]+.*\n)*)", block, re.MULTILINE)
            if name and resources and re.search(r"^\s+gpu=", resources.group(2), re.MULTILINE):
                names.add(name.group(1))
    return names


def test_every_gpu_rule_has_a_one_task_one_node_gpu_entry():
    gpu_rules = _gpu_rules()
    assert {"train", "evaluate", "reference_bank", "grid"} <= gpu_rules
    for name in sorted(gpu_rules):
        entry = PROFILE["set-resources"].get(name)
        assert entry, f"profiles/slurm has no set-resources entry for the GPU rule {name}"
        assert entry["nodes"] == 1 and entry["tasks"] == 0 and entry["cpus_per_task"] == 0, name
        assert entry["cpus_per_gpu"] > 0 and entry["slurm_partition"] and entry["mem_mb"] and entry["runtime"], name

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


def _sbatch_calls(tmp_path, device):
    """The sbatch arguments that profiles/slurm gives the SD-Turbo preset's train job (4 GPUs when cuda) and base
    evaluation (1 GPU), by rule."""
    results = tmp_path / "results"
    (results / "provenance").mkdir(parents=True)
    (results / "provenance" / "assets.json").write_text("{}\n")  # the jobs' input besides the prompts
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n")
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({"results_dir": str(results), "device": device,
                                        "prompts": {"train": str(prompts), "test": str(prompts)}}))
    log = tmp_path / "sbatch.log"
    env = dict(os.environ, PATH=f"{_fake_slurm(tmp_path)}{os.pathsep}{os.environ['PATH']}",
               FAKE_SLURM_LOG=str(log))
    targets = [results / "runs" / "drpo" / "seed42" / "train_done.json",
               results / "eval" / "base" / "seed0" / "step0" / "summary.json"]
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--directory", str(REPO), "--snakefile", str(REPO / "Snakefile"),
         "--workflow-profile", str(REPO / "profiles" / "slurm"),
         "--configfile", str(REPO / "configs" / "sd-turbo.yaml"), str(override),
         "--retries", "0", "--slurm-init-seconds-before-status-checks", "1", "--slurm-logdir", str(tmp_path / "logs"),
         "--nolock", *map(str, targets)],  # no lock: a run of the workflow in this checkout may be going on
        capture_output=True, text=True, timeout=300, env=env)
    assert log.exists(), result.stdout[-3000:] + result.stderr[-3000:]
    calls = {}
    for line in log.read_text().splitlines():
        args = shlex.split(line.split(" --wrap=")[0])
        calls[_option(args, "--comment")[0].split("_wildcards_")[0].removeprefix("rule_")] = args
    assert set(calls) == {"train", "evaluate"}, calls
    return calls


def _option(args, name):
    values = [a.split("=", 1)[1] for a in args if a.startswith(name + "=")]
    values += [args[i + 1] for i, a in enumerate(args[:-1]) if a == name]
    return values


@pytest.fixture
def plugin():
    pytest.importorskip("snakemake_executor_plugin_slurm")


def test_gpu_jobs_are_one_task_on_one_node_with_their_gpus_and_cpus_per_gpu(tmp_path, plugin):
    calls = _sbatch_calls(tmp_path, "cuda")
    train, evaluate = calls["train"], calls["evaluate"]
    assert _option(train, "-p") == ["gpu"] and _option(train, "--gpus") == ["4"]
    assert _option(train, "--cpus-per-gpu") == ["8"] and _option(train, "--mem") == ["120000"]
    assert _option(train, "-t") == ["1440"]
    assert _option(evaluate, "-p") == ["gpu"] and _option(evaluate, "--gpus") == ["1"]
    assert _option(evaluate, "--cpus-per-gpu") == ["8"] and _option(evaluate, "--mem") == ["64000"]
    assert _option(evaluate, "-t") == ["240"]
    for args in calls.values():
        assert _option(args, "--nodes") == ["1"]
        # One task holds every GPU: no task per GPU, and no CPUs per task that would override the CPUs per GPU.
        assert not [a for a in args if a.startswith(("--ntasks", "--cpus-per-task"))]


def test_with_device_cpu_gpu_rules_are_cpu_jobs_sized_by_default_resources(tmp_path, plugin):
    for args in _sbatch_calls(tmp_path, "cpu").values():
        assert _option(args, "-p") == ["cpu"]
        assert _option(args, "--mem") == ["2000"] and _option(args, "--cpus-per-task") == ["1"]
        assert _option(args, "--ntasks") == ["1"] and _option(args, "-t") == ["60"]
        assert not [a for a in args if a.startswith(("--gpus", "--cpus-per-gpu", "--nodes"))]
