"""The repositories the fuzz suite serves (test_fuzz.py, test_fuzz_findings.py).

- The main repository: identity models of every datatype and shape kind (some that batch
  requests sent together), and the example ONNX and Python models.
- The explicit-mode repository: models to load with hostile config overrides, next to files
  planted *outside* it (a Python file that leaves a marker when run, files holding a secret
  token, symlinks from inside the models to them), so that a load which runs, reads or
  reveals something outside the repository can be seen.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from fuzz_harness import Target, read_signatures
from lifecycle_util import add_model_bytes
from util import IDENTITY_DATATYPES, MODEL_REPOSITORY, ServerProcess, identity_config, write_model

EXAMPLES = ("simple", "mlp", "string_lower", "datatypes_onnx", "add_sub_autocomplete", "text_features")


def build_main_repo(repo: Path) -> Path:
    """Identity models of every datatype and shape kind, plus the example ONNX and Python models."""
    for datatype in IDENTITY_DATATYPES:
        write_model(repo, f"id_{datatype}", identity_config(
            f"id_{datatype}", [("IN", datatype, [-1])], max_batch_size=8, outputs=["OUT"]))
    write_model(repo, "id_pair", identity_config("id_pair", [("INPUT0", "FP32", [4]), ("INPUT1", "INT32", [4])],
                                                 max_batch_size=4, extra="dynamic_batching { }\n"))
    for datatype in ("FP32", "BYTES", "BOOL"):  # requests sent together are batched together
        write_model(repo, f"batched_{datatype}", identity_config(
            f"batched_{datatype}", [("INPUT0", datatype, [-1]), ("INPUT1", "INT32", [2])], max_batch_size=8,
            execute_delay_ms=5, extra="dynamic_batching { max_queue_delay_microseconds: 20000 }\n"))
    write_model(repo, "id_nobatch", identity_config("id_nobatch", [("INPUT0", "INT32", [-1, -1])]))
    write_model(repo, "id_versions", identity_config(
        "id_versions", [("INPUT0", "FP32", [2])], extra="version_policy: { specific: { versions: [ 1, 3 ] } }\n"),
        versions=(1, 2, 3))
    for name in EXAMPLES:
        shutil.copytree(MODEL_REPOSITORY / name, repo / name)
    return repo


TOKEN = "NEREID-FUZZ-SECRET-7f3a9c"
LOAD_TARGETS = ("ld_id", "ld_py", "ld_onnx")
ANCHOR = "anchor"
PY_MODEL = """import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            data = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", data)]))
        return out
"""
PLANTED = ("secret.py", "secret.onnx", "secret.txt", "labels.txt")
# How a config names a planted file: absolute, climbing out of the version folder, the model folder
# or the repository, very deep, or through an operator's symlink inside the model folder.
STYLES = ("absolute", "from_version", "from_model", "from_repo", "deep", "symlink")


class Explicit:
    """The explicit-mode server's repository, and the files planted outside it."""

    def __init__(self, root: Path) -> None:
        self.repo = root / "repo"
        self.outside = root / "outside"
        self.tmp = root / "server_tmp"  # the server's TMPDIR: where override directories go
        for path in (self.repo, self.outside, self.tmp):
            path.mkdir()
        self.marker = self.outside / "MARKER"
        (self.outside / "secret.py").write_text(
            f"open({str(self.marker)!r}, 'w').write('ran')\n# {TOKEN}\n"
            "class TritonPythonModel:\n    def execute(self, requests):\n        return []\n")
        for name in PLANTED[1:]:
            (self.outside / name).write_text(f"{TOKEN}\n{TOKEN}\n")
        self.reset_atimes()
        write_model(self.repo, ANCHOR, identity_config(ANCHOR, [("INPUT0", "FP32", [4])]))
        write_model(self.repo, "ld_id", identity_config("ld_id", [("INPUT0", "FP32", [4])]))
        write_model(self.repo, "ld_py", identity_config("ld_py", [("INPUT0", "FP32", [4])]).replace(
            'backend: "identity"', 'backend: "python"'), files={"1/model.py": PY_MODEL.encode()})
        write_model(self.repo, "ld_onnx", identity_config("ld_onnx", [("INPUT0", "FP32", [4])]).replace(
            'backend: "identity"', 'backend: "onnxruntime"'), files={"1/model.onnx": add_model_bytes(1.0)})
        for model in LOAD_TARGETS:  # an operator's symlinks that lead out of the repository
            (self.repo / model / "links").mkdir()
            for name in PLANTED + tuple(absent(n) for n in PLANTED):  # dangling links to absent files too
                os.symlink(self.outside / name, self.repo / model / "1" / f"link_{name}")
                os.symlink(self.outside / name, self.repo / model / "links" / name)
        self.outside_listing = self.listing()

    def path(self, name: str, style: str, model: str = "ld_py", field: str = "default_model_filename") -> str:
        """How config field `field` of model `model` would name planted file `name` in `style`.
        (Relative names start in the version folder for the model files, in the model folder for
        the others: the symlink is named from there.)"""
        target = self.outside / name
        version_dir = self.repo / model / "1"
        in_version = field in ("default_model_filename", "cc_model_filenames")
        return {
            "absolute": str(target),
            "from_version": os.path.relpath(target, version_dir),
            "from_model": os.path.relpath(target, version_dir.parent),
            "from_repo": os.path.relpath(target, self.repo),
            "deep": "../" * 16 + str(target).lstrip("/"),
            "symlink": f"link_{name}" if in_version else f"1/link_{name}",
        }[style]

    def __repr__(self) -> str:
        return f"Explicit({self.repo})"

    def hostile_paths(self) -> list[str]:
        paths = [self.path(name, style) for name in PLANTED for style in STYLES]
        return paths + ["../links/secret.py", "links/secret.txt", "../warmup/../links/secret.txt", "secret.txt",
                        "model.py", "model.onnx", "../1/model.py", str(self.outside), "/dev/zero", "/dev/stdin"]

    def listing(self) -> list[str]:
        return sorted(str(p.relative_to(self.outside)) for p in self.outside.rglob("*"))

    # Reads are seen in access times: with atime set before mtime, any read moves it (relatime, the
    # default mount option; on a noatime mount this one check sees nothing and the others remain).
    def reset_atimes(self) -> None:
        for name in PLANTED:
            path = self.outside / name
            os.utime(path, (0, path.stat().st_mtime))

    def read_files(self) -> list[str]:
        return [name for name in PLANTED if (self.outside / name).stat().st_atime != 0]


    def start(self) -> Target:
        """The explicit-mode server over this repository, with its override directories in
        `self.tmp` (its TMPDIR) and the secret token counted as a bug wherever it is logged."""
        env_tmp = os.environ.get("TMPDIR")
        os.environ["TMPDIR"] = str(self.tmp)  # inherited by the server; restored at once below
        try:
            server = ServerProcess([self.repo], ["--model-control-mode", "explicit", "--load-model", "*"])
        finally:
            if env_tmp is None:
                del os.environ["TMPDIR"]
            else:
                os.environ["TMPDIR"] = env_tmp
        channel = server.channel()
        target = Target(server, channel, read_signatures(channel), good_model=ANCHOR,
                        extra_bug_lines=(re.compile(re.escape(TOKEN)),))
        target.rss_baseline_mb = target.rss_mb()
        return target


def absent(name: str) -> str:
    """A file name of the same length as planted file `name` that does not exist."""
    return name.replace("s", "z", 1) if name.startswith("s") else name.replace("l", "k", 1)


