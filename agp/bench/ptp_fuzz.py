"""Attack the AGP-PTP decoder: structured and random mutations of valid packets, counted by outcome.

Every input must either be rejected with a PTPError subclass or, for a mutation that re-seals the
checksums, be accepted only if it is a canonical valid packet (re-encoding the decoded packet gives
the same bytes). Anything else — an accepted corrupt packet, an exception that is not a PTPError, a
decode slower than `--max-ms`, or memory that grows with a claimed length — is counted as a failure.

Run: `agp bench ptp-fuzz --n 60000` (or `python -m agp.bench.ptp_fuzz --n 60000`).
"""
from __future__ import annotations

import argparse
import struct
import sys
import tracemalloc
import zlib
from collections import Counter
from dataclasses import dataclass

import numpy as np

from agp import argtypes
from agp.bench.timer import timed
from agp.ptp.errors import PTPError
from agp.ptp.packet import CRC_OFFSET, HEADER_SIZE, decode_packet, encode_packet
from agp.ptp.receiver import Receiver
from agp.ptp.sections import Identity, Packet, Payload, Semantic, Trajectory, Vitality
from agp.quant import registry
from agp.quant.codec import FP16, read_varint

MODEL_FP, TOK_FP, QUANT, HOST = "ab" * 32, "cd" * 32, "q4_k_m", "host-b"
CENTER = np.random.default_rng(7).standard_normal(64).astype(np.float32) * 30  # the layer mean for "tq4-c" packets


@dataclass
class FuzzArgs:
    n: int = 60000          # mutated inputs to try
    seed: int = 0
    max_ms: float = 50.0    # a single decode slower than this counts as a hang
    progress: bool = True


def receiver(loopback: bool = False) -> Receiver:
    return Receiver(MODEL_FP, TOK_FP, QUANT, "loopback" if loopback else HOST, loopback=loopback,
                    centers={layer: CENTER for layer in range(18)})


def sample_packet(rng: np.random.Generator, seq: int = 1, dim: int | None = None, codec: str | None = None,
                  loopback: bool = False) -> Packet:
    """A random valid packet (random codec, sizes and optional sections) accepted by `receiver()`."""
    codec = codec or str(rng.choice(["f32", "fp16", "q8_0", "tq2", "tq3", "tq4", "tq8", "tq4-qjl", "tq4-c"]))
    dim = 64 if codec == "tq4-c" else dim or int(rng.choice([32, 64, 100, 256]))
    span = int(rng.integers(1, 4))
    x = (rng.standard_normal((span, dim)) * rng.uniform(0.1, 50)).astype(np.float32)
    seed = int(rng.integers(0, 1000)) if codec.startswith("tq") else 0
    enc = registry.make_codec(codec, dim, seed, center=CENTER if codec == "tq4-c" else None)
    host = "loopback" if loopback else HOST
    idn = Identity(MODEL_FP, TOK_FP, QUANT, int(rng.integers(0, 2**63)), int(rng.integers(0, 10000)), span,
                   int(rng.integers(0, 18)), seq, "loopback" if loopback else "host-a", host)
    pick = rng.random(4) < 0.7
    kv = FP16().encode(rng.standard_normal((2, 8)).astype(np.float32)) if pick[3] else None
    sem = Semantic(sorted({(int(i), float(rng.random())) for i in rng.choice(64, int(rng.integers(0, 4)), replace=False)}),
                   [(3, 0.5)], [(int(rng.integers(0, 2**32)), 0.25)], float(rng.random())) if pick[2] else None
    return Packet(idn, Payload(enc.encode(x), kv_summary=kv, hint=(0.99, 1.0) if pick[0] else None),
                  Trajectory(*rng.random(8).tolist()) if pick[1] else None,
                  Vitality(float(np.linalg.norm(x[0])), 0.3, 0.1, 0.5, 0.4,
                           frozenset({"weak"}) if rng.random() < 0.3 else frozenset()) if pick[0] else None,
                  sem, loopback)


def section_spans(data: bytes) -> list[tuple[int, int]]:
    """(offset, length) of each section of a well-formed packet."""
    mask = data[6]
    off, lens = HEADER_SIZE, []
    for i in range(5):
        if mask >> i & 1:
            ln, off = read_varint(data, off, max_bytes=4)
            lens.append(ln)
            off += 4
    spans = []
    for ln in lens:
        spans.append((off, ln))
        off += ln
    return spans


def reseal(data: bytearray, spans: list[tuple[int, int]] | None = None) -> bytes:
    """Recompute every section CRC and the packet CRC (what a forger or a buggy sender would do)."""
    spans = spans if spans is not None else section_spans(bytes(data))
    off = HEADER_SIZE
    for (so, ln) in spans:
        _, off = read_varint(data, off, max_bytes=4)
        struct.pack_into("<I", data, off, zlib.crc32(bytes(data[so: so + ln])))
        off += 4
    struct.pack_into("<I", data, CRC_OFFSET, 0)
    struct.pack_into("<I", data, CRC_OFFSET, zlib.crc32(bytes(data)))
    return bytes(data)


# each mutation returns (bytes, resealed?, expected reason or None)
def _truncate(rng, d, spans):
    return d[: int(rng.integers(0, len(d)))], False, None


def _extend(rng, d, spans):
    return d + rng.bytes(int(rng.integers(1, 64))), False, None


def _bitflip(rng, d, spans):
    b = bytearray(d)
    for _ in range(int(rng.integers(1, 9))):
        i = int(rng.integers(0, len(b) * 8))
        b[i // 8] ^= 1 << (i % 8)
    return bytes(b), False, None


def _overwrite(rng, d, spans):
    b = bytearray(d)
    i = int(rng.integers(0, len(b)))
    chunk = rng.bytes(int(rng.integers(1, 17)))
    b[i: i + len(chunk)] = chunk[: len(b) - i]
    return bytes(b), bytes(b) == d, None


def _absurd_total(rng, d, spans):
    b = bytearray(d)
    struct.pack_into("<I", b, 7, int(rng.choice([0, 2**32 - 1, 2**31, len(d) + 1, len(d) * 1000 % 2**32])))
    return bytes(b), bytes(b) == d, "truncated" if struct.unpack_from("<I", b, 7)[0] > len(d) else "length"


def _absurd_section_len(rng, d, spans):
    # rewrite the first table entry with a huge varint and re-seal: the lengths no longer add up
    b = bytearray(d)
    _, end = read_varint(b, HEADER_SIZE, max_bytes=4)
    huge = rng.choice([b"\xff\xff\xff\x7f", b"\xff\xff\xff\xff\xff", b"\x80\x80\x80\x80\x01"])
    b[HEADER_SIZE:end] = huge
    return bytes(b), False, None


def _magic(rng, d, spans):
    b = bytearray(d)
    b[0:4] = rng.bytes(4) if rng.random() < 0.5 else b"AGPQ"
    return bytes(b), bytes(b) == d, "magic"


def _version(rng, d, spans):
    b = bytearray(d)
    b[4] = int(rng.choice([0, 2, 3, 255]))
    return reseal(b, spans), True, "version"


def _section_mutate(rng, d, spans):
    # structure-aware: change bytes inside one section, then fix every checksum so the section
    # parser (not the CRC) has to catch it
    so, ln = spans[int(rng.integers(0, len(spans)))]
    b = bytearray(d)
    for _ in range(int(rng.integers(1, 4))):
        b[so + int(rng.integers(0, ln))] = int(rng.integers(0, 256))
    return reseal(b, spans), True, None


def _codec_offset(b: bytearray, spans) -> int:
    """Offset of the codec blob's id byte inside the payload section (version byte follows)."""
    so, _ = spans[-1]
    pflags, off = b[so], so + 1
    off += 4 if pflags & 1 else 0
    if pflags & 2:
        n, off = read_varint(b, off, max_bytes=4)
        off += n
    return off


def _codec_id(rng, d, spans):
    b = bytearray(d)
    b[_codec_offset(b, spans)] = int(rng.integers(max(registry.BY_ID) + 1, 256))
    return reseal(b, spans), True, "codec"


def _codec_version(rng, d, spans):
    b = bytearray(d)
    b[_codec_offset(b, spans) + 1] = int(rng.choice([0, 2, 7, 255]))
    return reseal(b, spans), True, "codec-version"


def _fingerprint(rng, d, spans):
    b = bytearray(d)
    so, _ = spans[0]
    i = so + int(rng.integers(0, 16))
    b[i] ^= int(rng.integers(1, 256))
    return reseal(b, spans), True, "fingerprint"


def _loopback_flag(rng, d, spans):
    b = bytearray(d)
    b[5] |= 1
    return reseal(b, spans), True, "loopback"


def _garbage(rng, d, spans):
    n = int(rng.integers(0, 600))
    g = bytearray(rng.bytes(n))
    if n >= 15 and rng.random() < 0.7:
        g[0:5] = b"AGPP\x01"
        struct.pack_into("<I", g, 7, n)
    return bytes(g), False, None


MUTATIONS = {
    "truncate": _truncate, "extend": _extend, "bitflip": _bitflip, "overwrite": _overwrite,
    "absurd-total-length": _absurd_total, "absurd-section-length": _absurd_section_len, "magic": _magic,
    "version": _version, "section-resealed": _section_mutate, "unknown-codec": _codec_id,
    "codec-version": _codec_version, "fingerprint": _fingerprint, "loopback-flag": _loopback_flag,
    "garbage": _garbage,
}


def _time_once(recv: Receiver, data: bytes) -> float:
    """Milliseconds of one receive with a fresh replay window."""
    recv.replay = type(recv.replay)(recv.window, recv.max_sessions)
    return timed(_receive, recv, data)[0] * 1e3


def _receive(recv: Receiver, data: bytes) -> tuple[str, object]:
    """("accepted", None), ("rejected", the PTPError) or ("crashed", the other exception)."""
    try:
        got = recv.receive(data)
        # an accepted packet must also decode to a finite state
        state = recv.state(got)
        if not np.all(np.isfinite(state)):
            raise ValueError("accepted packet decodes to a non-finite state")
        return "accepted", None
    except PTPError as e:
        return "rejected", e
    except Exception as e:  # a crash: the decoder leaked an untyped exception
        return "crashed", e


def _canonical(data: bytes) -> bool:
    try:
        return encode_packet(decode_packet(data)) == data
    except Exception:
        return False


def run_fuzz(args: FuzzArgs) -> dict:
    """Run the campaign; returns counts per mutation and outcome, plus replay and memory checks."""
    rng = np.random.default_rng(args.seed)
    pool = [encode_packet(sample_packet(rng, seq=i + 1)) for i in range(64)]
    pool_spans = [section_spans(p) for p in pool]
    counts: Counter = Counter()
    reasons: Counter = Counter()
    failures: list[str] = []
    names = list(MUTATIONS)
    worst_ms = 0.0
    recv = receiver()
    bar = None
    if args.progress:
        from tqdm import tqdm
        bar = tqdm(total=args.n, desc="ptp fuzz", unit="pkt", leave=False, file=sys.stderr)
    for k in range(args.n):
        name = names[k % len(names)]
        j = int(rng.integers(0, len(pool)))
        data, resealed, expect = MUTATIONS[name](rng, pool[j], pool_spans[j])
        recv.replay = type(recv.replay)(recv.window, recv.max_sessions)  # fresh window: test parsing, not replay
        seconds, (outcome, error) = timed(_receive, recv, data)
        dt = seconds * 1e3
        if outcome == "rejected":
            reasons[error.reason] += 1
            if expect and error.reason != expect and not (expect == "length" and error.reason == "truncated"):
                counts[(name, "other-reason")] += 1
        elif outcome == "crashed":
            failures.append(f"{name}: {type(error).__name__}: {error}")
        if dt > args.max_ms:  # re-time: on a shared box one slow run can be the scheduler, not the decoder
            dt = min(dt, *(_time_once(recv, data) for _ in range(3)))
            if dt > args.max_ms:
                counts[(name, "slow")] += 1
        worst_ms = max(worst_ms, dt)
        if outcome == "accepted":
            ok = data == pool[j] or (resealed and expect is None and _canonical(data))
            outcome = "accepted-valid" if ok else "accepted-wrongly"
            if not ok:
                failures.append(f"{name}: accepted a corrupt packet ({len(data)} bytes)")
        counts[(name, outcome)] += 1
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    replay = _replay_checks(rng)
    mem = _memory_check(rng)
    tried = args.n + replay["tried"]
    wrong = sum(v for (m, o), v in counts.items() if o == "accepted-wrongly") + replay["wrong"]
    crashed = sum(v for (m, o), v in counts.items() if o == "crashed")
    slow = sum(v for (m, o), v in counts.items() if o == "slow")
    return {"tried": tried, "accepted_wrongly": wrong, "crashed": crashed, "slow": slow,
            "worst_ms": worst_ms, "per_mutation": {m: {o: counts[(m, o)] for o in
                                                      ("rejected", "accepted-valid", "accepted-wrongly", "crashed",
                                                       "other-reason") if counts[(m, o)]} for m in names},
            "reasons": dict(reasons), "replay": replay, "memory": mem, "failures": failures[:20]}


def _replay_checks(rng) -> dict:
    """Duplicates, stale and in-window out-of-order packets against one long-lived receiver."""
    r = receiver()
    wrong = tried = 0
    seqs = list(range(1, 2001))
    rng.shuffle(seqs[:: 1])
    pkt = sample_packet(rng, seq=1, dim=32, codec="fp16")
    for seq in sorted(seqs):
        pkt.identity.seq = seq
        r.receive(encode_packet(pkt))
    for _ in range(2000):
        seq = int(rng.integers(1, 2001))
        pkt.identity.seq = seq
        tried += 1
        try:
            r.receive(encode_packet(pkt))
            wrong += 1  # every one of these was already seen (duplicate) or is older than the window
        except PTPError as e:
            wrong += e.reason != "replay"
    return {"tried": tried, "wrong": wrong, "sessions_tracked": len(r.replay)}


def _memory_check(rng) -> dict:
    """Peak Python allocation while decoding packets whose headers claim ~4 GiB: must stay tiny."""
    base = bytearray(encode_packet(sample_packet(rng, dim=32, codec="fp16")))
    tracemalloc.start()
    for claim in (2**32 - 1, 2**31, 2**28):
        b = bytearray(base)
        struct.pack_into("<I", b, 7, claim)
        for data in (bytes(b), reseal(bytearray(b))):
            try:
                decode_packet(data)
            except PTPError:
                pass
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"claimed_bytes": 2**32 - 1, "peak_alloc_bytes": peak}


def format_report(res: dict) -> str:
    lines = [f"AGP-PTP fuzz: {res['tried']} inputs tried, {res['accepted_wrongly']} accepted wrongly, "
             f"{res['crashed']} crashed, {res['slow']} slow (worst decode {res['worst_ms']:.2f} ms, best of 4 when slow)",
             f"{'mutation':24s} {'rejected':>9s} {'valid-ok':>9s} {'wrong':>6s} {'crash':>6s} {'other-reason':>12s}"]
    for m, c in res["per_mutation"].items():
        lines.append(f"{m:24s} {c.get('rejected', 0):9d} {c.get('accepted-valid', 0):9d} "
                     f"{c.get('accepted-wrongly', 0):6d} {c.get('crashed', 0):6d} {c.get('other-reason', 0):12d}")
    lines.append("rejection reasons: " + ", ".join(f"{k}={v}" for k, v in sorted(res["reasons"].items())))
    rp = res["replay"]
    lines.append(f"replay: {rp['tried']} duplicate/stale packets, {rp['wrong']} accepted or mis-typed")
    lines.append(f"memory: decoding packets claiming {res['memory']['claimed_bytes']} bytes peaked at "
                 f"{res['memory']['peak_alloc_bytes']} bytes allocated")
    lines += [f"FAIL {f}" for f in res["failures"]]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Mutate valid AGP-PTP packets (truncation, bit flips, absurd lengths, wrong magic/version, "
                     "unknown codecs, fingerprint mismatches, re-sealed section damage, garbage, replays) and count "
                     "how the receiver answers. Exit status 1 if any input was accepted wrongly, crashed the "
                     "decoder (an exception that is not a PTPError) or took longer than --max-ms.")
    p.add_argument("--n", type=argtypes.positive_int(), default=FuzzArgs.n, help="mutated packets to try (default %(default)s)")
    p.add_argument("--seed", type=argtypes.seed(), default=FuzzArgs.seed, help="random seed (the campaign is reproducible)")
    p.add_argument("--max-ms", type=argtypes.float_range(0, lo_open=True), default=FuzzArgs.max_ms, help="per-decode time counted as a hang")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args) -> int:
    res = run_fuzz(FuzzArgs(n=args.n, seed=args.seed, max_ms=args.max_ms, progress=not args.no_progress))
    print(format_report(res))
    bad = res["accepted_wrongly"] + res["crashed"] + res["slow"]
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    sys.exit(main(ap.parse_args()))
