"""Progress: plain lines when the stream is not a terminal, nothing when disabled."""

import io

from qcompile.progress import progress


def test_plain_lines_off_a_terminal():
    stream = io.StringIO()
    assert list(progress(range(30), "quantize", stream=stream)) == list(range(30))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10 and lines[0].startswith("quantize: 3/30 layers (10%)")
    assert lines[-1].startswith("quantize: 30/30 layers (100%)")


def test_disabled_and_single_items_are_silent():
    stream = io.StringIO()
    assert list(progress(range(5), "x", enabled=False, stream=stream)) == list(range(5))
    assert list(progress([1], "x", stream=stream)) == [1]
    assert stream.getvalue() == ""


def test_units():
    stream = io.StringIO()
    list(progress(range(2), "calibrate", stream=stream, unit="block"))
    assert stream.getvalue().splitlines()[-1].startswith("calibrate: 2/2 blocks (100%)")
