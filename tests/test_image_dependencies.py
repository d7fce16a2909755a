"""The serving image installs Nereid with its base dependencies and one extra (`cpu` or
`gpu`), not the test extra this venv has: a module that `nereid serve` imports at start but
that only the test extra brings works here and stops the container at start. That happened
(pyyaml for server/rollout/policy.py: "No module named 'yaml'", found by
`scripts/compose_e2e balance`), so this test imports what `nereid serve` and a frontend
process import, in a fresh interpreter where every third-party module outside the base
dependencies (and what they require in turn) fails to import.
"""

from __future__ import annotations

import re
import subprocess
import textwrap

from util import PYTHON, ROOT, scaled

# What the server's processes import before serving: the command line, the application
# (`nereid serve`), a frontend of `--workers N` and the owner's side of it.
ENTRY_MODULES = ["server.cli", "server.app", "server.workers.frontend", "server.workers.pool"]

BLOCKER = textwrap.dedent('''
    import importlib.abc, importlib.metadata as md, sys
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    def closure(requirements):
        """Distribution names of `requirements` and all they require (with their extras)."""
        seen, todo = set(), [Requirement(r) for r in requirements]
        while todo:
            req = todo.pop()
            name = canonicalize_name(req.name)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            key = (name, tuple(sorted(req.extras)))
            if key in seen:
                continue
            seen.add(key)
            try:
                nested = md.requires(req.name) or []
            except md.PackageNotFoundError:
                continue
            for text in nested:
                sub = Requirement(text)
                if sub.marker is None or sub.marker.evaluate({"extra": ""}) or any(
                        sub.marker.evaluate({"extra": e}) for e in req.extras):
                    sub.marker = None
                    todo.append(sub)
        return {name for name, _ in seen}

    allowed = closure(BASE)
    owners = md.packages_distributions()
    if sys.version_info < (3, 11):
        # 3.10 reads only top_level.txt, which protobuf's wheel (the `google` package) lacks, so
        # `google` looked owned by google-cloud-storage alone. 3.11 infers the missing ones from
        # each distribution's files: the same here.
        import inspect
        for dist in md.distributions():
            if dist.read_text("top_level.txt") is not None:
                continue
            for file in dist.files or ():
                top = file.parts[0] if len(file.parts) > 1 else (inspect.getmodulename(str(file)) or str(file))
                if "." not in top and dist.metadata["Name"] not in owners.get(top, []):
                    owners.setdefault(top, []).append(dist.metadata["Name"])

    class OnlyBase(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            top = name.split(".")[0]
            if "." in name or top in sys.stdlib_module_names or top in ("server", "backends"):
                return None
            dists = {canonicalize_name(d) for d in owners.get(top, [])}
            if dists and not dists & allowed:
                raise ImportError(f"{top} (from {sorted(dists)}) is not a base dependency of nereid")
            return None

    sys.meta_path.insert(0, OnlyBase())
    import importlib
    for module in MODULES:
        importlib.import_module(module)
    print("imported", len(MODULES))
''')


def base_dependencies() -> list[str]:
    """[project] dependencies from pyproject.toml (read as text: tomllib is 3.11+, Nereid 3.10+)."""
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.M | re.S)
    assert block, "no [project] dependencies in pyproject.toml"
    lines = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    found = [m.group(1) for line in lines if (m := re.fullmatch(r'"([^"]+)",?', line))]
    assert "grpcio>=1.60" in found, found
    return found


def test_the_server_starts_on_its_base_dependencies_alone() -> None:
    code = f"BASE = {base_dependencies()!r}\nMODULES = {ENTRY_MODULES!r}\n{BLOCKER}"
    out = subprocess.run([PYTHON, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=scaled(60))
    assert out.returncode == 0 and out.stdout.strip() == f"imported {len(ENTRY_MODULES)}", out.stderr[-3000:]


def test_the_blocker_refuses_a_module_outside_the_base_dependencies() -> None:
    """Without this, a blocker that lets everything through would pass the test above."""
    code = f"BASE = {base_dependencies()!r}\nMODULES = ['cryptography']\n{BLOCKER}"
    out = subprocess.run([PYTHON, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=scaled(60))
    assert out.returncode != 0 and "cryptography (from ['cryptography']) is not a base dependency" in out.stderr, \
        out.stderr[-3000:]
