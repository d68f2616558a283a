"""Pure work spread over Ray actors: each actor takes whole items (a simulation shard of many
nodes, say) and returns what the function returns for them.

``fn`` must be a module-level function (Ray sends it by reference, and each actor imports its
module) whose result depends on its item alone, so where an item runs never changes its result.
Called inside ``ray_cluster``. An actor that dies is restarted and its item re-run (Ray's
``max_restarts`` / ``max_task_retries``); an item whose retries are spent raises.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

MAX_RESTARTS = 2
MAX_TASK_RETRIES = 2


class _Worker:
    """The body of one Ray actor: runs the items it is given, one at a time."""

    def run(self, fn: Callable[[Any], Any], item: Any) -> Any:
        return fn(item)


def map_on_ray(fn: Callable[[T], R], items: Sequence[T], *, actors: int) -> list[R]:
    """``[fn(item) for item in items]``, computed by ``actors`` Ray actors (round robin), in order."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError("map_on_ray runs inside ray_cluster")
    count = max(1, min(actors, len(items)))
    cls: Any = ray.remote(num_cpus=1, max_restarts=MAX_RESTARTS, max_task_retries=MAX_TASK_RETRIES)(_Worker)
    workers: list[Any] = [cls.remote() for _ in range(count)]
    try:
        refs = [workers[i % count].run.remote(fn, item) for i, item in enumerate(items)]
        try:
            return list(ray.get(refs))
        except ray.exceptions.RayError as exc:
            raise RuntimeError(f"a Ray actor failed its work and its retries are spent: {exc}"[:300]) from exc
    finally:
        for worker in workers:
            ray.kill(worker, no_restart=True)
