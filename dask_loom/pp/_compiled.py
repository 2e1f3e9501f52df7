"""The compiled per-block loops of :mod:`dask_loom.pp._kernels` (imported only when numba is used).

Module-level functions, so numba's on-disk cache finds them again in every
process (functions made inside a function get a new identity each time and
were compiled anew, seconds per process).  They release the GIL.
"""

import math

import numba
import numpy as np

__all__ = [
    "gram_sparse",
    "merge_dense",
    "project",
    "row_sums",
    "scatter",
    "select_fill",
    "select_scan",
    "stats",
    "small",
    "tv",
]

#: Stored values below this that are whole numbers (counts) are transformed once per row.
SMALL = 64


@numba.njit(nogil=True, cache=True, inline="always")
def tv(x, f, mode, is32, log_div, exp_mul):  # pragma: no cover - compiled
    # The transforms of scale_rows, log1p and expm1 on one value, rounded to
    # float32 after every step when the data are float32 (as numpy does).
    # mode: the flags of _kernels (1 scale, 2 log1p, 4 / log_div, 8 expm1, 16 * exp_mul).
    w = np.float64(x)
    if mode & 1:
        w = w / f
        if is32:
            w = np.float64(np.float32(w))
    if mode & 2:
        w = math.log1p(w)
        if is32:
            w = np.float64(np.float32(w))
        if mode & 4:
            w = w / log_div
            if is32:
                w = np.float64(np.float32(w))
    if mode & 8:
        if mode & 16:
            w = w * exp_mul
            if is32:
                w = np.float64(np.float32(w))
        w = math.expm1(w)
        if is32:
            w = np.float64(np.float32(w))
    return w


@numba.njit(nogil=True, cache=True, inline="always")
def small(x):  # pragma: no cover - compiled
    # Counts are mostly small whole numbers and a row has one factor: the
    # kernels transform each such number once per row (stamp[k] == r says that
    # tab[k] holds it), the same arithmetic, so the same value, for a lookup
    # instead of a division and a log1p per stored value.  -1: not one of them.
    if x >= 1 and x < SMALL:
        k = int(x)
        if k == x:
            return k
    return -1


@numba.njit(nogil=True, cache=True)
def stats(
    data, indices, indptr, groups, n_cols, clip, has_clip, fac, mode, is32, log_div, exp_mul, ss, cnt
):  # pragma: no cover - compiled
    # Adds to ss[g * n_cols + j] (sum, sum of squares) and cnt[g * n_cols + j]
    # (non-zeros).  The layout is the loop's: a value's sum and square share a
    # cache line, the counts are integers apart, and positions (q, and p: a
    # signed p cost a negative-index test on data and indices, 2.3 -> 4.5 ns
    # per value) are unsigned so numba checks no negative index per access; the
    # clip test has loops of its own.  Each of these cost 15-40 % of the loop.
    tab = np.zeros(SMALL, np.float64)
    stamp = np.full(SMALL, -1, np.int64)
    width = np.uint64(n_cols)
    for r in range(len(indptr) - 1):
        g = groups[r]
        if g < 0:
            continue
        base = np.uint64(g) * width
        f = fac[r] if mode & 1 else 1.0
        if has_clip:
            # Seurat v3's second pass (on counts): one loop for every mode.
            for p in range(np.uint64(indptr[r]), np.uint64(indptr[r + 1])):
                x = data[p]
                k = small(x) if mode else -1
                if mode == 0:
                    v = np.float64(x)
                elif k >= 0 and stamp[k] == r:
                    v = tab[k]
                else:
                    v = tv(x, f, mode, is32, log_div, exp_mul)
                    if k >= 0:
                        tab[k] = v
                        stamp[k] = r
                q = base + np.uint64(indices[p])
                nz = v != 0
                if v > clip[q]:
                    v = clip[q]
                ss[q, 0] += v
                ss[q, 1] += v * v
                cnt[q] += nz
            continue
        # The loops are written out per mode: a call per value (numba does not
        # inline across cached functions) cost three times the loop itself.
        if mode == 0:
            for p in range(np.uint64(indptr[r]), np.uint64(indptr[r + 1])):
                q = base + np.uint64(indices[p])
                v = np.float64(data[p])
                ss[q, 0] += v
                ss[q, 1] += v * v
                cnt[q] += v != 0
            continue
        # normalize_total alone (Seurat's expm1 of log1p): a division is cheaper than a lookup.
        if mode == 1 and is32:
            for p in range(np.uint64(indptr[r]), np.uint64(indptr[r + 1])):
                q = base + np.uint64(indices[p])
                v = np.float64(np.float32(data[p] / f))
                ss[q, 0] += v
                ss[q, 1] += v * v
                cnt[q] += v != 0
            continue
        if indptr[r + 1] - indptr[r] >= 4 * SMALL:
            # A long row: its table filled up front, no stamp to test per value.
            for k in range(1, SMALL):
                tab[k] = tv(np.float64(k), f, mode, is32, log_div, exp_mul)
                stamp[k] = r
            for p in range(np.uint64(indptr[r]), np.uint64(indptr[r + 1])):
                x = data[p]
                k = small(x)
                v = tab[k] if k >= 0 else tv(x, f, mode, is32, log_div, exp_mul)
                q = base + np.uint64(indices[p])
                ss[q, 0] += v
                ss[q, 1] += v * v
                cnt[q] += v != 0
            continue
        for p in range(np.uint64(indptr[r]), np.uint64(indptr[r + 1])):
            x = data[p]
            k = small(x)
            if k >= 0 and stamp[k] == r:
                v = tab[k]
            else:
                v = tv(x, f, mode, is32, log_div, exp_mul)
                if k >= 0:
                    tab[k] = v
                    stamp[k] = r
            q = base + np.uint64(indices[p])
            ss[q, 0] += v
            ss[q, 1] += v * v
            cnt[q] += v != 0


@numba.njit(nogil=True, cache=True)
def scatter(data, indices, indptr, lut, n_sel, dense, sums):  # pragma: no cover - compiled
    for r in range(len(indptr) - 1):
        for p in range(np.uint64(indptr[r]), np.uint64(indptr[r + 1])):
            k = lut[indices[p]]
            if k >= 0:
                v = data[p]
                dense[r, k] = v
                sums[k] += v


@numba.njit(nogil=True, cache=True)
def row_sums(data, indptr):  # pragma: no cover - compiled
    n = len(indptr) - 1
    out = np.zeros(n, np.float64)
    for r in range(n):
        s = 0.0
        for p in range(np.uint64(indptr[r]), np.uint64(indptr[r + 1])):
            s += data[p]
        out[r] = s
    return out


@numba.njit(nogil=True, cache=True)
def select_scan(indices, mask, base, pos):  # pragma: no cover - compiled
    # Where the selected values of a block are (their offsets from `base`), in
    # `pos`; how many.  One branch-free scan of every stored column index (most
    # are not selected): unsigned indices and a byte mask that stays in L1 make
    # it a third of a scan of signed indices through the int lookup table.
    q = 0
    for p in range(len(pos)):
        pos[q] = p
        q += mask[indices[base + p]]
    return q


@numba.njit(nogil=True, cache=True)
def select_fill(
    data, indices, indptr, pos, lut, fac, mode, is32, log_div, exp_mul, rp, ck, cv, cnt
):  # pragma: no cover - compiled
    # The selected values found by select_scan, transformed, as a compact CSR
    # (row pointers `rp`, positions `ck`, values `cv`, in the dtypes the caller
    # gave), and how many rows store each selected column (`cnt`).
    n_rows = len(indptr) - 1
    q = len(ck)
    base = indptr[0]
    t = 0
    for r in range(n_rows):
        end = indptr[r + 1] - base
        while t < q and pos[t] < end:
            t += 1
        rp[r + 1] = t
    tab = np.zeros(SMALL, np.float64)
    stamp = np.full(SMALL, -1, np.int64)
    for r in range(n_rows):
        f = fac[r] if mode & 1 else 1.0
        for t in range(np.uint64(rp[r]), np.uint64(rp[r + 1])):
            p = np.uint64(base + pos[t])
            k = lut[indices[p]]
            cnt[k] += 1
            ck[t] = k
            x = data[p]
            if mode == 0:
                cv[t] = x
                continue
            kk = small(x)
            if kk >= 0 and stamp[kk] == r:
                cv[t] = tab[kk]
                continue
            if mode == 3 and is32:  # normalize_total then log1p (PCA's input), written out
                w = np.float64(np.float32(math.log1p(np.float32(x / f))))
            else:
                w = tv(x, f, mode, is32, log_div, exp_mul)
            cv[t] = w
            if kk >= 0:
                tab[kk] = w
                stamp[kk] = r


@numba.njit(nogil=True, cache=True)
def gram_sparse(rp, ck, cv, cnt, hpos, hcols, dense, upper, sums):  # pragma: no cover - compiled
    # Values of the dense columns go to `dense` (one BLAS product later).  The
    # other products are summed column by column (Gustavson's order): for each
    # sparse column i, every row r storing it adds v_ri times the rest of row r
    # (the columns from i on, so each pair once) into a small accumulator that
    # stays in cache, then one contiguous row of `upper`.  The accumulators are
    # in `dense`'s dtype (float32 for float32 data, as the BLAS part).  Positions
    # are unsigned (no negative-index test per access): 17 % of the kernel.
    n_rows = len(rp) - 1
    n_sel = len(sums)
    h = len(hcols)
    vt = dense.dtype
    col_ptr = np.zeros(n_sel + 1, np.int64)
    for k in range(n_sel):
        col_ptr[k + 1] = col_ptr[k] + (cnt[k] if hpos[k] < 0 else 0)
    n_l = col_ptr[n_sel]
    # The sparse entries column by column (crow, cval) and row by row (sk, sv):
    # one pass, since the selected positions ascend within a row.
    crow = np.empty(n_l, np.int32)
    cval = np.empty(n_l, vt)
    sk = np.empty(n_l, np.int32)
    sv = np.empty(n_l, vt)
    srp = np.zeros(n_rows + 1, np.int64)
    fill = col_ptr[:n_sel].copy()
    m = 0
    for r in range(n_rows):
        for q in range(np.uint64(rp[r]), np.uint64(rp[r + 1])):
            k = ck[q]
            v = cv[q]
            sums[k] += v
            t = hpos[k]
            if t >= 0:
                dense[r, t] = v
            else:
                f = fill[k]
                crow[f] = r
                cval[f] = v
                fill[k] = f + 1
                sk[m] = k
                sv[m] = v
                m += 1
        srp[r + 1] = m
    ptr = srp[:n_rows].copy()
    acc = np.zeros(n_sel, vt)
    acch = np.zeros(h, vt)
    for i in range(n_sel):
        q0 = col_ptr[i]
        q1 = col_ptr[i + 1]
        if q0 == q1:
            continue
        for q in range(np.uint64(q0), np.uint64(q1)):
            r = crow[q]
            vi = cval[q]
            p0 = ptr[r]  # row r's entry of column i: the columns before i are done
            ptr[r] = p0 + 1
            for p in range(np.uint64(p0), np.uint64(srp[r + 1])):
                acc[np.uint64(sk[p])] += vi * sv[p]
            d = dense[r]  # a row view: the loop below is vectorised
            for t in range(h):
                acch[t] += vi * d[t]
        for j in range(i, n_sel):
            upper[i, j] += acc[j]
            acc[j] = 0.0
        # Products with the dense columns go to row i too (either triangle): each
        # pair is stored once, and the writes stay in one row.
        for t in range(h):
            upper[i, hcols[t]] += acch[t]
            acch[t] = 0.0


@numba.njit(nogil=True, cache=True)
def merge_dense(upper, hh, hcols):  # pragma: no cover - compiled
    for a in range(len(hcols)):
        i = hcols[a]
        for b in range(a, len(hcols)):
            upper[i, hcols[b]] += hh[a, b]


@numba.njit(nogil=True, cache=True)
def project(rp, ck, cv, comps_t):  # pragma: no cover - compiled
    # Each row is summed in a small accumulator (in L1 while the row's values
    # are read), then stored once: the same additions in the same order.
    n_rows = len(rp) - 1
    n_c = comps_t.shape[1]
    out = np.zeros((n_rows, n_c), np.float64)
    acc = np.zeros(n_c, np.float64)
    for r in range(n_rows):
        for q in range(np.uint64(rp[r]), np.uint64(rp[r + 1])):
            w = cv[q]
            c = comps_t[ck[q]]
            for j in range(n_c):
                acc[j] += w * c[j]
        for j in range(n_c):
            out[r, j] = acc[j]
            acc[j] = 0.0
    return out
