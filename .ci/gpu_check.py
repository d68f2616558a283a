"""GPU check (`make gpu-check`): the CUDA path measured on a machine with a GPU, one JSON report.

Downloads nothing; finishes in a few minutes (`--budget` seconds, then remaining models are
skipped and the report says so). Two modes, chosen by what the machine has:

onnxruntime-gpu (the CUDA execution provider is available)
    For each fixture (mlp, rescnn, transformer) and a ResNet-50 exported here (with torch, when
    importable): `verimesh job new` under fp32-strict and tf32, `verimesh prove --device cuda`,
    `verimesh verify` on the CPU with every step sampled; the honest GPU-vs-CPU spread per step
    (CUDA with TF32 off and on, each step run from the CPU reference inputs, against the CPU
    reference outputs, beside the job's tolerance); whether a worker that runs TF32 while the job
    says fp32-strict is caught; and `verimesh calibrate`, whose honest variations then include
    the GPU.

torch-estimate (PyTorch sees a GPU, onnxruntime is the CPU build)
    The fixtures' computations rebuilt in PyTorch (the same modules and seeds as
    fixtures/make_fixtures.py; the CPU run is checked against the committed ONNX first), run on
    CUDA with TF32 off and on, against CPU onnxruntime on the whole model. An estimate of the
    spread onnxruntime-gpu would show, not a measurement of verimesh's CUDA path.

`--simulate` runs either mode with the CPU standing in for the GPU, so that the script itself is
tested on machines without one (tests/integration/test_gpu_check.py); its numbers say nothing
about GPUs and the report is marked so.

Exit status: 0 the report was written; 4 no GPU here (and no --simulate): the report says so.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runs from a checkout without `pip install -e`, given the dependencies

import numpy as np  # noqa: E402

FIXTURES = ("mlp", "rescnn", "transformer")
REPORT_TYPE = "verimesh/gpu-check"


def _has_cuda_provider() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def _torch() -> Any | None:
    try:
        import torch
    except Exception:  # noqa: BLE001 - any import failure means "no torch here"
        return None
    return torch


def machine() -> dict[str, Any]:
    import onnxruntime as ort

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(),
    }
    torch = _torch()
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_cuda"] = bool(torch.cuda.is_available())
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20, check=False,
            )  # fmt: skip
            info["nvidia_smi"] = out.stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            info["nvidia_smi"] = f"failed: {exc}"
    return info


def cli(*args: str, timeout: float = 300) -> tuple[int, dict[str, Any], float]:
    """Run `verimesh ARGS --json` as a user would; exit code, its JSON object, wall seconds."""
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "verimesh", *args, "--json"], capture_output=True, text=True, timeout=timeout,
        cwd=ROOT, check=False,
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    try:
        doc = json.loads(proc.stdout) if proc.stdout.strip() else {}
    except json.JSONDecodeError:
        doc = {"stdout": proc.stdout[-2000:]}
    if proc.returncode not in (0, 1):
        doc.setdefault("stderr", proc.stderr.strip()[-2000:])
    return proc.returncode, doc, elapsed


def models(args: argparse.Namespace, work: Path, notes: list[str]) -> list[tuple[str, Path, Path]]:
    chosen = [(n, ROOT / "fixtures" / f"{n}.onnx", ROOT / "fixtures" / f"{n}.input.npy") for n in args.models]
    if "resnet50" not in args.models_extra:
        return chosen
    existing = args.resnet50
    if existing is None and _torch() is not None:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "fixtures" / "make_fixtures.py"), "--resnet50", str(work)],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        if proc.returncode == 0:
            existing = work / "resnet50.onnx"
        else:
            notes.append(f"ResNet-50 not exported: {proc.stderr.strip().splitlines()[-1:]}")
    elif existing is None:
        notes.append("ResNet-50 not exported: torch is not installed here (pass --resnet50 FILE to use one)")
    if existing is not None:
        chosen.append(("resnet50", existing, existing.with_name("resnet50.input.npy")))
    return chosen


def _step_spread(job: Any, reference: dict[str, np.ndarray], runner: Any) -> list[dict[str, Any]]:
    """Each step run by ``runner`` from the reference inputs, against the reference outputs."""
    from verimesh.assurance.calibrate import spread_metrics

    rows = []
    final = set(job.output_names)
    for step in job.steps:
        got = runner.run(step.digest, job.read_step_model(step.index), {n: reference[n] for n in step.inputs},
                         step.outputs)  # fmt: skip
        worst = {"rel_frobenius": 0.0, "max_abs_diff": 0.0}
        for name in step.outputs:
            m = spread_metrics(name, got[name], reference[name], discrete=name in final)
            worst = {k: max(worst[k], m[k]) for k in worst}
        tol = job.policy.tolerance_for(step.index)
        rows.append({"step": step.index, **worst, "tolerance_rel_frobenius": tol.max_rel_frobenius,
                     "within": worst["rel_frobenius"] <= tol.max_rel_frobenius})  # fmt: skip
    return rows


def check_onnxruntime(name: str, model: Path, inp: Path, work: Path, gpu: str) -> dict[str, Any]:
    from verimesh.assurance.calibrate import calibrate
    from verimesh.core.tensors import load_input_file
    from verimesh.errors import VerimeshError
    from verimesh.jobs.job import load_job
    from verimesh.jobs.runtime import StepRunner
    from verimesh.signing.keys import load_secret_key
    from verimesh.spot.spotcheck import run_steps
    from verimesh.workflows import seal_trace, verify

    out: dict[str, Any] = {"model": name, "precisions": {}}
    key_file = work / "node.key"
    if not key_file.exists():
        cli("keys", "new", "-o", str(key_file))
    pub = key_file.with_name(key_file.name + ".pub")
    for precision in ("fp32-strict", "tf32"):
        job_file = work / f"{name}-{precision}.json"
        code, doc, _ = cli("job", "new", str(model), "--input", str(inp), "--precision", precision, "-o",
                           str(job_file), "--force")  # fmt: skip
        if code:
            out["precisions"][precision] = {"error": doc}
            continue
        row: dict[str, Any] = {"steps": doc.get("steps")}
        for device in dict.fromkeys((gpu, "cpu")):
            bundle = work / f"{name}-{precision}-{device}.vmb"
            times = []
            for _ in range(2):  # the first run includes session creation
                code, doc, wall = cli("prove", str(job_file), "--key", str(key_file), "-o", str(bundle), "--force",
                                      "--device", device)  # fmt: skip
                times.append(doc.get("seconds", wall) if code == 0 else None)
            proved = {"exit": code, "seconds_cold": times[0], "seconds_warm": times[1], "provider": doc.get("provider")}
            row[f"prove_{device}"] = proved if code == 0 else {**proved, "error": doc}
            code, doc, wall = cli("verify", str(bundle), "--job", str(job_file), "--node-key", str(pub), "--samples",
                                  "all")  # fmt: skip
            row[f"verify_cpu_of_{device}"] = {"exit": code, "accepted": code == 0, "process_seconds": wall,
                                              "reason": doc.get("reason")}  # fmt: skip
        out["precisions"][precision] = row
    strict = work / f"{name}-fp32-strict.json"
    if not strict.exists():
        return out
    job = load_job(strict)
    cpu = StepRunner(device="cpu", precision="fp32-strict", optimization=job.policy.optimization)
    reference = run_steps(job, None, job.read_input(), cpu)
    runners = {
        "tf32_off": StepRunner(device=gpu, precision="fp32-strict", optimization=job.policy.optimization),
        "tf32_on": StepRunner(device=gpu, precision="tf32", optimization=job.policy.optimization),
    }
    out["spread"] = {label: _step_spread(job, reference, r) for label, r in runners.items()}
    # A worker that runs TF32 and says fp32-strict (its statement names the job's precision):
    # every step sampled.
    cheat = work / f"{name}-tf32-under-strict.vmb"
    trace = run_steps(job, None, job.read_input(), runners["tf32_on"])
    key = load_secret_key(key_file)
    seal_trace(job, trace, key=key, runner=runners["tf32_off"], out=cheat)
    verdict = verify(cheat, job=job, node_key=key.public, samples="all")
    out["tf32_under_fp32_strict"] = {"caught": not verdict.accepted, "reason": verdict.reason}
    try:
        profile = calibrate(model, load_input_file(inp, list(job.model_inputs)))
        out["calibration"] = {
            "honest_variations": list(profile.honest),
            "min_margin": min(s.margin for s in profile.steps),
            "max_honest_rel_frobenius": max(s.honest_rel_frobenius for s in profile.steps),
        }
    except VerimeshError as exc:
        out["calibration"] = {"error": str(exc)}
    return out


def _fixture_modules(torch: Any) -> dict[str, Any]:
    """The fixtures' torch modules with the weights fixtures/make_fixtures.py gave them."""
    spec = importlib.util.spec_from_file_location("make_fixtures", ROOT / "fixtures" / "make_fixtures.py")
    assert spec and spec.loader
    mf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mf)
    torch.manual_seed(0)  # the order of make_fixtures.main(): one seed, then mlp, rescnn, transformer
    built = {"mlp": mf.MLP()}
    cnn = mf.ResCNN()
    mf._randomize_bn(cnn)
    built["rescnn"] = cnn
    built["transformer"] = mf.TransformerBlock()
    torch.manual_seed(0)
    built["resnet50"] = mf._resnet50()
    return {k: m.eval() for k, m in built.items()}


def check_torch(name: str, model: Path, inp: Path, gpu: str, modules: dict[str, Any]) -> dict[str, Any]:
    import torch

    from verimesh.assurance.calibrate import spread_metrics
    from verimesh.jobs.plan import load_model, model_io
    from verimesh.jobs.runtime import StepRunner
    from verimesh.jobs.tolerance import DEFAULT_TOLERANCES

    loaded, data = load_model(model)
    inputs, outputs = model_io(loaded)
    x = np.load(inp)
    runner = StepRunner(device="cpu", precision="fp32-strict", optimization="extended")
    in_name, out_name = inputs[0].name, outputs[0].name
    ort_out = runner.run(name, data, {in_name: x}, [out_name])[out_name]
    module = modules[name]
    threshold = DEFAULT_TOLERANCES["fp32-strict"].max_rel_frobenius
    out: dict[str, Any] = {"model": name, "tolerance_rel_frobenius": threshold}
    with torch.no_grad():
        base = module(torch.from_numpy(x)).numpy()
        out["torch_cpu_vs_onnxruntime_cpu"] = spread_metrics("logits", base, ort_out, discrete=False)
        if out["torch_cpu_vs_onnxruntime_cpu"]["rel_frobenius"] > threshold:
            out["error"] = "the torch module does not reproduce the ONNX model on the CPU; no estimate"
            return out
        dev_module = module.to(gpu)
        for label, tf32 in (("tf32_off", False), ("tf32_on", True)):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
            got = dev_module(torch.from_numpy(x).to(gpu)).cpu().numpy()
            m = spread_metrics("logits", got, ort_out, discrete=False)
            out[label] = {**m, "within": m["rel_frobenius"] <= threshold}
        module.to("cpu")
    out["tf32_under_fp32_strict"] = {"caught_estimate": not out["tf32_on"]["within"]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, default=ROOT / "bench-out" / "gpu-check.json", help="report to write")
    parser.add_argument("--mode", choices=("auto", "onnxruntime-gpu", "torch-estimate"), default="auto")
    parser.add_argument("--models", nargs="+", choices=FIXTURES, default=list(FIXTURES))
    parser.add_argument("--no-resnet50", dest="models_extra", action="store_const", const=(), default=("resnet50",))
    parser.add_argument("--resnet50", type=Path, help="an exported resnet50.onnx (beside resnet50.input.npy)")
    parser.add_argument("--budget", type=float, default=200.0, help="seconds; later models are skipped after")
    parser.add_argument("--simulate", action="store_true", help="the CPU stands in for the GPU (tests only)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    torch = _torch()
    has_ort_gpu = _has_cuda_provider()
    has_torch_gpu = bool(torch is not None and torch.cuda.is_available())
    mode = args.mode
    if mode == "auto":
        mode = "onnxruntime-gpu" if has_ort_gpu or (args.simulate and not has_torch_gpu) else "torch-estimate"
    report: dict[str, Any] = {"type": REPORT_TYPE, "version": 1, "mode": mode, "simulated": args.simulate,
                              "machine": machine(), "models": [], "notes": []}  # fmt: skip
    available = has_ort_gpu if mode == "onnxruntime-gpu" else has_torch_gpu
    if not available and not args.simulate:
        report["mode"] = "none"
        report["notes"].append(
            "no GPU here: onnxruntime has no CUDA provider and PyTorch sees no CUDA device; nothing was measured"
        )
        _write(args.json, report)
        print(f"gpu-check: no GPU here; wrote {args.json}", file=sys.stderr)
        return 4
    if args.simulate:
        report["notes"].append("SIMULATED: the CPU stood in for the GPU; these numbers say nothing about GPUs")
    gpu = "cpu" if args.simulate else "cuda"
    if mode == "torch-estimate":
        report["notes"].append(
            "ESTIMATE: onnxruntime here is the CPU build; the fixtures' computations ran in PyTorch on the GPU"
        )
        if torch is None:
            report["notes"].append("torch-estimate needs torch")
            _write(args.json, report)
            return 4
        modules = _fixture_modules(torch)
    with tempfile.TemporaryDirectory(prefix="verimesh-gpu-check-") as tmp:
        work = Path(tmp)
        for name, model, inp in models(args, work, report["notes"]):
            if time.perf_counter() - started > args.budget:
                report["notes"].append(f"{name} skipped: the {args.budget:g} s budget was spent")
                continue
            print(f"gpu-check: {name} ({mode})", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            row = (check_onnxruntime(name, model, inp, work, gpu) if mode == "onnxruntime-gpu"
                   else check_torch(name, model, inp, gpu, modules))  # fmt: skip
            row["seconds"] = round(time.perf_counter() - t0, 2)
            report["models"].append(row)
    report["seconds"] = round(time.perf_counter() - started, 2)
    _write(args.json, report)
    print(summary(report))
    return 0


def summary(report: dict[str, Any]) -> str:
    lines = [f"gpu-check: mode {report['mode']}{' (simulated)' if report['simulated'] else ''}, "
             f"{report['seconds']} s"]  # fmt: skip
    for row in report["models"]:
        if "spread" in row:
            off = max((s["rel_frobenius"] for s in row["spread"]["tf32_off"]), default=0.0)
            on = max((s["rel_frobenius"] for s in row["spread"]["tf32_on"]), default=0.0)
            caught = row["tf32_under_fp32_strict"]["caught"]
        elif "tf32_off" in row:
            off, on = row["tf32_off"]["rel_frobenius"], row["tf32_on"]["rel_frobenius"]
            caught = row["tf32_under_fp32_strict"]["caught_estimate"]
        else:
            lines.append(f"  {row['model']}: {row.get('error')}")
            continue
        lines.append(f"  {row['model']:<12} spread tf32 off {off:.3g}  on {on:.3g}  TF32 under fp32-strict caught: "
                     f"{caught}")  # fmt: skip
    lines += [f"  note: {n}" for n in report["notes"]]
    return "\n".join(lines)


def _write(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=float) + "\n")


if __name__ == "__main__":
    sys.exit(main())
