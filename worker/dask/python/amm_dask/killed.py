"""``AmmKilledWorker``: Dask's ``KilledWorker`` with amm's story of the kill.

The scheduler pickles a ``KilledWorker`` and the *client* unpickles it. A
client that lacks ``amm_dask`` (a laptop talking to a cluster whose workers
have it) cannot import this class, so an ordinary pickle of it would turn
the error into a ``ModuleNotFoundError`` on ``future.result()``. So the
exception pickles itself as ``pickle.loads(<cloudpickle bytes>)``: the
outer pickle names only the standard library, and the inner one carries
:func:`_rebuild` *by value* (cloudpickle, which every Dask client has).
On unpickling, :func:`_rebuild` returns this module's class when
``amm_dask`` is importable, and otherwise builds the same subclass of
``distributed.KilledWorker`` on the spot: the client still catches
``KilledWorker``, its message still carries the story, ``.amm`` still
holds the details.
"""

from __future__ import annotations

import pickle
import sys

import cloudpickle


def _make_class(base):
    """The exception class, on top of Dask's own ``KilledWorker`` (`base`)."""

    class AmmKilledWorker(base):
        """Dask's KilledWorker with what amm knows about the task that
        killed the workers: ``.amm`` (the kill stories and the last
        pressure report) and the sentence in the message."""

        def __init__(self, task, last_worker, allowed_failures, amm=None, text=""):
            super().__init__(task, last_worker, allowed_failures)
            self.args = (task, last_worker, allowed_failures, amm, text or "")

        @property
        def amm(self):
            return self.args[3] if len(self.args) > 3 else None

        def __str__(self):
            text = super().__str__()
            extra = self.args[4] if len(self.args) > 4 else ""
            return f"{text} {extra}" if extra else text

        def __reduce__(self):
            # stdlib pickle on the scheduler, any client on the other side
            return (pickle.loads, (cloudpickle.dumps(_Rebuild(self.args)),))

    AmmKilledWorker.__module__ = __name__
    AmmKilledWorker.__qualname__ = "AmmKilledWorker"
    return AmmKilledWorker


def _rebuild(args):
    """The exception again, from its args (runs on the client)."""
    try:
        from amm_dask.killed import AmmKilledWorker as cls
    except ImportError:
        import distributed

        cls = _make_class(distributed.KilledWorker)
    return cls(*args)


class _Rebuild:
    """What the inner pickle holds: a call of :func:`_rebuild`."""

    def __init__(self, args) -> None:
        self.args = args

    def __reduce__(self):
        return (_rebuild, (self.args,))


def _original_killed_worker():
    # `distributed.KilledWorker` is never replaced (amm's scheduler plugin
    # replaces only the name the scheduler module uses)
    import distributed

    return distributed.KilledWorker


AmmKilledWorker = _make_class(_original_killed_worker())

# this module's functions travel by value inside the inner pickle
cloudpickle.register_pickle_by_value(sys.modules[__name__])
