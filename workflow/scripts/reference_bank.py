from _job import start

start(snakemake)
from drpo.pipeline import make_reference_bank

make_reference_bank(snakemake.params.config, snakemake.input.prompts, snakemake.output.bank)
