"""Compiled (numba) kernels for the serving hot path. Import lazily: the first import may compile."""
