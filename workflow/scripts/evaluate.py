from pathlib import Path

from _job import start

start(snakemake)
from drpo.pipeline import run_evaluation

w = snakemake.wildcards
run_dir = Path(snakemake.input.done).parent if w.method != "base" else None
# Rule evaluate_prompt_set names its prompt file in params (an input only once it exists: rules/breakdowns.smk).
prompts = snakemake.params.get("prompts") or snakemake.input.prompts
run_evaluation(snakemake.params.config, prompts, snakemake.output.summary, snakemake.output.images,
               method=w.method, seed=int(w.seed), step=int(w.step), run_dir=run_dir)
