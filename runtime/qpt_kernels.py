"""The ``kernels`` section of a ``.qpt`` manifest: tuned Triton launch configs carried with the weights.

    "kernels": {"configs": [{"key": "int4-gemv|m1|n4096|k4096|g128|NVIDIA H200|triton-3.6.0",
                             "config": {"block_m": 1, "block_n": 64, "block_k": 128, "split_k": 8, ...}}],
                "binaries": []}

A key names the kernel path, M bucket, N, K, group size, device name and triton version
(``qcompile.codegen.triton.autotune.tune_key``), so on another GPU or triton it is simply never looked up.
Export keeps the tuned configs whose N and K are those of a quantized site; load adopts them in memory (the
on-disk cache is left alone), so a model tuned once starts without a search where the device matches.
``binaries`` is reserved (``docs/qpt-format.md``): its entries are ignored.
"""

from __future__ import annotations

import warnings

from qcompile.plan import Plan
from qcompile.runtime.qpt_format import ArtifactError

MAX_KEY_LENGTH = 512


def _shape_of(key: str) -> tuple[int, int] | None:
    """``(N, K)`` named by a tuned-config key, or ``None`` when the key does not name both."""
    fields = dict((part[:1], part[1:]) for part in key.split("|") if part[:1] in ("n", "k") and part[1:].isdigit())
    return (int(fields["n"]), int(fields["k"])) if len(fields) == 2 else None


def kernels_to_json(plan: Plan) -> dict:
    """The manifest's ``kernels`` section: every tuned config of this process for the plan's site shapes."""
    from qcompile.codegen.triton import autotune

    shapes = {(entry.site.out_features, entry.site.in_features) for entry in plan.quantized()}
    configs = autotune.export_tuned_configs()["configs"]
    rows = [{"key": key, "config": config} for key, config in configs.items() if _shape_of(key) in shapes]
    return {"configs": rows, "binaries": []}


def adopt_kernels_json(kernels) -> int:
    """Check the ``kernels`` section and adopt its configs; returns how many. Raises :class:`ArtifactError`."""
    from qcompile.codegen.triton import autotune

    if kernels is None:
        return 0
    if not isinstance(kernels, dict) or not isinstance(kernels.get("configs", []), list):
        raise ArtifactError("manifest: 'kernels' must be {'configs': [...], 'binaries': [...]}")
    if not isinstance(kernels.get("binaries", []), list):
        raise ArtifactError("manifest: kernels.binaries must be a list")
    configs, newer = {}, []
    for index, row in enumerate(kernels.get("configs", [])):
        where = f"manifest: kernels.configs[{index}]"
        if not isinstance(row, dict) or set(row) != {"key", "config"}:
            raise ArtifactError(f"{where}: expected {{'key': ..., 'config': {{...}}}}")
        key, config = row["key"], row["config"]
        if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_LENGTH:
            raise ArtifactError(f"{where}: the key must be a string of 1 to {MAX_KEY_LENGTH} characters")
        if not isinstance(config, dict) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                   for v in config.values()):  # fmt: skip
            raise ArtifactError(f"{where}: the config must map field names to integers")
        try:
            configs[key] = autotune.KernelConfig.from_dict(config).to_dict()
        except autotune.NewerConfigError:
            newer.append(key)  # a newer writer's form: not adopted, the key is tuned or defaulted here
        except (TypeError, ValueError) as error:
            raise ArtifactError(f"{where} ({key}): {error}") from None
    if newer:
        warnings.warn(f"qcompile: the artifact's kernels section has {len(newer)} tuned config(s) from a newer "
                      f"qcompile; they are skipped ({newer[0]}, ...)")  # fmt: skip
    return autotune.load_tuned_configs({"format": autotune.FORMAT_VERSION, "configs": configs}) if configs else 0
