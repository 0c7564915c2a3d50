from pathlib import Path

from _job import start

start(snakemake)
from drpo.paper import write_comparison

write_comparison(Path(snakemake.input.main).parent, snakemake.params.setting, snakemake.output.markdown)
