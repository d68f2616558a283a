"""Cheating nodes against a live mesh (``verimesh redteam --mesh URL``).

Each cheating node is an ordinary ``mesh.Node`` (it registers with its own key and stake,
heartbeats and leases the coordinator's real tasks) whose bundle is replaced, before upload,
by the red team's cheat for the job it leased, sealed and signed with its own key: what a
dishonest operator could ship. An operator points this at their own deployment and reads the
outcome in ``verimesh status`` and the ledger: every cheat should end slashed, its node
excluded and its task redone by another node.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from verimesh.assurance.redteam import _Cheater
from verimesh.errors import InvalidInputError
from verimesh.jobs.job import Job
from verimesh.mesh.node import Node
from verimesh.signing.keys import SecretKey, generate_key, write_key_pair

MESH_STRATEGIES = ("lazy", "perturb-final", "perturb-intermediate")
# A generate job's cheat of the same kind (assurance/generate_redteam.py): the cheap model's answer,
# one token steered mid-answer (the rest generated on from it); perturb-final edits the last token.
GENERATE_CHEATS = {"lazy": "lazy", "perturb-intermediate": "steered"}


def cheat_hook(strategy: str, key: SecretKey, rng: random.Random) -> Callable[[Path, Job], None]:
    """Replaces an honest bundle by ``strategy``'s cheat on the same job, signed by ``key``."""
    if strategy not in MESH_STRATEGIES:
        raise InvalidInputError(f"unknown mesh strategy {strategy!r}", hint=f"one of {', '.join(MESH_STRATEGIES)}")

    def hook(bundle: Path, job: Job) -> None:
        if job.segment is not None:
            return  # the strategies cheat on whole jobs (a shard is one, on its row); a segment is answered honestly
        work = Path(tempfile.mkdtemp(prefix="verimesh-cheat-"))
        try:
            if job.mode == "generate":
                shutil.copyfile(_generate_cheat(job, key, work, rng, strategy), bundle)
                return
            cheater = _Cheater(job, key, work, rng)
            last = len(job.steps) - 1
            if strategy == "lazy":
                made = cheater.lazy(0.5)
            elif strategy == "perturb-final" or last == 0:
                made = cheater.perturb_step(last)
            else:
                made = cheater.perturb_step(rng.randrange(0, last))
            shutil.copyfile(made, bundle)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    return hook


def _generate_cheat(job: Job, key: SecretKey, work: Path, rng: random.Random, strategy: str) -> Path:
    """A generate job's cheat, sealed and signed: one a verifier at every position catches where
    the answer offers one (an edit at a near-tie, where either token is allowed, is drawn again)."""
    import numpy as np

    from verimesh.assurance.generate_redteam import _Cheater as _GenerateCheater

    cheater = _GenerateCheater(job, key, work, rng)
    tokens = cheater.honest["tokens"][0].tolist()
    if strategy == "perturb-final":
        return cheater.seal(cheater.steered_at(tokens, len(tokens) - 1, job.policy.tolerance_for(0))[0])
    np_rng = np.random.default_rng(rng.randrange(1 << 32))
    played = None
    for _ in range(20):
        played = cheater.play(GENERATE_CHEATS[strategy], np_rng)
        if played is not None and played[1] == 1.0:
            break
    if played is None:
        raise InvalidInputError(f"the generate cheat {strategy} has nothing to change in this answer")
    return cheater.seal(played[0])


def run_mesh_redteam(
    coordinator: str, *, strategy: str, nodes: int, keys_dir: Path, stake: int = 1000,
    max_tasks: int | None = None, idle_exit: float | None = None, on_event: Callable[[str], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Run ``nodes`` cheating node daemons (keys kept in ``keys_dir``) until each stops."""
    keys_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random()
    daemons = []
    for i in range(nodes):
        path = keys_dir / f"cheater-{i}.key"
        if not path.exists():
            write_key_pair(path, generate_key())
        from verimesh.signing.keys import load_secret_key

        key = load_secret_key(path)
        daemons.append(Node(coordinator, key, stake=stake, device="cpu", on_bundle=cheat_hook(strategy, key, rng),
                            on_event=on_event))  # fmt: skip
    results: dict[str, Any] = {}

    failures: list[InvalidInputError] = []

    def serve(daemon: Node) -> None:
        try:
            results[daemon.key.node_id] = {"tasks": daemon.run(max_tasks=max_tasks, idle_exit=idle_exit)}
        except InvalidInputError as exc:
            failures.append(exc)
            results[daemon.key.node_id] = {"tasks": daemon.done, "stopped": exc.message}
        finally:
            daemon.close()

    threads = [threading.Thread(target=serve, args=(d,), daemon=True) for d in daemons]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures and len(failures) == len(daemons) and not any(r["tasks"] for r in results.values()):
        raise failures[0]  # no node got anywhere (the coordinator unreachable, say): an error, not a report
    return {"coordinator": coordinator, "strategy": strategy, "nodes": results}
