"""amm for Dask: keep Dask workers alive under memory pressure with
amm-agent's kernel events, in-process allocator statistics and a
leak/hoard verdict.

Turn it on as Dask users do::

    dask scheduler --preload amm_dask                      # KilledWorker story, AMM policy
    dask worker tcp://SCHED:8786 --preload amm_dask --preload-nanny amm_dask

or from Python::

    from amm_dask import AmmWorkerPlugin, AmmNannyPlugin
    cluster = LocalCluster(..., plugins={AmmWorkerPlugin()})   # worker side
    client.register_plugin(AmmNannyPlugin())                   # restarts workers

Settings live in Dask's config: ``distributed.worker.memory.*`` (the levels)
and the ``amm:`` section (``amm.yaml`` in this package; ``DASK_AMM__SOCKET``
and so on). See ``worker/dask/README.md``.
"""

from __future__ import annotations

from amm_dask import config  # noqa: F401  (installs the amm: defaults)
from amm_dask.nanny import AmmNannyPlugin
from amm_dask.scheduler import AmmKilledWorker, AmmPolicy, AmmSchedulerPlugin
from amm_dask.worker import AmmWorkerPlugin

__all__ = [
    "AmmKilledWorker",
    "AmmNannyPlugin",
    "AmmPolicy",
    "AmmSchedulerPlugin",
    "AmmWorkerPlugin",
    "dask_setup",
    "dask_teardown",
]


async def dask_setup(server) -> None:
    """Dask's preload hook: ``--preload amm_dask`` (worker or scheduler) and
    ``--preload-nanny amm_dask``."""
    from distributed import Nanny, Scheduler, Worker

    if isinstance(server, Worker):
        await server.plugin_add(AmmWorkerPlugin(), name=AmmWorkerPlugin.name)
    elif isinstance(server, Nanny):
        # before the worker exists: set up in place (plugin_add would restart
        # a worker that is not there yet)
        plugin = AmmNannyPlugin()
        plugin.setup(server)
        server.plugins[plugin.name] = plugin
    elif isinstance(server, Scheduler):
        await server.register_scheduler_plugin(
            AmmSchedulerPlugin(), name=AmmSchedulerPlugin.name, idempotent=True
        )


async def dask_teardown(server) -> None:
    """Dask's preload teardown (plugins are torn down with their server)."""
    return None
