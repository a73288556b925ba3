"""The README's source map follows the code: every module it names exists, every module is named.

Each bullet of the map opens with a link to its directory (``[`gateway/proxy/`](gateway/proxy)``);
the module names in backquotes after it are read relative to that directory (``lua/*.lua`` is a
glob). A module added, moved or split without the map changing fails here, with its name.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

_LINK = re.compile(r"\]\(((?:gateway)[^)]*)\)")
_MODULE = re.compile(r"`([\w/*.]+\.(?:py|lua))`")


def source_map() -> str:
    text = README.read_text()
    start = text.index("\n## Source map\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def items(section: str) -> list[str]:
    """The map's bullets, each with its continuation lines."""
    out: list[str] = []
    for line in section.splitlines():
        if line.lstrip().startswith("- "):
            out.append(line)
        elif out and line.startswith(" "):
            out[-1] += " " + line.strip()
    return out


def named() -> dict[str, list[Path]]:
    """Every module name in the map, with the files it stands for."""
    found: dict[str, list[Path]] = {}
    for item in items(source_map()):
        link = _LINK.search(item)
        assert link is not None, f"a source map bullet without its directory's link: {item[:80]}"
        base = ROOT / link.group(1)
        for name in _MODULE.findall(item):
            found[f"{link.group(1).rstrip('/')}/{name}"] = sorted(base.glob(name))
    return found


def test_every_path_the_map_names_exists() -> None:
    missing = [name for name, files in named().items() if not files]
    assert not missing, f"the README's source map names what is not there: {missing}"
    for link in _LINK.findall(source_map()):
        assert (ROOT / link).exists(), link


def test_every_module_is_in_the_map() -> None:
    covered = {path for files in named().values() for path in files}
    modules = [
        p
        for p in [*(ROOT / "gateway").rglob("*.py"), *(ROOT / "gateway").rglob("*.lua")]
        if p.name != "__init__.py" and "__pycache__" not in p.parts
    ]
    absent = sorted(str(p.relative_to(ROOT)) for p in modules if p not in covered)
    assert not absent, f"modules the README's source map does not name: {absent}"
