from _job import start

start(snakemake)
from drpo.pipeline import run_judge

run_judge(snakemake.params.config, snakemake.params.prompts, snakemake.wildcards.prompt_set,
          (snakemake.wildcards.a, snakemake.wildcards.b), snakemake.params.checkpoints, snakemake.output.verdicts,
          snakemake.output.summary, run=snakemake.params.run)
