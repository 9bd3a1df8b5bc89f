"""Attention circuits: exact singular-value spectra of every head's QK and OV circuit (``spectra``: the maths;
``weights``: the heads of a booted TransformerBridge, grouped-query attention; ``pipeline``: the stored analysis)."""
