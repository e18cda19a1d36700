"""Data parallel over rnnc.torch.RNN: a 2-layer bidirectional layer under DistributedDataParallel.

As test_torch_ddp.py does for a Cell: two CPU ranks each take half of a batch
of variable-length sequences and make one SGD step; their parameters must
equal those of one process that made the step on the whole batch (DDP
averages the ranks' gradients, so it uses the mean loss over the batch). The
layer runs its four compiled cells (two layers, two directions) inside one
DDP backward, and its dropout is off so both sides compute the same function.
"""
import pytest

torch = pytest.importorskip("torch", reason="torch is an optional dependency (pip install "
                                            "'rnnc[torch]'); the data-parallel test needs it")
from torch import nn  # noqa: E402

from rnnc.torch import RNN  # noqa: E402

from conftest import example  # noqa: E402
import test_torch_ddp as ddp  # noqa: E402
from test_torch_ddp import B, D, H, WORLD, run_ranks, sgd_step  # noqa: E402


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)  # the same initial weights wherever it is built
        self.rnn = RNN(example("gru"), dims={"D": D, "H": H}, num_layers=2, bidirectional=True,
                       seed=0, dtype=torch.float64)
        self.readout = nn.Linear(2 * H, 1).double()

    def forward(self, x, lengths):
        y, h_n = self.rnn(x, lengths=lengths)
        return self.readout(y).squeeze(-1).sum(dim=0) + h_n.sum(dim=(0, 2))


def make_data():
    return ddp.make_data(lengths=(5, 2, 3, 1))  # the backward direction starts at each one's end


def ddp_step(rank: int, out_dir):
    model = nn.parallel.DistributedDataParallel(Tagger())
    x, target, lengths = make_data()
    half = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
    sgd_step(model, x[:, half], target[half], lengths[half])
    torch.save(model.module.state_dict(), out_dir / f"rank{rank}.pt")


def test_ddp_step_of_a_bidirectional_two_layer_rnn_equals_one_process(tmp_path):
    run_ranks(ddp_step, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    single = Tagger()
    before = {k: v.clone() for k, v in single.state_dict().items()}
    sgd_step(single, *make_data())
    after = single.state_dict()

    assert set(ranks[0]) == set(after)
    assert {k for k in after if k.startswith("rnn.")} >= {"rnn.W_l1", "rnn.W_l1_reverse"}
    for name, value in after.items():
        assert not torch.equal(value, before[name]), f"{name} did not move, so the test proves nothing"
        for r, state in enumerate(ranks):
            torch.testing.assert_close(state[name], value, rtol=0, atol=1e-12,
                                       msg=f"rank {r}, {name}")
