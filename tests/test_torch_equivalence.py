"""The shipped `lstm` and `gru` cells equal torch.nn.LSTM / torch.nn.GRU.

Weights are copied across by hand (not through rnnc.torch, so this checks the
NumPy backend alone): W = weight_ih_l0.T, U = weight_hh_l0.T; the LSTM's one
bias is bias_ih + bias_hh, the GRU keeps both (b_i, b_h) because its n gate
multiplies the hidden bias by r. Everything is float64 and must agree to 1e-9:
outputs, final states, and the gradients of every parameter, of the inputs
and of the initial states, with full-length and with packed variable-length
sequences.
"""
import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="torch is a test-only dependency (pip install 'rnnc[torch]'); "
                    "these tests compare rnnc with torch.nn.LSTM/GRU")
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

import rnnc  # noqa: E402

from conftest import example  # noqa: E402

T, B, D, H = 6, 4, 3, 5
TOL = 1e-9
# includes a full-length element, a length-1 element and the B=4 order unsorted
LENGTHS = [3, 6, 1, 4]


def rnnc_params(kind: str, net) -> dict:
    """The torch module's weights in the layout of examples/<kind>.cell."""
    w = {k: v.detach().numpy().copy() for k, v in net.named_parameters()}
    params = {"W": w["weight_ih_l0"].T.copy(), "U": w["weight_hh_l0"].T.copy()}
    if kind == "lstm":
        params["b"] = w["bias_ih_l0"] + w["bias_hh_l0"]
    else:
        params["b_i"], params["b_h"] = w["bias_ih_l0"], w["bias_hh_l0"]
    return params


def param_grads(kind: str, net) -> dict:
    """The torch module's gradients in the layout of examples/<kind>.cell."""
    g = {k: v.grad.numpy() for k, v in net.named_parameters()}
    grads = {"W": g["weight_ih_l0"].T, "U": g["weight_hh_l0"].T}
    if kind == "lstm":
        # b feeds both bias_ih and bias_hh, which therefore get the same gradient
        np.testing.assert_allclose(g["bias_ih_l0"], g["bias_hh_l0"], rtol=0, atol=TOL)
        grads["b"] = g["bias_ih_l0"]
    else:
        grads["b_i"], grads["b_h"] = g["bias_ih_l0"], g["bias_hh_l0"]
    return grads


def make_case(kind: str, seed: int):
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    net = (torch.nn.LSTM if kind == "lstm" else torch.nn.GRU)(D, H).double()
    states = ("h", "c") if kind == "lstm" else ("h",)
    data = dict(
        x=rng.standard_normal((T, B, D)),
        states={s: rng.standard_normal((B, H)) for s in states},
        dy=rng.standard_normal((T, B, H)),
        d_states={s: rng.standard_normal((B, H)) for s in states},
    )
    return net, data


def run_torch(kind: str, net, data, lengths):
    """Outputs, final states and all gradients of torch's module, as NumPy arrays."""
    x = torch.tensor(data["x"], requires_grad=True)
    s0 = {k: torch.tensor(v[None], requires_grad=True) for k, v in data["states"].items()}
    hidden = (s0["h"], s0["c"]) if kind == "lstm" else s0["h"]
    if lengths is None:
        y, final = net(x, hidden)
    else:
        packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
        y_packed, final = net(packed, hidden)
        y, _ = pad_packed_sequence(y_packed, total_length=T)
    final = dict(zip(("h", "c"), final)) if kind == "lstm" else {"h": final}
    loss = (y * torch.tensor(data["dy"])).sum()
    loss = loss + sum((final[k][0] * torch.tensor(v)).sum() for k, v in data["d_states"].items())
    net.zero_grad()
    loss.backward()
    return dict(
        outputs=y.detach().numpy(),
        states={k: v[0].detach().numpy() for k, v in final.items()},
        params=param_grads(kind, net),
        d_x=x.grad.numpy(),
        d_states={k: v.grad[0].numpy() for k, v in s0.items()},
    )


def run_rnnc(kind: str, net, data, lengths, recompute: str):
    prog = rnnc.compile(example(kind), dims={"D": D, "H": H}, recompute=recompute)
    mod = prog.load(backend="numpy", dtype="float64")
    res = mod.forward(inputs={"x": data["x"]}, params=rnnc_params(kind, net),
                      states=data["states"],
                      lengths=None if lengths is None else np.array(lengths))
    g = mod.backward(res, d_outputs={"y": data["dy"]}, d_states=data["d_states"])
    return dict(outputs=res.outputs["y"], states=res.states, params=g.params,
                d_x=g.inputs["x"], d_states=g.states)


def assert_close(ours, theirs, label):
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOL, err_msg=label)


@pytest.mark.parametrize("recompute", ["auto", "none", "all"])
@pytest.mark.parametrize("lengths", [None, LENGTHS], ids=["full", "packed"])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_equals_torch(kind, lengths, recompute):
    net, data = make_case(kind, seed=len(kind) + (lengths is not None))
    theirs = run_torch(kind, net, data, lengths)
    ours = run_rnnc(kind, net, data, lengths, recompute)
    assert_close(ours["outputs"], theirs["outputs"], "outputs")
    for s in data["states"]:
        assert_close(ours["states"][s], theirs["states"][s], f"final state {s}")
        assert_close(ours["d_states"][s], theirs["d_states"][s], f"gradient of initial state {s}")
    assert_close(ours["d_x"], theirs["d_x"], "gradient of inputs x")
    assert set(ours["params"]) == set(theirs["params"])
    for p in theirs["params"]:
        assert_close(ours["params"][p], theirs["params"][p], f"gradient of param {p}")


def test_packed_outputs_are_zero_past_each_length():
    """The padding rule itself: nothing leaks into steps past an element's length."""
    net, data = make_case("lstm", seed=7)
    ours = run_rnnc("lstm", net, data, LENGTHS, "auto")
    for b, n in enumerate(LENGTHS):
        assert np.all(ours["outputs"][n:, b] == 0)
        assert np.all(ours["d_x"][n:, b] == 0)
        assert np.any(ours["outputs"][:n, b] != 0)
