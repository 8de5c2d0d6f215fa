"""The command line starts fast and says what it is: no heavy library at import, --version,
help text as written, output that is not cut when piped."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from moetuner.cli import run, version
from moetuner.methods import methods
from moetuner.placement import Placement

HEAVY = ("matplotlib", "numba", "ortools", "scipy", "torch", "pandas", "moetuner.report",
         "moetuner.kernels")


def _python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {key: value for key, value in os.environ.items() if key != "COLUMNS"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**environ, **(env or {})}, timeout=120)


def test_importing_the_cli_and_the_package_loads_no_heavy_library():
    code = ("import sys, moetuner, moetuner.cli; moetuner.methods(); "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_help_and_info_on_a_placement_import_no_heavy_library(tmp_path):
    path = tmp_path / "p.json"
    Placement(phy2log=np.array([[0, 1, 2, 3]]), num_gpus=2, num_experts=4).save(path)
    code = ("import sys; from moetuner.cli import run; "
            f"codes = [run(['--help']), run(['place', '--help']), run(['info', {str(path)!r}])];"
            f" print(codes, sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)")
    result = _python(code)
    assert result.stderr.strip().splitlines()[-1] == "[0, 0, 0] []"


def test_lazy_package_names_resolve():
    import moetuner

    assert callable(moetuner.methods) and moetuner.methods() == methods()
    for name in moetuner.__all__:
        assert getattr(moetuner, name) is not None
    assert set(moetuner.__all__) <= set(dir(moetuner))


def test_version(capsys):
    assert run(["--version"]) == 0
    assert capsys.readouterr().out == f"moetuner {version()}\n"
    assert version() != ""


def test_help_shows_extras_and_methods(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    assert run(["profile", "--help"]) == 0
    assert "pip install 'moetuner[ray]'" in capsys.readouterr().out
    assert run(["place", "--help"]) == 0
    assert f"placement method: {', '.join(methods())}" in capsys.readouterr().out


def test_piped_output_is_not_wrapped(tmp_path):
    """Piped (not a terminal, no COLUMNS), a message longer than 80 columns stays one line."""
    path = tmp_path / ("a-long-folder-name-" * 5) / "placement.json"
    Placement(phy2log=np.array([[0, 1, 2, 3]]), num_gpus=2, num_experts=4).save(path)
    result = _python(f"from moetuner.cli import run; run(['info', {str(path)!r}])")
    first = result.stdout.splitlines()[0]
    assert first == f"{path}: a moetuner placement JSON"
    assert result.stdout.splitlines()[1] == (
        "1 MoE layers, E = 4, G = 2, 2 slots per GPU (0 redundant)")
