"""Tuned Triton configs ride in a ``.qpt`` manifest: export keeps the ones for the model's shapes, load adopts
them, and a damaged section is refused with an error naming it."""

from __future__ import annotations

import json

import pytest
import torch

from qcompile.codegen.triton import autotune
from qcompile.export import export, load
from qcompile.runtime.qpt_format import ArtifactError
from qcompile.runtime.qpt_kernels import adopt_kernels_json

SITE_KEY = "int4-gemv|m1|n32|k96|g32|Some GPU|triton-9.9"  # the model's first layer: N=32, K=96
OTHER_KEY = "int4-gemv|m1|n4096|k4096|g32|Some GPU|triton-9.9"
CONFIG = autotune.KernelConfig(1, 64, 32, split_k=4, words=1)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(96, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16)).eval()


@pytest.fixture
def store(monkeypatch):
    """A fresh, memory-only config store for the test."""
    fresh = autotune.TunedConfigs(None)
    monkeypatch.setattr(autotune, "STORE", fresh)
    return fresh


def _manifest(path) -> dict:
    from qcompile.runtime.qpt_reader import read_artifact

    return read_artifact(path).manifest


def test_configs_for_the_model_shapes_round_trip(store, tmp_path):
    autotune.load_tuned_configs({"format": 1, "configs": {SITE_KEY: CONFIG.to_dict(), OTHER_KEY: CONFIG.to_dict()}})
    path = tmp_path / "m.qpt"
    export(_model(), (torch.randn(4, 96),), "int4-g32", path, progress_bar=False)
    rows = _manifest(path)["kernels"]["configs"]
    assert [row["key"] for row in rows] == [SITE_KEY]  # the 4096x4096 config is not this model's
    assert rows[0]["config"] == CONFIG.to_dict()

    store._configs.clear()
    assert store.get(SITE_KEY) is None
    load(path)
    assert store.get(SITE_KEY) == CONFIG


def test_a_model_without_tuned_configs_writes_none(store, tmp_path):
    path = tmp_path / "m.qpt"
    export(_model(), (torch.randn(4, 96),), "int8", path, progress_bar=False)
    assert _manifest(path)["kernels"] == {"configs": [], "binaries": []}


@pytest.mark.parametrize(
    "kernels,fragment",
    [
        ([], "'kernels' must be"),
        ({"configs": {}}, "'kernels' must be"),
        ({"configs": [], "binaries": "x"}, "kernels.binaries"),
        ({"configs": [{"key": SITE_KEY}]}, "kernels.configs[0]: expected"),
        ({"configs": [{"key": "", "config": {}}]}, "kernels.configs[0]: the key"),
        ({"configs": [{"key": SITE_KEY, "config": {"block_m": "1"}}]}, "map field names to integers"),
        ({"configs": [{"key": SITE_KEY, "config": {"block_m": 3, "block_n": 64, "block_k": 32}}]}, "power of two"),
        ({"configs": [{"key": SITE_KEY, "config": {"block_m": 1, "block_n": 64}}]}, "kernels.configs[0]"),
    ],
)
def test_a_damaged_section_is_refused(store, kernels, fragment):
    with pytest.raises(ArtifactError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        adopt_kernels_json(kernels)
    assert store.export()["configs"] == {}  # nothing adopted


@pytest.mark.parametrize("config", [{"block_m": 1, "block_n": 64, "block_k": 32, "bogus": 1},
                                    {"block_m": 1, "block_n": 64, "block_k": 32, "words": 3}])  # fmt: skip
def test_configs_from_a_newer_writer_are_skipped(store, config):
    """Unknown fields or forms are a newer qcompile's, not damage: those rows are skipped (saying so), the rest is
    adopted and the model loads."""
    good = {"block_m": 1, "block_n": 64, "block_k": 128, "split_k": 8}
    kernels = {"configs": [{"key": SITE_KEY + "-newer", "config": config}, {"key": SITE_KEY, "config": good}]}
    with pytest.warns(UserWarning, match="newer qcompile"):
        assert adopt_kernels_json(kernels) == 1
    assert list(store.export()["configs"]) == [SITE_KEY]


def test_a_damaged_section_in_a_file_names_the_file(store, tmp_path):
    from qcompile.runtime.qpt_reader import read_artifact
    from qcompile.runtime.qpt_writer import write_artifact

    path = tmp_path / "m.qpt"
    export(_model(), (torch.randn(4, 96),), "int8", path, progress_bar=False)
    artifact = read_artifact(path)
    manifest = {k: v for k, v in artifact.manifest.items() if k not in ("format", "members")}
    manifest["kernels"] = {"configs": [{"key": SITE_KEY, "config": {"block_m": 3, "block_n": 64, "block_k": 32}}]}
    bad = tmp_path / "bad.qpt"
    tensors = {name: {k: t.clone() for k, t in member.items()} for name, member in artifact.tensors.items()}
    write_artifact(bad, manifest, artifact.json_members, tensors)
    with pytest.raises(ArtifactError) as error:
        load(bad)
    assert str(bad) in str(error.value) and "kernels.configs[0]" in str(error.value)
    assert json.dumps(store.export()["configs"]) == "{}"
