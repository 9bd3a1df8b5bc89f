"""Experts: MMoE specialisation and bias correction, routing statistics of sparse MoE models."""
