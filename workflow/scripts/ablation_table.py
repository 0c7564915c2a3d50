from _job import start

start(snakemake)
from drpo.ablations import write_study

write_study(list(zip(snakemake.params.labels, snakemake.input.summaries)), snakemake.params.study,
            snakemake.output.table, snakemake.output.markdown, snakemake.output.html,
            snakemake.output.figure)
