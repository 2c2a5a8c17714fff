"""amm_dask on real Dask: a real scheduler, real nanny-managed workers each
in its own hard-limited memory cgroup, one real amm-agent (see conftest).

No timed assertions: every wait is a bounded poll for a state, and the
orders checked (a task started after memory was released) are orders of
events, not durations.
"""

from __future__ import annotations

import os
import signal
import time
import urllib.request

import pytest
from distributed import KilledWorker

from conftest import MIB, wait_until
from dask_tasks import (
    allocator_in_use,
    block_check,
    filled_block,
    hoard,
    hold_then_release,
    leak,
    preload_purges_own,
    preload_purges_own_after_teardown,
    random_block,
    spike,
    started_at,
)

LIMIT = 512 * MIB


def huge_page_bytes():
    """The size of the largest page one fault can map (a PMD huge page),
    or 0 where the kernel has no transparent huge pages."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as f:
            return int(f.read())
    except OSError:
        return 0


# ---------------------------------------------------------------- tests


def test_workers_register_and_stay_registered(agent, cluster_factory):
    c = cluster_factory(agent)
    c.add_worker("a", LIMIT)
    c.add_worker("b", LIMIT)
    c.connect(2)
    pids = c.pids()
    wait_until(lambda: set(pids.values()) <= agent.watched(), "both workers registered")
    st = {w["pid"]: w for w in agent.status()["watches"]}
    for pid in pids.values():
        # Dask's terminate level of Dask's memory_limit, in the kernel
        assert st[pid]["limit_bytes"] == LIMIT
        assert st[pid]["thresholds"]["terminate"] == int(LIMIT * 0.95)

    # a worker dies: its nanny restarts it and the new process registers
    os.kill(pids["a"], signal.SIGKILL)
    new_a = wait_until(
        lambda: (p := c.pids().get("a")) and p != pids["a"] and p, "worker a restarted", 120
    )
    wait_until(lambda: new_a in agent.watched(), "the restarted worker registered")

    # the agent dies and comes back: every worker registers again
    agent.kill()
    agent.start()
    wait_until(lambda: {new_a, pids["b"]} <= agent.watched(), "re-registration after the agent's restart")
    assert "registered with amm-agent" in c.log("a")
    assert "amm-agent lost" in c.log("b")


def test_a_plugin_registered_on_a_running_cluster_registers_its_workers(agent, cluster_factory):
    # no --preload: the user adds amm_dask to a cluster that already runs
    c = cluster_factory(agent)
    c.add_worker("a", LIMIT, amm=False)
    client = c.connect(1)
    pid = c.pids()["a"]
    assert pid not in agent.watched()
    from amm_dask import AmmWorkerPlugin

    client.register_plugin(AmmWorkerPlugin())
    wait_until(lambda: pid in agent.watched(), "the running worker registered")
    st = {w["pid"]: w for w in agent.status()["watches"]}
    assert st[pid]["limit_bytes"] == LIMIT
    # the plugin heard the agent say so (its loop reads the link's report)
    wait_until(
        lambda: next(iter(client.run(amm_stats).values())).get("connects"),
        "the plugin connected",
    )


def test_a_worker_in_another_pid_namespace_registers_as_itself(agent, cluster_factory):
    # a container: the worker and its nanny see pid 1.. of their own PID
    # namespace; the agent (on the host) must watch the host's pid of the
    # worker process, never the pid number the worker believes it has
    c = cluster_factory(agent)
    w = c.add_worker("a", LIMIT, wrapper=["unshare", "--pid", "--fork", "--mount-proc"])
    c.connect(1)
    inner = c.pids()["a"]

    def host_pid():
        return next((p for p in w["cgroup"].procs() if p in agent.watched()), None)

    outer = wait_until(host_pid, "the namespaced worker registered", 120)
    with open(f"/proc/{outer}/status") as f:
        nspid = next(line.split()[1:] for line in f if line.startswith("NSpid:"))
    # the watched process is the worker: its pid in its own namespace is
    # the one Dask reports
    assert len(nspid) == 2 and int(nspid[0]) == outer and int(nspid[1]) == inner, nspid
    st = {x["pid"]: x for x in agent.status()["watches"]}
    assert st[outer]["limit_bytes"] == LIMIT
    assert "registered with amm-agent" in c.log("a")


def test_a_spike_is_killed_at_the_page_and_named_in_the_error(agent, cluster_factory):
    c = cluster_factory(agent, env={"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "1"})
    w = c.add_worker("a", LIMIT)
    client = c.connect(1)
    first = c.pids()["a"]
    wait_until(lambda: first in agent.watched(), "worker registered")
    fut = client.submit(spike, int(1.5 * LIMIT), key="spike-task", pure=False)
    with pytest.raises(KilledWorker) as ei:
        fut.result(timeout=300)
    msg = str(ei.value)
    assert "spike-task" in msg
    assert "the kernel killed" in msg and "terminate page" in msg, msg
    story = ei.value.amm["kills"][-1]
    assert story["killed_at_page"] and story["pid"] == first
    # at the page: the kill came at the fault that crossed 95 %. numpy
    # asks for transparent huge pages on big arrays (madvise), so that
    # fault can map a whole huge page at once: the kernel counts its 512
    # pages in one RSS update, and the crossing is seen up to one huge
    # page past the terminate level, never more.
    overshoot = story["rss_at_kill"] - story["terminate"]
    assert 0 <= overshoot <= max(huge_page_bytes(), 4096), story
    assert story["rate_bytes_per_ms"] > 0, story
    assert any(t["key"] == "spike-task" for t in story["tasks"])
    assert w["cgroup"].oom_kills() == 0
    assert "the kernel killed worker pid" in c.log("a")


def test_pause_takes_effect_before_the_next_task_starts(agent, cluster_factory, tmp_path):
    c = cluster_factory(agent)
    c.add_worker("a", LIMIT)
    client = c.connect(1)
    addr = c.address("a")
    wait_until(lambda: c.pids()["a"] in agent.watched(), "worker registered")
    path = str(tmp_path / "released")
    a = client.submit(hold_then_release, 0.85, LIMIT, 3.0, path, pure=False)
    b = client.submit(started_at, pure=False)

    def status():
        return client.run_on_scheduler(
            lambda dask_scheduler, addr=addr: dask_scheduler.workers[addr].status.name
        )

    wait_until(lambda: status() == "paused", "the scheduler sees the worker paused")
    a.result(timeout=60)
    b_start, b_rss = b.result(timeout=120)
    with open(path) as f:
        released = float(f.read())
    # the next task waited at the gate until the memory was gone
    assert b_start >= released, (b_start, released)
    assert b_rss < 0.8 * LIMIT
    wait_until(lambda: status() == "running", "the scheduler sees the worker running again")
    assert "amm: pausing worker" in c.log("a")
    assert "amm: resuming worker" in c.log("a")


def amm_stats(dask_worker):
    """amm's counters in a worker (``client.run``)."""
    return dict(dask_worker.plugins["amm"].stats)


def spilled_and_rss(dask_worker):
    """(values on disk, this process's RSS) in a worker (``client.run``)."""
    import psutil

    return len(dask_worker.data.slow), psutil.Process().memory_info().rss


@pytest.mark.parametrize("mode", ["incremental", "thread"])
def test_a_spill_keeps_every_value_and_the_worker_below_the_spill_level(agent, cluster_factory, mode):
    # kept results past the spill level while tasks keep running: amm's spill
    # (the kernel's spill event starts it) moves the oldest values to disk
    # down to target, on the loop one value at a time or on a spill thread,
    # while the loop keeps storing new results and reading spilled ones back
    c = cluster_factory(agent, env={"DASK_AMM__SPILL": mode})
    c.add_worker("a", LIMIT)
    client = c.connect(1)
    pid = c.pids()["a"]
    wait_until(lambda: pid in agent.watched(), "worker registered")
    n, each = 64, 8 * MIB  # the whole limit, kept
    blocks = [client.submit(filled_block, each, i, pure=False) for i in range(n)]
    client.gather(blocks[-1:])
    checks = client.gather([client.submit(block_check, b, pure=False) for b in blocks])
    # nothing lost, nothing mixed up between values
    assert checks == [(each, i) for i in range(n)]
    (st,) = client.run(amm_stats).values()
    print(mode, st)
    assert st["spills"] >= 1 and st["spilled_values"] >= 1, st
    # where the eviction ran: the spill thread, or the event loop itself
    off_loop = st["spilled_values"] if mode == "thread" else 0
    assert st.get("spilled_values_off_loop", 0) == off_loop, st
    # a spill runs from the spill level down to target (Dask's hysteresis):
    # reading values back may leave the worker between the two, never above
    spilled, _ = wait_until(
        lambda: (s := next(iter(client.run(spilled_and_rss).values())))[1] < 0.7 * LIMIT and s,
        "the worker below the spill level",
    )
    assert spilled > 0, spilled


def test_a_local_directory_on_tmpfs_is_named_in_the_workers_log(cluster_factory, tmp_path):
    """What Dask spills to a tmpfs stays in RAM, charged to the worker's own
    cgroup: the worker says so at start; a worker on a disk does not."""
    import subprocess

    from amm_dask import _native

    mem = tmp_path / "onmem"
    mem.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mem)], check=True)
    try:
        c = cluster_factory(None)
        c.add_worker("onmem", LIMIT)
        c.add_worker("ondisk", LIMIT)
        c.connect(2)
        said = "is on tmpfs, which is memory"
        wait_until(lambda: said in c.log("onmem"), "the tmpfs warning in the log", 60, 0.5)
        if _native.memory_backed_fs(str(tmp_path)) is None:
            assert said not in c.log("ondisk"), c.log("ondisk")
    finally:  # lazily: the workers leave at the fixture's teardown
        subprocess.run(["umount", "--lazy", str(mem)], check=False)


def test_the_memory_file_system_check_never_waits_on_a_planted_fifo(tmp_path):
    """A FIFO at the local directory's path is not a directory: the check
    says no at once instead of blocking the worker's setup on its open."""
    from amm_dask import _native

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert _native.memory_backed_fs(str(fifo)) is None
    assert _native.memory_backed_fs(str(tmp_path / "missing")) is None
    assert _native.memory_backed_fs("/proc") is None


def test_a_spill_mode_that_does_not_exist_is_refused_by_name():
    # DASK_AMM__SPILL=threads must not quietly run another mode
    from amm_dask.worker import Spiller

    with pytest.raises(ValueError, match="amm.spill is 'threads': use one of incremental, thread"):
        Spiller(None, None, "threads", {})


def test_the_running_tasks_file_is_never_written_through_a_planted_link(tmp_path):
    # a link planted where the temporary file goes must not make the worker
    # (often root) write through it: the link is replaced, its target untouched
    import json
    import stat

    from amm_dask.worker import RunningFile

    victim = tmp_path / "victim"
    victim.write_text("keep")
    path = str(tmp_path / "amm-running.json")
    os.symlink(victim, path + ".tmp")
    f = RunningFile(path)
    f.publish({"pid": 1, "tasks": []})
    f.close()
    assert victim.read_text() == "keep"
    with open(path) as fh:
        assert json.load(fh) == {"pid": 1, "tasks": []}
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)


def test_the_nanny_state_directory_is_its_own_never_one_planted_in_advance(tmp_path):
    # Dask's local directory defaults to the shared /tmp and the nanny often
    # runs as root: a directory planted at amm's old fixed name (world
    # writable, or a link to one) is never used; each nanny gets a fresh
    # owner-only one
    import stat

    from amm_dask.nanny import state_directory

    planted = tmp_path / f"amm-{os.getpid()}"
    planted.mkdir()
    planted.chmod(0o777)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, str(planted) + "-link")
    a, b = state_directory(str(tmp_path)), state_directory(str(tmp_path))
    assert a != b and str(planted) not in (a, b)
    for d in (a, b):
        st = os.lstat(d)
        assert os.path.dirname(d) == str(tmp_path)
        assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid(), d
        assert stat.S_IMODE(st.st_mode) == 0o700, oct(st.st_mode)
    assert list(elsewhere.iterdir()) == []


def test_a_boolean_key_that_is_not_a_boolean_is_refused_by_name():
    # DASK_AMM__GATE=no reaches Dask's config as the string "no", which
    # used to count as true; every boolean key is read through get_bool
    import dask.config

    from amm_dask import config

    with dask.config.set({"amm.gate": "no"}):
        with pytest.raises(ValueError, match="amm.gate is 'no': use true or false"):
            config.get_bool("gate")
    with dask.config.set({"amm.gate": False}):
        assert config.get_bool("gate") is False
    assert config.get_bool("spill-purge") is True  # amm.yaml's default


def test_importing_amm_dask_keeps_the_config_the_program_set():
    # amm_dask used to dask.config.refresh() at import, which rebuilt the
    # config from files and environment: a LocalCluster's
    # lost-worker-timeout or a worker's memory fraction set before the
    # import was silently gone. A DASK_AMM__ variable set after dask's
    # import still counts, below what the program set, above amm.yaml.
    import json
    import subprocess
    import sys

    code = (
        "import os, json, dask, distributed\n"
        "dask.config.set({'distributed.deploy.lost-worker-timeout': '1h',\n"
        "                 'distributed.worker.memory.target': 0.5,\n"
        "                 'amm.trim-interval': '3s'})\n"
        "os.environ['DASK_AMM__SPILL'] = 'thread'\n"
        "os.environ['DASK_AMM__TRIM_INTERVAL'] = '9s'\n"
        "import amm_dask\n"
        "g = dask.config.get\n"
        "print(json.dumps([g('distributed.deploy.lost-worker-timeout'),\n"
        "                  g('distributed.worker.memory.target'), g('amm.spill'),\n"
        "                  g('amm.trim-interval'), g('amm.gate')]))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["1h", 0.5, "thread", "3s", True]


def test_the_running_tasks_file_is_written_off_the_loop_newest_snapshot_last(tmp_path):
    # the nanny reads this file when the worker dies; the writes (a rename
    # that waits for the disk) happen on a thread of their own, and the last
    # snapshot published is the one on disk once it is closed
    import json

    from amm_dask.worker import RunningFile

    path = str(tmp_path / "amm-running.json")
    f = RunningFile(path)
    for i in range(200):
        f.publish({"pid": 1, "tasks": [{"key": f"k{i}"}]})
    f.close()
    assert not f.thread.is_alive()
    with open(path) as fh:
        assert json.load(fh) == {"pid": 1, "tasks": [{"key": "k199"}]}
    assert not os.path.exists(path + ".tmp")


def test_the_running_tasks_file_is_swapped_in_whole_and_never_through_a_link_at_its_name(
    tmp_path,
):
    # replace_file exchanges the new file with the old one (no rename over
    # it: ext4 flushes a file renamed over another, in the writer): a reader
    # finds the file at every moment after the first write, always whole;
    # a link planted at the file's own name is swapped out and removed,
    # its target untouched
    import json
    import stat
    import threading

    from amm_dask import _native

    path = tmp_path / "amm-running.json"
    victim = tmp_path / "victim"
    victim.write_text("keep")
    os.symlink(victim, path)
    _native.replace_file(str(path), b'{"n": -1}')
    assert victim.read_text() == "keep"
    assert stat.S_ISREG(os.lstat(path).st_mode)

    n, bad, done = 300, [], threading.Event()

    def read():
        while not done.is_set():
            try:
                json.loads(path.read_bytes())
            except (OSError, ValueError) as e:
                bad.append(repr(e))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(n):
            doc = {"n": i, "tasks": [{"key": f"k{j}"} for j in range(i % 50)]}
            _native.replace_file(str(path), json.dumps(doc).encode())
    finally:
        done.set()
        reader.join()
    assert bad == [], bad[:3]
    assert json.loads(path.read_bytes())["n"] == n - 1
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["amm-running.json", "victim"]


def test_the_preload_answers_who_purges_past_the_threshold(tmp_path):
    # amm_dask finds the preload's switch of its own threshold purges in a
    # process on the preload (on by default; off, then on again), and
    # nothing to switch on glibc
    import subprocess
    import sys

    from amm_dask import nanny

    lib = bundled_preload(nanny)
    if lib is None:
        pytest.skip("amm_dask was installed without libamm_preload.so")
    script = (
        "from amm_dask import _native as n\n"
        "print(n.preload_threshold_purges(), n.preload_threshold_purges(False),"
        " n.preload_threshold_purges(), n.preload_threshold_purges(True),"
        " n.preload_threshold_purges())\n"
    )
    env = dict(os.environ, LD_PRELOAD=lib, MALLOC_TRIM_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, check=True, cwd=tmp_path)
    assert out.stdout.split() == ["True", "True", "False", "False", "True"], out
    env.pop("LD_PRELOAD")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, check=True, cwd=tmp_path)
    assert out.stdout.split() == ["None"] * 5, out


def test_glibc_free_chunks_a_trim_already_gave_back_are_not_purgeable():
    # glibc's fordblks still counts free chunks after malloc_trim returned
    # their pages; only what is still resident can be purged (else every
    # tick finds "a hoard" and trims for nothing)
    from amm_dask.worker import purgeable

    glibc = {"allocator": "glibc", "fordblks": 200 * MIB, "hoarded": 3 * MIB}
    assert purgeable(glibc) == 3 * MIB
    je = {"allocator": "jemalloc", "dirty": 5 * MIB, "muzzy": 1 * MIB, "hoarded": 40 * MIB}
    assert purgeable(je) == 6 * MIB


def test_a_leak_is_reported_as_a_leak_through_the_agent_the_log_and_metrics(
    agent, cluster_factory
):
    c = cluster_factory(agent, env={"DASK_AMM__VERDICT_INTERVAL": "1s"})
    c.add_worker("a", 1024 * MIB)
    client = c.connect(1)
    pid = c.pids()["a"]
    wait_until(lambda: pid in agent.watched(), "worker registered")
    time.sleep(2)  # a steady stretch first (no assertion on time)
    client.submit(leak, 4 * MIB, 0.1, 80, pure=False).result(timeout=60)

    def verdict():
        r = agent.report(pid)
        return r if r["verdict"]["kind"] == "leak" else None

    r = wait_until(verdict, "`amm-worker report --agent` says leak", 120, 1.0)
    print(r["verdict"]["headline"])
    assert r["allocator"]["available"], r["allocator"]
    # the worker's own verdict, in its log
    wait_until(lambda: "amm: memory verdict: leak" in c.log("a"), "the verdict in the log", 120, 0.5)
    # amm's series in the worker's Prometheus endpoint
    addr = c.address("a")
    port = client.scheduler_info(n_workers=-1)["workers"][addr]["services"]["dashboard"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    for series in (
        'dask_worker_amm_memory_bytes{type="unmanaged_live"}',
        'dask_worker_amm_memory_bytes{type="hoarded"}',
        'dask_worker_amm_memory_bytes{type="heap_live"}',
        'dask_worker_amm_memory_bytes{type="non_heap"}',
        "dask_worker_amm_agent_connected 1.0",
        'dask_worker_amm_verdict{kind="leak"} 1.0',
        "dask_worker_amm_kills_at_page_total",
    ):
        assert series in text, series


@pytest.mark.parametrize("allocator", ["jemalloc", "glibc"])
def test_a_hoard_is_reported_as_a_hoard_through_the_agent(agent, cluster_factory, allocator):
    # amm purges what jemalloc keeps and trims what glibc keeps
    # (MALLOC_TRIM_THRESHOLD_ semantics) and tells the agent what the purge
    # returned: that decides "hoard". jemalloc is the default: the wheel
    # carries amm's preload library and the nanny plugin puts the worker on it
    env = {} if allocator == "jemalloc" else {"DASK_AMM__NANNY__ALLOCATOR": "glibc"}
    c = cluster_factory(agent, env=env)
    c.add_worker("a", 1024 * MIB)
    client = c.connect(1)
    pid = c.pids()["a"]
    (seen, preload), = client.run(allocator_in_use).values()
    if allocator == "jemalloc":
        from amm_dask import nanny

        assert seen == "jemalloc" and preload == bundled_preload(nanny), (seen, preload)
        # one purger: the preload's own threshold purges stand down while
        # the plugin purges (and so the purge below is the plugin's)
        assert list(client.run(preload_purges_own).values()) == [False]
    else:
        assert seen == "glibc" and preload is None, (seen, preload)
        assert list(client.run(preload_purges_own).values()) == [None]
        # the nanny gave the glibc worker its large-block reuse back
        # (a lambda: `os.environ.get` would pickle the client's environ along)
        mmap = client.run(lambda: os.environ.get("MALLOC_MMAP_THRESHOLD_"))
        assert list(mmap.values()) == [str(32 * MIB)], mmap
    wait_until(lambda: pid in agent.watched(), "worker registered")
    time.sleep(2)
    client.submit(hoard, 300 * MIB, 1024, 6.0, pure=False).result(timeout=120)
    r = agent.report(pid)
    print(r["verdict"], r["allocator"])
    # the hoard is found, with the trim that proves it, and sized: the trim
    # returned most of the 300 MiB the task freed. The same bytes were the
    # task's temporaries first, so a stretch may also say "transient"; which
    # of the two true findings it names first is not what this test is about
    hoards = [f for s in r["stretches"] for f in s["findings"] if f["kind"] == "hoard"]
    assert hoards, r["verdict"]
    assert max(f["bytes"] for f in hoards) >= 200 * MIB, hoards
    assert all(f["purges"] for f in hoards), hoards
    assert r["verdict"]["kind"] not in ("leak", "undecided"), r["verdict"]
    if allocator == "jemalloc":
        # without the plugin, the preload purges on its own again
        assert list(client.run(preload_purges_own_after_teardown).values()) == [True]


def policy_config(tmp_path) -> str:
    """A Dask config directory that turns amm's AMM policy on (1 s ticks,
    fast heartbeats and verdicts)."""
    cfg = tmp_path / "dask-config"
    cfg.mkdir()
    (cfg / "amm-test.yaml").write_text(
        "distributed:\n"
        "  scheduler:\n"
        "    active-memory-manager:\n"
        "      start: true\n"
        "      interval: 1s\n"
        "      policies:\n"
        "        - class: distributed.active_memory_manager.ReduceReplicas\n"
        "        - class: amm_dask.AmmPolicy\n"
        "          min_leak: 64MiB\n"
        "  worker:\n"
        "    heartbeat-interval: 500ms\n"
        "amm:\n"
        "  verdict-interval: 2s\n"
    )
    return str(cfg)


def test_the_policy_retires_a_leaking_worker_without_losing_its_keys(agent, cluster_factory, tmp_path):
    c = cluster_factory(agent, env={"DASK_CONFIG": policy_config(tmp_path)})
    c.add_worker("a", 1024 * MIB)
    c.add_worker("b", 1024 * MIB)
    client = c.connect(2)
    a_addr = c.address("a")
    a_pid = c.pids()["a"]
    futs = [
        client.submit(random_block, 4 * MIB, None, workers=[a_addr], pure=False, key=f"blk-{i}")
        for i in range(8)
    ]
    before = client.gather(futs)
    assert all(a_addr in ws for ws in client.who_has(futs).values())
    client.submit(leak, 4 * MIB, 0.1, 100, workers=[a_addr], pure=False).result(timeout=60)

    def restarted():
        return (p := c.pids().get("a")) and p != a_pid

    wait_until(restarted, "the leaking worker retired and restarted", 180, 0.5)
    after = client.gather(futs)
    for x, y in zip(before, after):
        assert (x == y).all(), "a key was recomputed: its data was lost"
    holders = client.who_has(futs)
    assert all(hs and a_addr not in hs for hs in holders.values()), holders
    events = client.get_events("amm")
    assert any(e.get("action") == "retire-leak" and e.get("worker") == a_addr for _, e in events)


def test_the_policy_purges_a_hoarding_worker_and_does_not_retire_it(
    agent, cluster_factory, tmp_path
):
    # a hoard is memory the allocator keeps, not a leak: the policy asks the
    # worker to purge it (through the worker's amm_purge handler) and leaves
    # the worker and its keys where they are
    c = cluster_factory(agent, env={"DASK_CONFIG": policy_config(tmp_path)})
    c.add_worker("a", 1024 * MIB)
    client = c.connect(1)
    a_addr = c.address("a")
    a_pid = c.pids()["a"]
    wait_until(lambda: a_pid in agent.watched(), "worker registered")
    kept = client.submit(random_block, 4 * MIB, 7, pure=False)
    client.submit(hoard, 300 * MIB, 1024, 6.0, pure=False).result(timeout=120)

    def purged():
        return [
            e for _, e in client.get_events("amm")
            if e.get("action") == "purge" and e.get("worker") == a_addr
        ]

    (first, *_) = wait_until(purged, "the policy purged the hoarding worker", 120, 0.5)
    print(first)
    assert first["result"][a_addr]["allocator"] == "jemalloc", first
    actions = {e.get("action") for _, e in client.get_events("amm")}
    assert "retire-leak" not in actions, actions
    assert c.pids()["a"] == a_pid, "the hoarding worker was restarted"
    assert a_addr in next(iter(client.who_has([kept]).values()))


_WITHOUT_AMM_DASK = """
import pickle, sys

class NoAmmDask:
    # a client machine that never installed amm_dask
    def find_spec(self, name, path=None, target=None):
        if name == "amm_dask" or name.startswith("amm_dask."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None

sys.meta_path.insert(0, NoAmmDask())
from distributed import KilledWorker
err = pickle.loads(sys.stdin.buffer.read())
assert "amm_dask" not in sys.modules, sorted(m for m in sys.modules if m.startswith("amm"))
assert isinstance(err, KilledWorker), type(err).__mro__
print(type(err).__name__)
print(err.amm["kills"][0]["pid"])
print(str(err))
"""


def test_the_killed_worker_story_unpickles_on_a_client_without_amm_dask():
    import pickle
    import subprocess
    import sys

    from types import SimpleNamespace

    from amm_dask.killed import AmmKilledWorker

    story = {"kills": [{"pid": 4242, "killed_at_page": True}]}
    worker = SimpleNamespace(address="tcp://w:1")
    err = AmmKilledWorker("spike-task", worker, 1, story, "the kernel killed worker pid 4242")
    data = pickle.dumps(err)
    # where amm_dask is importable, the class itself comes back
    back = pickle.loads(data)
    assert type(back) is AmmKilledWorker and back.amm == story
    out = subprocess.run(
        [sys.executable, "-c", _WITHOUT_AMM_DASK],
        input=data,
        capture_output=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr.decode()
    name, pid, text = out.stdout.decode().splitlines()[:3]
    assert name == "AmmKilledWorker" and pid == "4242"
    assert "spike-task" in text and "the kernel killed worker pid 4242" in text, text


def test_the_preload_library_is_never_taken_from_the_working_directory_or_a_writable_place(
    tmp_path, monkeypatch
):
    from amm_dask import nanny

    monkeypatch.delenv("AMM_ROOT", raising=False)
    monkeypatch.delenv(nanny.PRELOAD_ENV, raising=False)
    planted = tmp_path / "target" / "release"
    planted.mkdir(parents=True)
    (planted / "libamm_preload.so").write_bytes(b"\x7fELF")
    monkeypatch.chdir(tmp_path)
    # refused, the search falls through to the library the wheel carries
    fallback = bundled_preload(nanny)
    assert fallback is not None, "the installed amm_dask carries no libamm_preload.so"
    assert nanny.find_preload_library() == fallback

    lib = tmp_path / "lib" / "libamm_preload.so"
    lib.parent.mkdir()
    lib.write_bytes(b"\x7fELF")
    monkeypatch.setenv(nanny.PRELOAD_ENV, str(lib))
    lib.chmod(0o666)
    assert nanny.find_preload_library() == fallback
    lib.chmod(0o644)
    lib.parent.chmod(0o777)
    assert nanny.find_preload_library() == fallback
    lib.parent.chmod(0o755)
    assert nanny.find_preload_library() == str(lib)


def test_a_glibc_worker_gets_an_mmap_threshold_unless_it_has_one_and_a_bad_one_is_refused(
    monkeypatch,
):
    import dask.config

    from amm_dask import nanny

    monkeypatch.delenv(nanny.MMAP_THRESHOLD_ENV, raising=False)
    key = nanny.MMAP_THRESHOLD_ENV
    with dask.config.set({"amm.nanny.allocator": "glibc"}):
        # Dask's MALLOC_TRIM_THRESHOLD_ pinned glibc's at 128 KiB: amm sets one
        assert nanny.worker_environment({"MALLOC_TRIM_THRESHOLD_": "65536"})[key] == str(32 * MIB)
        # one the user gave the nanny (pre-spawn-environ, or its own) is kept
        assert key not in nanny.worker_environment({key: "131072"})
        monkeypatch.setenv(key, "131072")
        assert key not in nanny.worker_environment({})
        monkeypatch.delenv(key)
        with dask.config.set({"amm.nanny.mmap-threshold": None}):
            assert key not in nanny.worker_environment({})
        with dask.config.set({"amm.nanny.mmap-threshold": "4MiB"}):
            assert nanny.worker_environment({})[key] == str(4 * MIB)
        for bad, says in (("banana", "use a size"), ("64MiB", "at most 32MiB"), (-1, "at most")):
            with dask.config.set({"amm.nanny.mmap-threshold": bad}):
                with pytest.raises(ValueError, match=says):
                    nanny.worker_environment({})
    # on amm's jemalloc preload glibc's setting means nothing: not set
    if bundled_preload(nanny) is not None:
        with dask.config.set({"amm.nanny.allocator": "jemalloc"}):
            env = nanny.worker_environment({})
            assert "LD_PRELOAD" in env and key not in env, env


def test_the_spill_knows_which_evicted_values_stay_in_glibcs_heap(monkeypatch):
    # evicting a value below glibc's mmap threshold leaves its pages in the
    # heap until a trim, so the spill trims as it goes (every HEAP_TRIM_STEP)
    from amm_dask.worker import heap_keeps_below

    for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(k, raising=False)
    assert heap_keeps_below("jemalloc") == 0
    assert heap_keeps_below("glibc") == 32 * MIB  # glibc's dynamic threshold, at most
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    assert heap_keeps_below("glibc") == 128 * 1024  # pinned by the trim threshold
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(32 * MIB))
    assert heap_keeps_below("glibc") == 32 * MIB
    assert heap_keeps_below("jemalloc") == 0


def bundled_preload(nanny):
    """The libamm_preload.so installed with the package, or None."""
    path = os.path.join(os.path.dirname(nanny.__file__), "libamm_preload.so")
    return os.path.realpath(path) if os.path.isfile(path) else None
