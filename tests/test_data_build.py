"""Building the lanes: layout, manifest, checksums, splits, atomicity, and the `agp data` CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from agp import io
from agp.cli import main
from agp.data.build import DataArgs, build, load_lane, load_manifest
from agp.data.filters import RULES
from agp.data.lanes import LANES, SFT_PROMPT, concepts_of
from agp.data.splits import SPLITS, content_id
from agp.errors import AGPError

FX = Path(__file__).resolve().parents[1] / "fixtures" / "transcripts"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("lanes") / "data"
    return out, build(DataArgs(source=str(FX)), out)


def test_layout_manifest_and_checksums(built):
    out, man = built
    assert man["rule_order"] == [n for n, _ in RULES]
    assert set(man["rules"]) == {n for n, _ in RULES}
    assert man["read"]["malformed"] == 3 and man["kept"] > 0
    for lane in LANES:
        for split in SPLITS:
            meta = man["lanes"][lane][split]
            path = out / lane / f"{split}.jsonl"
            assert io.sha256_file(path) == meta["sha256"]
            rows = [json.loads(x) for x in path.read_text().splitlines()]
            assert len(rows) == meta["rows"]
            for r in rows:
                assert {"id", "text", "split", "source"} <= set(r) and r["split"] == split
    assert (out / "transfer" / "schema.json").exists()
    assert man["rules"]["redact_secrets"]["changed"] == 2
    assert man["rules"]["tool_only_wrapper"]["dropped"] == 2 and man["rules"]["task_notification"]["dropped"] == 2
    assert not any(p.name.endswith(".tmp") for p in out.parent.iterdir())


def test_lane_contents(built):
    out, _ = built
    rows = {lane: [r for s in SPLITS for r in load_lane(out, lane, s)] for lane in LANES}
    for r in rows["sft"]:
        assert r["text"].startswith(SFT_PROMPT.format(prompt=r["prompt"])) and r["text"].endswith(r["response"])
        assert r["text"][r["response_start"]:] == r["response"] and r["id"] == content_id(r["text"])
    assert all(r["source"] not in ("prompt_log", "codex_history") for r in rows["sft"])
    session = next(r for r in rows["routing"] if "checkout integration test" in r["text"])
    assert session["n_tool_actions"] == 3 and "[tool_use Edit]" in session["text"] and "[tool_result]" in session["text"]
    assert any(r["source"] == "prompt_log" for r in rows["routing"])
    # semantic: concept prompts are repeated, others appear once
    sem = rows["semantic"]
    inv = [r for r in sem if "invariant check" in r["text"]]
    assert len(inv) == 3 and "invariant" in inv[0]["concepts"]
    plain = [r for r in sem if r["text"].startswith("Review this function")]
    assert len(plain) == 1 and plain[0]["concepts"] == []
    # no secret reached any file
    blob = "".join((out / lane / f"{s}.jsonl").read_text() for lane in LANES for s in SPLITS)
    assert "sk-ant-api03" not in blob and "ghp_abc" not in blob and "[REDACTED:" in blob


def test_split_is_shared_across_lanes(built):
    out, _ = built
    sft = {r["origin"]: r["split"] for s in SPLITS for r in load_lane(out, "sft", s)}
    routing = {r["origin"]: r["split"] for s in SPLITS for r in load_lane(out, "routing", s)}
    assert sft and all(routing[o] == sp for o, sp in sft.items())


def test_concepts_lexicon():
    assert concepts_of("roll back and return to the stable state") == ["return", "stabilize"]
    assert concepts_of("print the file") == []


def test_rebuild_is_deterministic(built, tmp_path):
    _, man = built
    again = build(DataArgs(source=str(FX)), tmp_path / "again")
    assert {l: {s: v["sha256"] for s, v in d.items()} for l, d in again["lanes"].items()} == \
           {l: {s: v["sha256"] for s, v in d.items()} for l, d in man["lanes"].items()}


def test_empty_after_filtering_is_an_error_and_writes_nothing(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "noise.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in ("ok", "continue", "ping")) + "\n")
    with pytest.raises(AGPError, match="no records left after filtering 3.*heartbeat: 3"):
        build(DataArgs(source=str(src)), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_failed_rebuild_keeps_the_previous_dataset(built, tmp_path):
    out = tmp_path / "data"
    build(DataArgs(source=str(FX)), out)
    before = (out / "manifest.json").read_text()
    with pytest.raises(AGPError):
        build(DataArgs(source=str(tmp_path / "missing")), out)
    assert (out / "manifest.json").read_text() == before


def test_checksum_mismatch_is_detected(tmp_path):
    out = tmp_path / "d"
    build(DataArgs(source=str(FX)), out)
    with open(out / "sft" / "train.jsonl", "a") as f:
        f.write('{"id": "x", "text": "tampered", "split": "train"}\n')
    with pytest.raises(AGPError, match="does not match the sha256"):
        load_lane(out, "sft", "train")
    with pytest.raises(AGPError, match="not a built dataset"):
        load_manifest(tmp_path)


def test_default_corpus_build(tmp_path):
    man = build(DataArgs(corpus={"code": 20, "docs": 20}), tmp_path / "d")
    assert man["source"] == "default" and man["lanes"]["sft"]["train"]["rows"] > 30
    srcs = {r["source"] for s in SPLITS for r in load_lane(tmp_path / "d", "sft", s)}
    assert srcs == {"code", "docs", "chat"}


def test_cli_build_and_stats(tmp_path, capsys):
    assert main(["data", "build", "--source", str(FX), "--out", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "heartbeat" in out and "near_duplicate" in out and "sft" in out
    assert main(["data", "stats", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    for name, _ in RULES:
        assert name in out
    assert "claude_session.jsonl:17" in out
    assert main(["data", "build", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "e")]) == 2
    assert "does not exist" in capsys.readouterr().err
