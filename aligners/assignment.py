"""Linear assignment ``argmax_sigma sum_i S[i, sigma(i)]``: scipy, lapx, or our warm-startable exact "jv" solver.

The "jv" backend is a shortest-augmenting-path (Hungarian / Jonker-Volgenant) solver with dual potentials, in the
form of Crouse (2016), "On implementing 2D rectangular assignment algorithms", preceded by the column reduction
and augmenting row reduction of Jonker & Volgenant (1987), written in numba.  In score (maximisation) form it
keeps row potentials ``f`` and column potentials ``g`` with

    slack  r_ij = f_i + g_j - S_ij >= 0  for every (i, j),      r_{i, sigma(i)} = 0  on the assignment,

so ``sum_i S[i, sigma(i)] = sum_i f_i + sum_j g_j`` and, by LP duality, sigma is optimal (exactly, up to float
round-off in the potentials, as in every floating-point LAP solver).

Warm start (:func:`solve_warm`): weight matching solves many LAPs whose score matrices change little between calls.
Given the new score and the previous ``(sigma, g)``: ``f_i = max_j (S_ij - g_j)`` makes ``(f, g)`` dual feasible
for the new matrix; row i keeps its previous column when that edge is still tight, i.e. its slack
``e_i = f_i - (S_i,sigma(i) - g_sigma(i))`` is zero up to ``rtol`` times the magnitude of the terms (round-off of
the previous solve; ``rtol=0`` demands exact float equality); the other rows take their argmax column if it is
still free, or stay free.  Free rows are then placed by augmenting row reduction and Dijkstra on the slacks.
Only rows whose preferred column changed cost anything, so re-solving a slightly perturbed matrix is far cheaper
than a cold solve.  A kept edge with slack ``e_i > 0`` is treated as tight, so the returned assignment is optimal
to within ``sum_i e_i <= n * rtol * scale``: round-off level, far below any difference between assignments of
generic real data (tests check the optimum value against scipy's to 1e-9 relative).
"""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numba import njit, types
from numba.extending import intrinsic
from scipy.optimize import linear_sum_assignment

log = logging.getLogger(__name__)

BACKENDS = ("auto", "scipy", "lapx", "jv")

#: backend that "auto" resolves to: the fastest exact cold solver measured here (experiments/bench_assignment.py)
AUTO_BACKEND = "jv"

#: default relative tolerance for keeping a previous edge in a warm start (round-off of the previous duals)
WARM_RTOL = 1e-12


def lapx_available() -> bool:
    """Whether the optional ``lap`` module (package lapx) is importable."""
    return importlib.util.find_spec("lap") is not None


#: below this size "auto" uses scipy: every solver takes well under a millisecond there, while the first jv call
#: of a process spends about 0.35 s loading numba's compiled cache
JV_MIN_N = 512


def resolve_backend(backend: str = "auto", n: int | None = None) -> str:
    """Concrete backend name for ``backend`` (for ``n x n`` problems if given); ValueError for unknown names or a
    missing lapx."""
    if backend not in BACKENDS:
        raise ValueError(f"linear-assignment backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "scipy" if n is not None and n < JV_MIN_N else AUTO_BACKEND
    if backend == "lapx" and not lapx_available():
        raise ValueError("backend 'lapx' requested but the lapx package is not installed")
    return backend


# ---------------------------------------------------------------------------------------------------------------
# numba kernels.  Score (maximisation) form, t_ij = S_ij - g_j; all arithmetic in float64 whatever S's dtype.
# ---------------------------------------------------------------------------------------------------------------

_SIGN_OFF = np.int64(0x7FFFFFFFFFFFFFFF)
_EXP_MASK = np.int64(0x7FF0000000000000)
_KEY_MIN = np.int64(-0x7FFFFFFFFFFFFFFF - 1)


@intrinsic
def _bits(typingctx, x):  # pragma: no cover - compiled
    """Reinterpret a float64 as int64 (no conversion)."""
    sig = types.int64(types.float64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.int64))

    return sig, codegen


@intrinsic
def _float(typingctx, x):  # pragma: no cover - compiled
    """Reinterpret an int64 as float64 (inverse of :func:`_bits`)."""
    sig = types.float64(types.int64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float64))

    return sig, codegen


@njit(inline="always")
def _key(b):  # pragma: no cover - compiled
    """Monotone map of float64 bits to int64: ``x < y  <=>  key(x) < key(y)`` for non-NaN x, y (involution)."""
    return b ^ ((b >> 63) & _SIGN_OFF)


@njit(cache=True, nogil=True)
def _all_finite(s):  # pragma: no cover - compiled
    """True iff every entry of the 2-D array ``s`` is finite (vectorised integer test of the exponent bits)."""
    m = np.int64(0)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            e = _bits(np.float64(s[i, j])) & _EXP_MASK
            m = e if e > m else m
    return m != _EXP_MASK


#: chunk length of the vectorised scans (per-chunk extrema let argmin/argmax searches skip whole chunks)
_CHUNK = 64


@njit(inline="always")
def _chunk_max_t(s, g, i, a):  # pragma: no cover - compiled
    """max over j in [a, a + _CHUNK) of key(t_ij) and of the exponent bits (constant trip count: vectorises)."""
    kmax = _KEY_MIN
    emax = np.int64(0)
    for j in range(a, a + _CHUNK):
        b = _bits(np.float64(s[i, j]) - g[j])
        k = _key(b)
        kmax = k if k > kmax else kmax
        e = b & _EXP_MASK
        emax = e if e > emax else emax
    return kmax, emax


@njit(cache=True, nogil=True)
def _row_top(s, g, i, cmax, second):  # pragma: no cover - compiled
    """Largest (and with ``second`` the second largest) ``t_ij = S_ij - g_j`` over j, in key form.

    Returns ``(k1, j1, k2, emax)``: key of the max, its first column, key of the max over the other columns
    (``_KEY_MIN`` if none or not asked for) and the max exponent bits seen (``_EXP_MASK`` flags a NaN or Inf).
    """
    n = s.shape[1]
    nfull = n // _CHUNK
    nch = nfull + (1 if nfull * _CHUNK < n else 0)
    k1 = _KEY_MIN
    emax = np.int64(0)
    for c in range(nfull):
        km, em = _chunk_max_t(s, g, i, c * _CHUNK)
        cmax[c] = km
        k1 = km if km > k1 else k1
        emax = em if em > emax else emax
    if nfull < nch:
        km = _KEY_MIN
        for j in range(nfull * _CHUNK, n):
            b = _bits(np.float64(s[i, j]) - g[j])
            k = _key(b)
            km = k if k > km else km
            e = b & _EXP_MASK
            emax = e if e > emax else emax
        cmax[nfull] = km
        k1 = km if km > k1 else k1
    j1 = -1
    c1 = -1
    for c in range(nch):
        if cmax[c] == k1:
            c1 = c
            for j in range(c * _CHUNK, min(n, c * _CHUNK + _CHUNK)):
                if _key(_bits(np.float64(s[i, j]) - g[j])) == k1:
                    j1 = j
                    break
            break
    k2 = _KEY_MIN
    if second:
        for c in range(nch):
            if c != c1 and cmax[c] > k2:
                k2 = cmax[c]
        for j in range(c1 * _CHUNK, min(n, c1 * _CHUNK + _CHUNK)):
            if j != j1:
                k = _key(_bits(np.float64(s[i, j]) - g[j]))
                k2 = k if k > k2 else k2
    return k1, j1, k2, emax


@njit(cache=True, nogil=True)
def _init(s, g, prev, cold, rtol, col4row, row4col, f, free_rows):  # pragma: no cover - compiled
    """Dual-feasible start and a matching of (near-)tight edges; returns the number of free rows, -1 on NaN/Inf.

    cold: ``g_j = max_i S_ij`` (column reduction), otherwise ``g`` is the previous solve's.  With
    ``T_i = max_j t_ij``, row i keeps ``prev[i] = p`` when ``T_i - t_ip <= rtol * (|S_ip| + |g_p| + |T_i|)`` and p
    is unclaimed (then ``f_i = t_ip``); rows left over take their first argmax column if it is unclaimed
    (``f_i = T_i``), or are listed in ``free_rows``.
    """
    n = s.shape[0]
    if cold:
        emax = np.int64(0)
        for j in range(n):
            g[j] = np.float64(s[0, j])
        for i in range(n):
            for j in range(n):
                x = np.float64(s[i, j])
                e = _bits(x) & _EXP_MASK
                emax = e if e > emax else emax
                gj = g[j]
                g[j] = x if x > gj else gj
        if emax == _EXP_MASK:
            return -1
    for j in range(n):
        row4col[j] = -1
    cmax = np.empty(n // _CHUNK + 1, dtype=np.int64)
    best_col = np.empty(n, dtype=np.int64)
    n_free = 0
    for i in range(n):
        k1, j1, _, emax = _row_top(s, g, i, cmax, False)
        if emax == _EXP_MASK:
            return -1
        best = _float(_key(k1))
        col4row[i] = -1
        best_col[i] = j1
        f[i] = best
        if not cold:
            p = prev[i]
            if p >= 0 and p != j1 and row4col[p] == -1:
                sp = np.float64(s[i, p])
                tp = sp - g[p]
                if best - tp <= rtol * (abs(sp) + abs(g[p]) + abs(best)):
                    col4row[i] = p
                    row4col[p] = i
                    f[i] = tp
            elif p == j1 and row4col[p] == -1:
                col4row[i] = p
                row4col[p] = i
    for i in range(n):
        if col4row[i] != -1:
            continue
        a = best_col[i]
        if row4col[a] == -1:
            col4row[i] = a
            row4col[a] = i
        else:
            free_rows[n_free] = i
            n_free += 1
    return n_free


#: augmenting row reduction stops pushing displaced rows after this many steps per row (then Dijkstra places the
#: rest); without a budget it took over 600 steps per row (0.9 s at n=2048) on some weight-matching scores
_ARR_BUDGET = 4


@njit(cache=True, nogil=True)
def _arr(s, g, f, col4row, row4col, free_rows, n_free, stats):  # pragma: no cover - compiled
    """Augmenting row reduction (Jonker & Volgenant 1987), score form; returns the new number of free rows.

    A free row i with best and second-best ``t1 = t_i,j1 >= t2`` takes j1 and raises ``g_j1`` by ``t1 - t2``
    (so ``f_i = t2``: tight on j1 and j2; raising g keeps every slack >= 0); j1's previous row becomes free and,
    when g did rise, is processed next.  On a tie (t1 == t2) the row takes a tied column j2 if j1 is taken.
    """
    n = s.shape[0]
    cmax = np.empty(n // _CHUNK + 1, dtype=np.int64)
    current = 0
    new_free = 0
    rr_cnt = 0
    while current < n_free:
        rr_cnt += 1
        i = free_rows[current]
        current += 1
        k1, j1, k2, _ = _row_top(s, g, i, cmax, True)
        t1 = _float(_key(k1))
        t2 = _float(_key(k2))
        i0 = row4col[j1]
        g1 = g[j1] + (t1 - t2)
        raises = g1 > g[j1]
        if rr_cnt < current * n and rr_cnt < _ARR_BUDGET * n:
            if raises:
                g[j1] = g1
            elif i0 >= 0:
                # tie t1 == t2: another column achieves the max; prefer a free one
                j2 = -1
                for j in range(n):
                    if j != j1 and _key(_bits(np.float64(s[i, j]) - g[j])) == k2:
                        if row4col[j] == -1:
                            j2 = j
                            break
                        if j2 == -1:
                            j2 = j
                j1 = j2
                i0 = row4col[j2]
            if i0 >= 0:
                col4row[i0] = -1
                if raises:
                    current -= 1
                    free_rows[current] = i0
                else:
                    free_rows[new_free] = i0
                    new_free += 1
        elif i0 >= 0:
            col4row[i0] = -1
            free_rows[new_free] = i0
            new_free += 1
        col4row[i] = j1
        row4col[j1] = i
        f[i] = np.float64(s[i, j1]) - g[j1]
    stats[3] += rr_cnt
    return new_free


@njit(inline="always")
def _chunk_min(dist, a):  # pragma: no cover - compiled
    """min over j in [a, a + _CHUNK) of key(dist_j) (constant trip count: vectorises)."""
    lo = _SIGN_OFF
    for j in range(a, a + _CHUNK):
        k = _key(_bits(dist[j]))
        lo = k if k < lo else lo
    return lo


@njit(cache=True, nogil=True)
def _augment(s, f, g, col4row, row4col, cur_row, dist, path, scanned, dscan, gsave, cmin):  # pragma: no cover
    """Dijkstra on the slacks from free row ``cur_row``, dual update, augmentation; returns the columns scanned.

    ``dist[j]`` is the shortest alternating-path slack from ``cur_row`` (taken with ``f_cur = 0``) to column j;
    the search settles columns in lexicographic (dist, taken, index) order and stops at the first free one (the
    sink, distance d).  Settled columns get ``g_j += d - dist_j`` and their rows ``f_i -= d - dist_j``, and
    ``f_cur = -d``: every slack stays >= 0 and the path becomes tight, so flipping it keeps complementary slackness.
    Settled columns are parked with ``g_j = dist_j = +inf`` so the scan loops need no "done" test.
    """
    n = s.shape[0]
    nfull = n // _CHUNK
    nch = nfull + (1 if nfull * _CHUNK < n else 0)
    n_scanned = 0
    min_val = 0.0
    f[cur_row] = 0.0
    i = cur_row
    sink = -1
    first = True
    while sink == -1:
        base = min_val + f[i]
        if first:
            for j in range(n):
                dist[j] = base - (np.float64(s[i, j]) - g[j])
                path[j] = i
            first = False
        else:
            for j in range(n):
                r = base - (np.float64(s[i, j]) - g[j])
                d = dist[j]
                m = r < d
                dist[j] = r if m else d
                path[j] = i if m else path[j]
        glo = _SIGN_OFF
        for c in range(nfull):
            lo = _chunk_min(dist, c * _CHUNK)
            cmin[c] = lo
            glo = lo if lo < glo else glo
        if nfull < nch:
            lo = _SIGN_OFF
            for j in range(nfull * _CHUNK, n):
                k = _key(_bits(dist[j]))
                lo = k if k < lo else lo
            cmin[nfull] = lo
            glo = lo if lo < glo else glo
        # first free column at the minimum distance, else the first column there
        index = -1
        for c in range(nch):
            if cmin[c] != glo:
                continue
            for j in range(c * _CHUNK, min(n, c * _CHUNK + _CHUNK)):
                if _key(_bits(dist[j])) == glo:
                    if row4col[j] == -1:
                        index = j
                        break
                    if index == -1:
                        index = j
            if row4col[index] == -1:
                break
        min_val = dist[index]
        scanned[n_scanned] = index
        dscan[n_scanned] = min_val
        gsave[n_scanned] = g[index]
        g[index] = np.inf
        dist[index] = np.inf
        n_scanned += 1
        if row4col[index] == -1:
            sink = index
        else:
            i = row4col[index]
    f[cur_row] -= min_val
    for k in range(n_scanned):
        j = scanned[k]
        delta = min_val - dscan[k]
        g[j] = gsave[k] + delta
        if j != sink:
            f[row4col[j]] -= delta
    j = sink
    while True:
        i = path[j]
        row4col[j] = i
        nxt = col4row[i]
        col4row[i] = j
        j = nxt
        if i == cur_row:
            break
    return n_scanned


@njit(cache=True, nogil=True)
def _solve_one(s, g, prev, cold, rtol, col4row, f, stats, arr_passes):  # pragma: no cover - compiled
    """Exact maximum-score assignment of the square ``s`` into ``col4row``, with duals ``f``, ``g``.

    ``stats`` receives (free rows after init, free rows after row reduction, columns scanned by Dijkstra,
    row-reduction steps).  Returns False (outputs undefined) if ``s`` has a NaN or an infinite entry.
    """
    n = s.shape[0]
    row4col = np.empty(n, dtype=np.int64)
    free_rows = np.empty(n, dtype=np.int64)
    n_free = _init(s, g, prev, cold, rtol, col4row, row4col, f, free_rows)
    if n_free < 0:
        return False
    stats[0] = n_free
    stats[3] = 0
    if n > 1:
        for _ in range(arr_passes):
            if n_free > 0:
                n_free = _arr(s, g, f, col4row, row4col, free_rows, n_free, stats)
    stats[1] = n_free
    dist = np.empty(n, dtype=np.float64)
    path = np.empty(n, dtype=np.int64)
    scanned = np.empty(n, dtype=np.int64)
    dscan = np.empty(n, dtype=np.float64)
    gsave = np.empty(n, dtype=np.float64)
    cmin = np.empty(n // _CHUNK + 1, dtype=np.int64)
    total = 0
    for k in range(n_free):
        total += _augment(s, f, g, col4row, row4col, free_rows[k], dist, path, scanned, dscan, gsave, cmin)
    stats[2] = total
    return True


@njit(cache=True, nogil=True)
def _solve_batch(s, g, prev, cold, rtol, col4row, f, stats, arr_passes):  # pragma: no cover - compiled
    """:func:`_solve_one` over the leading axis of ``s`` (b, n, n); returns the first entry with NaN/Inf, or -1."""
    for k in range(s.shape[0]):
        if not _solve_one(s[k], g[k], prev[k], cold, rtol, col4row[k], f[k], stats[k], arr_passes):
            return k
    return -1


# ---------------------------------------------------------------------------------------------------------------
# Python API
# ---------------------------------------------------------------------------------------------------------------

#: below this size the augmenting row reduction costs more than it saves (measured, experiments/bench_assignment.py)
_ARR_MIN_N = 1024

ScoreLike = torch.Tensor | np.ndarray


@dataclass(frozen=True, eq=False)
class AssignmentState:
    """Solution and dual certificate of a batch of maximum-score assignments (input to the next warm start).

    ``sigma[..., i]`` is the column of row i; ``row_dual`` f and ``col_dual`` g (float64, shape ``(*batch, n)``)
    satisfy ``f_i + g_j >= S_ij`` for all (i, j) with equality at ``j = sigma[i]``, up to round-off (and up to the
    warm-start tolerance on kept edges), so ``sum(f) + sum(g) - sum_i S[i, sigma(i)]`` bounds the gap to the
    optimum.  ``stats[..., :]`` = (free rows after the start, free rows after row reduction, columns scanned by
    Dijkstra, row-reduction steps): the work done, for diagnostics.
    """

    sigma: np.ndarray
    row_dual: np.ndarray
    col_dual: np.ndarray
    stats: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        """``(*batch, n)``."""
        return tuple(self.sigma.shape)


def _check_square(shape: tuple[int, ...]) -> None:
    if len(shape) < 2 or shape[-1] != shape[-2]:
        raise ValueError(f"linear assignment needs square score matrices, got shape {tuple(shape)}")


def _as_numpy(score: ScoreLike) -> np.ndarray:
    """C-contiguous float32/float64 numpy view of ``score`` (copies only for other dtypes, layouts or devices)."""
    if isinstance(score, torch.Tensor):
        t = score.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if t.dtype not in (torch.float32, torch.float64):
            t = t.to(torch.float64)
        arr = t.numpy()
    else:
        arr = np.asarray(score)
        if arr.dtype not in (np.float32, np.float64) or not arr.dtype.isnative:
            arr = arr.astype(np.float64)
    return np.ascontiguousarray(arr)


def _not_finite() -> ValueError:
    return ValueError("linear assignment score contains NaN or Inf")


def _jv_batch(flat: np.ndarray, state: AssignmentState | None, rtol: float) -> AssignmentState:
    """Solve every matrix of ``flat`` (b, n, n); warm from ``state`` (same (b, n) layout) when given."""
    b, n = flat.shape[0], flat.shape[-1]
    sigma = np.empty((b, n), dtype=np.int64)
    f = np.empty((b, n), dtype=np.float64)
    stats = np.zeros((b, 4), dtype=np.int64)
    if state is None:
        g = np.empty((b, n), dtype=np.float64)
        prev = np.full((b, n), -1, dtype=np.int64)
    else:
        g = np.array(state.col_dual, dtype=np.float64).reshape(b, n)
        prev = np.ascontiguousarray(state.sigma, dtype=np.int64).reshape(b, n)
        if g.size and not (np.isfinite(g).all() and prev.min() >= -1 and prev.max() < n):
            raise ValueError("warm-start state is corrupt: non-finite duals or column indices out of range")
    arr_passes = 1 if n >= _ARR_MIN_N else 0
    if b and n and _solve_batch(flat, g, prev, state is None, float(rtol), sigma, f, stats, arr_passes) >= 0:
        raise _not_finite()
    return AssignmentState(sigma=sigma, row_dual=f, col_dual=g, stats=stats)


def solve_warm(
    score: ScoreLike, state: AssignmentState | None = None, *, rtol: float = WARM_RTOL
) -> tuple[ScoreLike, AssignmentState]:
    """Exact ``sigma = argmax_sigma sum_i score[..., i, sigma[i]]`` warm-started from a previous solve's state.

    ``score``: (*batch, n, n) tensor or array (float32 and float64 are read in place, other dtypes converted).
    ``state``: the :class:`AssignmentState` returned by the previous call for matrices of the same shape (one per
    batch entry), or None for a cold solve.  Returns ``(sigma, new_state)``; sigma is an int64 tensor when
    ``score`` is a tensor, else an array, of shape ``score.shape[:-1]``.  The state is not modified.

    ``rtol``: a previous edge is kept when its slack under the new score is at most ``rtol`` times the magnitude
    of the terms (absorbing the round-off of the previous duals); the result is then optimal to within
    ``n * rtol * max|terms|``.  ``rtol=0`` keeps only edges that are tight in exact float comparison.
    """
    _check_square(tuple(score.shape))
    if rtol < 0:
        raise ValueError(f"rtol must be >= 0, got {rtol}")
    arr = _as_numpy(score)
    n = arr.shape[-1]
    flat = arr.reshape(math.prod(arr.shape[:-2]), n, n)
    if state is not None and state.shape != tuple(arr.shape[:-1]):
        raise ValueError(f"warm-start state has shape {state.shape}, scores need {tuple(arr.shape[:-1])}")
    new = _jv_batch(flat, state, rtol)
    new = AssignmentState(
        sigma=new.sigma.reshape(arr.shape[:-1]),
        row_dual=new.row_dual.reshape(arr.shape[:-1]),
        col_dual=new.col_dual.reshape(arr.shape[:-1]),
        stats=new.stats.reshape(*arr.shape[:-2], 4),
    )
    if log.isEnabledFor(logging.DEBUG):
        work = new.stats.reshape(-1, 4).sum(0)
        msg = "jv %s solve %s: %d free rows, %d after row reduction, %d Dijkstra scans, %d row-reduction steps"
        log.debug(msg, "warm" if state else "cold", tuple(arr.shape), *work)
    sigma = new.sigma.copy()
    return (torch.from_numpy(sigma) if isinstance(score, torch.Tensor) else sigma), new


class WarmAssignment:
    """Keeps the last :class:`AssignmentState` per key, so repeated solves of one factor start warm.

    ``solve(score, key)`` re-solves warm from the state stored under ``key`` when its shape matches the score's,
    cold otherwise, and stores the new state.
    """

    def __init__(self, rtol: float = WARM_RTOL) -> None:
        self.rtol = rtol
        self.states: dict[Any, AssignmentState] = {}

    def solve(self, score: ScoreLike, key: Any = None) -> ScoreLike:
        """Gather index maximising ``sum_i score[..., i, sigma[i]]`` (see :func:`solve_warm`)."""
        prev = self.states.get(key)
        if prev is not None and prev.shape != tuple(score.shape[:-1]):
            prev = None
        sigma, self.states[key] = solve_warm(score, prev, rtol=self.rtol)
        return sigma

    def reset(self, key: Any = None) -> None:
        """Forget the state under ``key``."""
        self.states.pop(key, None)


def _solve_other(score: np.ndarray, backend: str) -> np.ndarray:
    if backend == "lapx":
        import lap

        # lapjv minimises cost; maximise the score by negating it
        _, col_of_row, _ = lap.lapjv(-score, extend_cost=False)
        return np.asarray(col_of_row, dtype=np.int64)
    rows, cols = linear_sum_assignment(score, maximize=True)
    out = np.empty(score.shape[0], dtype=np.int64)
    out[rows] = cols
    return out


def linear_assignment(score: ScoreLike, backend: str = "auto") -> ScoreLike:
    """Gather index ``sigma`` maximising ``sum_i score[i, sigma[i]]``; batched over leading axes.

    Backends: "jv" (ours, see :func:`solve_warm`), "scipy" (``linear_sum_assignment``), "lapx" (``lap.lapjv``);
    "auto" is :data:`AUTO_BACKEND`.  All are exact, so they reach the same optimum value (the argmax may differ
    on ties).  Non-square or non-finite scores raise ValueError.  Returns an int64 tensor for a tensor input,
    else an array, of shape ``score.shape[:-1]``.
    """
    _check_square(tuple(score.shape))
    name = resolve_backend(backend, score.shape[-1])
    if name == "jv":
        sigma, _ = solve_warm(score)
        return sigma
    arr = _as_numpy(score)
    n = arr.shape[-1]
    flat = arr.reshape(math.prod(arr.shape[:-2]), n, n)
    if not bool(np.isfinite(flat).all()):
        raise _not_finite()
    flat64 = flat.astype(np.float64, copy=False)
    out = np.stack([_solve_other(s, name) for s in flat64]) if flat.shape[0] else np.empty((0, n), np.int64)
    out = out.reshape(arr.shape[:-1])
    return torch.from_numpy(out) if isinstance(score, torch.Tensor) else out


def assignment_value(score: ScoreLike, sigma: ScoreLike) -> ScoreLike:
    """``sum_i score[..., i, sigma[..., i]]``."""
    if isinstance(score, torch.Tensor):
        return score.gather(-1, torch.as_tensor(sigma).unsqueeze(-1)).squeeze(-1).sum(-1)
    return np.take_along_axis(np.asarray(score), np.asarray(sigma)[..., None], axis=-1)[..., 0].sum(-1)
