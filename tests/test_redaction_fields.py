"""Redaction covers every string field that reaches a lane (issue 13, secrets).

Before: `redact_secrets` covered prompt, response and turn text only; keys in `meta`, `system` and
`summary` (AKIA…, sk-ant-api03-…, ghp_…) reached routing/train.jsonl and the manifest said
`changed 0`. After: each secret kind planted in each field of each source format is absent from
every byte written, and the manifest counts the replacements per field."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from agp.data.build import DataArgs, build

# kind -> (planted text, a part of it that must never be written)
SECRETS = {
    "private_key": ("-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAzq1\n-----END RSA PRIVATE KEY-----",
                    "MIIEowIBAAKCAQEAzq1"),
    "anthropic_key": ("sk-ant-api03-" + "Ab9" * 10, "Ab9Ab9Ab9Ab9"),
    "openai_key": ("sk-proj-" + "Qz7" * 9, "Qz7Qz7Qz7Qz7"),
    "aws_access_key": ("AKIAJ7Q2W4E6R8T0Y1U3", "AKIAJ7Q2W4E6R8T0Y1U3"),
    "github_token": ("ghp_" + "Kx4" * 12, "Kx4Kx4Kx4Kx4"),
    "slack_token": ("xoxb-1234567890-Zzsecretslack", "Zzsecretslack"),
    "google_api_key": ("AIza" + "Gg5" * 11 + "Gg", "Gg5Gg5Gg5Gg5"),
    "jwt": ("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJqd3RzZWNyZXQifQ.Jw7sigJw7sigJw7sig", "Jw7sigJw7sigJw7sig"),
    "bearer_token": ("Bearer Bt3okenBt3okenBt3okenBt3", "Bt3okenBt3okenBt3oken"),
    "assigned_secret": ("password=Pw8hunterPw8hunter", "Pw8hunterPw8hunter"),
}


def _claude(kind: str, secret: str) -> list[dict]:
    base = {"sessionId": f"s-{kind} {secret}", "cwd": f"/home/u/{secret}", "timestamp": secret}
    return [
        {"type": "summary", "summary": f"session about {kind}: {secret}"},
        {"type": "user", **base, "message": {"role": "user", "content":
            f"Please explain why the {kind} rotation job keeps failing with {secret} in the log"}},
        {"type": "assistant", **base, "message": {"role": "assistant", "content": [
            {"type": "thinking", "thinking": f"the credential {secret} looks expired"},
            {"type": "tool_use", "name": f"grep {secret}", "input": {"pattern": secret}},
        ]}},
        {"type": "user", **base, "message": {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": secret, "content": [{"type": "text", "text": f"found {secret}"}]}]}},
        {"type": "assistant", **base, "message": {"role": "assistant", "content": [
            {"type": "text", "text": f"The job reads a revoked credential ({secret}); rotate it and redeploy."}]}},
    ]


def _chat(kind: str, secret: str) -> dict:
    return {"messages": [{"role": "system", "content": f"You are a deploy bot. Use {secret} for {kind}."},
                         {"role": "user", "content": f"How should the {kind} migration handle {secret}?"},
                         {"role": "tool", "content": f"vault says {secret}"},
                         {"role": "assistant", "content": f"Store {secret} in the vault, never in code, then migrate."}]}


def _prompt_log(kind: str, secret: str) -> dict:
    return {"prompt": f"Summarise the {kind} incident report that mentions {secret}",
            "project": secret, secret: "key that is itself a secret",
            "scores": {"note": [f"deep {secret}", {"more": secret}]}, "tags": [secret]}


def _pairs(kind: str, secret: str) -> dict:
    return {"prompt": f"Write a rollback plan for the {kind} outage ({secret})",
            "response": f"First revoke {secret}, then restore the previous release.", "model": secret}


def _codex(kind: str, secret: str) -> dict:
    return {"session_id": secret, "ts": 1700000000, "text": f"Refactor the {kind} loader; it prints {secret}"}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    src = tmp_path_factory.mktemp("secret-src")
    files = {"claude.jsonl": [], "chat.jsonl": [], "log.jsonl": [], "pairs.jsonl": [], "codex.jsonl": []}
    for kind, (secret, _) in SECRETS.items():
        files["chat.jsonl"].append(_chat(kind, secret))
        files["log.jsonl"].append(_prompt_log(kind, secret))
        files["pairs.jsonl"].append(_pairs(kind, secret))
        files["codex.jsonl"].append(_codex(kind, secret))
        (src / f"claude_{kind}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _claude(kind, secret)))
    for name, rows in files.items():
        (src / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path_factory.mktemp("secret-out") / "lanes"
    return out, build(DataArgs(source=str(src)), out)


@pytest.mark.parametrize("kind", sorted(SECRETS))
def test_no_planted_secret_is_written_anywhere(planted, kind):
    out, man = planted
    marker = SECRETS[kind][1]
    assert man["kept"] >= 4 * len(SECRETS)
    for path in Path(out).rglob("*"):
        if path.is_file():
            assert marker not in path.read_text(), f"{kind} secret leaked into {path.relative_to(out)}"


def test_every_field_is_counted_in_the_manifest(planted):
    out, man = planted
    fields = man["rules"]["redact_secrets"]["fields"]
    for field in ("prompt", "response", "turns.text", "turns.tool", "meta.system", "meta.summary", "meta.cwd",
                  "meta.sessionId", "meta.timestamp", "meta.project", "meta.scores", "meta.tags", "meta.model",
                  "meta.session_id"):
        assert fields.get(field, 0) >= len(SECRETS) - 1, (field, fields)
    assert man["rules"]["redact_secrets"]["changed"] >= 4 * len(SECRETS)
    on_disk = json.loads((Path(out) / "manifest.json").read_text())
    assert on_disk["rules"]["redact_secrets"]["fields"] == fields
    routing = [json.loads(x) for s in ("train", "valid", "heldout")
               for x in (Path(out) / "routing" / f"{s}.jsonl").read_text().splitlines()]
    assert any("[REDACTED:" in json.dumps(r["meta"]) for r in routing)


@pytest.mark.parametrize("kind", sorted(SECRETS))
def test_a_secret_cut_by_the_tool_clip_is_not_half_written(kind):
    """Tool inputs are clipped to TOOL_TEXT_MAX chars before redaction sees them; a key straddling
    the cut used to leave its first half (too short to match any pattern) in the routing lane."""
    from agp.data.filters import redact
    from agp.data.sources import TOOL_TEXT_MAX, _clip
    secret, marker = SECRETS[kind]
    for shift in range(1, len(secret)):
        text = "x " * ((TOOL_TEXT_MAX - shift) // 2) + " " * ((TOOL_TEXT_MAX - shift) % 2) + secret + " tail"
        clipped, _ = redact(_clip(text))
        assert marker[:8] not in clipped, (shift, clipped[-60:])
