"""Layering: the client SDK never imports the federated trainer (shared code lives in veilface.nn)."""

from __future__ import annotations

import ast
from pathlib import Path

import veilface.client

CLIENT = Path(veilface.client.__file__).resolve().parent
FORBIDDEN = "veilface.federated"


def _federated_imports(path: Path) -> list[int]:
    """Line numbers of every import of veilface.federated in ``path``.

    Counts ``import veilface.federated...``, ``from veilface.federated... import``,
    ``from veilface import federated`` and a dotted-name string such as
    ``importlib.import_module("veilface.federated.x")``.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    lines = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = [node.value]
        if any(n == FORBIDDEN or n.startswith((FORBIDDEN + ".", FORBIDDEN + ":")) for n in names):
            lines.add(node.lineno)
    return sorted(lines)


def test_the_client_package_does_not_import_federated() -> None:
    sources = sorted(CLIENT.rglob("*.py"))
    assert len(sources) > 10, f"no client sources found under {CLIENT}"
    offenders = [
        f"{path.relative_to(CLIENT)}:{line}"
        for path in sources
        for line in _federated_imports(path)
    ]
    assert not offenders, (
        "client/ must not import veilface.federated (put shared torch code in veilface.nn): "
        + ", ".join(offenders)
    )


def test_the_check_sees_every_import_form(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import veilface.federated.vireid.models\n"
        "from veilface.federated.arrays import state_arrays\n"
        "from veilface import federated\n"
        "import importlib; importlib.import_module('veilface.federated.pad.models')\n"
        "from veilface.nn.mobilenet import MobileNetV2\n"
        "import veilface.federatedx\n",
        encoding="utf-8",
    )
    assert _federated_imports(probe) == [1, 2, 3, 4]
