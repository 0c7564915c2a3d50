"""Reward ranking of the K candidates of a prompt and the choice of positive / negative anchors (spec 2.4).

DrPO never differentiates the reward: it only ranks. Each reward is z-scored within the K candidates of a
prompt (a monotone map, so a single reward's ranking is unchanged), several rewards are combined as a
weighted sum of their z-scores, the top candidates become positive anchors and the bottom ones negative
anchors.
"""

import math
from collections.abc import Mapping

import torch
from torch import Tensor


def _check_scores(scores: Tensor, what: str = "reward") -> None:
    """Raise a ValueError naming the first non-finite score of a (B, K) tensor."""
    if scores.dim() != 2 or not scores.is_floating_point():
        raise ValueError(f"{what} scores must be a float tensor (B, K), got {scores.dtype} {tuple(scores.shape)}")
    bad = (~torch.isfinite(scores)).nonzero()
    if len(bad):
        b, k = bad[0].tolist()
        raise ValueError(f"{what} returned {scores[b, k].item()} for candidate {k} of prompt {b}")


def zscore(scores: Tensor, dim: int = -1, eps: float = 1e-6) -> Tensor:
    """(s - mean) / (population std + eps) along dim; same shape as scores."""
    mean = scores.mean(dim=dim, keepdim=True)
    std = scores.std(dim=dim, keepdim=True, correction=0)
    return (scores - mean) / (std + eps)


def ensemble_scores(scores: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """Weighted sum of per-reward z-scores over the K candidates.

    Args:
        scores: reward name -> (B, K) raw scores.
        weights: reward name -> weight; the same names as scores, normalised to sum 1.

    Returns:
        (B, K) combined scores.
    """
    if set(scores) != set(weights) or not scores:
        raise ValueError(
            f"reward names differ: scores has {sorted(scores)}, weights has {sorted(weights)}"
        )
    total = sum(weights.values())
    if not total > 0:
        raise ValueError(f"reward weights must have a positive sum, got {dict(weights)}")
    shapes = {tuple(s.shape) for s in scores.values()}
    if len(shapes) != 1:
        raise ValueError(f"all reward scores must share one shape (B, K), got {sorted(shapes)}")
    for name, s in scores.items():
        _check_scores(s, f"reward {name!r}")
    return sum(weights[name] / total * zscore(s) for name, s in scores.items())


def select_anchors(scores: Tensor, num_pos: int, num_neg: int) -> tuple[Tensor, Tensor]:
    """Indices of the positive (best) and negative (worst) candidates of every prompt.

    Candidates are ranked by a stable descending sort, so tied scores keep the lower candidate index first.
    Positives are the first num_pos of the ranking (best first), negatives the last num_neg (worst first);
    the two sets are disjoint. num_neg may be 0 (the generated batch still acts as negatives in the drift
    field); num_pos must be >= 1.

    Args:
        scores: (B, K) finite scores.

    Returns:
        positives (B, num_pos) and negatives (B, num_neg), int64.
    """
    _check_scores(scores)
    k = scores.shape[1]
    if num_pos < 1 or num_neg < 0 or num_pos + num_neg > k:
        raise ValueError(
            f"cannot pick num_pos={num_pos} positives and num_neg={num_neg} negatives from K={k} "
            "candidates (need num_pos >= 1, num_neg >= 0, num_pos + num_neg <= K)"
        )
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order[:, :num_pos], order[:, k - num_neg :].flip(-1)


def drop_tied_anchors(scores: Tensor, positives: Tensor, negatives: Tensor) -> tuple[Tensor, Tensor]:
    """The anchors of one prompt that carry a preference: positives scored above the lowest negative, negatives
    scored below the highest positive.

    A pass/fail reward (GenEval's detector) often scores every candidate of a prompt alike, and then the "best"
    and "worst" are the first and last by index: a preference between equals. Because the drift field is
    normalised to unit RMS per radius, such a preference moves the generator as far as a real one, in a
    direction no reward asked for. With 2 passing candidates of 16 and 4 anchors of each kind, the positives
    are the 2 passing ones and the negatives stay 4. If every anchor ties, both come back empty: the caller
    skips the preference for this prompt. A continuous reward rarely ties, so for it nothing changes.

    Args:
        scores: (K,) the prompt's scores; positives (P,), negatives (M,): indices from `select_anchors`.

    Returns:
        the kept positives and negatives, in their order; both empty when nothing is preferred.
    """
    if scores.dim() != 1 or positives.dim() != 1 or negatives.dim() != 1:
        raise ValueError(f"expected 1-D scores and anchor indices, got {tuple(scores.shape)}, "
                         f"{tuple(positives.shape)}, {tuple(negatives.shape)}")
    if len(negatives) == 0:
        return positives, negatives
    positive_scores, negative_scores = scores[positives], scores[negatives]
    kept_positives = positives[positive_scores > negative_scores.min()]
    kept_negatives = negatives[negative_scores < positive_scores.max()]
    if len(kept_positives) == 0 or len(kept_negatives) == 0:
        return positives[:0], negatives[:0]
    return kept_positives, kept_negatives


def feature_subset(scores: Tensor, top_fraction: float, negatives: Tensor) -> Tensor:
    """The candidates of one prompt that receive the gradient (spec 2.4, the authors' feature set): all K when
    ``top_fraction`` >= 1, else the top ceil(K * top_fraction) by score minus the negatives, or the single best
    when that leaves none.

    Args:
        scores: (K,) finite scores; negatives: (M,) indices of the negative anchors.

    Returns:
        (S,) int64 candidate indices, best first.
    """
    _check_scores(scores.view(1, -1), "candidate")
    if not top_fraction > 0:
        raise ValueError(f"top_fraction must be > 0, got {top_fraction}")
    k = scores.shape[0]
    if top_fraction >= 1:
        return torch.arange(k, device=scores.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    top = order[: math.ceil(k * top_fraction)]
    kept = top[~torch.isin(top, negatives.to(top.device))]
    return kept if len(kept) else order[:1]


def gather_samples(tensor: Tensor, index: Tensor) -> Tensor:
    """Per-prompt selection: tensor (B, K, ...) and index (B, J) -> (B, J, ...)."""
    if index.dim() != 2 or tensor.dim() < 2 or index.shape[0] != tensor.shape[0]:
        raise ValueError(
            f"expected tensor (B, K, ...) and index (B, J), got {tuple(tensor.shape)} and {tuple(index.shape)}"
        )
    rows = torch.arange(tensor.shape[0], device=tensor.device)[:, None]
    return tensor[rows, index.to(tensor.device)]
