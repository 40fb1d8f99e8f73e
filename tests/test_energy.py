"""agp.energy: the CPU-seconds proxy on a real busy loop, RAPL on a sysfs tree written to disk,
powermetrics' NUL-separated plist stream, the meter choice on this machine, energy per unit, and
the energy fields of the runtime benchmark table."""
from __future__ import annotations

import os
import plistlib
import sys
import time

import pytest

from agp.energy.base import EnergyUnavailable, per_unit
from agp.energy.cpu import CpuSecondsMeter
from agp.energy.meter import choose, pick
from agp.energy.powermetrics import NEEDS_ROOT, PowermetricsMeter, integrate, reading_from
from agp.energy.rapl import RaplMeter
from agp.errors import AGPError

HAS_RAPL = any(p.startswith("intel-rapl:") for p in (os.listdir("/sys/class/powercap")
                                                     if os.path.isdir("/sys/class/powercap") else []))


def test_cpu_seconds_meter_measures_a_busy_loop():
    m = CpuSecondsMeter()
    with m.window() as w:
        t = time.perf_counter()
        while time.perf_counter() - t < 0.2:
            sum(i * i for i in range(1000))
    r = w.reading
    assert r.source == "cpu-seconds proxy" and r.unit == "cpu-s" and r.is_proxy and "proxy" in r.label
    assert 0.05 < r.total < r.seconds * (os.cpu_count() or 1) + 0.05
    d = r.to_dict()
    assert d["is_proxy"] and "proxy" in d["label"] and d["total"] == r.total


def zone(d, name, uj, max_uj):
    d.mkdir(parents=True)
    (d / "name").write_text(name + "\n")
    (d / "energy_uj").write_text(f"{uj}\n")
    (d / "max_energy_range_uj").write_text(f"{max_uj}\n")


@pytest.fixture
def rapl_tree(tmp_path):
    """Two packages (one with core and dram subzones) and psys, in the powercap sysfs layout."""
    zone(tmp_path / "intel-rapl:0", "package-0", 1_000_000, 262_143_328_850)
    zone(tmp_path / "intel-rapl:0" / "intel-rapl:0:0", "core", 500_000, 262_143_328_850)
    zone(tmp_path / "intel-rapl:0" / "intel-rapl:0:1", "dram", 100_000, 65_712_999_613)
    zone(tmp_path / "intel-rapl:1", "package-1", 262_143_000_000, 262_143_328_850)   # about to wrap
    zone(tmp_path / "intel-rapl:2", "psys", 7_000_000, 262_143_328_850)
    return tmp_path


def test_rapl_reads_zones_subzones_and_a_wraparound(rapl_tree):
    m = RaplMeter(rapl_tree)
    m.start()
    (rapl_tree / "intel-rapl:0" / "energy_uj").write_text("3500000\n")                   # +2.5 J
    (rapl_tree / "intel-rapl:0" / "intel-rapl:0:0" / "energy_uj").write_text("1500000\n")  # +1.0 J
    (rapl_tree / "intel-rapl:0" / "intel-rapl:0:1" / "energy_uj").write_text("350000\n")   # +0.25 J
    (rapl_tree / "intel-rapl:1" / "energy_uj").write_text("671150\n")   # wrapped: 328850 + 671150 uJ = 1.0 J
    (rapl_tree / "intel-rapl:2" / "energy_uj").write_text("12000000\n")                  # +5 J
    r = m.stop()
    assert (r.source, r.unit, r.is_proxy) == ("rapl", "J", False)
    b = r.breakdown
    assert b["package-0"] == pytest.approx(2.5) and b["package-1"] == pytest.approx(1.0)
    assert b["package-0/core"] == pytest.approx(1.0) and b["package-0/dram"] == pytest.approx(0.25)
    assert b["psys"] == pytest.approx(5.0)
    assert r.total == pytest.approx(3.5)          # packages only: psys already contains them


def test_rapl_absent_or_unreadable_is_unavailable(tmp_path, rapl_tree):
    with pytest.raises(EnergyUnavailable, match="no intel-rapl"):
        RaplMeter(tmp_path / "nothing")
    (rapl_tree / "intel-rapl:1" / "energy_uj").unlink()
    (rapl_tree / "intel-rapl:1" / "energy_uj").mkdir()
    with pytest.raises(EnergyUnavailable, match="cannot read") as e:
        RaplMeter(rapl_tree)
    assert "\n" not in str(e.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a mode-000 file, so no PermissionError can arise")
def test_rapl_root_only_counter_is_unavailable(rapl_tree):
    (rapl_tree / "intel-rapl:0" / "energy_uj").chmod(0)
    with pytest.raises(EnergyUnavailable, match="root-only"):
        RaplMeter(rapl_tree)


def stream(*samples) -> bytes:
    return b"\0".join(plistlib.dumps(s) for s in samples) + b"\0"


def test_powermetrics_stream_integrates_power_over_elapsed():
    s1 = {"elapsed_ns": 100_000_000, "processor": {"cpu_power": 2000.0, "gpu_power": 500.0, "ane_power": 0.0,
                                                   "combined_power": 2500.0}}
    s2 = {"elapsed_ns": 200_000_000, "processor": {"cpu_power": 1000.0, "gpu_power": 3000.0, "ane_power": 100.0}}
    s3 = {"elapsed_ns": 50_000_000, "processor": {"cpu_energy": 40.0}, "gpu": {"gpu_power": 1000.0}}   # mJ
    data = stream(s1, s2, s3) + plistlib.dumps(s1)[:40]     # cut short, as a terminated process leaves it
    got = integrate(data)
    assert got["samples"] == 3 and got["skipped"] == 1
    assert got["seconds"] == pytest.approx(0.35)
    j = got["joules"]
    assert j["cpu"] == pytest.approx(0.2 + 0.2 + 0.04)
    assert j["gpu"] == pytest.approx(0.05 + 0.6 + 0.05)
    assert j["ane"] == pytest.approx(0.02)
    assert j["combined"] == pytest.approx(0.25)
    r = reading_from(got, wall=0.35)
    assert r.source == "powermetrics" and r.unit == "J" and not r.is_proxy
    assert r.total == pytest.approx(0.44 + 0.70 + 0.02)
    assert reading_from(got, wall=0.7).total == pytest.approx(2 * r.total)    # mean power x the window


def test_powermetrics_without_power_keys_is_unavailable():
    with pytest.raises(EnergyUnavailable, match="no cpu/gpu/ane power"):
        reading_from(integrate(stream({"elapsed_ns": 1, "tasks": []})), 1.0)


@pytest.mark.skipif(sys.platform == "darwin", reason="off macOS only: on a Mac powermetrics exists")
def test_powermetrics_off_macos_is_unavailable():
    with pytest.raises(EnergyUnavailable, match="macOS-only"):
        PowermetricsMeter()
    assert "sudo -v" in NEEDS_ROOT and "unavailable" in NEEDS_ROOT and "\n" not in NEEDS_ROOT


@pytest.mark.skipif(not sys.platform.startswith("linux") or HAS_RAPL,
                    reason="this machine's fallback: Linux without RAPL")
def test_pick_here_falls_back_to_the_labelled_proxy():
    m, notes = pick("auto")
    assert isinstance(m, CpuSecondsMeter)
    text = " ".join(notes)
    assert "rapl not used" in text and "powermetrics not used" in text and "proxy" in text
    assert all("\n" not in n for n in notes)
    with pytest.raises(AGPError) as e:
        pick("rapl")
    assert "--energy rapl" in str(e.value) and "\n" not in str(e.value)
    meter, info = choose("powermetrics")                 # requested but unavailable: marked, no raise
    assert meter is None and "macOS-only" in info["unavailable"]
    with pytest.raises(AGPError, match="--energy must be one of"):
        pick("joules")


def test_per_unit_and_zero_counts():
    r = CpuSecondsMeter()
    r.start()
    reading = r.stop()
    reading.total = 2.0
    u = per_unit(reading, tokens=8, accepted=4, decisions=0)
    assert u["per_token"] == 0.25 and u["per_accepted_token"] == 0.5 and u["per_decision"] is None
    assert u["unit"] == "cpu-s/token (proxy)"
    z = per_unit({**reading.to_dict(), "unit": "J", "is_proxy": False}, 0, 0, None)
    assert z["per_token"] is None and z["per_accepted_token"] is None and z["unit"] == "J/token"


def run_row(mode, tokens, agreement, energy, actions=None):
    return {"mode": mode, "prompt": "p", "prompt_tokens": 4, "tokens": list(range(tokens)), "tok_s": 10.0,
            "anchor_tok_s": 10.0, "step_ms": [1.0] * tokens, "args": {},
            "vs_full": {"agreement": agreement, "identical": agreement == 1.0, "first_divergence": None},
            "vs_anchor": {"agreement": 1.0, "identical": True, "first_divergence": None},
            "summary": {"mac_ratio_vs_full": 1.0, "actions": actions or {}} if actions is not None else {},
            "energy": {"source": "rapl", "unit": "J", "is_proxy": False, "total": energy, "seconds": 1.0,
                       "breakdown": {}, "note": None, "label": "J (rapl)"} if energy is not None else None}


def test_summarise_energy_fields():
    from agp.train.runtime import summarise
    runs = [run_row("mlx_lm.generate", 8, 1.0, 4.0), run_row("full", 8, 1.0, 8.0, {"full": 8}),
            run_row("routed", 8, 0.5, 4.0, {"accept_local": 5, "escalate": 3}),
            run_row("exit:2", 8, 0.75, None, {"exit": 8})]
    t = {r["mode"]: r for r in summarise(runs)}
    f, r = t["full"], t["routed"]
    assert (f["energy_source"], f["energy_unit"], f["energy_is_proxy"]) == ("rapl", "J/token", False)
    assert f["energy_per_token"] == 1.0 and f["energy_per_decision"] is None and f["energy_ratio_vs_full"] == 1.0
    assert r["energy_per_token"] == 0.5 and r["energy_per_accepted_token"] == 1.0     # 4 of 8 agree with full
    assert r["energy_per_decision"] == 0.5 and r["energy_ratio_vs_full"] == 0.5
    assert t["mlx_lm.generate"]["energy_per_decision"] is None
    assert t["exit:2"]["energy_per_token"] is None and t["exit:2"]["energy_ratio_vs_full"] is None
    assert "tok_s_ratio_vs_mlx_lm" in r and "acceptance" in r              # the existing keys stay
