"""Every gate threshold, with the measurement or reasoning that justifies it.

A threshold here is a claim about a real run: change it only with a new measurement, and
say which run in the comment.
"""
