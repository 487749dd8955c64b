"""Extension points, each registered by name: federated methods (a client hook and a server hook,
strategies/method.py), server optimizers, mask rules, client objectives and server aggregation rules.

    from fed_app.registry import MASK_RULES
    @MASK_RULES.register("my-rule")
    def my_rule(): ...

The built-ins register themselves where they are defined (strategies/method.py, strategies/scaffold.py,
strategies/server_opt.py, masking/calibrate.py, fed_app/task/train.py, strategies/fedavg.py); a user's module registers its own and is named in run-config `plugins`
("my_lab.rules"), which every process (runner, server, clients) imports before it checks a config.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


class Registry:
    """Name -> object for one kind of extension."""

    def __init__(self, kind: str, key: str, instances: bool = False):
        self.kind, self.key = kind, key  # e.g. "mask rule", run-config key "mask-rule"
        self.instances = instances  # a registered class is kept as one instance of it (methods: their hooks)
        self._entries: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        def add(obj: Any) -> Any:
            self._entries[name] = obj() if self.instances and isinstance(obj, type) else obj
            return obj

        return add

    def get(self, name: str) -> Any:
        if name not in self._entries:
            raise ValueError(f"{self.kind} {name!r} is not registered; {self.key} is one of "
                             f"{', '.join(self.names())}.")
        return self._entries[name]

    def names(self) -> list[str]:
        return list(self._entries)

    def find(self, name: str) -> Any | None:
        return self._entries.get(name)

    def __iter__(self):
        return iter(self._entries)


MASK_RULES = Registry("mask rule", "mask-rule")
OBJECTIVES = Registry("client objective", "client-objective")
AGGREGATIONS = Registry("aggregation rule", "aggregation")
METHODS = Registry("federated method", "client-algorithm", instances=True)
SERVER_OPTIMIZERS = Registry("server optimizer", "server-optimizer")
BUILTINS = ("strategies.method", "strategies.scaffold", "strategies.server_opt", "masking.calibrate",
            "fed_app.task.train", "strategies.mean", "strategies.robust")


def load_plugins(modules: str) -> None:
    """Import the comma-separated modules named in run-config `plugins` (each import registers its entries)."""
    for name in filter(None, (m.strip() for m in modules.split(","))):
        importlib.import_module(name)


def load_builtins() -> None:
    """Import the modules whose built-in entries register themselves (by name, as plugins are: they sit above
    this module, which every layer reads)."""
    for name in BUILTINS:
        importlib.import_module(name)
