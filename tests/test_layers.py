"""The import graph of agp/, read from the source with `ast` (docs/architecture.md).

Every package sits on a layer and imports only from layers strictly below its own (or from
itself); the applications (`commands`, `bench`, `cli`) are imported by nothing in the library;
and no two modules import each other, lazily or not.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "agp"

# package (first component under agp/) -> layer. A new package must be placed here on purpose.
LAYERS = {
    # foundation: no AGP imports beyond each other
    "": 0, "_blas": 0, "errors": 0, "config": 0, "io": 0, "runs": 0, "stages": 0, "argtypes": 0,
    "backbone": 1, "quant": 1, "energy": 1,
    "data": 2, "ptp": 2, "index": 2,
    "oracle": 3,
    "calibrate": 4,
    "heads": 5,
    "report": 6,
    "runtime": 7,
    "ane": 8,              # Core ML export of the heads and runtime pieces, the sidecar that replaces one
    "transfer": 8,         # the split: sender, wire, resumer (over ptp, quant and the runtime's greedy rule)
    "serve": 9,
    "train": 10,           # stage modules: each wires the layers below into one curriculum stage
    "commands": 11, "bench": 11, "cli": 11,   # applications
}
APPS = {"commands", "bench", "cli"}
# upward imports allowed by name: none (report/build.py reads the order from agp.stages)
ALLOWED_UPWARD: set[tuple[str, str]] = set()


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(name: str, path: Path, known: dict) -> set[str]:
    """AGP modules `name` imports anywhere in its source (function-level imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from agp.x import y` imports module agp.x.y when there is one, else names of agp.x
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def area(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_every_package_has_a_layer():
    missing = sorted({area(m) for m in modules()} - set(LAYERS))
    assert not missing, f"place {missing} in LAYERS (tests/test_layers.py) and docs/architecture.md"


def test_no_import_runs_up_the_layers():
    bad = []
    for source, targets in graph().items():
        for target in targets:
            a, b = area(source), area(target)
            if a == b or (source, target) in ALLOWED_UPWARD:
                continue
            upward = LAYERS[b] > LAYERS[a] or (LAYERS[b] == LAYERS[a] and LAYERS[a] > 0)  # foundation: shared
            if b in APPS or upward:
                bad.append(f"{source} (layer {LAYERS[a]}) imports {target} (layer {LAYERS[b]})")
    assert not bad, "\n".join(sorted(bad))


def test_no_module_pair_imports_each_other():
    edges = graph()
    pairs = sorted({tuple(sorted((a, b))) for a, targets in edges.items() for b in targets if a in edges.get(b, ())})
    assert not pairs, f"modules importing each other: {pairs}"
