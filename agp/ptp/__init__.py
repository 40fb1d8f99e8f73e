"""AGP-PTP v1: the binary packet that moves a hidden state between hosts (spec: docs/ptp.md)."""
from agp.ptp.errors import PTPError  # noqa: F401
from agp.ptp.packet import decode_packet, encode_packet  # noqa: F401
from agp.ptp.receiver import Receiver  # noqa: F401
from agp.ptp.sections import Identity, Packet, Payload, Semantic, Trajectory, Vitality  # noqa: F401
