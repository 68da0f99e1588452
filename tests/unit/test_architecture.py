"""The layering contracts in pyproject.toml name every module of the core, so a new core module cannot slip
past them; the edge's list names every module of consumer.cli but the wiring."""

from __future__ import annotations

import pkgutil
import tomllib

import consumer
import consumer.cli
from tests import REPO_ROOT


def contracts() -> dict[str, list[str]]:
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    found = config["tool"]["importlinter"]["contracts"]
    return {contract["name"]: contract["source_modules"] for contract in found}


def test_the_core_contract_names_every_core_module() -> None:
    core = {
        f"consumer.{module.name}"
        for module in pkgutil.iter_modules(consumer.__path__)
        if module.name != "cli"
    }
    (listed,) = [modules for name, modules in contracts().items() if name.startswith("The core")]
    assert set(listed) == core


def test_the_edge_contract_names_every_edge_module_but_the_wiring() -> None:
    edge = {
        f"consumer.cli.{module.name}"
        for module in pkgutil.iter_modules(consumer.cli.__path__)
        if module.name not in ("wiring", "__main__")
    }
    (listed,) = [modules for name, modules in contracts().items() if name.startswith("Within the edge")]
    assert set(listed) == edge
