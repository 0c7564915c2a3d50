"""Train one run in this process, or under `accelerate launch` when train.processes > 1."""

import subprocess
import sys
from pathlib import Path

from _job import start

start(snakemake)
from drpo.pipeline import run_training
from drpo.provenance import write_provenance

config, w = snakemake.config, snakemake.wildcards
run_dir = Path(snakemake.output.done).parent
bank = snakemake.input.get("bank")
processes = config["train"]["processes"]
if processes == 1:
    run_training(config, w.method, int(w.seed), snakemake.input.prompts, run_dir, bank_path=bank)
else:
    write_provenance(run_dir, config, {"method": w.method, "seed": int(w.seed)})
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
               "--main_process_port", str(config["train"]["main_process_port"]), "-m", "drpo.cli", "train",
               "--config", str(run_dir / "config.resolved.yaml"), "--method", w.method, "--seed", w.seed,
               "--prompts", snakemake.input.prompts, "--run-dir", str(run_dir)]
    if bank:
        command += ["--bank", bank]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True, stdout=sys.stdout, stderr=sys.stderr)
