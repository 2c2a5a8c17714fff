"""Task functions of amm_dask's tests. The workers import this module (the
test cluster puts this directory on their PYTHONPATH), so the functions
travel by reference, as a user's own module's would."""

from __future__ import annotations

import sys
import time

MIB = 1 << 20


def spike(nbytes):
    """Faults in `nbytes` at full speed (every page written)."""
    import numpy as np

    held = []
    chunk = 16 * MIB
    for _ in range(nbytes // chunk):
        a = np.empty(chunk, dtype=np.uint8)
        a.fill(0xA5)
        held.append(a)
    return len(held)


def hold_then_release(fraction, limit, hold_s, path):
    """Brings RSS to `fraction` of `limit`, returns at once, and releases
    the memory `hold_s` later from a thread, writing the time it began to."""
    import threading

    import numpy as np
    import psutil

    need = int(fraction * limit) - psutil.Process().memory_info().rss
    box = [np.ones(max(need, 0), dtype=np.uint8)]

    def release():
        time.sleep(hold_s)
        # the time the release began: a task let in by the drop can start
        # before this thread gets the CPU back after the free
        began = time.time()
        box.clear()
        with open(path, "w") as f:
            f.write(repr(began))

    threading.Thread(target=release, daemon=True).start()
    return need


def started_at():
    """When this task started, and this worker's RSS then."""
    import psutil

    return time.time(), psutil.Process().memory_info().rss


def leak(step, every_s, steps):
    """A module-level list that grows from a thread: a leak (nothing frees
    it, nothing managed changes)."""
    import threading
    import types

    store = sys.modules.setdefault("amm_test_leak", types.ModuleType("amm_test_leak"))
    store.items = getattr(store, "items", [])

    def grow():
        for _ in range(steps):
            store.items.append(b"\x01" * step)
            time.sleep(every_s)

    threading.Thread(target=grow, daemon=True).start()
    return steps * step


def hoard(total, size, hold_s):
    """Many small allocations, freed: memory the allocator keeps (a hoard),
    held `hold_s` while the worker keeps running."""
    parts = [bytearray(b"\x02" * size) for _ in range(total // size)]
    keep = parts[::64]  # a few live ones pin the heap's top
    del parts
    time.sleep(hold_s)
    return len(keep)


def filled_block(nbytes, value):
    """A kept result of `nbytes`, every byte `value` (every page written)."""
    import numpy as np

    return np.full(nbytes, value, dtype=np.uint8)


def block_check(a):
    """(its size, the value every byte holds, or -1 if they differ)."""
    v = int(a[0])
    return a.nbytes, v if bool((a == v).all()) else -1


def random_block(nbytes, seed):
    import numpy as np

    return np.random.default_rng(seed).integers(0, 255, nbytes, dtype=np.uint8)


def preload_purges_own():
    """Whether amm's preload purges past MALLOC_TRIM_THRESHOLD_ on its own
    in this process (None: not on the preload): run with ``client.run``."""
    from amm_dask import _native

    return _native.preload_threshold_purges()


def preload_purges_own_after_teardown(dask_worker):
    """Tears amm's worker plugin down (as Dask does when the worker closes
    or the plugin is removed), then: preload_purges_own()."""
    dask_worker.plugins["amm"].teardown(dask_worker)
    return preload_purges_own()


def allocator_in_use():
    """(the allocator amm reads in this process, the amm preload library
    mapped into it or None): run on a worker with ``client.run``."""
    from amm_dask import _native

    preload = None
    with open("/proc/self/maps") as maps:
        for line in maps:
            if line.rstrip().endswith("/libamm_preload.so"):
                preload = line.split()[-1]
                break
    return _native.heap_stats()["allocator"], preload
