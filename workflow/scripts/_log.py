"""Send a rule script's stdout/stderr to the rule's log file (imported first by every script)."""

import sys


def redirect(snakemake) -> None:
    if snakemake.log:
        handle = open(snakemake.log[0], "w", buffering=1)
        sys.stdout = sys.stderr = handle
