import pytest
import torch

from prunescope.pruning import masks, sparsegpt
from prunescope.pruning.patterns import SparsityPattern


def _problem(rows=8, cols=24, tokens=300, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    # correlated inputs, so the OBS update has something to compensate
    mix = torch.randn(cols, cols, generator=gen, dtype=torch.float64) * 0.5 + torch.eye(cols, dtype=torch.float64)
    x = torch.randn(tokens, cols, generator=gen, dtype=torch.float64) @ mix  # [tokens, in]
    return w, x, 2 * x.T @ x / tokens


def _slow_obs(w: torch.Tensor, h: torch.Tensor, keep: torch.Tensor, percdamp=0.01) -> torch.Tensor:
    """Direct OBS, one column at a time, with an explicitly inverted Hessian of the remaining columns."""
    w = w.clone()
    h = h + percdamp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    cols = w.shape[1]
    for i in range(cols):
        hinv = torch.linalg.inv(h[i:, i:])  # [in-i, in-i]
        for r in range(w.shape[0]):
            if not keep[r, i]:
                w[r, i:] -= w[r, i] / hinv[0, 0] * hinv[0, :]
    w[~keep] = 0
    return w


def test_update_matches_direct_obs_with_fixed_mask():
    w, _, h = _problem()
    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(5)) > 0.5
    fast, keep_out = sparsegpt.prune(w.float(), h, keep=keep, block_size=5)
    assert torch.equal(keep_out, keep)
    slow = _slow_obs(w, h, keep)
    assert torch.allclose(fast.double(), slow, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("block_size", [1, 7, 128])
def test_lazy_blocks_do_not_change_the_result(block_size):
    w, _, h = _problem()
    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(2)) > 0.4
    ref, _ = sparsegpt.prune(w.float(), h, keep=keep, block_size=24)
    out, _ = sparsegpt.prune(w.float(), h, keep=keep, block_size=block_size)
    assert torch.allclose(out, ref, atol=1e-4)


def _recon_error(w, w_new, x):
    return torch.linalg.norm(x @ w.T - x @ w_new.T).item()  # ||W X - W' X||


@pytest.mark.parametrize("pattern", [SparsityPattern(0.5), SparsityPattern(0.7), SparsityPattern.nm(2, 4)])
def test_lowers_reconstruction_error_against_magnitude(pattern):
    w, x, h = _problem(rows=16, cols=32, tokens=400, seed=1)
    new_w, keep = sparsegpt.prune(w.float(), h, pattern, block_size=16)
    assert (new_w[~keep] == 0).all()
    if pattern.is_nm:
        mag_keep = masks.nm_keep_mask(w.abs(), pattern.n, pattern.m)
    else:
        mag_keep = masks.layer_keep_mask(w.abs(), pattern.sparsity)
    magnitude = w * mag_keep
    assert (~keep).sum() == (~mag_keep).sum()
    err_sgpt = _recon_error(w, new_w.double(), x)
    err_mag = _recon_error(w, magnitude, x)
    assert err_sgpt < 0.95 * err_mag
    # the update matters too: the same mask without the update is worse
    assert err_sgpt < _recon_error(w, w * keep, x)


def test_unstructured_sparsity_is_exact_per_block():
    w, _, h = _problem(rows=10, cols=24)
    _, keep = sparsegpt.prune(w.float(), h, SparsityPattern(0.5), block_size=8)
    for start in range(0, 24, 8):
        assert int((~keep[:, start : start + 8]).sum()) == 40


def test_dead_inputs_are_dropped_and_hessian_shape_checked():
    w, _, h = _problem(rows=4, cols=8)
    h[3, :] = 0
    h[:, 3] = 0
    new_w, _ = sparsegpt.prune(w.float(), h, SparsityPattern(0.25))
    assert (new_w[:, 3] == 0).all()
    with pytest.raises(ValueError, match="does not match"):
        sparsegpt.prune(w.float(), h[:4, :4], SparsityPattern(0.5))


def test_keeps_input_dtype():
    w, _, h = _problem(rows=4, cols=8)
    out, _ = sparsegpt.prune(w.to(torch.bfloat16), h, SparsityPattern(0.5))
    assert out.dtype == torch.bfloat16 and out.shape == (4, 8)


def _reference_factor(h: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """The textbook route in float64: chol(inverse(H + damp I), upper), dampening raised tenfold until PD."""
    h = h.double().clone()
    diag = h.diagonal()
    diag[diag == 0] = 1.0
    undamped, damp = diag.clone(), percdamp * diag.mean()
    while True:
        diag.copy_(undamped + damp)
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
        damp = damp * 10


@pytest.mark.parametrize("n", [1, 5, 255, 256, 600])
def test_blocked_in_place_factor_matches_dense_float64(n):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(2 * n + 3, n, generator=gen)
    h = x.T @ x / n  # [n, n]
    if n > 3:
        h[3, :] = 0.0
        h[:, 3] = 0.0  # a dead input
    u = sparsegpt.inverse_hessian_factor(h)
    ref = _reference_factor(h)
    assert u.dtype == torch.float32
    assert torch.equal(u, u.triu())
    assert ((u.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_factor_overwrites_the_given_hessian_instead_of_copying():
    x = torch.randn(700, 300, generator=torch.Generator().manual_seed(1))
    h = x.T @ x
    ref = _reference_factor(h)
    fac = sparsegpt.factor(h, overwrite=True)
    assert fac.u.data_ptr() == h.data_ptr()  # one [in, in] matrix, not two
    assert ((fac.u.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_failed_factorization_is_undone_and_retried_with_more_dampening(caplog):
    x = torch.randn(50, 600, generator=torch.Generator().manual_seed(2))
    h = x.T @ x  # rank 50: positive definite only once dampened
    h[7, 7] = -20.0  # and not even then at 1%
    u = sparsegpt.inverse_hessian_factor(h)
    assert "raising dampening" in caplog.text
    ref = _reference_factor(h)
    assert ((u.double() - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_shared_factor_gives_the_same_weights_as_the_hessian():
    w, _, h = _problem(rows=6, cols=40)
    direct, keep_direct = sparsegpt.prune(w.float(), h.float(), SparsityPattern(0.5), block_size=16)
    fac = sparsegpt.factor(h.float().clone(), overwrite=True)
    shared, keep_shared = sparsegpt.prune(w.float(), fac, SparsityPattern(0.5), block_size=16)
    assert torch.equal(keep_direct, keep_shared) and torch.equal(direct, shared)
