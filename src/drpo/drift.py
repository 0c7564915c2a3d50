"""The drifting field estimator and the DrPO objective, as pure functions over tensors.

The module also holds the authors' reward-weighted variants (spec 2.8, :func:`awr_drift_loss`), which puts it near
500 lines: they are built from the binary field's distances, kernels, scale and regression, which stay private here.

DrPO (Jiang, Wen, Liu, "Drifting Preference Optimization for One-Step Generative Models", arXiv 2606.02521)
reuses the field estimator of Drifting (Deng et al., "Generative Modeling via Drifting", arXiv 2602.04770)
and changes what the positive and negative anchors are.

The estimator, for one feature space and one prompt (point clouds of generated features X, positive anchors P
and negative anchors Q, anchors weighted by w+ / w-):

1. The targets are ``[sg(X); Q; P]`` with weights ``[1..1; w-; w+]``: the generated batch itself counts as
   weight-1 negatives (Drifting's self-repulsion).
2. All generated-to-target Euclidean distances give a global scale ``s`` (weighted mean distance, divided by
   the mean weight) and a per-dimension scale ``sigma = s / sqrt(D)``; the field lives in units of ``sigma``.
3. For every radius ``r`` a kernel logit (laplacian ``-d/(s r)``, rbf ``-(d/(s r))^2 / 2`` or cosine
   ``cos/r``) is masked against each point's own copy (and optionally its own negative copy), normalised
   both over targets (row softmax) and over generated points (column softmax), combined as the weighted
   geometric mean with a floor, and turned into a sum of dipoles ``A_ip A_in (p - n)`` from every negative
   ``n`` to every positive ``p``. Each radius's field is divided by its RMS, and the radii are summed.
4. The loss regresses ``x / sigma`` onto the frozen target ``sg(x / sigma + F)``; its gradient is
   ``-2 F / (sigma N D)`` per point.

All drift math runs in fp32 (fp64 when the inputs are fp64), also under autocast and for bf16/fp16 inputs. The
features it is given are fp32 computations too: every feature encoder runs with autocast off (drpo.features.base).
Settings (weights, radii, kernel, λ) have no defaults here; config.yaml holds them.
"""

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from drpo.ranking import gather_samples, select_anchors

KERNELS = ("laplacian", "exponential", "rbf", "cosine")
AWR_VARIANTS = ("drpo-awr", "drpo-awr-contrast", "drpo-awr-topk", "drpo-awr-hard", "drpo-awr-advsign")

_MASK_LOGIT = 100.0  # a masked pair gets logit - 100 / r
_AFFINITY_FLOOR = 1e-6  # floor on row_softmax * col_softmax before the square root
_DIST_FLOOR = 1e-8  # floor on the squared distance
_SCALE_FLOOR = 1e-3
_RMS_FLOOR = 1e-8


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """fp64 if any input is fp64, else fp32 (bf16/fp16 inputs are upcast)."""
    for t in tensors:
        if not t.is_floating_point():
            raise ValueError(f"drift inputs must be floating point, got dtype {t.dtype}")
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_options(radii: Sequence[float], kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; valid kernels: {', '.join(KERNELS)}")
    if len(radii) == 0 or any(not r > 0 for r in radii):
        raise ValueError(f"radii must be a non-empty sequence of positive numbers, got {tuple(radii)}")


def _check_clouds(generated: Tensor, positive: Tensor, negative: Tensor) -> None:
    for name, t in (("generated", generated), ("positive", positive), ("negative", negative)):
        if t.dim() != 3:
            raise ValueError(f"{name} must have shape (B, n, D), got {tuple(t.shape)}")
    b, n, d = generated.shape
    if n == 0 or positive.shape[1] == 0:
        raise ValueError(
            f"generated and positive sets must be non-empty, got N={n}, P={positive.shape[1]}"
        )
    for name, t in (("positive", positive), ("negative", negative)):
        if t.shape[0] != b or t.shape[2] != d:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, expected batch {b} and feature dim {d} "
                f"like generated {tuple(generated.shape)}"
            )


def _anchor_weights(weight: float | Tensor, batch: int, count: int, name: str, like: Tensor) -> Tensor:
    """A scalar or per-anchor weight, shape (count,) or (B, count), as a (B, count) tensor."""
    w = torch.as_tensor(weight, dtype=like.dtype, device=like.device)
    if w.dim() == 1 and w.shape[0] == count:
        w = w.expand(batch, count)
    elif w.dim() == 0:
        w = w.expand(batch, count)
    elif tuple(w.shape) != (batch, count):
        raise ValueError(
            f"{name} must be a float or have shape ({count},) or ({batch}, {count}), got {tuple(w.shape)}"
        )
    bad = w[~(torch.isfinite(w) & (w >= 0))]
    if bad.numel():
        raise ValueError(f"{name} must be finite and non-negative, got {bad[0].item()}")
    return w


def _distances(x: Tensor, t: Tensor) -> Tensor:
    """Euclidean distances (B, N, L) between x (B, N, D) and t (B, L, D), floored inside the sqrt."""
    sq = x.square().sum(-1, keepdim=True) + t.square().sum(-1).unsqueeze(1) - 2.0 * x @ t.transpose(1, 2)
    return sq.clamp_min(_DIST_FLOOR).sqrt()


def _kernel_logits(x: Tensor, t: Tensor, dist: Tensor, scale: Tensor, radius: float, kernel: str) -> Tensor:
    """Kernel logits (B, N, L) of x (B, N, D) against t (B, L, D) at one radius; scale is (B,)."""
    if kernel == "cosine":
        xn = x / x.norm(dim=-1, keepdim=True).clamp_min(_DIST_FLOOR)
        tn = t / t.norm(dim=-1, keepdim=True).clamp_min(_DIST_FLOOR)
        return xn @ tn.transpose(1, 2) / radius
    z = dist / (scale[:, None, None] * radius)
    return -0.5 * z.square() if kernel == "rbf" else -z  # "laplacian" and "exponential" are the same kernel


def _rms(f: Tensor) -> Tensor:
    """Per-batch-element RMS (B,) of a field (B, N, D), floored."""
    return f.square().mean(dim=(1, 2)).clamp_min(_RMS_FLOOR).sqrt()


def _binary_field(
    x: Tensor,
    positive: Tensor,
    negative: Tensor,
    positive_weight: Tensor,
    negative_weight: Tensor,
    radii: Sequence[float],
    kernel: str,
    mask_negative_self: bool,
) -> tuple[Tensor, Tensor, Tensor, dict[float, Tensor]]:
    """The drifting field of Drifting/DrPO (spec 2.6), the core shared by every public function.

    Args:
        x: detached generated points (B, N, D); positive (B, P, D); negative (B, M, D); all one float dtype.
        positive_weight: (B, P); negative_weight: (B, M).
        mask_negative_self: also mask point i against negative i (requires M == N, checked by the caller).

    Returns:
        field F (B, N, D) in units of sigma, scale s (B,), sigma (B,), and the raw field RMS (B,) per radius.
    """
    _, n, d = x.shape
    split = n + negative.shape[1]  # targets [:split] are negatives (the generated block included)
    targets = torch.cat([x, negative, positive], dim=1)  # (B, L, D)
    omega = torch.cat([torch.ones_like(x[..., 0]), negative_weight, positive_weight], dim=1)  # (B, L)

    dist = _distances(x, targets)
    scale = ((dist * omega[:, None, :]).mean(dim=(1, 2)) / omega.mean(dim=1)).clamp_min(_SCALE_FLOOR)
    sigma = (scale / math.sqrt(d)).clamp_min(_SCALE_FLOOR)
    x_s = x / sigma[:, None, None]
    t_s = targets / sigma[:, None, None]

    own = torch.arange(n, device=x.device)
    mask = torch.zeros(n, targets.shape[1], dtype=x.dtype, device=x.device)
    mask[own, own] = 1.0
    if mask_negative_self:
        mask[own, n + own] = 1.0

    field = torch.zeros_like(x)
    rms = {}
    for r in radii:
        logits = _kernel_logits(x, targets, dist, scale, r, kernel) - (_MASK_LOGIT / r) * mask
        affinity = (logits.softmax(dim=-1) * logits.softmax(dim=-2)).clamp_min(_AFFINITY_FLOOR).sqrt()
        affinity = affinity * omega[:, None, :]
        a_neg, a_pos = affinity[..., :split], affinity[..., split:]
        coeff = torch.cat(
            [-a_neg * a_pos.sum(-1, keepdim=True), a_pos * a_neg.sum(-1, keepdim=True)], dim=-1
        )  # (B, N, L): each negative pushes by S+, each positive pulls by S-
        f = coeff @ t_s - coeff.sum(-1, keepdim=True) * x_s
        rms[r] = _rms(f)
        field = field + f / rms[r][:, None, None]
    return field, scale, sigma, rms


def _regression_loss(generated: Tensor, field: Tensor, sigma: Tensor) -> Tensor:
    """Per-element loss (B,) = mean_{i,d} (x/sigma - sg(x/sigma + F))^2, gradient only into generated."""
    x_s = generated.to(field.dtype) / sigma[:, None, None]
    return (x_s - (x_s.detach() + field)).square().mean(dim=(1, 2))


def _field_and_loss(
    generated: Tensor,
    positive: Tensor,
    negative: Tensor,
    positive_weight: float | Tensor,
    negative_weight: float | Tensor,
    radii: Sequence[float],
    kernel: str,
    mask_negative_self: bool,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Validate, run the binary field in full precision, return (field, loss, info)."""
    _check_options(radii, kernel)
    _check_clouds(generated, positive, negative)
    b, n, _ = generated.shape
    m = negative.shape[1]
    if mask_negative_self and m != n:
        raise ValueError(f"mask_negative_self needs as many negatives as generated points, got M={m}, N={n}")
    dtype = _compute_dtype(generated, positive, negative)
    with torch.autocast(device_type=generated.device.type, enabled=False):
        x = generated.detach().to(dtype)
        pos = positive.detach().to(device=x.device, dtype=dtype)
        neg = negative.detach().to(device=x.device, dtype=dtype)
        w_pos = _anchor_weights(positive_weight, b, pos.shape[1], "positive_weight", x)
        w_neg = _anchor_weights(negative_weight, b, m, "negative_weight", x)
        field, scale, sigma, rms = _binary_field(x, pos, neg, w_pos, w_neg, radii, kernel, mask_negative_self)
        loss = _regression_loss(generated, field, sigma)
    info = {"scale": scale, "sigma": sigma} | {f"rms_r{r:g}": v for r, v in rms.items()}
    return field, loss, info


def drift_field(
    generated: Tensor,
    positive: Tensor,
    negative: Tensor,
    *,
    positive_weight: float | Tensor,
    negative_weight: float | Tensor,
    radii: Sequence[float],
    kernel: str,
    mask_negative_self: bool = False,
) -> Tensor:
    """The drifting field at the generated points (spec 2.6).

    Args:
        generated: (B, N, D) generated features (detached internally).
        positive: (B, P, D) positive anchors, P >= 1.
        negative: (B, M, D) negative anchors, M may be 0; the generated set always acts as weight-1 negatives.
        positive_weight, negative_weight: a float, or per-anchor weights (P,)/(B, P) and (M,)/(B, M).
        radii: kernel radii; each radius contributes a unit-RMS field.
        kernel: "laplacian" (alias "exponential"), "rbf" or "cosine".
        mask_negative_self: also mask point i against negative i (needs M == N; used by the reference drift).

    Returns:
        F (B, N, D), detached, in units of sigma, fp32 (fp64 for fp64 inputs).
    """
    with torch.no_grad():
        field, _, _ = _field_and_loss(
            generated, positive, negative, positive_weight, negative_weight, radii, kernel, mask_negative_self
        )
    return field


def drift_loss(
    generated: Tensor,
    positive: Tensor,
    negative: Tensor,
    *,
    positive_weight: float | Tensor,
    negative_weight: float | Tensor,
    radii: Sequence[float],
    kernel: str,
    mask_negative_self: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Drifting regression loss: arguments as :func:`drift_field`.

    Returns:
        loss (B,) = mean_{i,d} (x/sigma - sg(x/sigma + F))^2 with gradient -2 F / (sigma N D) into generated,
        and detached diagnostics: "scale" (B,), "sigma" (B,), "rms_r{r}" (B,) raw field RMS per radius.
    """
    _, loss, info = _field_and_loss(
        generated, positive, negative, positive_weight, negative_weight, radii, kernel, mask_negative_self
    )
    return loss, info


def _point_cloud(features: Tensor, key: str, role: str, batch: int, dim: int | None = None) -> Tensor:
    """(B, S, T, D) per-sample tokens -> (B, S*T, D): all tokens of one prompt form one cloud."""
    shape = tuple(features.shape)
    if features.dim() != 4 or shape[0] != batch or (dim is not None and shape[-1] != dim):
        raise ValueError(
            f"{role}[{key!r}] has shape {shape}, expected (B, S, T, D) with B={batch}"
            + (f" and D={dim} like generated" if dim is not None else "")
        )
    return features.reshape(batch, -1, shape[-1])


def drpo_objective(
    generated: Mapping[str, Tensor],
    reference: Mapping[str, Tensor] | None,
    positive: Mapping[str, Tensor] | None,
    negative: Mapping[str, Tensor] | None,
    *,
    positive_weight: float,
    negative_weight: float,
    reference_weight: float,
    reference_negative_weight: float,
    reference_loss_weight: float,
    pref_radii: Sequence[float],
    ref_radii: Sequence[float],
    kernel: str,
    aggregation: str,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The DrPO loss of one batch of prompts over several feature spaces (spec 2.7).

    Every argument maps a feature key to per-sample features (B, S, T, D): B prompts; S = K generated (with
    grad), K reference outputs of the same noises, P positives, M negatives; T tokens per sample. Per key k:
    ``L_pref,k = drift_loss(X, P, N, w+, w-)`` and ``L_ref,k = drift_loss(X, XR, sg(X), ref weights,
    mask_negative_self=True)``; the total is ``Agg_k L_pref,k + reference_loss_weight * Agg_k L_ref,k`` with
    Agg = "sum" (SD-Turbo) or "mean" (SDXL) over keys. A zero reference_loss_weight skips the reference
    calls, and reference may then be None. positive and negative None skip the preference term (a prompt whose
    candidates all scored alike, drpo.ranking.drop_tied_anchors): the loss is then the reference term alone.

    Returns:
        loss (B,) and detached per-key losses "pref/{key}", "ref/{key}" plus aggregates "pref", "ref", each (B,).
    """
    if aggregation not in ("sum", "mean"):
        raise ValueError(f"aggregation must be 'sum' or 'mean', got {aggregation!r}")
    if not reference_loss_weight >= 0:
        raise ValueError(f"reference_loss_weight must be >= 0, got {reference_loss_weight}")
    use_ref = reference_loss_weight > 0
    if reference is None and use_ref:
        raise ValueError(f"reference features are required when reference_loss_weight={reference_loss_weight}")
    keys = list(generated)
    if not keys:
        raise ValueError("generated holds no feature keys")
    if (positive is None) != (negative is None):
        raise ValueError("positive and negative must both be given, or both be None (no preference term)")
    use_pref = positive is not None
    if not use_pref and not use_ref:
        raise ValueError("drpo_objective needs a preference term (positive, negative) or a reference term")
    roles = {"positive": positive, "negative": negative} if use_pref else {}
    if reference is not None:
        roles["reference"] = reference
    for role, feats in roles.items():
        if set(feats) != set(keys):
            raise ValueError(f"{role} has feature keys {sorted(feats)}, generated has {sorted(keys)}")

    batch = generated[keys[0]].shape[0]
    pref, ref = {}, {}
    for key in keys:
        x = _point_cloud(generated[key], key, "generated", batch)
        clouds = {role: _point_cloud(f[key], key, role, batch, x.shape[-1]) for role, f in roles.items()}
        if use_pref:
            pref[key], _ = drift_loss(
                x,
                clouds["positive"],
                clouds["negative"],
                positive_weight=positive_weight,
                negative_weight=negative_weight,
                radii=pref_radii,
                kernel=kernel,
            )
        if use_ref:
            ref[key], _ = drift_loss(
                x,
                clouds["reference"],
                x.detach(),
                positive_weight=reference_weight,
                negative_weight=reference_negative_weight,
                radii=ref_radii,
                kernel=kernel,
                mask_negative_self=True,
            )

    def aggregate(losses: dict[str, Tensor]) -> Tensor:
        total = torch.stack(list(losses.values())).sum(dim=0)
        return total / len(losses) if aggregation == "mean" else total

    loss = aggregate(pref) if use_pref else 0.0
    info = {f"pref/{k}": v.detach() for k, v in pref.items()} | ({"pref": loss.detach()} if use_pref else {})
    if use_ref:
        ref_total = aggregate(ref)
        loss = loss + reference_loss_weight * ref_total
        info |= {f"ref/{k}": v.detach() for k, v in ref.items()} | {"ref": ref_total.detach()}
    return loss, info


def _reward_logits(values: Tensor, clip: float) -> Tensor:
    """Reward logits (B, n): values shifted so the largest is 0, clipped to [-clip, clip]."""
    return (values - values.amax(dim=-1, keepdim=True)).clamp(-clip, clip)


def _partition_weights(logits: Tensor, member: Tensor, weight: float) -> Tensor:
    """Anchor weights (B, K): weight * |partition| * softmax of logits within the partition, zero outside."""
    probs = logits.masked_fill(~member, float("-inf")).softmax(dim=-1)
    return weight * member.sum(dim=-1, keepdim=True) * probs


def awr_drift_loss(
    generated: Tensor,
    reference: Tensor,
    scores: Tensor,
    *,
    variant: str,
    alpha: float,
    logit_clip: float,
    top_fraction: float,
    force_scale: float,
    positive_weight: float,
    negative_weight: float,
    radii: Sequence[float],
    kernel: str,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Reward-weighted drift variants (spec 2.8; not the default objective, no separate reference loss).

    Args:
        generated: (B, N, D) generated features with grad, N = K*T: K candidates of T tokens each in
            candidate-major order (a (B, K, T, D) tensor reshaped); every token carries its candidate's score.
        reference: (B, N, D) frozen base-model features of the same noises (used by the row-softmax variants).
        scores: (B, K) z-scored rewards of the K candidates.
        variant: with row-softmax kernel means ``mu_A(x) = sum_j softmax_j(logit_ij + bias_j) a_j``
            (no self mask, no column softmax) and reward logits ``clip(v - max v)``:
            "drpo-awr": ``F = mu_X[+s/alpha] - x + mu_XR - mu_X``;
            "drpo-awr-contrast": ``F = mu_X[+s/alpha] - x + mu_XR - mu_X[-s/alpha]``;
            "drpo-awr-topk": as contrast with the means over the top n / bottom n candidates only,
            n = ceil(K * top_fraction) capped at K // 2 (disjoint sets), F times force_scale;
            "drpo-awr-hard": binary drift from the top n (weights w+ * n * softmax(s/alpha)) against the
            bottom n (weights w- * n * softmax(-s/alpha));
            "drpo-awr-advsign": binary drift with the whole batch as anchors: candidates with advantage
            a = s - mean(s) > 0 are positives, < 0 negatives (argmax / argmin if a side is empty), weighted
            w * |side| * softmax(clip(+-a/alpha)) within their side and 0 elsewhere.

    Returns:
        loss (B,) with gradient -2 F / (sigma N D) into generated, and detached "scale", "sigma", "rms_r{r}".
    """
    if variant not in AWR_VARIANTS:
        raise ValueError(f"unknown AWR variant {variant!r}; valid variants: {', '.join(AWR_VARIANTS)}")
    if not (alpha > 0 and logit_clip > 0 and 0 < top_fraction <= 1):
        raise ValueError(
            f"need alpha > 0, logit_clip > 0, 0 < top_fraction <= 1; got {alpha}, {logit_clip}, {top_fraction}"
        )
    _check_options(radii, kernel)
    if generated.dim() != 3 or reference.shape != generated.shape:
        raise ValueError(
            f"generated and reference must share one shape (B, N, D), got {tuple(generated.shape)} "
            f"and {tuple(reference.shape)}"
        )
    b, n, d = generated.shape
    if scores.dim() != 2 or scores.shape[0] != b or scores.shape[1] < 2 or n % scores.shape[1]:
        raise ValueError(f"scores must be (B, K) with K >= 2 dividing N={n}, got {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise ValueError(f"scores must be finite, got {scores.tolist()}")
    k = scores.shape[1]
    tokens = n // k
    dtype = _compute_dtype(generated, reference, scores)
    s = scores.detach().to(device=generated.device, dtype=dtype)
    n_side = max(1, min(math.ceil(k * top_fraction), k // 2))

    with torch.autocast(device_type=generated.device.type, enabled=False):
        x = generated.detach().to(dtype)

        def per_token(v: Tensor) -> Tensor:  # (B, J) per candidate -> (B, J*T) per token
            return v.repeat_interleave(tokens, dim=1)

        def tokens_of(index: Tensor) -> Tensor:  # (B, J) candidate indices -> their tokens (B, J*T, D)
            return gather_samples(x.reshape(b, k, tokens, d), index).reshape(b, -1, d)

        if variant == "drpo-awr-hard":
            top, bottom = select_anchors(s, n_side, n_side)
            w_pos = n_side * positive_weight * (torch.gather(s, 1, top) / alpha).softmax(dim=-1)
            w_neg = n_side * negative_weight * (torch.gather(s, 1, bottom) / -alpha).softmax(dim=-1)
            anchors = (tokens_of(top), tokens_of(bottom), per_token(w_pos), per_token(w_neg))
            _, loss, info = _field_and_loss(generated, *anchors, radii, kernel, False)
            return loss, info
        if variant == "drpo-awr-advsign":
            adv = s - s.mean(dim=-1, keepdim=True)
            rows = torch.arange(b, device=s.device)
            is_pos, is_neg = adv > 0, adv < 0
            is_pos[rows, adv.argmax(dim=-1)] |= ~is_pos.any(dim=-1)
            is_neg[rows, adv.argmin(dim=-1)] |= ~is_neg.any(dim=-1)
            logits = (adv / alpha).clamp(-logit_clip, logit_clip)
            w_pos = _partition_weights(logits, is_pos, positive_weight)
            w_neg = _partition_weights(-logits, is_neg, negative_weight)
            _, loss, info = _field_and_loss(
                generated, x, x, per_token(w_pos), per_token(w_neg), radii, kernel, False
            )
            return loss, info

        xr = reference.detach().to(dtype)
        scale = _distances(x, torch.cat([x, xr], dim=1)).mean(dim=(1, 2)).clamp_min(_SCALE_FLOOR)
        sigma = (scale / math.sqrt(d)).clamp_min(_SCALE_FLOOR)
        if variant == "drpo-awr-topk":
            top, bottom = select_anchors(s, n_side, n_side)
            pos = (tokens_of(top), per_token(torch.gather(s, 1, top) / alpha))
            neg = (tokens_of(bottom), per_token(torch.gather(s, 1, bottom) / -alpha))
        else:
            pos = (x, per_token(s / alpha))
            neg = (x, per_token(s / -alpha) if variant == "drpo-awr-contrast" else None)
        # (anchors (B, J, D), distances (B, N, J), reward bias (B, J) or None) for the three kernel means
        sets = [
            (a, _distances(x, a), None if v is None else _reward_logits(v, logit_clip))
            for a, v in (pos, neg, (xr, None))
        ]

        field = torch.zeros_like(x)
        rms = {}
        for r in radii:
            means = []
            for anchors, dist, bias in sets:
                logits = _kernel_logits(x, anchors, dist, scale, r, kernel)
                if bias is not None:
                    logits = logits + bias[:, None, :]
                means.append(logits.softmax(dim=-1) @ anchors)
            mu_pos, mu_neg, mu_ref = means
            f = (mu_pos - x + mu_ref - mu_neg) / sigma[:, None, None]
            rms[r] = _rms(f)
            field = field + f / rms[r][:, None, None]
        if variant == "drpo-awr-topk":
            field = force_scale * field
        loss = _regression_loss(generated, field, sigma)
    return loss, {"scale": scale, "sigma": sigma} | {f"rms_r{r:g}": v for r, v in rms.items()}
