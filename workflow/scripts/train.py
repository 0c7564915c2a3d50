from pathlib import Path

from _log import redirect

redirect(snakemake)
from drpo.pipeline import run_training

run_training(snakemake.config, snakemake.wildcards.method, int(snakemake.wildcards.seed),
             snakemake.input.bank, snakemake.input.prompts, Path(snakemake.output.done).parent)
