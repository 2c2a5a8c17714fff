"""amm_dask's section of Dask's config (``amm:``), with its defaults from
``amm.yaml`` next to this file."""

from __future__ import annotations

import os

import dask.config
import yaml
from dask.utils import parse_bytes, parse_timedelta

_HERE = os.path.dirname(__file__)
with open(os.path.join(_HERE, "amm.yaml")) as f:
    DEFAULTS = yaml.safe_load(f)

# DASK_AMM__* variables set after dask was imported (dask reads the
# environment once, at its import): they fill the amm keys nobody set, then
# amm.yaml's defaults fill the rest. Never `dask.config.refresh()` here: it
# rebuilds the whole config from files and environment and so throws away
# every `dask.config.set(...)` the program made before importing amm_dask
# (a LocalCluster's `distributed.deploy.lost-worker-timeout`, a worker's
# memory fractions).
dask.config.update(
    dask.config.config,
    dask.config.collect_env({k: v for k, v in os.environ.items() if k.startswith("DASK_AMM__")}),
    priority="old",
)
dask.config.update_defaults(DEFAULTS)


def get(key: str, default=None):
    """``amm.<key>`` from Dask's config."""
    return dask.config.get(f"amm.{key}", default=default)


def get_bool(key: str) -> bool:
    """``amm.<key>`` as a boolean; anything else (``DASK_AMM__GATE=no``
    arrives as the string ``"no"``) is refused by name instead of counting
    as true."""
    v = get(key)
    if not isinstance(v, bool):
        raise ValueError(f"amm.{key} is {v!r}: use true or false")
    return v


def get_bytes(key: str) -> int | None:
    v = get(key)
    if v is None:
        return None
    return int(parse_bytes(v)) if isinstance(v, str) else int(v)


def get_seconds(key: str) -> float:
    return float(parse_timedelta(get(key)))


def trim_threshold() -> int:
    """MALLOC_TRIM_THRESHOLD_ semantics: purge when hoarded passes this."""
    v = get_bytes("trim-threshold")
    if v is not None:
        return v
    env = os.environ.get("MALLOC_TRIM_THRESHOLD_")
    if env and env.isdigit():
        return int(env)
    return 64 << 20
