"""Run reports: markdown + JSON + PNG plots."""
