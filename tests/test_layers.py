"""The layers stay layers: read from the source (``ast``), nothing imported or run.

    admission/   the engine: stands on clock, config and errors only
    proxy/       forwarding: stands on the engine and the gateway's plumbing (config, errors,
                 metrics, logs); takes a Plan (proxy/plan.py) from whoever classifies the
                 request, and whose request it is as a function (identity.py's owner_of):
                 it knows no product and no caller
    products/, app.py, admin, ...   above both: they build Plans and wire the proxy in

A test, not a convention, because the import that breaks a layer is always the convenient
one (the proxy once took ``Catalog`` and ``Plan`` from products/). What each layer may use
is listed (an allow-list), so a new module above it is forbidden without anyone having to
remember to add it here. Imports under ``if TYPE_CHECKING`` count too: a type is a
dependency. And what a layer imports is followed to the end: the plumbing it may use must not
pull an upper layer in behind it (logs.py once imported products/ for one constant).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

GATEWAY = Path(__file__).resolve().parent.parent / "gateway"

# What each layer may import from the gateway (module prefixes), besides itself.
ALLOWED = {
    "admission": ("gateway.admission", "gateway.clock", "gateway.config", "gateway.errors"),
    "proxy": (
        "gateway.proxy",
        "gateway.admission",
        "gateway.clock",
        "gateway.config",
        "gateway.errors",
        "gateway.logs",
        "gateway.metrics",
    ),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(GATEWAY.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(path: Path) -> str:
    """The package a module's relative imports start from."""
    name = module_name(path)
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def gateway_imports(source: str, package: str) -> list[tuple[int, str]]:
    """Every gateway module ``source`` imports (relative imports resolved against
    ``package``), with its line."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            stem = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                stem = f"{base}.{stem}" if stem else base
            # ``from . import x`` names a module: x, not the package.
            names = [stem] if node.module else [f"{stem}.{alias.name}" for alias in node.names]
        else:
            continue
        found += [(node.lineno, name) for name in names if name == "gateway" or name.startswith("gateway.")]
    return found


def allowed(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def source_of(name: str) -> Path | None:
    """The file of gateway module ``name`` (a package: its __init__), or None (a name
    imported from a module, not a module)."""
    base = GATEWAY.parent.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.exists():
            return path
    return None


def reached(start: Path) -> dict[str, str]:
    """Every gateway module importing ``start`` loads, each with the module that imports it."""
    seen: dict[str, str] = {}
    todo = [start]
    while todo:
        path = todo.pop()
        for _, name in gateway_imports(path.read_text(), package_of(path)):
            # ``from .x import y`` names y, which may be a module or a name in x.
            target = name if source_of(name) is not None else name.rpartition(".")[0]
            if target in seen or source_of(target) is None:
                continue
            seen[target] = module_name(path)
            todo.append(source_of(target))  # type: ignore[arg-type]
    return seen


def chain(name: str, via: dict[str, str], start: str) -> str:
    links = [name]
    while links[-1] != start and links[-1] in via:
        links.append(via[links[-1]])
    return " <- ".join(links)


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_nothing_above_it(layer: str) -> None:
    files = sorted((GATEWAY / layer).rglob("*.py"))
    assert files, f"gateway/{layer}/ has no modules: was it moved?"
    wrong = [
        f"{path.relative_to(GATEWAY.parent)}:{line} imports {name}"
        for path in files
        for line, name in gateway_imports(path.read_text(), package_of(path))
        if not allowed(name, ALLOWED[layer])
    ]
    assert not wrong, (
        f"gateway/{layer}/ may import only {', '.join(ALLOWED[layer])}; pass anything else in "
        "(a parameter, or a Protocol defined in the lower layer):\n" + "\n".join(wrong)
    )


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_what_a_layer_stands_on_pulls_nothing_above_it_in(layer: str) -> None:
    wrong = set()
    for path in sorted((GATEWAY / layer).rglob("*.py")):
        via = reached(path)
        wrong |= {chain(name, via, module_name(path)) for name in via if not allowed(name, ALLOWED[layer])}
    assert not wrong, f"gateway/{layer}/ loads an upper layer through its imports:\n" + "\n".join(
        sorted(wrong)
    )


def test_the_reader_resolves_every_spelling() -> None:
    """The check above is only as good as its reading of imports."""
    source = """
from __future__ import annotations
import json
from aiohttp import web
from ..products.catalog import Catalog
from .forward import relay
from . import urls
from .. import app
import gateway.admin
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from ..products.plan import Plan
def late():
    from gateway.status_page import UseHistory
"""
    names = sorted(name for _, name in gateway_imports(source, "gateway.proxy"))
    assert names == [
        "gateway.admin",
        "gateway.app",
        "gateway.products.catalog",
        "gateway.products.plan",
        "gateway.proxy.forward",
        "gateway.proxy.urls",
        "gateway.status_page",
    ]
    assert package_of(GATEWAY / "proxy" / "handler.py") == "gateway.proxy"
    assert package_of(GATEWAY / "products" / "__init__.py") == "gateway.products"
    assert package_of(GATEWAY / "products" / "transcripts" / "jobs.py") == "gateway.products.transcripts"
