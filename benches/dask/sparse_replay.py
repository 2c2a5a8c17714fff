"""The sparse pipeline's tasks (spike_trial.py's task functions, in order, at
the 1 GiB bench scale) replayed in one non-main thread of one process, as
Dask's task thread runs them, without Dask. Prints one JSON line: wall time,
the thread's user/system CPU and minor page faults, the process's peak RSS.

Run it under the allocator environment to compare, side by side, e.g.

    for v in "" MALLOC_MMAP_THRESHOLD_=33554432; do
        env -i PATH="$PATH" OMP_NUM_THREADS=1 MALLOC_TRIM_THRESHOLD_=65536 $v \
            target/venv/bin/python benches/dask/sparse_replay.py
    done

``TRIM1S=1`` adds a thread calling ``malloc_trim(0)`` every second (what
amm's trims do at most)."""

import ctypes
import json
import os
import resource
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spike_trial as T  # noqa: E402


def pipeline(scale=0.5, seed=1):
    """run_sparse's tasks, each called in turn; every result kept."""
    cells = int(120_000 * scale)
    genes, density, nblocks = 20_000, 0.012, 40
    hvg_k, min_genes, min_cells = 1000, 120, 20
    bounds = [(b * cells // nblocks, (b + 1) * cells // nblocks) for b in range(nblocks)]
    raw = [T.gen_counts(seed, b, hi - lo, genes, density) for b, (lo, hi) in enumerate(bounds)]
    qcs = [T.qc_counts(m, min_genes) for m in raw]
    gm = T.gene_map(min_cells, *qcs)
    norm = [T.normalise(m, gm, min_genes) for m in raw]
    mom = [T.moments(x) for x in norm]
    hvg = T.choose_hvg(hvg_k, gm, *mom)
    grams = [T.gram(x, hvg) for x in norm]
    return T.gram_total(*grams)


def main():
    out = {}

    def run():
        import numpy  # noqa: F401
        import scipy.sparse  # noqa: F401

        r0 = resource.getrusage(resource.RUSAGE_THREAD)
        t0 = time.perf_counter()
        pipeline()
        t1 = time.perf_counter()
        r1 = resource.getrusage(resource.RUSAGE_THREAD)
        out.update(wall=t1 - t0, user=r1.ru_utime - r0.ru_utime, sys=r1.ru_stime - r0.ru_stime,
                   minflt=r1.ru_minflt - r0.ru_minflt)

    stop = threading.Event()

    def trimmer():
        libc = ctypes.CDLL("libc.so.6")
        while not stop.wait(1.0):
            libc.malloc_trim(0)

    if os.environ.get("TRIM1S"):
        threading.Thread(target=trimmer, daemon=True).start()
    th = threading.Thread(target=run)
    th.start()
    th.join()
    stop.set()
    out["rss_max_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


if __name__ == "__main__":
    main()
