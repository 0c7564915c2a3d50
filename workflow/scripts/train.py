"""Train one run in this process, or under `accelerate launch` when the method's train.processes > 1
(train.per_method); an ablation variant's run (params.variant: study and variant) with that variant's config."""

import signal
import subprocess
import sys
from pathlib import Path

import yaml
from _job import start

start(snakemake)
from drpo.config import method_config, variant_config
from drpo.pipeline import run_training
from drpo.processes import child_ends_with_parent

config, w = snakemake.config, snakemake.wildcards
if variant := getattr(snakemake.params, "variant", None):
    config = variant_config(config, *variant)
config = method_config(config, w.method)  # this method's train settings (train.per_method): its processes, port
run_dir = Path(snakemake.output.done).parent
bank = snakemake.input.get("bank")
preferences = snakemake.input.get("preferences")  # the latent cache of an offline method's dataset
processes = config["train"]["processes"]
if processes == 1:
    run_training(config, w.method, int(w.seed), snakemake.input.prompts, run_dir, bank_path=bank,
                 preferences_path=preferences)
else:
    # The processes read the config from a file of their own: the run's config.resolved.yaml is written by the
    # training once it has claimed the folder (drpo.run_folder), and may have to move aside with an older run.
    launch_config = run_dir / "launch_config.yaml"
    launch_config.parent.mkdir(parents=True, exist_ok=True)
    launch_config.write_text(yaml.safe_dump(config, sort_keys=False))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
               "--main_process_port", str(config["train"]["main_process_port"]), "-m", "drpo.cli", "train",
               "--config", str(launch_config), "--method", w.method, "--seed", w.seed,
               "--prompts", snakemake.input.prompts, "--run-dir", str(run_dir)]
    if bank:
        command += ["--bank", bank]
    if preferences:
        command += ["--preferences", preferences]
    print(" ".join(command), flush=True)
    # SIGTERM, which the launcher passes on to its processes, when this job ends.
    subprocess.run(command, check=True, stdout=sys.stdout, stderr=sys.stderr,
                   preexec_fn=child_ends_with_parent(signal.SIGTERM))
