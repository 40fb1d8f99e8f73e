"""Energy around a measured window: powermetrics (macOS), RAPL (Linux), else a labelled CPU-seconds proxy."""
