"""DSnoT mask refinement: the vectorised version against a plain per-row loop, and its promises."""

from __future__ import annotations

import pytest
import torch

from prunescope.pruning import dsnot, masks, scoring


def _layer(seed: int, rows: int = 6, cols: int = 32, tokens: int = 256):
    """Random weight ``[rows, cols]`` and inputs ``[tokens, cols]`` whose features have offsets."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen)
    offset = torch.rand(cols, generator=gen) - 0.25  # [cols], mostly positive means
    scale = 0.5 + torch.rand(cols, generator=gen)  # [cols]
    x = torch.randn(tokens, cols, generator=gen) * scale + offset  # [tokens, cols]
    return weight, x


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(dim=0), (x * x).mean(dim=0)  # [cols] x2


def _wanda_keep(weight: torch.Tensor, x: torch.Tensor, n_m: tuple[int, int] | None):
    scores = scoring.wanda(weight, (x * x).sum(dim=0))  # [rows, cols]
    if n_m is None:
        return masks.row_keep_masks(scores, 0.5)
    return masks.nm_keep_mask(scores, *n_m)


def _slow_refine(weight, keep, mean, sq_mean, n_m, max_cycles, threshold, power=1.0):
    """DSnoT written plainly, one row at a time, from the rules in the module docstring."""
    contrib = weight.float() * mean.float()[None, :]  # [rows, cols]
    var = (sq_mean.float() - mean.float() ** 2).clamp_min(1e-12)  # [cols]
    grow_score = (contrib.abs() / var.pow(power)[None, :]).tolist()
    wanda = scoring.wanda(weight, sq_mean).tolist()
    out = keep.clone()
    for i in range(weight.shape[0]):
        d = contrib[i].tolist()
        init = keep[i].tolist()
        error = contrib[i].masked_fill(keep[i], 0.0).sum()  # float32, like the library
        sign = 1 if error > 0 else -1 if error < 0 else 0

        def same_sign(v: float, s: int) -> bool:
            return (v > 0 and s > 0) or (v < 0 and s < 0)

        grows = [j for j in range(len(d)) if not init[j] and same_sign(d[j], sign)]
        grows.sort(key=lambda j: -grow_score[i][j])
        prunes = [j for j in range(len(d)) if init[j] and same_sign(d[j], -sign)]
        prunes.sort(key=lambda j: wanda[i][j])
        row = list(init)
        for k in range(min(max_cycles, len(d))):
            if k >= len(grows) or abs(float(error)) <= threshold:
                break
            g = grows[k]
            if n_m is None:
                if k >= len(prunes):
                    break
                p = prunes[k]
            else:
                m = n_m[1]
                group = range(g - g % m, g - g % m + m)
                eligible = [j for j in group if row[j] and init[j]]
                preferred = [j for j in eligible if same_sign(d[j], -sign)]
                pool = preferred or eligible
                if not pool:
                    break
                p = min(pool, key=lambda j: wanda[i][j])
            after = error + (contrib[i, p] - contrib[i, g])
            if not (same_sign(float(after), sign) and abs(float(after)) < abs(float(error))):
                break
            row[g], row[p] = True, False
            error = after
        out[i] = torch.tensor(row)
    return out


@pytest.mark.parametrize("n_m", [None, (2, 4)])
@pytest.mark.parametrize("cycles,threshold", [(50, 0.0), (3, 0.0), (50, 0.5)])
def test_matches_plain_per_row_loop(n_m, cycles, threshold):
    changed = 0
    for seed in range(6):
        weight, x = _layer(seed)
        mean, sq_mean = _stats(x)
        keep = _wanda_keep(weight, x, n_m)
        fast = dsnot.refine(weight, keep, mean, sq_mean, n_m=n_m, max_cycles=cycles,
                            update_threshold=threshold)
        slow = _slow_refine(weight, keep, mean, sq_mean, n_m, cycles, threshold)
        assert torch.equal(fast, slow), seed
        changed += int((fast != keep).any(dim=1).sum())
    assert changed >= 5, changed  # of 36 rows (measured 6-14): the comparison is not vacuous


@pytest.mark.parametrize("n_m", [None, (2, 4)])
def test_row_counts_and_nm_pattern_kept(n_m):
    weight, x = _layer(1, rows=48, cols=96)
    mean, sq_mean = _stats(x)
    keep = _wanda_keep(weight, x, n_m)
    out = dsnot.refine(weight, keep, mean, sq_mean, n_m=n_m, update_threshold=0.0)
    assert (out != keep).any()
    assert torch.equal(out.sum(dim=1), keep.sum(dim=1))
    if n_m is not None:
        groups = out.reshape(48, -1, 4).sum(dim=2)  # [rows, cols/4]
        assert bool((groups == 2).all())


@pytest.mark.parametrize("n_m", [None, (2, 4)])
def test_estimated_error_never_grows(n_m):
    weight, x = _layer(2, rows=64, cols=128)
    mean, sq_mean = _stats(x)
    keep = _wanda_keep(weight, x, n_m)
    out = dsnot.refine(weight, keep, mean, sq_mean, n_m=n_m, update_threshold=0.0)
    before = dsnot.row_error(weight, keep, mean).abs()
    after = dsnot.row_error(weight, out, mean).abs()
    assert bool((after <= before + 1e-5).all())
    # A row stops at its first refused swap; rows whose |e| is already small often stop at
    # once (the best revival would overshoot), so "most rows" is asserted where |e| is large.
    # Measured over 30 seeds: 0.88 (unstructured) and 0.69 (2:4) at worst, all rows >= 0.41.
    large = before > before.median()
    assert float((after[large] < before[large]).float().mean()) > 0.6
    assert float((after < before).float().mean()) > 0.35
    assert float(after.sum()) < 0.6 * float(before.sum())  # measured <= 0.40 / 0.55


def test_row_error_is_mean_output_difference():
    weight, x = _layer(3)
    mean, _ = _stats(x)
    keep = _wanda_keep(weight, x, None)
    direct = ((weight * ~keep) @ x.T).mean(dim=1)  # [rows]
    torch.testing.assert_close(dsnot.row_error(weight, keep, mean), direct, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n_m", [None, (2, 4)])
def test_reconstruction_error_lower_than_wanda(n_m):
    """||(W - W') X||^2 on the calibration tokens: DSnoT's mask beats the Wanda mask it refines."""
    ratios = []
    for seed in range(5):
        weight, x = _layer(seed, rows=64, cols=256, tokens=512)
        mean, sq_mean = _stats(x)
        keep = _wanda_keep(weight, x, n_m)
        out = dsnot.refine(weight, keep, mean, sq_mean, n_m=n_m)
        base = float((((weight * ~keep) @ x.T) ** 2).sum())
        refined = float((((weight * ~out) @ x.T) ** 2).sum())
        ratios.append(refined / base)
    # Measured over 20 seeds: 0.86-0.93 (unstructured), 0.93-0.99 (2:4).
    assert max(ratios) < (0.95 if n_m is None else 0.99), ratios


def test_zero_cycles_and_high_threshold_change_nothing():
    weight, x = _layer(4)
    mean, sq_mean = _stats(x)
    keep = _wanda_keep(weight, x, None)
    out = dsnot.refine(weight, keep, mean, sq_mean, max_cycles=0)
    assert torch.equal(out, keep) and out is not keep
    high = float(dsnot.row_error(weight, keep, mean).abs().max())
    assert torch.equal(dsnot.refine(weight, keep, mean, sq_mean, update_threshold=high), keep)


def test_half_precision_weight_computes_in_float32():
    weight, x = _layer(5)
    mean, sq_mean = _stats(x)
    keep = _wanda_keep(weight, x, None)
    half = weight.to(torch.bfloat16)
    out = dsnot.refine(half, keep, mean, sq_mean, update_threshold=0.0)
    assert torch.equal(out, dsnot.refine(half.float(), keep, mean, sq_mean, update_threshold=0.0))


def test_bad_inputs_raise_with_shapes():
    weight, x = _layer(0)
    mean, sq_mean = _stats(x)
    keep = _wanda_keep(weight, x, None)
    with pytest.raises(ValueError, match=r"\(6, 31\).*\(6, 32\)"):
        dsnot.refine(weight, keep[:, :31], mean, sq_mean)
    with pytest.raises(ValueError, match=r"input_sq_mean of shape \(31,\).*\(6, 32\)"):
        dsnot.refine(weight, keep, mean, sq_mean[:31])
    with pytest.raises(ValueError, match=r"input_mean of shape \(6, 32\)"):
        dsnot.row_error(weight, keep, x[:6])
    with pytest.raises(ValueError, match=r"2-D"):
        dsnot.refine(weight[0], keep[0], mean, sq_mean)
    with pytest.raises(ValueError, match=r"not 2:4"):
        dsnot.refine(weight, keep, mean, sq_mean, n_m=(2, 4))  # a row mask, not 2:4
    with pytest.raises(ValueError, match=r"multiple of M.*\(6, 30\)"):
        dsnot.refine(weight[:, :30], keep[:, :30], mean[:30], sq_mean[:30], n_m=(2, 4))
    with pytest.raises(ValueError, match=r"torch.bool"):
        dsnot.refine(weight, keep.float(), mean, sq_mean)
