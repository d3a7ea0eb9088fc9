"""The fitter's global stage: variable projection of ``L = E + A/N^α + B/D^β`` on an exponent grid.

For fixed ``(α, β)`` the law is linear in ``(E, A, B)``: those come from non-negative least
squares on relative residuals, re-weighted a few times (IRLS) towards the Huber objective on log
residuals. The 3-column NNLS is solved exactly and vectorized over the grid by enumerating the
active sets.

Cost: time linear in the number of points n, memory bounded. The powers ``N^-α`` and ``D^-β``
are computed once per exponent (``(len(α) + len(β))·n`` numbers), never per grid point; the first
least-squares pass has one weight per point for the whole grid, so its normal equations are
matrix products of those powers. The re-weighted passes and the Huber values, which need
residuals of every grid point at every point, run over rectangles of the grid holding at most
``CHUNK_ELEMENTS`` grid-point × point values at a time (a few such arrays are alive at once).
"""

from __future__ import annotations

import itertools

import numpy as np

CHUNK_ELEMENTS = 1 << 18
"""Grid points × data points per block of the re-weighted passes: 2 MiB per float64 array (of
2^15 … 2^19, 2^17 and 2^18 were fastest at 2,500 – 20,000 points on the project's machine)."""

_SUBSETS = [s for k in (1, 2, 3) for s in itertools.combinations(range(3), k)]


def nnls3(M: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Exact NNLS for G problems with 3 unknowns, from Gram matrices ``M`` (G,3,3) and ``v``."""
    G = M.shape[0]
    best = np.zeros((G, 3))
    best_gain = np.full(G, -np.inf)
    ridge = 1e-12 * np.trace(M, axis1=1, axis2=2)
    for S in _SUBSETS:
        idx = np.array(S)
        Ms = M[:, idx][:, :, idx] + ridge[:, None, None] * np.eye(len(S))
        c = np.linalg.solve(Ms, v[:, idx, None])[:, :, 0]
        gain = np.einsum("gi,gi->g", c, v[:, idx])  # SSE = yᵀWy − gain at the LS solution
        ok = np.all(c >= 0, axis=1) & (gain > best_gain)
        if ok.any():
            full = np.zeros((G, 3))
            full[:, idx] = c
            best[ok] = full[ok]
            best_gain[ok] = gain[ok]
    return best


def _gram(
    S0: np.ndarray,
    S1: np.ndarray,
    S2: np.ndarray,
    S11: np.ndarray,
    S12: np.ndarray,
    S22: np.ndarray,
) -> np.ndarray:
    """Symmetric (…, 3, 3) matrices from the weighted sums of 1, x1, x2 and their products."""
    return np.stack(
        [np.stack([S0, S1, S2], -1), np.stack([S1, S11, S12], -1), np.stack([S2, S12, S22], -1)],
        -2,
    )


def _blocks(
    na: int, nb: int, n: int, chunk: int, cells: np.ndarray | None
) -> list[tuple[slice, slice]]:
    """Rectangles of the (na, nb) grid with at most ``chunk`` grid-point × point values each
    (at least one grid point); with ``cells`` (boolean (na, nb)), per α the span of its cells."""
    kb = min(nb, max(1, chunk // max(n, 1)))
    if cells is not None:
        out = []
        for a in np.flatnonzero(cells.any(axis=1)):
            on = np.flatnonzero(cells[a])
            out += [
                (slice(a, a + 1), slice(b, min(b + kb, on[-1] + 1)))
                for b in range(on[0], on[-1] + 1, kb)
            ]
        return out
    ka = min(na, max(1, chunk // max(kb * n, 1)))
    return [
        (slice(a, min(a + ka, na)), slice(b, min(b + kb, nb)))
        for a in range(0, na, ka)
        for b in range(0, nb, kb)
    ]


def profile_grid(
    logN: np.ndarray,
    logD: np.ndarray,
    L: np.ndarray,
    w: np.ndarray,
    delta: float,
    alphas: np.ndarray,
    betas: np.ndarray,
    *,
    cells: np.ndarray | None = None,
    irls_iters: int = 3,
    chunk: int = CHUNK_ELEMENTS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For each (α, β) of the grid the best non-negative (E, A, B) and its Huber objective.

    ``logN``, ``logD``: (centred) logs of the sizes; ``L``: losses; ``w``: per-point weights.
    ``cells``: a boolean (len(alphas), len(betas)) mask; only those cells (and, per α, the ones
    between them) are evaluated, the others get objective ``inf``. Returns ``f, al, be, coef``:
    objective, α and β of every grid point (α-major) and its ``(E, A, B)`` in the units of
    ``logN`` and ``logD``.
    """
    na, nb, n = len(alphas), len(betas), len(L)
    logL = np.log(L)
    X1 = np.exp(-alphas[:, None] * logN[None, :])  # (na, n)
    X2 = np.exp(-betas[:, None] * logD[None, :])  # (nb, n)
    s1, s2 = X1.max(axis=1), X2.max(axis=1)
    X1 /= s1[:, None]
    X2 /= s2[:, None]
    base = w / L**2  # least squares on relative residuals ≈ log residuals
    bL = base * L
    blocks = _blocks(na, nb, n, chunk, cells)
    done = np.zeros((na, nb), dtype=bool)
    for sa, sb in blocks:
        done[sa, sb] = True
    on = np.flatnonzero(done)

    # first pass: one weight per point for the whole grid, so the sums separate into products
    ones = np.ones((na, nb))
    S1 = np.broadcast_to((X1 @ base)[:, None], (na, nb))
    S11 = np.broadcast_to((X1 * X1 @ base)[:, None], (na, nb))
    S2 = np.broadcast_to((X2 @ base)[None, :], (na, nb))
    S22 = np.broadcast_to((X2 * X2 @ base)[None, :], (na, nb))
    S12 = (X1 * base) @ X2.T
    M = _gram(base.sum() * ones, S1, S2, S11, S12, S22).reshape(na * nb, 3, 3)
    v = np.stack(
        [
            float(bL.sum()) * ones,
            np.broadcast_to((X1 @ bL)[:, None], (na, nb)),
            np.broadcast_to((X2 @ bL)[None, :], (na, nb)),
        ],
        -1,
    ).reshape(na * nb, 3)
    c = np.zeros((na * nb, 3))
    c[on] = nnls3(M[on], v[on])
    cg = c.reshape(na, nb, 3)  # views of M, v and c on the grid
    Mg, vg = M.reshape(na, nb, 3, 3), v.reshape(na, nb, 3)

    size = max(((s.stop - s.start) * (t.stop - t.start) for s, t in blocks), default=0) * n
    buf = np.empty(size)  # residuals, then weights, of one block
    tmp = np.empty(size)
    lo1, lo2 = X1.min(axis=1), X2.min(axis=1)  # for a lower bound of the predictions
    bd = base * delta
    for _ in range(irls_iters - 1):
        for sa, sb in blocks:
            x1, x2 = X1[sa], X2[sb]
            P = _powers(x1, L)
            om = _log_residuals(cg[sa, sb], P, x2, logL, buf, tmp, lo1[sa], lo2[sb])
            np.abs(om, out=om)
            np.maximum(om, delta, out=om)
            np.divide(bd, om, out=om)  # Huber IRLS weights base·min(1, δ/|r|), (ka, kb, n)
            s = np.matmul(om, P.transpose(0, 2, 1))  # Σ ω·[1, x1, L, x1², L·x1], (ka, kb, 5)
            om *= x2
            t = np.matmul(om, P[:, :3].transpose(0, 2, 1))  # Σ ω·x2·[1, x1, L]
            t22 = np.vecdot(om, x2)  # Σ ω·x2²
            Mg[sa, sb] = _gram(s[..., 0], s[..., 1], t[..., 0], s[..., 3], t[..., 1], t22)
            vg[sa, sb] = np.stack([s[..., 2], s[..., 4], t[..., 2]], -1)
        c[on] = nnls3(M[on], v[on])

    f = np.full((na, nb), np.inf)
    for sa, sb in blocks:
        P = _powers(X1[sa], L)
        ar = _log_residuals(cg[sa, sb], P, X2[sb], logL, buf, tmp, lo1[sa], lo2[sb])
        np.abs(ar, out=ar)
        m = np.minimum(ar, delta, out=tmp[: ar.size].reshape(ar.shape))
        m *= 0.5
        ar -= m
        m *= 2.0
        ar *= m  # Huber: r²/2 inside |r| ≤ δ, δ·(|r| − δ/2) outside
        f[sa, sb] = ar @ w
    al, be = (x.ravel() for x in np.meshgrid(alphas, betas, indexing="ij"))
    coef = np.stack(
        [c[:, 0], c[:, 1] / np.repeat(s1, nb), c[:, 2] / np.tile(s2, na)], axis=1
    )  # E, A, B
    return f.ravel(), al, be, coef


def _powers(x1: np.ndarray, L: np.ndarray) -> np.ndarray:
    """``[1, x1, L, x1², L·x1]`` for a block's α rows, (ka, 5, n)."""
    Lb = np.broadcast_to(L, x1.shape)
    return np.stack([np.ones_like(x1), x1, Lb, x1 * x1, L * x1], 1)


def _log_residuals(
    c: np.ndarray,
    P: np.ndarray,
    x2: np.ndarray,
    logL: np.ndarray,
    buf: np.ndarray,
    tmp: np.ndarray,
    lo1: np.ndarray,
    lo2: np.ndarray,
) -> np.ndarray:
    """``log(E + A·x1 + B·x2) − log L`` for a block, in ``buf``: c (ka, kb, 3), P from
    :func:`_powers` (rows 1 and x1), x2 (kb, n); ``lo1``, ``lo2``: the rows' minima."""
    shape = (c.shape[0], c.shape[1], x2.shape[1])
    size = shape[0] * shape[1] * shape[2]
    r = buf[:size].reshape(shape)
    t = tmp[:size].reshape(shape)
    np.matmul(c[:, :, :2], P[:, :2], out=r)  # E + A·x1
    np.multiply(c[:, :, 2, None], x2, out=t)
    r += t
    lowest = c[:, :, 0] + c[:, :, 1] * lo1[:, None] + c[:, :, 2] * lo2[None, :]
    if not bool(np.all(lowest > 1e-300)):  # else the floor below changes nothing
        np.maximum(r, 1e-300, out=r)
    np.log(r, out=r)
    r -= logL
    return r


def basin_minima(f: np.ndarray, shape: tuple[int, int], k: int) -> list[int]:
    """Indices of the ``k`` best local minima of ``f`` on the exponent grid (8-neighbourhood)."""
    F = f.reshape(shape)
    P = np.pad(F, 1, constant_values=np.inf)
    is_min = np.ones(shape, dtype=bool)
    for di, dj in itertools.product((-1, 0, 1), repeat=2):
        if di or dj:
            is_min &= P[1 + di : 1 + di + shape[0], 1 + dj : 1 + dj + shape[1]] >= F
    cand = np.flatnonzero(is_min.ravel() & np.isfinite(f))
    cand = cand[np.argsort(f[cand])][:k]
    best = int(np.argmin(f))
    return [best, *[int(c) for c in cand if c != best]][:k]
