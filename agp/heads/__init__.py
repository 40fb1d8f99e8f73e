"""Controller heads (route, vitality, earliest layer) reading hidden states only, and the baselines."""
