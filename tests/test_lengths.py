"""The lengths contract on the NumPy backend, PyTorch's packed sequences: a
padded step has no effect at all, whatever its inputs hold. And cells whose
step results depend on params alone, or that chain once-per-sequence values,
against finite differences. (The same on the CUDA backend: test_cuda_emulated.py.)"""
import numpy as np
import pytest

from rnnc.gradcheck import gradcheck, random_arguments

import new_cells as cells
from conftest import example

POLICIES = ["none", "auto", "all", "budget"]


def arguments(module, seed=0) -> dict:
    args = random_arguments(module, cells.LENGTHS_T, cells.LENGTHS_B, seed=seed)
    del args["lengths"]
    rng = np.random.default_rng(seed + 1)
    outputs = module.forward(**args, train=False).outputs
    args["d_outputs"] = {k: rng.normal(size=v.shape) for k, v in outputs.items()}
    args["d_states"] = {k: rng.normal(size=v.shape) for k, v in args["states"].items()}
    return args


def run(module, args, lengths) -> dict:
    """Every array forward and backward give, by a name like 'grad params W'."""
    res = module.forward(**{k: args[k] for k in ("inputs", "states", "contexts", "params")}, lengths=lengths)
    grads = module.backward(res, args["d_outputs"], args["d_states"])
    got = {f"output {k}": v for k, v in res.outputs.items()}
    got.update((f"final state {k}", v) for k, v in res.states.items())
    for kind in ("params", "inputs", "states", "contexts"):
        got.update((f"grad {kind} {k}", v) for k, v in getattr(grads, kind).items())
    return got


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", ["norm", "chain", "lstm"])
def test_nan_or_inf_in_the_padding_changes_no_result(name, policy):
    """Inputs and output cotangents NaN (or inf) on padded steps give exactly what
    zero padding gives: outputs 0 there, and no NaN anywhere."""
    text = example("lstm").read_text() if name == "lstm" else cells.LENGTHS_CELLS[name]
    module = cells.compile_cell(text, policy).load(dtype="float64")
    args = arguments(module)
    zero = run(module, cells.fill_padding(args, cells.LENGTHS, 0.0), cells.LENGTHS)
    for fill in (np.nan, np.inf):
        got = run(module, cells.fill_padding(args, cells.LENGTHS, fill), cells.LENGTHS)
        for key, want in zero.items():
            assert np.isfinite(want).all(), key
            np.testing.assert_array_equal(got[key], want, err_msg=f"{key}, padding {fill}")
    pad = cells.padding(cells.LENGTHS_T, cells.LENGTHS)
    for key, y in zero.items():
        if key.startswith("output"):
            assert not y[pad].any(), key


@pytest.mark.parametrize("policy", ["auto", "budget"])
@pytest.mark.parametrize("name", ["norm", "shared", "chain"])
def test_each_example_gets_what_its_sequence_alone_gives(name, policy):
    """Run with lengths (NaN padding), the batch gives each example the outputs,
    final states and gradients of its unpadded sequence run alone; the params'
    gradients are their sums. An empty sequence gives zeros, its initial state
    back and its state cotangent through unchanged."""
    module = cells.compile_cell(cells.LENGTHS_CELLS[name], policy).load(dtype="float64")
    args = cells.fill_padding(arguments(module, seed=3), cells.LENGTHS, np.nan)
    batch = run(module, args, cells.LENGTHS)
    param_sums = {}
    for b, length in enumerate(cells.LENGTHS):
        if length == 0:
            for key, v in batch.items():
                if key.startswith(("output", "grad inputs")):
                    assert not v[:, b].any(), key
            for s, v in args["states"].items():
                np.testing.assert_array_equal(batch[f"final state {s}"][b], v[b])
                np.testing.assert_array_equal(batch[f"grad states {s}"][b], args["d_states"][s][b])
            continue
        alone = {group: {k: (v[:length, b:b + 1] if group in ("inputs", "d_outputs") else
                             v if group == "params" else v[b:b + 1]) for k, v in args[group].items()}
                 for group in args}
        got = run(module, alone, None)
        for key, v in got.items():
            if key.startswith("grad params"):
                param_sums[key] = param_sums.get(key, 0) + v
            elif key.startswith(("output", "grad inputs")):
                np.testing.assert_allclose(batch[key][:length, b:b + 1], v, rtol=1e-10, atol=1e-12, err_msg=key)
                assert not batch[key][length:, b].any(), key
            else:
                np.testing.assert_allclose(batch[key][b:b + 1], v, rtol=1e-10, atol=1e-12, err_msg=key)
    for key, v in param_sums.items():
        np.testing.assert_allclose(batch[key], v, rtol=1e-10, atol=1e-12, err_msg=key)


@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("policy", ["none", "all", "budget"])
@pytest.mark.parametrize("name", ["shared", "chain"])
def test_cells_of_params_alone_and_chained_context_values_match_finite_differences(name, policy, lengths):
    module = cells.compile_cell(cells.LENGTHS_CELLS[name], policy).load(dtype="float64")
    report = gradcheck(module, T=4, B=3, seed=5, with_lengths=lengths)
    assert report.worst < 1e-6, report.format()


def test_a_step_result_of_params_alone_is_broadcast_and_its_gradient_summed():
    """`output pb = b` is b at every step of every example (0 past a length),
    and b's gradient from it is the sum of its cotangents: shaped [H], not [B, H]."""
    module = cells.compile_cell(cells.SHARED, "auto").load(dtype="float64")
    args = arguments(module)
    res = module.forward(**{k: args[k] for k in ("inputs", "states", "contexts", "params")},
                         lengths=cells.LENGTHS)
    valid = ~cells.padding(cells.LENGTHS_T, cells.LENGTHS)
    b, a = args["params"]["b"], args["params"]["a"]
    np.testing.assert_array_equal(res.outputs["pb"], np.where(valid[..., None], b, 0.0))
    np.testing.assert_allclose(res.outputs["tb"], np.where(valid[..., None], np.tanh(b), 0.0))
    # `next s = a`: a once an example has run a step, its initial state otherwise
    np.testing.assert_array_equal(res.states["s"], np.where(cells.LENGTHS[:, None] > 0, a, args["states"]["s"]))
    only_pb = {k: np.zeros_like(v) for k, v in args["d_outputs"].items()}
    only_pb["pb"] = args["d_outputs"]["pb"]
    grads = module.backward(res, only_pb)
    assert grads.params["b"].shape == b.shape
    # b reaches the loss through pb and through h_new: pb's share is the masked sum
    through_h = module.backward(res, {**only_pb, "pb": np.zeros_like(only_pb["pb"])}).params["b"]
    np.testing.assert_allclose(grads.params["b"] - through_h, (args["d_outputs"]["pb"] * valid[..., None]).sum((0, 1)))
