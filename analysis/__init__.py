"""LensLab analyses: model sources, pure weight/activation analyses and the results store.

Data flows one way: source -> loader -> analysis -> store -> surfaces (``app/``).
Nothing in this package imports Streamlit.
"""
