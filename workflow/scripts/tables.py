from _job import start

start(snakemake)
from drpo.tables import rebuild_tables

rebuild_tables(**snakemake.params)
