"""Runs that never return a stale or damaged result: a run folder belongs to one training configuration, resumes
from its newest whole checkpoint, has one trainer at a time, and its trainer and reward workers end with the process
that started them (issue 14, faults 7-9 and 11)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from drpo.config import merge
from drpo.methods import build_method
from drpo.pipeline import load_models, run_identity, run_settings, run_training
from drpo.reference import build_reference_bank
from drpo.rewards.worker import WORKERS_DIR
from drpo.run_folder import RunFolderBusy, latest_checkpoint
from drpo.train import TrainSettings, train

from conftest import PROMPTS

RUN = {"run": "one training configuration"}
FINAL_WEIGHTS = "checkpoints/checkpoint-4/pytorch_lora_weights.safetensors"


def _train(config, run_dir, log=lambda *_: None):
    generator, reward, features = load_models(config)
    method = build_method("drpo", generator, reward, features, config)
    bank = build_reference_bank(generator, PROMPTS, candidates=config["train"]["candidates"], noise_sets=1, seed=0,
                                batch_size=8)
    train(method, bank, TrainSettings.from_config(config["train"], seed=0), run_dir, identity=RUN, log=log)


def _run(config, prompts, run_dir):
    messages = []
    run_training(config, "drpo", 0, prompts, run_dir, log=messages.append)
    return messages


# ----------------------------------------------------------------------------------- fault 7: other settings
def test_a_changed_setting_trains_afresh_and_keeps_the_old_run_aside(tiny_config, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    run_dir = tmp_path / "runs" / "drpo" / "seed0"
    _run(tiny_config, prompts, run_dir)
    old = {key: value.clone() for key, value in load_file(str(run_dir / FINAL_WEIGHTS)).items()}

    changed = merge(tiny_config, {"drpo": {"reference_loss_weight": 0.5}})
    messages = _run(changed, prompts, run_dir)
    assert not any("resuming" in m for m in messages)
    assert any("other settings (drpo.reference_loss_weight: 0.2 -> 0.5)" in m for m in messages)
    (aside,) = run_dir.parent.glob("seed0.superseded-*")
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert yaml.safe_load((aside / "config.resolved.yaml").read_text())["drpo"]["reference_loss_weight"] == 0.2
    assert yaml.safe_load((run_dir / "config.resolved.yaml").read_text())["drpo"]["reference_loss_weight"] == 0.5
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    new = load_file(str(run_dir / FINAL_WEIGHTS))
    assert any((old[key] - new[key]).abs().max() > 0 for key in old)

    # A LoRA rank change used to fail on the old adapter: it starts afresh the same way.
    _run(merge(changed, {"train": {"lora": {"rank": 2, "alpha": 2}}}), prompts, run_dir)
    assert len(list(run_dir.parent.glob("seed0.superseded-*"))) == 2


def test_more_updates_resume_the_run_and_the_same_settings_do_not_retrain(tiny_config, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    run_dir = tmp_path / "seed0"
    _run(tiny_config, prompts, run_dir)
    assert any("update 4 of 4" in m for m in _run(tiny_config, prompts, run_dir))
    longer = merge(tiny_config, {"train": {"steps": 6}})
    assert any("resuming from" in m and "checkpoint-4" in m for m in _run(longer, prompts, run_dir))
    assert latest_checkpoint(run_dir).name == "checkpoint-6" and not list(tmp_path.glob("seed0.superseded-*"))


def test_a_run_trains_with_its_methods_own_train_settings(tiny_config, tmp_path):
    # train.per_method (issue 17): the run's length, K, checkpoints and learning rate are its method's entry's.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    run_dir = tmp_path / "seed0"
    config = merge(tiny_config, {"train": {"per_method": {
        "drpo": {"steps": 3, "checkpoint_every": 3, "candidates": 4, "learning_rate": 2e-3},
        "grpo": {"steps": 1}}}})
    _run(config, prompts, run_dir)
    assert json.loads((run_dir / "train_done.json").read_text())["steps"] == 3
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["checkpoint-3"]
    resolved = yaml.safe_load((run_dir / "config.resolved.yaml").read_text())["train"]
    assert (resolved["steps"], resolved["candidates"], resolved["learning_rate"]) == (3, 4, 2e-3)


# ----------------------------------------------------------------------------------- fault 8: damaged checkpoints
@pytest.mark.parametrize("damage", ["pytorch_lora_weights.safetensors", "training_state.json", "optimizer.pt"])
def test_a_damaged_latest_checkpoint_is_skipped_with_a_warning(tiny_config, tmp_path, damage):
    run_dir = tmp_path / "run"
    _train(tiny_config, run_dir)
    good = {key: value.clone() for key, value in load_file(str(run_dir / FINAL_WEIGHTS)).items()}  # not mmapped
    (run_dir / "train_done.json").unlink()
    damaged = run_dir / "checkpoints" / "checkpoint-4" / damage
    damaged.write_bytes(damaged.read_bytes()[: len(damaged.read_bytes()) // 2])  # a write cut short

    messages = []
    _train(tiny_config, run_dir, log=messages.append)
    assert any("skipping checkpoint" in m and "checkpoint-4" in m for m in messages)
    assert any("resuming from" in m and "checkpoint-2" in m for m in messages)
    redone = load_file(str(run_dir / FINAL_WEIGHTS))  # update 4 is trained again, from checkpoint 2
    for key in good:
        assert (good[key] - redone[key]).abs().max() < 1e-5


def test_a_leftover_temporary_checkpoint_is_ignored_and_removed(tiny_config, tmp_path):
    run_dir = tmp_path / "run"
    _train(tiny_config, run_dir)
    (run_dir / "train_done.json").unlink()
    leftover = run_dir / "checkpoints" / "checkpoint-6.tmp"  # a kill between its last write and the rename
    leftover.mkdir()
    (leftover / "training_state.json").write_text(json.dumps({"step": 6}))
    messages = []
    _train(tiny_config, run_dir, log=messages.append)
    assert any("resuming from" in m and "checkpoint-4" in m for m in messages) and not leftover.exists()


# ----------------------------------------------------------------------------------- fault 9: one trainer
def _python(code: str, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True,
                            env=env, **kwargs)


def _gone(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # a zombie child of ours counts as gone once reaped
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.1)
    return False


def test_a_second_trainer_refuses_a_locked_run_folder(tiny_config, tmp_path):
    run_dir = tmp_path / "run"
    holder = _python(f"""
        import time
        from pathlib import Path
        from drpo.run_folder import Lock
        with Lock(Path({str(run_dir)!r})):
            print("locked", flush=True)
            time.sleep(60)
    """)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderBusy, match=rf"is being written by another trainer \(pid {holder.pid} on "):
            _train(tiny_config, run_dir)
    finally:
        holder.kill()
        holder.wait()
    _train(tiny_config, run_dir)  # the lock went with its process
    assert (run_dir / "train_done.json").is_file()


def test_a_job_ends_when_the_snakemake_that_started_it_is_killed(tmp_path):
    # What workflow/scripts/_job.py does at the start of every job, in a child of a stand-in for Snakemake.
    parent = _python("""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c",
            "from drpo.processes import end_with_parent; end_with_parent(); import time; time.sleep(60)"])
        print(child.pid, flush=True)
        time.sleep(60)
    """)
    child = int(parent.stdout.readline())
    time.sleep(1.0)  # let the child set its parent-death signal
    parent.kill()
    parent.wait()
    assert _gone(child)


def test_reward_workers_end_with_their_trainer():
    trainer = _python(f"""
        import sys, time
        from drpo.rewards.worker import WorkerReward
        reward = WorkerReward([sys.executable, {str(WORKERS_DIR / "mean_brightness_worker.py")!r}])
        print(reward._proc.pid, flush=True)
        time.sleep(60)
    """)
    worker = int(trainer.stdout.readline())
    trainer.kill()  # SIGKILL: no finalizer runs in the trainer
    trainer.wait()
    assert _gone(worker)


# ----------------------------------------------------------------------------------- fault 11: what reruns
def test_a_runs_settings_change_with_its_own_settings_only(tiny_config):
    drpo0 = run_settings(tiny_config, "drpo", 0)
    assert run_settings(merge(tiny_config, {"train": {"seeds": [0, 1, 2, 3]}}), "drpo", 0) == drpo0
    assert run_settings(merge(tiny_config, {"train": {"methods": ["drpo", "pso"]}}), "drpo", 0) == drpo0
    assert run_settings(merge(tiny_config, {"grpo": {"num_anchors": 2}}), "drpo", 0) == drpo0
    assert run_settings(merge(tiny_config, {"train": {"per_method": {"pso": {"learning_rate": 1e-5}}}}),
                        "drpo", 0) == drpo0
    assert run_settings(merge(tiny_config, {"train": {"processes": 2, "prompts_per_step": 2}}), "drpo", 0) == drpo0
    assert run_settings(merge(tiny_config, {"drpo": {"num_pos": 1}}), "drpo", 0) != drpo0
    assert run_settings(merge(tiny_config, {"train": {"per_method": {"drpo": {"learning_rate": 1e-5}}}}),
                        "drpo", 0) != drpo0
    assert run_settings(tiny_config, "drpo", 1) != drpo0


def test_a_method_whose_resolved_settings_do_not_change_keeps_its_params_and_identity(tiny_config):
    # Issue 17: train.per_method replaced train.learning_rates. Snakemake compares the train rule's params by their
    # repr, so the keys of a run's train settings keep the order they had (learning_rate last, as when it was
    # learning_rates' pick), and runs trained before are neither rerun nor moved aside.
    settings = run_settings(tiny_config, "drpo", 0)
    assert list(settings["train"]) == ["steps", "prompts_per_step", "balance_tags", "candidates", "checkpoint_every",
                                       "adam_betas", "weight_decay", "adam_eps", "max_grad_norm", "mixed_precision",
                                       "lora", "reference", "reference_noise_sets", "learning_rate"]
    rows = [{"prompt": prompt} for prompt in PROMPTS]
    train = tiny_config["train"]
    for per_method in ({"grpo": {"steps": 9, "processes": 2, "learning_rate": 1e-5}},  # another method's entry
                       {"drpo": {"learning_rate": train["learning_rate"], "steps": train["steps"]}},  # no change
                       {"drpo": {"processes": 2, "main_process_port": 29600}},  # launch settings only
                       {"drpo": None}):
        config = merge(tiny_config, {"train": {"per_method": per_method}})
        assert repr(run_settings(config, "drpo", 0)) == repr(settings), per_method
        assert run_identity(config, "drpo", 0, rows) == run_identity(tiny_config, "drpo", 0, rows), per_method
    # A method's own entry changes its runs, and its identity unless it changes only their length.
    grpo = merge(tiny_config, {"train": {"per_method": {"grpo": {"steps": 8, "checkpoint_every": 4}}}})
    assert run_settings(grpo, "grpo", 0) != run_settings(tiny_config, "grpo", 0)
    assert run_settings(grpo, "grpo", 0)["train"]["steps"] == 8
    assert run_identity(grpo, "grpo", 0, rows) == run_identity(tiny_config, "grpo", 0, rows)
    bf16 = merge(tiny_config, {"train": {"per_method": {"grpo": {"mixed_precision": "bf16"}}}})
    assert run_identity(bf16, "grpo", 0, rows) != run_identity(tiny_config, "grpo", 0, rows)
