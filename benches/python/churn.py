"""The churn jobs of the Dask trial (shared/reference/dask-trial-2026-12.md),
as one process: build, hold, release, idle, and (when told) trim.

usage: churn.py JOB IDLE_SECS    JOB: numpy | dicts | pandas

Prints one JSON line per phase: {"phase", "rss", "hwm", "t"} (bytes, s):
start (imports done), held (results alive), released (results dropped),
idle (IDLE_SECS later); then "purge?" and waits for one line on stdin:
"trim" calls glibc's malloc_trim(0) itself, anything else means the harness
purged it from outside; then "after_purge". The churn's wall time is the
"held" line's "work" field.
"""
import gc
import json
import sys
import time


def status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) * 1024
    return out["VmRSS"], out["VmHWM"]


def say(phase, **extra):
    rss, hwm = status()
    print(json.dumps({"phase": phase, "rss": rss, "hwm": hwm, "t": time.time(), **extra}), flush=True)


def numpy_job():
    import numpy as np
    rng = np.random.default_rng(1)
    kept = []
    for _ in range(3):
        arrays = [rng.random(16) for _ in range(400_000)]
        kept.append(sum(a[0] for a in arrays[::1000]))
        kept.append(arrays)
    return kept


def dicts_job():
    kept = []
    for r in range(3):
        kept.append([{f"k{j}": f"value-{r}-{i}-{j}" * 3 for j in range(8)} for i in range(60_000)])
    return kept


def pandas_job():
    import numpy as np
    import pandas as pd
    rng = np.random.default_rng(1)
    n = 2_000_000
    keys = np.array([f"key-{i:05d}" for i in range(20_000)], dtype=object)
    df = pd.DataFrame({"key": keys[rng.integers(0, len(keys), n)], "val": rng.random(n)})
    out = [df.groupby("key")["val"].agg(["sum", "mean", "count"]) for _ in range(3)]
    return [df, out]


JOBS = {"numpy": numpy_job, "dicts": dicts_job, "pandas": pandas_job}


def main():
    job, idle = sys.argv[1], float(sys.argv[2])
    if job in ("numpy", "pandas"):
        import numpy  # noqa: F401  imports before the baseline
    if job == "pandas":
        import pandas  # noqa: F401
    gc.collect()
    say("start")
    t0 = time.perf_counter()
    result = JOBS[job]()
    work = time.perf_counter() - t0
    say("held", work=work)
    del result
    gc.collect()
    say("released")
    time.sleep(idle)
    say("idle")
    print(json.dumps({"phase": "purge?"}), flush=True)
    if sys.stdin.readline().strip() == "trim":
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    time.sleep(0.5)
    say("after_purge")


main()
