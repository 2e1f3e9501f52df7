"""Planning byte-range requests: which ranges to merge, where to cut, how much hole to read through.

Pure functions of offsets and sizes (no file, no store), shared by the local
and remote HDF5 readers and the chunk-index reads.
"""

from __future__ import annotations

import itertools
from typing import Any

__all__ = ["coalesce", "coalesce_plan", "gap_within", "parse_nbytes"]


def coalesce(starts: list[int], sizes: list[int], gap: int) -> list[tuple[int, int, list[int]]]:
    """Group byte ranges (sorted by start) into runs no further apart than *gap*."""
    order = sorted(range(len(starts)), key=starts.__getitem__)
    runs: list[tuple[int, int, list[int]]] = []
    r0 = r1 = -1
    members: list[int] = []
    for i in order:
        s, n = starts[i], sizes[i]
        if members and s - r1 <= gap:
            r1 = max(r1, s + n)
            members.append(i)
        else:
            if members:
                runs.append((r0, r1, members))
            r0, r1, members = s, s + n, [i]
    if members:
        runs.append((r0, r1, members))
    return runs


def coalesce_plan(
    starts: list[int], sizes: list[int], *, gap: int, target: int
) -> list[tuple[int, int, list[int]]]:
    """Group byte ranges into requests: ``(start, end, member indices)``.

    Ranges no further apart than *gap* are merged (the hole between them is
    read and dropped: cheaper than another request); a merged run longer than
    *target* is cut, between ranges, into pieces of about *target* bytes
    (``round(run / target)`` pieces, so no small tail request: a piece is at
    most about 1.5 x *target*, or one range larger than that).
    """
    out: list[tuple[int, int, list[int]]] = []
    for r0, r1, members in coalesce(starts, sizes, gap):
        pieces = max(1, round((r1 - r0) / target)) if target > 0 else 1
        if pieces == 1 or len(members) == 1:
            out.append((r0, r1, members))
            continue
        # Cut where the running length passes each multiple of the piece size.
        step = (r1 - r0) / pieces
        cur: list[int] = []
        c0 = c1 = -1
        k = 1
        for i in members:
            s, e = starts[i], starts[i] + sizes[i]
            if cur and s - r0 >= k * step:
                out.append((c0, c1, cur))
                cur = []
                while s - r0 >= k * step:
                    k += 1
            if not cur:
                c0, c1 = s, e
            c1 = max(c1, e)
            cur.append(i)
        out.append((c0, c1, cur))
    return out


def gap_within(starts: list[int], sizes: list[int], *, gap: int, max_waste: int) -> int:
    """The largest hole size up to *gap* whose holes, all read through, add at most *max_waste* bytes.

    Merging the smallest holes first saves the most requests for the bytes
    spent: reading the pages of a chunk index spread through a large file
    then costs a bounded number of extra bytes, not the whole file.

    When every hole together passes *max_waste* by at most an eighth, all
    are read: the few largest left out would hold chunks that whole-array
    work then fetches in requests of their own, one round trip each in the
    middle of a task, for a sliver of the bytes.
    """
    order = sorted(range(len(starts)), key=starts.__getitem__)
    holes = sorted(
        h for a, b in itertools.pairwise(order) if 0 < (h := starts[b] - (starts[a] + sizes[a])) <= gap
    )
    if holes and sum(holes) <= max_waste + max_waste // 8:
        return holes[-1]
    total = 0
    best = 0
    for i, h in enumerate(holes):
        total += h
        if total > max_waste:
            break
        if i + 1 == len(holes) or holes[i + 1] != h:
            best = h  # every hole of this size fits: a threshold no tie can overshoot
    return best


def parse_nbytes(value: Any) -> int:
    from dask.utils import parse_bytes

    n = parse_bytes(value) if isinstance(value, str) else int(value)
    if n < 0:
        raise ValueError(f"a byte count must not be negative, got {value!r}")
    return n
