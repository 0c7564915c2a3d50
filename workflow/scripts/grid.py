from pathlib import Path

from _job import start

start(snakemake)
from drpo.pipeline import make_grid

make_grid(snakemake.params.config, snakemake.input.prompts, Path(snakemake.input.done).parent,
          snakemake.wildcards.method, snakemake.output[0])
