"""rnnc.torch with random ops: seeds from torch's generator, train() and
eval(), and the two regularised examples learning a task."""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is an optional dependency (pip install 'rnnc[torch]')")
import rnnc.torch  # noqa: E402

from conftest import example  # noqa: E402

D, H = 2, 8


def delayed_copy(T: int, B: int):
    """Inputs [T, B, D] and targets [T, B, 1]: each step's target is the first
    input of the step before, so the cell must remember one step."""
    x = torch.randn(T, B, D, dtype=torch.float64)
    target = torch.zeros(T, B, 1, dtype=torch.float64)
    target[1:] = x[:-1, :, :1]
    return x, target


def train(name: str, steps: int, seed: int = 0):
    """Adam on the delayed copy: (training losses, the eval() loss on new data)."""
    torch.manual_seed(seed)
    cell = rnnc.torch.Cell(example(name), dims={"D": D, "H": H}, seed=seed, dtype=torch.float64)
    readout = torch.nn.Linear(H, 1).double()
    opt = torch.optim.Adam([*cell.parameters(), *readout.parameters()], lr=0.03)

    def loss_of(x, target):
        outputs, _ = cell(x)
        return ((readout(outputs["y"]) - target)[1:] ** 2).mean()
    losses = []
    for _ in range(steps):
        loss = loss_of(*delayed_copy(8, 16))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    cell.eval()
    with torch.no_grad():
        return losses, loss_of(*delayed_copy(8, 256)).item()


# Chance is the targets' variance, 1. The seeded runs end near 0.05 (zoneout
# LSTM) and 0.02 (variational GRU) in eval(); 0.15 leaves room for other BLAS
# builds taking slightly different float64 paths.
BOUND = 0.15


@pytest.mark.parametrize("name", ["zoneout_lstm", "variational_gru"])
def test_regularised_examples_learn(name):
    losses, evaluated = train(name, steps=200)
    assert np.mean(losses[:10]) > 0.5  # starts near chance
    assert np.mean(losses[-20:]) < 2 * BOUND  # training, with its masks
    assert evaluated < BOUND


def outputs(cell, x):
    return cell(x)[0]["y"].detach()


def test_manual_seed_repeats_a_run_and_eval_takes_expectations():
    cell = rnnc.torch.Cell(example("zoneout_lstm"), dims={"D": D, "H": H}, dtype=torch.float64)
    x = torch.randn(5, 3, D, dtype=torch.float64)
    torch.manual_seed(1)
    first = outputs(cell, x)
    torch.manual_seed(1)
    assert torch.equal(outputs(cell, x), first)
    assert not torch.equal(outputs(cell, x), first)  # the generator moved on: new masks
    cell.eval()
    expected = outputs(cell, x)
    assert torch.equal(outputs(cell, x), expected) and not torch.equal(expected, first)
    program = cell.program.load(dtype="float64")  # eval() is train=False on the module
    want = program.forward({"x": x.numpy()}, {k: v.detach().numpy() for k, v in cell.params.items()}, train=False)
    assert np.allclose(expected.numpy(), want.outputs["y"], rtol=1e-12, atol=0)


def test_gradients_in_eval_mode_are_those_of_the_expectation():
    """eval() with gradients: the backward keeps its tape and the masks stay expectations."""
    cell = rnnc.torch.Cell(example("variational_gru"), dims={"D": D, "H": H}, dtype=torch.float64)
    cell.eval()
    x = torch.randn(4, 2, D, dtype=torch.float64, requires_grad=True)
    cell(x)[0]["y"].sum().backward()
    plain = rnnc.torch.Cell(example("gru"), dims={"D": D, "H": H}, dtype=torch.float64)
    with torch.no_grad():
        for name, p in plain.params.items():
            p.copy_(cell.params[name])
    x2 = x.detach().clone().requires_grad_(True)
    plain(x2)[0]["y"].sum().backward()
    assert torch.allclose(x.grad, x2.grad, rtol=1e-12, atol=1e-15)
    assert torch.allclose(cell.U.grad, plain.U.grad, rtol=1e-12, atol=1e-15)


def test_a_cell_that_draws_nothing_leaves_torchs_generator_alone():
    cell = rnnc.torch.Cell(example("gru"), dims={"D": D, "H": H}, dtype=torch.float64)
    torch.manual_seed(5)
    cell(torch.zeros(2, 1, D, dtype=torch.float64))
    after = torch.rand(1)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(1), after)
