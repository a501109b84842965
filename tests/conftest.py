import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on CPU tensors in this suite
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def gpu_skip_reason() -> str | None:
    """Why ``gpu`` tests cannot run in this process: they need CUDA tensors *and* compiled Triton kernels (the
    interpreter decides at import time, for the whole process, so ``make test-gpu`` runs them apart)."""
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    if os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0"):
        return "runs in `make test-gpu` (this process runs Triton under its interpreter)"
    return None


def pytest_collection_modifyitems(config, items):
    reason = gpu_skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
