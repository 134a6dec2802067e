"""The layout shows the architecture: entry points on top, imported by nothing; no import cycle among
captioner's modules, deferred (function-level) imports included; one public scoring entry."""

from __future__ import annotations

import ast

from conftest import ROOT

PACKAGE = ROOT / "captioner"
# the commands the README documents: wiring only, never imported by another captioner module
ENTRY_POINTS = {f"captioner.{name}" for name in
                ("train", "evaluate", "extract", "caption", "serve", "export", "sweep_summary", "import_clipcap")}


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(), filename=str(path))
    return found


def imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """Every captioner module `name` imports, anywhere in the file (deferred imports included)."""
    package = name if name in known and (PACKAGE / name.split(".", 1)[-1].replace(".", "/")).is_dir() else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importing module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]  # `from captioner import checkpoint`
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import captioner.data.coco` -> the module itself
                target = target.rpartition(".")[0]
            if target.startswith("captioner") and target != "captioner" and target != name:
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    trees = modules()
    known = set(trees)
    return {name: imports(name, tree, known) for name, tree in trees.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_walker_sees_deferred_relative_and_from_package_imports():
    source = ast.parse(
        "import captioner.data.coco\n"
        "from captioner import checkpoint\n"
        "def later():\n    from captioner.metrics import report\n"
        "from .noise import add_noise\n"
    )
    known = {"captioner.data.coco", "captioner.checkpoint", "captioner.metrics", "captioner.data.noise", "captioner.data.x"}
    assert imports("captioner.data.x", source, known) == {"captioner.data.coco", "captioner.checkpoint", "captioner.metrics",
                                                          "captioner.data.noise"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_an_entry_point():
    edges = graph()
    assert ENTRY_POINTS <= set(edges), "an entry point moved: update ENTRY_POINTS and the README"
    offenders = {name: sorted(targets & ENTRY_POINTS) for name, targets in edges.items() if targets & ENTRY_POINTS}
    assert offenders == {}


def test_no_import_cycle_among_captioner_modules():
    assert cycles(graph()) == []


def test_scoring_has_one_implementation():
    """Only captioner.metrics (and the SCST reward, which re-implements CIDEr-D for speed) use pycocoevalcap,
    and training and evaluation score through the one split-scoring module."""
    scorers = {f"captioner.{'.'.join(p.relative_to(ROOT / 'captioner').with_suffix('').parts)}"
               for p in (ROOT / "captioner").rglob("*.py") if "pycocoevalcap" in p.read_text()}
    assert scorers == {"captioner.metrics", "captioner.reward"}
    edges = graph()
    users = {name for name, targets in edges.items() if "captioner.metrics" in targets}
    # validation, the split scoring train/evaluate share, and the SCST reward (PTB-tokenizes its references)
    assert users == {"captioner.module", "captioner.results", "captioner.reward"}
    for entry in ("captioner.train", "captioner.evaluate"):
        assert "captioner.results" in edges[entry]


def test_the_model_core_imports_no_lightning():
    """captioner/models/ is plain PyTorch + transformers: nothing it imports, directly or through other
    captioner modules, imports Lightning (the LightningModules wrap the model core, never the reverse)."""
    trees = modules()
    edges = graph()
    core = {name for name in trees if name.startswith("captioner.models")}
    reached, todo = set(), list(core)
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo += edges.get(name, ())

    def lightning_imports(tree: ast.Module) -> list[str]:
        found = []
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [n for n in names if n.split(".")[0] in ("lightning", "pytorch_lightning")]
        return found

    offenders = {name: lightning_imports(trees[name]) for name in sorted(reached) if lightning_imports(trees[name])}
    assert "captioner.models.caption_model" in reached and offenders == {}
