"""The layer contract of the verimesh package, checked over every import (``make lint``).

A module may import its own layer and the layers below it, never one above (docs/design.md §2).
Layers in one row of ``LAYERS`` are siblings that may not import each other. Every form of
import is seen: top-level and inside functions, ``from verimesh import x`` (resolved to the
submodule it names), relative imports, and ``importlib.import_module`` / ``__import__`` calls,
whose argument must be a string literal (a computed module name cannot be checked and is
refused). Heavy third-party backends have a short list of modules allowed to import them.

    python tools/check_layers.py [PACKAGE_DIR]      # exit 0 clean, 1 with one line per violation
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Lowest first. Each entry: (layer name, module prefixes). Prefixes in one entry are siblings.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("errors", ("verimesh.errors",)),
    ("core", ("verimesh.core",)),
    ("signing", ("verimesh.signing",)),
    ("jobs", ("verimesh.jobs",)),
    ("mechanisms", ("verimesh.spot", "verimesh.zk", "verimesh.ledger")),
    ("workflows", ("verimesh.workflows",)),
    ("subtasks", ("verimesh.subtasks",)),
    ("settlement", ("verimesh.settlement",)),
    ("fleet", ("verimesh.fleet",)),
    ("mesh", ("verimesh.mesh",)),
    ("assurance", ("verimesh.assurance",)),
    ("cli", ("verimesh.cli",)),
    ("facade", ("verimesh.__main__", "verimesh")),
)
# Names any layer may import from the package root (constants, no imports behind them).
ROOT_CONSTANTS = frozenset({"__version__"})
# Modules whose computed imports are checked another way (the facade's export table, above).
COMPUTED_IMPORTS_CHECKED = frozenset({"verimesh"})
# Third-party backends and the only modules that may import them.
RESTRICTED: dict[str, tuple[str, ...]] = {
    "onnxruntime": ("verimesh.jobs.runtime", "verimesh.assurance.bench"),  # bench: the plain baseline
    "ezkl": ("verimesh.zk",),
    "torch": (),
    "starlette": ("verimesh.mesh",),
    "uvicorn": ("verimesh.mesh",),
    "httpx": ("verimesh.mesh",),
    "ray": ("verimesh.fleet",),
}


@dataclass(frozen=True)
class Violation:
    path: Path
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


def _owner(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer_of(module: str) -> tuple[int, str] | None:
    """(rank, sibling prefix) of a verimesh module; the longest matching prefix wins."""
    best: tuple[int, str] | None = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if _owner(module, prefix) and (best is None or len(prefix) > len(best[1])):
                best = (rank, prefix)
    return best


def module_name(path: Path, package_dir: Path) -> str:
    rel = path.relative_to(package_dir.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> Iterator[tuple[int, str | None]]:
    """(line, imported module) for every import in the tree; None for an uncheckable one."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                up = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*up, base] if base else up)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in known:
                    yield node.lineno, sub
                elif base == "verimesh" and alias.name in ROOT_CONSTANTS:
                    continue
                else:
                    yield node.lineno, base
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in ("import_module", "__import__"):
                arg = node.args[0] if node.args else None
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    yield node.lineno, arg.value
                else:
                    yield node.lineno, None
        elif isinstance(node, ast.Dict) and module == "verimesh":
            # The facade's lazy export table maps names to module paths loaded by import_module.
            for value in node.values:
                if isinstance(value, ast.Constant) and isinstance(value.value, str) and value.value in known:
                    yield node.lineno, value.value


def check(package_dir: Path) -> list[Violation]:
    files = sorted(p for p in package_dir.rglob("*.py"))
    known = {module_name(p, package_dir) for p in files}
    problems: list[Violation] = []
    for path in files:
        module = module_name(path, package_dir)
        mine = layer_of(module)
        if mine is None:
            problems.append(Violation(path, 1, f"{module} belongs to no layer (add it to LAYERS)"))
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for line, target in _imports(tree, module, path.name == "__init__.py", known):
            if target is None:
                if module in COMPUTED_IMPORTS_CHECKED:
                    continue
                problems.append(
                    Violation(path, line, "import_module/__import__ with a computed name cannot be checked")
                )
                continue
            top = target.split(".")[0]
            if top in RESTRICTED and not any(_owner(module, p) for p in RESTRICTED[top]):
                allowed = ", ".join(RESTRICTED[top]) or "no module"
                problems.append(Violation(path, line, f"{module} imports {top}; only {allowed} may"))
            if top != "verimesh":
                continue
            theirs = layer_of(target)
            if theirs is None:
                continue
            if theirs[0] > mine[0]:
                where = f"{module} ({LAYERS[mine[0]][0]})"
                problems.append(
                    Violation(path, line, f"{where} imports {target} from the higher layer {LAYERS[theirs[0]][0]}")
                )
            elif theirs[0] == mine[0] and theirs[1] != mine[1] and mine[0] != len(LAYERS) - 1:
                problems.append(
                    Violation(path, line, f"{module} imports its sibling layer {theirs[1]} ({LAYERS[mine[0]][0]})")
                )
    return problems


def main(argv: list[str]) -> int:
    package_dir = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[1] / "verimesh"
    problems = check(package_dir)
    for problem in problems:
        print(problem)
    if problems:
        print(f"layer contract: {len(problems)} violation(s)", file=sys.stderr)
        return 1
    print(f"layer contract: {sum(1 for _ in package_dir.rglob('*.py'))} modules, no violations")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
