"""Live-mesh commands: ``serve`` (the coordinator), ``node run`` (a node's daemon), ``submit``
and ``status`` (a job owner's side)."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import click

from verimesh.cli.common import EXIT_CODES_HELP, emit, json_option, ledger_option, load_signing_key, note, plural
from verimesh.errors import EXIT_REJECTED, InvalidInputError, TerminatedError
from verimesh.ledger.reputation import MAX_LEVEL

_DURATION = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(s|m|h)?$")


class Duration(click.ParamType):  # type: ignore[type-arg]
    """Seconds: 90, 90s, 5m, 1h."""

    name = "DURATION"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, (int, float)):
            return float(value)
        found = _DURATION.match(str(value).strip())
        if not found:
            self.fail(f"{value!r} is not a duration (90, 90s, 5m, 1h)", param, ctx)
        seconds = float(found.group(1)) * {"s": 1, "m": 60, "h": 3600, None: 1}[found.group(2)]
        if not 1 <= seconds <= 7 * 86400:
            self.fail("must be between 1 s and 7 days", param, ctx)
        return seconds


def coordinator_option(f: Any) -> Any:
    return click.option("--coordinator", "coordinator", envvar="VERIMESH_COORDINATOR", required=True,
                        help="The coordinator's URL (http://127.0.0.1:8470); env VERIMESH_COORDINATOR.")(f)  # fmt: skip


@click.command("serve", epilog=EXIT_CODES_HELP)
@ledger_option
@click.option("--operator-key", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The ledger operator's secret key: it writes the ledger and signs receipts (the ledger is "
              "created with it when absent).")  # fmt: skip
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to bind; beyond loopback needs --read-token (TLS: a reverse proxy, docs/design.md §10).",
)
@click.option("--port", type=click.IntRange(min=0, max=65535), default=8470, show_default=True,
              help="Port (0: any free one, printed).")  # fmt: skip
@click.option("--deadline", type=Duration(), default="300s", show_default=True,
              help="Default time a node has to answer a task it leased (a job may set its own).")  # fmt: skip
@click.option("--heartbeat-timeout", type=Duration(), default="15s", show_default=True,
              help="A node silent this long loses its leases.")  # fmt: skip
@click.option("--max-upload-mb", type=click.IntRange(min=1, max=4096), default=512, show_default=True,
              help="Largest request body accepted (413 above).")  # fmt: skip
@click.option(
    "--read-token",
    envvar="VERIMESH_READ_TOKEN",
    default=None,
    help="Token the dashboard and status views ask for (Bearer or ?token=); env VERIMESH_READ_TOKEN.",
)
@click.option("--verify-timeout", type=Duration(), default="600s", show_default=True,
              help="Longest one verification may run (a longer job fails; no node is blamed).")  # fmt: skip
@click.option("--srs", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="zk jobs: the SRS the coordinator checks proofs with (a zk job whose circuit pins another "
              "is refused at submission).")  # fmt: skip
@click.option("--answer-within", type=Duration(), default="60s", show_default=True,
              help="Challenge mode: time a node has to open the sampled steps once it committed (then it loses "
              "the task; unanswered challenges exclude it).")  # fmt: skip
@click.option("--admission", type=click.Choice(["open", "ledger"]), default="open", show_default=True,
              help="open: any key may join with its signed registration; ledger: only nodes the operator "
              "registered in the ledger beforehand (`verimesh ledger register`).")  # fmt: skip
@click.option("--blob-quota-mb", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Per key: uploads no submitted job refers to yet (collected after an hour).")  # fmt: skip
@click.option("--verifiers", default="local", show_default=True,
              help="local (the coordinator's own verifier process), ray (a local loopback Ray cluster, or "
              "$RAY_ADDRESS), or ray://HOST:PORT: results are verified there ahead of settlement.")  # fmt: skip
@click.option("--verifier-actors", type=click.IntRange(1, 256), default=None,
              help="Ray verifier actors (default: the cluster's CPUs).")  # fmt: skip
def serve(ledger_url: str, operator_key: Path, host: str, port: int, deadline: float, heartbeat_timeout: float,
          max_upload_mb: int, read_token: str | None, verify_timeout: float, srs: Path | None, answer_within: float,
          admission: str,
          blob_quota_mb: int, verifiers: str, verifier_actors: int | None) -> None:  # fmt: skip
    """Run the coordinator: job board, verifier and ledger writer, until Ctrl-C or SIGTERM."""
    from contextlib import ExitStack

    from verimesh.fleet.cluster import parse_verifiers
    from verimesh.mesh.coordinator import Coordinator

    kind, address = parse_verifiers(verifiers)
    with ExitStack() as stack:
        fleet = None
        if kind == "ray":
            from verimesh.fleet.cluster import ray_cluster
            from verimesh.fleet.verifiers import RayVerifiers

            cluster = stack.enter_context(ray_cluster(address))
            fleet = RayVerifiers(verifier_actors or max(1, int(cluster.cpus)))
            stack.callback(fleet.close)
            where = " (a local loopback cluster, shut down with the coordinator)" if cluster.local else ""
            note(f"verifier fleet: {len(fleet.actors)} Ray actor(s) on {cluster.address}{where}")
        coordinator = Coordinator(ledger_url, load_signing_key(operator_key), deadline=deadline,
                                  heartbeat_timeout=heartbeat_timeout, max_upload=max_upload_mb * 1024 * 1024,
                                  read_token=read_token, verify_timeout=verify_timeout, admission=admission,
                                  blob_quota=blob_quota_mb * 1024 * 1024, fleet=fleet,
                                  answer_within=answer_within, srs=srs)  # fmt: skip

        def ready(url: str) -> None:
            note(f"verimesh coordinator {coordinator.ledger.ledger_id} serving on {url} (operator "
                 f"{coordinator.operator.node_id}); dashboard at {url}/")  # fmt: skip
            sys.stderr.flush()

        try:
            coordinator.serve(host, port, on_ready=ready)
        except (KeyboardInterrupt, TerminatedError):  # uvicorn shut down gracefully first, then passed the signal on
            note("verimesh coordinator stopped")


@click.group("node", epilog=EXIT_CODES_HELP)
def node() -> None:
    """A node operator's daemon."""


@node.command("run", epilog=EXIT_CODES_HELP)
@coordinator_option
@click.option("--key", "key_file", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The node's secret key (its identity in the ledger).")  # fmt: skip
@click.option("--stake", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Stake declared in the node's signed registration (first run only).")  # fmt: skip
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where this node runs its steps (auto: CUDA when onnxruntime has it); it registers the "
              "device it resolves to, and jobs pinned to another device are not leased to it.")  # fmt: skip
@click.option("--threads", type=click.IntRange(min=0), default=0, help="onnxruntime threads (0: its default).")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where job files are cached (default: a temporary folder).")  # fmt: skip
@click.option("--max-tasks", type=click.IntRange(min=1), default=None, help="Stop after this many tasks.")
@click.option("--idle-exit", type=Duration(), default=None, help="Stop after this long with nothing to do.")
@click.option("--poll", type=click.FloatRange(min=0.05, max=60), default=0.5, show_default=True,
              help="Seconds between lease requests when idle.")  # fmt: skip
@click.option("--heartbeat", type=click.FloatRange(min=0.1, max=600), default=3.0, show_default=True,
              help="Seconds between heartbeats.")  # fmt: skip
@click.option("--srs", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="zk jobs: the node's SRS file (each circuit pins its digest; a node without it gives zk tasks "
              "back).")  # fmt: skip
@json_option
def node_run(coordinator: str, key_file: Path, stake: int, device: str, threads: int, work_dir: Path | None,
             max_tasks: int | None, idle_exit: float | None, poll: float, heartbeat: float, srs: Path | None,
             as_json: bool) -> None:  # fmt: skip
    """Register (once), heartbeat, lease tasks, prove, upload; until stopped."""
    import signal

    from verimesh.mesh.node import Node

    daemon = Node(coordinator, load_signing_key(key_file), stake=stake, device=device, work_dir=work_dir,
                  poll=poll, heartbeat=heartbeat, threads=threads, on_event=note, srs=srs)  # fmt: skip
    # SIGTERM is how an operator stops the daemon: it finishes the task in hand and exits 0.
    previous = signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
    try:
        done = daemon.run(max_tasks=max_tasks, idle_exit=idle_exit)
    finally:
        signal.signal(signal.SIGTERM, previous)
        daemon.close()
    emit(as_json, {"node_id": daemon.key.node_id, "tasks": done}, f"node {daemon.key.node_id}: {done} task(s) done")


@click.command("submit", epilog=EXIT_CODES_HELP)
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--input", "input_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The model's input (.npy, .npz or .json).")  # fmt: skip
@coordinator_option
@click.option("--key", "key_file", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The job owner's secret key (signs the submission and its deposit).")  # fmt: skip
@click.option("--deposit", type=click.IntRange(min=1), default=10, show_default=True,
              help="Deposit the job's rewards are paid from.")  # fmt: skip
@click.option("--deadline", type=Duration(), default="300s", show_default=True,
              help="Time a node has to answer once it leased the task.")  # fmt: skip
@click.option("--samples", type=click.IntRange(min=0), default=1, show_default=True,
              help="Steps re-checked beside the mandatory ones (the ledger's audit level may ask more).")  # fmt: skip
@click.option("--max-attempts", type=click.IntRange(min=1, max=20), default=3, show_default=True,
              help="Nodes tried before the job fails.")  # fmt: skip
@click.option("--segments", type=click.IntRange(min=1, max=256), default=None,
              help="Cut the job into N segments, each run by another node from the verified outputs of the ones "
              "before it (the mesh needs N nodes; each segment is posted with --deposit).")  # fmt: skip
@click.option("--device", "job_device", type=click.Choice(["any", "cpu", "cuda"]), default="any", show_default=True,
              help="Lease the job only to nodes of this device.")  # fmt: skip
@click.option("--replicas", type=click.IntRange(min=1, max=8), default=1, show_default=True,
              help="Run the job on R distinct nodes: each answer is spot-checked, agreeing answers are settled "
              "by the quorum, a disagreement by a referee's full verification (the deposit pays each accepted "
              "replica). Not with --segments.")  # fmt: skip
@click.option("--shards", "shards_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A batch (.npz, the model's inputs with a leading batch axis): each row is run as the whole job "
              "by another node, in parallel (the mesh needs a node per row; each row is posted with --deposit); "
              "outputs.npz is the batch of verified outputs.")  # fmt: skip
@click.option("--min-level", type=click.IntRange(min=0, max=MAX_LEVEL), default=0, show_default=True,
              help="Lease the job only to nodes the ledger trusts at this audit level or above (level L: a streak "
              "of accepted jobs, docs/design.md §6); 0: any staked node.")  # fmt: skip
@click.option("--mode", "job_mode", type=click.Choice(["spot", "zk", "generate"]), default="spot", show_default=True,
              help="spot: the coordinator re-runs sampled steps; zk: the node proves with ezkl and the "
              "coordinator checks the proof (needs --circuit; the coordinator and the nodes hold its "
              "SRS); generate: MODEL is a decoder, --input its prompt.json, a node generates up to "
              "--max-new-tokens and the coordinator checks its records with one prefill pass.")  # fmt: skip
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None, help="generate: tokens to make at most.")
@click.option("--sampling", default="greedy", show_default=True,
              help='generate: "greedy" or "temperature=T[,top_p=P]" (reproducible from the job\'s nonce).')  # fmt: skip
@click.option("--stop-token", "stop_tokens", type=click.IntRange(min=0), multiple=True,
              help="generate: a token id that ends the answer (repeatable).")  # fmt: skip
@click.option("--tokenizer", "tokenizer_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="generate: a Hugging Face tokenizers JSON file (pinned in the job; with a prompt "
              '{"text": ...}, and to print the verified answer as text).')  # fmt: skip
@click.option("--circuit", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="zk mode: the circuit folder built by `verimesh circuit build` (it travels with the "
              "job).")  # fmt: skip
@click.option("--transfer", type=click.Choice(["challenge", "full"]), default=None,
              help="What a node uploads. challenge (the default for a whole job run once): its commitment "
              "(statement, trace.json, outputs), then only the tensors of the steps the coordinator samples after "
              "it; full (the default with --segments, --shards or --replicas): its whole bundle, kept for offline "
              "audit.")  # fmt: skip
@click.option("--wait", is_flag=True, help="Wait for the verdict, then write -o DIR.")
@click.option("--force", is_flag=True, help="With -o: overwrite outputs.npz and receipt.json already there.")
@click.option("--timeout", type=Duration(), default="600s", show_default=True, help="With --wait: give up after.")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="With --wait: write outputs.npz and receipt.json here.")  # fmt: skip
@click.option("--verifier-key", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The coordinator operator's public key to check the receipt against (default: the key the "
              "coordinator announces, which proves nothing against a coordinator you do not trust).")  # fmt: skip
@json_option
def submit(model: Path, input_path: Path, coordinator: str, key_file: Path, deposit: int, deadline: float,
           samples: int, max_attempts: int, segments: int | None, job_device: str, replicas: int,
           shards_file: Path | None, min_level: int, job_mode: str, max_new_tokens: int | None, sampling: str,
           stop_tokens: tuple[int, ...], tokenizer_file: Path | None, circuit: Path | None, transfer: str | None,
           wait: bool, force: bool, timeout: float,
           out_dir: Path | None, verifier_key: Path | None, as_json: bool) -> None:  # fmt: skip
    """Plan MODEL on its input, hand the job to the mesh; with --wait, take back verified outputs
    (exit 1 when every node tried was rejected)."""
    from verimesh.mesh.client import Client
    from verimesh.mesh.owner import collect, generated
    from verimesh.mesh.owner import submit as submit_job
    from verimesh.signing.keys import load_public_key, public_key_from_json

    if out_dir is not None and not wait:
        raise click.UsageError("-o/--out goes with --wait")
    kept = [out_dir / n for n in ("outputs.npz", "receipt.json") if out_dir is not None and (out_dir / n).exists()]
    if kept and not force:  # refused before the job is posted, not after it ran
        raise InvalidInputError(f"{kept[0]} already exists", hint="pass --force to overwrite it")
    if replicas > 1 and segments is not None:
        raise click.UsageError("--replicas runs a whole job on R nodes; it does not go with --segments (yet)")
    if shards_file is not None and (segments is not None or replicas > 1):
        raise click.UsageError("--shards runs each row as a whole job: not with --segments or --replicas (yet)")
    if (job_mode == "zk") != (circuit is not None):
        raise click.UsageError("--mode zk needs --circuit DIR, and --circuit goes with --mode zk")
    if job_mode == "zk" and (segments is not None or shards_file is not None):
        raise click.UsageError("a zk job is proven whole: not with --segments or --shards")
    if transfer == "challenge" and (segments is not None or replicas > 1 or shards_file is not None
                                    or job_mode == "zk"):  # fmt: skip
        raise click.UsageError("--transfer challenge is for whole spot jobs run once: --segments, --shards, "
                               "--replicas and --mode zk ship full bundles")  # fmt: skip
    generation = _generation(job_mode, max_new_tokens, sampling, stop_tokens, tokenizer_file, segments, replicas,
                             shards_file, transfer)  # fmt: skip
    source = click.get_current_context().get_parameter_source("samples")
    # A generate job checks every generated position unless asked otherwise (one prefill pass checks them all).
    checked = None if generation is not None and source is click.core.ParameterSource.DEFAULT else samples
    with Client(coordinator, load_signing_key(key_file)) as client:
        pinned = load_public_key(verifier_key) if verifier_key else public_key_from_json(client.info()["operator_key"])
        sent = submit_job(client, model, input_path, deposit=deposit, deadline=deadline, samples=checked,
                          max_attempts=max_attempts, segments=segments, device=job_device,
                          replicas=replicas, min_level=min_level, shards=shards_file,
                          transfer=transfer, mode=job_mode, circuit=circuit, generation=generation)  # fmt: skip
        payload: dict[str, Any] = {"job_id": sent.job_id, "created": sent.created}
        if not wait:
            emit(as_json, {**payload, "state": "open"}, f"submitted job {sent.job_id}")
            return
        doc = client.wait(sent.job_id, timeout=timeout)
        payload.update(state=doc["state"], tasks=doc["tasks"], error=doc["error"])
        if doc["state"] != "done":
            emit(as_json, payload, f"job {sent.job_id} failed: {doc['error']}")
            raise SystemExit(EXIT_REJECTED)
        human = f"job {sent.job_id} done"
        if out_dir is None:
            note("the verified outputs were not written: submit with --wait -o DIR to keep them")
        if out_dir is not None:
            payload.update(collect(client, sent.job_id, out_dir, verifier_key=pinned))
            human += f"; verified outputs in {payload['outputs']}, receipt {payload['receipt']}"
            if generation is not None:
                answer = generated(out_dir / "outputs.npz", generation.tokenizer)
                payload.update(answer)
                count = len(answer["token_ids"])
                human += f"\n{plural(count, 'token')}: " + (repr(answer["text"]) if "text" in answer
                                                           else str(answer["token_ids"]))  # fmt: skip
        emit(as_json, payload, human)


def _generation(mode: str, max_new_tokens: int | None, sampling: str, stop_tokens: tuple[int, ...],
                tokenizer: Path | None, segments: int | None, replicas: int, shards: Path | None,
                transfer: str | None) -> Any:  # fmt: skip
    """A generate submission's decode, its flags checked (None for another mode, whose flags these are not)."""
    from verimesh.mesh.owner import Generation

    given = {"--max-new-tokens": max_new_tokens, "--tokenizer": tokenizer, "--stop-token": stop_tokens or None,
             "--sampling": None if sampling == "greedy" else sampling}  # fmt: skip
    if mode != "generate":
        named = [flag for flag, value in given.items() if value is not None]
        if named:
            raise click.UsageError(f"{', '.join(named)} go with --mode generate")
        return None
    if max_new_tokens is None:
        raise click.UsageError("--mode generate needs --max-new-tokens N (and --input prompt.json)")
    if segments is not None or replicas > 1 or shards is not None or transfer == "challenge":
        raise click.UsageError("a generate job runs whole, once, with its full bundle: not with --segments, "
                               "--shards, --replicas or --transfer challenge")  # fmt: skip
    return Generation(max_new_tokens, sampling, tuple(stop_tokens), tokenizer)


def _full_job_id(client: Any, job_id: str) -> str:
    """A job id as given, or the one job among the coordinator's recent jobs it is a prefix of
    (with or without ``sha256:``, as `status` prints it shortened)."""
    from verimesh.mesh.client import MeshError

    wanted = job_id if job_id.startswith("sha256:") else f"sha256:{job_id}"
    if re.fullmatch(r"sha256:[0-9a-f]{64}", wanted):
        return wanted
    matches = [str(j["job_id"]) for j in client.status()["jobs"] if str(j["job_id"]).startswith(wanted.rstrip("…"))]
    if len(matches) != 1:
        raise MeshError(f"{'no job' if not matches else f'{len(matches)} jobs'} of this coordinator's recent jobs "
                        f"{'start' if len(matches) > 1 else 'starts'} with {job_id!r}", code="unknown-job",
                        hint="give the whole id (`verimesh status --json` lists them)")  # fmt: skip
    return matches[0]


@click.command("status", epilog=EXIT_CODES_HELP)
@coordinator_option
@click.argument("job_id", required=False)
@click.option("--read-token", envvar="VERIMESH_READ_TOKEN", default=None, help="The coordinator's read token.")
@click.option("--wait-ready", type=Duration(), default=None,
              help="Wait up to this long for the coordinator to answer (scripts that just started it).")  # fmt: skip
@json_option
def status(coordinator: str, job_id: str | None, read_token: str | None, wait_ready: float | None,
           as_json: bool) -> None:  # fmt: skip
    """The state of every job and node (or of one job and its tasks)."""
    import time

    from verimesh.mesh.client import Client, MeshError

    with Client(coordinator, token=read_token) as client:
        end = time.monotonic() + (wait_ready or 0)
        while True:
            try:
                doc = client.status(_full_job_id(client, job_id) if job_id else None)
                break
            except MeshError as exc:
                if exc.status == 404 and job_id:
                    raise MeshError(f"this coordinator has no job {job_id}", code="unknown-job",
                                    hint="`verimesh status` lists its recent jobs") from exc  # fmt: skip
                if exc.status != 0 or time.monotonic() >= end:
                    raise
                time.sleep(0.2)
    if as_json:
        emit(True, doc, "")
        return
    jobs = [doc] if job_id else doc["jobs"]
    lines = []
    if not job_id:
        lines.append(f"coordinator {doc['coordinator']}: ledger {doc['ledger']['size']} entries; tasks "
                     + (", ".join(f"{k} {v}" for k, v in sorted(doc["tasks"].items())) or "none"))  # fmt: skip
        for n in doc["nodes"]:
            lines.append(f"  node {n['node_id']}  {n['device']}  {'online' if n['online'] else 'offline'}  "
                         f"stake {n.get('stake', '?')}  score {n.get('score', '?')}  "
                         f"audit level {n.get('audit_level', '?')}"
                         + (f"  missed challenges {n['missed']}" if n.get("missed") else "")
                         + (f"  EXCLUDED: {n['banned']}" if n["banned"] else ""))  # fmt: skip
    for j in jobs:
        wants = f"  (nodes at audit level >= {j['min_level']} only)" if j.get("min_level") else ""
        lines.append(f"job {j['job_id']}  {j['state']}{wants}" + (f"  ({j['error']})" if j["error"] else ""))
        for t in j["tasks"]:
            last = t["history"][-1]["outcome"] if t["history"] else ""
            replica = f" replica {t.get('replica', 0)}" if j.get("replicas", 1) > 1 else ""
            decided = (t["verdict"] or {}).get("decided_by") if t["state"] == "done" else None
            where = (t["verdict"] or {}).get("verified_by") if t["state"] == "done" else None
            if decided and where and where != "here":
                decided += f" (verified by {where})"
            challenge = t.get("challenge")
            opened = ""
            if challenge:
                moved = sum(challenge["bytes"].values())
                opened = f"  challenged steps {challenge['steps']} ({moved} bytes up)"
            lines.append(f"  task {t['position']}{replica}  {t['state']}  node {t['node_id'] or '-'}  "
                         f"attempts {t['attempts']}" + (f"  decided by: {decided}" if decided else "") + opened
                         + (f"  last: {last}" if last else ""))  # fmt: skip
    emit(False, doc, "\n".join(lines))
