"""A small registry per extension point (rewards now; tools use the same mechanism).

A spec names an entry three ways:

* a registered name: ``iou`` (built-ins, ``@register`` calls, and third-party packages through
  the entry-point group, loaded on first use);
* an import string: ``my_pkg.rewards:score``;
* a file: ``rewards/my_reward.py:score``, relative to ``base_dir`` when given, else to the
  working directory (configs make their paths absolute first). The file is executed as a module
  with a unique name; ``sys.path`` is not touched. Plugin files run code by design: load only
  files you wrote or trust.

Unknown names fail with the closest matches and the list of what is available.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any


class PluginError(LookupError):
    """A plugin spec could not be resolved; the message says why and what to do."""


class Registry:
    """Named entries of one kind (e.g. "reward"), plus entry points of one group."""

    def __init__(self, kind: str, entry_point_group: str):
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._entries: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        """Decorator registering a function or class under ``name``."""

        def decorate(obj: Any) -> Any:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"a {self.kind} named {name!r} is already registered")
            self._entries[name] = obj
            return obj

        return decorate

    def names(self) -> list[str]:
        """Registered and entry-point names, sorted."""
        return sorted(set(self._entries) | {ep.name for ep in self._entry_points()})

    def resolve(self, spec: str, base_dir: str | Path | None = None) -> Any:
        """The object a spec names (see the module docstring for the three forms)."""
        target, sep, attr = spec.rpartition(":")
        if sep and target.endswith(".py"):
            return load_from_file(_plugin_path(target, base_dir), attr, self.kind)
        if sep and target and attr:
            return load_from_module(target, attr, self.kind)
        return self._named(spec)

    def _named(self, name: str) -> Any:
        if name in self._entries:
            return self._entries[name]
        for ep in self._entry_points():
            if ep.name == name:
                try:
                    return ep.load()
                except Exception as exc:
                    raise PluginError(f"{self.kind} {name!r} from entry point {ep.value!r} failed to load: "
                                      f"{type(exc).__name__}: {exc}") from exc
        available = self.names()
        close = difflib.get_close_matches(name, available, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise PluginError(f"unknown {self.kind} {name!r}; {hint}available: {', '.join(available)}. "
                          f"Plugins can also be named as 'package.module:attr' or 'path/to/file.py:attr'")

    def _entry_points(self) -> list[Any]:
        return list(entry_points(group=self.entry_point_group))


def instantiate(cls: type, options: dict[str, Any], kind: str, spec: str) -> Any:
    """``cls(**options)`` for a plugin class; bad options name the ones it accepts.

    Raises:
        PluginError: options the class does not take; ValueError: the class refused their values.
    """
    try:
        return cls(**options)
    except TypeError as exc:
        accepted = ", ".join(p for p in inspect.signature(cls).parameters if p != "self") or "none"
        raise PluginError(f"{kind} {spec!r}: bad options {sorted(options)} ({exc}); accepted: {accepted}") from exc
    except ValueError as exc:
        raise ValueError(f"{kind} {spec!r}: {exc}") from exc


def _plugin_path(target: str, base_dir: str | Path | None) -> Path:
    path = Path(target)
    if not path.is_absolute() and base_dir is not None and (Path(base_dir) / path).is_file():
        return Path(base_dir) / path
    return path


def load_from_file(path: Path, attr: str, kind: str) -> Any:
    """Execute a plugin file as a uniquely named module and return its attribute ``attr``."""
    if not path.is_file():
        raise PluginError(f"{kind} plugin file not found: {path} (a relative path in a config or on the command "
                          "line is taken from the working directory)")
    resolved = path.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:12]
    module_name = f"vlreason_plugin_{resolved.stem}_{digest}"
    module = sys.modules.get(module_name)
    if module is None:
        spec = importlib.util.spec_from_file_location(module_name, resolved)
        if spec is None or spec.loader is None:
            raise PluginError(f"{path} cannot be loaded as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # lets pickle find classes defined in the file
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[module_name]
            raise PluginError(f"{kind} plugin file {path} raised while loading: {type(exc).__name__}: {exc}") from exc
    return _attribute(module, attr, str(path), kind)


def load_from_module(module_name: str, attr: str, kind: str) -> Any:
    """Import ``module_name`` and return its attribute ``attr``."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PluginError(f"cannot import {module_name!r} for {kind} '{module_name}:{attr}': {exc}") from exc
    return _attribute(module, attr, module_name, kind)


def _attribute(module: Any, attr: str, where: str, kind: str) -> Any:
    if hasattr(module, attr):
        return getattr(module, attr)
    public = sorted(n for n in vars(module) if not n.startswith("_") and callable(getattr(module, n)))
    close = difflib.get_close_matches(attr, public, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise PluginError(f"{where} has no {kind} {attr!r}; {hint}it defines: {', '.join(public) or 'nothing callable'}")
