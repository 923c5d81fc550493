"""Benchmarks of bigbatch. ``python -m benchmarks`` runs the comparison with the hand-written loop
and the popular trainers (:mod:`benchmarks.peers`); the other files here are scripts, run as
``python benchmarks/<name>.py``.
"""
