"""llama.cpp's reference quantizers (no importance matrix), vectorised over blocks: ``float32 [R, QK]`` → the fields
of :mod:`qcompile.schemes.gguf_blocks`.

Written from llama.cpp ``ggml-quants.c``: ``quantize_row_q4_0_ref`` … ``quantize_row_q8_0_ref`` (the legacy types),
``quantize_row_q2_K_ref`` … ``quantize_row_q6_K_ref`` with their helpers ``make_qkx2_quants``, ``make_q3_quants``,
``make_qx_quants``, and ``quantize_row_iq4_nl_impl`` as ``quantize_iq4_nl`` / ``quantize_iq4_xs`` call it without
an importance matrix (``ntry = 7``: the scale search that ``llama-quantize`` runs; ``quantize_row_iq4_nl_ref`` passes
``ntry = -1``, no search, available as :func:`quantize_iq4` ``ntry=-1``).

Every arithmetic step is float32 in the C order: the per-element loops of the C code whose results feed a decision
(sums of ``w*x*l`` and friends, the coordinate descent of ``make_q3_quants``) run element by element over all blocks
at once, so the sums are the same float32 sequence as the scalar C loop. ``nearest_int`` rounds half to even
(``torch.round``), ``roundf`` half away from zero, ``(int8_t)(x + 8.5f)`` truncates.
"""

from __future__ import annotations

import torch

from qcompile.schemes.gguf_blocks import KVALUES, QK_K

GROUP_MAX_EPS = 1e-15
_F = torch.float32


def _f(value) -> torch.Tensor:
    return torch.tensor(value, dtype=_F)


def nearest_int(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp ``nearest_int``: round half to even (defined there for ``|x| <= 4194303``)."""
    return torch.round(torch.nan_to_num(x, nan=0.0).clamp(-4194303.0, 4194303.0)).to(torch.int32)


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C ``roundf``: half away from zero, exactly (no ``x + 0.5`` rounding)."""
    a = x.abs()
    floor = torch.floor(a)
    return torch.sign(x) * (floor + torch.floor(2 * (a - floor)))


def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16)


def _signed_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(amax, max)``: the largest ``|x|`` along the last dim and the signed value at its first occurrence."""
    index = x.abs().argmax(-1, keepdim=True)
    value = torch.gather(x, -1, index).squeeze(-1)
    value = torch.where(value != 0, value, torch.zeros_like(value))  # C starts from +0.0 and keeps it
    return value.abs(), value


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """``d ? 1.0f/d : 0.0f``."""
    return torch.where(d != 0, 1.0 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))


def _seq(columns) -> torch.Tensor:
    """Sum of an iterable of tensors, left to right (the C loop's float32 order)."""
    total = None
    for c in columns:
        total = c if total is None else total + c
    return total


# -- legacy types -----------------------------------------------------------------------------------------------------
def quantize_legacy(name: str, x: torch.Tensor) -> dict:
    """``quantize_row_{q4_0,q4_1,q5_0,q5_1,q8_0}_ref`` on ``x float32 [R, 32]``."""
    x = x.to(_F)
    if name in ("q4_0", "q5_0"):
        levels = 8 if name == "q4_0" else 16
        _, peak = _signed_max(x)
        d = peak / -levels
        scaled = x * _inverse(d).unsqueeze(1)
        q = torch.trunc(scaled + (levels + 0.5)).clamp(0, 2 * levels - 1)
        return {"d": _f16(d), "q": q.to(torch.uint8)}
    if name in ("q4_1", "q5_1"):
        top = 15 if name == "q4_1" else 31
        lo, hi = x.amin(1), x.amax(1)
        d = (hi - lo) / top
        q = torch.trunc((x - lo.unsqueeze(1)) * _inverse(d).unsqueeze(1) + 0.5).clamp(0, top)
        return {"d": _f16(d), "m": _f16(lo), "q": q.to(torch.uint8)}
    if name == "q8_0":
        d = x.abs().amax(1) / 127
        q = _roundf(x * _inverse(d).unsqueeze(1))
        return {"d": _f16(d), "q": q.to(torch.int8)}
    raise ValueError(f"not a legacy ggml type: {name!r}")


# -- k-quant helpers --------------------------------------------------------------------------------------------------
def make_qkx2_quants(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                     use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(scale [B], the_min [B], L uint8 [B, n])`` for sub-blocks ``x [B, n]`` with weights ``w [B, n]``."""
    xs, ws = x.t().contiguous(), w.t().contiguous()  # [n, B]: one element of every sub-block per row
    n = xs.shape[0]
    lo, hi = xs.amin(0), xs.amax(0)
    sum_w = _seq(ws[i] for i in range(n))
    sum_x = _seq(ws[i] * xs[i] for i in range(n))
    lo = torch.where(lo > 0, torch.zeros_like(lo), lo)
    flat = hi == lo
    span = torch.where(flat, torch.ones_like(hi), hi - lo)

    def codes(iscale, low):
        return nearest_int(iscale * (xs - low)).clamp(0, nmax).to(_F)

    def error(scale, low, levels):
        diff = scale * levels + low - xs
        diff = diff.abs() if use_mad else diff * diff
        return _seq(ws[i] * diff[i] for i in range(n))

    iscale = nmax / span
    scale = 1 / iscale
    levels = codes(iscale, lo)
    best = error(scale, lo, levels)
    low = lo
    for step in range(nstep + 1 if nstep >= 1 else 0):
        iscale = (_f(rmin) + _f(rdelta) * step + nmax) / torch.where(flat, torch.ones_like(hi), hi - low)
        aux = codes(iscale, low)
        sum_l = _seq(ws[i] * aux[i] for i in range(n))
        sum_l2 = _seq(ws[i] * aux[i] * aux[i] for i in range(n))
        sum_xl = _seq(ws[i] * aux[i] * xs[i] for i in range(n))
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
        current = error(this_scale, this_min, aux)
        better = (det > 0) & (current < best) & ~flat
        levels = torch.where(better, aux, levels)
        best = torch.where(better, current, best)
        scale = torch.where(better, this_scale, scale)
        low = torch.where(better, this_min, low)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    levels = torch.where(flat, torch.zeros_like(levels), levels)
    return scale, -low, levels.t().to(torch.uint8)


def make_qx_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL)``: ``(scale [B], L uint8 [B, n])``, ``L = l + nmax``."""
    amax, peak = _signed_max(x)
    xs = x.t().contiguous()
    n = xs.shape[0]
    zero = amax < GROUP_MAX_EPS
    peak = torch.where(zero, torch.ones_like(peak), peak)
    w = xs * xs

    def levels(iscale):
        return nearest_int(iscale * xs).clamp(-nmax, nmax - 1).to(_F)

    def sums(l):
        return _seq(w[i] * xs[i] * l[i] for i in range(n)), _seq(w[i] * l[i] * l[i] for i in range(n))

    chosen = levels(-nmax / peak)
    sumlx, suml2 = sums(chosen)
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    best = scale * sumlx
    for step in [s for s in range(-9, 10) if s]:
        trial = levels(-(nmax + _f(0.1) * step) / peak)
        sumlx, suml2 = sums(trial)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        chosen = torch.where(better, trial, chosen)
        scale = torch.where(better, sumlx / suml2, scale)
        best = torch.where(better, scale * sumlx, best)
    codes = torch.where(zero, torch.zeros_like(chosen), chosen + nmax)
    return torch.where(zero, torch.zeros_like(scale), scale), codes.t().to(torch.uint8)


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_q3_quants(n, nmax, x, L, do_rmse=true)``: ``(scale [B], L uint8 [B, n])``, ``L = l + nmax``."""
    amax, peak = _signed_max(x)
    xs = x.t().contiguous()
    n = xs.shape[0]
    zero = amax < GROUP_MAX_EPS
    peak = torch.where(zero, torch.ones_like(peak), peak)
    w = xs * xs
    levels = nearest_int((-nmax / peak) * xs).clamp(-nmax, nmax - 1).to(_F)
    sumlx = _seq(w[i] * xs[i] * levels[i] for i in range(n))
    suml2 = _seq(w[i] * levels[i] * levels[i] for i in range(n))
    for _ in range(5):
        for i in range(n):
            slx = sumlx - w[i] * xs[i] * levels[i]
            sl2 = suml2 - w[i] * levels[i] * levels[i]
            new = nearest_int(xs[i] * sl2 / slx).clamp(-nmax, nmax - 1).to(_F)
            slx2 = slx + w[i] * xs[i] * new
            sl22 = sl2 + w[i] * new * new
            take = (slx > 0) & (new != levels[i]) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            levels[i] = torch.where(take, new, levels[i])
            sumlx = torch.where(take, slx2, sumlx)
            suml2 = torch.where(take, sl22, suml2)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    codes = torch.where(zero, torch.zeros_like(levels), levels + nmax)
    return torch.where(zero, torch.zeros_like(scale), scale), codes.t().to(torch.uint8)


def _requantize(x, d, dm, lo, hi, previous, offset=0):
    """The last loop of every k-quant: ``L = clamp(nearest_int((x + dm) / d), lo, hi) + offset`` where ``d != 0``,
    the helper's ``L`` kept where ``d == 0``. ``x [B, n]``, ``d, dm [B]``."""
    safe = torch.where(d != 0, d, torch.ones_like(d)).unsqueeze(1)
    fresh = nearest_int((x + dm.unsqueeze(1)) / safe).clamp(lo, hi) + offset
    return torch.where((d != 0).unsqueeze(1), fresh, previous.to(torch.int32))


def _first_max(values: torch.Tensor) -> torch.Tensor:
    """``max`` starting from 0 with ``>`` (C: ``if (v > best) best = v``), per row."""
    return values.amax(1).clamp_min(0)


# -- k-quants ---------------------------------------------------------------------------------------------------------
def quantize_q2_k(x: torch.Tensor) -> dict:
    r = x.shape[0]
    sub = x.reshape(-1, 16)
    scales, mins, levels = make_qkx2_quants(sub, sub.abs(), 3, -0.5, 0.1, 15, True)
    scales, mins = scales.reshape(r, 16), mins.reshape(r, 16)
    max_scale, max_min = _first_max(scales), _first_max(mins)
    ls = torch.where((max_scale > 0).unsqueeze(1), nearest_int((15.0 / max_scale.unsqueeze(1)) * scales),
                     torch.zeros_like(scales, dtype=torch.int32))  # fmt: skip
    lm = torch.where((max_min > 0).unsqueeze(1), nearest_int((15.0 / max_min.unsqueeze(1)) * mins),
                     torch.zeros_like(mins, dtype=torch.int32))  # fmt: skip
    byte = ((ls & 255) | (lm << 4)) & 255
    d = _f16(torch.where(max_scale > 0, max_scale / 15.0, torch.zeros_like(max_scale)))
    dmin = _f16(torch.where(max_min > 0, max_min / 15.0, torch.zeros_like(max_min)))
    dl = d.to(_F).unsqueeze(1) * (byte & 15).to(_F)
    ml = dmin.to(_F).unsqueeze(1) * (byte >> 4).to(_F)
    q = _requantize(sub, dl.reshape(-1), ml.reshape(-1), 0, 3, levels)
    return {"d": d, "dmin": dmin, "sc": (byte & 15).to(torch.uint8), "m": (byte >> 4).to(torch.uint8),
            "q": q.reshape(r, QK_K).to(torch.uint8)}  # fmt: skip


def quantize_q3_k(x: torch.Tensor) -> dict:
    r = x.shape[0]
    sub = x.reshape(-1, 16)
    scales, levels = make_q3_quants(sub, 4)
    scales = scales.reshape(r, 16)
    _, max_scale = _signed_max(scales)
    nonzero = (max_scale != 0).unsqueeze(1)
    iscale = -32.0 / torch.where(max_scale != 0, max_scale, torch.ones_like(max_scale))
    l6 = torch.where(nonzero, nearest_int(iscale.unsqueeze(1) * scales).clamp(-32, 31) + 32,
                     torch.zeros_like(scales, dtype=torch.int32))  # fmt: skip
    d = _f16(torch.where(max_scale != 0, 1 / iscale, torch.zeros_like(iscale)))
    dl = d.to(_F).unsqueeze(1) * (l6 - 32).to(_F)
    q = _requantize(sub, dl.reshape(-1), torch.zeros(sub.shape[0]), -4, 3, levels, offset=4)
    return {"d": d, "sc": l6.to(torch.uint8), "q": q.reshape(r, QK_K).to(torch.uint8)}


def quantize_q45_k(x: torch.Tensor, five: bool) -> dict:
    r = x.shape[0]
    sub = x.reshape(-1, 32)
    av_x = torch.sqrt(_seq(sub[:, i] * sub[:, i] for i in range(32)) / 32)
    weights = av_x.unsqueeze(1) + sub.abs()
    nmax, rmin, nstep = (31, -0.5, 15) if five else (15, -1.0, 20)
    scales, mins, levels = make_qkx2_quants(sub, weights, nmax, rmin, 0.1, nstep, False)
    scales, mins = scales.reshape(r, 8), mins.reshape(r, 8)
    max_scale, max_min = _first_max(scales), _first_max(mins)
    inv_scale = torch.where(max_scale > 0, 63.0 / torch.where(max_scale > 0, max_scale, torch.ones_like(max_scale)),
                            torch.zeros_like(max_scale))  # fmt: skip
    inv_min = torch.where(max_min > 0, 63.0 / torch.where(max_min > 0, max_min, torch.ones_like(max_min)),
                          torch.zeros_like(max_min))  # fmt: skip
    ls = (nearest_int(inv_scale.unsqueeze(1) * scales) & 255).clamp_max(63)  # (uint8_t) then MIN(63, .)
    lm = (nearest_int(inv_min.unsqueeze(1) * mins) & 255).clamp_max(63)
    d, dmin = _f16(max_scale / 63.0), _f16(max_min / 63.0)
    dl = d.to(_F).unsqueeze(1) * ls.to(_F)
    dm = dmin.to(_F).unsqueeze(1) * lm.to(_F)
    q = _requantize(sub, dl.reshape(-1), dm.reshape(-1), 0, nmax, levels)
    return {"d": d, "dmin": dmin, "sc": ls.to(torch.uint8), "m": lm.to(torch.uint8),
            "q": q.reshape(r, QK_K).to(torch.uint8)}  # fmt: skip


def quantize_q6_k(x: torch.Tensor) -> dict:
    r = x.shape[0]
    sub = x.reshape(-1, 16)
    scales, levels = make_qx_quants(sub, 32)
    scales = scales.reshape(r, 16)
    amax, max_scale = _signed_max(scales)
    zero = amax < GROUP_MAX_EPS
    iscale = -128.0 / torch.where(zero, torch.ones_like(max_scale), max_scale)
    d = _f16(torch.where(zero, torch.zeros_like(iscale), 1 / iscale))
    sc = nearest_int(iscale.unsqueeze(1) * scales).clamp_max(127)
    sc = torch.where(zero.unsqueeze(1), torch.zeros_like(sc), sc)
    dl = d.to(_F).unsqueeze(1) * sc.to(_F)
    q = _requantize(sub, dl.reshape(-1), torch.zeros(sub.shape[0]), -32, 31, levels, offset=32)
    q = torch.where(zero.unsqueeze(1), torch.zeros_like(q.reshape(r, QK_K)), q.reshape(r, QK_K))  # memset 0
    return {"d": d, "sc": sc.to(torch.int8), "q": q.to(torch.uint8)}


# -- IQ4 --------------------------------------------------------------------------------------------------------------
def best_index(x: torch.Tensor) -> torch.Tensor:
    """``best_index_int8(16, kvalues_iq4nl, x)``: the level ``x`` is nearest to, ties to the upper one (the C
    branchless search counts the midpoints ``kv[j-1] + kv[j]`` that ``2x`` reaches)."""
    kv = KVALUES
    thresholds = torch.tensor([kv[j - 1] + kv[j] for j in range(1, 16)], dtype=_F)
    return ((x + x).unsqueeze(-1) >= thresholds).sum(-1).to(torch.int32)


def _iq4_sub_blocks(x: torch.Tensor, ntry: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-32 scale search of ``quantize_row_iq4_nl_impl`` without importance weights: ``(scales [B], codes
    [B, 32])``, the codes those of the first pass (``id = 1/d``, ``d = ±max / kvalues[0]``; 0 for an all-zero
    sub-block)."""
    kv = torch.tensor(KVALUES, dtype=_F)
    amax, peak = _signed_max(x)
    zero = amax < GROUP_MAX_EPS
    peak = torch.where(zero, torch.ones_like(peak), peak)
    xs = x.t().contiguous()
    n = xs.shape[0]
    w = xs * xs

    def sums(iscale):
        codes = best_index(iscale.unsqueeze(0) * xs)
        q = kv[codes.long()]
        return _seq(w[i] * q[i] * xs[i] for i in range(n)), _seq(w[i] * q[i] * q[i] for i in range(n)), codes

    d = -peak / KVALUES[0] if ntry > 0 else peak / KVALUES[0]
    sumqx, sumq2, first = sums(1 / d)
    d = torch.where(sumq2 > 0, sumqx / sumq2, torch.zeros_like(sumqx))
    best = d * sumqx
    for itry in range(-ntry, ntry + 1):
        sumqx, sumq2, _ = sums(_f(itry + KVALUES[0]) / peak)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = torch.where(better, sumqx / sumq2, d)
        best = torch.where(better, d * sumqx, best)
    first = torch.where(zero.unsqueeze(0), torch.zeros_like(first), first)
    return torch.where(zero, torch.zeros_like(d), d), first.t()


def quantize_iq4(x: torch.Tensor, super_block: bool, ntry: int = 7) -> dict:
    """``quantize_row_iq4_nl_impl`` for IQ4_NL (``super_block`` false: ``x [R, 32]``) or IQ4_XS (``x [R, 256]``)."""
    r = x.shape[0]
    sub = x.reshape(-1, 32)
    scales, codes = _iq4_sub_blocks(sub, ntry)
    if not super_block:
        if ntry > 0:
            codes = best_index(_inverse(scales).unsqueeze(1) * sub)
        return {"d": _f16(scales), "q": codes.to(torch.uint8)}
    scales = scales.reshape(r, 8)
    _, max_scale = _signed_max(scales)
    d = -max_scale / 32
    l6 = nearest_int(_inverse(d).unsqueeze(1) * scales).clamp(-32, 31)
    dl = d.unsqueeze(1) * l6.to(_F)
    codes = best_index(_inverse(dl).reshape(-1, 1) * sub)
    return {"d": _f16(d), "sc": (l6 + 32).to(torch.uint8), "q": codes.reshape(r, QK_K).to(torch.uint8)}


def quantize_blocks(name: str, x: torch.Tensor) -> dict:
    """Fields of ``x float32 [R, QK]`` quantized to ggml type ``name`` by llama.cpp's reference rules."""
    x = x.to(_F).contiguous()
    if name in ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0"):
        return quantize_legacy(name, x)
    if name == "q2_k":
        return quantize_q2_k(x)
    if name == "q3_k":
        return quantize_q3_k(x)
    if name in ("q4_k", "q5_k"):
        return quantize_q45_k(x, name == "q5_k")
    if name == "q6_k":
        return quantize_q6_k(x)
    if name in ("iq4_nl", "iq4_xs"):
        return quantize_iq4(x, name == "iq4_xs")
    raise ValueError(f"no quantizer for ggml type {name!r}")
