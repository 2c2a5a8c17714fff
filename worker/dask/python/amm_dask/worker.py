"""The worker side of amm_dask: a :class:`distributed.WorkerPlugin`.

What it changes in a Dask worker (everything is undone by ``teardown``):

- **Registers** the worker process with the local amm-agent
  (``amm.socket``), asking for the kernel's kill at the page that crosses
  ``distributed.worker.memory.terminate``; the native link re-registers after
  any agent restart. Without an agent the worker runs as plain Dask.
- **Pause is a gate in front of the executor**: every task passes
  ``_native.gate_wait()`` before it runs. The link's thread closes the gate
  the moment the kernel reports the pause level (or a spike alarm); a task
  thread closes it too when it finds RSS at or above pause on its way in.
  Dask's status machine is told on the event loop (``paused``, then
  ``running`` on the fall below ``target``), so the scheduler sees it.
- **Spill never holds the event loop for the whole spill**: on the kernel's
  spill event (and in Dask's own 100 ms monitor, which stays as the
  fallback) eviction runs either one value at a time on the loop, yielding
  after each (``amm.spill: incremental``, the default), or on a spill thread
  (``amm.spill: thread``; zict's own locks plus one of ours make the
  SpillBuffer safe for that). Once the values evicted add up to what RSS
  was above target and RSS has not followed, it purges the allocator's
  freed pages before evicting more (Dask runs ``gc.collect()`` there); on
  glibc also after every MiB of evicted values small enough to stay in the
  heap (below the mmap threshold the nanny raised: :func:`heap_keeps_below`).
- **Accounting**: every monitor tick, Dask's managed (in memory / spilled)
  split plus the allocator's statistics read in-process are pushed to the
  agent's timeline (``amm-worker report --agent SOCK --pid PID``), fed to the
  in-process verdict (logged when it changes) and shown in ``/metrics``.
  Hoarded memory is purged/trimmed under ``MALLOC_TRIM_THRESHOLD_``
  semantics, by this plugin alone: amm's preload library, when the worker
  runs on it, stops its own threshold purges until ``teardown``.
- Writes the tasks it is running to a small state file the nanny reads when
  the worker dies (:mod:`amm_dask.nanny`), from a thread of its own (the
  rename waits for the disk; never on the event loop).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import threading
import time

from distributed import WorkerPlugin
from distributed.core import Status
from distributed.gc import ThrottledGC
from tornado.ioloop import IOLoop

from amm_dask import _native, config, metrics

logger = logging.getLogger("distributed.worker.amm")

#: Environment variable (set by the nanny plugin) naming the directory of
#: the running-tasks file.
STATE_DIR_ENV = "AMM_DASK_STATE_DIR"
#: Kills at the terminate page the nanny counted before this worker started.
KILLS_ENV = "AMM_DASK_KILLS_AT_PAGE"


def _fmt(n: float) -> str:
    from dask.utils import format_bytes

    return format_bytes(int(n))


class Levels:
    """Dask's memory levels of one worker, in bytes (None: off)."""

    def __init__(self, limit: int, mm) -> None:
        import dask.config

        self.limit = limit
        frac = {
            "target": mm.memory_target_fraction,
            "spill": mm.memory_spill_fraction,
            "pause": mm.memory_pause_fraction,
            "terminate": dask.config.get("distributed.worker.memory.terminate"),
        }
        self.fractions = {k: (v if v is not False else None) for k, v in frac.items()}
        for k, v in self.fractions.items():
            setattr(self, k, int(limit * v) if v else None)

    @property
    def resume(self) -> int | None:
        """Where a paused worker resumes: below target (else below pause)."""
        return self.target or self.pause


#: glibc's mmap threshold variable (the nanny sets it for a glibc worker).
MMAP_THRESHOLD_ENV = "MALLOC_MMAP_THRESHOLD_"
#: glibc's largest mmap threshold on 64-bit (half its 64 MiB arena heap),
#: also where its dynamic threshold stops; glibc ignores a larger
#: MALLOC_MMAP_THRESHOLD_.
MMAP_THRESHOLD_MAX = 32 << 20

#: On glibc, the spill trims once values whose pages stay in the heap when
#: freed add up to this much (what ``munmap`` gave back at once when Dask's
#: ``MALLOC_TRIM_THRESHOLD_`` pinned the mmap threshold at 128 KiB).
HEAP_TRIM_STEP = 1 << 20


def heap_keeps_below(allocator: str) -> int:
    """The size under which a freed block stays in the heap until a trim,
    so that evicting a value that size gives its pages back only at the
    spill's next trim: glibc's mmap threshold (``MALLOC_MMAP_THRESHOLD_``;
    128 KiB when only ``MALLOC_TRIM_THRESHOLD_`` is set, which pins it; up
    to 32 MiB when glibc adjusts it itself). 0 on jemalloc, whose freed
    extents decay and which the spill purges once RSS does not follow."""
    if allocator != "glibc":
        return 0
    env = os.environ.get(MMAP_THRESHOLD_ENV, "")
    if env.isdigit():
        return int(env)
    if "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return 128 << 10
    return MMAP_THRESHOLD_MAX


#: ``amm.spill``'s values.
SPILL_MODES = ("incremental", "thread")


class Spiller:
    """Evicts least-recently-used values until RSS is below target, without
    holding the event loop for the whole spill."""

    def __init__(self, worker, levels: Levels, mode: str, stats) -> None:
        self.worker = worker
        self.levels = levels
        if mode not in SPILL_MODES:
            raise ValueError(f"amm.spill is {mode!r}: use one of {', '.join(SPILL_MODES)}")
        self.mode = mode
        self.purge = config.get_bool("spill-purge")
        self.stats = stats
        self.lock = threading.Lock()  # one evictor at a time
        self.running = False
        self.warned = False  # "nothing to spill", once per rise
        self.gc = ThrottledGC(logger=logger)
        self.heap_keeps_below = heap_keeps_below(_native.heap_stats()["allocator"])
        self.loop_thread = threading.get_ident()  # made on the event loop
        self.task = None  # the incremental spill (asyncio keeps weak refs)

    def _can_evict(self) -> bool:
        data = self.worker.data
        return hasattr(data, "fast") and hasattr(data, "evict")

    def _one(self) -> int:
        with self.lock:
            if not self.worker.data.fast:
                return -2
            return self.worker.data.evict()

    def _loop_body(self, target: int):
        """Evicts while RSS is above target; yields ("evicted", count,
        bytes) after every value and ("purge", ...) when the values evicted
        add up to what RSS was above target but RSS did not follow: the
        allocator keeps freed pages (jemalloc's decay, glibc's heap), and a
        purge, not more eviction, gives them back."""
        count = spilled = in_heap = 0
        owed = _native.rss_bytes() - target  # what eviction must free
        while _native.rss_bytes() > target:
            if self.purge and (spilled >= owed or in_heap >= HEAP_TRIM_STEP):
                yield "purge", count, spilled
                owed = spilled + max(0, _native.rss_bytes() - target)
                in_heap = 0
                continue
            w = self._one()
            if w == -2:
                self._nothing_left(target)
                break
            if w < 0:
                break
            count += 1
            spilled += w
            if w < self.heap_keeps_below:
                in_heap += w
            yield "evicted", count, spilled

    def _nothing_left(self, target: int) -> None:
        if self.warned:
            return
        self.warned = True
        logger.warning(
            "amm: process memory %s is above target %s with nothing left to "
            "spill: the rest is unmanaged (see the verdict)",
            _fmt(_native.rss_bytes()),
            _fmt(target),
        )

    def _purge(self) -> None:
        """Frees what evicted values left behind: cycles, then the
        allocator's freed pages (without the GIL)."""
        self.gc.collect()
        _native.release_hoard()
        self.stats["spill_purges"] += 1

    async def _incremental(self, target: int) -> None:
        from distributed.utils import offload

        count = spilled = 0
        try:
            for step, count, spilled in self._loop_body(target):
                if step == "purge":
                    await offload(self._purge)
                else:
                    await asyncio.sleep(0)
        finally:
            self._done(count, spilled)

    def _threaded(self, target: int) -> None:
        count = spilled = 0
        try:
            for step, count, spilled in self._loop_body(target):
                if step == "purge":
                    self._purge()
        finally:
            if threading.get_ident() != self.loop_thread:
                self.stats["spilled_values_off_loop"] += count
            self._done(count, spilled)

    def _done(self, count: int, spilled: int) -> None:
        self.running = False
        if count:
            self.stats["spilled_values"] += count
            self.stats["spilled_bytes"] += spilled
            logger.debug("amm: spilled %d values, %s", count, _fmt(spilled))

    def start(self, reason: str) -> None:
        """Starts a spill down to target unless one runs (no-op when the
        worker's data cannot evict)."""
        if self.running or not self._can_evict():
            return
        target = self.levels.target or self.levels.spill
        if target is None or _native.rss_bytes() <= target:
            self.warned = False
            return
        self.running = True
        self.stats["spills"] += 1
        if self.mode == "thread":
            threading.Thread(
                target=self._threaded, args=(target,), name="amm-spill", daemon=True
            ).start()
        else:
            self.task = asyncio.ensure_future(self._incremental(target))

    async def dask_spill(self, worker, memory: int) -> None:
        """Replaces WorkerMemoryManager._spill (Dask's monitor fallback)."""
        self.start("dask monitor")


def purgeable(heap: dict) -> int:
    """What a purge/trim can give back now: jemalloc's dirty and muzzy
    pages; glibc's free chunks still resident (what trims gave back since
    they were freed is not)."""
    if heap["allocator"] == "jemalloc":
        return heap.get("dirty", 0) + heap.get("muzzy", 0)
    return heap.get("hoarded", 0)


class RunningFile:
    """The running-tasks file the nanny reads when the worker dies, written
    by a thread of its own: the newest snapshot wins, written to a temporary
    file and renamed over the old one (never torn).

    Not on the event loop: the rename waits for the disk (ext4 flushes a
    file renamed over another), and with spill files streaming to the same
    disk that took milliseconds per task transition, twice per task
    (benches/RESULTS.md, the spill workload). Not through a rename over the
    old file either: that flush cost ~125 us of CPU per write even off the
    loop; the new file is exchanged with the old one instead."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.cv = threading.Condition()
        self.doc: dict | None = None
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="amm-running-file", daemon=True)
        self.thread.start()

    def publish(self, doc: dict) -> None:
        """Replaces the snapshot to write (returns at once)."""
        with self.cv:
            self.doc = doc
            self.cv.notify()

    def close(self) -> None:
        """Writes what is pending, then stops the thread."""
        with self.cv:
            self.closed = True
            self.cv.notify()
        self.thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self.cv:
                while self.doc is None and not self.closed:
                    self.cv.wait()
                doc, self.doc = self.doc, None
                if doc is None:
                    return
            self._write(doc)

    def _write(self, doc: dict) -> None:
        # a fresh owner-only file swapped in whole, never through a link
        # planted where the temporary goes (the worker often runs as root),
        # written without the GIL and without ext4's flush of a file renamed
        # over another (_native.replace_file)
        try:
            _native.replace_file(self.path, json.dumps(doc).encode())
        except OSError as e:
            logger.debug("amm: %s", e)


class AmmWorkerPlugin(WorkerPlugin):
    """amm for one Dask worker (see the module's doc). Install with
    ``dask worker ... --preload amm_dask``, ``client.register_plugin(
    AmmWorkerPlugin())`` or ``LocalCluster(plugins={AmmWorkerPlugin()})``."""

    name = "amm"
    idempotent = True

    def __init__(self) -> None:
        self.worker = None

    # ------------------------------------------------------------ setup
    def setup(self, worker) -> None:
        self.worker = worker
        self.stats = collections.Counter()
        self.stats["kills_at_page_before"] = int(os.environ.get(KILLS_ENV, "0") or 0)
        self.reactions: dict[str, list[float]] = collections.defaultdict(list)
        self.last: dict = {}
        self.link = None
        self.agent_connected = False
        self.running_tasks: dict = {}
        self._unmanaged_hist: collections.deque = collections.deque()
        import dask.config
        from dask.utils import parse_timedelta

        self._recent_window = parse_timedelta(
            dask.config.get("distributed.worker.memory.recent-to-old-time")
        )
        mm = worker.memory_manager
        self.mm = mm
        self.limit = mm.memory_limit
        if not self.limit:
            logger.warning("amm: this worker has no memory limit; amm only reports")
            self.levels = None
        else:
            self.levels = Levels(self.limit, mm)
            self._warn_if_spill_is_memory(worker)
        self._running_file = RunningFile(self._state_path(worker))
        self._write_running()
        metrics.register(self)
        if self.levels is None:
            return
        self.spiller = Spiller(worker, self.levels, config.get("spill"), self.stats)
        self.verdicts = _native.Verdicts(
            self.limit,
            self.levels.target,
            self.levels.spill,
            self.levels.pause,
            self.levels.terminate,
        )
        self.verdict = ("steady", "", [])
        self._verdict_interval = config.get_seconds("verdict-interval")
        self._next_verdict = time.monotonic() + self._verdict_interval
        self._trim_threshold = config.trim_threshold()
        self._trim_interval = self._trim_base = config.get_seconds("trim-interval")
        self._next_trim = 0.0
        # one purger: amm's preload, when the worker runs on it, stands down
        # while this plugin purges under the same threshold (its purges are
        # the ones the agent, the verdict, the metrics and AmmPolicy see)
        self._preload_purged = _native.preload_threshold_purges(False)
        self._install_gate(worker)
        self._patch_monitor(mm)
        worker.metrics["amm"] = lambda w: self.summary()
        worker.handlers["amm_purge"] = self._purge_handler
        if config.get_bool("register"):
            self._start_link(worker)

    @staticmethod
    def _warn_if_spill_is_memory(worker) -> None:
        """Dask spills below its local directory: on tmpfs what it spills stays
        in RAM, charged to this worker's own cgroup, and frees nothing."""
        fs = _native.memory_backed_fs(worker.local_directory)
        if fs:
            logger.warning(
                "amm: the worker's local directory %s is on %s, which is memory: what Dask "
                "spills there stays in RAM and counts against this worker's cgroup limit, so "
                "spilling frees nothing and the kernel can kill the worker below pause; give "
                "--local-directory (or temporary-directory) on a disk",
                worker.local_directory,
                fs,
            )

    def _state_path(self, worker) -> str:
        d = os.environ.get(STATE_DIR_ENV) or worker.local_directory
        os.makedirs(d, exist_ok=True)
        return os.path.join(d, "amm-running.json")

    def _install_gate(self, worker) -> None:
        lv = self.levels
        _native.gate_levels(lv.pause or 0, lv.resume or 0)
        _native.gate_open()
        if not config.get_bool("gate"):
            return
        ex = worker.executors.get("default")
        if ex is None or "submit" in vars(ex):
            return
        orig = ex.submit

        def gated_submit(fn, /, *args, **kwargs):
            def gated():
                waited = _native.gate_wait()
                if waited > 0.001:
                    self.stats["gate_waits"] += 1
                return fn(*args, **kwargs)

            return orig(gated)

        ex.submit = gated_submit
        self._gated = ex

    def _patch_monitor(self, mm) -> None:
        """Dask's monitor stays as the fallback, but pauses without a
        gc.collect() first, resumes below target, and spills without holding
        the loop; each of its ticks also does amm's accounting."""
        self._orig = (mm._maybe_pause_or_unpause, mm._spill)
        mm._maybe_pause_or_unpause = self._monitor_tick
        mm._spill = self.spiller.dask_spill

    def _start_link(self, worker) -> None:
        lv = self.levels
        f = lv.fractions
        sig = config.get("terminate-signal")
        try:
            self.link = _native.AgentLink(
                config.get("socket"),
                os.getpid(),
                lv.limit,
                f["target"],
                f["spill"],
                f["pause"],
                f["terminate"],
                int(sig) if sig is not None else None,
                config.get("spike-horizon"),
                f"amm-dask {worker.name}",
            )
        except (OSError, ValueError) as e:
            logger.warning("amm: cannot start the agent link (%s); polling only", e)
            return
        self._loop = IOLoop.current()
        self._loop.add_handler(self.link.fileno(), self._on_wake, IOLoop.READ)

    def teardown(self, worker) -> None:
        metrics.unregister(self)
        self._running_file.close()
        if self.levels is None:
            return
        if self.link is not None:
            self._loop.remove_handler(self.link.fileno())
            self.link.close()
            self.link = None
        mm = self.mm
        mm._maybe_pause_or_unpause, mm._spill = self._orig
        ex = getattr(self, "_gated", None)
        if ex is not None and "submit" in vars(ex):
            del ex.submit
        _native.gate_open()
        if self._preload_purged:
            _native.preload_threshold_purges(True)
        worker.metrics.pop("amm", None)
        worker.handlers.pop("amm_purge", None)

    # ------------------------------------------------------------ tasks
    def transition(self, key, start, finish, **kwargs) -> None:
        if finish == "executing":
            self.running_tasks[key] = (time.time(), _native.rss_bytes())
        elif start == "executing":
            self.running_tasks.pop(key, None)
        else:
            return
        self._write_running()

    def _write_running(self) -> None:
        self._running_file.publish(
            {
                "pid": os.getpid(),
                "address": getattr(self.worker, "address", None),
                "tasks": [
                    {"key": str(k), "started": t, "rss_at_start": r}
                    for k, (t, r) in self.running_tasks.items()
                ],
            }
        )

    # ------------------------------------------------------------ events
    def _on_wake(self, fd, events) -> None:
        for line in self.link.drain():
            try:
                self._on_report(json.loads(line))
            except Exception:  # never break the loop
                logger.exception("amm: cannot handle %s", line)

    def _on_report(self, r: dict) -> None:
        kind = r["kind"]
        if kind == "connected":
            self.agent_connected = True
            self.stats["connects"] += 1
            logger.info(
                "amm: registered with amm-agent at %s: kernel kill at %s (%s of %s)",
                config.get("socket"),
                _fmt(r["terminate"]),
                self.levels.fractions["terminate"],
                _fmt(r["limit"]),
            )
        elif kind in ("lost", "refused"):
            self.agent_connected = False
            self.stats["lost"] += 1
            logger.warning("amm: amm-agent %s (%s); polling only", kind, r["reason"])
        elif kind == "event":
            self._on_kernel_event(r)

    def _on_kernel_event(self, r: dict) -> None:
        now = _native.monotonic_ns()
        ev, level, prev = r["event"], r["level"], r["prev_level"]
        self.stats["events"] += 1
        self.reactions[f"{ev}_{level}_link"].append((r["seen_ns"] - r["t_ns"]) / 1e9)
        self.reactions[f"{ev}_{level}_loop"].append((now - r["t_ns"]) / 1e9)
        order = ["below", "spill", "pause", "terminate"]
        up = order.index(level) > order.index(prev) if level in order else False
        if ev == "spike":
            self.stats["spike_alarms"] += 1
            self._announce_pressure(r)
            self.spiller.start("spike alarm")
        elif ev == "level" and up:
            if level in ("pause", "terminate"):
                self._pause(f"the kernel reported {level}", r)
                self._announce_pressure(r)
            self.spiller.start(f"kernel {level} event")
        elif ev == "level" and level == "below":
            self._resume(f"the kernel reported the fall below target ({_fmt(r['rss'])})")

    def _announce_pressure(self, r: dict) -> None:
        """Tells the scheduler which tasks run while memory rises fast, so a
        KilledWorker can name them even if the kill comes next."""
        tasks = [
            {"key": str(k), "started": t, "rss_at_start": rs}
            for k, (t, rs) in self.running_tasks.items()
        ]
        self.worker.log_event(
            "amm-pressure",
            {
                "worker": self.worker.address,
                "pid": os.getpid(),
                "rss": r["rss"],
                "limit": self.limit,
                "rate_bytes_per_ms": r.get("rate_bytes_per_ms"),
                "eta_ns": r.get("eta_ns"),
                "tasks": tasks,
                "time": time.time(),
            },
        )

    def _pause(self, why: str, r: dict | None = None) -> None:
        _native.gate_close(why)
        w = self.worker
        if w.status == Status.running:
            rss = r["rss"] if r else _native.rss_bytes()
            logger.warning(
                "amm: pausing worker at %d%% memory (%s): %s",
                int(100 * rss / self.limit),
                _fmt(rss),
                why,
            )
            self.stats["pauses"] += 1
            w.status = Status.paused

    def _resume(self, why: str) -> None:
        _native.gate_open()
        w = self.worker
        if w.status == Status.paused:
            logger.warning("amm: resuming worker: %s", why)
            w.status = Status.running

    # ------------------------------------------------------------ monitor
    def _monitor_tick(self, worker, memory: int) -> None:
        """Dask's monitor, every monitor-interval: the fallback pause and
        resume, then amm's accounting."""
        lv = self.levels
        if lv.pause and memory > lv.pause:
            self._pause("Dask's monitor saw the pause level")
            self.spiller.gc.collect()  # after pausing, not before
        elif worker.status == Status.paused and lv.resume and memory < lv.resume:
            self._resume(f"process memory {_fmt(memory)} is below target")
        elif worker.status == Status.paused and not self._can_spill_more():
            # nothing left to spill will bring it below target: resume below
            # pause, as Dask does, rather than stay paused for good
            self._resume(f"process memory {_fmt(memory)} is below pause, nothing left to spill")
        try:
            self._account(memory)
        except Exception:
            logger.exception("amm: accounting failed")

    def _can_spill_more(self) -> bool:
        fast = getattr(self.worker.data, "fast", None)
        return bool(fast) or self.spiller.running

    def _account(self, memory: int) -> None:
        data = self.worker.data
        fast = getattr(data, "fast", None)
        managed = int(getattr(fast, "total_weight", 0) or 0)
        spilled_total = getattr(data, "spilled_total", None)
        spilled = int(spilled_total.memory) if spilled_total is not None else 0
        heap = _native.heap_stats()
        live, resident = heap["live"], heap["resident"]
        unmanaged_live = max(0, live - managed)
        hoarded = max(0, resident - live)
        non_heap = max(0, memory - resident)
        now = time.monotonic()
        recent = self._unmanaged_recent(now, unmanaged_live)
        t_ns = _native.monotonic_ns()
        self.last = {
            "process": memory,
            "managed": managed,
            "spilled": spilled,
            "unmanaged_live": unmanaged_live,
            "hoarded": hoarded,
            "non_heap": non_heap,
            "heap_live": live,
            "unmanaged_recent": recent,
            "allocator": heap["allocator"],
        }
        if self.link is not None:
            self.link.report(
                t_ns, memory, managed, unmanaged_live, hoarded, non_heap, spilled, recent, heap
            )
        je = None
        if heap["allocator"] == "jemalloc":
            je = (
                heap["allocated"],
                heap.get("active", 0),
                resident,
                heap.get("dirty", 0),
                heap.get("muzzy", 0),
            )
        paused = self.worker.status == Status.paused
        self.verdicts.push(
            t_ns, memory, managed, unmanaged_live, hoarded, non_heap, spilled, paused, je
        )
        self._maybe_trim(now, heap)
        if now >= self._next_verdict:
            self._next_verdict = now + self._verdict_interval
            asyncio.ensure_future(self._log_verdict())

    def _unmanaged_recent(self, now: float, unmanaged: int) -> int:
        """Dask's "unmanaged recent": what appeared within recent-to-old-time."""
        window = self._recent_window
        h = self._unmanaged_hist
        h.append((now, unmanaged))
        while h and h[0][0] < now - window:
            h.popleft()
        return max(0, unmanaged - min(u for _, u in h))

    # ------------------------------------------------------------ purge
    def _maybe_trim(self, now: float, heap: dict) -> None:
        """MALLOC_TRIM_THRESHOLD_ semantics: purge when what a purge can
        return passes the threshold, at most once per (backed-off)
        trim-interval. Like glibc's own trim at free(), it does not wait to
        see whether the memory would be reused (benches/RESULTS.md, the
        spill workload: a task's large blocks are faulted in afresh with or
        without a purge; glibc maps them, jemalloc returns them itself)."""
        if now < self._next_trim or purgeable(heap) <= self._trim_threshold:
            return
        self._next_trim = now + self._trim_interval
        asyncio.ensure_future(self._trim())

    async def _trim(self, reason: str = "threshold") -> dict:
        from distributed.utils import offload

        which, rss0, rss1, h0, h1, secs = await offload(_native.release_hoard)
        returned = max(0, rss0 - rss1)
        if self.link is not None:
            self.link.report_purge(_native.monotonic_ns(), reason, rss0, rss1, h0, h1, secs)
        self.stats["purges"] += 1
        self.stats[f"purges_{reason}"] += 1
        self.stats["purged_bytes"] += returned
        # back off while purges give little back: what both RSS and the
        # allocator say came back (RSS alone also moves with the tasks)
        if min(returned, max(0, h0 - h1)) < self._trim_threshold:
            self._trim_interval = min(self._trim_interval * 2, 30.0)
        else:
            self._trim_interval = self._trim_base
        logger.debug(
            "amm: %s %s returned %s in %.1f ms", which, reason, _fmt(returned), secs * 1e3
        )
        return {"allocator": which, "returned": returned, "hoarded_before": h0,
                "hoarded_after": h1, "seconds": secs}

    async def _purge_handler(self, reason: str = "scheduler") -> dict:
        return await self._trim(reason)

    # ------------------------------------------------------------ verdict
    async def _log_verdict(self) -> None:
        from distributed.utils import offload

        v = await offload(self.verdicts.verdict)
        if v[0] != self.verdict[0]:
            level = logging.WARNING if v[0] in ("leak", "non_heap_growth") else logging.INFO
            logger.log(level, "amm: memory verdict: %s — %s", v[0], v[1])
        self.verdict = v

    def summary(self) -> dict:
        """What the scheduler gets with every heartbeat (ws.metrics['amm'])."""
        return {
            "verdict": self.verdict[0] if self.levels else None,
            "headline": self.verdict[1] if self.levels else None,
            "agent": self.agent_connected,
            **{k: v for k, v in self.last.items() if k != "allocator"},
        }
