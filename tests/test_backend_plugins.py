"""Third-party backends register through the `nereid.backends` entry-point group.

A tiny distribution (a package plus its `.dist-info` with `entry_points.txt`) is written to
a temporary folder that the server subprocess gets on PYTHONPATH: exactly what
`pip install` of a plugin leaves in site-packages, without installing anything.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from util import ServerProcess, client, write_model

PLUGIN = textwrap.dedent('''
    """A third-party backend: multiplies every input by the number in its model file."""
    import numpy as np

    from backends.base import Backend, BackendError


    class ScaleBackend(Backend):
        name = "scale"
        default_model_filename = "factor.txt"

        def load(self, spec, device):
            try:
                self.factor = float(spec.model_file.read_text())
            except ValueError as exc:
                raise BackendError(f"{spec.model_file} must hold a number: {exc}") from exc
            self.pairs = [(i.name, o.name) for i, o in zip(spec.inputs, spec.outputs)]

        def execute(self, inputs):
            return {out: (inputs[inp] * self.factor).astype(inputs[inp].dtype) for inp, out in self.pairs}


    class NotABackend:
        pass
''')

BROKEN = "import a_package_that_is_not_installed  # noqa\n"

ENTRY_POINTS = """[nereid.backends]
scale = nereid_scale_plugin:ScaleBackend
not_a_backend = nereid_scale_plugin:NotABackend
needs_missing = nereid_broken_plugin:Whatever
"""


def _install_plugin(site: Path) -> None:
    (site / "nereid_scale_plugin").mkdir(parents=True)
    (site / "nereid_scale_plugin" / "__init__.py").write_text(PLUGIN)
    (site / "nereid_broken_plugin.py").write_text(BROKEN)
    dist = site / "nereid_scale_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: nereid-scale-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(ENTRY_POINTS)


def _config(name: str, backend: str) -> str:
    return (f'name: "{name}"\nbackend: "{backend}"\ndefault_model_filename: "factor.txt"\nmax_batch_size: 4\n'
            'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 3 ] } ]\n'
            'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 3 ] } ]\n')


def test_entry_point_backend_serves_without_changes_to_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site, repo = tmp_path / "site", tmp_path / "repo"
    _install_plugin(site)
    for name, backend in (("tripled", "scale"), ("wrong_class", "not_a_backend"), ("missing_dep", "needs_missing")):
        write_model(repo, name, _config(name, backend), files={"1/factor.txt": b"3"})
    monkeypatch.setenv("PYTHONPATH", str(site))
    server = ServerProcess([repo], ["--strict-readiness", "false"])
    try:
        c = client(server)
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        inp = grpcclient.InferInput("INPUT0", [2, 3], "FP32")
        inp.set_data_from_numpy(x)
        np.testing.assert_array_equal(c.infer("tripled", [inp]).as_numpy("OUTPUT0"), x * 3)
        assert c.get_model_config("tripled").config.backend == "scale"
        rows = {r.name: r for r in c.get_model_repository_index().models}
        assert rows["wrong_class"].state == "UNAVAILABLE"
        assert "is not a backends.base.Backend subclass" in rows["wrong_class"].reason
        assert rows["missing_dep"].state == "UNAVAILABLE"
        assert "a_package_that_is_not_installed" in rows["missing_dep"].reason
        assert "to fix:" in rows["missing_dep"].reason
    finally:
        server.stop()


def test_unknown_backend_lists_the_known_ones(tmp_path: Path) -> None:
    from backends.base import BackendError
    from backends.registry import backend_class

    with pytest.raises(BackendError, match=r"unknown backend 'nope'; known backends: .*identity.*onnxruntime.*python"):
        backend_class("nope")


def test_missing_framework_hint_names_the_extra() -> None:
    from backends.registry import INSTALL_HINT

    for backend in ("onnxruntime", "pytorch", "tensorrt"):
        assert "pip install" in INSTALL_HINT[backend]


def test_worked_example_in_docs_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/BACKENDS.md's LinearBackend, copied from the doc, installed as a plugin and served
    with a config that leaves the I/O to its `describe`."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "BACKENDS.md").read_text()
    section = doc[doc.index("## Worked example"):]
    code = section[section.index("```python") + len("```python"):]
    code = code[:code.index("```")]
    site, repo = tmp_path / "site", tmp_path / "repo"
    (site / "nereid_linear").mkdir(parents=True)
    (site / "nereid_linear" / "__init__.py").write_text(code)
    dist = site / "nereid_linear-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: nereid-linear\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[nereid.backends]\nlinear = nereid_linear:LinearBackend\n")
    rng = np.random.default_rng(5)
    w, b = rng.standard_normal((8, 1)).astype(np.float32), rng.standard_normal(1).astype(np.float32)
    model_dir = write_model(repo, "price", 'backend: "linear"\ndefault_model_filename: "model.npz"\n'
                                           "max_batch_size: 32\n")
    np.savez(model_dir / "1" / "model.npz", W=w, b=b)
    monkeypatch.setenv("PYTHONPATH", str(site))
    server = ServerProcess([repo])
    try:
        c = client(server)
        config = c.get_model_config("price").config
        assert [(i.name, list(i.dims)) for i in config.input] == [("x", [8])]
        x = rng.standard_normal((3, 8)).astype(np.float32)
        inp = grpcclient.InferInput("x", [3, 8], "FP32")
        inp.set_data_from_numpy(x)
        np.testing.assert_allclose(c.infer("price", [inp]).as_numpy("y"), x @ w + b, rtol=1e-5)
    finally:
        server.stop()
