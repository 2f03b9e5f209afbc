"""Every public name of the package says what it is: the API reference (mkdocstrings, built
strictly in CI) is made from these docstrings. Public: a function or class defined in a
raftorch module whose name has no leading underscore, and a class's own public methods
except those that override a base class's (``forward``, ``extra_repr``: the base documents
them)."""
from __future__ import annotations

import importlib
import inspect
import pkgutil

import raftorch


def _modules():
    for info in pkgutil.walk_packages(raftorch.__path__, "raftorch."):
        if not info.name.endswith("__main__"):
            yield importlib.import_module(info.name)


def _overrides(cls: type, name: str) -> bool:
    return any(name in vars(base) for base in cls.__mro__[1:])


def undocumented() -> list[str]:
    missing = []
    for mod in _modules():
        for name, obj in vars(mod).items():
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            if obj.__module__ != mod.__name__:
                continue  # imported from elsewhere: checked where it is defined
            if not (obj.__doc__ or "").strip():
                missing.append(f"{mod.__name__}.{name}")
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    if (not attr.startswith("_") and inspect.isfunction(member) and not _overrides(obj, attr)
                            and not (member.__doc__ or "").strip()):
                        missing.append(f"{mod.__name__}.{name}.{attr}")
    return missing


def test_every_public_function_class_and_method_has_a_docstring():
    missing = undocumented()
    assert not missing, f"{len(missing)} public names without a docstring:\n" + "\n".join(missing)


def test_the_check_finds_a_public_function_without_a_docstring(monkeypatch):
    def bare():
        pass

    bare.__module__ = "raftorch.rules"
    monkeypatch.setattr(importlib.import_module("raftorch.rules"), "bare", bare, raising=False)
    assert "raftorch.rules.bare" in undocumented()
