"""Typed rejections: every bad packet raises one of these, with `.reason` a short stable code."""
from __future__ import annotations

from agp.errors import AGPError


class PTPError(AGPError):
    """A rejected AGP-PTP packet; the message names the field/offset, `.reason` is a stable code."""

    reason = "invalid"

    def __init__(self, message: str, section: str | None = None):
        super().__init__(f"AGP-PTP packet rejected ({self.reason}): {message}")
        self.section = section


class TruncatedPacket(PTPError):
    reason = "truncated"


class BadMagic(PTPError):
    reason = "magic"


class UnsupportedVersion(PTPError):
    reason = "version"


class MalformedHeader(PTPError):
    reason = "header"


class LengthMismatch(PTPError):
    reason = "length"


class ChecksumMismatch(PTPError):
    reason = "checksum"


class MalformedSection(PTPError):
    reason = "section"


class UnknownCodec(PTPError):
    reason = "codec"


class CodecVersionMismatch(PTPError):
    reason = "codec-version"


class FingerprintMismatch(PTPError):
    reason = "fingerprint"


class HostMismatch(PTPError):
    reason = "host"


class LoopbackMismatch(PTPError):
    reason = "loopback"


class ReplayRejected(PTPError):
    reason = "replay"


class CenterMismatch(PTPError):
    reason = "center"
