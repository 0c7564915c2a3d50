"""The world_preferences_* rules: the miniature world's preference dataset in the rule's format."""

from _job import start

start(snakemake)
from drpo.pipeline import make_world_preferences

make_world_preferences(snakemake.params.config, snakemake.input.prompts, snakemake.output[0],
                       snakemake.rule.removeprefix("world_preferences_"))
