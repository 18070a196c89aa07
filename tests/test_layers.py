"""The stages import each other in one direction only (../shared/DESIGN.md): no cycle, no stage
reaching above itself. Every import is counted, the ones inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "clinfuse"

# a stage may import the stages listed for it (and itself); the top-level modules compose everything
ALLOWED = {
    "errors": set(),
    "progress": set(),
    "net": set(),
    "phi": {"errors"},
    "config": {"errors"},
    "data": {"config", "errors", "phi"},
    "models": {"config", "errors"},
    "explain": {"config", "errors", "models"},
    "tracking": {"config", "errors", "phi"},
    "inference": {"config", "errors", "data", "models", "explain", "tracking"},
    "training": {"config", "errors", "data", "models", "inference", "tracking"},
    "evaluation": {"config", "errors", "data", "models", "inference"},
    "serving": {"config", "errors", "inference"},
    "pacs": {"config", "errors", "phi", "data", "inference", "tracking"},
    "server": {"config", "errors", "phi", "tracking"},
}
TOP = {"pipeline", "cli", "__init__"}
BOTTOM = {"errors", "progress", "net"}  # import nothing of clinfuse but errors; every stage may use them  # compositions: may import any stage, and no stage may import them


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports() -> dict[str, set[str]]:
    """clinfuse module -> clinfuse modules it imports (absolute names)."""
    out: dict[str, set[str]] = {}
    for f in PKG.rglob("*.py"):
        rel = f.relative_to(PKG.parent).with_suffix("")
        mod = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        pkg = mod if rel.name == "__init__" else mod.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.startswith("clinfuse"):
                    deps.add(target)
                    deps.update(f"{target}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("clinfuse"))
        out[mod] = deps
    return out


def test_every_stage_imports_only_the_stages_below_it():
    bad = []
    for mod, deps in _imports().items():
        src = _stage(mod)
        if src in TOP:
            continue
        for d in deps:
            dst = _stage(d)
            if d == "clinfuse" or dst == src or dst in BOTTOM:
                continue
            if dst == "__version__":  # the package's version string
                continue
            if dst in TOP or dst not in ALLOWED.get(src, set()):
                bad.append(f"{mod} imports {d}")
    assert not bad, "\n".join(sorted(bad))


def test_stage_graph_has_no_cycle():
    graph: dict[str, set[str]] = {}
    for mod, deps in _imports().items():
        src = _stage(mod)
        graph.setdefault(src, set()).update(_stage(d) for d in deps if _stage(d) not in (src, "__version__")
                                            and d != "clinfuse")
    seen, stack = set(), []

    def visit(n):
        if n in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
        if n in seen:
            return
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            visit(m)
        stack.pop()
        seen.add(n)

    for n in sorted(graph):
        visit(n)


def test_data_never_imports_models_and_only_two_stages_import_mlflow():
    mlflow_users = set()
    for f in PKG.rglob("*.py"):
        mod = ".".join(f.relative_to(PKG.parent).with_suffix("").parts)
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            if any(n.split(".")[0] == "mlflow" for n in names):
                mlflow_users.add(_stage(mod))
            if any(n.split(".")[0] == "captum" for n in names):
                assert _stage(mod) == "explain", f"{mod} imports captum"
    assert mlflow_users <= {"tracking", "serving", "server"}, mlflow_users  # server: it is the MLflow server
