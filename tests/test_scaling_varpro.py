"""The fitter's grid stage (variable projection): same values as the dense computation, bounded
memory whatever the number of points (deterministic checks, not timings: the timings are in
benchmarks/bench_fit.py --sweep)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from windtunnel.scaling import DataModelLaw, InputError, fit_points
from windtunnel.scaling.fit import (
    DEFAULT_GRID,
    FAST_GRID,
    _Problem,
    candidate_cells,
    single_threaded_blas,
)
from windtunnel.scaling.laws import huber
from windtunnel.scaling.synthetic import synthetic_points
from windtunnel.scaling.validate import _group_close
from windtunnel.scaling.varpro import basin_minima, nnls3, profile_grid

TRUTH = DataModelLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def _ladder(n: int, seed: int = 0):
    d = synthetic_points(
        TRUTH, np.geomspace(1e7, 1e10, 20), np.geomspace(1, 200, n // 20), noise=0.01, seed=seed
    )
    return d.N.to_numpy(), d.D.to_numpy(), d.loss.to_numpy()


def _dense_profile(prob, alphas, betas, irls_iters=3):
    """The grid stage as it was written first: (G, n, 3) arrays, G·n memory (reference)."""
    al, be = (x.ravel() for x in np.meshgrid(alphas, betas, indexing="ij"))
    X1 = np.exp(-al[:, None] * prob.logN[None, :])
    X2 = np.exp(-be[:, None] * prob.logD[None, :])
    s1, s2 = X1.max(axis=1), X2.max(axis=1)
    X = np.stack([np.ones_like(X1), X1 / s1[:, None], X2 / s2[:, None]], axis=-1)
    base = prob.w / prob.L**2
    omega = np.broadcast_to(base, X1.shape)
    for _ in range(irls_iters):
        Xw = X * omega[:, :, None]
        M = np.matmul(Xw.transpose(0, 2, 1), X)
        v = np.matmul(Xw.transpose(0, 2, 1), prob.L[:, None])[:, :, 0]
        c = nnls3(M, v)
        pred = np.matmul(X, c[:, :, None])[:, :, 0]
        r = np.log(np.maximum(pred, 1e-300)) - prob.logL
        omega = base * np.minimum(1.0, prob.delta / np.maximum(np.abs(r), 1e-300))
    f = (prob.w * huber(r, prob.delta)).sum(axis=1)
    return f, np.stack([c[:, 0], c[:, 1] / s1, c[:, 2] / s2], axis=1)


def _problem(N, D, L, weights=None):
    prob = _Problem(N, D, L, weights, 1e-3)
    prob.w = prob.w / prob.w.sum()
    return prob


@pytest.mark.parametrize("chunk", [1, 700, 1 << 19])
def test_blocked_grid_equals_the_dense_computation(chunk):
    rng = np.random.default_rng(1)
    N, D, L = _ladder(300)
    prob = _problem(N, D, L, rng.integers(0, 4, len(L)).astype(float))  # bootstrap-like counts
    alphas, betas = np.linspace(0.02, 1.5, 9), np.linspace(0.02, 1.5, 7)  # not square
    f0, c0 = _dense_profile(prob, alphas, betas)
    f, al, be, c = profile_grid(
        prob.logN, prob.logD, prob.L, prob.w, 1e-3, alphas, betas, chunk=chunk
    )
    assert np.allclose(f, f0, rtol=1e-9, atol=0)
    assert np.allclose(c, c0, rtol=1e-7, atol=1e-12 * np.abs(c0).max())
    assert np.array_equal(al, np.repeat(alphas, 7)) and np.array_equal(be, np.tile(betas, 9))


def test_masked_grid_evaluates_its_cells_alone():
    N, D, L = _ladder(400)
    prob = _problem(N, D, L)
    alphas, betas = FAST_GRID
    full = profile_grid(prob.logN, prob.logD, prob.L, prob.w, 1e-3, alphas, betas)[0]
    cells = np.zeros((14, 14), dtype=bool)
    cells[3, [2, 5]] = cells[9, 11] = True
    f = profile_grid(prob.logN, prob.logD, prob.L, prob.w, 1e-3, alphas, betas, cells=cells)[0]
    done = np.isfinite(f).reshape(14, 14)
    assert done[cells].all()
    assert done.sum() == 5  # per α, the span of its cells: (3, 2…5) and (9, 11)
    assert np.allclose(f[done.ravel()], full[done.ravel()], rtol=1e-12)
    # the basins of a masked grid are among the evaluated cells
    picks = basin_minima(f, (14, 14), 4)
    assert all(np.isfinite(f[i]) for i in picks)


def test_grid_stage_memory_is_bounded_whatever_the_number_of_points():
    # the dense grid stage held G·n·3 floats: 38·38 × 20,000 × 3 × 8 B = 693 MB here
    N, D, L = _ladder(20_000)
    prob = _problem(N, D, L)
    tracemalloc.start()
    with single_threaded_blas():
        profile_grid(prob.logN, prob.logD, prob.L, prob.w, 1e-3, *DEFAULT_GRID)
    grid_peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    # per-exponent powers (2 × 38 × n floats = 12 MB) + a few 2 MiB blocks
    assert grid_peak < 40, f"grid stage peak {grid_peak:.0f} MB"
    tracemalloc.start()
    fit = fit_points(N, D, L)
    fit_peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    assert fit_peak < 60, f"fit peak {fit_peak:.0f} MB"
    print(f"grid stage {grid_peak:.1f} MB, fit {fit_peak:.1f} MB at {len(L)} points")
    assert fit.alpha == pytest.approx(TRUTH.alpha, rel=0.02)
    assert fit.beta == pytest.approx(TRUTH.beta, rel=0.02)


def test_candidate_cells_hold_the_grid_optimum():
    N, D, L = _ladder(400)
    cells = candidate_cells(N, D, L, margin=1.0)
    prob = _problem(N, D, L)
    f = profile_grid(prob.logN, prob.logD, prob.L, prob.w, 1e-3, *FAST_GRID)[0].reshape(14, 14)
    assert cells[np.unravel_index(np.argmin(f), f.shape)]
    assert np.array_equal(cells, f <= 2.0 * f.min())
    assert 0 < cells.sum() < cells.size


def test_group_close_chains_sorted_values():
    x = np.log(np.array([1.0, 1.0005, 1.0009, 2.0, 1.0014, 2.0, 3.0]))
    # 1.0014 is within 1e-3 of 1.0009 (chained), 2.0 twice, 3.0 alone
    assert _group_close(x, 1e-3).tolist() == [0, 0, 0, 1, 0, 1, 2]
    assert _group_close(np.log(np.repeat([5.0, 1.0, 3.0], 2)), 1e-3).tolist() == [2, 2, 0, 0, 1, 1]


def test_a_cell_mask_must_fit_the_grid():
    N, D, L = _ladder(400)
    with pytest.raises(InputError, match="mask"):
        fit_points(N, D, L, grid="fast", cells=np.zeros((14, 14), dtype=bool))
    with pytest.raises(InputError, match="mask"):
        fit_points(N, D, L, grid="fast", cells=np.ones((38, 38), dtype=bool))
    one = np.zeros((14, 14), dtype=bool)
    one[4, 3] = True  # α ≈ 0.47, β ≈ 0.36: far from the truth, polished to it all the same
    fit = fit_points(N, D, L, grid="fast", cells=one)
    assert fit.n_starts == 1
    assert fit.alpha == pytest.approx(TRUTH.alpha, rel=0.02)
