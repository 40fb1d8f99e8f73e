"""Codecs for hidden states: fp16, q8_0 (GGML layout) and TurboQuant (rotation + Lloyd-Max + bit packing)."""
