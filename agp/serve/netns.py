"""Two network namespaces joined by a veth pair: a two-host network inside one machine, for tests.

The resume server's tests must talk only to loopback or to namespaces they create themselves, so
they never reach (or depend on) a real network. `NetnsPair` makes two fresh namespaces, joins
them with a veth pair (10.201.X.1/24 in side 'a', 10.201.X.2/24 in side 'b'), and brings lo and
both ends up; `popen(side, argv)` runs a process inside one side through `ip netns exec`.

Cleanup is the point of the context manager: on exit it kills the processes it started (a process
left inside keeps a deleted namespace alive, unnamed) and deletes both namespaces, which also
removes the veth. It does so on an error or a KeyboardInterrupt too, finishing every step before
re-raising. Names carry the pid (`agp-<pid>-<n>-a`), so a namespace left by a killed run can be
traced to it and removed by `remove_stale()`.

Creating namespaces needs root and iproute2; `available()` says whether this machine can, and
why not, so tests can skip with that reason.
"""
from __future__ import annotations

import functools
import itertools
import os
import re
import shutil
import subprocess

from agp.errors import AGPError

PREFIX = "agp"
SUBNET = "10.201"             # private; the addresses exist only inside the pair's own namespaces
IP_TIMEOUT_S = 10.0
TERMINATE_WAIT_S = 2.0
SIDES = ("a", "b")
_instances = itertools.count()


def _run_ip(*args: str) -> str:
    """Run one `ip` command; return its stdout, or raise AGPError with ip's own complaint."""
    command = "ip " + " ".join(args)
    try:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S)
    except FileNotFoundError:
        raise AGPError("network namespaces need iproute2's `ip`: install iproute2 "
                       "or skip the two-namespace tests") from None
    except subprocess.TimeoutExpired:
        raise AGPError(f"`{command}` did not finish in {IP_TIMEOUT_S:.0f} s: "
                       "check `ip netns list` for a stuck namespace, or skip the two-namespace tests") from None
    if done.returncode:
        why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        fix = ("a namespace of that name is left over: delete it (ip netns delete NAME, or "
               "agp.serve.netns.remove_stale() for a dead run's)" if "exists" in why
               else "run as root with iproute2, or skip the two-namespace tests")
        raise AGPError(f"`{command}` failed ({why}): {fix}")
    return done.stdout


def _precondition() -> str | None:
    """Why namespaces cannot be made here without trying, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root: run as root or skip the two-namespace tests"
    if shutil.which("ip") is None:
        return "network namespaces need iproute2's `ip`: install iproute2 or skip the two-namespace tests"
    return None


def _delete_netns(name: str) -> None:
    _run_ip("netns", "delete", name)


def namespaces() -> list[str]:
    """Names `ip netns list` shows now (its lines read `name` or `name (id: N)`)."""
    return [line.split()[0] for line in _run_ip("netns", "list").splitlines() if line.strip()]


@functools.lru_cache(maxsize=None)
def available() -> tuple[bool, str]:
    """(True, why) when this process can create a namespace, else (False, the one-line reason).

    Tries once, by creating and deleting a probe namespace, and caches the answer: root and `ip`
    are not enough where a container forbids `unshare` or /run/netns cannot be mounted."""
    problem = _precondition()
    if problem:
        return False, problem
    probe = f"{PREFIX}-{os.getpid()}-probe"
    try:
        _run_ip("netns", "add", probe)
    except AGPError as err:
        return False, str(err)
    try:
        _delete_netns(probe)
    except AGPError as err:
        return False, f"{err} (namespace {probe} may be left: ip netns delete {probe})"
    return True, "network namespaces can be created (root, iproute2)"


def remove_stale(prefix: str = PREFIX) -> list[str]:
    """Delete the namespaces named `<prefix>-<pid>-...` whose pid is no longer running; return them.

    A run killed with SIGKILL cannot clean up; its pid in the names says the namespaces are orphans."""
    removed = []
    for name in namespaces():
        match = re.fullmatch(rf"{re.escape(prefix)}-(\d+)-.+", name)
        if match and not os.path.exists(f"/proc/{match.group(1)}"):
            _delete_netns(name)
            removed.append(name)
    return removed


def stop(proc: subprocess.Popen) -> None:
    """Terminate, then kill what does not exit in time; reap it and close its pipes (read what
    you need first), so no zombie or open descriptor outlives the pair."""
    try:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(TERMINATE_WAIT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(TERMINATE_WAIT_S)
    finally:
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass  # a stdin whose reader died: nothing left to flush to


class NetnsPair:
    """Two namespaces, sides 'a' and 'b', joined by a veth pair; a context manager.

    `address(side)` is that side's IP on the veth; `popen(side, argv, **kw)` starts a process
    there (the keyword arguments go to subprocess.Popen); `name(side)` is the namespace's name."""

    def __init__(self, prefix: str = PREFIX):
        serial = next(_instances)
        pid = os.getpid()
        self._names = {side: f"{prefix}-{pid}-{serial}-{side}" for side in SIDES}
        # X differs per instance (and per process) so logs and captures are unambiguous; a clash
        # would be harmless, since each pair's addresses live only in its own namespaces
        octet = (pid + serial) % 254 + 1
        self._addresses = {"a": f"{SUBNET}.{octet}.1", "b": f"{SUBNET}.{octet}.2"}
        self._created: list[str] = []
        self._procs: list[subprocess.Popen] = []

    def name(self, side: str) -> str:
        return self._names[_side(side)]

    def address(self, side: str) -> str:
        return self._addresses[_side(side)]

    def command(self, side: str, argv: list[str]) -> list[str]:
        """The argv that runs `argv` inside `side`, for callers that spawn processes themselves."""
        if not self._created:
            raise AGPError("the namespace pair is not set up: use `with NetnsPair() as pair:`")
        return ["ip", "netns", "exec", self.name(side), *map(str, argv)]

    def popen(self, side: str, argv: list[str], **kw) -> subprocess.Popen:
        """Start `argv` inside `side`; the pair stops it on exit if it is still running."""
        proc = subprocess.Popen(self.command(side, argv), **kw)
        self._procs.append(proc)
        return proc

    def __enter__(self) -> "NetnsPair":
        problem = _precondition()
        if problem:
            raise AGPError(problem)
        try:
            self._create()
        except BaseException:
            self._teardown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._teardown()

    def _create(self) -> None:
        for side in SIDES:
            _run_ip("netns", "add", self._names[side])
            self._created.append(self._names[side])
        # each end is created directly inside its namespace, so the fixed names never meet in the host's
        _run_ip("link", "add", "veth-a", "netns", self._names["a"], "type", "veth",
                "peer", "name", "veth-b", "netns", self._names["b"])
        for side in SIDES:
            ns, dev = self._names[side], f"veth-{side}"
            _run_ip("-n", ns, "addr", "add", f"{self._addresses[side]}/24", "dev", dev)
            _run_ip("-n", ns, "link", "set", "lo", "up")
            _run_ip("-n", ns, "link", "set", dev, "up")

    def _teardown(self) -> None:
        """Stop the processes, then delete the namespaces; every step runs even if one fails or
        Ctrl-C arrives, and the first problem is raised only at the end."""
        steps = [functools.partial(stop, proc) for proc in self._procs]
        steps += [functools.partial(_delete_netns, name) for name in reversed(self._created)]
        first: BaseException | None = None
        for step in steps:
            try:
                step()
            except BaseException as err:  # KeyboardInterrupt included: finish cleaning, then re-raise
                first = first or err
        self._procs.clear()
        self._created.clear()
        if first is not None:
            raise first


def _side(side: str) -> str:
    if side not in SIDES:
        raise AGPError(f"namespace side must be 'a' or 'b', got {side!r}")
    return side
