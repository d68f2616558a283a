"""Generate mode end to end: a decoder LM with a KV cache and GQA (fixtures/lm.onnx), prefill and
decode on the worker, one prefill pass on the verifier; every cheat of the red team rejected with
evidence `evidence check` confirms; forged evidence against an honest answer proves nothing; the
ledger pays the honest answer and slashes the cheat; bad models and prompts refused in one line."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.integration.test_ledger import join, new_ledger, post
from verimesh.assurance.generate_redteam import _Cheater
from verimesh.jobs.bundle import read_bundle, tensor_member
from verimesh.jobs.generate_job import new_generate_job
from verimesh.jobs.generation import near_tie, parse_sampling, position_problem, sketch_matrix
from verimesh.jobs.job import Job, load_job
from verimesh.settlement import node_standing, verify_and_settle
from verimesh.signing.keys import generate_key
from verimesh.spot.evidence import check_evidence
from verimesh.spot.sealed_evidence import write_sealed_evidence
from verimesh.workflows import Worker, verify

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
LM, PROMPT = FIXTURES / "lm.onnx", FIXTURES / "lm.prompt.json"


def _cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "verimesh", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)  # fmt: skip


@pytest.fixture(scope="module")
def greedy(tmp_path_factory: pytest.TempPathFactory) -> Job:
    return new_generate_job(LM, PROMPT, tmp_path_factory.mktemp("gen") / "job.json", max_new_tokens=32)


def test_the_cli_generates_verifies_and_hands_out_the_tokens(tmp_path: Path) -> None:
    assert _cli("keys", "new", "-o", "node.key", cwd=tmp_path).returncode == 0
    made = _cli("job", "new", LM, "--mode", "generate", "--prompt", PROMPT, "--max-new-tokens", "24", "-o", "job.json",
                "--json", cwd=tmp_path)  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["kv_cache"] is True and json.loads(made.stdout)["layers"] == 2
    proved = _cli("prove", "job.json", "--key", "node.key", "-o", "gen.vmb", cwd=tmp_path)
    assert proved.returncode == 0, proved.stderr
    verdict = _cli("verify", "gen.vmb", "--job", "job.json", "--node-key", "node.key.pub", "--json", cwd=tmp_path)
    assert verdict.returncode == 0, verdict.stdout
    assert json.loads(verdict.stdout)["verdict"] == "accept"
    shown = _cli("outputs", "gen.vmb", "--job", "job.json", "--node-key", "node.key.pub", "--json", cwd=tmp_path)
    tokens = json.loads(shown.stdout)["token_ids"]
    assert shown.returncode == 0 and len(tokens) == 24
    # A record per token is small: the bundle grows by well under 300 bytes a token.
    size = (tmp_path / "gen.vmb").stat().st_size
    assert size < 2500 + 300 * 24, size
    # Another key's bundle, and a bundle for another job, are refused.
    assert _cli("keys", "new", "-o", "other.key", cwd=tmp_path).returncode == 0
    foreign = _cli("verify", "gen.vmb", "--job", "job.json", "--node-key", "other.key.pub", cwd=tmp_path)
    assert foreign.returncode == 1


def _decisive_share(job: Job) -> float:
    """The fixture's promise: most generated positions have a top-two margin above the near-tie margin."""
    cheater = _Cheater(job, generate_key(), job.base_dir, random.Random(0))
    tol = job.policy.tolerance_for(0)
    margins = [np.sort(r)[-1] - np.sort(r)[-2] > near_tie(tol, r) for r in cheater.logits]
    return float(np.mean(margins))


def test_the_fixture_lm_has_decisive_logits(greedy: Job) -> None:
    assert _decisive_share(greedy) >= 0.9


@pytest.mark.parametrize("strategy", ["retrained-model", "fp16-weights", "int8-weights", "smaller-model",
                                      "edited-token", "steered", "truncated", "extended", "prompt-swapped",
                                      "temperature-changed", "lazy"])  # fmt: skip
def test_every_cheat_is_rejected_with_evidence_that_rechecks(greedy: Job, strategy: str, tmp_path: Path) -> None:
    key = generate_key()
    cheater = _Cheater(greedy, key, tmp_path, random.Random(3))
    played = None
    for _ in range(20):  # an edited token at a near-tie position is no fraud: take a decisive one
        played = cheater.play(strategy, np.random.default_rng(5))
        if played is not None and played[1] == 1.0:
            break
    assert played is not None and played[1] == 1.0
    bundle = cheater.seal(played[0])
    verdict = verify(bundle, job=greedy, node_key=key.public, evidence_out=tmp_path / "ev.bin")
    assert verdict.status == "reject", verdict.reason
    if strategy != "prompt-swapped":  # that one is caught where the records no longer follow the prompt
        assert any(c.name.startswith("generate-") and not c.ok for c in verdict.checks)
    assert verdict.evidence is not None
    result = check_evidence(tmp_path / "ev.bin")
    assert result.proves_fraud, result.reason


def test_a_sampling_job_replays_its_draws_and_refuses_another_seed(tmp_path: Path) -> None:
    job = new_generate_job(LM, PROMPT, tmp_path / "job.json", max_new_tokens=24,
                           sampling=parse_sampling("temperature=0.8,top_p=0.95"))  # fmt: skip
    key = generate_key()
    honest = Worker(key).prove(job, out=tmp_path / "honest.vmb").bundle
    assert verify(honest, job=job, node_key=key.public).status == "accept"
    cheater = _Cheater(job, key, tmp_path, random.Random(1))
    for _ in range(5):
        played = cheater.play("seed-changed", np.random.default_rng(1))
        assert played is not None
        if played[1] == 1.0:
            break
    assert played is not None and played[1] == 1.0
    verdict = verify(cheater.seal(played[0]), job=job, node_key=key.public)
    assert verdict.status == "reject" and "sampling rule" in verdict.reason


def test_forged_evidence_against_an_honest_answer_proves_nothing(greedy: Job, tmp_path: Path) -> None:
    """A verifier (or anyone holding the bundle) who writes a claim against an honest node: the
    checker re-runs the position and finds the record as committed, at every position."""
    key = generate_key()
    bundle = Worker(key).prove(greedy, out=tmp_path / "honest.vmb").bundle
    parsed = read_bundle(bundle, version=2)
    members = ["trace.json", *(tensor_member(i) for i in range(len(greedy.trace_names)))]
    model = greedy.read_step_model(0)
    for position in (0, 7, 31):
        write_sealed_evidence(tmp_path / "forged.bin", kind="generate-mismatch", job=greedy, bundle=parsed,
                              public=key.public, reason="forged", members=members, step=position,
                              step_models=[(0, model)])  # fmt: skip
        assert not check_evidence(tmp_path / "forged.bin").proves_fraud
    for field in ("stop", "shape"):
        write_sealed_evidence(tmp_path / "forged.bin", kind="generate", job=greedy, bundle=parsed, public=key.public,
                              reason="forged", members=members[:1] + members[2:], field=field)  # fmt: skip
        assert not check_evidence(tmp_path / "forged.bin").proves_fraud
    # A spot-mode claim against a generate answer: its step "does not run" on input_ids alone, which proves nothing.
    write_sealed_evidence(tmp_path / "forged.bin", kind="step-mismatch", job=greedy, bundle=parsed, public=key.public,
                          reason="forged", members=members, step=0, step_models=[(0, model)])  # fmt: skip
    assert not check_evidence(tmp_path / "forged.bin").proves_fraud


def test_the_ledger_pays_the_honest_answer_and_slashes_the_cheat(greedy: Job, tmp_path: Path) -> None:
    led = new_ledger(tmp_path / "ledger.db", unbonding_seconds=0)
    honest_key, cheat_key = generate_key(), generate_key()
    join(led, honest_key, 100)
    join(led, cheat_key, 100)
    post(led, greedy.job_id)
    honest = Worker(honest_key).prove(greedy, out=tmp_path / "honest.vmb").bundle
    settled = verify_and_settle(honest, job=greedy, ledger=led, writer=led.operator_key())
    assert settled.verdict.status == "accept" and "reward" in [k for _, k in settled.appended]
    cheater = _Cheater(greedy, cheat_key, tmp_path, random.Random(2))
    played = cheater.play("lazy", np.random.default_rng(2))
    assert played is not None
    cheated = verify_and_settle(cheater.seal(played[0]), job=greedy, ledger=led, writer=led.operator_key())
    assert cheated.verdict.status == "reject" and "slash" in [k for _, k in cheated.appended]
    assert node_standing(led, cheat_key.node_id).slashed > 0
    assert node_standing(led, honest_key.node_id).slashed == 0


def test_the_ledger_checks_every_position_of_a_steered_answer(greedy: Job, tmp_path: Path) -> None:
    """Review: the ledger's audit level sampled the job's steps, and a generate job has one (the
    model): settlement checked only the last position, and an answer with one token the node chose
    (the rest generated on from it, every later record consistent) was accepted and paid. The
    audit level now samples generated positions: every one for this new node."""
    led = new_ledger(tmp_path / "ledger.db", unbonding_seconds=0)
    key = generate_key()
    join(led, key, 100)
    post(led, greedy.job_id)
    cheater = _Cheater(greedy, key, tmp_path, random.Random(7))
    trace, predicted = cheater.steered(cheater.honest["tokens"][0].tolist(), greedy.policy.tolerance_for(0))
    assert predicted == 1.0 and trace["tokens"][0].tolist() != cheater.honest["tokens"][0].tolist()
    settled = verify_and_settle(cheater.seal(trace), job=greedy, ledger=led, writer=led.operator_key())
    assert settled.samples_in_force == greedy.generate.max_new_tokens - 1  # type: ignore[union-attr]
    assert settled.verdict.status == "reject" and "slash" in [k for _, k in settled.appended]
    assert node_standing(led, key.node_id).slashed > 0


def _bigram_model(path: Path, vocab: int = 64, dim: int = 16) -> None:
    """A decoder without a KV cache: input_ids -> logits (an embedding and an output head)."""
    rng = np.random.default_rng(4)
    embed = numpy_helper.from_array(rng.standard_normal((vocab, dim)).astype(np.float32), "embed")
    head = numpy_helper.from_array((rng.standard_normal((dim, vocab)) * 3).astype(np.float32), "head")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["embed", "input_ids"], ["hidden"]),
         helper.make_node("MatMul", ["hidden", "head"], ["logits"])],
        "bigram",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "sequence", vocab])],
        [embed, head],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_a_model_without_a_kv_cache_generates_too(tmp_path: Path) -> None:
    _bigram_model(tmp_path / "bigram.onnx")
    (tmp_path / "p.json").write_text('{"input_ids": [[1, 2, 3]]}')
    job = new_generate_job(tmp_path / "bigram.onnx", tmp_path / "p.json", tmp_path / "job.json", max_new_tokens=12,
                           stop_tokens=(63,))  # fmt: skip
    assert job.generate is not None and job.generate.layout.past == ()
    key = generate_key()
    bundle = Worker(key).prove(load_job(tmp_path / "job.json"), out=tmp_path / "b.vmb").bundle
    assert verify(bundle, job=job, node_key=key.public).status == "accept"


def test_a_tokenizer_is_pinned_and_decodes_the_answer(tmp_path: Path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {f"w{i}": i for i in range(256)}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = Whitespace()  # type: ignore[assignment]
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "p.json").write_text('{"text": "w5 w17 w99 w3"}')
    assert _cli("keys", "new", "-o", "node.key", cwd=tmp_path).returncode == 0
    no_tokenizer = _cli("job", "new", LM, "--mode", "generate", "--prompt", "p.json", "--max-new-tokens", "8", "-o",
                        "j.json", cwd=tmp_path)  # fmt: skip
    assert no_tokenizer.returncode == 3 and "--tokenizer" in no_tokenizer.stderr
    made = _cli("job", "new", LM, "--mode", "generate", "--prompt", "p.json", "--max-new-tokens", "8", "--tokenizer",
                "tokenizer.json", "-o", "j.json", cwd=tmp_path)  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert _cli("prove", "j.json", "--key", "node.key", "-o", "g.vmb", cwd=tmp_path).returncode == 0
    shown = _cli("outputs", "g.vmb", "--job", "j.json", "--node-key", "node.key.pub", "--json", cwd=tmp_path)
    doc: dict[str, Any] = json.loads(shown.stdout)
    assert doc["text"] == " ".join(f"w{t}" for t in doc["token_ids"])
    # The pinned tokenizer swapped after the fact: refused (exit 3), never a wrong text.
    (tmp_path / "j.files" / "tokenizer.json").write_text((tmp_path / "tokenizer.json").read_text().replace("w1", "x1"))
    swapped = _cli("outputs", "g.vmb", "--job", "j.json", "--node-key", "node.key.pub", cwd=tmp_path)
    assert swapped.returncode == 3 and "tokenizer" in swapped.stderr


def test_bad_models_prompts_and_options_are_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "p.json").write_text('{"input_ids": [[1, 2, 3]]}')
    cases = [  # (arguments, exit code: 2 usage, 3 invalid input, what the one line says)
        (["job", "new", FIXTURES / "mlp.onnx", "--mode", "generate", "--prompt", "p.json", "--max-new-tokens", "4"],
         3, "not a decoder model"),
        (["job", "new", LM, "--mode", "generate", "--max-new-tokens", "4"], 2, "--prompt"),
        (["job", "new", LM, "--mode", "generate", "--prompt", "p.json"], 2, "--max-new-tokens"),
        (["job", "new", LM, "--prompt", "p.json", "--input", "p.json"], 2, "--mode generate"),
        (["job", "new", LM, "--mode", "generate", "--prompt", "p.json", "--max-new-tokens", "4", "--sampling",
          "temperature=-1"], 3, "temperature"),
        (["job", "new", LM, "--mode", "generate", "--prompt", "p.json", "--max-new-tokens", "600"], 3, "does not run"),
    ]  # fmt: skip
    for args, code, expected in cases:
        done = _cli(*args, "-o", "j.json", cwd=tmp_path)
        assert done.returncode == code, (args, done.stdout, done.stderr)
        assert expected in done.stderr and "Traceback" not in done.stderr, done.stderr
    for prompt in ('{"input_ids": [[1, 2, 300]]}', '{"input_ids": [[]]}', '{"input_ids": "x"}', "[", '{"a": 1}'):
        (tmp_path / "bad.json").write_text(prompt)
        done = _cli("job", "new", LM, "--mode", "generate", "--prompt", "bad.json", "--max-new-tokens", "4", "-o",
                    "j.json", cwd=tmp_path)  # fmt: skip
        assert done.returncode == 3 and "Traceback" not in done.stderr, (prompt, done.stderr)


def test_position_checks_allow_a_near_tie_and_nothing_more(greedy: Job) -> None:
    """The runner-up at a near-tie is allowed; the same swap where the margin is decisive is not."""
    spec = greedy.generate
    assert spec is not None
    tol = greedy.policy.tolerance_for(0)
    matrix = sketch_matrix(greedy.nonce, spec.layout.vocab, spec.sketch)
    logits = np.linspace(-3, 3, spec.layout.vocab).astype(np.float32)
    tied = logits.copy()
    tied[-2] = tied[-1] - near_tie(tol, tied) / 2
    for row, runner_up_ok in ((tied, True), (logits, False)):
        order = np.argsort(-row, kind="stable")[: spec.top_k]
        problem = position_problem(spec, tol, greedy.nonce, 0, row, int(order[1]), row[order], order.astype(np.int64),
                                   row @ matrix, matrix)  # fmt: skip
        assert (problem is None) == runner_up_ok, problem


def test_calibrate_measures_the_decode_against_prefill_spread_and_the_job_pins_it(tmp_path: Path) -> None:
    done = _cli("calibrate", LM, "--prompt", PROMPT, "--max-new-tokens", "16", "-o", "lm.tol.json", "--json",
                cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    step = json.loads(done.stdout)["steps"][0]
    honest = float(step["honest_max"]["rel_frobenius"])
    assert honest < float(step["tolerance"]["max_rel_frobenius"]) < float(step["cheat_min"]["rel_frobenius"])
    made = _cli("job", "new", LM, "--mode", "generate", "--prompt", PROMPT, "--max-new-tokens", "16", "--tolerance",
                "lm.tol.json", "-o", "job.json", cwd=tmp_path)  # fmt: skip
    assert made.returncode == 0, made.stderr
    job = load_job(tmp_path / "job.json")
    assert job.policy.tolerance.max_rel_frobenius == float(step["tolerance"]["max_rel_frobenius"])
    key = generate_key()
    bundle = Worker(key, threads=1).prove(job, out=tmp_path / "g.vmb").bundle
    assert verify(bundle, job=job, node_key=key.public).status == "accept"
    # A profile of another model is refused.
    _bigram_model(tmp_path / "bigram.onnx")
    other = _cli("job", "new", tmp_path / "bigram.onnx", "--mode", "generate", "--prompt", PROMPT, "--max-new-tokens",
                 "4", "--tolerance", "lm.tol.json", "-o", "j2.json", cwd=tmp_path)  # fmt: skip
    assert other.returncode == 3 and "not calibrated for this model" in other.stderr


def test_a_model_whose_decode_differs_from_one_pass_is_never_signed(tmp_path: Path) -> None:
    """A hostile owner's model that shifts its logits by the sequence length: the worker's decode
    (one length per step) and the verifier's one pass (one length for all) disagree, and the
    verifier's evidence would slash an honest node. The worker re-checks its answer with the
    verifier's pass before signing and refuses (exit 3): nothing is signed, nobody is slashed."""
    vocab, dim = 64, 16
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.standard_normal((vocab, dim)).astype(np.float32), "embed"),
             numpy_helper.from_array((rng.standard_normal((dim, vocab)) * 3).astype(np.float32), "head"),
             numpy_helper.from_array(np.linspace(-4, 4, vocab).astype(np.float32), "shift"),
             numpy_helper.from_array(np.array([1], dtype=np.int64), "one")]  # fmt: skip
    graph = helper.make_graph(
        [helper.make_node("Gather", ["embed", "input_ids"], ["hidden"]),
         helper.make_node("MatMul", ["hidden", "head"], ["base"]),
         helper.make_node("Shape", ["input_ids"], ["shape"]),
         helper.make_node("Gather", ["shape", "one"], ["length"]),
         helper.make_node("Cast", ["length"], ["length_f"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["length_f", "shift"], ["bias"]),
         helper.make_node("Add", ["base", "bias"], ["logits"])],
        "hostile", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "sequence", vocab])], inits,
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "hostile.onnx"))
    (tmp_path / "p.json").write_text('{"input_ids": [[1, 2, 3]]}')
    assert _cli("keys", "new", "-o", "node.key", cwd=tmp_path).returncode == 0
    made = _cli("job", "new", "hostile.onnx", "--mode", "generate", "--prompt", "p.json", "--max-new-tokens", "8",
                "-o", "job.json", cwd=tmp_path)  # fmt: skip
    assert made.returncode == 0, made.stderr
    proved = _cli("prove", "job.json", "--key", "node.key", "-o", "g.vmb", cwd=tmp_path)
    assert proved.returncode == 3 and "not signed" in proved.stderr, proved.stderr
    assert not (tmp_path / "g.vmb").exists()
    # Without the check, the verifier would reject the honest answer with evidence that proves "fraud".
    key = generate_key()
    job = load_job(tmp_path / "job.json")
    bundle = Worker(key, self_check=False).prove(job, out=tmp_path / "unchecked.vmb").bundle
    assert verify(bundle, job=job, node_key=key.public).status == "reject"


def test_the_vectorized_shortcut_never_passes_a_record_the_full_check_refuses(greedy: Job) -> None:
    """``check_positions`` skips ``position_problem`` only where a vectorized pass finds the record
    inside half of every bound: over records perturbed at every scale, a record that shortcut
    passes must pass the full check too (the shortcut can only send work to the full check)."""
    from verimesh.spot.generate import _clearly_fine

    spec = greedy.generate
    assert spec is not None
    cheater = _Cheater(greedy, generate_key(), greedy.base_dir, random.Random(0))
    logits = np.stack(cheater.logits)
    tol = greedy.policy.tolerance_for(0)
    matrix = sketch_matrix(greedy.nonce, spec.layout.vocab, spec.sketch)
    rng = np.random.default_rng(11)
    count = logits.shape[0]
    shortcut = full = 0
    for trial in range(300):
        records = {k: v.copy() for k, v in cheater.honest.items()}
        scale = 10.0 ** rng.uniform(-9, 0)
        what = trial % 4
        if what == 0:
            records["topk_values"] += (rng.standard_normal(records["topk_values"].shape) * scale).astype(np.float32)
        elif what == 1:
            records["sketch"] += (rng.standard_normal(records["sketch"].shape) * scale).astype(np.float32)
        elif what == 2:
            t = int(rng.integers(count))
            records["topk_indices"][t, int(rng.integers(spec.top_k))] = int(rng.integers(spec.layout.vocab))
        else:
            t = int(rng.integers(count))
            records["tokens"][0, t] = int(rng.integers(spec.layout.vocab))
        fine = _clearly_fine(spec, tol, logits, records, list(range(count)), matrix)
        for t in range(count):
            problem = position_problem(spec, tol, greedy.nonce, t, logits[t], int(records["tokens"][0, t]),
                                       records["topk_values"][t], records["topk_indices"][t], records["sketch"][t],
                                       matrix)  # fmt: skip
            shortcut += bool(fine[t])
            full += problem is None
            assert not (fine[t] and problem is not None), (trial, t, problem)
    assert shortcut > count * 100  # the honest-looking records do take the shortcut


def _masked_lm(path: Path, mask_value: float) -> None:
    """fixtures/lm.onnx with its last token masked out of the logits (``logits = raw + mask``)."""
    model = onnx.load(str(LM))
    for node in model.graph.node:
        node.output[:] = ["raw_logits" if o == "logits" else o for o in node.output]
    mask = np.zeros(256, dtype=np.float32)
    mask[255] = mask_value
    model.graph.initializer.append(numpy_helper.from_array(mask, "mask"))
    model.graph.node.append(helper.make_node("Add", ["raw_logits", "mask"], ["logits"]))
    onnx.save(model, str(path))


@pytest.mark.parametrize("mask_value", [-np.inf, -1e4, -1e9])
def test_a_masked_vocabulary_leaves_every_check_in_force(tmp_path: Path, mask_value: float) -> None:
    """Masked tokens (-inf, or a large negative logit) neither disable the checks nor widen the
    near-tie margin: the honest answer passes, an answer steered to unlikely tokens does not."""
    _masked_lm(tmp_path / "masked.onnx", mask_value)
    job = new_generate_job(tmp_path / "masked.onnx", PROMPT, tmp_path / "job.json", max_new_tokens=16)
    key = generate_key()
    honest = Worker(key).prove(job, out=tmp_path / "honest.vmb").bundle
    assert verify(honest, job=job, node_key=key.public).status == "accept"
    cheater = _Cheater(job, key, tmp_path, random.Random(0))
    steered = {k: v.copy() for k, v in cheater.honest.items()}
    row = cheater.logits[0]
    steered["tokens"][0, 0] = int(np.argsort(row)[1])  # an unlikely (but not masked) token at position 0
    verdict = verify(cheater.seal(steered), job=job, node_key=key.public)
    assert verdict.status == "reject" and "position 0" in verdict.reason
    masked = {k: v.copy() for k, v in cheater.honest.items()}
    masked["tokens"][0, 0] = 255
    assert verify(cheater.seal(masked), job=job, node_key=key.public).status == "reject"


def test_a_top_p_cut_between_decode_and_prefill_does_not_reject_an_honest_answer(tmp_path: Path) -> None:
    """Where the mass at the top-p cut sits within the margin of top_p, noise can move the cut by a
    token; the verifier allows the draw with the cut one token either way there. Every top_p
    just above or below a position's cumulative mass, on an honest answer: accepted."""
    from verimesh.jobs.generation import _cumulative

    base = new_generate_job(LM, PROMPT, tmp_path / "base.json", max_new_tokens=8,
                            sampling=parse_sampling("temperature=1.0,top_p=0.9"))  # fmt: skip
    cheater = _Cheater(base, generate_key(), tmp_path, random.Random(0))
    _, cumulative = _cumulative(cheater.logits[0], base.generate.sampling)  # type: ignore[union-attr]
    key = generate_key()
    for i, cut in enumerate(cumulative[1:6]):
        for top_p in (float(cut) - 1e-7, float(cut) + 1e-7):
            job = new_generate_job(LM, PROMPT, tmp_path / f"j{i}-{top_p}.json", max_new_tokens=8,
                                   sampling=parse_sampling(f"temperature=1.0,top_p={top_p!r}"))  # fmt: skip
            bundle = Worker(key).prove(job, out=tmp_path / f"b{i}-{top_p}.vmb").bundle
            assert verify(bundle, job=job, node_key=key.public).status == "accept", top_p


def test_a_job_whose_layout_is_not_its_models_graph_is_refused_by_the_worker(tmp_path: Path) -> None:
    from verimesh.jobs.job import compute_job_id

    job_path = tmp_path / "job.json"
    new_generate_job(LM, PROMPT, job_path, max_new_tokens=8)
    doc = json.loads(job_path.read_text())
    past = doc["generate"]["layout"]["past"]
    doc["generate"]["layout"]["past"] = past[::-1]  # layer 1's cache fed to layer 0
    doc.pop("job_id")
    doc["job_id"] = compute_job_id(doc)
    job_path.write_text(json.dumps(doc))
    assert _cli("keys", "new", "-o", "node.key", cwd=tmp_path).returncode == 0
    proved = _cli("prove", "job.json", "--key", "node.key", "-o", "g.vmb", cwd=tmp_path)
    assert proved.returncode == 3 and "layout" in proved.stderr, proved.stderr


def test_a_tokenizer_that_cannot_encode_the_prompt_is_one_line(tmp_path: Path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tokenizer = Tokenizer(WordLevel({"w1": 1, "w2": 2}, unk_token="[UNK]"))  # its unknown token is not in it
    tokenizer.pre_tokenizer = Whitespace()  # type: ignore[assignment]
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "p.json").write_text('{"text": "w1 hello w2"}')
    done = _cli("job", "new", LM, "--mode", "generate", "--prompt", "p.json", "--max-new-tokens", "4", "--tokenizer",
                "tokenizer.json", "-o", "j.json", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 3 and "cannot encode" in done.stderr and "Traceback" not in done.stderr, done.stderr
