"""LensLab probes: trainable heads on frozen features (linear probes, MMoE layers).

Trained objects follow one convention: the constructor stores arguments, ``fit`` returns
``self``, learned state ends in ``_``. Nothing here touches the results store or Streamlit.
"""
