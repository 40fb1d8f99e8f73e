"""`agp bench` applications: one module per target, measuring the library from above.

Nothing in the library imports this package; `agp/commands/bench.py` wires the targets.
"""
