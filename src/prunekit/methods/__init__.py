"""Mask methods: unstructured magnitude, Wanda, SparseGPT, N:M and block sparsity, with their calibration."""
