"""The HIGGS grids: for ``p``-dimensional vectors (``p`` = 1, 2) and ``b`` bits per weight, ``n = 2**(p*b)`` points
that minimize the mean squared error of a standard normal ``N(0, I_p)`` vector mapped to its nearest point.

Made by qcompile (``python -m qcompile.schemes.higgs_grids --header`` rewrites ``qcompile/data/higgs_grids.json`` and
the copy compiled into the C++ kernels, ``codegen/cpp/kernels/higgs.h``):

* ``p = 1``: Lloyd–Max on the normal density itself, in float64. Start from the normal quantiles at ``(i + 0.5) /
  n``; repeat "boundaries at the midpoints of neighbouring points, each point at the conditional mean of its
  interval" (``(phi(a) - phi(b)) / (Phi(b) - Phi(a))``) until no point moves by more than ``1e-13``. The MSE is the
  exact integral of the squared error over each interval.
* ``p = 2``: Lloyd's k-means on ``samples`` seeded Gaussian vectors (``torch.Generator().manual_seed(seed)``,
  float64), started from the product grid of two ``p = 1`` grids of ``2**b`` levels; each iteration assigns every
  sample to its nearest point (searched in float32) and moves each point to the float64 mean of its samples (a point
  with no sample stays), until no point moves by more than ``tolerance`` or ``iterations`` have run. Points are then
  sorted by ``(x, y)``. The MSE is measured on a second, independent sample set (``seed + 1``) of the same size. The
  defaults take about 7 CPU minutes, nearly all of them for the 256-point grid.

Stored points are rounded to float32 (every computation that reads them, kernels included, holds them exactly);
``mse`` is per coordinate (the squared distance over ``p``), of those rounded points. Known optimum for reference:
the 4-level Lloyd–Max quantizer of N(0, 1) has MSE 0.1175 (levels ±0.4528, ±1.5104).

JSON layout: ``{"method": {...parameters...}, "grids": {"p<p>-b<b>": {"points": [[x(, y)], ...], "mse": m}}}``;
point ``i`` is the value of code ``i``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import pathlib

import torch

DATA = pathlib.Path(__file__).resolve().parents[1] / "data" / "higgs_grids.json"
#: every (p, b) the family offers
SPECS = ((1, 2), (1, 3), (1, 4), (2, 2), (2, 3), (2, 4))
SAMPLES = 1 << 19
SEED = 0
ITERATIONS = 400
TOLERANCE = 1e-5
#: samples per chunk of the nearest-point search (memory: CHUNK * points float32)
CHUNK = 1 << 15


def key(p: int, b: int) -> str:
    return f"p{p}-b{b}"


# -- p = 1: Lloyd–Max on the density ----------------------------------------------------------------------------------
def _phi(t: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isinf(t), 0.0, torch.exp(-0.5 * t * t) / math.sqrt(2 * math.pi))


def _intervals(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mid = (points[1:] + points[:-1]) / 2
    inf = torch.tensor([math.inf], dtype=torch.float64)
    return torch.cat([-inf, mid]), torch.cat([mid, inf])


def scalar_mse(points: torch.Tensor) -> float:
    """Exact MSE of N(0, 1) mapped to the nearest of sorted ``points`` (float64): per interval ``[a, b]`` around
    point ``c``, ``∫(x - c)² phi = (1 + c²) P - (b phi(b) - a phi(a)) - 2 c (phi(a) - phi(b))``."""
    points = points.to(torch.float64)
    a, b = _intervals(points)
    mass = torch.special.ndtr(b) - torch.special.ndtr(a)
    edge = torch.nan_to_num(b * _phi(b)) - torch.nan_to_num(a * _phi(a))
    return float(((1 + points**2) * mass - edge - 2 * points * (_phi(a) - _phi(b))).sum())


def lloyd_max(levels: int, tolerance: float = 1e-13, max_iterations: int = 200_000) -> torch.Tensor:
    """The ``levels``-point Lloyd–Max quantizer of N(0, 1), float64 ascending (module docstring)."""
    points = torch.special.ndtri((torch.arange(levels, dtype=torch.float64) + 0.5) / levels)
    for _ in range(max_iterations):
        a, b = _intervals(points)
        new = (_phi(a) - _phi(b)) / (torch.special.ndtr(b) - torch.special.ndtr(a))
        moved = (new - points).abs().max().item()
        points = new
        if moved < tolerance:
            break
    return points


# -- p = 2: k-means on samples ----------------------------------------------------------------------------------------
def gaussian_samples(count: int, p: int, seed: int) -> torch.Tensor:
    return torch.randn(count, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def nearest(samples: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index int64 [S], squared distance float64 [S])`` of each sample's nearest point, searched in float32 (a
    sample within a float32 rounding of two points' bisector may take either: it moves no mean noticeably)."""
    points32, samples32 = points.to(torch.float32), samples.to(torch.float32)
    norms = (points32 * points32).sum(-1)
    index = torch.empty(samples.shape[0], dtype=torch.int64)
    for s0 in range(0, samples.shape[0], CHUNK):
        index[s0 : s0 + CHUNK] = torch.addmm(norms, samples32[s0 : s0 + CHUNK], points32.t(), alpha=-2).argmin(-1)
    distance = ((samples - points[index]) ** 2).sum(-1)
    return index, distance


def lloyd_step(points: torch.Tensor, samples: torch.Tensor) -> tuple[torch.Tensor, float]:
    """One Lloyd iteration: ``(moved points, MSE per coordinate of the points before the move)``."""
    index, distance = nearest(samples, points)
    sums = torch.zeros_like(points).index_add_(0, index, samples)
    counts = torch.bincount(index, minlength=points.shape[0]).to(torch.float64)
    moved = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], points)
    return moved, float(distance.mean()) / points.shape[1]


def kmeans(points: torch.Tensor, samples: torch.Tensor, iterations: int = ITERATIONS,
           tolerance: float = TOLERANCE) -> torch.Tensor:  # fmt: skip
    """Lloyd's iterations from ``points`` until no point moves by more than ``tolerance``."""
    for _ in range(iterations):
        new, _ = lloyd_step(points, samples)
        moved = (new - points).abs().max().item()
        points = new
        if moved < tolerance:
            break
    return points


def product_grid(levels: torch.Tensor) -> torch.Tensor:
    """All pairs ``(levels[i], levels[j])``, ``[len**2, 2]``."""
    x, y = torch.meshgrid(levels, levels, indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1)], -1)


def sort_points(points: torch.Tensor) -> torch.Tensor:
    """Points ordered by their first coordinate, then the second."""
    order = sorted(range(points.shape[0]), key=lambda i: tuple(points[i].tolist()))
    return points[order]


def to_float32(points: torch.Tensor) -> torch.Tensor:
    return points.to(torch.float32).to(torch.float64)


# -- the whole table --------------------------------------------------------------------------------------------------
def generate(samples: int = SAMPLES, seed: int = SEED, iterations: int = ITERATIONS, tolerance: float = TOLERANCE,
             specs=SPECS) -> dict:  # fmt: skip
    """The grids as the JSON document of the module docstring (float32-rounded points, their MSE)."""
    grids = {}
    fit = measure = None
    for p, b in specs:
        if p == 1:
            points = to_float32(lloyd_max(2**b))[:, None]
            mse = scalar_mse(points[:, 0])
        elif p == 2:
            if fit is None:
                fit, measure = gaussian_samples(samples, 2, seed), gaussian_samples(samples, 2, seed + 1)
            points = kmeans(product_grid(lloyd_max(2**b)), fit, iterations, tolerance)
            points = to_float32(sort_points(points))
            mse = float(nearest(measure, points)[1].mean()) / 2
        else:
            raise ValueError(f"higgs grids: vector dimension {p} is not 1 or 2")
        grids[key(p, b)] = {"points": points.tolist(), "mse": mse}
    method = {"p1": "Lloyd-Max on the N(0,1) density, float64, tolerance 1e-13",
              "p2": "k-means on seeded N(0,I2) samples from the product of two p1 grids",
              "samples": samples, "seed": seed, "iterations": iterations, "tolerance": tolerance}  # fmt: skip
    return {"method": method, "grids": grids}


def write(document: dict, path: pathlib.Path = DATA) -> None:
    path.write_text(json.dumps(document, indent=1) + "\n")


@functools.lru_cache(maxsize=None)
def load(path: pathlib.Path = DATA) -> dict[tuple[int, int], tuple[tuple[tuple[float, ...], ...], float]]:
    """``{(p, b): (points, mse)}`` from the stored table (points as tuples of floats, float32 values)."""
    document = json.loads(pathlib.Path(path).read_text())
    out = {}
    for p, b in SPECS:
        entry = document["grids"][key(p, b)]
        points = tuple(tuple(float(v) for v in point) for point in entry["points"])
        if len(points) != 2 ** (p * b) or any(len(point) != p for point in points):
            got = f"{len(points)} points of dimension {len(points[0]) if points else 0}"
            raise ValueError(f"{path}: grid {key(p, b)} has {got}, expected {2 ** (p * b)} of dimension {p}")
        out[(p, b)] = (points, float(entry["mse"]))
    return out


# -- the C++ copy -----------------------------------------------------------------------------------------------------
BEGIN = "// BEGIN GRIDS"
END = "// END GRIDS"


def cpp_name(p: int, b: int) -> str:
    return f"HIGGS_GRID_P{p}_B{b}"


def cpp_tables(document: dict) -> str:
    """The grids as C++ arrays (``float HIGGS_GRID_P<p>_B<b>[2**(p*b) * p]``, point ``i`` at ``i*p .. i*p+p-1``, exact
    hexadecimal float literals), between the :data:`BEGIN` and :data:`END` lines."""
    lines = [f"{BEGIN}: generated by qcompile/schemes/higgs_grids.py (--header) from qcompile/data/higgs_grids.json;",
             "// the kernel tests check them against the stored grids. Point i of a grid: entries i*p .. i*p+p-1."]
    for p, b in SPECS:
        values = [v for point in document["grids"][key(p, b)]["points"] for v in point]
        lines.append(f"static const float {cpp_name(p, b)}[{len(values)}] = {{")
        for i in range(0, len(values), 4):
            lines.append("    " + ", ".join(f"{float(v).hex()}f" for v in values[i : i + 4]) + ",")
        lines.append("};")
    lines.append(END)
    return "\n".join(lines)


def parse_cpp_tables(text: str) -> dict[tuple[int, int], list[float]]:
    """The arrays of :func:`cpp_tables` read back from a header's text."""
    out = {}
    for p, b in SPECS:
        body = text.split(f"{cpp_name(p, b)}[", 1)[1].split("{", 1)[1].split("}", 1)[0]
        out[(p, b)] = [float.fromhex(v.strip().removesuffix("f")) for v in body.split(",") if v.strip()]
    return out


def write_header(document: dict, path: pathlib.Path | None = None) -> None:
    """Replace the tables between :data:`BEGIN` and :data:`END` in ``codegen/cpp/kernels/higgs.h``."""
    if path is None:
        from qcompile.codegen.cpp import build

        path = build.KERNEL_DIR / "higgs.h"
    text = pathlib.Path(path).read_text()
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    pathlib.Path(path).write_text(head + cpp_tables(document) + tail)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Regenerate the HIGGS grids (qcompile/data/higgs_grids.json).")
    parser.add_argument("--samples", type=int, default=SAMPLES)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--iterations", type=int, default=ITERATIONS)
    parser.add_argument("--out", type=pathlib.Path, default=DATA)
    parser.add_argument("--header", action="store_true", help="also rewrite the tables in kernels/higgs.h")
    args = parser.parse_args(argv)
    document = generate(args.samples, args.seed, args.iterations)
    write(document, args.out)
    if args.header:
        write_header(document)
    for name, entry in document["grids"].items():
        print(f"{name}: {len(entry['points'])} points, MSE per coordinate {entry['mse']:.6f}")


if __name__ == "__main__":
    main()
