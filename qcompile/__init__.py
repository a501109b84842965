"""qcompile: a PyTorch 2 quantization compiler."""

__version__ = "0.1.0"

from qcompile import runtime  # noqa: F401,E402  (registers torch.ops.qcompile.*)
from qcompile.schemes import Scheme, parse_scheme  # noqa: E402
