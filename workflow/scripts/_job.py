"""Start of every rule script: log to the rule's log file, use the rule's thread count, end with Snakemake."""

import sys


def start(snakemake) -> None:
    if snakemake.log:
        handle = open(snakemake.log[0], "w", buffering=1)
        sys.stdout = sys.stderr = handle
    from drpo.processes import end_with_parent

    # A job outliving a killed Snakemake would go on writing next to the job a rerun starts.
    end_with_parent()
    import torch

    # torch would otherwise take every core in each of the jobs Snakemake runs side by side.
    torch.set_num_threads(max(1, snakemake.threads))
