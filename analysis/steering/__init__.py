"""Steering vectors: contrast sets, extraction, hooks, dose-response, vectors on disk, weight orthogonalisation."""
