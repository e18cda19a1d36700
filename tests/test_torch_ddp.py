"""Data parallel: DistributedDataParallel around a model built on rnnc.torch.Cell.

Two CPU processes (gloo, rendezvous through a file) each take half of a batch
and make one SGD step; their parameters must then equal those of one process
that made the step on the whole batch. DDP averages the gradients of the
ranks, so the single process uses the mean loss over the full batch (the
halves are of equal size).

`run_ranks(body, tmp_path)` is the harness: it runs `body(rank, out_dir)` on
each rank inside the process group and tears the group down completely before
the rank exits (`_tear_down_process_group` says why that matters).
"""
import gc
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="torch is an optional dependency (pip install "
                                            "'rnnc[torch]'); the data-parallel test needs it")
import torch.distributed as dist  # noqa: E402
# Imported before any process group exists, on purpose: its collectives take
# `group=group.WORLD` as a default argument, evaluated when the module is first
# imported. DDP's constructor imports it (through torch._dynamo); first imported
# there, it would hold the rank's process group until the interpreter shuts down.
import torch.distributed.nn  # noqa: E402,F401
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


def make_data(lengths=(5, 2, 3, 4)):
    """A batch of B sequences; variable lengths, so padding must behave too."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, D, generator=gen, dtype=torch.float64)
    target = torch.randn(B, generator=gen, dtype=torch.float64)
    return x, target, torch.tensor(lengths)


def sgd_step(model, x, target, lengths):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loss = (model(x, lengths) - target).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def ddp_step(rank: int, out_dir: Path):
    """One rank: its half of the batch, one SGD step under DDP, its parameters saved."""
    model = nn.parallel.DistributedDataParallel(Model())
    x, target, lengths = make_data()
    half = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
    sgd_step(model, x[:, half], target[half], lengths[half])
    torch.save(model.module.state_dict(), out_dir / f"rank{rank}.pt")


def run_ranks(body, tmp_path: Path):
    """Run `body(rank, out_dir)` on WORLD spawned ranks joined in one gloo process group
    (`body` a module-level function; out_dir is tmp_path). Fail, after stopping the ranks,
    rather than hang if one never finishes."""
    ctx = mp.spawn(_rank_main, args=(body, str(tmp_path / "rendezvous"), str(tmp_path)),
                   nprocs=WORLD, join=False)
    deadline = time.monotonic() + DEADLINE_S
    while not ctx.join(timeout=1):  # raises if a rank failed, with its traceback
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"data-parallel ranks did not finish within {DEADLINE_S} s")


def _rank_main(rank: int, body, init_file: str, out_dir: str):
    """One spawned rank: join the group, run `body`, leave no gloo thread behind."""
    torch.set_num_threads(1)  # two processes on a small machine: do not oversubscribe
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        body(rank, Path(out_dir))
    finally:
        _tear_down_process_group()
    leftover = _gloo_threads()
    assert not leftover, (f"rank {rank}: gloo threads {leftover} outlive destroy_process_group(); "
                          "something still holds the group (see _tear_down_process_group)")


def _tear_down_process_group():
    """Free the process group, joining gloo's threads, while the interpreter still runs.

    Issue 16: a rank sometimes died at exit with SIGABRT ("terminate called without an
    active exception"). gloo runs each collective on a worker thread, which drops its
    reference to the work only after the rank has been told the work is done. DDP's
    gradient all-reduce, queued inside backward(), keeps the thread-local state torch
    captured then, and that state holds a Python object. The group used to outlive the
    rank's function, so on a busy machine the worker thread could drop the last reference
    only once the interpreter was finalizing: it took the GIL to free the Python object,
    Python ended the thread with pthread_exit, and the unwind through a noexcept destructor
    aborted (the same happens with plain torch modules under DDP). destroy_process_group()
    frees the group only when nothing else holds it: DDP sits in a reference cycle (hence
    gc.collect() first) and torch.distributed.nn would keep it as a default argument (hence
    its early import). Freed here, the threads are joined with the GIL released, so they
    finish while the interpreter still runs.
    """
    gc.collect()
    dist.destroy_process_group()


def _gloo_threads() -> list:
    """Names of this process's gloo threads; empty where /proc does not list threads."""
    names = []
    for comm in Path("/proc/self/task").glob("*/comm"):
        try:
            names.append(comm.read_text().strip())
        except FileNotFoundError:  # a thread that has just exited
            continue
    return [n for n in names if "gloo" in n]


def test_ddp_step_equals_single_process_on_whole_batch(tmp_path):
    run_ranks(ddp_step, tmp_path)
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
