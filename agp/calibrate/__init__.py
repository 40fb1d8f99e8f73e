"""Calibration: classification metrics, ECE, temperature scaling, per-action thresholds, abstain."""
