"""Oracle: per-layer probes against the full-depth teacher, earliest acceptable layer, route and vitality labels, sweeps."""
