"""Real parts for amm_dask's tests: a real amm-agent (root, BPF), a real
``dask scheduler`` and real ``dask worker`` processes (nanny + worker), each
worker in its own memory cgroup with a hard limit (the stand-in for a node).

Run by ``cargo xtask test`` (tests/tests/dask.rs runs pytest here as root).
Without root they skip visibly, and with AMM_REQUIRE_BPF=1 (CI) they fail.
"""

from __future__ import annotations

import json
import os
import signal
import socket as socketlib
import subprocess
import sys
import tempfile
import time

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
MIB = 1 << 20


def _path(env: str, default: str) -> str:
    return os.environ.get(env) or os.path.join(ROOT, default)


AGENT_BIN = _path("AMM_AGENT_BIN", "target/debug/amm-agent")
WORKER_BIN = _path("AMM_WORKER_BIN", "target/debug/amm-worker")
BPF_OBJECT = _path("AMM_BPF_OBJECT", "target/bpf/amm.bpf.o")


def require_root():
    if os.geteuid() == 0:
        return
    if os.environ.get("AMM_REQUIRE_BPF") == "1":
        pytest.fail("amm_dask's tests need root (BPF, cgroups) and AMM_REQUIRE_BPF=1 forbids skipping")
    pytest.skip("needs root to load BPF and create cgroups (run `sudo cargo xtask test`)")


def wait_until(pred, what: str, timeout: float = 60.0, step: float = 0.05):
    """Polls `pred` until it returns something truthy (returned); fails
    naming `what` after `timeout` (a bound, not a measurement)."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f} s")
        time.sleep(step)


# ---------------------------------------------------------------- agent


class Agent:
    """`amm-agent run` on a private socket; kill and restart on demand."""

    def __init__(self, tmp: str) -> None:
        self.dir = tmp
        self.socket = os.path.join(tmp, "agent.sock")
        self.log = open(os.path.join(tmp, "agent.log"), "ab")
        self.proc = None
        self.start()

    def start(self) -> None:
        for p in (AGENT_BIN, BPF_OBJECT):
            if not os.path.exists(p):
                pytest.fail(f"{p} is missing: run the tests with `cargo xtask test`")
        if os.path.exists(self.socket):
            os.unlink(self.socket)
        self.proc = subprocess.Popen(
            [AGENT_BIN, "run", "--socket", self.socket, "--socket-mode", "666",
             "--bpf-object", BPF_OBJECT],
            stdout=self.log, stderr=self.log, env={**os.environ, "AMM_LOG": "info"},
        )
        def up():
            if self.proc.poll() is not None:
                pytest.fail(f"amm-agent exited ({self.proc.returncode}); see {self.log.name}")
            s = socketlib.socket(socketlib.AF_UNIX)
            try:
                s.connect(self.socket)
                return True
            except OSError:
                return False
            finally:
                s.close()
        wait_until(up, "amm-agent listening", 30)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def status(self) -> dict:
        out = subprocess.run(
            [AGENT_BIN, "status", "--socket", self.socket, "--json"],
            capture_output=True, text=True, timeout=30,
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def watched(self) -> set[int]:
        return {w["pid"] for w in self.status()["watches"]}

    def report(self, pid: int) -> dict:
        """`amm-worker report --agent SOCK --pid PID --json`."""
        out = subprocess.run(
            [WORKER_BIN, "report", "--agent", self.socket, "--pid", str(pid), "--json"],
            capture_output=True, text=True, timeout=60,
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def agent(tmp_path):
    require_root()
    a = Agent(str(tmp_path))
    yield a
    a.close()


# ---------------------------------------------------------------- cgroups


class HardLimit:
    """A memory cgroup with a hard limit (v1 or v2), below this process's."""

    _n = 0

    def __init__(self, purpose: str, limit: int) -> None:
        HardLimit._n += 1
        name = f"amm-{purpose}-{os.getpid()}-{HardLimit._n}"
        v1 = "/sys/fs/cgroup/memory"
        own = {}
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, ctrls, path = line.rstrip("\n").split(":", 2)
                own[ctrls] = path
        if os.path.isdir(v1) and any("memory" in c.split(",") for c in own):
            path = next(p for c, p in own.items() if "memory" in c.split(","))
            self.v2 = False
            parent = v1 + path
        else:
            self.v2 = True
            parent = "/sys/fs/cgroup" + own.get("", "/")
            try:
                with open(os.path.join(parent, "cgroup.subtree_control"), "w") as f:
                    f.write("+memory")
            except OSError:
                parent = "/sys/fs/cgroup"
        self.dir = os.path.join(parent, name)
        os.mkdir(self.dir)
        if self.v2:
            self._write("memory.max", limit)
            if os.path.exists(os.path.join(self.dir, "memory.swap.max")):
                self._write("memory.swap.max", 0)
        else:
            self._write("memory.limit_in_bytes", limit)
            if os.path.exists(os.path.join(self.dir, "memory.memsw.limit_in_bytes")):
                self._write("memory.memsw.limit_in_bytes", limit)

    def _write(self, file: str, value) -> None:
        with open(os.path.join(self.dir, file), "w") as f:
            f.write(str(value))

    def _read(self, file: str) -> str:
        with open(os.path.join(self.dir, file)) as f:
            return f.read()

    def join_in_child(self):
        """A preexec_fn: the child joins before it execs."""
        procs = os.path.join(self.dir, "cgroup.procs")
        def join():
            with open(procs, "w") as f:
                f.write("0")
        return join

    def procs(self) -> list[int]:
        """The pids in the cgroup, as this (the host's) PID namespace sees them."""
        return [int(p) for p in self._read("cgroup.procs").split()]

    def oom_kills(self) -> int:
        text = self._read("memory.events" if self.v2 else "memory.oom_control")
        for line in text.splitlines():
            k, _, v = line.partition(" ")
            if k == "oom_kill":
                return int(v)
        return 0

    def remove(self) -> None:
        for _ in range(500):
            pids = [int(p) for p in self._read("cgroup.procs").split()]
            if not pids:
                break
            for p in pids:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)
        for _ in range(500):
            try:
                os.rmdir(self.dir)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.02)


# ---------------------------------------------------------------- Dask


def dask_bin() -> str:
    return os.path.join(os.path.dirname(sys.executable), "dask")


class DaskCluster:
    """A real scheduler and real nanny-managed workers, each worker (nanny
    included) in its own hard-limited cgroup."""

    def __init__(self, tmp: str, agent: Agent | None, env: dict | None = None) -> None:
        self.tmp = tmp
        self.agent = agent
        here = os.path.dirname(os.path.abspath(__file__))
        path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **(env or {})}
        if agent is not None:
            self.env["DASK_AMM__SOCKET"] = agent.socket
        self.sched_file = os.path.join(tmp, "scheduler.json")
        self.procs: list[subprocess.Popen] = []
        self.cgroups: list[HardLimit] = []
        self.workers: list[dict] = []
        self.client = None
        log = open(os.path.join(tmp, "scheduler.log"), "ab")
        self.procs.append(subprocess.Popen(
            [dask_bin(), "scheduler", "--scheduler-file", self.sched_file, "--port", "0",
             "--no-dashboard", "--preload", "amm_dask"],
            stdout=log, stderr=log, env=self.env, cwd=tmp,
        ))
        wait_until(lambda: os.path.exists(self.sched_file), "the scheduler's file", 60)

    def add_worker(self, name: str, limit: int, *, amm: bool = True, nthreads: int = 1,
                   extra_env: dict | None = None, cgroup_slack: int = 256 * MIB,
                   wrapper: list[str] | None = None) -> dict:
        """A nanny-managed worker in its own cgroup; `wrapper` runs it through
        a command first (``unshare --pid ...``: a container's PID namespace)."""
        cg = HardLimit("dasktest", limit + cgroup_slack)
        self.cgroups.append(cg)
        args = list(wrapper or []) + [dask_bin(), "worker", "--scheduler-file", self.sched_file,
                "--nthreads", str(nthreads), "--memory-limit", str(limit), "--name", name,
                "--local-directory", os.path.join(self.tmp, name),
                "--dashboard-address", "127.0.0.1:0"]
        if amm:
            args += ["--preload", "amm_dask", "--preload-nanny", "amm_dask"]
        log_path = os.path.join(self.tmp, f"{name}.log")
        log = open(log_path, "ab")
        p = subprocess.Popen(args, stdout=log, stderr=log, env={**self.env, **(extra_env or {})},
                             preexec_fn=cg.join_in_child(), cwd=self.tmp)
        self.procs.append(p)
        w = {"name": name, "nanny": p, "cgroup": cg, "log": log_path, "limit": limit}
        self.workers.append(w)
        return w

    def connect(self, n: int):
        from distributed import Client

        self.client = Client(scheduler_file=self.sched_file, timeout=60)
        self.client.wait_for_workers(n, timeout=120)
        return self.client

    def pids(self) -> dict[str, int]:
        """{worker name: worker process pid}."""
        return self.client.run_on_scheduler(
            lambda dask_scheduler: {
                str(ws.name): ws.pid for ws in dask_scheduler.workers.values()
            }
        )

    def address(self, name: str) -> str:
        return self.client.run_on_scheduler(
            lambda dask_scheduler, name=name: next(
                a for a, ws in dask_scheduler.workers.items() if str(ws.name) == name
            )
        )

    def log(self, name: str) -> str:
        with open(os.path.join(self.tmp, f"{name}.log"), errors="replace") as f:
            return f.read()

    def close(self) -> None:
        if self.client is not None:
            try:
                self.client.close(timeout=10)
            except Exception:
                pass
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for cg in self.cgroups:
            cg.remove()


@pytest.fixture
def cluster_factory(tmp_path):
    made = []

    def make(agent, env=None):
        c = DaskCluster(str(tmp_path), agent, env)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()
