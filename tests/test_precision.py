"""The precision of products: TF32 rounding as the hardware does it, the NumPy
reference rounding every product's inputs under tf32, and the option's way
through rnnc.compile, Program.load, rnnc.load, artifacts and the command line.
(The CUDA kernels at each precision: test_cuda_products.py, test_cuda_emulated.py.)"""
from __future__ import annotations

import json

import numpy as np
import pytest

import rnnc
from rnnc.artifact import ArtifactError, write
from rnnc.cli import main
from rnnc.precision import PRECISIONS

from conftest import example

TF32 = PRECISIONS["tf32"]
ULP = 2.0 ** -10  # of a TF32 value in [1, 2)

PROJECTION = """
cell projection {
    dim D, H
    input x[D]
    state h[H]
    param W[D, H]
    y = x @ W
    next h = h + y
    output y
}
"""


@pytest.mark.parametrize("value, rounded", [
    (1.0 + ULP / 2, 1.0 + ULP),  # a tie goes away from zero
    (-(1.0 + ULP / 2), -(1.0 + ULP)),
    (1.0 + 3 * ULP / 2, 1.0 + 2 * ULP),  # not to even: away from zero
    (1.0 + ULP / 2 - 2.0 ** -23, 1.0),  # just below the tie
    (2.0 - ULP / 2, 2.0),  # a carry into the exponent
    (3.0, 3.0), (0.0, 0.0), (np.inf, np.inf), (-np.inf, -np.inf)])
def test_tf32_rounds_to_nearest_ties_away_from_zero(value, rounded):
    for dtype in (np.float32, np.float64):
        got = TF32.round_inputs(np.array([value], dtype))
        assert got.dtype == dtype and got[0] == rounded
    assert np.isnan(TF32.round_inputs(np.array([np.nan], np.float32))[0])


def test_fp32_leaves_inputs_alone():
    x = np.random.default_rng(0).normal(size=50)
    assert PRECISIONS["fp32"].round_inputs(x) is x


def test_numpy_backend_rounds_product_inputs_under_tf32():
    program = rnnc.compile(PROJECTION, dims={"D": 40, "H": 7})
    rng = np.random.default_rng(1)
    x, W = rng.normal(size=(2, 3, 40)), rng.normal(size=(40, 7))
    outputs = {p: rnnc.compile(PROJECTION, dims={"D": 40, "H": 7}, precision=p).load("numpy", "float64")
               .forward(inputs={"x": x}, params={"W": W}).outputs["y"] for p in PRECISIONS}
    np.testing.assert_array_equal(outputs["fp32"], x @ W)
    np.testing.assert_allclose(outputs["tf32"], TF32.round_inputs(x) @ TF32.round_inputs(W), rtol=1e-12)
    assert np.abs(outputs["tf32"] - x @ W).max() > 1e-4  # rounding changed the answer
    # Program.load takes the program's precision unless given another
    assert program.load("numpy", precision="tf32").precision is TF32
    assert rnnc.compile(PROJECTION, dims={"D": 4, "H": 2}, precision="tf32").load().precision is TF32


def test_unknown_precisions_are_value_errors_naming_the_choices():
    with pytest.raises(ValueError, match=r"precision: expected one of fp32, tf32, got 'bf16'"):
        rnnc.compile(PROJECTION, dims={"D": 4, "H": 2}, precision="bf16")
    with pytest.raises(ValueError, match="precision: expected one of"):
        rnnc.compile(PROJECTION, dims={"D": 4, "H": 2}).load("numpy", precision="TF32")


def test_artifacts_keep_their_precision(tmp_path):
    program = rnnc.compile(example("gru"), dims={"D": 3, "H": 4}, precision="tf32")
    write(program, tmp_path / "gru", build=False)
    assert json.loads((tmp_path / "gru" / "module.json").read_text())["precision"] == "tf32"
    assert rnnc.load(tmp_path / "gru").precision is TF32
    assert rnnc.load(tmp_path / "gru", precision="fp32").precision is PRECISIONS["fp32"]  # NumPy: any
    with pytest.raises(ArtifactError, match="compiled for precision 'tf32'.*--precision fp32"):
        rnnc.load(tmp_path / "gru", backend="cuda", precision="fp32")


def test_command_line_precision(tmp_path, capsys):
    cell = str(example("lstm"))
    assert main(["emit", cell, "--stage", "cuda", "-D", "D=3", "-D", "H=5", "--precision", "tf32"]) == 0
    tf32_source = capsys.readouterr().out
    assert main(["emit", cell, "--stage", "cuda", "-D", "D=3", "-D", "H=5"]) == 0
    fp32_source = capsys.readouterr().out
    assert "rnnc_mma_tf32(&acc" in tf32_source and "rnnc_mma_tf32(&acc" not in fp32_source
    assert main(["run", cell, "-D", "D=3", "-D", "H=5", "--seq-len", "2", "--precision", "tf32"]) == 0
    assert "tf32" in capsys.readouterr().out
    with pytest.raises(SystemExit) as usage:  # argparse's choices: exit 2
        main(["run", cell, "-D", "D=3", "-D", "H=5", "--precision", "bf16"])
    assert usage.value.code == 2 and "invalid choice: 'bf16'" in capsys.readouterr().err
