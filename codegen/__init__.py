"""Kernel generation: ``cpp/`` for CPUs, ``triton/`` for GPUs. Kernels register in ``qcompile.runtime.dispatch``."""
