from pathlib import Path

from _job import start

start(snakemake)
from drpo.provenance import write_provenance

write_provenance(Path(snakemake.output.config).parent, snakemake.config)
