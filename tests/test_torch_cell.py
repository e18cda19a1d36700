"""rnnc.torch.Cell: autograd, weights from and to nn.LSTM/nn.GRU, argument errors."""
import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="torch is an optional dependency (pip install 'rnnc[torch]'); "
                    "rnnc.torch cannot be tested without it")
from torch.func import functional_call  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

import rnnc  # noqa: E402
from rnnc.torch import Cell  # noqa: E402

from conftest import example  # noqa: E402

TOL = 1e-9


def random_batch(cell: Cell, T: int, B: int, seed: int, requires_grad=True) -> dict:
    """Random float64 inputs [T, B, ...], initial states and contexts [B, ...] for `cell`."""
    gen = torch.Generator().manual_seed(seed)

    def shape(decl):
        return tuple(int(s.value) for s in decl.shape)

    def rand(*size):
        return torch.randn(*size, generator=gen, dtype=torch.float64, requires_grad=requires_grad)

    decls = cell.program.cell
    return {
        "inputs": {d.name: rand(T, B, *shape(d)) for d in decls.of_kind("input")},
        "states": {d.name: rand(B, *shape(d)) for d in decls.of_kind("state")},
        "contexts": {d.name: rand(B, *shape(d)) for d in decls.of_kind("context")},
    }


def randomise(cell: Cell, seed: int):
    """Nonzero values for every param (zero-initialised biases would hide bias bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cell.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


# --- torch.autograd.gradcheck ----------------------------------------------------------------
GRADCHECK_CASES = {
    "lstm": {"D": 2, "H": 3},
    "gru": {"D": 2, "H": 3},
    "attention_lstm": {"D": 2, "H": 2, "E": 3, "S": 2},
}


@pytest.mark.parametrize("lengths", [None, [3, 1]], ids=["full", "lengths"])
@pytest.mark.parametrize("name", sorted(GRADCHECK_CASES))
def test_gradcheck(name, lengths):
    """Every input, initial state, context and param, through outputs and final states."""
    cell = Cell(example(name), dims=GRADCHECK_CASES[name], dtype=torch.float64)
    randomise(cell, seed=1)
    batch = random_batch(cell, T=3, B=2, seed=2)
    params = {k: v.detach().clone().requires_grad_() for k, v in cell.params.items()}
    groups = {**batch, "params": params}
    layout = [(kind, name) for kind, named in groups.items() for name in named]

    def run(*tensors):
        named = {kind: {} for kind in groups}
        for (kind, name), t in zip(layout, tensors):
            named[kind][name] = t
        outputs, finals = functional_call(cell, named["params"], (named["inputs"],), dict(
            states=named["states"], contexts=named["contexts"], lengths=lengths))
        return (*outputs.values(), *finals.values())

    tensors = tuple(groups[kind][name] for kind, name in layout)
    assert torch.autograd.gradcheck(run, tensors, eps=1e-6, atol=1e-7)


def test_mixed_gradient_needs():
    """Only some arguments need gradients: those get the full run's values, the rest none."""
    cell = Cell(example("lstm"), dims={"D": 2, "H": 3}, dtype=torch.float64)
    randomise(cell, seed=3)
    batch = random_batch(cell, T=4, B=2, seed=4)
    outputs, finals = cell(batch["inputs"], states=batch["states"])
    (outputs["y"].sum() + finals["c"].sum()).backward()
    full = {"x": batch["inputs"]["x"].grad.clone(), "U": cell.U.grad.clone()}

    cell.zero_grad(set_to_none=True)
    cell.W.requires_grad_(False)
    cell.b.requires_grad_(False)
    x = batch["inputs"]["x"].detach().requires_grad_()
    states = {k: v.detach() for k, v in batch["states"].items()}
    outputs, finals = cell({"x": x}, states=states)
    (outputs["y"].sum() + finals["c"].sum()).backward()
    assert cell.W.grad is None and cell.b.grad is None
    torch.testing.assert_close(x.grad, full["x"], rtol=0, atol=TOL)
    torch.testing.assert_close(cell.U.grad, full["U"], rtol=0, atol=TOL)


def test_unused_result_counts_as_zero():
    """A final state the loss does not use (no cotangent reaches rnnc) acts as a zero cotangent."""
    cell = Cell(example("gru"), dims={"D": 2, "H": 3}, dtype=torch.float64)
    x = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)
    outputs, _ = cell(x)
    outputs["y"].pow(2).sum().backward()
    only_outputs = x.grad.clone()
    x.grad = None
    outputs, finals = cell(x)
    (outputs["y"].pow(2).sum() + 0 * finals["h"].sum()).backward()
    torch.testing.assert_close(x.grad, only_outputs, rtol=0, atol=TOL)


def test_inference_keeps_no_graph_and_matches_training():
    cell = Cell(example("lstm"), dims={"D": 2, "H": 3}, dtype=torch.float64)
    randomise(cell, seed=5)
    x = torch.randn(4, 2, 2, dtype=torch.float64)
    train_out, _ = cell(x)
    with torch.no_grad():
        infer_out, infer_final = cell(x)
    assert train_out["y"].requires_grad and not infer_out["y"].requires_grad
    torch.testing.assert_close(infer_out["y"], train_out["y"].detach(), rtol=0, atol=0)


def test_in_place_change_before_backward_is_caught():
    """The backward reads the input's memory, so changing it in place must raise, not mislead."""
    cell = Cell(example("gru"), dims={"D": 2, "H": 3}, dtype=torch.float64)
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    x_leafless = x * 1  # a non-leaf, so it may be changed in place
    outputs, _ = cell(x_leafless)
    with torch.no_grad():
        x_leafless.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        outputs["y"].sum().backward()


def test_float32_matches_float64():
    cell = Cell(example("gru"), dims={"D": 3, "H": 4}, dtype=torch.float32)
    x = torch.randn(5, 2, 3)
    out32, _ = cell(x)
    out64, _ = cell.double()(x.double())
    assert out32["y"].dtype == torch.float32
    torch.testing.assert_close(out32["y"].double(), out64["y"], rtol=0, atol=1e-5)


def test_param_named_like_a_module_attribute():
    """Any identifier may name a param, even one nn.Module already uses (`train`)."""
    text = """
    cell odd {
        dim D, H
        input x[D]
        state h[H]
        param W[D, H], train[H]
        h_new = tanh(x @ W + h * train)
        next h = h_new
        output y = h_new
    }"""
    cell = Cell(text, dims={"D": 2, "H": 3}, dtype=torch.float64)
    assert [n for n, _ in cell.named_parameters()] == ["W", "train"]
    assert callable(cell.train)  # nn.Module's method is untouched
    outputs, _ = cell(torch.randn(3, 2, 2, dtype=torch.float64))
    outputs["y"].sum().backward()
    assert cell.params["train"].grad is not None and cell.params["train"].grad.abs().sum() > 0


# --- weights from and to torch.nn.LSTM / torch.nn.GRU ---------------------------------------
def torch_run(net, x, states, lengths):
    """torch's outputs [T, B, H] (zero past each length) and final states {name: [B, H]}."""
    hidden = tuple(s[None] for s in states.values())
    hidden = hidden if isinstance(net, torch.nn.LSTM) else hidden[0]
    if lengths is None:
        y, final = net(x, hidden)
    else:
        packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
        y_packed, final = net(packed, hidden)
        y, _ = pad_packed_sequence(y_packed, total_length=x.shape[0])
    final = final if isinstance(net, torch.nn.LSTM) else (final,)
    return y, {name: f[0] for name, f in zip(states, final)}


def as_torch_layout(grads: dict, kind: str) -> dict:
    """Gradients of a Cell's params laid out as the torch module's parameters
    (the LSTM's b feeds both torch biases, so both get its gradient)."""
    biases = ({"bias_ih_l0": grads["b"], "bias_hh_l0": grads["b"]} if kind == "lstm"
              else {"bias_ih_l0": grads["b_i"], "bias_hh_l0": grads["b_h"]})
    return {"weight_ih_l0": grads["W"].t(), "weight_hh_l0": grads["U"].t(), **biases}


@pytest.mark.parametrize("lengths", [None, [5, 2, 4]], ids=["full", "lengths"])
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_from_torch_equals_torch(kind, lengths):
    """Outputs, final states and the gradients of inputs, initial states and every weight."""
    torch.manual_seed(6)
    net = (torch.nn.LSTM if kind == "lstm" else torch.nn.GRU)(3, 4).double()
    cell = Cell.from_torch(net)
    assert cell.program.cell.name == kind
    batch = random_batch(cell, T=5, B=3, seed=7)
    x, states = batch["inputs"]["x"], batch["states"]
    dy = torch.randn(5, 3, 4, dtype=torch.float64)
    d_final = {name: torch.randn(3, 4, dtype=torch.float64) for name in states}

    def run(forward, weights):
        y, finals = forward()
        loss = (y * dy).sum() + sum((finals[k] * d).sum() for k, d in d_final.items())
        grads = torch.autograd.grad(loss, [x, *states.values(), *weights.values()])
        return y, finals, dict(zip(["x", *states, *weights], grads))

    def run_cell():
        outputs, finals = cell({"x": x}, states=states, lengths=lengths)
        return outputs["y"], finals

    y, finals, grads = run(run_cell, cell.params)
    ty, tfinals, tgrads = run(lambda: torch_run(net, x, states, lengths), dict(net.named_parameters()))

    torch.testing.assert_close(y, ty, rtol=0, atol=TOL)
    for name in states:
        torch.testing.assert_close(finals[name], tfinals[name], rtol=0, atol=TOL, msg=name)
    for name in ["x", *states]:
        torch.testing.assert_close(grads[name], tgrads[name], rtol=0, atol=TOL, msg=f"d{name}")
    for name, g in as_torch_layout(grads, kind).items():
        torch.testing.assert_close(g, tgrads[name], rtol=0, atol=TOL, msg=f"d{name}")


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_to_torch_round_trip(kind):
    torch.manual_seed(8)
    net = (torch.nn.LSTM if kind == "lstm" else torch.nn.GRU)(3, 4).double()
    back = Cell.from_torch(net).to_torch()
    assert type(back) is type(net)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(back(x)[0], net(x)[0], rtol=0, atol=TOL)
    w = dict(net.named_parameters())
    for name, p in back.named_parameters():
        if kind == "lstm" and name.startswith("bias"):
            continue  # only the LSTM's bias sum is defined; checked just below
        torch.testing.assert_close(p, w[name], rtol=0, atol=0)
    if kind == "lstm":
        torch.testing.assert_close(back.bias_ih_l0 + back.bias_hh_l0,
                                   net.bias_ih_l0 + net.bias_hh_l0, rtol=0, atol=TOL)


def test_from_torch_without_bias():
    torch.manual_seed(9)
    net = torch.nn.GRU(3, 4, bias=False).double()
    cell = Cell.from_torch(net)
    assert torch.all(cell.b_i == 0) and torch.all(cell.b_h == 0)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(cell(x)[0]["y"], net(x)[0], rtol=0, atol=TOL)


@pytest.mark.parametrize("make, match", [
    (lambda: torch.nn.LSTM(3, 4, num_layers=2), r"num_layers=2.*RNN.from_torch"),
    (lambda: torch.nn.GRU(3, 4, bidirectional=True), r"bidirectional=True.*RNN.from_torch"),
    (lambda: torch.nn.Linear(3, 4), "expected torch.nn.LSTM, GRU or RNN, got Linear"),
])
def test_from_torch_rejects_what_a_cell_cannot_hold(make, match):
    with pytest.raises(ValueError, match=match):
        Cell.from_torch(make())


def test_to_torch_rejects_other_cells():
    cell = Cell(example("peephole_lstm"), dims={"D": 3, "H": 4})
    with pytest.raises(ValueError, match="none of the shipped cells that torch has"):
        cell.to_torch()


# --- argument errors ----------------------------------------------------------------------
@pytest.fixture
def lstm32():
    return Cell(example("lstm"), dims={"D": 3, "H": 4}, dtype=torch.float32)


def test_mixed_dtypes_name_the_argument(lstm32):
    with pytest.raises(ValueError, match=r"params\['W'\]: torch.float32 .* input is torch.float64"):
        lstm32(torch.randn(2, 1, 3, dtype=torch.float64))


def test_unsupported_dtype(lstm32):
    with pytest.raises(ValueError, match="float32, float64, bfloat16 or float16"):
        lstm32.to(torch.float8_e5m2)(torch.randn(2, 1, 3).to(torch.float8_e5m2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_runs_in_16_bits_and_keeps_float32_gradients(dtype):
    """Under CPU autocast the Cell is the NumPy module of that dtype on its
    tensors rounded to it (to the bit: the casts and the memory shared with
    NumPy lose nothing), and the float32 params get float32 gradients, the
    module's 16-bit ones widened; outside autocast it is float32 again."""
    cell = Cell(example("lstm"), dims={"D": 3, "H": 4}, dtype=torch.float32)
    x, h0, lengths = torch.randn(5, 2, 3), torch.randn(2, 4), [5, 2]
    with torch.autocast("cpu", dtype=dtype):
        outputs, states = cell(x, states={"h": h0}, lengths=lengths)
    assert outputs["y"].dtype == states["c"].dtype == dtype
    outputs["y"].float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in cell.params.values())

    module = cell.program.load("numpy", {torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype])

    def rounded(t):  # as autocast's cast rounds it, in the module's dtype
        return t.detach().to(dtype).float().numpy().astype(module.dtype)
    res = module.forward(inputs={"x": rounded(x)}, params={k: rounded(p) for k, p in cell.params.items()},
                         states={"h": rounded(h0)}, lengths=np.array(lengths))
    np.testing.assert_array_equal(outputs["y"].detach().float().numpy(), res.outputs["y"].astype(np.float32))
    want = module.backward(res, {"y": np.ones_like(res.outputs["y"])})
    for k, p in cell.params.items():
        np.testing.assert_array_equal(p.grad.numpy(), want.params[k].astype(np.float32), err_msg=k)
    assert cell(x)[0]["y"].dtype == torch.float32


def test_16_bit_cells_run_without_autocast_too():
    """A Cell made in bfloat16 takes and gives bfloat16 tensors: the module's
    answer on the same values (ml_dtypes' bfloat16 has torch's bits)."""
    cell = Cell(example("gru"), dims={"D": 3, "H": 4}, dtype=torch.bfloat16)
    assert cell.W.dtype == torch.bfloat16
    x = torch.randn(4, 2, 3, dtype=torch.bfloat16, requires_grad=True)
    outputs, _ = cell(x)
    outputs["y"].float().sum().backward()
    assert x.grad.dtype == cell.W.grad.dtype == torch.bfloat16
    module = cell.program.load("numpy", "bfloat16")
    res = module.forward(inputs={"x": x.detach().float().numpy().astype(module.dtype)},
                         params={k: p.detach().float().numpy().astype(module.dtype) for k, p in cell.params.items()})
    np.testing.assert_array_equal(outputs["y"].detach().float().numpy(), res.outputs["y"].astype(np.float32))


def test_non_tensor_argument(lstm32):
    with pytest.raises(ValueError, match=r"states\['h'\]: expected a torch.Tensor, got ndarray"):
        lstm32(torch.randn(2, 1, 3), states={"h": np.zeros((1, 4), np.float32)})


def test_backend_errors_reach_the_caller(lstm32):
    with pytest.raises(ValueError, match=r"input 'x': expected shape \[T, B, 3\], got \[2, 1, 5\]"):
        lstm32(torch.randn(2, 1, 5))
    with pytest.raises(ValueError, match="states: unknown name 'q'"):
        lstm32(torch.randn(2, 1, 3), states={"q": torch.zeros(1, 4)})


def test_single_tensor_needs_a_single_input_cell():
    text = """
    cell two {
        dim D
        input a[D], b[D]
        state h[D]
        h_new = h + a * b
        next h = h_new
        output y = h_new
    }"""
    cell = Cell(text, dims={"D": 2})
    with pytest.raises(ValueError, match="has inputs a, b; pass a dict"):
        cell(torch.randn(2, 1, 2))


def test_program_with_compile_options_is_an_error():
    prog = rnnc.compile(example("gru"), dims={"D": 2, "H": 3})
    assert Cell(prog).program is prog
    with pytest.raises(ValueError, match="dims apply only when compiling"):
        Cell(prog, dims={"D": 2, "H": 3})


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present, so the cuda path may work")
def test_cuda_without_backend_says_what_to_install(lstm32):
    with pytest.raises(RuntimeError, match=r"cuda backend, which could not be loaded.*rnnc\[cuda\]"):
        lstm32._compiled.backend(torch.device("cuda", 0), torch.float32)
