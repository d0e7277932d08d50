"""Imports run one way: evaluators → pipeline → export → models → windq/ (the foundation).

Every import statement of every module is read with `ast`, function-level ones included, so a
cycle cannot hide inside a function body.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder on disk → (package name, layer); a module may import its own layer and those below
LAYERS = {"windq": ("windq", 0), "models": ("windq.models", 1), "export": ("windq.export", 2),
          "pipeline": ("windq.pipeline", 3), "evaluators": ("windq.evaluators", 4)}  # fmt: skip
APP = {"windq/cli.py", "windq/__main__.py"}  # the command line sits on top of everything
BY_PACKAGE = {pkg: layer for pkg, layer in LAYERS.values()}


def layer_of(module: str) -> int | None:
    """The layer of an imported windq module name, None for anything outside windq."""
    if module != "windq" and not module.startswith("windq."):
        return None
    parts = module.split(".")
    if len(parts) >= 2 and ".".join(parts[:2]) in BY_PACKAGE:
        return BY_PACKAGE[".".join(parts[:2])]
    if module == "windq.cli":
        return 5
    return 0  # windq itself and its foundation modules (windq.errors, windq.plan, …)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import in the file; `from windq import x` names windq.x."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            if node.module == "windq" or node.module in BY_PACKAGE:
                out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def modules():
    for folder, (_, layer) in LAYERS.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel not in APP:
                yield rel, layer


def backward_imports() -> list[str]:
    bad = []
    for rel, layer in modules():
        for line, module in imported_modules(ROOT / rel):
            target = layer_of(module)
            if target is not None and target > layer:
                bad.append(f"{rel}:{line} imports {module}")
    return bad


def test_imports_run_one_way():
    assert backward_imports() == []


def test_the_checker_sees_function_level_imports(tmp_path, monkeypatch):
    """Break it once: a function-level upward import in a models module is reported."""
    fake = tmp_path / "models"
    fake.mkdir()
    (fake / "bad.py").write_text("def f():\n    from windq.evaluators.perplexity import evaluate\n    return evaluate\n")
    (tmp_path / "windq").mkdir()
    (tmp_path / "windq" / "ok.py").write_text("from windq import errors\nfrom windq.models import gguf_model\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    for folder in ("export", "pipeline", "evaluators"):
        (tmp_path / folder).mkdir()
    assert sorted(backward_imports()) == [
        "models/bad.py:2 imports windq.evaluators.perplexity", "windq/ok.py:2 imports windq.models", "windq/ok.py:2 imports windq.models.gguf_model",
    ]  # fmt: skip


@pytest.mark.parametrize("module,layer", [("windq.errors", 0), ("windq.models.align", 1), ("windq.export.scoring", 2),
                                          ("windq.pipeline.ppo", 3), ("windq.evaluators.bench", 4), ("numpy", None)])  # fmt: skip
def test_layer_names(module, layer):
    assert layer_of(module) == layer
