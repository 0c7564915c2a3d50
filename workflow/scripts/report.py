from pathlib import Path

from _job import start

start(snakemake)
from drpo.pipeline import make_report

make_report(list(snakemake.input.summaries), Path(snakemake.output.table).parent,
            snakemake.output.reward, snakemake.output.get("geneval"), snakemake.output.get("tasks"))
