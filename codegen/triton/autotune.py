"""Tuned launch configs: a small search per key on a real GPU, one fixed config under the interpreter.

``triton.autotune`` is not used: it fails in the interpreter with more than one config, cannot be exported
into a ``.qpt`` artifact, and re-tunes in every process. Instead :func:`choose_config` times the candidate
configs on the first call for a key and keeps the winner

* in memory, and
* on disk, in ``$QCOMPILE_CACHE_DIR`` or ``~/.cache/qcompile/triton/tuned-configs.json`` (written atomically),

keyed by ``kernel | M bucket | N | K | group size | device name | triton version``. The table can be exported
as plain JSON (:func:`export_tuned_configs`) and loaded back (:func:`load_tuned_configs`), so an artifact can
carry the configs it was tuned with. Under ``TRITON_INTERPRET=1``, while a CUDA graph is being captured, and with
``QCOMPILE_TRITON_TUNE=0``, a key without a cached config gets the kernel's default config and nothing is timed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import tempfile
import threading
import warnings
from pathlib import Path
from collections.abc import Callable, Sequence

import torch

from qcompile.cache import cache_root
from qcompile.codegen.triton.common import (
    device_name, interpreting, m_bucket, tracing, triton_version, tuning_tensors, untraced,
)  # fmt: skip

log = logging.getLogger("qcompile")

FORMAT_VERSION = 1
CACHE_FILE = "tuned-configs.json"
#: ``QCOMPILE_TRITON_TUNE=0`` skips the search: keys without a cached config use the kernel's default config
TUNE_ENV = "QCOMPILE_TRITON_TUNE"


class NewerConfigError(ValueError):
    """A tuned config with fields or forms this version does not know: written by a newer qcompile. Readers skip it
    (tuning or the default config serves that key) rather than refuse the file it came in."""


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch parameters of one kernel launch."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    #: 1: dequantize the whole weight to the activation dtype (blocks are the dequantize tiles), then cuBLAS
    dequant: int = 0
    #: int4: 1 loads the packed bytes as int32 words, 8 nibbles each (ignored where rows or groups do not allow it);
    #: 2 also splits a dot of up to 16 rows into one dot per plane of nibble pairs (the activations gathered to match)
    words: int = 0

    def __post_init__(self):
        for field in ("block_m", "block_n", "block_k"):
            value = getattr(self, field)
            if value < 1 or value & (value - 1):
                raise ValueError(f"KernelConfig.{field} must be a power of two, got {value}")
        if self.split_k < 1 or self.num_warps < 1 or self.num_stages < 1 or self.group_m < 1:
            raise ValueError(f"KernelConfig fields must be positive: {self}")
        if self.dequant not in (0, 1) or self.words < 0:
            raise ValueError(f"KernelConfig.dequant must be 0 or 1 and .words 0, 1 or 2: {self}")
        if self.words > 2:
            raise NewerConfigError(f"KernelConfig.words must be 0, 1 or 2 in this version, got {self.words}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def label(self) -> str:
        """Short form for tables: ``64x128x128 sk1 w4 s3 words`` (tile, split, warps, stages, form)."""
        form = "dequant" if self.dequant else ("bytes", "words", "planes")[self.words]
        return (f"{self.block_m}x{self.block_n}x{self.block_k} sk{self.split_k} w{self.num_warps} "
                f"s{self.num_stages} {form}")  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict) -> KernelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise NewerConfigError(f"tuned config has unknown fields {sorted(unknown)}; known: {sorted(names)}")
        return cls(**{k: int(v) for k, v in data.items()})


def tune_key(kernel: str, m: int, n: int, k: int, group_size: int, device: torch.device) -> str:
    return f"{kernel}|m{m_bucket(m)}|n{n}|k{k}|g{group_size}|{device_name(device)}|triton-{triton_version()}"


def default_cache_path() -> Path:
    return cache_root() / "triton" / CACHE_FILE


class TunedConfigs:
    """Tuned configs by key, mirrored to one JSON file."""

    def __init__(self, path: Path | None):
        self.path = path
        self._configs: dict[str, KernelConfig] = {}
        self._loaded_file = False
        self._lock = threading.Lock()

    def _load_file(self) -> None:
        if self._loaded_file or self.path is None:
            return
        self._loaded_file = True
        try:
            data = json.loads(self.path.read_text())
            self._configs.update(_parse(data, str(self.path)))
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as error:
            warnings.warn(f"qcompile: ignoring the tuned-config cache {self.path} ({error}); it will be rewritten")

    def get(self, key: str) -> KernelConfig | None:
        with self._lock:
            self._load_file()
            return self._configs.get(key)

    def put(self, key: str, config: KernelConfig) -> None:
        with self._lock:
            self._load_file()
            self._configs[key] = config
            self._write()

    def update(self, configs: dict[str, KernelConfig], persist: bool) -> None:
        with self._lock:
            self._load_file()
            self._configs.update(configs)
            if persist:
                self._write()

    def export(self) -> dict:
        with self._lock:
            self._load_file()
            return {"format": FORMAT_VERSION, "configs": {k: c.to_dict() for k, c in sorted(self._configs.items())}}

    def _write(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            payload = {"format": FORMAT_VERSION, "configs": {k: c.to_dict() for k, c in sorted(self._configs.items())}}
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tuned-", suffix=".json")
            with os.fdopen(fd, "w") as handle:
                json.dump(payload, handle, indent=1)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except OSError as error:
            warnings.warn(f"qcompile: could not write the tuned-config cache {self.path} ({error})")


def _parse(data: dict, where: str) -> dict[str, KernelConfig]:
    if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
        raise ValueError(f"{where}: expected {{'format': {FORMAT_VERSION}, 'configs': {{...}}}}")
    configs = data.get("configs", {})
    if not isinstance(configs, dict):
        raise TypeError(f"{where}: 'configs' must map keys to configs")
    out, newer = {}, []
    for key, value in configs.items():
        try:
            out[str(key)] = KernelConfig.from_dict(value)
        except NewerConfigError:
            newer.append(str(key))
    if newer:
        warnings.warn(
            f"qcompile: {where}: skipping {len(newer)} tuned config(s) from a newer qcompile ({newer[0]}, ...)"
        )
    return out


STORE = TunedConfigs(default_cache_path())


def export_tuned_configs() -> dict:
    """Every tuned config known to this process (memory and disk cache), as a JSON-able dict."""
    return STORE.export()


def load_tuned_configs(data: dict, persist: bool = False) -> int:
    """Adopt configs from :func:`export_tuned_configs` output (e.g. from a ``.qpt``); returns how many."""
    configs = _parse(data, "tuned configs")
    STORE.update(configs, persist=persist)
    from qcompile.runtime import dispatch  # bound launches keep their configs: bind afresh

    dispatch.forget_choices()
    return len(configs)


def choose_config(
    key: str,
    candidates: Sequence[KernelConfig] | Callable[[], Sequence[KernelConfig]],
    default: KernelConfig,
    launch: Callable[[KernelConfig], object],
    device: torch.device,
) -> KernelConfig:
    """The tuned config for ``key``; on a GPU the first call times ``launch(config)`` for every candidate.

    ``candidates`` may be a callable, called only when a search runs (:func:`search`, timed by
    :class:`GraphTimer`).
    """
    if interpreting() or device.type != "cuda":
        return default
    cached = STORE.get(key)
    if cached is not None:
        return cached
    if torch.cuda.is_current_stream_capturing() or os.environ.get(TUNE_ENV) == "0":
        return default
    candidates = list(candidates() if callable(candidates) else candidates)
    if not candidates:
        return default
    try:
        timer = GraphTimer(device)
    except Exception as error:  # noqa: BLE001 - no graphs here (a driver or allocator setting): tuning is skipped
        _warn_once(f"qcompile: Triton kernels run with default configs: CUDA-graph timing failed ({error})")
        return default
    best, timings = search(key, candidates, default, launch, timer.time)
    if os.environ.get(TUNE_LOG_ENV) == "1":
        lines = [f"  {ms * 1e3:9.1f} us  {config}" for ms, config in sorted(timings, key=lambda t: t[0])]
        print(f"qcompile: tuned {key} ({len(timings)} of {len(candidates)} ran)\n" + "\n".join(lines[:8]), flush=True)
    STORE.put(key, best)
    return best


def search(key: str, candidates: Sequence[KernelConfig], default: KernelConfig,
           launch: Callable[[KernelConfig], torch.Tensor], time: Callable[[Callable[[], object]], float],
           ) -> tuple[KernelConfig, list[tuple[float, KernelConfig]]]:  # fmt: skip
    """``(fastest config, [(ms, config), ...])`` over the candidates that launch and agree with ``default``.

    A candidate that raises (too much shared memory, too many registers) is skipped; one whose output differs
    from the default config's by more than ``TUNE_TOLERANCE`` of its largest value is dropped with a warning.
    With no survivor the default wins.
    """
    expected = launch(default).float()
    tolerance = TUNE_TOLERANCE * expected.abs().max().item()
    timings = []
    for config in candidates:
        try:
            error = (launch(config).float() - expected).abs().max().item()
            if not error <= tolerance:  # a candidate that computes something else never wins
                log.warning("qcompile: tuning %s drops %s: max error %.3g against the default config", key, config,
                            error)  # fmt: skip
                continue
            timings.append((time(functools.partial(launch, config)), config))
        except Exception as error:  # noqa: BLE001 - a config that does not fit (shared memory, registers) is skipped
            log.debug("qcompile: tuning %s skips %s (%s)", key, config, error)
    return (min(timings, key=lambda t: t[0])[1] if timings else default), timings


#: a candidate's output may differ from the default config's by this fraction of its largest value (summation
#: order and split-K atomics); more means a broken config, which is dropped
TUNE_TOLERANCE = 2e-2
_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message)


#: ``QCOMPILE_TRITON_TUNE_LOG=1`` prints the fastest candidates of every search
TUNE_LOG_ENV = "QCOMPILE_TRITON_TUNE_LOG"


def graph_replay_ms(fn: Callable[[], object], samples: int = 3) -> float:
    """Fastest of ``samples`` replays (ms) of ``fn`` captured once in a CUDA graph, after one warm-up call on a side
    stream (which compiles, allocates, and raises for a launch that cannot run)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(samples):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return min(times)


class GraphTimer:
    """GPU time of one launch: ``REPEATS`` launches, each after an L2 flush, captured in a CUDA graph and replayed,
    minus the flushes alone. Python launch overhead is left out (it would swamp microsecond kernels) and every
    launch reads its weights from device memory, as a model's layers do."""

    REPEATS = 8
    FLUSH_BYTES = 192 << 20  # over three times the largest L2 (60 MB on an H200)

    def __init__(self, device: torch.device):
        self.flush = torch.empty(self.FLUSH_BYTES, dtype=torch.uint8, device=device)
        self.baseline = self._flushed_ms(lambda: None)

    def time(self, fn: Callable[[], object]) -> float:
        """Milliseconds per call of ``fn``."""
        return max(0.0, self._flushed_ms(fn) - self.baseline) / self.REPEATS

    def _flushed_ms(self, fn) -> float:
        def flushed():
            for _ in range(self.REPEATS):
                self.flush.zero_()
                fn()

        return graph_replay_ms(flushed)


class BoundLaunches:
    """The launches of one call signature, for launchers bound to it (the dispatch rows' ``bind``).

    ``bound(variant, *tensors)`` picks the config once (``config`` when given; else the tuned one under ``key()``, or
    a search of ``candidates()`` against ``default``, on the first call; kept on this object, which dispatch keeps
    per call signature — not while a CUDA graph is being captured, where the search is skipped) and runs the launch
    that ``build(config, variant)`` made for it, once per ``(config, variant)``. ``variant`` is whatever the family's
    launch depends on beyond the signature (e.g. whether the weight's address allows word loads).
    """

    def __init__(self, key: Callable[[], str], candidates: Callable[[], list[KernelConfig]],
                 default: Callable[[], KernelConfig], build: Callable, device: torch.device,
                 config: KernelConfig | None = None):  # fmt: skip
        self.key, self.candidates, self.default = key, candidates, default
        self.build, self.device, self.config = build, device, config
        self.launches: dict[tuple, Callable[..., torch.Tensor]] = {}

    def __call__(self, variant, *tensors) -> torch.Tensor:
        config = self.config
        if tracing():
            config = self._traced_config(config, variant, tensors)
        elif config is None:
            config = self._choice(variant, tensors)
        return self.run(config, variant, tensors)

    def _traced_config(self, config: KernelConfig | None, variant, tensors: tuple) -> KernelConfig:
        """While tracing (``common.traced_launches``): the config (the memoized one, else the tuned one, else one
        tuned now, else the default), launched once for real where it has not run yet. Both the search and that
        launch run on real tensors shaped like the traced ones (on a GPU, where the tracer makes them; asked for once
        per call), outside the trace; the launch lets one that needs more shared memory than the device has step its
        stages down (``common.fewer_stages``) before the graph records it."""
        if interpreting() or self.device.type != "cuda":
            return config or self.default()
        if config is None:
            config = STORE.get(self.key()) or (self.default() if os.environ.get(TUNE_ENV) == "0" else None)
        if config is not None and (config, variant) in self.launches:
            return config
        real = tuning_tensors(tensors)
        if real is None:
            return config or self.default()
        with untraced():
            config = config or self._choice(variant, real)
            if (config, variant) not in self.launches:
                self.run(config, variant, real)
        return config

    def _choice(self, variant, tensors: tuple) -> KernelConfig:
        config = choose_config(self.key(), self.candidates, self.default(), lambda c: self.run(c, variant, tensors),
                               self.device)  # fmt: skip
        if not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
            self.config = config
        return config

    def run(self, config: KernelConfig, variant, tensors: tuple) -> torch.Tensor:
        launch = self.launches.get((config, variant))
        if launch is None:
            launch = self.launches[(config, variant)] = self.build(config, variant)
        return launch(*tensors)
