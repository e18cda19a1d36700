"""rnnc.torch.RNN: equal to nn.LSTM / nn.GRU / nn.RNN, layers of any cell, and a torch module's manners."""
import copy
import io
import pickle

import pytest

torch = pytest.importorskip(
    "torch", reason="torch is an optional dependency (pip install 'rnnc[torch]'); "
                    "rnnc.torch cannot be tested without it")
from torch import nn  # noqa: E402
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence  # noqa: E402

import rnnc.torch  # noqa: E402
from rnnc.torch import RNN, Cell  # noqa: E402

from conftest import example  # noqa: E402

TOL = 1e-9
T, B, D, H, P = 4, 3, 3, 4, 2
LENGTHS = torch.tensor([2, 4, 1])  # unsorted, one full, one of a single step

TORCH_KINDS = {
    "lstm": lambda **kw: nn.LSTM(D, H, **kw),
    "lstm_proj": lambda **kw: nn.LSTM(D, H, proj_size=P, **kw),
    "gru": lambda **kw: nn.GRU(D, H, **kw),
    "rnn_tanh": lambda **kw: nn.RNN(D, H, **kw),
    "rnn_relu": lambda **kw: nn.RNN(D, H, nonlinearity="relu", **kw),
}


def make_torch(kind: str, seed: int, **options) -> nn.Module:
    torch.manual_seed(seed)
    return TORCH_KINDS[kind](**options).double()


def initial_states(net, gen) -> tuple:
    """Random (h0,) or (h0, c0): [layers * directions, B, size]."""
    lead = (net.num_layers * (2 if net.bidirectional else 1), B)
    h = getattr(net, "proj_size", 0) or net.hidden_size
    sizes = (h, net.hidden_size) if isinstance(net, nn.LSTM) else (h,)
    return tuple(torch.randn(*lead, n, generator=gen, dtype=torch.float64, requires_grad=True)
                 for n in sizes)


def forward_and_gradients(module, net, packed: bool, seed: int):
    """Output, final states and the gradients of the input, initial states and every
    parameter (by name) of a random linear loss, for `module` called as `net` is."""
    gen = torch.Generator().manual_seed(seed)
    shape = (B, T, D) if net.batch_first else (T, B, D)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
    hx = initial_states(net, gen)
    inp = pack_padded_sequence(x, LENGTHS, batch_first=net.batch_first, enforce_sorted=False) \
        if packed else x
    out, h_n = module(inp, hx if len(hx) > 1 else hx[0])
    h_n = h_n if isinstance(h_n, tuple) else (h_n,)
    y = out.data if packed else out
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    loss = (y * dy).sum() + sum((h * torch.randn(h.shape, generator=gen, dtype=torch.float64)).sum()
                                for h in h_n)
    params = dict(module.named_parameters())
    grads = torch.autograd.grad(loss, [x, *hx, *params.values()])
    names = ["input", *(f"initial state {i}" for i in range(len(hx))), *params]
    return out, h_n, dict(zip(names, grads))


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["time_first", "batch_first"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("kind", sorted(TORCH_KINDS))
def test_from_torch_equals_torch(kind, num_layers, bidirectional, batch_first, packed):
    net = make_torch(kind, seed=num_layers, num_layers=num_layers, bidirectional=bidirectional,
                     batch_first=batch_first)
    rnn = RNN.from_torch(net)
    ours, theirs = (forward_and_gradients(m, net, packed, seed=7) for m in (rnn, net))
    if packed:
        assert isinstance(ours[0], PackedSequence)
        for field in ("batch_sizes", "sorted_indices", "unsorted_indices"):
            assert torch.equal(getattr(ours[0], field), getattr(theirs[0], field)), field
    torch.testing.assert_close(ours[0].data if packed else ours[0],
                               theirs[0].data if packed else theirs[0], rtol=0, atol=TOL)
    assert len(ours[1]) == len(theirs[1])
    for i, (h, th) in enumerate(zip(ours[1], theirs[1])):
        torch.testing.assert_close(h, th, rtol=0, atol=TOL, msg=f"final state {i}")
    assert ours[2].keys() == theirs[2].keys()  # every parameter has torch's name
    for name, g in theirs[2].items():
        torch.testing.assert_close(ours[2][name], g, rtol=0, atol=TOL, msg=f"gradient of {name}")


@pytest.mark.parametrize("kind", sorted(TORCH_KINDS))
def test_without_bias_and_with_lengths_on_padded_input(kind):
    """bias=False, and lengths= on a padded tensor act as the same PackedSequence."""
    net = make_torch(kind, seed=3, num_layers=2, bidirectional=True, bias=False)
    rnn = RNN.from_torch(net)
    x = torch.randn(T, B, D, dtype=torch.float64)
    y, _ = rnn(x, lengths=LENGTHS)
    packed, _ = net(pack_padded_sequence(x, LENGTHS, enforce_sorted=False))
    ours = pack_padded_sequence(y, LENGTHS, enforce_sorted=False)
    torch.testing.assert_close(ours.data, packed.data, rtol=0, atol=TOL)
    for b, n in enumerate(LENGTHS):
        assert torch.all(y[n:, b] == 0)


@pytest.mark.parametrize("kind", sorted(TORCH_KINDS))
def test_to_torch_round_trip_is_exact(kind):
    net = make_torch(kind, seed=4, num_layers=2, bidirectional=True, batch_first=True, dropout=0.25,
                     bias=kind != "gru")
    back = RNN.from_torch(net).to_torch()
    assert type(back) is type(net)
    for attr in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                 "bidirectional", "proj_size", "nonlinearity", "mode"):
        assert getattr(back, attr, None) == getattr(net, attr, None), attr
    mine, theirs = back.state_dict(), net.state_dict()
    assert list(mine) == list(theirs)
    for name, value in theirs.items():
        assert torch.equal(mine[name], value), name


def test_state_dict_is_interchangeable_with_torchs():
    """Keys, shapes and meaning: another nn.LSTM's state_dict loads into the RNN."""
    net = make_torch("lstm_proj", seed=5, num_layers=2, bidirectional=True)
    rnn = RNN.from_torch(make_torch("lstm_proj", seed=6, num_layers=2, bidirectional=True))
    assert {k: v.shape for k, v in rnn.state_dict().items()} == \
        {k: v.shape for k, v in net.state_dict().items()}
    rnn.load_state_dict(net.state_dict())
    x = torch.randn(T, B, D, dtype=torch.float64)
    torch.testing.assert_close(rnn(x)[0], net(x)[0], rtol=0, atol=TOL)
    assert (rnn.input_size, rnn.hidden_size, rnn.proj_size) == (D, H, P)


def test_dropout_between_layers_as_torch():
    """dropout=1 drops every value between layers (so it is deterministic) in training
    only; never after the last layer."""
    net = make_torch("lstm", seed=8, num_layers=2, dropout=1.0)
    rnn = RNN.from_torch(net)
    x = torch.randn(T, B, D, dtype=torch.float64)
    for mode in (True, False):
        net.train(mode)
        rnn.train(mode)
        torch.testing.assert_close(rnn(x)[0], net(x)[0], rtol=0, atol=TOL, msg=f"training={mode}")
    rnn.train()
    assert not torch.allclose(rnn(x)[0], rnn.eval()(x)[0])
    with pytest.warns(UserWarning, match="num_layers=1"):
        RNN(TWIN, dims={"D": D, "H": H}, dropout=0.5)


# --- layers of any cell ----------------------------------------------------------------------
# two states, so the nn.LSTM convention passes (h, m); the output is not a state
TWIN = """
cell twin {
    dim D, H
    input x[D]
    state h[H], m[H]
    param W[D, 2*H], U[H, 2*H], b[2*H] = 0.1

    a, z = split(x @ W + h @ U + b, 2)
    m_new = 0.5 * m + tanh(a)
    h_new = sigmoid(z) * tanh(m_new)

    next h = h_new
    next m = m_new
    output y = 2 * h_new
}
"""
# a context and two outputs: the dict convention
GLOSS = """
cell gloss {
    dim D, H, E
    input x[D]
    context e[E]
    state h[H]
    param W[D, H], V[E, H], U[H, H]

    h_new = tanh(x @ W + e @ V + h @ U)

    next h = h_new
    output y = h_new
    output score = sum(h_new * h, axis=-1, keepdims=1)
}
"""


def by_hand(rnn: RNN, text: str, dims: dict, inputs: dict, states: dict, contexts: dict, lengths):
    """The layers and directions of `rnn` run one Cell at a time with its weights, in `rnn`'s
    mode: each layer reads the outputs of the one below side by side; states are indexed
    layer * dirs + dir."""
    outputs, finals = None, {}
    for layer in range(rnn.num_layers):
        per_direction = []
        for direction in range(rnn.directions):
            width = next(iter(inputs.values())).shape[-1]
            cell = Cell(text, dims={**dims, "D": width}, dtype=torch.float64).train(rnn.training)
            with torch.no_grad():
                for name, value in rnn.cell_params(layer, direction).items():
                    cell.params[name].copy_(value)
            j = layer * rnn.directions + direction
            out, final = cell(inputs, states={s: v[j] for s, v in states.items()}, contexts=contexts,
                              lengths=lengths, reverse=direction == 1)
            per_direction.append(out)
            for s, v in final.items():
                finals.setdefault(s, []).append(v)
        outputs = {o: torch.cat([d[o] for d in per_direction], dim=-1) for o in per_direction[0]}
        inputs = {"x": outputs.get("y")}
    return outputs, {s: torch.stack(v) for s, v in finals.items()}


def test_layers_of_a_new_cell_in_the_lstm_convention():
    rnn = RNN(TWIN, dims={"D": D, "H": H}, num_layers=3, bidirectional=True, dtype=torch.float64,
              seed=2)
    assert rnn.input_size == D and rnn.hidden_size == H
    assert [n for n, _ in rnn.named_parameters()][:4] == ["W_l0", "U_l0", "b_l0", "W_l0_reverse"]
    assert rnn.W_l1.shape == (2 * H, 2 * H)  # the layer above reads both directions
    assert not torch.equal(rnn.W_l0, rnn.W_l0_reverse)  # each its own seed
    x = torch.randn(T, B, D, dtype=torch.float64)
    h0, m0 = (torch.randn(6, B, H, dtype=torch.float64) for _ in range(2))
    y, (h_n, m_n) = rnn(x, (h0, m0), lengths=LENGTHS)
    want, finals = by_hand(rnn, TWIN, {"D": D, "H": H}, {"x": x}, {"h": h0, "m": m0}, {}, LENGTHS)
    torch.testing.assert_close(y, want["y"], rtol=0, atol=TOL)
    torch.testing.assert_close(h_n, finals["h"], rtol=0, atol=TOL)
    torch.testing.assert_close(m_n, finals["m"], rtol=0, atol=TOL)


@pytest.mark.parametrize("plan", ["all", "auto", "budget"])
def test_every_plan_gives_the_same_layer(plan):
    """Each layer and direction (the one above compiled again, with the same plan options)."""
    dims = {"D": D, "H": H}
    if plan == "budget":
        roomy = rnnc.compile(TWIN, dims=dims, recompute="none").plan.peak_bytes(T, B, "float64")
        program = rnnc.compile(TWIN, dims=dims, memory_budget=roomy // 2, seq_len=T, batch=B,
                               dtype="float64")
        assert len(program.plan.segments) > 1
    else:
        program = rnnc.compile(TWIN, dims=dims, recompute=plan)
    planned = RNN(program, num_layers=2, bidirectional=True, dtype=torch.float64)
    reference = RNN(TWIN, dims=dims, num_layers=2, bidirectional=True, recompute="none",
                    dtype=torch.float64)
    reference.load_state_dict(planned.state_dict())
    assert planned._layers[1].program.plan.budget == program.plan.budget
    x = torch.randn(T, B, D, dtype=torch.float64, requires_grad=True)
    results = []
    for rnn in (planned, reference):
        y, (h_n, m_n) = rnn(x, lengths=LENGTHS)
        grads = torch.autograd.grad((y.square().sum() + h_n.sum() + m_n.sum()), [x, *rnn.parameters()])
        results.append([y, h_n, m_n, *grads])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=TOL)


def test_dicts_for_a_cell_with_a_context_and_two_outputs():
    dims = {"D": D, "H": H, "E": 2}
    rnn = RNN(GLOSS, dims=dims, bidirectional=True, batch_first=True, dtype=torch.float64)
    x = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    e = torch.randn(B, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, B, H, dtype=torch.float64)
    outputs, states = rnn({"x": x}, {"h": h0}, contexts={"e": e}, lengths=LENGTHS)
    assert outputs["y"].shape == (B, T, 2 * H) and outputs["score"].shape == (B, T, 2)
    assert states["h"].shape == (2, B, H)
    want, finals = by_hand(rnn, GLOSS, dims, {"x": x.transpose(0, 1)}, {"h": h0}, {"e": e}, LENGTHS)
    for name in ("y", "score"):
        torch.testing.assert_close(outputs[name], want[name].transpose(0, 1), rtol=0, atol=TOL)
    torch.testing.assert_close(states["h"], finals["h"], rtol=0, atol=TOL)
    (outputs["score"].sum() + states["h"].sum()).backward()
    assert e.grad.abs().sum() > 0 and rnn.V_l0_reverse.grad.abs().sum() > 0


TWO_INPUTS = TWIN.replace("input x[D]", "input x[D], q[H]").replace("tanh(a)", "tanh(a) * q")
DOUBLE_WIDTH = TWIN.replace("input x[D]", "input x[2*D]").replace("W[D, 2*H]", "W[2*D, 2*H]")
D_SIZES_STATE = """
cell widen {
    dim D
    input x[D]
    state h[D]
    h_new = tanh(x + h)
    next h = h_new
    output y = h_new
}
"""


@pytest.mark.parametrize("text, dims, match", [
    (TWO_INPUTS, {"D": D, "H": H}, "one input and one output, but has inputs x, q"),
    (DOUBLE_WIDTH, {"D": D, "H": H}, r"sized by one dim alone \(as x\[D\]\); it is x\[2\*D\]"),
    (D_SIZES_STATE, {"D": D}, "dim D sizes .* also its states or output"),
])
def test_cells_that_cannot_be_stacked_say_why(text, dims, match):
    RNN(text, dims=dims, bidirectional=True)  # one layer is fine
    with pytest.raises(ValueError, match=match):
        RNN(text, dims=dims, num_layers=2, bidirectional=True)


@pytest.fixture(scope="module")
def lstm2():
    return RNN.from_torch(make_torch("lstm", seed=9, num_layers=2, bidirectional=True))


@pytest.mark.parametrize("call, match", [
    (lambda m, x: m(x, torch.zeros(4, B, H, dtype=torch.float64)), r"hx: expected a tuple \(h, c\)"),
    (lambda m, x: m(x, (torch.zeros(2, B, H, dtype=torch.float64),) * 2),
     r"initial state 'h': expected shape \[4, 3, 4\].*got \[2, 3, 4\]"),
    # batch-first input to a time-first layer: the states know the batch size
    (lambda m, x: m(x.transpose(0, 1), (torch.zeros(4, B, H, dtype=torch.float64),) * 2),
     r"initial state 'h': expected shape \[4, 4, 4\], .* B = 4 from input 'x' of shape \[3, 4, 3\], "
     r"read as \[T, B, \.\.\.\] \(time first; batch_first=True reads \[B, T, \.\.\.\]\); got \[4, 3, 4\]"),
    (lambda m, x: m(pack_padded_sequence(x, LENGTHS, enforce_sorted=False), lengths=LENGTHS),
     "PackedSequence holds its own lengths"),
    (lambda m, x: m(x[0]), r"input 'x': expected shape \[T, B, 3\], got \[3, 3\]; sequences are read "
     r"as \[T, B, \.\.\.\] \(time first"),
    (lambda m, x: m(pack_padded_sequence(x[..., :2], LENGTHS, enforce_sorted=False)),
     r"input 'x': expected a PackedSequence of steps of shape \[3\], got one of data \[7, 2\]"),
    (lambda m, x: m(x.numpy()),
     r"inputs: expected a tensor \[T, B, \.\.\.\], a PackedSequence or a dict \{name: tensor\} \(x\), got ndarray"),
    (lambda m, x: m({"x": x.numpy()}),
     r"input 'x': expected a tensor \[T, B, \.\.\.\].*or a PackedSequence, got ndarray"),
    (lambda m, x: m(x, contexts={"e": x}), "contexts: cell 'lstm' has none"),
    (lambda m, x: m(x, lengths=[5, 1, 1]), r"lengths: every length must lie in 0\.\.4, the T of input 'x' "
     r"of shape \[4, 3, 3\], read as \[T, B, \.\.\.\]"),
    (lambda m, x: m(x.transpose(0, 1), lengths=[4, 1, 1]), r"lengths: expected shape \[4\], one length per "
     r"batch element of input 'x' of shape \[3, 4, 3\], read as \[T, B, \.\.\.\] \(time first"),
])
def test_bad_calls_are_value_errors_that_say_what_is_wrong(lstm2, call, match):
    with pytest.raises(ValueError, match=match):
        call(lstm2, torch.randn(T, B, D, dtype=torch.float64))


def test_a_batch_first_callers_errors_show_its_own_shapes():
    """The backends see sequences time first; a batch-first caller's mistakes are told in
    [B, T, ...], with where T and B came from, for inputs, states and contexts alike."""
    dims = {"D": D, "H": H, "E": 2}
    x, e = torch.randn(B, T, D, dtype=torch.float64), torch.zeros(B, 2, dtype=torch.float64)
    read = r"input 'x' of shape \[3, 4, 3\], read as \[B, T, \.\.\.\] \(batch_first=True\)"
    rnn = RNN(GLOSS, dims=dims, batch_first=True, dtype=torch.float64)
    cell = Cell(GLOSS, dims=dims, batch_first=True, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"input 'x': expected shape \[B, T, 3\], got \[3, 4, 2\]; "
                                         r"sequences are read as \[B, T, \.\.\.\] \(batch_first=True\)"):
        rnn({"x": x[..., :2]}, contexts={"e": e})
    with pytest.raises(ValueError, match=r"contexts\['e'\]: expected shape \[3, 2\], \[B, \.\.\.\] with "
                                         r"B = 3 from " + read + r"; got \[2, 2\]"):
        rnn({"x": x}, contexts={"e": e[1:]})
    with pytest.raises(ValueError, match=r"states\['h'\]: expected shape \[3, 4\], .* from " + read):
        cell({"x": x}, {"h": torch.zeros(B + 1, H, dtype=torch.float64)}, contexts={"e": e})
    two = RNN(TWO_INPUTS, dims={"D": D, "H": H}, batch_first=True, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"input 'q': expected shape \[3, 4, 4\], got \[3, 3, 4\]; "
                                         r"T and B from " + read):
        two({"x": x, "q": torch.zeros(B, T - 1, H, dtype=torch.float64)})
    gru = RNN.from_torch(make_torch("gru", seed=9, num_layers=2))
    with pytest.raises(ValueError, match=r"hx: expected a tensor \[num_layers \* directions, B, \.\.\.\], "
                                         r"got a tuple of 1"):
        gru(x.transpose(0, 1), (torch.zeros(2, B, H, dtype=torch.float64),))


@pytest.mark.parametrize("make, match", [
    (lambda: RNN(TWIN, dims={"D": D, "H": H}, num_layers=0), "num_layers: expected a positive"),
    (lambda: RNN(TWIN, dims={"D": D, "H": H}, num_layers=2, dropout=1.5), "dropout: expected a probability"),
    (lambda: RNN(TWIN, dims={"D": D, "H": H}).to_torch(), "not made by RNN.from_torch"),
    (lambda: RNN.from_torch(nn.Linear(2, 3)), "expected torch.nn.LSTM, GRU or RNN, got Linear"),
    (lambda: RNN(GLOSS.replace("keepdims=1", "keepdims=0"), dims={"D": D, "H": H, "E": 2},
                 bidirectional=True), "output score of cell 'gloss' has none"),
])
def test_bad_settings(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_cell_says_what_it_takes():
    cell = Cell.from_torch(make_torch("lstm", seed=10))
    x = torch.randn(T, B, D, dtype=torch.float64)
    hx = (torch.zeros(B, H, dtype=torch.float64),) * 2
    with pytest.raises(ValueError, match=r"states: expected a dict \{name: tensor\} \(h, c\), got tuple"):
        cell(x, hx)
    with pytest.raises(ValueError, match="inputs: a PackedSequence goes to rnnc.torch.RNN"):
        cell(pack_padded_sequence(x, LENGTHS, enforce_sorted=False))


@pytest.mark.parametrize("kind", sorted(TORCH_KINDS))
def test_cell_from_torch_keeps_batch_first(kind):
    """The silent wrong answer of old: a batch_first module's Cell read [B, T, D] as [T, B, D]."""
    net = make_torch(kind, seed=11, batch_first=True)
    cell = Cell.from_torch(net)
    x = torch.randn(B, T, D, dtype=torch.float64)
    torch.testing.assert_close(cell(x)[0]["y"], net(x)[0], rtol=0, atol=TOL)
    back = cell.to_torch()
    assert back.batch_first and type(back) is type(net)
    torch.testing.assert_close(back(x)[0], net(x)[0], rtol=0, atol=TOL)


# --- manners of a torch module ----------------------------------------------------------------
class Tagger(nn.Module):
    """A model with an rnnc layer inside, as a user would write one."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(D, D).double()
        self.rnn = RNN.from_torch(make_torch("gru", seed=12, num_layers=2, bidirectional=True))
        self.head = nn.Linear(2 * H, 2).double()

    def forward(self, x, lengths=None):
        y, h_n = self.rnn(torch.tanh(self.embed(x)), lengths=lengths)
        return self.head(y).sum() + h_n.sum()


class CellTagger(nn.Module):
    """The same with one Cell (dicts by name) instead of an RNN."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(D, D).double()
        self.cell = Cell.from_torch(make_torch("lstm", seed=13))
        self.head = nn.Linear(H, 2).double()

    def forward(self, x, lengths=None):
        outputs, states = self.cell(torch.tanh(self.embed(x)), lengths=lengths)
        return self.head(outputs["y"]).sum() + states["c"].sum()


def loss_and_grads(model, x):
    model.zero_grad()
    loss = model(x, LENGTHS)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("make", [Tagger, CellTagger])
def test_torch_save_rebuilds_the_compiled_code(make, tmp_path):
    model = make()
    x = torch.randn(T, B, D, dtype=torch.float64)
    want = loss_and_grads(model, x)
    data = pickle.dumps(model)
    assert b"rnnc.backends" not in data and b"rnnc.driver" not in data  # no compiled code inside
    rnnc.torch._compiled.cache_clear()  # as in a fresh process: loading must compile again
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert rnnc.torch._compiled.cache_info().currsize >= 1
    got = loss_and_grads(loaded, x)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    for name, g in want[1].items():
        torch.testing.assert_close(got[1][name], g, rtol=0, atol=0, msg=name)


def test_deepcopy_is_independent():
    model = Tagger()
    twin = copy.deepcopy(model)
    x = torch.randn(T, B, D, dtype=torch.float64)
    torch.testing.assert_close(twin(x, LENGTHS), model(x, LENGTHS), rtol=0, atol=0)
    with torch.no_grad():
        twin.rnn.weight_hh_l1_reverse.mul_(2)
    assert not torch.equal(twin.rnn.weight_hh_l1_reverse, model.rnn.weight_hh_l1_reverse)
    assert not torch.allclose(twin(x, LENGTHS), model(x, LENGTHS))


def test_to_another_dtype_and_device():
    model = Tagger()
    x = torch.randn(T, B, D, dtype=torch.float64)
    want = model(x, LENGTHS)
    single = copy.deepcopy(model).to(torch.float32).to("cpu")
    assert single.rnn.weight_ih_l0.dtype == torch.float32
    got = single(x.float(), LENGTHS)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("make", [Tagger, CellTagger])
def test_torch_compile_breaks_the_graph_once_per_call_and_never_recompiles(make, caplog):
    torch._dynamo.reset()
    model = make()
    compiled = torch.compile(model, backend="eager")
    explained = torch._dynamo.explain(model)(torch.randn(T, B, D, dtype=torch.float64), LENGTHS)
    assert explained.graph_break_count == 1 and explained.graph_count == 2  # before and after it
    assert "torch.compiler.disable" in str(explained.break_reasons[0].reason)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()

    def calls(sizes):
        for t, b in sizes:
            x = torch.randn(t, b, D, dtype=torch.float64)
            lengths = torch.randint(1, t + 1, (b,))
            torch.testing.assert_close(compiled(x, lengths), model(x, lengths), rtol=0, atol=TOL)
    # torch compiles the frames before and after the break once, then once more for each
    # size that changes (T, then B), to make it dynamic: that is torch's, not rnnc's
    calls([(4, 3), (5, 3), (3, 2)])
    warm = counters["stats"]["unique_graphs"]
    assert warm <= 2 * 3
    calls([(6, 4), (2, 5), (4, 3), (7, 2), (3, 3)])  # new sizes and lengths: nothing to recompile
    assert counters["stats"]["unique_graphs"] == warm
    assert "recompile_limit" not in caplog.text and "cache_size_limit" not in caplog.text


def test_pickled_bytes_load_without_torch_save():
    """pickle itself (what DataLoader workers and multiprocessing use)."""
    rnn = RNN(TWIN, dims={"D": D, "H": H}, num_layers=2, dtype=torch.float64)
    buffer = io.BytesIO()
    pickle.dump(rnn, buffer)
    again = pickle.loads(buffer.getvalue())
    x = torch.randn(T, B, D, dtype=torch.float64)
    torch.testing.assert_close(again(x)[0], rnn(x)[0], rtol=0, atol=0)


def test_a_pickled_layer_keeps_every_compile_option():
    """The recipe holds all of them: the policy (a manual list too) and the precision, for
    the layer above too."""
    program = rnnc.compile(TWIN, dims={"D": D, "H": H}, recompute=["m_new"], precision="tf32")
    rnn = RNN(program, num_layers=2, bidirectional=True, dtype=torch.float64)
    again = pickle.loads(pickle.dumps(rnn))
    for layer in again._layers:
        assert layer.program.precision == "tf32" and layer.program.plan.policy == "[m_new]"
    x = torch.randn(T, B, D, dtype=torch.float64)
    torch.testing.assert_close(again(x)[0], rnn(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_runs_every_layer_in_16_bits_and_keeps_float32_gradients(dtype):
    """Under CPU autocast each layer and direction casts its float32 params, input and
    states to the autocast dtype on the way in: the same answer, to the bit, as the layer
    converted to that dtype, and float32 gradients that are its gradients widened. (A GRU:
    an LSTM from torch adds its two biases first, in float32 under autocast, which rounds
    once where the converted layer rounds each.)"""
    rnn = RNN.from_torch(make_torch("gru", seed=14, num_layers=2, bidirectional=True).float())
    narrow = copy.deepcopy(rnn).to(dtype)
    x, h0 = torch.randn(T, B, D), torch.randn(4, B, H)
    with torch.autocast("cpu", dtype=dtype):
        y, h_n = rnn(pack_padded_sequence(x, LENGTHS, enforce_sorted=False), h0)
    want, want_h = narrow(pack_padded_sequence(x.to(dtype), LENGTHS, enforce_sorted=False), h0.to(dtype))
    assert y.data.dtype == h_n.dtype == dtype
    torch.testing.assert_close(y.data, want.data, rtol=0, atol=0)
    torch.testing.assert_close(h_n, want_h, rtol=0, atol=0)
    (y.data.float().sum() + h_n.float().sum()).backward()
    (want.data.float().sum() + want_h.float().sum()).backward()
    for (name, p), q in zip(rnn.named_parameters(), narrow.parameters()):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, q.grad.float(), rtol=0, atol=0, msg=name)
    assert rnn(x)[0].dtype == torch.float32  # outside autocast, float32 again


def test_a_layer_of_a_cell_that_draws_follows_train_and_eval():
    """Every layer and direction draws its own masks from torch's generator in training
    (torch.manual_seed repeats them) and takes the expectations in eval mode: then each
    is the Cell of its weights in eval mode."""
    rnn = RNN(example("zoneout_lstm"), dims={"D": D, "H": H}, num_layers=2, bidirectional=True,
              dtype=torch.float64)
    x = torch.randn(T, B, D, dtype=torch.float64)
    torch.manual_seed(1)
    first = rnn(x, lengths=LENGTHS)[0]
    torch.manual_seed(1)
    assert torch.equal(rnn(x, lengths=LENGTHS)[0], first)
    assert not torch.equal(rnn(x, lengths=LENGTHS)[0], first)  # the generator moved on
    rnn.eval()
    y, (h_n, c_n) = rnn(x, lengths=LENGTHS)
    want, finals = by_hand(rnn, example("zoneout_lstm").read_text(), {"D": D, "H": H}, {"x": x},
                           {}, {}, LENGTHS)
    torch.testing.assert_close(y, want["y"], rtol=0, atol=TOL)
    torch.testing.assert_close(c_n, finals["c"], rtol=0, atol=TOL)
