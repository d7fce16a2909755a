"""Importing a Python model's `model.py` inside the server's process (`nereid_in_process`), so that
two models never share a module.

In a stub the model has a process to itself: the stub puts the version folder and the model
folder first on `sys.path` and imports `<version>.model` (backends/python_stub.py). In the server
every model shares one interpreter, so each loaded instance gets a package of its own:

- the version folder becomes a package with a unique name (`_nereid_model_7`), and `model.py`
  its module `_nereid_model_7.model`, so `from .helper import x` finds this model's helper;
- while the module is imported (and while `initialize` runs) the version and model folders are
  first on `sys.path`, as in the stub, so `import helper` works too; a name the model's folders
  define (a `helper.py`) is hidden from `sys.modules` meanwhile and the module imported under
  it taken out afterwards, so another model's `helper` is never the one found, nor left behind;
- `forget` takes the package and its modules out of `sys.modules` on unload.

What it cannot give: an `import helper` run later, inside `execute`, does not see the model's
folders (changing `sys.path` while other models run would race); import siblings at the top of
`model.py`, or relatively. Imports of installed packages are shared with the server, as any
import in one interpreter is.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import itertools
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

_numbers = itertools.count(1)
# One model imports at a time: sys.path and sys.modules are changed while it does.
_IMPORTING = threading.RLock()


def _local_names(folders: tuple[Path, ...]) -> set[str]:
    """The top-level module names the model's folders define (`helper.py`, `pkg/`)."""
    names: set[str] = set()
    for folder in folders:
        try:
            entries = list(folder.iterdir())
        except OSError:
            continue
        for entry in entries:
            if entry.suffix == ".py" and entry.stem.isidentifier():
                names.add(entry.stem)
            elif entry.is_dir() and entry.name.isidentifier():
                names.add(entry.name)
    return names


def _owned(name: str, names: set[str]) -> bool:
    return name.partition(".")[0] in names


@contextmanager
def model_imports(version_dir: Path) -> Iterator[None]:
    """While it lasts, `import helper` finds the model's own files first (as in the stub); what it
    imported from them is taken out of `sys.modules` after, and what it hid put back."""
    folders = (version_dir, version_dir.parent)
    names = _local_names(folders)
    with _IMPORTING:
        hidden = {n: sys.modules.pop(n) for n in list(sys.modules) if _owned(n, names)}
        added = [str(f) for f in folders]
        sys.path[:0] = added
        try:
            yield
        finally:
            for folder in added:
                try:
                    sys.path.remove(folder)
                except ValueError:  # the model took it out itself
                    pass
            for name in [n for n in list(sys.modules) if _owned(n, names)]:
                del sys.modules[name]
            sys.modules.update(hidden)


def import_model(model_file: Path) -> ModuleType:
    """Import `model_file` as the module `model` of a package of its own (the version folder);
    the caller holds `model_imports(version_dir)` and calls `forget(module)` when done with it."""
    path = model_file.resolve()
    version_dir = path.parent
    package = f"_nereid_model_{next(_numbers)}"
    init = version_dir / "__init__.py"
    if init.is_file():
        spec = importlib.util.spec_from_file_location(package, init, submodule_search_locations=[str(version_dir)])
    else:
        spec = importlib.machinery.ModuleSpec(package, None, is_package=True)
        spec.submodule_search_locations = [str(version_dir)]
    assert spec is not None
    parent = importlib.util.module_from_spec(spec)
    sys.modules[package] = parent
    try:
        if spec.loader is not None:
            spec.loader.exec_module(parent)
        name = f"{package}.{path.stem}"
        model_spec = importlib.util.spec_from_file_location(name, path)
        if model_spec is None or model_spec.loader is None:
            raise ImportError(f"cannot import {model_file}")
        module = importlib.util.module_from_spec(model_spec)
        sys.modules[name] = module
        model_spec.loader.exec_module(module)
    except BaseException:
        _drop(package)
        raise
    if not hasattr(module, "TritonPythonModel"):
        _drop(package)
        raise AttributeError(f"{model_file} defines no class TritonPythonModel")
    return module


def forget(module: ModuleType) -> None:
    """Take the model's package and everything imported under it out of `sys.modules`."""
    _drop(module.__name__.partition(".")[0])


def _drop(package: str) -> None:
    with _IMPORTING:
        for name in [n for n in list(sys.modules) if n == package or n.startswith(package + ".")]:
            del sys.modules[name]
