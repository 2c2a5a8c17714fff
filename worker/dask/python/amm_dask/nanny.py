"""The nanny side of amm_dask: a :class:`distributed.NannyPlugin`.

- **Before the worker starts** (``--preload-nanny amm_dask``): puts it on
  amm's allocator — ``LD_PRELOAD`` of the amm preload library (jemalloc) when
  ``amm.nanny.allocator`` is ``jemalloc`` and the library is found —, keeps
  ``MALLOC_TRIM_THRESHOLD_`` (Dask's nanny sets it), gives a glibc worker
  back glibc's reuse of large blocks (``MALLOC_MMAP_THRESHOLD_``, see
  :func:`mmap_threshold`), and sets ``PYTHONMALLOC``
  (``amm.nanny.python-allocator``).
- **When the worker dies**: reads which tasks it was running (the worker
  plugin's state file), asks amm-agent what the kernel saw (killed at the
  terminate page? at what RSS, growing how fast?), logs the story, sends it
  to the scheduler as the event ``amm-worker-killed`` (amm's scheduler plugin
  puts it into the ``KilledWorker`` the client gets) and counts the kill for
  the next worker's metrics.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import tempfile
import time

from distributed import NannyPlugin

from amm_dask import _native, config
from amm_dask.worker import KILLS_ENV, MMAP_THRESHOLD_ENV, MMAP_THRESHOLD_MAX, STATE_DIR_ENV

logger = logging.getLogger("distributed.nanny.amm")

PRELOAD_ENV = "AMM_PRELOAD_LIBRARY"


def find_preload_library() -> str | None:
    """The amm preload library: ``amm.nanny.preload-library``,
    ``$AMM_PRELOAD_LIBRARY``, one bundled next to this package, or one built
    in the amm checkout named by ``$AMM_ROOT``. Never one found in the
    working directory: a library preloaded into a worker (often root's) must
    come from a place its user chose, and one that another user could have
    written is refused."""
    candidates = [config.get("nanny.preload-library"), os.environ.get(PRELOAD_ENV)]
    here = os.path.dirname(__file__)
    candidates.append(os.path.join(here, "libamm_preload.so"))
    root = os.environ.get("AMM_ROOT")
    if root:
        for profile in ("release", "debug"):
            candidates.append(os.path.join(root, "target", profile, "libamm_preload.so"))
    for c in candidates:
        if c and os.path.isfile(c):
            path = os.path.realpath(c)
            problem = untrusted(path)
            if problem:
                logger.warning("amm: not preloading %s: %s", path, problem)
                continue
            return path
    return None


def untrusted(path: str) -> str | None:
    """Why `path` (and its directories) could have been written by someone
    other than this user or root, or None when it could not."""
    me = os.geteuid()
    d = path
    while True:
        st = os.stat(d)
        if st.st_uid not in (0, me):
            return f"{d} belongs to uid {st.st_uid}"
        if st.st_mode & 0o022 and not (os.path.isdir(d) and st.st_mode & 0o1000):
            return f"{d} is writable by its group or by others"
        parent = os.path.dirname(d)
        if parent == d:
            return None
        d = parent


def mmap_threshold(inherited) -> int | None:
    """``MALLOC_MMAP_THRESHOLD_`` for a worker on glibc, or None to leave
    glibc alone. Dask's nanny sets ``MALLOC_TRIM_THRESHOLD_``, and setting it
    turns glibc's dynamic mmap threshold off (mallopt(3)): every block of
    128 KiB or more is then a fresh ``mmap``, faulted page by page and
    unmapped at its free (the sparse pipeline: 640 k page faults per run
    instead of ~200 k). amm trims what the heap hoards itself, under the
    same ``MALLOC_TRIM_THRESHOLD_`` (``amm.trim-threshold``), so the worker
    can keep reusing freed blocks up to ``amm.nanny.mmap-threshold``, as
    glibc does without Dask's setting. A threshold the user set already
    (`inherited`: the nanny's pre-spawn environment, or its own) is kept."""
    if MMAP_THRESHOLD_ENV in inherited or MMAP_THRESHOLD_ENV in os.environ:
        return None
    try:
        n = config.get_bytes("nanny.mmap-threshold")
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"amm.nanny.mmap-threshold is {config.get('nanny.mmap-threshold')!r}: "
            "use a size such as 32MiB, or null to leave glibc's alone"
        ) from e
    if n is not None and not 0 <= n <= MMAP_THRESHOLD_MAX:
        raise ValueError(
            f"amm.nanny.mmap-threshold is {n} bytes: glibc takes at most 32MiB "
            "(use null to leave glibc's alone)"
        )
    return n


def worker_environment(inherited=None) -> dict[str, str]:
    """The environment amm wants the worker process to start with, on top
    of `inherited` (the nanny's pre-spawn environment)."""
    inherited = inherited or {}
    env: dict[str, str] = {}
    allocator = config.get("nanny.allocator")
    preload = None
    if allocator == "jemalloc":
        preload = find_preload_library()
        if preload is None:
            logger.warning(
                "amm: amm.nanny.allocator is jemalloc but the preload library is not "
                "found (set amm.nanny.preload-library or %s; build it with `cargo "
                "build --release -p amm-preload`); the worker stays on glibc",
                PRELOAD_ENV,
            )
        else:
            env["LD_PRELOAD"] = preload
    if preload is None:
        threshold = mmap_threshold(inherited)
        if threshold is not None:
            env[MMAP_THRESHOLD_ENV] = str(threshold)
    pyalloc = config.get("nanny.python-allocator")
    if pyalloc == "auto":  # the old default: now the same as null
        pyalloc = None
    if pyalloc:
        env["PYTHONMALLOC"] = str(pyalloc)
    return env


def state_directory(base: str) -> str:
    """A new directory for this nanny's state (the running-tasks file the
    worker writes and the nanny reads when the worker dies) under Dask's
    local directory: made by ``mkdtemp``, so owner-only (0700) and never one
    that someone else made or linked in advance. Dask's default local
    directory is in the shared /tmp, and the nanny often runs as root: a
    fixed name there (``amm-PID``, used before) could be a directory another
    user planted, whose files the nanny would read."""
    return tempfile.mkdtemp(prefix=f"amm-{os.getpid()}-", dir=base)


class AmmNannyPlugin(NannyPlugin):
    """amm for one Dask nanny (see the module's doc)."""

    name = "amm-nanny"
    idempotent = True
    #: registered on a running cluster, the worker restarts to get the
    #: environment
    restart = True

    def setup(self, nanny) -> None:
        self.nanny = nanny
        self.kills = 0
        self.state_dir = state_directory(nanny.local_directory)
        env = worker_environment(nanny.pre_spawn_env)
        env[STATE_DIR_ENV] = self.state_dir
        env[KILLS_ENV] = "0"
        nanny.pre_spawn_env.update(env)
        if "LD_PRELOAD" in env:
            logger.info("amm: the worker runs on the amm preload (%s)", env["LD_PRELOAD"])
        self._orig_exit = nanny._on_worker_exit
        nanny._on_worker_exit = self._on_worker_exit
        if config.get_bool("nanny.scheduler-plugin"):
            nanny._ongoing_background_tasks.call_soon(self._install_scheduler_plugin)

    def teardown(self, nanny) -> None:
        if getattr(self, "_orig_exit", None) is not None:
            nanny._on_worker_exit = self._orig_exit

    async def _install_scheduler_plugin(self) -> None:
        from amm_dask.scheduler import install_on_scheduler

        try:
            await install_on_scheduler(self.nanny.scheduler)
        except Exception as e:
            logger.warning("amm: cannot install amm's scheduler plugin: %s", e)

    async def _on_worker_exit(self, exitcode) -> None:
        try:
            story = self.story(exitcode)
        except Exception:
            logger.exception("amm: cannot tell why the worker died")
            story = None
        if story is not None:
            if story.get("killed_at_page"):
                self.kills += 1
                self.nanny.pre_spawn_env[KILLS_ENV] = str(self.kills)
            logger.warning("amm: %s", describe(story))
            self.nanny.log_event("amm-worker-killed", story)
        await self._orig_exit(exitcode)

    def story(self, exitcode) -> dict | None:
        """What killed the worker: the tasks it ran (state file) and what
        the agent saw; None when it exited cleanly."""
        state = {}
        path = os.path.join(self.state_dir, "amm-running.json")
        try:
            with open(path) as f:
                state = json.load(f)
        except (OSError, ValueError):
            pass
        pid = state.get("pid")
        if exitcode == 0 or pid is None:
            return None
        story = {
            "worker": state.get("address") or self.nanny.worker_address,
            "pid": pid,
            "exitcode": exitcode,
            "time": time.time(),
            "tasks": state.get("tasks", []),
        }
        try:
            story.update(json.loads(_native.kill_story(config.get("socket"), pid)))
        except OSError as e:
            story["agent"] = str(e)
        now = story["time"]
        for t in story["tasks"]:
            grew = (story.get("rss_at_kill") or 0) - t.get("rss_at_start", 0)
            secs = max(1e-3, now - t.get("started", now))
            t["grew_bytes"] = max(0, grew)
            t["rate_bytes_per_s"] = max(0, grew) / secs
        return story


def describe(story: dict) -> str:
    """One sentence for a person."""
    from dask.utils import format_bytes

    tasks = story.get("tasks") or []
    names = ", ".join(repr(t["key"]) for t in tasks) or "no task"
    rate = story.get("rate_bytes_per_ms")
    rate_s = f", growing {format_bytes(int(rate * 1000))}/s" if rate else ""
    if story.get("killed_at_page"):
        limit = story.get("limit") or 1
        rss = story.get("rss_at_kill") or 0
        return (
            f"the kernel killed worker pid {story['pid']} at the terminate page "
            f"({format_bytes(rss)}, {100 * rss / limit:.1f}% of {format_bytes(limit)}) "
            f"while it ran {names}{rate_s}"
        )
    return (
        f"worker pid {story['pid']} died (exit code {story['exitcode']}) while it ran "
        f"{names}{rate_s}"
    )
