"""Every gate threshold, with the measurement or reasoning that justifies it.

A threshold here is a claim about a real run: change it only with a new measurement, and
say which run in the comment.
"""

# --- issue 5: codecs and AGP-PTP (branch codecs) -----------------------------------------------
# Done-when of issue 5: a 4-bit TurboQuant packet of one 640-d state, all five sections and headers
# included, is at most one third of the same packet carrying fp16. Measured 2026-11-29 (tests/test_ptp_size.py):
# 473 B vs 1427 B = 0.331 (header 15 + table 26 + identity 45 + trajectory 16 + vitality 11 + semantic 23
# + payload 337); the codes alone are 320 vs 1280 B, so the 1/3 holds while metadata stays under ~151 B.
PTP_TQ4_OVER_FP16_MAX = 1 / 3
# TurboQuant 4-bit on real Gemma 3 270M states (agp bench codecs, 00:50 UTC 2026-11-29, 1441 prompt-pack tokens):
# mean cosine 0.9948 after layer 12 and 0.9956 after layer 6 -> floor 0.99 (tests/test_quant_bench.py, slow).
TQ4_REAL_COS_MIN = 0.99
# Centering on a shared per-layer mean cut MSE/dev from 9.1e-2 to 9.5e-3 (layer 12) and 1.03e-1 to 9.6e-3
# (layer 6), i.e. 9.6x and 10.7x; the test (3 prompts, 48 tokens) asks for at least 4x.
TQ_CENTERING_GAIN_MIN = 4.0
# --- end issue 5 ---------------------------------------------------------------------------------
