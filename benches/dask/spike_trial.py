#!/usr/bin/env python3
"""One trial of real Dask under memory pressure: the baseline of amm's spike
benchmark.

Starts ``distributed.LocalCluster(n_workers=1, threads_per_worker=1,
memory_limit=LIMIT, processes=True)`` -- a scheduler and a nanny in this
process, one worker process -- with Dask's own memory thresholds (target 0.6,
spill 0.7, pause 0.8, terminate 0.95) and its own restart logic, runs one
workload on it, and prints ONE JSON object on stdout:

    {"finished": bool, "worker_restarts": int, "killed_worker": bool,
     "wall_ms": float, "error": str|null, "after_release": {...}, ...}

With ``--amm-socket SOCK`` the worker runs with amm_dask (the worker plugin
through ``LocalCluster(plugins=...)``, the nanny plugin through
``preload_nanny``) registered with the amm-agent on SOCK; ``--allocator
jemalloc --preload-library PATH`` also puts it on the jemalloc preload.
Whatever the mode, 5 s after the workload the script measures each worker's
RSS and managed memory ("unmanaged after release") and, with amm, the
plugin's counters and reaction times.

Worker pids. Each worker process (the first and every one the nanny starts
after a death) announces itself on stderr as ``WORKER_PID <pid>`` before it
runs any Python: the nanny spawns workers with multiprocessing's "spawn"
method, and this script points that method at a tiny shell wrapper that
prints its pid and then execs the same Python with the same arguments.
Nothing Dask decides changes. With ``--worker-gate-ms N`` the wrapper also
waits (up to N ms) until something has moved it into another cgroup, so a
runner can put the worker into a hard-limited cgroup before its first page
is touched; without it (the default) the worker starts at once.

Workloads, sized for a 2 GiB limit exactly as amm's built-in workloads
(amm-worker's workloads/*.toml) and scaled by LIMIT / 2 GiB so the same
proportions hold for any limit (matmul's n by the square root, so its bytes
scale linearly):

- spike:  256 MiB managed base (8 MiB results, kept), then 12 rounds of one
          task that faults in 2 GiB in 64 MiB NumPy chunks at full speed
          (every page written), holds it 1 s and frees it, and a 4 s sleep.
- matmul: blocked (A @ A.T).sum(), n = 6144 in 12 x 12 blocks of 512; every
          block of A and of C = A @ A.T is a kept result (576 MiB).
- sparse: single-cell-like CSR pipeline on 40 row blocks: generate counts
          (120 000 cells x 20 000 genes, density 0.012, Zipf-like genes),
          filter cells (>= 120 genes) and genes (>= 20 cells), normalise to
          10 000 + log1p, 1 000 most variable genes, their gram matrix; raw
          and normalised blocks kept.
- churn:  churn then release: 3 rounds of a task that builds 400 000 small
          NumPy arrays (1 KiB each, 400 MiB) and drops them; nothing is
          kept. What the worker still holds afterwards is unmanaged memory
          the allocator did not give back.
- mix:    managed growth plus spikes (amm has no mix.toml; defined here):
          10 rounds of +128 MiB kept results (8 MiB each), then one 1.5 GiB
          spike (64 MiB chunks, held 0.5 s), then a 1 s sleep. Managed memory
          grows to 1.25 GiB, past the 0.6 target; a spike on top of it would
          pass the limit, so every spike needs the worker to spill what it
          holds while the spike grows (it crosses spill and pause; whether it
          reaches terminate depends on how fast that happens).
- spill:  managed data past the spill threshold while tasks keep running:
          384 tasks submitted at once, each with 192 MiB of working memory
          (written, used, freed) and an 8 MiB result that is kept (3 GiB of
          results, 1.5 x the limit). Managed data alone stays under Dask's
          target (its SpillBuffer evicts there by itself); the tasks' working
          memory on top takes the process past the spill level again and
          again, so the process-memory spill (Dask's monitor, or amm's) runs
          while the next task runs. Throughput is tasks / wall time; the
          event loop's stalls are measured in every mode (see LoopLag).
"""

import argparse
import collections
import json
import logging
import math
import os
import shutil
import stat
import sys
import tempfile
import time

MIB = 1 << 20
GIB = 1 << 30
REFERENCE_LIMIT = 2 * GIB

WRAPPER = r"""#!/bin/sh
# Exec wrapper for the processes Dask's nanny spawns (see spike_trial.py).
case "$*" in
*spawn_main*) ;;
*) exec "$AMM_DASK_PYTHON" "$@" ;;
esac
echo "WORKER_PID $$" >&2
echo "$$" >> "$AMM_DASK_PID_LOG"
gate="${AMM_DASK_GATE_MS:-0}"
if [ "$gate" -gt 0 ]; then
    before=$(cat /proc/$$/cgroup)
    waited=0
    while [ "$(cat /proc/$$/cgroup)" = "$before" ]; do
        if [ "$waited" -ge "$gate" ]; then
            echo "WORKER_GATE_TIMEOUT $$" >&2
            break
        fi
        sleep 0.005
        waited=$((waited + 5))
    done
fi
exec "$AMM_DASK_PYTHON" "$@"
"""


# ---------------------------------------------------------------- tasks
# These run in the worker process (cloudpickle sends them by value).


def managed_block(nbytes, value):
    """A result Dask keeps (managed memory): nbytes, every page written."""
    import numpy as np

    return np.full(nbytes, value & 0xFF, dtype=np.uint8)


def spike(total, chunk, hold_s):
    """Task memory: fault in `total` bytes in `chunk`s at full speed, hold,
    free. Returns the bytes touched (the result itself is tiny)."""
    import numpy as np

    held = []
    done = 0
    while done < total:
        n = min(chunk, total - done)
        a = np.empty(n, dtype=np.uint8)
        a.fill(0xA5)  # writes every page
        held.append(a)
        done += n
    time.sleep(hold_s)
    del held
    return done


def churn(n_arrays, size):
    """Many small NumPy arrays, built and dropped: returns their bytes."""
    import numpy as np

    parts = [np.ones(size // 8) for _ in range(n_arrays)]
    total = sum(p.nbytes for p in parts)
    del parts
    return total


def sleep_task(seconds):
    """A task that only waits."""
    time.sleep(seconds)
    return seconds


def a_block(seed, i, j, b):
    """Block (i, j) of A, uniform in [-1, 1)."""
    import numpy as np

    rng = np.random.default_rng([seed, i, j])
    return rng.uniform(-1.0, 1.0, (b, b))


def c_block(*blocks):
    """C_ik = sum_j A_ij @ A_kj.T; the first half of `blocks` is row i of A,
    the second half row k."""
    import numpy as np

    half = len(blocks) // 2
    acc = np.zeros((blocks[0].shape[0], blocks[half].shape[0]))
    for x, y in zip(blocks[:half], blocks[half:]):
        acc += x @ y.T
    return acc


def sum_blocks(*blocks):
    """Sum of every entry of the blocks."""
    return float(sum(float(b.sum()) for b in blocks))


def gen_counts(seed, block, ncells, genes, density):
    """Raw counts of `ncells` cells (CSR, cells x genes): per cell
    density * genes * U(0.5, 1.5) draws of Zipf-like genes, counts 1 +
    Geometric, duplicates summed."""
    import numpy as np
    import scipy.sparse as sp

    rng = np.random.default_rng([seed, block])
    w = 1.0 / (np.arange(genes) + 10.0) ** 0.8
    cdf = np.cumsum(w)
    cdf /= cdf[-1]
    draws = (density * genes * (0.5 + rng.random(ncells))).astype(np.int64)
    total = int(draws.sum())
    cols = np.minimum(np.searchsorted(cdf, rng.random(total)), genes - 1)
    vals = rng.geometric(0.7, total).astype(np.float64)
    rows = np.repeat(np.arange(ncells), draws)
    m = sp.csr_matrix((vals, (rows, cols)), shape=(ncells, genes))
    m.sum_duplicates()
    return m


def qc_counts(m, min_genes):
    """Per gene: in how many kept cells (>= min_genes genes) it appears;
    and how many cells are kept."""
    import numpy as np

    keep = np.diff(m.indptr) >= min_genes
    kept = m[keep]
    return np.bincount(kept.indices, minlength=m.shape[1]), int(keep.sum())


def gene_map(min_cells, *qcs):
    """Genes seen in >= min_cells kept cells, and the kept cell count."""
    import numpy as np

    counts = sum(q[0] for q in qcs)
    cells = sum(q[1] for q in qcs)
    return np.flatnonzero(counts >= min_cells), int(cells)


def normalise(m, gm, min_genes):
    """Kept cells, kept genes, each cell scaled to 10 000 counts, log1p."""
    import numpy as np
    import scipy.sparse as sp

    keep = np.diff(m.indptr) >= min_genes
    x = m[keep][:, gm[0]].tocsr()
    totals = np.asarray(x.sum(axis=1)).ravel()
    totals[totals == 0] = 1.0
    x = sp.diags(1e4 / totals) @ x
    x = x.tocsr()
    x.data = np.log1p(x.data)
    return x


def moments(x):
    """Per-gene sum and sum of squares."""
    import numpy as np

    s = np.asarray(x.sum(axis=0)).ravel()
    q = np.asarray(x.multiply(x).sum(axis=0)).ravel()
    return s, q


def choose_hvg(k, gm, *ms):
    """The k genes of largest variance."""
    import numpy as np

    n = max(gm[1], 1)
    s = sum(m[0] for m in ms)
    q = sum(m[1] for m in ms)
    var = q / n - (s / n) ** 2
    order = np.argsort(-var, kind="stable")[:k]
    return np.sort(order)


def gram(x, hvg):
    """X_hvg.T @ X_hvg of one block, dense."""
    xh = x[:, hvg]
    return (xh.T @ xh).toarray()


def gram_total(*grams):
    """sum(G) and trace(G) of the summed gram matrices."""
    import numpy as np

    g = sum(grams)
    return float(g.sum()), float(np.trace(g))


# ---------------------------------------------------------------- workloads
# Each runs on the client: submit, wait phase by phase (amm runs its phases
# in order), keep the futures of kept results alive to the end.


class Timeout(Exception):
    """The trial ran past --timeout-s."""


def make_waiter(deadline):
    from distributed import wait

    def wait_all(futures):
        left = deadline - time.monotonic()
        if left <= 0:
            raise Timeout()
        try:
            wait(futures, timeout=left)
        except TimeoutError as e:  # distributed raises the builtin
            raise Timeout() from e
        # raise the first task error (KilledWorker among them)
        for f in futures:
            if f.status == "error":
                f.result()
        return futures

    return wait_all


def run_spike(client, scale, seed, wait_all):
    base = [
        client.submit(managed_block, int(8 * MIB * scale), seed + i, pure=False)
        for i in range(32)
    ]
    wait_all(base)
    for r in range(12):
        s = client.submit(spike, int(2 * GIB * scale), int(64 * MIB * scale), 1.0, pure=False)
        z = client.submit(sleep_task, 4.0, pure=False)
        wait_all([s, z])
    return {"spikes": 12, "base_blocks": len(base)}


def run_mix(client, scale, seed, wait_all):
    kept = []
    for r in range(10):
        grow = [
            client.submit(managed_block, int(8 * MIB * scale), seed + r * 16 + i, pure=False)
            for i in range(16)
        ]
        wait_all(grow)
        kept.extend(grow)
        s = client.submit(spike, int(1536 * MIB * scale), int(64 * MIB * scale), 0.5, pure=False)
        z = client.submit(sleep_task, 1.0, pure=False)
        wait_all([s, z])
    return {"rounds": 10, "kept_blocks": len(kept)}


def run_matmul(client, scale, seed, wait_all):
    nb = 12
    # n^2 bytes scale with the limit; b a multiple of 8
    b = max(8, int(round(512 * math.sqrt(scale) / 8)) * 8)
    n = nb * b
    a = [
        [client.submit(a_block, seed, i, j, b, key=f"A-{i}-{j}") for j in range(nb)]
        for i in range(nb)
    ]
    wait_all([f for row in a for f in row])
    c = [
        [client.submit(c_block, *a[i], *a[k], key=f"C-{i}-{k}") for k in range(nb)]
        for i in range(nb)
    ]
    wait_all([f for row in c for f in row])
    rows = [client.submit(sum_blocks, *c[i], key=f"rowsum-{i}") for i in range(nb)]
    wait_all(rows)
    total = sum(f.result() for f in rows)
    return {"n": n, "block": b, "sum": total}


def run_sparse(client, scale, seed, wait_all):
    cells = int(120_000 * scale)
    genes, density, nblocks = 20_000, 0.012, 40
    hvg_k, min_genes, min_cells = 1000, 120, 20
    bounds = [(b * cells // nblocks, (b + 1) * cells // nblocks) for b in range(nblocks)]
    raw = [
        client.submit(gen_counts, seed, b, hi - lo, genes, density, key=f"raw-{b}")
        for b, (lo, hi) in enumerate(bounds)
    ]
    wait_all(raw)
    qcs = [client.submit(qc_counts, m, min_genes, key=f"qc-{b}") for b, m in enumerate(raw)]
    gm = client.submit(gene_map, min_cells, *qcs, key="gene-map")
    wait_all(qcs + [gm])
    norm = [
        client.submit(normalise, m, gm, min_genes, key=f"norm-{b}") for b, m in enumerate(raw)
    ]
    wait_all(norm)
    mom = [client.submit(moments, x, key=f"moments-{b}") for b, x in enumerate(norm)]
    hvg = client.submit(choose_hvg, hvg_k, gm, *mom, key="hvg")
    wait_all(mom + [hvg])
    grams = [client.submit(gram, x, hvg, key=f"gram-{b}") for b, x in enumerate(norm)]
    total = client.submit(gram_total, *grams, key="gram-total")
    wait_all(grams + [total])
    gsum, gtrace = total.result()
    return {"cells": cells, "genes": genes, "gram_sum": gsum, "gram_trace": gtrace}


def worked_block(nbytes, work_bytes, value):
    """A kept result of `nbytes` computed with `work_bytes` of working
    memory (every page written, then freed)."""
    import numpy as np

    work = np.empty(work_bytes, dtype=np.uint8)
    work.fill(value & 0xFF)
    out = work[:nbytes].copy()
    del work
    return out


def run_spill(client, scale, seed, wait_all):
    n = 384
    kept = [
        client.submit(
            worked_block, int(8 * MIB * scale), int(192 * MIB * scale), seed * 1000 + i, pure=False
        )
        for i in range(n)
    ]
    wait_all(kept)
    return {"tasks": n, "kept_blocks": n}


def run_churn(client, scale, seed, wait_all):
    n = max(1, int(400_000 * scale))
    done = 0
    for r in range(3):
        f = client.submit(churn, n, 1024, pure=False)
        wait_all([f])
        done += f.result()
    return {"rounds": 3, "bytes_churned": done}


WORKLOADS = {
    "spike": run_spike,
    "matmul": run_matmul,
    "sparse": run_sparse,
    "mix": run_mix,
    "churn": run_churn,
    "spill": run_spill,
}


# ---------------------------------------------------------------- main


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=sorted(WORKLOADS), required=True)
    p.add_argument("--limit-bytes", type=int, required=True, help="the worker's memory_limit")
    p.add_argument(
        "--poll-ms",
        type=float,
        default=None,
        help="distributed.worker.memory.monitor-interval in ms (default: Dask's own)",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout-s", type=float, default=300.0, help="give up after this long")
    p.add_argument(
        "--worker-gate-ms",
        type=int,
        default=0,
        help="each worker waits up to this long, before exec, to be moved into another cgroup",
    )
    p.add_argument("--amm-socket", default=None, help="run with amm_dask, registered with this agent")
    p.add_argument("--allocator", choices=["glibc", "jemalloc"], default="glibc")
    p.add_argument("--preload-library", default=None, help="amm's jemalloc preload (with --allocator jemalloc)")
    p.add_argument("--spill-mode", choices=["incremental", "thread"], default=None)
    p.add_argument(
        "--amm-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set amm.KEY (a YAML value) for amm_dask; repeatable",
    )
    args = p.parse_args()
    if args.allocator == "jemalloc" and not args.preload_library:
        p.error("--allocator jemalloc needs --preload-library")
    if args.limit_bytes < 64 * MIB:
        p.error("--limit-bytes must be at least 64 MiB (a Dask worker alone needs ~100 MiB)")
    return args


def prepare_worker_python(args, scratch):
    """The workers' interpreter: a wrapper that logs each worker's pid
    (restarts are counted from it). Returns the pid log's path."""
    import multiprocessing

    wrapper = os.path.join(scratch, "python-worker")
    with open(wrapper, "w") as f:
        f.write(WRAPPER)
    os.chmod(wrapper, stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    pid_log = os.path.join(scratch, "worker-pids")
    os.environ["AMM_DASK_PYTHON"] = sys.executable
    os.environ["AMM_DASK_PID_LOG"] = pid_log
    os.environ["AMM_DASK_GATE_MS"] = str(max(0, args.worker_gate_ms))
    multiprocessing.set_executable(wrapper)
    return pid_log


def configure_amm(args, result):
    """amm_dask's config for an amm mode (`--amm-socket`), noted in the result."""
    import dask
    import amm_dask  # noqa: F401  (the amm: config defaults)

    amm = {
        "amm.socket": args.amm_socket,
        "amm.nanny.allocator": args.allocator,
        "amm.nanny.preload-library": args.preload_library,
    }
    if args.spill_mode:
        amm["amm.spill"] = args.spill_mode
    for kv in args.amm_config:
        import yaml

        k, _, v = kv.partition("=")
        amm[f"amm.{k}"] = yaml.safe_load(v)
    dask.config.set(amm)
    result["amm"] = {
        "allocator": args.allocator,
        "spill": dask.config.get("amm.spill"),
        "config": dask.config.get("amm"),
    }


def configure_dask(args, result):
    """Dask's config for every mode, and the versions and thresholds in use."""
    import dask
    import distributed
    import numpy

    if args.poll_ms is not None:
        dask.config.set({"distributed.worker.memory.monitor-interval": f"{args.poll_ms}ms"})
    # LocalCluster (Dask's SpecCluster) closes a worker's nanny when a
    # timer started at an EARLIER removal of that worker fires while a
    # later incarnation is between its death and its restart
    # (`_update_worker_status`: one `call_later(lost-worker-timeout)` per
    # removal, never cancelled when the worker comes back). With a worker
    # killed every few seconds, 15 s after one death can land in the ~1 s
    # gap after another: the nanny closes, nothing restarts the worker
    # and the trial hangs with its task queued (seen in 2 of ~60 amm
    # spike trials, session 8). Every mode gets the same timeout, past
    # any trial's length, so the modes stay side by side.
    dask.config.set({"distributed.deploy.lost-worker-timeout": "1h"})
    if args.amm_socket:
        configure_amm(args, result)
    result["poll_ms"] = (
        dask.utils.parse_timedelta(
            dask.config.get("distributed.worker.memory.monitor-interval")
        )
        * 1000.0
    )
    result["dask_version"] = dask.__version__
    result["distributed_version"] = distributed.__version__
    result["numpy_version"] = numpy.__version__
    result["thresholds"] = {
        k: dask.config.get(f"distributed.worker.memory.{k}")
        for k in ("target", "spill", "pause", "terminate")
    }


def main():
    args = parse_args()
    result = {
        "workload": args.workload,
        "limit_bytes": args.limit_bytes,
        "seed": args.seed,
        "finished": False,
        "worker_restarts": 0,
        "killed_worker": False,
        "timed_out": False,
        "wall_ms": None,
        "error": None,
    }
    scratch = tempfile.mkdtemp(prefix="amm-dask-trial-")
    try:
        pid_log = prepare_worker_python(args, scratch)
        configure_dask(args, result)
        run(args, result, scratch)
        try:
            with open(pid_log) as f:
                pids = [int(x) for x in f.read().split()]
        except FileNotFoundError:
            pids = []
        result["worker_pids"] = pids
        result["worker_restarts"] = max(0, len(pids) - 1)
    except Exception as e:  # reported, not raised: the runner reads the JSON
        result["error"] = result["error"] or f"{type(e).__name__}: {e}"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    # nothing left to wait for; skip interpreter teardown of Dask's threads
    os._exit(0)


def stuck_state(client, cluster):
    """What the scheduler and the nanny say when the work stopped moving."""
    from collections import Counter

    def scheduler_view(dask_scheduler):
        return {
            "workers": [
                {
                    "address": ws.address,
                    "pid": ws.pid,
                    "status": str(ws.status),
                    "processing": sorted(ts.key for ts in ws.processing)[:5],
                }
                for ws in dask_scheduler.workers.values()
            ],
            "task_states": dict(Counter(ts.state for ts in dask_scheduler.tasks.values())),
            "suspicious": {
                str(ts.key): ts.suspicious
                for ts in dask_scheduler.tasks.values()
                if ts.suspicious
            },
            # why workers left: add/remove-worker, closing-worker reasons
            "events": {
                str(topic): [[round(t, 3), repr(msg)[:300]] for t, msg in list(events)[-12:]]
                for topic, events in dask_scheduler.get_events().items()
                if topic == "all" or str(topic).startswith("tcp://")
            },
        }

    view = {}
    try:
        view["scheduler"] = client.run_on_scheduler(scheduler_view)
    except Exception as e:
        view["scheduler"] = f"{type(e).__name__}: {e}"
    nannies = []
    for name, nanny in cluster.workers.items():
        proc = getattr(nanny, "process", None)
        mp = getattr(proc, "process", None) if proc is not None else None
        nannies.append(
            {
                "name": str(name),
                "status": str(getattr(nanny, "status", None)),
                "worker_pid": getattr(mp, "pid", None),
                "worker_alive": mp.is_alive() if mp is not None else False,
                "worker_exitcode": getattr(mp, "exitcode", None),
            }
        )
    view["nannies"] = nannies
    return view


from distributed.diagnostics.plugin import WorkerPlugin  # noqa: E402


class LoopLag(WorkerPlugin):
    """A worker plugin in every mode: how long Dask's event loop was held.
    A 10 ms timer notes by how much each tick came late; the longest delay
    is the longest the loop could not serve anything (a pause waiting
    behind a spill, a heartbeat, the scheduler's messages). ``reset`` at
    the workload's start leaves the worker's own start-up out."""

    name = "loop-lag"

    def setup(self, worker):
        import asyncio

        self.reset()
        self.stopped = False
        loop = asyncio.get_running_loop()
        step = 0.010

        def tick(expected):
            if self.stopped:
                return
            now = loop.time()
            lag = (now - expected) * 1000.0
            self.max_ms = max(self.max_ms, lag)
            self.late_50 += lag > 50.0
            self.lags.append(lag)
            loop.call_at(now + step, tick, now + step)

        loop.call_soon(tick, loop.time())

    def reset(self):
        self.max_ms = 0.0
        self.late_50 = 0  # ticks more than 50 ms late
        self.lags = []

    def p99_ms(self):
        if not self.lags:
            return None
        ordered = sorted(self.lags)
        return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]

    def teardown(self, worker):
        self.stopped = True


def reset_loop_measures(dask_worker):
    """The workload starts: forget the worker's start-up stalls (ours and
    Dask's own tick-duration maximum)."""
    lag = dask_worker.plugins.get("loop-lag")
    if lag is not None:
        lag.reset()
    dask_worker.digests_max["tick-duration"] = 0


def digest_totals(dask_worker):
    """Dask's own cumulative metrics of the run, summed by activity and
    unit: ``execute/thread-cpu/seconds``, ``disk-write/count`` ... (where a
    workload's time went: the tasks' CPU, their waits, spill writes)."""
    out = collections.Counter()
    for k, v in dask_worker.digests_total.items():
        if not isinstance(k, tuple) or len(k) < 3:
            continue
        out["/".join(str(x) for x in (k[0], *k[-2:]))] += float(v)
    return dict(out)


def worker_memory(dask_worker):
    """RSS, managed (in memory) and amm's counters of one worker."""
    import psutil

    data = dask_worker.data
    fast = getattr(data, "fast", None)
    out = {
        "pid": os.getpid(),
        "rss": psutil.Process().memory_info().rss,
        "managed": int(getattr(fast, "total_weight", 0) or 0),
    }
    with open("/proc/self/stat") as f:
        stat = f.read().rsplit(")", 1)[1].split()
    out["minflt"], out["majflt"] = int(stat[7]), int(stat[9])
    cpu = psutil.Process().cpu_times()
    out["cpu_user_s"], out["cpu_system_s"] = cpu.user, cpu.system
    import threading

    names = {t.native_id: t.name for t in threading.enumerate()}
    per = collections.Counter()
    for t in psutil.Process().threads():
        per[names.get(t.id, "native").rstrip("0123456789-_")] += t.user_time + t.system_time
    out["threads_cpu_s"] = dict(per)
    lag = dask_worker.plugins.get("loop-lag")
    if lag is not None:
        out["loop_lag_max_ms"] = lag.max_ms
        out["loop_lag_p99_ms"] = lag.p99_ms()
        out["loop_late_50ms"] = lag.late_50
    out["tick_max_ms"] = dask_worker.digests_max.get("tick-duration", 0) * 1000.0
    out["digests"] = digest_totals(dask_worker)
    plugin = dask_worker.plugins.get("amm")
    if plugin is not None and getattr(plugin, "levels", None) is not None:
        out["amm_stats"] = dict(plugin.stats)
        out["amm_reactions"] = {k: list(v) for k, v in plugin.reactions.items()}
        out["allocator"] = plugin.last.get("allocator")
    return out


def after_release(client, settle_s=5.0):
    """Each worker's memory `settle_s` after the workload ended."""
    time.sleep(settle_s)
    try:
        per = client.run(worker_memory, nanny=False)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
    return {
        "settle_s": settle_s,
        "workers": list(per.values()),
        "unmanaged_bytes": sum(max(0, w["rss"] - w["managed"]) for w in per.values()),
    }


def run(args, result, scratch):
    from distributed import Client, KilledWorker, LocalCluster

    scale = args.limit_bytes / REFERENCE_LIMIT
    # Diagnostics only: AMM_DASK_LOG_LEVEL=info shows why workers close
    # (LocalCluster's default shows warnings and up).
    level = getattr(logging, os.environ.get("AMM_DASK_LOG_LEVEL", "warning").upper(), logging.WARNING)
    lag_plugin = LoopLag()
    extra = {"plugins": {lag_plugin}}
    if args.amm_socket:
        from amm_dask import AmmWorkerPlugin

        extra = {"plugins": {lag_plugin, AmmWorkerPlugin()}, "preload_nanny": ["amm_dask"]}
    cluster = LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        memory_limit=args.limit_bytes,
        processes=True,
        dashboard_address=None,
        local_directory=os.path.join(scratch, "dask"),
        silence_logs=level,
        **extra,
    )
    client = Client(cluster)
    try:
        client.wait_for_workers(1, timeout=120)
        client.run(reset_loop_measures, nanny=False)
        deadline = time.monotonic() + args.timeout_s
        t0 = time.monotonic()
        try:
            result["result"] = WORKLOADS[args.workload](
                client, scale, args.seed, make_waiter(deadline)
            )
            result["finished"] = True
        except KilledWorker as e:
            result["killed_worker"] = True
            result["error"] = f"KilledWorker: {e}"
        except Timeout:
            result["timed_out"] = True
            result["error"] = f"timeout: not done after {args.timeout_s:.0f} s"
            result["stuck"] = stuck_state(client, cluster)
        except Exception as e:
            result["error"] = f"{type(e).__name__}: {e}"
        result["wall_ms"] = (time.monotonic() - t0) * 1000.0
        result["after_release"] = after_release(client)
        try:
            events = client.get_events("amm-worker-killed")
            result["amm_kills"] = [
                {k: ev.get(k) for k in ("pid", "killed_at_page", "rss_at_kill", "rate_bytes_per_ms")}
                for _, ev in events
            ]
        except Exception as e:
            result["amm_kills"] = None
        try:
            events = client.get_events("worker-restart-memory")
            result["nanny_terminations"] = [
                {"pid": ev.get("pid"), "rss_bytes": ev.get("rss")} for _, ev in events
            ]
        except Exception as e:
            result["nanny_terminations"] = None
            result["error"] = result["error"] or f"cannot read the nanny's events: {e}"
    finally:
        # workers that exit from here on were closed with the cluster
        sys.stderr.write("CLUSTER_CLOSING\n")
        sys.stderr.flush()
        try:
            client.close(timeout=30)
            cluster.close(timeout=30)
        except Exception as e:
            result["close_error"] = f"{type(e).__name__}: {e}"


if __name__ == "__main__":
    main()
