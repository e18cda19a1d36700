"""What the training examples share: the loop, the command line and a progress bar.

The bar needs nothing beyond the standard library. On a terminal it is one
line redrawn in place; anywhere else (a log file, a pipe, CI) the same line
is printed every tenth of the way, so nothing fills the output with carriage
returns.
"""
from __future__ import annotations

import argparse
import math
import sys
from collections import deque

import torch


def fit(make_model, batch_loss, steps: int, seed: int, report=None, lr: float = 2e-2) -> list:
    """Adam on the model `make_model(seed)` for `steps` steps, each on a fresh batch's loss
    `batch_loss(model, gen)` (`gen` a torch.Generator seeded with `seed`, as torch's own
    generator is); the loss of each. `report(step, loss)` sees each one."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = make_model(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        value = batch_loss(model, gen)
        opt.zero_grad()
        value.backward()
        opt.step()
        losses.append(value.item())
        if report:
            report(step, value.item())
    return losses


def main(doc: str, train, steps: int, task: str, chance_of: int, argv=None):
    """The command line of an example: `--steps` and `--seed` to `train(steps, seed, report)`,
    the bar while it runs, and the loss at the end against chance (guessing among `chance_of`)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(f"{task}; chance loss {math.log(chance_of):.3f}")
    losses = train(args.steps, args.seed, report=TextBar(args.steps))
    tail = losses[-20:]
    print(f"mean loss over the last {len(tail)} steps: {sum(tail) / len(tail):.3f}")


class TextBar:
    """`bar(step, loss)` after each step: progress and the mean loss of the last `window`
    steps (one batch's loss is noisy)."""

    def __init__(self, total: int, width: int = 30, window: int = 10, out=None):
        self.total, self.width = total, width
        self.out = out or sys.stdout
        self.redraw = self.out.isatty()
        self.recent = deque(maxlen=window)

    def __call__(self, step: int, loss: float):
        done = step + 1
        self.recent.append(loss)
        filled = self.width * done // self.total
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} "
                f"loss {sum(self.recent) / len(self.recent):.3f}")
        kept = done % max(1, self.total // 10) == 0 or done == self.total
        if self.redraw:  # keep a line every tenth of the way, so the fall stays visible
            self.out.write("\r" + line + ("\n" if kept else ""))
        elif kept:
            self.out.write(line + "\n")
        self.out.flush()
