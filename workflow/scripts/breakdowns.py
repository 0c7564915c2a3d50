from _job import start

start(snakemake)
from drpo.breakdowns import write_breakdowns

write_breakdowns(snakemake.params.parts, snakemake.params.outputs)
