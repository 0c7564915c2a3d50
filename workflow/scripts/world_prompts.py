from _job import start

start(snakemake)
from drpo.pipeline import make_world

make_world(snakemake.params.config, snakemake.output.train, snakemake.output.test)
