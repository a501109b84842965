"""cpp kernels for ``qcompile::linear`` (registered in ``qcompile.runtime.dispatch``)."""


def register() -> None:
    """Register this package's kernels; none yet."""
