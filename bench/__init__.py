"""Benchmark harnesses (``python3 -m bench`` runs the standard set)."""
