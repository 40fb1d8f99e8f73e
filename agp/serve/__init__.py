"""Two hosts: the resume server (layers [b, L) over AGP-PTP), the reflex side's client, and their
test tools (a delaying TCP relay, network-namespace pairs)."""
