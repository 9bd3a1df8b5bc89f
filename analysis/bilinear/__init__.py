"""Bilinear MLPs: eigendecomposition of GLU interaction matrices, direction specs, reports."""
