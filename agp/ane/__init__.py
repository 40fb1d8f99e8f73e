"""Core ML export of the shallow heads (coremltools MIL builder) and its parity checks."""
