"""The package's shape (docs/design.md): stages as folders, imports in one direction, no import circle, the solver
free of onnx, pipeline.py the only module that imports from every stage, and no pointer outside the repository."""

from __future__ import annotations

import ast
import os

PKG = os.path.join(os.path.dirname(__file__), "..", "onnxcomq")
STAGES = ("graph", "capture", "solve", "write")
# which stages a stage may import from (its own package aside); anything not listed is a wrong-way import
ALLOWED = {"graph": set(), "capture": {"graph"}, "solve": set(), "write": {"graph", "capture", "solve"}}


def modules() -> dict:
    """{dotted module name: path} of every module of the package."""
    out = {}
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), PKG)[:-3].replace(os.sep, ".")
                name = "onnxcomq" if rel == "__init__" else "onnxcomq." + rel.removesuffix(".__init__")
                out[name] = os.path.join(root, f)
    return out


def imports(name: str, path: str, known: dict) -> set:
    """The package modules that ``name`` imports anywhere in its file (module level or inside functions)."""
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def graph() -> dict:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in STAGES else None


def test_stages_are_folders():
    for s in STAGES:
        assert os.path.isfile(os.path.join(PKG, s, "__init__.py")), f"onnxcomq/{s}/ is not a package"
    assert os.path.isfile(os.path.join(PKG, "pipeline.py"))


def test_no_import_circle():
    g = graph()
    done, path = set(), []

    def visit(m):
        if m in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        path.append(m)
        for n in sorted(g[m]):
            if n != "onnxcomq" and not m.startswith(n + "."):  # (a module reaching its own package's __init__)
                visit(n)
        path.pop()
        done.add(m)

    for m in sorted(g):
        visit(m)


def test_imports_go_one_way_between_stages():
    wrong = []
    for m, deps in graph().items():
        s = stage(m)
        if s is None:
            continue
        for d in deps:
            t = stage(d)
            if t is not None and t != s and t not in ALLOWED[s]:
                wrong.append(f"{m} imports {d}")
            if t is None and d not in ("onnxcomq", "onnxcomq.errors"):
                wrong.append(f"{m} imports {d} (a stage imports only stages below it and errors)")
    assert not wrong, wrong


def test_solve_never_imports_onnx():
    for name, path in modules().items():
        if stage(name) != "solve":
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            bad = [m for m in mods if m.split(".")[0] in ("onnx", "onnxruntime", "onnx_graphsurgeon")]
            assert not bad, f"{name} imports {bad}"


def test_pipeline_is_the_only_module_importing_every_stage():
    every = [m for m, deps in graph().items() if {stage(d) for d in deps} >= set(STAGES)]
    assert every == ["onnxcomq.pipeline"], every


def test_no_pointer_outside_the_repository():
    for name, path in modules().items():
        text = open(path).read()
        assert "../shared" not in text and "shared/docs" not in text, f"{path} points outside the repository"
