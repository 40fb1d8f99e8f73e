"""AGP-PTP v1: round trips (hypothesis), typed rejections, compatibility checks, replay window, loopback."""
import dataclasses
import struct

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from agp.errors import AGPError
from agp.ptp import errors as E
from agp.bench.ptp_fuzz import HOST, MODEL_FP, QUANT, TOK_FP, receiver, reseal, sample_packet, section_spans
from agp.ptp.loopback import LoopbackLink, dump, recv_frame
from agp.ptp.packet import encode_packet, section_sizes
from agp.ptp.receiver import ReplayWindow
from agp.ptp.sections import (DEAD_FLAGS, QUANTIZATIONS, Identity, Packet, Payload, Semantic, Trajectory,
                              Vitality, fingerprint8, host_id)
from agp.quant.codec import FP16
from agp.quant.turboquant import TurboQuant

f16s = st.floats(-60000, 60000, allow_nan=False, width=16)
hosts = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=64)
ids16 = st.lists(st.integers(0, 2**16 - 1), max_size=20, unique=True).map(sorted)


@st.composite
def identities(draw):
    return Identity(draw(st.binary(min_size=8, max_size=8)), draw(st.binary(min_size=8, max_size=8)),
                    draw(st.sampled_from(QUANTIZATIONS)), draw(st.integers(0, 2**64 - 1)),
                    draw(st.integers(0, 2**32 - 1)), draw(st.integers(1, 2**16 - 1)), draw(st.integers(0, 2**16 - 1)),
                    draw(st.integers(0, 2**32 - 1)), draw(hosts), draw(st.binary(min_size=4, max_size=4)))


@settings(max_examples=60, deadline=None)
@given(idn=identities())
def test_identity_roundtrip(idn):
    assert Identity.unpack(idn.pack()) == idn


@settings(max_examples=60, deadline=None)
@given(t=st.lists(f16s, min_size=8, max_size=8), v=st.lists(f16s, min_size=5, max_size=5),
       flags=st.sets(st.sampled_from(DEAD_FLAGS)))
def test_trajectory_and_vitality_roundtrip(t, v, flags):
    tr = Trajectory(*t)
    assert Trajectory.unpack(tr.pack()) == tr
    vi = Vitality(*v, flags=frozenset(flags))
    assert Vitality.unpack(vi.pack()) == vi


@settings(max_examples=60, deadline=None)
@given(p=ids16, i=ids16, b=st.lists(st.integers(0, 2**32 - 1), max_size=10, unique=True).map(sorted),
       risk=f16s, data=st.data())
def test_semantic_roundtrip(p, i, b, risk, data):
    vals = lambda ids: [(k, data.draw(f16s)) for k in ids]  # noqa: E731
    s = Semantic(vals(p), vals(i), vals(b), risk)
    out = Semantic.unpack(s.pack())
    assert out.same_as(s) and out.pack() == s.pack()
    assert list(out.primitives["id"]) == p


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_packet_roundtrip_is_canonical(seed):
    rng = np.random.default_rng(seed)
    pkt = sample_packet(rng)
    data = encode_packet(pkt)
    out = receiver().receive(data)
    assert encode_packet(out) == data
    assert out.identity == pkt.identity
    for a, b in ((out.trajectory, pkt.trajectory), (out.vitality, pkt.vitality), (out.semantic, pkt.semantic)):
        assert (a is None and b is None) or a.pack() == b.pack()  # equal on the wire (fp16-rounded)
    assert bytes(out.payload.residual) == pkt.payload.residual
    assert sum(section_sizes(data).values()) == len(data)


def _fp16_packet(seq=1, **idkw):
    x = np.linspace(-3, 3, 640, dtype=np.float32).reshape(1, 640)
    kw = dict(model_fp=MODEL_FP, tokenizer_fp=TOK_FP, quantization=QUANT, session_id=7, span_start=0, span_len=1,
              layer=12, seq=seq, source_host="host-a", target_host=HOST) | idkw
    return Packet(Identity(**kw), Payload(FP16().encode(x)), Trajectory(), Vitality(), Semantic())


def test_payload_decode_is_zero_copy():
    data = encode_packet(_fp16_packet())
    arr = receiver().receive(data).payload.array()
    assert arr.dtype == np.float16 and not arr.flags.owndata and not arr.flags.writeable
    np.testing.assert_allclose(arr.astype(np.float32), np.linspace(-3, 3, 640).reshape(1, 640), atol=2e-3)


def _reject(data, cls, rcv=None, match=None):
    with pytest.raises(cls, match=match) as ei:
        (rcv or receiver()).receive(data)
    assert isinstance(ei.value, AGPError) and ei.value.reason == cls.reason
    return ei.value


def test_framing_rejections_name_the_reason():
    data = encode_packet(_fp16_packet())
    _reject(data[:10], E.TruncatedPacket, match="shorter than the 15-byte header")
    _reject(data[:-1], E.TruncatedPacket, match="claims")
    _reject(data + b"\0", E.LengthMismatch)
    _reject(b"XGPP" + data[4:], E.BadMagic)
    _reject(data[:4] + b"\x02" + data[5:], E.UnsupportedVersion, match="version 2")
    _reject(data[:5] + b"\x02" + data[6:], E.MalformedHeader, match="reserved flag")
    _reject(data[:6] + b"\x0e" + data[7:], E.MalformedHeader, match="identity and payload")
    flipped = bytearray(data)
    flipped[-5] ^= 0x10
    err = _reject(bytes(flipped), E.ChecksumMismatch, match="payload section")
    assert err.section == "payload"
    hdr = bytearray(data)
    hdr[15] ^= 0x01  # identity length in the table: lengths stop adding up
    _reject(bytes(hdr), E.LengthMismatch)
    crc = bytearray(data)
    crc[12] ^= 0xFF
    _reject(bytes(crc), E.ChecksumMismatch, match="whole-packet")


def test_compatibility_rejections():
    base = _fp16_packet()
    _reject(encode_packet(_fp16_packet(model_fp="ee" * 32)), E.FingerprintMismatch, match="model fingerprint")
    _reject(encode_packet(_fp16_packet(tokenizer_fp="ee" * 32)), E.FingerprintMismatch, match="tokenizer")
    _reject(encode_packet(_fp16_packet(quantization="f16")), E.FingerprintMismatch, match="quantization")
    _reject(encode_packet(_fp16_packet(target_host="host-c")), E.HostMismatch)
    _reject(encode_packet(dataclasses.replace(base, loopback=True)), E.LoopbackMismatch, match="production receiver")
    _reject(encode_packet(_fp16_packet(span_len=2)), E.MalformedSection, match="span_len=2")
    narrow = type(receiver())(MODEL_FP, TOK_FP, QUANT, HOST, hidden_size=1536)
    _reject(encode_packet(base), E.FingerprintMismatch, rcv=narrow, match="hidden size 1536")
    only_q8 = receiver()
    only_q8 = type(only_q8)(MODEL_FP, TOK_FP, QUANT, HOST, codecs={"q8_0": (1,)})
    _reject(encode_packet(base), E.UnknownCodec, rcv=only_q8, match="not accepted")
    old = type(only_q8)(MODEL_FP, TOK_FP, QUANT, HOST, codecs={"fp16": (0,)})
    _reject(encode_packet(base), E.CodecVersionMismatch, rcv=old)


def test_resealed_section_damage_is_caught_by_the_parsers():
    data = encode_packet(_fp16_packet())
    spans = section_spans(data)

    def patch(section, rel, value):
        b = bytearray(data)
        b[spans[section][0] + rel] = value
        return reseal(b, spans)

    _reject(patch(0, 16, 99), E.MalformedSection, match="quantization code 99")
    _reject(patch(1, 1, 0x7C), E.MalformedSection, match="non-finite")  # f16 inf
    _reject(patch(2, 10, 0xF0), E.MalformedSection, match="reserved dead-state")
    _reject(patch(3, 0, 3), E.MalformedSection, match="semantic section is 5 bytes")
    _reject(patch(4, 0, 0x80), E.MalformedSection, match="reserved payload flag")
    _reject(patch(4, 1, 77), E.UnknownCodec, match="unknown codec id 77")
    _reject(patch(4, 2, 9), E.CodecVersionMismatch, match="version 9")
    _reject(patch(4, 4, 0x02), E.MalformedSection, match="header implies")  # shape [1,640] -> [2,640]: body too short


def test_replay_window():
    r = receiver()
    for seq in (5, 3, 4):  # out of order inside the window is fine
        r.receive(encode_packet(_fp16_packet(seq=seq)))
    _reject(encode_packet(_fp16_packet(seq=4)), E.ReplayRejected, rcv=r, match="duplicate")
    r.receive(encode_packet(_fp16_packet(seq=5000)))
    _reject(encode_packet(_fp16_packet(seq=3000)), E.ReplayRejected, rcv=r, match="stale")
    # a rejected packet does not advance the window
    _reject(encode_packet(_fp16_packet(seq=9000, model_fp="ee" * 32)), E.FingerprintMismatch, rcv=r)
    r.receive(encode_packet(_fp16_packet(seq=4500)))


def test_replay_memory_is_bounded_and_evicted_sessions_stay_rejected():
    w = ReplayWindow(window=64, max_sessions=8)
    for s in range(100):
        w.check(s, 1)
    assert len(w) == 8 and len(w._retired) == 32  # both bounded, whatever the sender does
    with pytest.raises(E.ReplayRejected, match="evicted"):
        w.check(90, 2)
    w.check(99, 2)


def test_encoder_refuses_bad_fields():
    with pytest.raises(AGPError, match="host name"):
        encode_packet(_fp16_packet(source_host="has space"))
    with pytest.raises(AGPError, match="unknown quantization"):
        encode_packet(_fp16_packet(quantization="int3"))
    with pytest.raises(AGPError, match="finite"):
        encode_packet(dataclasses.replace(_fp16_packet(), trajectory=Trajectory(commitment=1e6)))
    with pytest.raises(AGPError, match="strictly increasing"):
        encode_packet(dataclasses.replace(_fp16_packet(), semantic=Semantic([(3, 0.1), (2, 0.2)])))
    with pytest.raises(AGPError, match="out of range"):
        encode_packet(_fp16_packet(seq=2**32))


def test_fingerprint8():
    assert fingerprint8("ab" * 32) == bytes.fromhex("ab" * 8)
    assert len(fingerprint8("not hex")) == 8 and fingerprint8(b"12345678") == b"12345678"


def test_loopback_link_roundtrip_and_dump():
    x = np.random.default_rng(0).standard_normal((2, 640)).astype(np.float32)
    pkt = _fp16_packet()
    pkt = dataclasses.replace(pkt, identity=dataclasses.replace(pkt.identity, span_len=2),
                              payload=Payload(TurboQuant(640, 4).encode(x), hint=(0.995, 1.0)))
    with LoopbackLink(MODEL_FP, TOK_FP, QUANT) as link:
        got, info = link.send(pkt)
        assert got.loopback and got.identity.target_host == host_id("loopback")
        assert info["payload"]["scheme"] == "turboquant" and info["sizes"]["payload"] > 320
        cos = (got.payload.array() * x).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(got.payload.array(), axis=1)
        assert cos.min() > 0.99
        with pytest.raises(E.ReplayRejected):
            link.send(pkt)
        with pytest.raises(E.LoopbackMismatch):  # production packets never enter a loopback receiver
            link.send_bytes(encode_packet(_fp16_packet(target_host="loopback", source_host="loopback", seq=9)))
        # a frame claiming more than the limit is refused before any read of the body
        link._tx.sendall(struct.pack("<I", 2**31))
        with pytest.raises(E.LengthMismatch, match="frame claims"):
            recv_frame(link._rx)
    assert dump(encode_packet(pkt))["magic"] == "AGPP"


def test_centered_turboquant_needs_the_same_layer_mean():
    rng = np.random.default_rng(0)
    mu = rng.standard_normal(640).astype(np.float32) * 50
    mu[163] = 9000.0  # the massive shared channel of Gemma's residual stream
    x = (mu + rng.standard_normal((1, 640)).astype(np.float32) * 5)
    pkt = _fp16_packet()
    pkt.payload = Payload(TurboQuant(640, 4, center=mu).encode(x))
    data = encode_packet(pkt)
    good = type(receiver())(MODEL_FP, TOK_FP, QUANT, HOST, centers={12: mu})
    state = good.state(good.receive(data))
    dev = x - mu
    assert np.sum((state - x) ** 2) / np.sum(dev**2) < 0.02  # error ~1% of the token-specific part
    bare = type(receiver())(MODEL_FP, TOK_FP, QUANT, HOST)
    _reject(data, E.CenterMismatch, rcv=bare, match="none")              # receiver without means
    other = type(receiver())(MODEL_FP, TOK_FP, QUANT, HOST, centers={12: mu + 1})
    _reject(data, E.CenterMismatch, rcv=other, match="centered on mean")  # a different mean
    assert len(data) <= len(encode_packet(_fp16_packet())) / 3  # +2 bytes of center id, still <= 1/3
