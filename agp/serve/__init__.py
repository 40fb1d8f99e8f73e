"""Two hosts: the resume server (layers [b, L) over AGP-PTP) and the reflex side's client."""
