"""The README's layout tree stays true: every module of kport is drawn in it, and every
module it draws exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def layout() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Layout") :]
    return section[section.index("```") + 3 : section.index("```", section.index("```") + 3)]


def drawn_modules(tree: str) -> set[str]:
    """The paths of the files the tree draws (``├── name  what it holds``, nested by
    indentation; a line with no branch goes on listing the names of the line above)."""
    found: set[str] = set()
    stack: list[str] = []
    depth = 0
    for line in tree.strip("\n").splitlines():
        if not line.startswith(("│", " ", "├", "└")):  # a top-level directory
            stack = [line.split()[0].rstrip("/")]
            continue
        branch = max(line.find("├── "), line.find("└── "))
        if branch >= 0:
            depth = branch // 4 + 1
            entry = line[branch + 4 :]
        else:
            entry = line.lstrip("│ ")
        names = re.split(r"\s{2,}", entry.strip())[0]
        if branch >= 0 and names.endswith("/"):
            stack = [*stack[:depth], names.rstrip("/")]
            continue
        for name in re.findall(r"[\w.]+\.(?:py|c)\b", names):
            found.add("/".join([*stack[:depth], name]))
    return found


def test_every_module_is_in_the_readme_layout_and_nothing_else() -> None:
    tree = layout()
    drawn = drawn_modules(tree)
    # a package's __init__.py is drawn where it holds more than re-exports
    drawn_inits = {"kport/__init__.py", "kport/daemon/__init__.py", "kport/cli/__init__.py"}
    actual = {
        str(path.relative_to(ROOT))
        for path in (ROOT / "kport").rglob("*")
        if path.suffix in (".py", ".c")
        and path.name != "__main__.py"
        and (path.name != "__init__.py" or str(path.relative_to(ROOT)) in drawn_inits)
    }
    assert actual - drawn == set(), "modules missing from the README's layout"
    assert drawn - actual == set(), "the README's layout draws modules that do not exist"
