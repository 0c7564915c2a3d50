"""Processes that end with the process that started them.

A training job whose Snakemake dies (killed, or its node lost) would otherwise go on writing its run folder next
to the job a rerun starts, and a reward worker whose trainer dies would hold its GPU and memory forever. Linux
delivers a chosen signal to a process when its parent ends (prctl PR_SET_PDEATHSIG); elsewhere these are no-ops.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def _set_parent_death_signal(signum: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0


def end_with_parent(signum: int = signal.SIGTERM) -> None:
    """Have this process receive ``signum`` when its parent ends; end at once if the parent is already gone.

    SIGTERM ends a Python process (checkpoints are written atomically, so nothing finished is lost) and lets it
    pass the signal on; the run folder's lock goes with the process.
    """
    parent = os.getppid()
    if _set_parent_death_signal(signum) and os.getppid() != parent:
        os.kill(os.getpid(), signum)  # the parent ended before the signal was set


def child_ends_with_parent(signum: int = signal.SIGKILL):
    """A ``preexec_fn`` for subprocess.Popen: the child receives ``signum`` when the process that started it ends.

    Linux watches the thread that started the child, so start it from one that lives as long as the process (the
    main thread, as the trainer and the evaluation do)."""
    return lambda: _set_parent_death_signal(signum)
