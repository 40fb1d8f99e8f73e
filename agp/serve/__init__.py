"""Two hosts: the resume server (layers [b, L) over AGP-PTP), the reflex side's client, the naive
split on mx.distributed (the baseline), and their test tools (a delaying TCP relay, network-namespace
pairs)."""
