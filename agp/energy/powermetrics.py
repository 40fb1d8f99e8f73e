"""macOS `powermetrics` sampled around a window: CPU, GPU and ANE energy in joules.

`sudo -n powermetrics --samplers cpu_power,gpu_power,ane_power -i <ms> -f plist` writes one plist
document per sample, documents separated by NUL bytes. Keys read from each sample (Apple silicon):
`elapsed_ns` (the sample's length) and, in its `processor` dict (or at the top level, or in `gpu`
for the GPU), `cpu_power`, `gpu_power`, `ane_power` in mW; where a power key is missing its
`cpu_energy`/`gpu_energy`/`ane_energy` (mJ over the sample) is used instead; `combined_power` (mW)
is kept in the breakdown when present. Energy = sum over samples of power x elapsed.
powermetrics needs root; without it the meter is unavailable and says how to grant it. Its power
values are Apple's estimates, machine-wide, and include powermetrics' own small load.
"""
from __future__ import annotations

import plistlib
import shutil
import subprocess
import sys
import tempfile
import time
import xml.parsers.expat

from agp.energy.base import EnergyUnavailable, Meter, Reading

SAMPLERS = "cpu_power,gpu_power,ane_power"
DOMAINS = ("cpu", "gpu", "ane")
NEEDS_ROOT = ("powermetrics needs root: run `sudo -v` (or add a NOPASSWD sudoers rule for /usr/bin/powermetrics) "
              "before the benchmark; energy is marked unavailable")


def _lookup(sample: dict, key: str):
    for d in (sample.get("processor"), sample, sample.get("gpu")):
        if isinstance(d, dict) and isinstance(d.get(key), (int, float)):
            return float(d[key])
    return None


def sample_joules(sample: dict) -> tuple[dict, float]:
    """One sample's energy per domain (J) and its length (s); domains it does not report are absent."""
    s = float(sample.get("elapsed_ns", 0)) / 1e9
    out = {}
    for d in DOMAINS:
        mw, mj = _lookup(sample, f"{d}_power"), _lookup(sample, f"{d}_energy")
        if mw is not None:
            out[d] = mw / 1e3 * s
        elif mj is not None:
            out[d] = mj / 1e3
    combined = _lookup(sample, "combined_power")
    if combined is not None:
        out["combined"] = combined / 1e3 * s
    return out, s


def integrate(stream: bytes) -> dict:
    """Sum the energy of every complete plist sample in a NUL-separated powermetrics stream.
    A document cut short (the process stopped mid-write) is skipped and counted."""
    joules, covered, n, skipped = {}, 0.0, 0, 0
    for doc in stream.split(b"\0"):
        doc = doc.strip()
        if not doc:
            continue
        try:
            sample = plistlib.loads(doc)
        except (plistlib.InvalidFileException, ValueError, xml.parsers.expat.ExpatError):
            skipped += 1
            continue
        if not isinstance(sample, dict):
            skipped += 1
            continue
        j, s = sample_joules(sample)
        for k, v in j.items():
            joules[k] = joules.get(k, 0.0) + v
        covered, n = covered + s, n + 1
    return {"joules": joules, "seconds": covered, "samples": n, "skipped": skipped}


class PowermetricsMeter(Meter):
    source = "powermetrics"
    unit = "J"

    def __init__(self, interval_ms: int = 100, binary: str = "powermetrics"):
        if sys.platform != "darwin":
            raise EnergyUnavailable(f"powermetrics is macOS-only (this is {sys.platform})")
        path = shutil.which(binary)
        if path is None:
            raise EnergyUnavailable(f"powermetrics: `{binary}` is not on PATH")
        self.interval_ms = int(interval_ms)
        self.cmd = ["sudo", "-n", path, "--samplers", SAMPLERS, "-i", str(self.interval_ms), "-f", "plist"]
        self.proc = None
        self._probe()

    def _probe(self) -> None:
        """One short sample now, so a missing permission or sampler fails before any window opens."""
        try:
            r = subprocess.run(self.cmd[:-4] + ["-i", "50", "-n", "1", "-f", "plist"], capture_output=True,
                               timeout=30)
        except subprocess.TimeoutExpired as e:
            raise EnergyUnavailable("powermetrics: a single 50 ms sample took over 30 s") from e
        _check(r.returncode, r.stderr)

    def _nuls(self) -> int:
        self.out.seek(0)
        return self.out.read().count(b"\0")

    def _wait_for(self, n: int) -> None:
        deadline = time.perf_counter() + max(5.0, 5 * self.interval_ms / 1e3)
        while self._nuls() < n:
            if self.proc.poll() is not None:
                self.err.seek(0)
                _check(self.proc.returncode or 1, self.err.read())
            if time.perf_counter() > deadline:
                raise EnergyUnavailable("powermetrics: no sample arrived within 5 s")
            time.sleep(0.005)

    def start(self) -> None:
        self.out, self.err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.cmd, stdout=self.out, stderr=self.err)
        # the window opens once sampling runs: the first (pre-window) sample is dropped
        self._wait_for(1)
        self.out.seek(0)
        self._skip = self.out.read().index(b"\0") + 1
        self._t0 = time.perf_counter()

    def stop(self) -> Reading:
        if self.proc is None:
            raise RuntimeError("PowermetricsMeter.stop() without start()")
        wall = time.perf_counter() - self._t0
        try:
            self._wait_for(self._nuls() + 1)      # the sample in progress at stop covers the window's end
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None
        self.out.seek(self._skip)
        got = integrate(self.out.read())
        return reading_from(got, wall)


def reading_from(got: dict, wall: float) -> Reading:
    """Mean sampled power x the window's wall time: samples do not line up with the window's edges."""
    j = {k: v for k, v in got["joules"].items() if k in DOMAINS}
    if not got["samples"] or not j or got["seconds"] <= 0:
        raise EnergyUnavailable("powermetrics: no cpu/gpu/ane power in its samples (keys cpu_power, gpu_power, "
                                "ane_power not found)")
    scale = wall / got["seconds"]
    breakdown = {k: v * scale for k, v in got["joules"].items()}
    return Reading("powermetrics", "J", False, sum(breakdown[k] for k in j), wall, breakdown,
                   note=f"mean power of {got['samples']} samples ({got['seconds']:.3f} s) x {wall:.3f} s window")


def _check(rc: int, stderr: bytes) -> None:
    if rc == 0:
        return
    text = stderr.decode(errors="replace")
    if "password is required" in text or "a terminal is required" in text:
        raise EnergyUnavailable(NEEDS_ROOT)
    last = next((ln.strip() for ln in reversed(text.splitlines()) if ln.strip()), f"exit status {rc}")
    raise EnergyUnavailable(f"powermetrics failed: {last}")
