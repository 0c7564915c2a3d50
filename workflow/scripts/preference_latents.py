"""Rule preference_latents: encode the preference dataset's images once into the latent cache (continues a cache)."""

from _job import start

start(snakemake)
from drpo.pipeline import make_preference_latents

make_preference_latents(snakemake.params.config, snakemake.params.dataset, snakemake.output.done)
