"""The package's import graph: no cycles, and every import points down the layers of docs/architecture.md."""
import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lorahub_plus"

# Lowest first. A module may import its own layer's modules (no cycles) and any layer below, never one above.
LAYERS = [
    ["version", "lazy", "errors", "paths", "library.readers", "library.atomic"],  # errors and safe file I/O
    ["models", "tasks", "prompts", "encode", "routed", "plots"],  # the core: model, data, prompts, routed layer, plots
    ["scoring"],
    ["library"],
    ["hypernet"],
    ["routing"],
    ["compose"],
    ["hub", "evaluation"],
    ["serving"],
    ["cli", ""],  # "": the root package, whose `Hub` loads on first use
]


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    best = None
    for rank, names in enumerate(LAYERS):
        for name in names:  # the longest matching prefix decides (library.readers before library)
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > len(best[1])):
                best = (rank, name)
    assert best is not None, f"lorahub_plus.{module} sits in no layer of LAYERS"
    return best[0]


def _imports(path: Path) -> set[str]:
    """The package modules `path` imports, at any depth, except under `if TYPE_CHECKING:`."""
    out = set()

    def visit(node):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            return
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; the package imports absolutely"
            if (node.module or "").startswith("lorahub_plus"):
                base = node.module[len("lorahub_plus"):].lstrip(".")
                for alias in node.names:
                    sub = f"{base}.{alias.name}" if base else alias.name
                    out.add(sub if (PACKAGE / (sub.replace(".", "/") + ".py")).exists() else base)
        elif isinstance(node, ast.Import):
            out.update(a.name[len("lorahub_plus."):] for a in node.names if a.name.startswith("lorahub_plus."))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args \
                and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("lorahub_plus."):
            out.add(node.args[0].value[len("lorahub_plus."):])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in out if m}


GRAPH = {_module(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def test_every_import_points_down_the_layers():
    upward = [f"{a} -> {b}" for a, deps in GRAPH.items() for b in deps if _layer(b) > _layer(a)]
    assert not upward, "imports that point up the layers:\n" + "\n".join(sorted(upward))


def test_the_import_graph_has_no_cycle():
    state: dict[str, int] = {}

    def walk(node, trail):
        state[node] = 1
        for dep in sorted(GRAPH.get(node, ())):
            assert state.get(dep) != 1, "import cycle: " + " -> ".join(trail + [node, dep])
            if dep not in state:
                walk(dep, trail + [node])
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            walk(module, [])


def test_the_product_never_imports_evaluation_serving_or_the_cli():
    product = [m for m in GRAPH if _layer(m) < _layer("evaluation") and m != "hub"]
    bad = [f"{m} -> {d}" for m in product for d in GRAPH[m] if d.split(".")[0] in ("evaluation", "serving", "cli")]
    assert not bad, bad


def test_the_checker_sees_an_upward_import():
    assert "routing.routers" in GRAPH["evaluation.methods"] and _layer("evaluation.methods") > _layer("routing")
    assert _layer("library.readers") < _layer("models") < _layer("library.store")


def test_importing_the_package_and_its_subpackages_loads_no_torch():
    code = ("import sys, lorahub_plus, lorahub_plus.library, lorahub_plus.compose, lorahub_plus.routing, "
            "lorahub_plus.hypernet, lorahub_plus.evaluation, lorahub_plus.serving, lorahub_plus.errors; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
