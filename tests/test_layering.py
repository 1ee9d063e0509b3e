"""The package's layering, read from the source (no imports run): lower layers never import upper ones.

    config, presets, tokenizer   <- model <- kernels, checkpoint <- parallel, generate, data <- train
        <- quantize <- serve, compress, finetune, export, eval (never each other) <- cli

A violation here is how couplings creep back in (a model that needs the trainer, a checkpoint loader
that needs the parallel package); the rules are in docs/contributing.md.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "neoformer"

# subpackage -> subpackages it must never import (at import time or inside a function)
FEATURES = {"serve", "compress", "quantize", "finetune", "export", "eval"}  # one package per feature, above the core
FORBIDDEN = {
    "model": {"generate", "train", "parallel", "checkpoint", "cli", "data", "hf", "kernels"} | FEATURES,
    # the CPU decode kernels sit on the model (its attention hook) and below everything that uses them
    "kernels": {"generate", "train", "parallel", "checkpoint", "cli", "data", "hf"} | FEATURES,
    "checkpoint": {"train", "parallel", "generate", "cli", "data", "hf"} | FEATURES,
    "generate": {"train", "parallel", "checkpoint", "cli"} | FEATURES,
    "parallel": {"train", "generate", "cli"} | FEATURES,
    "data": {"model", "train", "generate", "parallel", "checkpoint", "cli"} | FEATURES,
    "train": {"cli"} | FEATURES,
    "hf": {"cli"} | FEATURES,
    # features build on the core and on quantize (QLoRA, serving quantized models), never on each other
    "quantize": {"cli"} | FEATURES - {"quantize"},
    "finetune": {"cli"} | FEATURES - {"finetune", "quantize"},
    "serve": {"cli"} | FEATURES - {"serve", "quantize"},
    "compress": {"cli"} | FEATURES - {"compress", "quantize"},
    "export": {"cli"} | FEATURES - {"export", "quantize"},
    "eval": {"cli"} | FEATURES - {"eval", "quantize"},
}
# The seed API keeps `model.generate(x, max_new, temp, top_k)`: that one method delegates, at call time,
# to the generation engine. It is the only upward reference allowed, and only inside a function.
ALLOWED_CALL_TIME = {("model", "generate")}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path):
    """(imported module, at_import_time) for every import of a neoformer module in ``path``."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + [node.module or ""]) if node.level else node.module
            base = base.rstrip(".")
            subs = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES]
            targets = subs if len(subs) == len(node.names) else [base, *subs]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        for target in targets:
            if target.startswith("neoformer"):
                yield target, id(node) in top_level


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _edges(import_time_only: bool) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for target, at_import in _imports(name, path):
            if target in MODULES and target != name and (at_import or not import_time_only):
                graph[name].add(target)
    return graph


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_lower_layers_never_import_upper_ones(layer):
    bad = []
    for name, path in MODULES.items():
        if _layer(name) != layer:
            continue
        for target, at_import in _imports(name, path):
            other = _layer(target)
            if other in FORBIDDEN[layer] and not ((layer, other) in ALLOWED_CALL_TIME and not at_import):
                bad.append(f"{path.relative_to(PACKAGE.parent)} imports {target}")
    assert not bad, "; ".join(bad)


def test_no_import_cycle_at_import_time():
    """Tarjan's strongly connected components over module-level imports (a package importing its own
    submodules in __init__ is not a cycle)."""
    graph = {name: {t for t in targets if not t.startswith(name + ".")} for name, targets in _edges(True).items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_imports():
    """Guard against a checker that passes because it finds nothing."""
    edges = _edges(False)
    assert "neoformer.config" in edges["neoformer.model.transformer"] | edges["neoformer.model"]
    assert "neoformer.checkpoint" in edges["neoformer.train.fit"]
    assert any(_layer(t) == "generate" for t in edges["neoformer.model.transformer"])  # the seed-API delegation
