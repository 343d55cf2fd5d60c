"""Mask methods: unstructured magnitude, Wanda, SparseGPT, N:M and block sparsity, with their calibration.

A new calibration criterion is one file here with one `@register_solver(name, score=...)`,
imported below so that configs accept its name.
"""

from prunekit.methods import sparsegpt, wanda  # noqa: F401  (each registers its criterion)
