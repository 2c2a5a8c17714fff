"""The scheduler side of amm_dask.

- :class:`AmmSchedulerPlugin` collects what workers and nannies report
  (``amm-pressure``: the tasks running while memory rises fast;
  ``amm-worker-killed``: the nanny's story of a kill at the terminate page)
  and makes the ``KilledWorker`` a client gets say it: which task was running
  when the kernel killed the worker, at what memory, growing how fast. The
  nanny plugin installs it; ``--preload amm_dask`` on the scheduler does too.
- :class:`AmmPolicy`, an Active Memory Manager policy (off by default: list
  it in ``distributed.scheduler.active-memory-manager.policies``): a worker
  whose unmanaged memory is a **leak** (the verdict its amm plugin sends with
  every heartbeat) is retired gracefully — its keys moved with Dask's own
  ``RetireWorker`` machinery — and then restarted by its nanny, before the
  kernel has to kill it; a worker that **hoards** is asked to purge, not
  retired.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict, deque

import distributed.scheduler as dscheduler
from distributed import SchedulerPlugin
from distributed.active_memory_manager import ActiveMemoryManagerPolicy

from amm_dask import config
from amm_dask.killed import AmmKilledWorker

logger = logging.getLogger("distributed.scheduler.amm")

#: How long a pressure report counts for a kill that follows it.
PRESSURE_FRESH_S = 5.0

_ORIGINAL_KILLED_WORKER = dscheduler.KilledWorker


class Registry:
    """What the scheduler heard from amm, per task and per worker."""

    def __init__(self) -> None:
        self.kills: dict[str, deque] = defaultdict(lambda: deque(maxlen=16))
        self.pressure: dict[str, dict] = {}

    def on_event(self, topic: str, msg) -> None:
        if not isinstance(msg, dict):
            return
        if topic == "amm-worker-killed":
            for t in msg.get("tasks", []):
                self.kills[t["key"]].append(msg)
        elif topic == "amm-pressure" and msg.get("worker"):
            self.pressure[msg["worker"]] = msg

    def about(self, task, worker: str | None) -> dict | None:
        """The best account of why `task` killed workers."""
        key = str(task)
        out: dict = {"task": key, "kills": list(self.kills.get(key, ()))}
        p = self.pressure.get(worker or "")
        if p and time.time() - p.get("time", 0) < PRESSURE_FRESH_S:
            if any(t["key"] == key for t in p.get("tasks", [])):
                out["last_pressure"] = p
        return out if (out["kills"] or "last_pressure" in out) else None


REGISTRY = Registry()


def _rate_text(bytes_per_ms) -> str:
    from dask.utils import format_bytes

    return f"{format_bytes(int(bytes_per_ms * 1000))}/s" if bytes_per_ms else "unknown"


def explain(info: dict | None) -> str:
    """The amm sentence of a KilledWorker."""
    if not info:
        return ""
    from dask.utils import format_bytes

    parts = []
    page = [k for k in info["kills"] if k.get("killed_at_page")]
    if page:
        k = page[-1]
        limit = k.get("limit") or 1
        rss = k.get("rss_at_kill") or 0
        parts.append(
            f"amm: the kernel killed {len(page)} worker(s) at the terminate page while "
            f"they ran task {info['task']!r} (last: pid {k['pid']} at {format_bytes(rss)}, "
            f"{100 * rss / limit:.1f}% of {format_bytes(limit)}, growing "
            f"{_rate_text(k.get('rate_bytes_per_ms'))})."
        )
    p = info.get("last_pressure")
    if p:
        limit = p.get("limit") or 1
        parts.append(
            f"amm: the last worker was at {100 * p['rss'] / limit:.1f}% of "
            f"{format_bytes(limit)} and growing {_rate_text(p.get('rate_bytes_per_ms'))} "
            f"while it ran {info['task']!r}."
        )
    return " ".join(parts)


def killed_worker(task, last_worker, allowed_failures):
    """What the scheduler raises instead of ``KilledWorker`` while amm's
    plugin runs: an :class:`~amm_dask.killed.AmmKilledWorker` with what amm
    knows about `task`."""
    amm = REGISTRY.about(task, getattr(last_worker, "address", None))
    return AmmKilledWorker(task, last_worker, allowed_failures, amm, explain(amm))


class AmmSchedulerPlugin(SchedulerPlugin):
    """Collects amm's reports; makes KilledWorker tell amm's story."""

    name = "amm"
    idempotent = True

    async def start(self, scheduler) -> None:
        self.scheduler = scheduler
        dscheduler.KilledWorker = killed_worker

    async def close(self) -> None:
        dscheduler.KilledWorker = _ORIGINAL_KILLED_WORKER

    def log_event(self, topic, msg) -> None:
        REGISTRY.on_event(topic, msg)


async def install_on_scheduler(scheduler_rpc) -> None:
    """Registers :class:`AmmSchedulerPlugin` through a scheduler rpc (from a
    nanny or worker); a no-op when it is there already."""
    from distributed.protocol.pickle import dumps

    await scheduler_rpc.register_scheduler_plugin(
        plugin=dumps(AmmSchedulerPlugin()), name=AmmSchedulerPlugin.name, idempotent=True
    )


class AmmPolicy(ActiveMemoryManagerPolicy):
    """Retire leaking workers, purge hoarding ones (see the module's doc).

    Enable it in Dask's config::

        distributed:
          scheduler:
            active-memory-manager:
              start: true
              policies:
                - class: distributed.active_memory_manager.ReduceReplicas
                - class: amm_dask.AmmPolicy
    """

    def __init__(self, retire_leaks: bool | None = None, purge_hoards: bool | None = None,
                 min_leak: int | str | None = None, purge_every: float = 30.0) -> None:
        from dask.utils import parse_bytes

        self.retire_leaks = config.get_bool("policy.retire-leaks") if retire_leaks is None else retire_leaks
        self.purge_hoards = config.get_bool("policy.purge-hoards") if purge_hoards is None else purge_hoards
        ml = config.get("policy.min-leak") if min_leak is None else min_leak
        self.min_leak = int(parse_bytes(ml)) if isinstance(ml, str) else int(ml)
        self.purge_every = purge_every
        self.retiring: set[str] = set()
        self.last_purge: dict[str, float] = {}

    def run(self):
        scheduler = self.manager.scheduler
        running = [ws for ws in scheduler.running if ws.address not in self.retiring]
        for ws in list(running):
            info = (ws.metrics or {}).get("amm") or {}
            verdict = info.get("verdict")
            if verdict == "leak" and self.retire_leaks:
                if info.get("unmanaged_live", 0) >= self.min_leak and len(running) > 1:
                    self._retire(scheduler, ws, info)
                    running.remove(ws)
            elif verdict in ("hoard", "fragmentation") and self.purge_hoards:
                now = time.monotonic()
                if now - self.last_purge.get(ws.address, 0.0) >= self.purge_every:
                    self.last_purge[ws.address] = now
                    scheduler._ongoing_background_tasks.call_soon(
                        self._purge, scheduler, ws.address
                    )
        return
        yield  # a generator that suggests no replica changes itself

    def _retire(self, scheduler, ws, info) -> None:
        from dask.utils import format_bytes

        self.retiring.add(ws.address)
        logger.warning(
            "amm: worker %s leaks (%s unmanaged: %s); retiring it gracefully, then "
            "restarting it",
            ws.address,
            format_bytes(info.get("unmanaged_live", 0)),
            info.get("headline"),
        )
        scheduler.log_event(
            "amm", {"action": "retire-leak", "worker": ws.address, "verdict": info}
        )
        scheduler._ongoing_background_tasks.call_soon(self._retire_then_restart, scheduler, ws.address)

    async def _retire_then_restart(self, scheduler, address: str) -> None:
        try:
            out = await scheduler.retire_workers(
                workers=[address], close_workers=False, remove=False,
                stimulus_id=f"amm-retire-leak-{time.time()}",
            )
            if address not in out:
                logger.warning("amm: could not retire %s (no other worker took its keys)", address)
                return
            ws = scheduler.workers.get(address)
            if ws is not None and ws.nanny:
                await scheduler.restart_workers(
                    [address], stimulus_id=f"amm-restart-leak-{time.time()}", on_error="return"
                )
            else:
                await scheduler.close_worker(address)
            scheduler.log_event("amm", {"action": "retired-leak", "worker": address})
        except Exception:
            logger.exception("amm: retiring %s failed", address)
        finally:
            self.retiring.discard(address)

    async def _purge(self, scheduler, address: str) -> None:
        try:
            out = await scheduler.broadcast(
                msg={"op": "amm_purge", "reason": "scheduler policy"},
                workers=[address], on_error="ignore",
            )
            scheduler.log_event("amm", {"action": "purge", "worker": address, "result": out})
        except Exception:
            logger.exception("amm: purging %s failed", address)
