"""Package exports imported on first use (PEP 562), so that importing a package, or one light
submodule of it, does not pay for torch, timm and torchvision up front."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any, Callable


class _LazyPackage(types.ModuleType):
    """A package whose public names win over its submodules of the same name: importing
    ``hybridvit.optimize`` (the module) must not turn ``hybridvit.optimize`` (the function) into it,
    as the import system would by setting the submodule on its package."""

    _exports: dict[str, str]

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and name in self._exports and value.__name__ == f"{self.__name__}.{name}":
            return
        super().__setattr__(name, value)


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: ``exports`` maps each public name to the
    submodule of ``package`` that defines it (e.g. ``"create_model": "api"``). Submodules resolve
    too (``hybridvit.registry`` after a bare ``import hybridvit``, as when everything was eager)."""
    module = sys.modules[package]
    module.__class__ = _LazyPackage
    module._exports = exports
    namespace = module.__dict__

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
            namespace[name] = value  # later look-ups skip this function
            return value
        if not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}") is not None:
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
