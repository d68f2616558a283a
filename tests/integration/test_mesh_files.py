"""A job's files laid out from blobs (mesh/files.py), against a job owner who chooses every byte
of the job document and of a zk job's circuit.json: no file lands outside the job's folder, no
file the job names twice overwrites another (job.json above all: the prover reads it from disk),
and a name that is no path is refused with a one-line error (a 422 at the coordinator, a task
given back by a node), never an OSError. Found by review: a circuit.json naming a step's vk
"job.json" in the job's own folder made honest nodes prove another job and be excluded."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FIXTURES
from verimesh.core.canonical import canonical_json
from verimesh.core.digest import sha256_bytes
from verimesh.errors import InvalidInputError
from verimesh.jobs.job import compute_job_id, new_job
from verimesh.mesh.files import circuit_files, materialize

CIRCUIT = FIXTURES.parent / "circuits" / "mlp"


@pytest.fixture(scope="module")
def zk_job(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, bytes]]:
    """A zk job document whose circuit sits inside its folder, and every blob it names by digest."""
    root = tmp_path_factory.mktemp("zkjob")
    shutil.copytree(CIRCUIT, root / "circuit")
    job = new_job(FIXTURES / "mlp.onnx", FIXTURES / "mlp.input.npy", root / "job.json", mode="zk",
                  circuit=root / "circuit")  # fmt: skip
    blobs = {sha256_bytes(p.read_bytes()): p.read_bytes() for p in (root / "circuit").iterdir()}
    data = job.resolve(job.input_path).read_bytes()
    blobs[sha256_bytes(data)] = data
    return json.loads(job.canonical_bytes()), blobs


def laid_out(doc: dict[str, Any], blobs: dict[str, bytes], circuit: dict[str, Any], out: Path,
             edit: Callable[[dict[str, Any]], None] | None = None) -> Any:  # fmt: skip
    """Re-pin ``circuit`` (an edited circuit.json) in the job, then lay the files out in ``out``."""
    body = canonical_json(circuit)
    doc = json.loads(json.dumps(doc))
    doc["circuit"]["digest"] = sha256_bytes(body)
    if edit is not None:
        edit(doc)
    doc.pop("job_id", None)
    doc["job_id"] = compute_job_id(doc)
    job_bytes = canonical_json(doc)
    store = {**blobs, sha256_bytes(body): body, sha256_bytes(job_bytes): job_bytes}
    input_digest = next(d for d, b in blobs.items() if b.startswith(b"PK"))
    files = {"job": sha256_bytes(job_bytes), "model": doc["model"]["digest"], "input": input_digest,
             "steps": [s["digest"] for s in doc["steps"]], "circuit": circuit_files(body)}  # fmt: skip
    return materialize(files, store.__getitem__, out, with_model=False)


def circuit_doc() -> dict[str, Any]:
    return dict(json.loads((CIRCUIT / "circuit.json").read_bytes()))


def test_an_honest_circuit_is_laid_out_inside_the_jobs_folder(zk_job: Any, tmp_path: Path) -> None:
    doc, blobs = zk_job
    job, _ = laid_out(doc, blobs, circuit_doc(), tmp_path)
    assert job.mode == "zk" and job.load_circuit().digest == job.circuit_digest
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert all(w.startswith("job/") for w in written) and "job/circuit/circuit.json" in written


@pytest.mark.parametrize(
    ("field", "name", "why"),
    [
        ("vk", "../escape.key", "plain file name"),
        ("settings", "a\x00b.json", "plain file name"),
        ("settings", "x" * 300, "plain file name"),
        ("vk", "", "plain file name"),
        ("vk", ".", "plain file name"),
        ("vk", "step-000.onnx", "two of its files"),  # the step model the job pins at circuit/step-000.onnx
        ("settings", "circuit.json", "two of its files"),
    ],
)
def test_a_circuit_naming_what_is_no_plain_file_or_another_file_is_refused(
    zk_job: Any, tmp_path: Path, field: str, name: str, why: str
) -> None:
    doc, blobs = zk_job
    circuit = circuit_doc()
    circuit["steps"][0][field] = name
    with pytest.raises(InvalidInputError, match=why):
        laid_out(doc, blobs, circuit, tmp_path)
    assert not any(p.is_file() and p.name == "escape.key" for p in tmp_path.parent.rglob("escape.key"))


def test_a_circuit_in_the_jobs_own_folder_cannot_overwrite_job_json(zk_job: Any, tmp_path: Path) -> None:
    doc, blobs = zk_job
    circuit = circuit_doc()
    circuit["steps"][0]["vk"] = "job.json"

    def in_the_job_folder(d: dict[str, Any]) -> None:
        d["circuit"]["path"] = "."
        for step in d["steps"]:
            step["path"] = step["path"].split("/", 1)[1]

    with pytest.raises(InvalidInputError, match="two of its files"):
        laid_out(doc, blobs, circuit, tmp_path, in_the_job_folder)
    written = tmp_path / "job" / "job.json"
    assert not written.exists() or json.loads(written.read_bytes())["mode"] == "zk"


def _generate_laid_out(root: Path, out: Path, model_path: str | None = None, with_model: bool = True) -> Any:
    """A generate job whose model sits where ``job new`` found it (above the job's folder), or at
    ``model_path`` as a hostile owner names it, laid out in ``out``."""
    from verimesh.jobs.generate_job import new_generate_job

    job = new_generate_job(FIXTURES / "lm.onnx", FIXTURES / "lm.prompt.json", root / "deep" / "job.json",
                           max_new_tokens=4, overwrite=True)  # fmt: skip
    doc = json.loads(job.canonical_bytes())
    if model_path is not None:
        doc["steps"][0]["path"] = doc["model"]["path"] = model_path
        doc.pop("job_id")
        doc["job_id"] = compute_job_id(doc)
    job_bytes = canonical_json(doc)
    model, prompt = (FIXTURES / "lm.onnx").read_bytes(), job.resolve(job.input_path).read_bytes()
    store = {sha256_bytes(b): b for b in (model, prompt, job_bytes)}
    files = {"job": sha256_bytes(job_bytes), "model": doc["model"]["digest"], "input": sha256_bytes(prompt),
             "steps": [doc["steps"][0]["digest"]]}  # fmt: skip
    return doc, materialize(files, store.__getitem__, out, with_model=with_model)


def test_a_generate_jobs_model_above_its_folder_lands_inside_the_layout(tmp_path: Path) -> None:
    doc, (job, model) = _generate_laid_out(tmp_path / "owner", tmp_path / "out")
    assert doc["steps"][0]["path"].startswith("../")  # the owner's job names the model where it lies
    assert model == job.resolve(job.steps[0].path) and model.is_relative_to((tmp_path / "out" / "job").resolve())
    assert job.read_step_model(0) == (FIXTURES / "lm.onnx").read_bytes()  # what the verifier re-runs
    assert (job.base_dir / "job.json").is_file() and job.read_input()["input_ids"].shape[0] == 1
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(written) == 3  # job.json, the model once (it is the job's one step), the prompt


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("/".join([".."] * 33) + "/lm.onnx", "33 folders above"),
        ("../up/job.json", "two of its files"),  # from job/up: job/up/job.json is the job document itself
    ],
)
def test_a_generate_jobs_hostile_model_path_is_refused(tmp_path: Path, path: str, why: str) -> None:
    with pytest.raises(InvalidInputError, match=why):
        _generate_laid_out(tmp_path / "owner", tmp_path / "out", model_path=path)
