"""A memory of normal patch features: greedy coreset selection and k-nearest-neighbour distances.

PatchCore (Roth et al., 2022): keep a coreset of the normal images' patch features and score a test
patch by its distance to the nearest one. Pure torch, no data and no training logic.

- :func:`greedy_coreset`: greedy k-center (farthest-point) selection on a fixed random Gaussian
  projection of the features (PatchCore's approximate greedy coreset). Exact greedy on the projected
  points, never an N x N matrix: a running (N,) minimum squared distance to the picked centres,
  brought up to date *lazily* per block of ``chunk`` rows (see the function).
- :func:`knn_distance`: the mean Euclidean distance of each query to its ``k`` nearest bank rows, as
  ``||q||^2 - 2 q.b + ||b||^2`` with one matmul per chunk of bank rows (traces to ONNX: MatMul, Min).
- :func:`nearest_distance`: the same for ``k=1``, searched in bfloat16 (about 3x faster on CPUs with
  native bfloat16 matmuls) and re-measured in float32 on every chunk of rows the rounding leaves in doubt.
- :class:`PatchMemory`: the bank as a buffer whose row count is only known after fitting (it loads
  from a state_dict of any size); an empty bank means "off".
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KNN_CHUNK = 2048  # bank rows per matmul in knn_distance: (queries, KNN_CHUNK) floats at a time
SEARCH_CHUNK = 512  # bank rows per bfloat16 matmul in nearest_distance (2 cores: 13.4-14.0 ms vs 14.2-14.8 at 1024)
CORESET_CHUNK = 1024  # rows per lazily updated block in greedy_coreset (measured: 1024-2048 best, 2 cores)


def project(features: Tensor, proj_dim: int, seed: int, chunk: int = 65536) -> Tensor:
    """``features`` (N, D) times a fixed Gaussian (D, proj_dim) / sqrt(proj_dim) drawn from ``seed``
    (a Johnson-Lindenstrauss projection: squared distances are kept in expectation). ``proj_dim <= 0``
    or ``>= D``: the features themselves (as float32, or float64 when given float64)."""
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    d = features.shape[1]
    if proj_dim <= 0 or proj_dim >= d:
        return features.to(dtype)
    g = torch.Generator().manual_seed(int(seed))
    mat = (torch.randn(d, proj_dim, generator=g, dtype=torch.float64) / math.sqrt(proj_dim)).to(dtype)
    mat = mat.to(features.device)
    return torch.cat([features[i:i + chunk].to(dtype) @ mat for i in range(0, len(features), chunk)])


def greedy_coreset(features: Tensor, n_pick: int, proj_dim: int = 128, seed: int = 0, chunk: int = CORESET_CHUNK,
                   start: Tensor | None = None, max_candidates: int = 0) -> Tensor:
    """Indices (n_pick,) of a greedy k-center coreset of ``features`` (N, D), in the order picked.

    Greedy k-center: start from a point drawn with ``seed`` (or, with ``start`` (M, D), from those
    rows as already chosen centres: the picks then extend that set), then repeatedly pick the point
    farthest from all centres so far. Distances are taken after :func:`project` (``proj_dim``, the
    same ``seed``); ``proj_dim=0`` uses the features themselves. ``max_candidates > 0``: when N is
    larger, the picks come from that many rows drawn at random (``seed``) instead of all of them.

    Lazy updates (exact, bounded memory): the points are split into blocks of ``chunk`` rows. Each
    block keeps its points' smallest squared distance to the centres it has seen, their largest
    value and how many centres it has seen. A new centre only lowers distances, so a stale block
    maximum bounds the block's true one from above: the pick is the maximum of the block with the
    largest bound once that block has seen every centre. A stale block is brought up to date with one
    (chunk, proj_dim + 1) x (proj_dim + 1, new centres) matmul giving ``||c||^2 - 2 x.c`` directly, so
    the work (at most N x n_pick x proj_dim multiply-adds, less when blocks fall behind the current
    radius) runs at matmul speed instead of as one memory-bound pass over all N points per pick.
    Memory: the projected (N, proj_dim + 1) matrix, (N,) distances and (n_pick, proj_dim + 1) centres.

    Returns:
        LongTensor of distinct indices; all of ``range(N)`` when ``n_pick >= N``.
    """
    return greedy_coreset_radius(features, n_pick, proj_dim, seed, chunk, start, max_candidates)[0]


def greedy_coreset_radius(features: Tensor, n_pick: int, proj_dim: int = 128, seed: int = 0,
                          chunk: int = CORESET_CHUNK, start: Tensor | None = None, max_candidates: int = 0,
                          stop_at: float = -1.0) -> tuple[Tensor, float]:
    """:func:`greedy_coreset`, and the covering radius: the squared projected distance of the farthest
    (candidate) row from the picks and ``start`` rows (0 when every row is picked). Picking stops early,
    with fewer than ``n_pick`` indices, once that distance is ``<= stop_at``."""
    n = len(features)
    n_pick = int(min(max(n_pick, 0), n))
    if n_pick >= n and stop_at < 0:
        return torch.arange(n), 0.0
    if n_pick == 0:
        return torch.zeros(0, dtype=torch.long), math.inf
    g = torch.Generator().manual_seed(int(seed))
    if 0 < max_candidates < n and n_pick < max_candidates:
        keep = torch.randperm(n, generator=g)[:max_candidates].sort().values
        idx, radius = greedy_coreset_radius(features[keep.to(features.device)], n_pick, proj_dim, seed, chunk,
                                            start, 0, stop_at)
        return keep[idx], radius
    search = _Farthest(project(features, proj_dim, seed), n_pick, chunk)
    if start is not None and len(start):
        search.cover(project(start.to(features.device), proj_dim, seed))
        first, radius = search.farthest()
    else:
        first, radius = int(torch.randint(n, (1,), generator=g)), math.inf
    while len(search.picks) < n_pick and radius > stop_at:
        search.add(first)
        first, radius = search.farthest()
    return torch.tensor(search.picks, dtype=torch.long), max(radius, 0.0)


def _with_ones(x: Tensor) -> Tensor:
    """Rows ``(x, 1)``: against rows of :func:`_as_centres` one matmul gives ``||c||^2 - 2 x.c``."""
    return torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)


def _as_centres(c: Tensor) -> Tensor:
    """Rows ``(-2 c, ||c||^2)`` (see :func:`_with_ones`)."""
    return torch.cat([-2.0 * c, c.pow(2).sum(1, keepdim=True)], dim=1)


class _Farthest:
    """The lazy state of :func:`greedy_coreset` over projected points ``x`` (N, p)."""

    def __init__(self, x: Tensor, n_pick: int, chunk: int):
        n = len(x)
        self.chunk = chunk
        self.sq = x.pow(2).sum(1)
        self.xa = _with_ones(x)  # rows (x, 1)
        self.centres = torch.zeros(n_pick, x.shape[1] + 1, dtype=x.dtype, device=x.device)  # rows (-2c, |c|^2)
        self.mind = torch.full((n,), math.inf, dtype=x.dtype, device=x.device)
        n_blocks = math.ceil(n / chunk)
        self.bound = torch.full((n_blocks,), math.inf, dtype=torch.float64)  # >= each block's largest distance
        self.best = [b * chunk for b in range(n_blocks)]  # where that is, once the block is up to date
        self.seen = [0] * n_blocks  # how many centres each block's distances include
        self.picks: list[int] = []

    def cover(self, rows: Tensor) -> None:
        """Start from ``rows`` (M, p) as centres chosen before (they are not picks)."""
        ra = _as_centres(rows)
        for lo in range(0, len(self.mind), self.chunk):
            xa = self.xa[lo:lo + self.chunk]
            self.mind[lo:lo + self.chunk] = (xa @ ra.T).amin(1) + self.sq[lo:lo + self.chunk]
        for b in range(len(self.seen)):
            self._settle(b)

    def farthest(self) -> tuple[int, float]:
        """The point farthest from every centre and its squared distance: bring the block with the largest
        bound up to date until that block has seen every centre."""
        t = len(self.picks)
        while True:
            b = int(self.bound.argmax())
            if self.seen[b] == t:
                return self.best[b], float(self.bound[b])
            lo = b * self.chunk
            hi = lo + self.chunk
            near = (self.xa[lo:hi] @ self.centres[self.seen[b]:t].T).amin(1) + self.sq[lo:hi]
            self.mind[lo:hi] = torch.minimum(self.mind[lo:hi], near)
            self.seen[b] = t
            self._settle(b)

    def add(self, idx: int) -> None:
        t = len(self.picks)
        self.centres[t, :-1] = -2.0 * self.xa[idx, :-1]
        self.centres[t, -1] = self.sq[idx]
        self.mind[idx] = -math.inf  # never picked again (also when every remaining point is a duplicate)
        self.picks.append(idx)

    def _settle(self, b: int) -> None:
        lo = b * self.chunk
        value, pos = self.mind[lo:lo + self.chunk].max(0)
        self.bound[b], self.best[b] = float(value), lo + int(pos)


def knn_distance(queries: Tensor, bank: Tensor, k: int = 1, chunk: int = KNN_CHUNK) -> Tensor:
    """Mean Euclidean distance (Q,) of each query (Q, D) to its ``k`` nearest rows of ``bank`` (M, D).

    Squared distances as ``||q||^2 - 2 q.b + ||b||^2``: the queries get a column of ones and the bank rows
    become ``(-2 b, ||b||^2)``, so that one plain GEMM per chunk of bank rows gives ``||b||^2 - 2 q.b`` (no
    bias broadcast, no full-size elementwise pass: those took more time than the GEMM itself); then a
    running minimum (``k=1``) or running k smallest (``topk``) across chunks; ``||q||^2``, the same for
    every bank row, is added to the k smallest only, and the sum clamped at 0 before the square root.
    Memory: (Q, chunk). Traces to ONNX (the chunk loop unrolls over the fixed bank size).
    """
    if k < 1 or k > len(bank):
        raise ValueError(f"k={k} needs 1 <= k <= bank rows ({len(bank)})")
    qa, ba = _with_ones(queries), _as_centres(bank)
    best: Tensor | None = None
    for lo in range(0, len(ba), chunk):
        d = qa @ ba[lo:lo + chunk].T  # ||b||^2 - 2 q.b
        if k == 1:
            part = d.amin(1, keepdim=True)
            best = part if best is None else torch.minimum(best, part)
        else:
            cand = d if best is None else torch.cat([best, d], dim=1)
            best = cand.topk(min(k, cand.shape[1]), dim=1, largest=False).values
    assert best is not None
    best = best + queries.pow(2).sum(1, keepdim=True)  # ||q||^2 is the same for every bank row: added last
    return best.clamp_min(0).sqrt().mean(1)


@functools.cache
def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bfloat16 natively (x86 ``avx512_bf16`` or ``amx_bf16``; Linux flags).

    Elsewhere bfloat16 matmuls are emulated, often slower than float32, so the search stays float32.
    """
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _split_bf16(x: Tensor) -> Tensor:
    """``x`` (N, 1) as two bfloat16 columns ``(hi, lo)`` with ``hi + lo = x`` to about 16 significant bits."""
    hi = x.to(torch.bfloat16)
    return torch.cat([hi, (x - hi.float()).to(torch.bfloat16)], dim=1)


def search_rows(bank: Tensor) -> tuple[Tensor, Tensor]:
    """The bank as rows for :func:`nearest_distance`: float32 ``(-2 b, ||b||^2)`` and bfloat16
    ``(-2 b, 1, 1, hi, lo)`` with ``hi + lo = ||b||^2``, both ordered by ``||b||``.

    ``||b||^2`` is split in two bfloat16 numbers (about 16 significant bits instead of 8): its rounding
    would otherwise be as large as a near neighbour's whole squared distance; the two ones take the
    query's split ``||q||^2``. The order changes no nearest distance, but each chunk of rows then spans a
    narrow range of norms, so the rounding bound of a chunk (from its largest norm) is tighter and fewer
    chunks are re-measured (real queries on a dev-suite bank: 1.4-1.65 chunks per query instead of 1.7-2.3).
    """
    centres = _as_centres(bank)
    centres = centres[centres[:, -1].argsort()]
    ones = torch.ones(len(centres), 2, dtype=torch.bfloat16)
    rows = torch.cat([centres[:, :-1].to(torch.bfloat16), ones, _split_bf16(centres[:, -1:])], dim=1)
    return centres, rows.contiguous()


def _smallest(d: Tensor) -> Tensor:
    """Row minima (Q,) of bfloat16 ``d`` (Q, C) read as int16: the same order for values >= 0 (any
    negative one comes out below them all), and about 9x faster than bfloat16's own ``amin`` on CPUs."""
    return d.view(torch.int16).amin(1).view(torch.bfloat16)


def nearest_distance(queries: Tensor, centres: Tensor, rows: Tensor, chunk: int = SEARCH_CHUNK) -> Tensor:
    """Euclidean distance (Q,) of each query (Q, D) to its nearest bank row, ``(centres, rows) =
    search_rows(bank)``: :func:`knn_distance` with ``k=1``, searched mostly in bfloat16, the same result.

    A bfloat16 pass (float32 accumulation, bfloat16 result) gives the squared distances ``v = ||q||^2 +
    ||b||^2 - 2 q.b`` (``>= 0``) of each chunk of ``chunk`` bank rows, and a chunk's smallest rounded one
    ``v'`` (:func:`_smallest`; a negative ``v'``, from rounding near 0, is some row's, which is all the
    bound below needs) to within a rounding error ``e``: bfloat16 rounds ``q_i`` and ``-2 b_i`` by at most
    2^-9 (relative) each, so their products by ``2^-8 sum_i |q_i| |2 b_i| <= 2^-7 ||q|| ||b||``
    (Cauchy-Schwarz); the result is rounded by at most ``2^-8 |v'|``; the split norms and the float32
    accumulation stay below ``2^-15 (||b||^2 + ||q||^2) + 2^-12 ||q|| ||b||``, with ``||b||`` the chunk's
    largest norm. Only a chunk whose lower bound ``v' - e`` is below the smallest upper bound ``v' + e``
    can hold the nearest row: the float32 pass of :func:`knn_distance` runs on those only, so the result
    is the float32 one, not an approximation.
    """
    q_sq = queries.pow(2).sum(1, keepdim=True)  # ||q||^2: in the bfloat16 pass, its root in the bound
    qs = torch.cat([queries.to(torch.bfloat16), _split_bf16(q_sq), q_sq.new_ones(len(q_sq), 2).to(torch.bfloat16)], 1)
    per_chunk = torch.stack([_smallest(qs @ rows[lo:lo + chunk].T) for lo in range(0, len(rows), chunk)], 1).float()
    sq = centres[:, -1]
    sq_max = F.pad(sq, (0, -len(sq) % chunk)).view(-1, chunk).amax(1)  # (chunks,): each chunk's largest ||b||^2
    err = (2.0 ** -7 + 2.0 ** -12) * q_sq.sqrt() * sq_max.sqrt() + 2.0 ** -15 * (sq_max + q_sq) \
        + (2.0 ** -8 + 2.0 ** -15) * per_chunk.abs()  # (Q, chunks): each rounded minimum is within err of the true one
    candidate = per_chunk - err <= (per_chunk + err).amin(1, keepdim=True)
    qa = _with_ones(queries)
    best = queries.new_full((queries.shape[0],), float("inf"))
    for c in range(per_chunk.shape[1]):
        sel = candidate[:, c].nonzero().squeeze(1)
        if len(sel):
            d = (qa[sel] @ centres[c * chunk:(c + 1) * chunk].T).amin(1)  # ||b||^2 - 2 q.b
            best[sel] = torch.minimum(best[sel], d)
    return (best + q_sq.squeeze(1)).clamp_min(0).sqrt()


class PatchMemory(nn.Module):
    """A bank (M, dim) of normal patch features; ``forward`` gives queries' kNN distances to it.

    The bank is a buffer: it is saved with the weights, and ``load_state_dict`` takes a bank of any
    row count (the buffer is resized first). ``len(memory) == 0`` means the memory is off.

    ``bf16_search``: search the nearest row in bfloat16 and re-measure it exactly
    (:func:`nearest_distance`); ``None`` (default): when ``k == 1``, on a CPU that multiplies bfloat16
    natively, and not while tracing (an ONNX export keeps the float32 search).
    """

    bank: Tensor  # registered buffer

    def __init__(self, dim: int, k: int = 1, chunk: int = KNN_CHUNK):
        super().__init__()
        self.k, self.chunk = k, chunk
        self.bf16_search: bool | None = None
        self._rows: tuple[tuple[int, int, int], tuple[Tensor, Tensor]] | None = None  # (bank id, search_rows)
        self.register_buffer("bank", torch.zeros(0, dim))

    def _use_bf16(self) -> bool:
        if self.bf16_search is not None:
            return self.bf16_search
        return (min(self.k, len(self)) == 1 and self.bank.device.type == "cpu" and cpu_has_bf16_matmul()
                and not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export())

    def _search_rows(self) -> tuple[Tensor, Tensor]:
        key = (self.bank.data_ptr(), self.bank._version, len(self))
        if self._rows is None or self._rows[0] != key:
            self._rows = (key, search_rows(self.bank))
        return self._rows[1]

    def __len__(self) -> int:
        return int(self.bank.shape[0])

    def forward(self, queries: Tensor) -> Tensor:
        """(Q,) mean distance of each query (Q, dim) to its ``k`` nearest bank rows (zeros: empty bank)."""
        if not len(self):
            return queries.new_zeros(queries.shape[0])
        if self._use_bf16():
            return nearest_distance(queries, *self._search_rows())
        return knn_distance(queries, self.bank, min(self.k, len(self)), self.chunk)

    def set_bank(self, rows: Tensor) -> None:
        """Replace the bank by ``rows`` (M, dim), stored as float32 on the bank's device."""
        self.bank = rows.detach().to(self.bank.device, torch.float32).contiguous()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        saved = state_dict.get(prefix + "bank")
        if isinstance(saved, Tensor) and saved.ndim == 2 and saved.shape[1] == self.bank.shape[1]:
            self.bank = torch.zeros(saved.shape, dtype=self.bank.dtype, device=self.bank.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def uses_bf16_search(module: nn.Module) -> bool:
    """Whether ``module`` holds a non-empty :class:`PatchMemory` that searches in bfloat16 here (eager
    PyTorch then beats onnxruntime's float32 search on such a model: see ``anomap.serve.fastest``)."""
    return any(isinstance(m, PatchMemory) and len(m) and m._use_bf16() for m in module.modules())
