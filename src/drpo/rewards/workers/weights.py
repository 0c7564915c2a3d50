"""Refuse a weights file that is not the model's, after a package loaded it with strict=False.

Reward packages load their checkpoints leniently (ImageReward with strict=False, mmdet's init_detector only logs
mismatches), so a file that holds none of the model's tensors loads silently, leaves the model at its random
initialisation and scores every image the same: DrPO would then see nothing but ties. A worker passes the keys
that `load_state_dict(state, strict=False)` reports, and allow-lists by glob only the keys it can explain.
Standard library only, like protocol.py: worker environments import it as `from weights import check_weights`.
"""

from __future__ import annotations

import fnmatch
import os
from typing import Iterable

EXAMPLES = 5  # keys quoted in the error


class WeightsMismatch(RuntimeError):
    """The weights file lacks tensors of the model, or holds tensors the model does not have."""


def _unexplained(keys: Iterable[str], allowed: Iterable[str]) -> list[str]:
    allowed = list(allowed)
    return [key for key in keys if not any(fnmatch.fnmatchcase(key, pattern) for pattern in allowed)]


def check_weights(
    path: str | os.PathLike,
    missing: Iterable[str],
    unexpected: Iterable[str],
    *,
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
) -> None:
    """Raise WeightsMismatch naming `path` unless every missing / unexpected key matches an allow-list glob.

    `missing`, `unexpected`: the model's keys absent from the file and the file's keys the model lacks, as
    `torch.nn.Module.load_state_dict(..., strict=False)` returns them (`check_weights(path, *result)`).
    """
    missing, unexpected = _unexplained(missing, allow_missing), _unexplained(unexpected, allow_unexpected)
    problems = []
    if missing:
        problems.append(f"lacks {len(missing)} of the model's tensors (e.g. {missing[:EXAMPLES]})")
    if unexpected:
        problems.append(f"holds {len(unexpected)} tensors the model does not have (e.g. {unexpected[:EXAMPLES]})")
    if problems:
        raise WeightsMismatch(f"{os.fspath(path)} is not this model's weights file: it {' and '.join(problems)}; "
                              "refusing to score with a partly random model")
