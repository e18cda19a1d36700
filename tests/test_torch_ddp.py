"""Data parallel: DistributedDataParallel around a model built on rnnc.torch.Cell.

Two CPU processes (gloo, rendezvous through a file) each take half of a batch
and make one SGD step; their parameters must then equal those of one process
that made the step on the whole batch. DDP averages the gradients of the
ranks, so the single process uses the mean loss over the full batch (the
halves are of equal size).
"""
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="torch is an optional dependency (pip install "
                                            "'rnnc[torch]'); the data-parallel test needs it")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402

from rnnc.torch import Cell  # noqa: E402

from conftest import example  # noqa: E402

GRU_CELL = example("gru")
WORLD, T, B, D, H = 2, 5, 4, 3, 4
LR = 0.5
DEADLINE_S = 120  # a hang guard only: the test normally takes a few seconds


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)  # the same initial weights wherever it is built
        self.cell = Cell(GRU_CELL, dims={"D": D, "H": H}, seed=0, dtype=torch.float64)
        self.readout = nn.Linear(H, 1).double()

    def forward(self, x, lengths):
        outputs, finals = self.cell(x, lengths=lengths)
        return self.readout(finals["h"]).squeeze(-1) + outputs["y"].sum(dim=(0, 2))


def make_data():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, D, generator=gen, dtype=torch.float64)
    target = torch.randn(B, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([5, 2, 3, 4])  # variable lengths, so padding must behave too
    return x, target, lengths


def sgd_step(model, x, target, lengths):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loss = (model(x, lengths) - target).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def worker(rank: int, init_file: str, out_dir: str):
    torch.set_num_threads(1)  # two processes on a small machine: do not oversubscribe
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        model = nn.parallel.DistributedDataParallel(Model())
        x, target, lengths = make_data()
        half = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
        sgd_step(model, x[:, half], target[half], lengths[half])
        torch.save(model.module.state_dict(), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_workers(tmp_path: Path):
    """Spawn the ranks; fail (after stopping them) rather than hang if one never finishes."""
    ctx = mp.spawn(worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD,
                   join=False)
    deadline = time.monotonic() + DEADLINE_S
    while not ctx.join(timeout=1):  # raises if a rank failed, with its traceback
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"data-parallel ranks did not finish within {DEADLINE_S} s")


def test_ddp_step_equals_single_process_on_whole_batch(tmp_path):
    run_workers(tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    single = Model()
    before = {k: v.clone() for k, v in single.state_dict().items()}
    sgd_step(single, *make_data())
    after = single.state_dict()

    assert set(ranks[0]) == set(after) and any("cell." in k for k in after)
    for name, value in after.items():
        assert not torch.equal(value, before[name]), f"{name} did not move, so the test proves nothing"
        for r, state in enumerate(ranks):
            torch.testing.assert_close(state[name], value, rtol=0, atol=1e-12,
                                       msg=f"rank {r}, {name}")
