"""Experts: MMoE specialisation and bias correction, routing statistics of sparse MoE models.

Maths: ``specialisation`` (gate statistics, ablations, bias correction), ``routing`` (routed-MoE
statistics and their collection). Stored results: ``data`` (which features, ``mmoe.features``),
``probe_fit`` (``mmoe.probe``), ``curves`` (``mmoe.specialisation``, ``mmoe.curve``), ``bias``
(``mmoe.bias``). ``pipeline`` registers every stored kind with the runner and holds the API.
"""
