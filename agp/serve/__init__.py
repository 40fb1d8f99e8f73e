"""Serving: the resume server and the two-host splits (over backbone, runtime and transfer)."""
