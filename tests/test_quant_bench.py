"""`agp bench codecs` machinery: rows, table, plot; and one small run on real Gemma hidden states."""
import numpy as np
import pytest

from agp.bench.codecs import BenchCodecsArgs, format_table, run_bench
from agp.quant.turboquant import mse_bound
from gates.thresholds import TQ4_REAL_COS_MIN, TQ_CENTERING_GAIN_MIN


def test_synthetic_bench_rows_and_plot(tmp_path, capsys):
    rows = run_bench(BenchCodecsArgs(source="synthetic", dims=(128,), n=64, repeats=1,
                                     codecs=("fp16", "q8_0", "tq4", "tq4-c", "tq2-qjl"),
                                     out=str(tmp_path / "rows.json"), plot=str(tmp_path / "rd.png")))
    by = {r["codec"]: r for r in rows}
    assert by["fp16"]["rel_mse"] < 1e-6 < by["q8_0"]["rel_mse"] < by["tq4"]["rel_mse"]
    assert by["tq4"]["rel_mse"] <= mse_bound(4)[1] * 1.3  # 64 vectors: sampling noise around the bound
    assert abs(by["tq2-qjl"]["ip_bias"]) < abs(by["tq4"]["ip_bias"]) * 3  # QJL: no systematic shrink
    assert by["tq4"]["bytes_per_vec"] == pytest.approx(128 * 4 / 8 + 4, abs=0.1)  # codes + f32 norm
    assert (tmp_path / "rows.json").exists() and (tmp_path / "rd.png").stat().st_size > 10_000
    assert "tq4-c" in capsys.readouterr().out
    assert format_table("t", rows).count("\n") == len(rows) + 1


@pytest.mark.slow
def test_real_hidden_states_tq4_packet_and_fidelity():
    # the done-when on the real thing: Gemma 3 270M states after layer 12, three prompts
    rows = run_bench(BenchCodecsArgs(source="real", layers=(12,), per_source=1, max_tokens=48, repeats=1,
                                     codecs=("fp16", "tq4", "tq4-c")))
    by = {r["codec"]: r for r in rows}
    assert by["tq4"]["packet_one_vec"] / by["fp16"]["packet_one_vec"] <= 1 / 3
    assert by["tq4"]["cos_mean"] > TQ4_REAL_COS_MIN
    # centering on a shared mean removes Gemma's massive channel from the error budget (~10x, measured)
    assert by["tq4-c"]["centered_mse"] < by["tq4"]["centered_mse"] / TQ_CENTERING_GAIN_MIN
    assert np.isfinite([r["enc_us_one"] for r in rows]).all()
