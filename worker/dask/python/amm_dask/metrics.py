"""amm's series in the worker's Prometheus endpoint (``/metrics`` of the
worker's dashboard server), named as Dask names its own
(``dask_worker_memory_bytes{type=...}``):

- ``dask_worker_amm_memory_bytes{type=managed|spilled|unmanaged_live|
  unmanaged_recent|hoarded|heap_live|non_heap|process}``
- ``dask_worker_amm_kills_at_page_total`` (this worker's earlier processes
  the kernel killed at the terminate page, as the nanny counted them)
- ``dask_worker_amm_events_total``, ``..._pauses_total``,
  ``..._spills_total``, ``..._purges_total``, ``..._purged_bytes_total``,
  ``..._gate_waits_total``, ``..._agent_connected``
- ``dask_worker_amm_reaction_seconds{event,level,stage=link|loop}``: the
  kernel's crossing to the event in the process (``link``) and to Dask's
  event loop acting on it (``loop``), as a summary
- ``dask_worker_amm_verdict{kind=...}``: 1 for the current verdict
"""

from __future__ import annotations

_PLUGINS: list = []
_REGISTERED = False

TYPES = (
    "process",
    "managed",
    "spilled",
    "unmanaged_live",
    "unmanaged_recent",
    "hoarded",
    "heap_live",
    "non_heap",
)
COUNTERS = {
    "events": "Kernel events amm-agent delivered",
    "pauses": "Pauses amm decided",
    "spills": "Spills amm started",
    "spike_alarms": "Spike alarms (terminate predicted within the horizon)",
    "purges": "Purges/trims of hoarded memory",
    "purged_bytes": "Bytes purges/trims gave back to the kernel",
    "gate_waits": "Tasks held at the pause gate",
}


class Collector:
    """A prometheus_client collector over the plugins of this process."""

    def collect(self):
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            SummaryMetricFamily,
        )

        mem = GaugeMetricFamily(
            "dask_worker_amm_memory_bytes",
            "Worker memory by amm's accounting (allocator-aware).",
            labels=["type"],
        )
        kills = CounterMetricFamily(
            "dask_worker_amm_kills_at_page",
            "Earlier worker processes the kernel killed at the terminate page.",
        )
        counters = {
            k: CounterMetricFamily(f"dask_worker_amm_{k}", doc) for k, doc in COUNTERS.items()
        }
        connected = GaugeMetricFamily(
            "dask_worker_amm_agent_connected", "1 while registered with amm-agent."
        )
        reaction = SummaryMetricFamily(
            "dask_worker_amm_reaction_seconds",
            "From the kernel's crossing to the event in the process (link) and to "
            "Dask's event loop acting on it (loop).",
            labels=["event", "level", "stage"],
        )
        verdict = GaugeMetricFamily(
            "dask_worker_amm_verdict",
            "1 for the worker's current memory verdict.",
            labels=["kind"],
        )
        for p in list(_PLUGINS):
            for t in TYPES:
                if t in p.last:
                    mem.add_metric([t], p.last[t])
            kills.add_metric([], p.stats["kills_at_page_before"])
            for k, c in counters.items():
                c.add_metric([], p.stats[k])
            connected.add_metric([], 1 if p.agent_connected else 0)
            for name, xs in p.reactions.items():
                ev, level, stage = name.split("_")
                reaction.add_metric([ev, level, stage], len(xs), sum(xs))
            if getattr(p, "verdict", None):
                verdict.add_metric([p.verdict[0]], 1)
        yield mem
        yield kills
        yield from counters.values()
        yield connected
        yield reaction
        yield verdict


def register(plugin) -> None:
    """Adds a plugin's series (registers the collector once per process)."""
    global _REGISTERED
    _PLUGINS.append(plugin)
    if _REGISTERED:
        return
    try:
        import prometheus_client
    except ImportError:
        return
    prometheus_client.REGISTRY.register(Collector())
    _REGISTERED = True


def unregister(plugin) -> None:
    if plugin in _PLUGINS:
        _PLUGINS.remove(plugin)
