from pathlib import Path

from _job import start

start(snakemake)
from drpo.pipeline import run_evaluation

w = snakemake.wildcards
run_dir = Path(snakemake.input.done).parent if w.method != "base" else None
run_evaluation(snakemake.params.config, snakemake.input.prompts, snakemake.output.summary, snakemake.output.images,
               method=w.method, seed=int(w.seed), step=int(w.step), run_dir=run_dir)
