"""Bad input, case by case (issue 13): every row runs the CLI's `main([...])` in-process on
temporary files and expects either exit status 2 with one `agp: error: ...` line naming the
problem, or (for a bad line inside a transcript) a counted malformed line while the build goes on.
Wrong answers that used to be given as right ones are checked for the right answer below."""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from agp.cli import main

ROOT = Path(__file__).resolve().parents[1]
FX = ROOT / "fixtures" / "transcripts"


# --- builders of bad inputs (each returns the argv to run) ------------------------------------
def _vectors(tmp: Path, name: str = "x.npy", rows=None) -> Path:
    path = tmp / name
    np.save(path, np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32) if rows is None else rows)
    return path


def _snapshot(tmp: Path, store: str = "none") -> Path:
    out = tmp / "x.tqidx"
    assert main(["index", "build", str(_vectors(tmp)), str(out), "--store", store]) == 0
    return out


def _edit_header(path: Path, change) -> Path:
    """Rewrite the JSON header of a .tqidx with `change` applied and its CRC recomputed (a careful
    hostile edit: the header checksum alone cannot catch it)."""
    data = bytearray(path.read_bytes())
    magic, version, hlen, _ = struct.unpack_from("<8sIII", data, 0)
    header = json.loads(bytes(data[20:20 + hlen]))
    change(header)
    hb = json.dumps(header, sort_keys=True).encode().ljust(hlen)[:hlen]   # same length: sections stay put
    data[20:20 + hlen] = hb
    struct.pack_into("<8sIII", data, 0, magic, version, hlen, zlib.crc32(hb))
    path.write_bytes(bytes(data))
    return path


def _lanes(tmp: Path) -> Path:
    out = tmp / "lanes"
    assert main(["data", "build", "--source", str(FX), "--out", str(out)]) == 0
    return out


def _manifest(tmp: Path, text: bytes, name: str = "manifest.json") -> Path:
    d = tmp / "d"
    d.mkdir()
    (d / name).write_bytes(text)
    return d


def _fake_cache(tmp: Path, monkeypatch) -> None:
    """An embedded-model cache whose weights file no longer matches its marker."""
    from agp.backbone import embedded
    monkeypatch.setenv("AGP_CACHE", str(tmp / "cache"))
    target = embedded.target_dir()
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"weights, then a bit flipped")
    st = (target / "model.safetensors").stat()
    (target / embedded.MARKER).write_text(json.dumps({"files": {"model.safetensors": {
        "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": "0" * 64}}}))


def _trailing(tmp):
    path = _snapshot(tmp)
    with open(path, "ab") as f:
        f.write(b"garbage after a valid snapshot")
    return path


ERROR_CASES = {
    # data
    "stats garbage manifest": (lambda t, m: ["data", "stats", str(_manifest(t, b"\xff\xfe not json"))],
                               "corrupt dataset manifest"),
    "stats [] manifest": (lambda t, m: ["data", "stats", str(_manifest(t, b"[]"))], "expected a JSON object"),
    "stats {} manifest": (lambda t, m: ["data", "stats", str(_manifest(t, b"{}"))], "field 'source' is missing"),
    "stats lane file deleted": (lambda t, m: (os.unlink(_lanes(t) / "sft" / "train.jsonl"),
                                              ["data", "stats", str(t / "lanes")])[1], "sft/train.jsonl (missing)"),
    "stats lane file corrupted": (lambda t, m: ((_lanes(t) / "routing" / "valid.jsonl").write_text("{}\n"),
                                                ["data", "stats", str(t / "lanes")])[1],
                                  "routing/valid.jsonl (sha256 differs)"),
    "oversample -1": (lambda t, m: ["data", "build", "--out", str(t / "o"), "--oversample", "-1"],
                      "--oversample: -1 must be in 1..100"),
    "oversample 1000000": (lambda t, m: ["data", "build", "--out", str(t / "o"), "--oversample", "1000000"],
                           "--oversample: 1000000 must be in 1..100"),
    # runs
    "run garbage manifest": (lambda t, m: ["run", "--stage", "baseline", "--run-dir",
                                           str(_manifest(t, b"\x80\x81 binary"))], "corrupt manifest"),
    "run [] manifest": (lambda t, m: ["run", "--stage", "baseline", "--run-dir", str(_manifest(t, b"[]"))],
                        "expected a JSON object, got list"),
    "run {} manifest": (lambda t, m: ["run", "--stage", "baseline", "--run-dir", str(_manifest(t, b"{}"))],
                        "no run_id"),
    # index
    "header block_bytes 0": (lambda t, m: ["index", "inspect", str(_edit_header(
        _snapshot(t), lambda h: h.update(block_bytes=0)))], "block_bytes 0 is not a power of two"),
    "header shape mismatch": (lambda t, m: ["index", "search", str(_edit_header(
        _snapshot(t), lambda h: h["sections"]["codes"].update(shape=[64, 3]))), str(_vectors(t, "q.npy"))],
        "section 'codes' shape [64, 3] does not match"),
    "out is a directory": (lambda t, m: ["index", "build", str(_vectors(t)), str(t)], "is a directory"),
    "out under /proc": (lambda t, m: ["index", "build", str(_vectors(t)), "/proc/agp-test.tqidx"],
                        "cannot write the snapshot"),
    "-k 100000000000": (lambda t, m: ["index", "search", str(_snapshot(t)), str(_vectors(t, "q.npy")),
                                      "-k", "100000000000"], "-k: 100000000000 must be in 1..65536"),
    "--seed -1": (lambda t, m: ["index", "build", str(_vectors(t)), str(t / "o.tqidx"), "--seed", "-1"],
                  "--seed: -1 must be in 0..4294967295"),
    "--rerank -3": (lambda t, m: ["index", "search", str(_snapshot(t, "fp16")), str(_vectors(t, "q.npy")),
                                  "--rerank", "-3"], "--rerank: -3 must be >= 0"),
    "-k 10 --rerank 5": (lambda t, m: ["index", "search", str(_snapshot(t, "fp16")), str(_vectors(t, "q.npy")),
                                       "-k", "10", "--rerank", "5"], "rerank 5 is less than k 10"),
    "trailing garbage inspect": (lambda t, m: ["index", "inspect", str(_trailing(t))], "unexpected bytes"),
    "trailing garbage search": (lambda t, m: ["index", "search", str(_trailing(t)), str(_vectors(t, "q.npy"))],
                                "unexpected bytes"),
    "trailing garbage append": (lambda t, m: ["index", "append", str(_trailing(t)), str(_vectors(t, "q.npy"))],
                                "unexpected bytes"),
    # benches
    "codecs --n -3": (lambda t, m: ["bench", "codecs", "--n", "-3"], "--n: -3 must be >= 1"),
    "codecs --dims 0": (lambda t, m: ["bench", "codecs", "--dims", "0"], "--dims: 0 must be in 2..65536"),
    "codecs --repeats 0": (lambda t, m: ["bench", "codecs", "--repeats", "0"], "--repeats: 0 must be >= 1"),
    "ptp-fuzz --n -5": (lambda t, m: ["bench", "ptp-fuzz", "--n", "-5"], "--n: -5 must be >= 1"),
    # model
    "model verify damaged": (lambda t, m: (_fake_cache(t, m), ["model", "verify"])[1],
                             "model.safetensors: sha256 differs"),
    "model config not JSON": (lambda t, m: ["model", "info", "--model", str(_manifest(t, b"{", "config.json"))],
                              "config.json is not readable JSON"),
    "model without weights": (lambda t, m: ["model", "info", "--model", str(_manifest(
        t, b'{"model_type": "gemma3_text"}', "config.json"))], "mlx-lm could not load the model"),
    "index vectors beyond float32": (lambda t, m: ["index", "build", str(_vectors(t, "f.npy", np.full((3, 8), 1e300))),
                                                   str(t / "f.tqidx")], "beyond float32"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_one_line_error(case, tmp_path, monkeypatch, capsys):
    make_argv, needle = ERROR_CASES[case]
    argv = make_argv(tmp_path, monkeypatch)
    capsys.readouterr()
    assert main(argv) == 2, case
    err = capsys.readouterr().err.strip()
    assert err.startswith("agp: error: ") and "\n" not in err, err
    assert needle in err, err


def test_read_only_output_directory(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories; the /proc row covers an unwritable place")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert main(["index", "build", str(_vectors(tmp_path)), str(ro / "x.tqidx")]) == 2
        assert "cannot write the snapshot" in capsys.readouterr().err
        assert main(["data", "build", "--source", str(FX), "--out", str(ro / "lanes")]) == 2
        assert "choose a writable --out" in capsys.readouterr().err
    finally:
        ro.chmod(0o700)


# --- per-line data problems: counted, and the build goes on ------------------------------------
GOOD = {"prompt": "Explain why the upload retries three times", "response": "It backs off exponentially first."}
MALFORMED_CASES = {
    "nested 1000 levels": ('{"prompt": ' + "[" * 1000 + "]" * 1000 + ', "response": "x"}', "nested deeper"),
    "nested 100 levels": ('{"prompt": "p", "response": "r", "scores": ' + "[" * 100 + "]" * 100 + "}",
                          "nested deeper than 64"),
    "lone surrogate": ('{"prompt": "echo \\ud800 this", "response": "echo \\ud800 this"}', "lone UTF-16 surrogate"),
    "dangling symlink": (lambda src: (src / "gone.jsonl").symlink_to(src.parent / "deleted.jsonl"),
                         "cannot read the file"),
    "directory named .jsonl": (lambda src: (src / "dir.jsonl").mkdir(), "not a regular file"),
    "fifo named .jsonl": (lambda src: os.mkfifo(src / "pipe.jsonl"), "not a regular file"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_CASES))
def test_counted_malformed_line(case, tmp_path, capsys):
    line, reason = MALFORMED_CASES[case]
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.jsonl").write_text(json.dumps(GOOD) + "\n")
    if callable(line):
        line(src)
    else:
        (src / "bad.jsonl").write_text(json.dumps(GOOD | {"prompt": "A second, different question?"}) + "\n" + line + "\n")
    out = tmp_path / "lanes"
    assert main(["data", "build", "--source", str(src), "--out", str(out)]) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["read"]["malformed"] == 1 and man["kept"] >= 1
    assert reason in man["read"]["malformed_locations"][0]


# --- wrong answers that used to be given as right ones -----------------------------------------
def test_huge_rows_keep_their_direction(tmp_path, capsys):
    """Before: rows x1e30 normalised to zeros, every search answered id 0, score 0.0.
    After: each row finds itself first with a score near 1."""
    rows = np.random.default_rng(0).standard_normal((200, 16)).astype(np.float32)
    x = _vectors(tmp_path, "big.npy", rows * np.float32(1e30))
    q = _vectors(tmp_path, "q.npy", rows[:5])
    assert main(["index", "build", str(x), str(tmp_path / "big.tqidx")]) == 0
    capsys.readouterr()
    assert main(["index", "search", str(tmp_path / "big.tqidx"), str(q), "-k", "3"]) == 0
    hits = [json.loads(s) for s in capsys.readouterr().out.splitlines()]
    assert [h["ids"][0] for h in hits] == [0, 1, 2, 3, 4] and all(h["scores"][0] > 0.9 for h in hits)


def test_identical_rows_are_each_returned_once(tmp_path, capsys):
    """Before: 500 identical rows with -k 500 returned id 0 five hundred times. After: every row
    once, all with the same score (they are the same vector), ties in ascending row order."""
    one = np.random.default_rng(0).standard_normal((1, 16)).astype(np.float32)
    x = _vectors(tmp_path, "same.npy", np.repeat(one, 500, axis=0))
    assert main(["index", "build", str(x), str(tmp_path / "same.tqidx")]) == 0
    capsys.readouterr()
    assert main(["index", "search", str(tmp_path / "same.tqidx"), str(_vectors(tmp_path, "q.npy", one)),
                 "-k", "500"]) == 0
    hit = json.loads(capsys.readouterr().out)
    assert hit["ids"] == list(range(500)) and len(set(hit["scores"])) == 1


@pytest.mark.parametrize("codec, value", [("fp16", 70000.0), ("q8_0", 1e7), ("q8_0", 3e38),
                                          ("turboquant", 1e20), ("turboquant", 3e38)])
def test_codecs_refuse_finite_values_they_cannot_hold(codec, value):
    """Before: fp16 clamped 70000 to 65504; q8_0 and TurboQuant wrote blobs their own decoder
    rejects. After: CodecRangeError at encode time."""
    from agp.quant.codec import CodecRangeError
    from agp.quant.registry import make_codec as get_codec
    x = np.ones((2, 64), np.float32)
    x[1, 5] = value
    with pytest.raises(CodecRangeError, match="cannot encode"):
        get_codec(codec, **({"dim": 64} if codec == "turboquant" else {})).encode(x)


def test_encode_packet_never_sends_a_blob_the_receiver_rejects():
    """A q8_0 blob whose block scale is inf (what the old encoder produced for 1e7) is refused by
    the sender, as the receiver refuses it."""
    from agp.ptp.packet import encode_packet
    from agp.ptp.sections import Identity, Packet, Payload
    from agp.quant.codec import CodecError, Q8_0
    blob = bytearray(Q8_0().encode(np.ones((1, 32), np.float32)))
    struct.pack_into("<e", blob, len(blob) - 34, np.float16(np.inf))
    ident = Identity(model_fp=b"m" * 8, tokenizer_fp=b"t" * 8, quantization="f32", session_id=1, span_start=0,
                     span_len=1, layer=6, seq=1, source_host="a", target_host="b")
    with pytest.raises(CodecError, match="NaN/Inf"):
        encode_packet(Packet(ident, Payload(bytes(blob))))


class _ClosedPipe:
    """stdout of `agp ... | head -1` once head has exited."""

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")

    def fileno(self):
        raise ValueError("not a real file")


@pytest.mark.parametrize("command", ["data stats", "index search", "ptp-fuzz"])
def test_broken_pipe_is_quiet(command, tmp_path, monkeypatch, capsys):
    argv = {"data stats": lambda: ["data", "stats", str(_lanes(tmp_path))],
            "index search": lambda: ["index", "search", str(_snapshot(tmp_path)), str(_vectors(tmp_path, "q.npy"))],
            "ptp-fuzz": lambda: ["bench", "ptp-fuzz", "--n", "1", "--no-progress"]}[command]()
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    assert main(argv) == 141
    assert capsys.readouterr().err == ""


def _default_sigint():
    """A job started in the background by a non-interactive shell (CI, nohup ... &) inherits SIGINT
    ignored, and Python then never raises KeyboardInterrupt: give the child a terminal's default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_early_ctrl_c_is_one_line():
    """Ctrl-C while the CLI is still importing: before, a long traceback from inside the imports;
    after, one line and exit 130 (or the signal itself, if it lands before Python is up).
    One delay can miss the import window (on a quiet machine the short command can finish before
    the signal lands), so a few delays are tried; none may print a traceback."""
    outcomes = []
    for delay in (0.15, 0.3, 0.45, 0.8):
        proc = subprocess.Popen([sys.executable, "-m", "agp.cli", "bench", "codecs", "--n", "1", "--source",
                                 "synthetic", "--dims", "64"], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=_default_sigint)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert "Traceback" not in err, err
        outcomes.append((proc.returncode, err))
        if proc.returncode in (130, -signal.SIGINT):
            assert len(err.strip().splitlines()) <= 1, err
            return
    raise AssertionError(f"no attempt was interrupted: {outcomes}")

def test_ctrl_c_inside_an_extension_import_is_one_line(monkeypatch, capsys):
    """The CI failure this pins: a Ctrl-C that lands while mlx initialises comes back as an
    ImportError raised from the KeyboardInterrupt; it is the user's Ctrl-C, so one line and 130."""
    import agp.cli

    def interrupted_import():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as ctrl_c:
            raise ImportError("Encountered an error while initializing the extension.") from ctrl_c

    monkeypatch.setattr(agp.cli, "build_parser", interrupted_import)
    assert main(["bench", "codecs"]) == 130
    assert capsys.readouterr().err.strip() == "agp: interrupted"


def test_a_broken_import_is_not_called_an_interrupt(monkeypatch):
    """The same catch must not hide a real import failure (a broken install stays a traceback)."""
    import agp.cli

    def broken_import():
        raise ImportError("libmlx.so: cannot open shared object file")

    monkeypatch.setattr(agp.cli, "build_parser", broken_import)
    with pytest.raises(ImportError, match="libmlx"):
        main(["bench", "codecs"])
