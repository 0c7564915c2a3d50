"""The miniature_* rules: train one of the miniature's models (drpo.miniature.build)."""

from pathlib import Path

from _job import start

start(snakemake)
from drpo.miniature.build import build_model

part = snakemake.rule.removeprefix("miniature_")
build_model(part, snakemake.params.config, out_dir=Path(snakemake.output[0]).parent,
            inputs={name: Path(path).parent for name, path in snakemake.input.items()})
