"""A Ray cluster for the verifier fleet: one verimesh starts itself, or one that already runs.

``--verifiers ray`` starts a local cluster unless ``RAY_ADDRESS`` names one; ``ray://HOST:PORT``
(or ``HOST:PORT``) connects to an existing cluster. A cluster verimesh starts binds 127.0.0.1
only (no dashboard, every Ray server on loopback), and is shut down when the command ends.

Ray binds its servers to the address it takes for the node's; on Linux it asks the network for a
routable one even when told 127.0.0.1. Ray's own switch for single-machine use
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read when ray is imported) makes it take loopback, and
with a loopback node address Ray listens on loopback only; the address it reports is checked.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from verimesh.errors import InvalidInputError

LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@dataclass(frozen=True)
class Cluster:
    address: str  # the GCS address (a local cluster) or the address connected to
    local: bool  # started by verimesh, shut down with the command
    cpus: float
    gpus: float


def parse_verifiers(spec: str) -> tuple[str, str | None]:
    """``local`` | ``ray`` | ``ray://HOST:PORT`` | ``HOST:PORT`` -> (kind, address); ``ray`` takes
    ``RAY_ADDRESS`` when set, else None (a local cluster)."""
    if spec == "local":
        return "local", None
    if spec == "ray":
        return "ray", os.environ.get("RAY_ADDRESS") or None
    if spec.startswith("ray://") or (":" in spec and spec.rsplit(":", 1)[1].isdigit()):
        return "ray", spec
    raise InvalidInputError(f"--verifiers takes local, ray or ray://HOST:PORT, not {spec!r}", code="bad-verifiers")


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise InvalidInputError("the Ray verifier fleet needs ray", code="no-ray",
                                hint="pip install 'verimesh[ray]'") from exc  # fmt: skip
    return ray


def _import_ray_for_loopback() -> Any:
    os.environ[LOOPBACK_SWITCH] = "0"
    ray = _import_ray()
    import ray._private.ray_constants as constants

    constants.ENABLE_RAY_CLUSTER = False  # ray was imported before the switch was set: the same effect
    return ray


@contextmanager
def ray_cluster(address: str | None = None, *, num_cpus: int | None = None) -> Iterator[Cluster]:
    """Connect to ``address``, or start a loopback-only local cluster (``num_cpus``: default the
    machine's) and shut it down on exit. Refuses a second connection in one process."""
    switch = os.environ.get(LOOPBACK_SWITCH)
    if address is None:
        ray = _import_ray_for_loopback()
    else:
        ray = _import_ray()
    if ray.is_initialized():
        raise InvalidInputError("this process is already connected to a Ray cluster", code="ray-busy")
    # ray.init replaces the SIGTERM handler with one that exits at once (code 15): the command's
    # own handling (a server's graceful shutdown, exit 143) is put back; this block shuts Ray down.
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        if address is None:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False,
                     _node_ip_address="127.0.0.1")  # fmt: skip
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise InvalidInputError(
            f"cannot reach the Ray cluster at {address}: {exc}"[:300], code="ray-unreachable",
            hint="start it with `ray start --head`, or use --verifiers ray for a local one",
        ) from exc  # fmt: skip
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
    try:
        gcs = str(ray.get_runtime_context().gcs_address)
        if address is None and not gcs.startswith("127.0.0.1:"):
            raise InvalidInputError(f"the local Ray cluster did not bind loopback ({gcs}); refusing to use it",
                                    code="ray-not-loopback")  # fmt: skip
        resources = ray.cluster_resources()
        yield Cluster(gcs if address is None else address, address is None, float(resources.get("CPU", 0)),
                      float(resources.get("GPU", 0)))  # fmt: skip
    finally:
        ray.shutdown()
        if switch is None:  # the process's environment as it was (children started later inherit it)
            os.environ.pop(LOOPBACK_SWITCH, None)
        else:
            os.environ[LOOPBACK_SWITCH] = switch
