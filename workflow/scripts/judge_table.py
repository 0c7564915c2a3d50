from _job import start

start(snakemake)
from drpo.judge import write_judge_table

write_judge_table(snakemake.input.summaries, snakemake.output.table, snakemake.output.markdown, snakemake.output.html)
