"""Codebook search shared by the AQLM scheme (data-free quantization) and the ``aqlm`` algorithm: nearest entries,
k-means, residual k-means over ``M`` codebooks and the data-free refinement rounds.

Shapes: ``points [P, d]`` (``d`` = the input group size ``ig``), ``codebooks [M, E, d]`` (``E = 2**B`` entries),
``codes int64 [P, M]`` (unsigned, ``0 <= code < E``). All float32; seeded by a ``torch.Generator`` (deterministic).
"""

from __future__ import annotations

import torch

#: points whose nearest entry is searched at once (memory: CHUNK * E float32)
CHUNK = 1 << 12


def nearest(points: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
    """``int64 [P]``: index of the nearest of ``entries [E, d]`` to each of ``points [P, d]`` (squared Euclidean
    distance ``|e|² - 2 p·e``, lowest index on a tie)."""
    norms = (entries * entries).sum(-1)
    out = torch.empty(points.shape[0], dtype=torch.int64, device=points.device)
    for p0 in range(0, points.shape[0], CHUNK):
        distance = torch.addmm(norms, points[p0 : p0 + CHUNK], entries.t(), alpha=-2)
        out[p0 : p0 + CHUNK] = distance.argmin(-1)
    return out


def cluster_means(points: torch.Tensor, assign: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
    """``entries`` with each used entry replaced by the mean of the points assigned to it (the least-squares entry
    for fixed assignments); unused entries are kept."""
    sums = torch.zeros_like(entries).index_add_(0, assign, points)
    counts = torch.bincount(assign, minlength=entries.shape[0]).to(points.dtype)
    used = counts > 0
    out = entries.clone()
    out[used] = sums[used] / counts[used].unsqueeze(-1)
    return out


def kmeans(points: torch.Tensor, size: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """``[size, d]`` entries by Lloyd's k-means on ``points [P, d]``: start from ``size`` distinct points drawn
    with ``generator``; with ``P <= size`` each point is its own entry (the rest zero)."""
    p, d = points.shape
    if p <= size:
        out = torch.zeros(size, d, dtype=points.dtype, device=points.device)
        out[:p] = points
        return out
    entries = points[torch.randperm(p, generator=generator)[:size].to(points.device)].clone()
    for _ in range(iters):
        entries = cluster_means(points, nearest(points, entries), entries)
    return entries


def decode(codebooks: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``[P, d]``: ``sum_m codebooks[m, codes[:, m]]``."""
    out = codebooks[0][codes[:, 0]]
    for m in range(1, codebooks.shape[0]):
        out = out + codebooks[m][codes[:, m]]
    return out


def residual_kmeans(points: torch.Tensor, num_codebooks: int, size: int, iters: int,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(codebooks [M, size, d], codes [P, M])``: codebook ``m`` is k-means of what codebooks ``0..m-1`` left."""
    residual = points.clone()
    books, codes = [], []
    for _ in range(num_codebooks):
        entries = kmeans(residual, size, iters, generator)
        assign = nearest(residual, entries)
        residual -= entries[assign]
        books.append(entries)
        codes.append(assign)
    return torch.stack(books), torch.stack(codes, -1)


def reassign(points: torch.Tensor, codebooks: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """One pass of coordinate descent over the codebooks: code ``m`` of each point becomes the nearest entry of
    codebook ``m`` to what the other codebooks leave (never raises the squared error)."""
    codes = codes.clone()
    total = decode(codebooks, codes)
    for m in range(codebooks.shape[0]):
        rest = total - codebooks[m][codes[:, m]]
        codes[:, m] = nearest(points - rest, codebooks[m])
        total = rest + codebooks[m][codes[:, m]]
    return codes


def refine(points: torch.Tensor, codebooks: torch.Tensor, codes: torch.Tensor,
           rounds: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``rounds`` of: per codebook, the least-squares entries for the current codes (the mean of what the other
    codebooks leave), then :func:`reassign`. The squared error never rises."""
    codebooks = codebooks.clone()
    for _ in range(rounds):
        total = decode(codebooks, codes)
        for m in range(codebooks.shape[0]):
            rest = total - codebooks[m][codes[:, m]]
            codebooks[m] = cluster_means(points - rest, codes[:, m], codebooks[m])
            total = rest + codebooks[m][codes[:, m]]
        codes = reassign(points, codebooks, codes)
    return codebooks, codes
