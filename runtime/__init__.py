"""Runtime: the ``qcompile::*`` custom ops, kernel dispatch, and (later) the ``.qpt`` loader."""

from qcompile.runtime import ops  # noqa: F401  (registers torch.ops.qcompile.*)
