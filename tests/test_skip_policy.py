"""The suite's own rule (tests/skip_policy.py): a skipped test fails the run unless it is marked
`gpu` or `nogpu`, or NEREID_ALLOW_SKIPS=1 is set. Checked by running pytest on small test files
in a subprocess, with the same hooks conftest.py installs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from util import PYTHON, scaled

TESTS_DIR = Path(__file__).resolve().parent

CONFTEST = "from skip_policy import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401\n"
INI = """[pytest]
addopts = --strict-markers -rs -p no:cacheprovider
markers =
    gpu: needs a CUDA device
    nogpu: checks machines without one
"""

CASES = {
    "skip_call": 'import pytest\n\ndef test_it():\n    pytest.skip("the reason it skipped")\n',
    "skipif_marker": 'import pytest\n\n@pytest.mark.skipif(True, reason="the reason it skipped")\n'
                     "def test_it():\n    pass\n",
    "fixture_skip": 'import pytest\n\n@pytest.fixture\ndef fx():\n    pytest.skip("the reason it skipped")\n\n'
                    "def test_it(fx):\n    pass\n",
    "module_importorskip": 'import pytest\n\npytest.importorskip("no_such_framework_for_the_reason_it_skipped")\n\n'
                           "def test_it():\n    pass\n",
}
HARDWARE = {
    "gpu_skip": 'import pytest\n\n@pytest.mark.gpu\ndef test_it():\n    pytest.skip("no CUDA device")\n',
    "nogpu_skip": 'import pytest\n\n@pytest.mark.nogpu\ndef test_it():\n    pytest.skip("a CUDA device is present")\n',
    "xfail": 'import pytest\n\n@pytest.mark.xfail(strict=True, reason="known")\ndef test_it():\n    assert False\n',
}


def run_pytest(tmp_path: Path, source: str, allow_skips: str | None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "pytest.ini").write_text(INI)
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_case.py").write_text(source)
    (tmp_path / "test_fine.py").write_text("def test_fine():\n    pass\n")  # so that something always runs
    env = {k: v for k, v in os.environ.items() if k != "NEREID_ALLOW_SKIPS"}
    env["PYTHONPATH"] = str(TESTS_DIR)
    if allow_skips is not None:
        env["NEREID_ALLOW_SKIPS"] = allow_skips
    return subprocess.run([PYTHON, "-m", "pytest", "-q", str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=scaled(60))


@pytest.mark.parametrize("case", CASES)
def test_a_skip_fails_the_run_with_its_reason(tmp_path: Path, case: str) -> None:
    proc = run_pytest(tmp_path, CASES[case], allow_skips=None)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "was skipped, and only tests marked gpu or nogpu may skip" in out, out
    assert "the_reason_it_skipped" in out or "the reason it skipped" in out, out


@pytest.mark.parametrize("case", CASES)
def test_allow_skips_lets_it_skip_and_shows_why(tmp_path: Path, case: str) -> None:
    proc = run_pytest(tmp_path, CASES[case], allow_skips="1")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "SKIPPED" in out and ("the_reason_it_skipped" in out or "the reason it skipped" in out), out


@pytest.mark.parametrize("case", HARDWARE)
def test_hardware_skips_and_xfail_pass(tmp_path: Path, case: str) -> None:
    proc = run_pytest(tmp_path, HARDWARE[case], allow_skips="0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
