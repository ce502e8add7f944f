"""DESIGN.md's layering, enforced: nothing in a lower layer imports a higher one.

Every ``import`` in ``src/mammocad`` is read with ``ast`` -- module level AND inside functions (a
lazy import is still a dependency) AND under ``TYPE_CHECKING`` -- and checked against ``LAYERS``.
Modules on one level may import each other; a module missing from the map fails the test, so a new
package has to be placed in a layer when it is added.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# DESIGN.md: io < preprocess/records < datasets < sampling/models < tasks < training/inference
# < evaluation < serve/cli. Longest dotted prefix wins. Placement by what each module imports:
LAYERS = {
    # 0: the package root (its __version__ is read by io.outdir), the error family and the console
    # helpers (imported by io and everything above), and io itself
    "mammocad": 0, "mammocad.errors": 0, "mammocad.console": 0, "mammocad.io": 0,
    # 1: records, preprocessing, the device choice, overlay drawing (none imports above io)
    "mammocad.records": 1, "mammocad.preprocess": 1, "mammocad.devices": 1, "mammocad.visualize": 1,
    # 2: dataset adapters, the prepared dataset, splits and training targets
    "mammocad.datasets": 2,
    # 3: what turns prepared data into batches, the models (and their cards), synthetic studies ...
    "mammocad.sampling": 3, "mammocad.augment": 3, "mammocad.models": 3, "mammocad.synth": 3,
    "mammocad.synth_writers": 3,
    # ... and the METRICS: pure functions of label maps, lesions and patient ids (they import only
    # datasets, records and io). Training-time validation (tasks) scores with them -- the model
    # card's validation figures are exactly ``mammocad evaluate``'s -- and so does an evaluation run:
    # "what two layers share lives in the lower". The evaluation RUN (below, level 6) is what reads
    # predictions and runs a Predictor, the layer DESIGN.md puts above training and inference.
    "mammocad.evaluation": 3,  # the package __init__ re-exports the metric modules only
    "mammocad.evaluation.bootstrap": 3, "mammocad.evaluation.segmentation": 3,
    "mammocad.evaluation.lesion_detection": 3, "mammocad.evaluation.report": 3, "mammocad.evaluation.coco_ap": 3,
    # 4: per-task training pieces and inference on the prepared grid (tiling included)
    "mammocad.tasks": 4,
    # 5: the task-agnostic engine, and whole-image inference on original images
    "mammocad.training": 5, "mammocad.inference": 5,
    # 6: evaluation runs: a model or a predictions folder against a prepared split
    "mammocad.evaluation.run": 6, "mammocad.evaluation.predictions": 6,
    "mammocad.evaluation.cv": 6,  # trains (level 5) and scores (evaluation.run) each fold
    # 7: the front ends
    "mammocad.demo": 7, "mammocad.cli": 7, "mammocad.serve": 7,
}

# (importer, imported) pairs allowed to go upward, each with why. Keep it empty; an entry is a debt.
ALLOWED: dict[tuple[str, str], str] = {}


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str, layers: dict[str, int]) -> int | None:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        level = layers.get(".".join(parts[:n]))
        if level is not None:
            return level
    return None


def imported_modules(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> list[tuple[int, str]]:
    """(line, module) of every mammocad import anywhere in ``tree``. ``from X import Y`` counts as
    importing ``X.Y`` when that is a module (``from mammocad.tasks import tiling``), else ``X``."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "mammocad"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module.split(".")[: len(module.split(".")) - (0 if is_package else 1)]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            if base.split(".")[0] != "mammocad":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append((node.lineno, sub if sub in known else base))
    return out


def layer_violations(src: Path, layers: dict[str, int], allowed: dict[tuple[str, str], str] | None = None) -> list[str]:
    files = sorted((src / "mammocad").rglob("*.py"))
    known = {module_name(f, src) for f in files}
    problems = []
    for f in files:
        module = module_name(f, src)
        level = layer_of(module, layers)
        if level is None:
            problems.append(f"{f.relative_to(src)}: module {module} has no layer in LAYERS; place it")
            continue
        tree = ast.parse(f.read_text(encoding="utf-8"), filename=str(f))
        for line, target in imported_modules(tree, module, f.name == "__init__.py", known):
            target_level = layer_of(target, layers)
            if target_level is None:
                problems.append(f"{f.relative_to(src)}:{line}: imports {target}, which has no layer")
            elif target_level > level and (module, target) not in (allowed or {}):
                problems.append(f"{f.relative_to(src)}:{line}: {module} (layer {level}) imports {target} "
                                f"(layer {target_level})")
    return problems


def test_no_module_imports_a_higher_layer():
    problems = layer_violations(SRC, LAYERS, ALLOWED)
    assert not problems, "upward imports (see DESIGN.md's layering):\n" + "\n".join(problems)


@pytest.mark.parametrize("body, found", [
    ("from mammocad.hi import x\n", True),  # module level
    ("def f():\n    from mammocad.hi import x\n", True),  # inside a function
    ("def f():\n    import mammocad.hi.deep\n", True),
    ("from mammocad import hi\n", True),  # a submodule named in ``from mammocad import``
    ("from . import x\n", False),  # relative, same layer
    ("from ..hi import x\n", True),  # relative, up
    ("from mammocad.lo import x\n", False),
])
def test_the_checker_sees_every_kind_of_import(tmp_path, body, found):
    """The checker itself: an upward import hidden in a function or written relatively is caught."""
    pkg = tmp_path / "mammocad"
    for sub in ("lo", "hi"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "lo" / "x.py").write_text("")
    (pkg / "lo" / "mod.py").write_text(body)
    (pkg / "hi" / "x.py").write_text("")
    problems = layer_violations(tmp_path, {"mammocad": 0, "mammocad.lo": 1, "mammocad.hi": 2})
    assert bool(problems) == found, problems
    if found:
        assert problems[0].startswith(str(Path("mammocad/lo/mod.py")))
