"""Atomic ``.qpt`` writes: a process killed (SIGKILL) in the middle of an export leaves the old file intact,
and the half-written temp file never loads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from qcompile.export import export, load
from qcompile.runtime.qpt_format import ArtifactError

# the child re-exports a loaded program over the same path with a writer slowed to a crawl
_CHILD = textwrap.dedent(
    """
    import sys, time
    import qcompile.runtime.qpt_writer as writer
    from qcompile.export import export, load

    program = load(sys.argv[1])
    original = writer._write_chunk

    def slow(f, chunk):
        original(f, chunk)
        f.flush()
        time.sleep(0.5)

    writer._write_chunk = slow
    export(program, sys.argv[1])
    """
)


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(64, 32)

    def forward(self, x):
        return self.proj(x)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_sigkill_during_export_keeps_the_old_file(tmp_path):
    path = tmp_path / "model.qpt"
    export(_Model().eval(), (torch.randn(2, 64),), "int8", path, progress_bar=False)
    before = path.read_bytes()
    x = torch.randn(5, 64)
    expected = load(path)(x)
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(path)], stderr=subprocess.PIPE)
    temp = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and temp is None:
        temps = [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
        temp = tmp_path / temps[0] if temps and (tmp_path / temps[0]).stat().st_size > 0 else None
        time.sleep(0.05)
    assert temp is not None, child.communicate(timeout=5)[1].decode()[-2000:]
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert path.read_bytes() == before
    torch.testing.assert_close(load(path)(x), expected, rtol=0, atol=0)
    assert temp.exists()  # the killed writer could not clean up; its file is not a .qpt
    with pytest.raises(ArtifactError, match="magic"):
        load(temp)


def test_failed_export_leaves_no_temp_file(tmp_path, monkeypatch):
    import qcompile.runtime.qpt_writer as writer

    path = tmp_path / "model.qpt"
    export(_Model().eval(), (torch.randn(2, 64),), "int8", path, progress_bar=False)
    before = path.read_bytes()

    def fail(f, chunk):
        raise OSError("disk full")

    monkeypatch.setattr(writer, "_write_chunk", fail)
    with pytest.raises(OSError, match="disk full"):
        export(load(path), path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["model.qpt"]
