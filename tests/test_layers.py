"""Imports run down the layers: a module of kve_fast imports modules of its own layer or of layers below it,
never above, also inside functions (a lazy import is still a dependency). The one exception is the
package's lazy exports (``kve_fast/__init__.py``: ``kve_fast.KarrasVePipeline`` and the rest load their
module when first used), listed here name by name.

The layers, lowest first, are what the code is: each new module must be placed in one (the test names it
otherwise), and an import that climbs is either a design mistake or a reason to move the layer line, on
purpose, here.
"""

from __future__ import annotations

import ast
import pathlib

import kve_fast

ROOT = pathlib.Path(kve_fast.__file__).parent

# A name ending in ".*" is every module of that package (the package itself included).
LAYERS = [
    ("leaves", ["kve_fast", "kve_fast.options", "kve_fast._checks", "kve_fast._warn", "kve_fast._files",
                "kve_fast.images", "kve_fast.fingerprint", "kve_fast.edm_testing", "kve_fast.edm_reading",
                "kve_fast.models", "kve_fast.models.train_digits"]),
    ("settings", ["kve_fast.precision", "kve_fast.noise_levels", "kve_fast.noise", "kve_fast.threads"]),
    # (the graph stand-in keys captures by the precision switches it reads through kve_fast.precision)
    ("the graph stand-in", ["kve_fast.fake_graph"]),
    ("conventions", ["kve_fast.convention"]),
    ("plans", ["kve_fast.plan", "kve_fast.spec", "kve_fast.edm_plan"]),
    ("stages", ["kve_fast.stages"]),
    ("ops", ["kve_fast.ops.*", "kve_fast.ncsnpp"]),
    ("backends and the scheduler", ["kve_fast.backends", "kve_fast.karras_ve_scheduler", "kve_fast.scheduler"]),
    ("engines", ["kve_fast.engine", "kve_fast.graphs"]),
    ("the loop", ["kve_fast.sampler"]),
    ("beside the loop", ["kve_fast.oracle", "kve_fast.loading"]),
    ("fronts", ["kve_fast.pipeline", "kve_fast.k_diffusion", "kve_fast.edm", "kve_fast.edm2"]),
    ("tools", ["kve_fast.testing", "kve_fast.accuracy", "kve_fast.models.quality"]),
    ("command helpers", ["kve_fast.cli_common"]),
    ("commands", ["kve_fast.generate.*", "kve_fast.benchmark.*"]),
    ("the command line", ["kve_fast.cli", "kve_fast.__main__"]),
]

# The package's lazy exports: ``kve_fast.<name>`` -> the module it loads (kve_fast/__init__.py), and the
# submodules it hands out by name. These are the only imports allowed to climb.
LAZY_EXPORTS = {
    "KarrasVePipeline": "kve_fast.pipeline",
    "KarrasVeScheduler": "kve_fast.karras_ve_scheduler",
    "KarrasVeOutput": "kve_fast.karras_ve_scheduler",
    "sample_karras_ve": "kve_fast.sampler",
    "sample_karras_ve_sigmas": "kve_fast.sampler",
    "load_model": "kve_fast.loading",
    "load_pipeline": "kve_fast.pipeline",  # a function of the package that imports the pipeline
    "k_diffusion": "kve_fast.k_diffusion",
    "ncsnpp": "kve_fast.ncsnpp",
    "graphs": "kve_fast.graphs",
    "threads": "kve_fast.threads",
}


def _module_name(path: pathlib.Path) -> str:
    parts = ("kve_fast",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    rel = pathlib.Path(*name.split(".")[1:])
    return name == "kve_fast" or (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


def _package_attribute(name: str) -> str:
    """What ``kve_fast.<name>`` (or ``from kve_fast import <name>``) loads: an export's module, a submodule, or
    the package itself (``__version__``)."""
    if name in LAZY_EXPORTS:
        return LAZY_EXPORTS[name]
    return f"kve_fast.{name}" if _is_module(f"kve_fast.{name}") else "kve_fast"


def imports_of(path: pathlib.Path) -> list[tuple[str, int]]:
    """``(module imported, line)`` for every import of a kve_fast module in ``path``, module level or not."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    found, aliases = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "kve_fast" or alias.name.startswith("kve_fast."):
                    found.append((alias.name, node.lineno))
                    if alias.name == "kve_fast":
                        aliases.add(alias.asname or "kve_fast")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not (target == "kve_fast" or target.startswith("kve_fast.")):
                continue
            for alias in node.names:
                if target == "kve_fast":
                    found.append((_package_attribute(alias.name), node.lineno))
                elif _is_module(f"{target}.{alias.name}"):
                    found.append((f"{target}.{alias.name}", node.lineno))
                else:
                    found.append((target, node.lineno))
    for node in ast.walk(tree):  # kve_fast.<name> after ``import kve_fast``: what the package loads for it
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            found.append((_package_attribute(node.attr), node.lineno))
    return [(target, line) for target, line in found if target != name]


def import_graph() -> dict[str, list[tuple[str, int]]]:
    return {_module_name(p): imports_of(p) for p in sorted(ROOT.rglob("*.py"))}


def layer_of(module: str) -> int | None:
    for k, (_, members) in enumerate(LAYERS):
        for m in members:
            if module == m or (m.endswith(".*") and (module == m[:-2] or module.startswith(m[:-1]))):
                return k
    return None


def test_every_module_has_a_layer():
    missing = [m for m in import_graph() if layer_of(m) is None]
    assert not missing, f"place these modules in a layer of tests/test_layers.py: {missing}"


def test_the_lazy_exports_are_the_listed_ones():
    """Every name the package hands out lazily is listed above (a new one is a climb someone decided on)."""
    exported = {**kve_fast._EXPORTS, **{name: name for name in kve_fast._SUBMODULES}}
    assert {n: LAZY_EXPORTS[n].removeprefix("kve_fast.") for n in exported} == exported
    assert set(LAZY_EXPORTS) == set(exported) | {"load_pipeline"}
    assert {t for t, _ in imports_of(ROOT / "__init__.py")} == {"kve_fast.pipeline"}  # load_pipeline's


def test_no_import_climbs_a_layer():
    """Mutations (each fails): kve_fast.plan importing kve_fast.karras_ve_scheduler again inside scheduler_plan;
    kve_fast.images taking make_grid from kve_fast.cli; kve_fast.ops.fused using ``kve_fast.sample_karras_ve``
    through the package."""
    climbs = []
    for module, edges in import_graph().items():
        if module == "kve_fast":
            continue  # the lazy exports (test_the_lazy_exports_are_the_listed_ones)
        for target, line in edges:
            if layer_of(target) is not None and layer_of(module) is not None and layer_of(target) > layer_of(module):
                climbs.append(f"{module}:{line} imports {target} ({LAYERS[layer_of(module)][0]!r} < "
                              f"{LAYERS[layer_of(target)][0]!r})")
    assert not climbs, "imports that climb a layer:\n" + "\n".join(climbs)


def test_the_imports_have_no_cycle():
    """Within a layer too: a cycle is two modules that cannot be told apart by layer."""
    graph = {m: {t for t, _ in edges} for m, edges in import_graph().items() if m != "kve_fast"}
    state: dict = {}

    def visit(m, path):
        if state.get(m) == "done":
            return None
        if state.get(m) == "open":
            return path[path.index(m):] + [m]
        state[m] = "open"
        for t in sorted(graph.get(m, ())):
            cycle = visit(t, path + [m])
            if cycle:
                return cycle
        state[m] = "done"
        return None

    for m in sorted(graph):
        cycle = visit(m, [])
        assert cycle is None, f"an import cycle: {' -> '.join(cycle)}"


def test_the_graph_sees_lazy_imports_and_exports():
    """The parser finds what the layer test relies on: an import inside a function, a relative import of a
    submodule, and a lazy export used through the package."""
    graph = {m: {t for t, _ in edges} for m, edges in import_graph().items()}
    assert "kve_fast.pipeline" in graph["kve_fast.generate.workers"]  # inside a function: from ..pipeline import
    assert "kve_fast.graphs" in graph["kve_fast.sampler"]  # from . import graphs
    assert "kve_fast.pipeline" in graph["kve_fast.models.quality"]  # kve_fast.KarrasVePipeline, lazily
