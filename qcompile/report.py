"""Human-facing tables: the plan (per layer: name, shape, scheme, bytes before → after, notes)."""

from __future__ import annotations


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def format_table(headers: list[str], rows: list[list[str]], align: str | None = None) -> str:
    """A plain-text table; ``align`` is one char per column, ``l`` or ``r``."""
    align = align or "l" * len(headers)
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells):
        parts = [str(c).ljust(w) if a == "l" else str(c).rjust(w) for c, w, a in zip(cells, widths, align)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def plan_table(plan) -> str:
    rows = []
    for e in plan.entries:
        s = e.site
        rows.append(
            [
                s.name,
                f"{s.out_features}x{s.in_features}",
                e.scheme or f"keep ({s.weight_dtype})",
                human_bytes(s.weight_bytes),
                human_bytes(e.bytes_after),
                e.note,
            ]
        )
    before, after = plan.bytes_before, plan.bytes_after
    ratio = before / after if after else float("inf")
    quantized = len(plan.quantized())
    rows.append(["total", "", f"{quantized}/{len(plan)} quantized", human_bytes(before), human_bytes(after),
                 f"{ratio:.2f}x smaller"])  # fmt: skip
    return format_table(["site", "N x K", "scheme", "before", "after", "note"], rows, "lllrrl")
