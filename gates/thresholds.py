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
