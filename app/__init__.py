"""LensLab surfaces: the Python API for notebooks (``app.api``), the CLI (``app.cli``) and the
Streamlit dashboard (``app.dashboard``). Surfaces read and write the store; they never compute
what an analysis module owns."""
