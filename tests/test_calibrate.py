import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moetuner.calibrate import fit_coefficients, fit_ffn
from moetuner.cli import run
from moetuner.cluster import GPUS
from moetuner.costmodel import CostCoefficients, load_coefficients
from moetuner.errors import InputError

TOKENS = np.array([1, 2, 4, 8, 16, 32, 64, 128, 256])


def test_fit_ffn_recovers_an_exact_roofline():
    # 2 ms floor, 50 us per token: the floor holds up to n = 40.
    seconds = np.maximum(TOKENS * 50e-6, 2e-3)
    fit = fit_ffn(TOKENS, seconds)
    assert fit.seconds_per_token == pytest.approx(50e-6, rel=1e-12)
    assert fit.floor_seconds == pytest.approx(2e-3, rel=1e-12)
    assert fit.log_rms == pytest.approx(0, abs=1e-12)


def test_fit_ffn_without_a_floor_and_unsorted_input():
    order = np.random.default_rng(0).permutation(len(TOKENS))
    fit = fit_ffn(TOKENS[order], (TOKENS * 3e-6)[order])
    assert fit.seconds_per_token == pytest.approx(3e-6, rel=1e-12)
    assert fit.floor_seconds == 0


@given(st.floats(1e-7, 1e-3), st.floats(1e-5, 1e-1),
       st.lists(st.floats(-0.05, 0.05), min_size=len(TOKENS), max_size=len(TOKENS)))
def test_fit_ffn_is_close_under_small_noise(slope, floor, noise):
    seconds = np.maximum(TOKENS * slope, floor) * np.exp(noise)
    fit = fit_ffn(TOKENS, seconds)
    assert fit.log_rms <= 0.05
    # Each parameter lands within the noise where two timings clearly show it.
    if TOKENS[-2] * slope > 2 * floor:
        assert fit.seconds_per_token == pytest.approx(slope, rel=0.06)
    if TOKENS[1] * slope < floor / 2:
        assert fit.floor_seconds == pytest.approx(floor, rel=0.06)


def test_fit_coefficients_against_the_h100_preset():
    h100 = GPUS["h100"]
    flops_per_token, weight_bytes = 2 * 3 * 100 * 200, 3 * 100 * 200 * 2
    # Half the peak FLOP/s and a quarter of the bandwidth.
    slope = flops_per_token / (0.5 * h100.peak_flops)
    read = weight_bytes / (0.25 * h100.memory_bandwidth)
    tokens = 2 ** np.arange(13)  # the roofline turns at n = 583
    fit = fit_coefficients(tokens, np.maximum(tokens * slope, read), read, flops_per_token,
                           weight_bytes, h100)
    assert fit.compute_efficiency == pytest.approx(0.5, rel=1e-12)
    assert fit.memory_efficiency == pytest.approx(0.25, rel=1e-12)
    assert fit.clipped == ()
    # A device twice as fast as the preset: clipped to 1 and said so.
    fast = fit_coefficients(tokens, tokens * slope / 4, read / 8, flops_per_token,
                            weight_bytes, h100)
    assert (fast.compute_efficiency, fast.memory_efficiency) == (1.0, 1.0)
    assert fast.clipped == ("compute_efficiency", "memory_efficiency")
    with pytest.raises(InputError):
        fit_ffn(TOKENS, -np.ones(len(TOKENS)))
    with pytest.raises(InputError):
        fit_coefficients(TOKENS, TOKENS * slope, 0.0, flops_per_token, weight_bytes, h100)


def test_calibrate_on_cpu_writes_a_loadable_file(tmp_path, capsys):
    pytest.importorskip("torch", reason="calibrate times the FFN with torch (moetuner[torch])")
    out = tmp_path / "coeffs.json"
    assert run(["calibrate", "--model", "gpt-oss-20b", "--device", "cpu", "--scale", "0.01",
                "--tokens", "1,4,16", "--experts", "2", "--repeats", "1", "-o", str(out)]) == 0
    coefficients = load_coefficients(out)
    assert 0 < coefficients.compute_efficiency <= 1
    assert 0 < coefficients.memory_efficiency <= 1
    provenance = coefficients.provenance
    assert provenance["device"] == "cpu" and "not on a h100" in provenance["note"]
    assert provenance["hidden"] == 29 and provenance["tokens_per_expert"] == [1, 4, 16]
    assert len(provenance["ffn_seconds_per_expert"]) == 3
    assert "compute_efficiency" in capsys.readouterr().out
    assert run(["calibrate", "--model", "nope", "-o", str(tmp_path / "x.json")]) == 2
    assert run(["calibrate", "--model", "gpt-oss-20b", "--tokens", "1,x",
                "-o", str(tmp_path / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()


def test_provenance_must_be_an_object(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"provenance": [1]}))
    with pytest.raises(InputError, match="provenance"):
        load_coefficients(path)
    assert CostCoefficients.from_dict({"provenance": {"device": "cpu"}}).provenance == {
        "device": "cpu"}


def test_calibrate_without_torch_is_one_line_and_exit_2(tmp_path):
    """Without torch (simulated: ``sys.modules['torch'] = None`` makes ``import torch`` raise
    ImportError) calibrate names the extra it needs, in one line, and writes nothing."""
    out = tmp_path / "coeffs.json"
    code = ("import sys; sys.modules['torch'] = None; from moetuner.cli import main; "
            f"sys.argv = ['moetuner', 'calibrate', '--model', 'gpt-oss-20b', '-o', {str(out)!r}];"
            " main()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "COLUMNS": "200"}, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "error: calibrate: dependencies: expected torch to time the expert FFN (pip install "
        "'moetuner[torch]'; torch==2.13.0 first for the CPU build)"]
    assert not out.exists()
