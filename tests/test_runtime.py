"""Runtime modes on tiny random models: `full` equals mlx-lm's greedy generate; `speculative`
equals `full` token for token past the sliding window (tiny window 8, contexts over 600 tokens);
the rollback cache is exact where mlx-lm's rotating cache is not (mlx-lm #1914)."""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import stream_generate
from mlx_lm.models.cache import trim_prompt_cache

from agp.backbone import load
from agp.errors import AGPError
from agp.heads.exit import ExitHead
from agp.runtime import GenerateArgs, Generator
from agp.runtime.cache import WindowKVCache, make_rollback_cache, rollback
from agp.runtime.heads import RuntimeHeads
from tests.conftest import ARCHS

mx.set_default_device(mx.cpu)
TEXT = "def f(x):\n    return x + 1  # tiny"


@pytest.fixture(scope="module")
def long_tiny(long_tiny_dir):
    return load(long_tiny_dir)


def mlx_lm_tokens(bb, ids, n):
    return [r.token for r in stream_generate(bb.model, bb.tokenizer, ids, max_tokens=n)]


def ours(bb, ids, n, mode="full", heads=None, **kw):
    g = Generator(bb, mode, heads, GenerateArgs(max_new_tokens=n, **kw))
    return [e.token for e in g.generate(ids)], g.summary


@pytest.mark.parametrize("arch", ARCHS)
def test_full_equals_mlx_lm_generate(tiny_model_dir, arch):
    bb = load(tiny_model_dir[arch])
    ids = bb.encode(TEXT)
    toks, s = ours(bb, ids, 24)
    assert toks == mlx_lm_tokens(bb, ids, 24)
    assert s.tokens == len(toks) and s.actions == {"full": len(toks)}
    assert abs(s.to_dict()["mac_ratio_vs_full"] - 1) < 1e-12


def test_full_equals_mlx_lm_past_the_window(long_tiny):
    ids = long_tiny.encode("x = [i * i for i in range(10)]\n" * 22)[:650]
    assert len(ids) == 650
    assert ours(long_tiny, ids, 20)[0] == mlx_lm_tokens(long_tiny, ids, 20)


def all_vocab_heads(bb, layer):
    h = ExitHead.identity(bb, layer, np.arange(bb.vocab_size))
    return RuntimeHeads(exits={layer: h}, draft_layer=layer)


@pytest.mark.parametrize("layer,conf", [(2, 0.0), (4, 0.0), (5, 0.2)])
def test_speculative_equals_full_past_600_tokens(long_tiny, layer, conf):
    bb = long_tiny
    heads = all_vocab_heads(bb, layer)
    for n_prompt in (12, 620):
        ids = bb.encode("for i in range(3):\n    print(i)  # loop\n" * 20)[:n_prompt]
        full, _ = ours(bb, ids, 40)
        spec, s = ours(bb, ids, 40, "speculative", heads, draft_max=4, draft_min_confidence=conf)
        assert spec == full
        assert s.drafted > 0 and s.rounds > 0
        assert s.drafted > s.accepted        # rejections happened, so rollback was exercised


def test_speculative_draft_budget_and_actions(long_tiny):
    heads = all_vocab_heads(long_tiny, 5)
    toks, s = ours(long_tiny, long_tiny.encode(TEXT), 7, "speculative", heads, draft_max=4)
    assert len(toks) == 7
    assert sum(s.actions.values()) == 7
    assert set(s.actions) <= {"draft_accepted", "correction", "full"}


def test_rotating_cache_cannot_roll_back_after_wrap_but_window_cache_can(long_tiny):
    """The trap: once mlx-lm's RotatingKVCache wraps, trim_prompt_cache trims nothing."""
    bb = long_tiny
    ids = bb.encode("abcdefghij" * 3)
    ref = bb.make_cache()
    bb.forward(mx.array([ids]), cache=ref)
    assert trim_prompt_cache(ref, 3) == 0          # silently nothing (upstream #1914)
    mine = make_rollback_cache(bb.model, slack=8)
    bb.forward(mx.array([ids[:-3]]), cache=mine)
    a = bb.forward(mx.array([ids[-3:]]), cache=mine)
    rollback(mine, 3)
    b = bb.forward(mx.array([ids[-3:]]), cache=mine)
    assert mx.abs(a - b).max().item() <= 1e-5


def test_window_cache_matches_rotating_cache_token_by_token(long_tiny):
    bb = long_tiny
    ids = bb.encode("q" * 40)
    c1, c2 = bb.make_cache(), make_rollback_cache(bb.model, slack=4)
    a, b = bb.forward(mx.array([ids[:20]]), cache=c1), bb.forward(mx.array([ids[:20]]), cache=c2)
    for t in ids[20:]:
        assert mx.abs(a[:, -1] - b[:, -1]).max().item() <= 1e-4
        a, b = bb.forward(mx.array([[t]]), cache=c1), bb.forward(mx.array([[t]]), cache=c2)
    assert mx.abs(a - b).max().item() <= 1e-4


def test_window_cache_refuses_a_roll_back_past_its_slack():
    c = WindowKVCache(window=4, slack=2)
    k = mx.zeros((1, 1, 1, 2))
    for _ in range(20):
        c.update_and_fetch(k, k)
    with pytest.raises(AGPError, match="roll back"):
        c.trim(5)
    assert c.trim(2) == 2 and c.offset == 18


def test_bad_arguments_are_one_line_errors(tiny_model_dir):
    bb = load(tiny_model_dir["gemma3_text"])
    with pytest.raises(AGPError, match="max-new-tokens"):
        Generator(bb, "full", args=GenerateArgs(max_new_tokens=0))
    with pytest.raises(AGPError, match="empty prompt"):
        list(Generator(bb).generate("  "))
    with pytest.raises(AGPError, match="context"):
        list(Generator(bb, args=GenerateArgs(max_new_tokens=8)).generate("x" * 508))
    with pytest.raises(AGPError, match="runtime"):
        Generator(bb, "speculative")
    with pytest.raises(AGPError, match="unknown mode"):
        Generator(bb, "fast")


@pytest.mark.slow
def test_real_270m_full_equals_mlx_lm_short_and_past_the_window():
    bb = load()
    short = bb.encode("def fibonacci(n):")
    assert ours(bb, short, 24)[0] == mlx_lm_tokens(bb, short, 24)
    long_text = Path(inspect.getsourcefile(json)).read_text()   # real Python, on every machine
    ids = bb.encode(long_text, max_tokens=640, truncate=True)
    assert len(ids) == 640
    assert ours(bb, ids, 16)[0] == mlx_lm_tokens(bb, ids, 16)


def teacher_forced_top1(bb, ids):
    return mx.argmax(bb.forward(mx.array([ids]))[0], axis=-1).tolist()


@pytest.mark.parametrize("threshold", [0.12, 0.2])
def test_entropy_mode_catches_up_skipped_layers_exactly(long_tiny, threshold):
    """A token that goes full depth after early exits must see exact KV for the exited positions:
    its token equals the full model's greedy choice on the same (partly exited) prefix."""
    bb = long_tiny
    heads = all_vocab_heads(bb, 3)
    ids = bb.encode("for i in range(3):\n    print(i)\n" * 12)[:300]
    g = Generator(bb, "entropy", heads, GenerateArgs(max_new_tokens=30, entropy_threshold=threshold))
    evs = list(g.generate(ids))
    seq = ids + [e.token for e in evs]
    ref = teacher_forced_top1(bb, seq[:-1])
    actions = [e.action for e in evs]
    assert "exit" in actions and "full" in actions
    for e in evs:
        if e.action == "full":
            assert e.token == ref[e.position - 1]
    assert g.decoder.catchup_tokens > 0


def test_state_propagation_writes_the_kv_each_layer_computes_from_the_exited_state(long_tiny):
    """fill_kv over [a, b) writes, in every layer, exactly the K/V that layer itself writes when its
    input is the exited state (only the input is approximate), past the 8-token window."""
    bb = long_tiny
    ids = bb.encode("for i in range(3):\n    print(i)\n" * 4)[:40]
    caches = []
    for _ in range(2):
        cache = bb.make_cache()
        bb.forward(mx.array([ids[:-1]]), cache)
        caches.append(cache)
    _, got = bb.capture(mx.array([ids[-1:]]), [2], bb.make_cache())
    h = got[2]
    for i in range(2, bb.n_layers):
        bb.run_layers(h, i, i + 1, caches[0])
    bb.fill_kv(h, 2, bb.n_layers, caches[1])
    for i in range(bb.n_layers):
        ran, filled = [(c[i].keys, c[i].values) for c in caches]
        assert caches[0][i].offset == caches[1][i].offset == len(ids) - (i < 2)
        for x, y in zip(ran, filled):
            assert mx.allclose(x, y, atol=1e-6).item(), f"layer {i}"


def test_propagate_fills_every_skipped_layer_and_saves_their_macs(long_tiny):
    bb = long_tiny
    heads = all_vocab_heads(bb, 3)
    ids = bb.encode("for i in range(3):\n    print(i)\n" * 12)[:300]
    runs = {}
    for kv in ("catchup", "propagate"):
        g = Generator(bb, "entropy", heads, GenerateArgs(max_new_tokens=30, entropy_threshold=0.12, skipped_kv=kv))
        evs = list(g.generate(ids))
        runs[kv] = (evs, g.summary.to_dict(), g.decoder)
    evs, summ, dec = runs["propagate"]
    assert summ["mode"] == "entropy+propagate" and dec.catchup_tokens == 0
    assert "exit" in [e.action for e in evs] and "full" in [e.action for e in evs]
    # no stale or missing KV: every layer holds every position but the pending one
    assert {c.offset for c in dec.cache} == {len(ids) + len(evs) - 1}
    assert summ["mac_ratio_vs_full"] < runs["catchup"][1]["mac_ratio_vs_full"]
    never = Generator(bb, "entropy", heads, GenerateArgs(max_new_tokens=12, entropy_threshold=1.01, skipped_kv="propagate"))
    assert [e.token for e in never.generate(ids)] == ours(bb, ids, 12)[0]
    with pytest.raises(AGPError, match="--skipped-kv must be one of"):
        Generator(bb, "entropy", heads, GenerateArgs(skipped_kv="stale"))


def test_entropy_extremes_equal_full_and_exit(long_tiny):
    bb = long_tiny
    heads = all_vocab_heads(bb, 4)
    ids = bb.encode(TEXT)
    full, _ = ours(bb, ids, 12)
    assert ours(bb, ids, 12, "entropy", heads, entropy_threshold=1.01)[0] == full
    assert ours(bb, ids, 12, "entropy", heads, entropy_threshold=0.0)[0] == ours(bb, ids, 12, "exit:4", heads)[0]


def test_exit_mode_equals_the_lens_at_L(long_tiny):
    """exit:L with the identity all-vocab head is the logit lens at L, fed its own tokens."""
    bb = long_tiny
    heads = all_vocab_heads(bb, 4)
    ids = bb.encode(TEXT)
    toks, s = ours(bb, ids, 6, "exit:4", heads)
    seq = list(ids)
    for t in toks:
        _, hid = bb.capture(mx.array([seq]), [4])
        assert t == int(mx.argmax(bb.head(hid[4][:, -1]), axis=-1).item())
        seq.append(t)
    assert s.to_dict()["mean_layers"] == 4 and s.to_dict()["mac_ratio_vs_full"] < 1
    with pytest.raises(AGPError, match="no exit head at layer 2"):
        Generator(bb, "exit:2", heads)


def tiny_controller(n_in, d, read):
    from agp.heads.controller import Controller, HeadArgs
    mx.random.seed(1)
    ctl = Controller(n_in, {"route": 4}, HeadArgs(hidden=8))
    cal = {"temperatures": {"route": 1.0}, "thresholds": {"accept_local": 0.3, "escalate": 0.3, "revive_local": 0.3},
           "abstain_gate": 0.0, "decision_layer": d, "read_layers": read}
    return ctl, cal


def test_routed_mode_runs_every_action_and_never_reads_stale_kv(long_tiny):
    bb = long_tiny
    heads = RuntimeHeads(exits={3: ExitHead.identity(bb, 3, np.arange(bb.vocab_size)),
                                5: ExitHead.identity(bb, 5, np.arange(bb.vocab_size))},
                         draft_layer=3, meta={"late_boundary": [5]})
    heads.controller = tiny_controller(2 * bb.hidden_size, 3, [2, 3])
    ids = bb.encode("for i in range(3):\n    print(i)\n" * 12)[:200]
    g = Generator(bb, "routed", heads, GenerateArgs(max_new_tokens=40))
    evs = list(g.generate(ids))
    seq = ids + [e.token for e in evs]
    ref = teacher_forced_top1(bb, seq[:-1])
    for e in evs:
        if e.action in ("escalate", "revive_local"):
            assert e.token == ref[e.position - 1]
    assert len(evs) == 40 and len({e.action for e in evs}) >= 2


@pytest.mark.slow
def test_real_270m_speculative_equals_full_past_the_window():
    """A ridge-fitted shortlist exit head at layer 15 drafts; output equals full on a 640-token
    context (mlx-lm's 512-token rotating window has wrapped) and on a short one."""
    from agp.data.prompt_pack import build_prompt_pack
    from agp.heads.exit import ridge_start, shortlist
    from agp.oracle.probes import hidden_at
    bb = load()
    E = 15
    texts = [r["text"] for r in build_prompt_pack()[:12]]
    ids_list = [bb.encode(t, max_tokens=128, truncate=True) for t in texts]
    hs = [hidden_at(bb, ids, [E, bb.n_layers], list(range(1, len(ids)))) for ids in ids_list]
    head = ExitHead.identity(bb, E, shortlist(ids_list, bb.vocab_size, 4096))
    ridge_start(head, np.concatenate([h[E] for h in hs]), np.concatenate([h[bb.n_layers] for h in hs]))
    heads = RuntimeHeads(exits={E: head}, draft_layer=E)
    long_ids = bb.encode(Path(inspect.getsourcefile(json)).read_text(), max_tokens=640, truncate=True)
    for ids in (bb.encode("def fibonacci(n):"), long_ids):
        full, _ = ours(bb, ids, 24)
        spec, s = ours(bb, ids, 24, "speculative", heads, draft_max=3, draft_min_confidence=0.5)
        assert spec == full
        assert s.drafted > 0


def test_ctrl_c_prints_what_was_generated_and_the_summary(tiny_model_dir, capsys, monkeypatch):
    """An interrupt after the second token: the text so far and a summary marked [interrupted]."""
    from agp.cli import main
    from agp.runtime import generator as G
    real = G.Generator.generate

    def interrupted(self, prompt):
        for i, ev in enumerate(real(self, prompt)):
            yield ev
            if i == 1:
                raise KeyboardInterrupt
    monkeypatch.setattr(G.Generator, "generate", interrupted)
    assert main(["generate", "abc", "--model", tiny_model_dir["gemma3_text"], "--max-new-tokens", "8"]) == 130
    err = capsys.readouterr().err
    assert "[full] 2 tokens" in err and "[interrupted]" in err


def feature_heads(bb):
    """An untrained feature draft head over the whole tiny vocabulary."""
    from agp.heads.draft import FeatureDraftHead
    head = FeatureDraftHead(bb, np.arange(bb.vocab_size), inner=64)
    return RuntimeHeads(feature=head, draft_kind="feature")


@pytest.mark.parametrize("conf", [0.0, 0.02])
def test_feature_draft_speculative_equals_full_past_600_tokens(long_tiny, conf):
    """The EAGLE-style draft (no backbone layer while drafting, its own states fed back) stays
    lossless past the 8-token window, with rejections rolled back."""
    bb = long_tiny
    heads = feature_heads(bb)
    for n_prompt in (1, 12, 620):
        ids = bb.encode("for i in range(3):\n    print(i)  # loop\n" * 20)[:n_prompt]
        full, _ = ours(bb, ids, 40)
        spec, s = ours(bb, ids, 40, "speculative", heads, draft_max=4, draft_min_confidence=conf)
        assert spec == full
        if conf == 0.0 and n_prompt > 1:
            assert s.drafted > s.accepted >= 0 and s.drafted > 0


def test_feature_draft_learns_the_next_state_and_round_trips(long_tiny, tmp_path):
    """Distillation on consecutive final states lowers the loss; the saved head loads equal, and a
    NaN in it is refused at load."""
    from agp.heads.draft import FeatureDraftHead, chain, feature_pairs
    from agp.heads.exit import ExitHeadArgs, distill, evaluate, full_top1
    from agp.oracle.probes import hidden_at
    bb = long_tiny
    L = bb.n_layers
    seqs = [bb.encode("x = [i * i for i in range(10)]\n" * 4)[:60], bb.encode(TEXT * 3)]
    pos = [list(range(1, len(s))) for s in seqs]
    finals = np.concatenate([hidden_at(bb, s, [L], p)[L] for s, p in zip(seqs, pos)])
    pairs = feature_pairs(bb, finals, seqs, pos)
    assert pairs.x.shape == (sum(len(p) - 1 for p in pos), 2 * bb.hidden_size)
    head = FeatureDraftHead(bb, np.arange(bb.vocab_size), inner=64)
    hist = distill(head, pairs.x, pairs.y, ExitHeadArgs(steps=60, batch=32, lr=3e-3))["history"]
    assert hist[-1]["kl"] < hist[0]["kl"]
    top1 = full_top1(bb, pairs.y)
    conf, ok = chain(head, pairs, top1, 3)
    assert conf.shape == (len(pairs.x), 3) and (conf[:, 0] > 0).all()
    head.save(tmp_path / "d", {"model_fingerprint": bb.fingerprint})
    back, _ = FeatureDraftHead.load(bb, tmp_path / "d")
    assert evaluate(back, pairs.x, pairs.y, top1) == evaluate(head, pairs.x, pairs.y, top1)
    w = mx.load(str(tmp_path / "d" / "draft_head.safetensors"))
    w["fc.weight"] = w["fc.weight"] * float("nan")
    mx.save_safetensors(str(tmp_path / "d" / "draft_head.safetensors"), w)
    with pytest.raises(AGPError, match="non-finite"):
        FeatureDraftHead.load(bb, tmp_path / "d")


def test_speculative_draft_choice_is_explicit(long_tiny):
    """speculative:exit and speculative:feature pick the draft; a run without that head is one line."""
    bb = long_tiny
    ids = bb.encode(TEXT)
    full, _ = ours(bb, ids, 10)
    both = RuntimeHeads(exits=all_vocab_heads(bb, 4).exits, draft_layer=4, feature=feature_heads(bb).feature)
    for mode in ("speculative:exit", "speculative:feature"):
        toks, s = ours(bb, ids, 10, mode, both, draft_min_confidence=0.0)
        assert toks == full and s.mode == mode
    with pytest.raises(AGPError, match="feature draft head"):
        Generator(bb, "speculative:feature", all_vocab_heads(bb, 4))
    with pytest.raises(AGPError, match="unknown speculative draft"):
        Generator(bb, "speculative:tree", both)
