"""The package's shape, checked: imports point one way (fronts -> invoke/sources -> broker -> wire types), no
module imports itself through others (type-only imports included), and the worker process imports nothing of
the service's. Read from the source with `ast`: nothing is imported to check it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "eventfn"
LAYERS = ("broker", "invoke", "sources", "fronts")


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        found[name] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """The eventfn modules `path` imports anywhere (module level, functions, `if TYPE_CHECKING:`)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "eventfn":
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                out.add(submodule if submodule in MODULES else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "eventfn")
    return out


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _reach(module: str) -> set[str]:
    seen: set[str] = set()
    todo = [module]
    while todo:
        for dep in GRAPH.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in LAYERS:
        return parts[1]
    if module in ("eventfn.service", "eventfn.cli", "eventfn.testing", "eventfn.__main__"):
        return parts[1]
    if module.startswith("eventfn.cli_"):  # the CLI's command groups (`eventfn queue`, `eventfn stream`)
        return "cli"
    return "wire"  # events, subjects, config, errors, decoding, filters, sandbox, the package itself


#: What each layer may import. Sources reach invoke through its types only (`invoke.invocation`): a mapping is
#: handed the call to make, it does not find functions itself.
ALLOWED = {
    "wire": {"wire"},
    "broker": {"wire", "broker"},
    "invoke": {"wire", "invoke"},
    "sources": {"wire", "broker", "sources", "eventfn.invoke.invocation"},
    "fronts": {"wire", "broker", "invoke", "sources", "fronts"},
    "service": {"wire", "broker", "invoke", "sources", "fronts", "service"},
    "cli": {"wire", "broker", "invoke", "sources", "fronts", "service", "cli"},
    "__main__": {"cli"},
    "testing": {"wire", "broker", "testing"},
}


def test_the_package_has_the_modules_this_test_knows_about() -> None:
    assert {
        "eventfn.broker.bus",
        "eventfn.invoke.runtime",
        "eventfn.sources.dispatch",
        "eventfn.fronts.nats_api",
    } <= set(MODULES)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_the_layers(module: str) -> None:
    allowed = ALLOWED[_layer(module)]
    wrong = sorted(d for d in GRAPH[module] if _layer(d) not in allowed and d not in allowed)
    assert wrong == [], f"{module} ({_layer(module)}) imports {wrong}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_itself_through_others(module: str) -> None:
    assert module not in _reach(module)


def test_the_worker_process_imports_nothing_of_the_service() -> None:
    """`python -m eventfn.invoke.runtime` loads only the calling convention, its wire protocol and what those need:
    every import there is paid on each cold start, and a worker must not depend on the parent's modules."""
    assert _reach("eventfn.invoke.runtime") <= {
        "eventfn.invoke.handler",
        "eventfn.invoke.protocol",
        "eventfn.invoke.output",
        "eventfn.invoke.marshal",
        "eventfn.invoke.invocation",
        "eventfn.sandbox",
        "eventfn.decoding",
        "eventfn.errors",
        "eventfn.subjects",
    }
