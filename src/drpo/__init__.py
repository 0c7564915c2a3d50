"""Drifting Preference Optimization (DrPO) for one-step text-to-image generators.

The package holds all logic of the pipeline; the Snakemake rules and scripts only call into it.
"""

__version__ = "0.1.0"
