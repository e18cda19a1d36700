"""Train a compiled LSTM cell with a torch optimizer on the copy task, on the CPU.

    python examples/train_copy_task.py [--steps 300] [--seed 0]

The copy task: a sequence shows SYMBOLS random symbols (out of ALPHABET),
then DELAY blanks, then a "go" marker; the network must then repeat the
symbols in order. Blank steps need no answer. Guessing scores a cross-entropy
of ln(ALPHABET) = 1.39 per answer; remembering gives 0. The model is
rnnc's examples/lstm.cell as an nn.Module (rnnc.torch.Cell) and an
nn.Linear readout; Adam trains both.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import rnnc.torch
from rnnc.examples import training

LSTM_CELL = Path(__file__).resolve().parent / "lstm.cell"
ALPHABET, SYMBOLS, DELAY, HIDDEN, BATCH = 4, 3, 4, 32, 32
# one channel per symbol, then a blank channel and a "go" channel
BLANK, GO = ALPHABET, ALPHABET + 1
T = 2 * SYMBOLS + DELAY + 1


def make_batch(gen: torch.Generator, batch: int = BATCH):
    """(inputs [T, B, ALPHABET + 2] one-hot, targets [SYMBOLS, B] symbol indices)."""
    symbols = torch.randint(ALPHABET, (SYMBOLS, batch), generator=gen)
    channels = torch.full((T, batch), BLANK)
    channels[:SYMBOLS] = symbols
    channels[SYMBOLS + DELAY] = GO
    return nn.functional.one_hot(channels, ALPHABET + 2).float(), symbols


class Model(nn.Module):
    """rnnc's LSTM cell, then a linear readout of its outputs at the answer steps."""

    def __init__(self, seed: int):
        super().__init__()
        self.cell = rnnc.torch.Cell(LSTM_CELL, dims={"D": ALPHABET + 2, "H": HIDDEN}, seed=seed)
        self.readout = nn.Linear(HIDDEN, ALPHABET)

    def forward(self, inputs):
        outputs, _ = self.cell(inputs)
        return self.readout(outputs["y"][-SYMBOLS:])  # [SYMBOLS, B, ALPHABET] logits


def batch_loss(model, gen: torch.Generator):
    """The cross-entropy of the model's answers for a fresh batch."""
    inputs, targets = make_batch(gen)
    return nn.functional.cross_entropy(model(inputs).reshape(-1, ALPHABET), targets.reshape(-1))


def train(steps: int = 300, seed: int = 0, report=None) -> list:
    """Train for `steps` batches; return the loss of each. `report(step, loss)` sees each one."""
    return training.fit(Model, batch_loss, steps, seed, report)


if __name__ == "__main__":
    training.main(__doc__, train, 300, f"copy task: {SYMBOLS} symbols of {ALPHABET}, delay {DELAY}",
                  chance_of=ALPHABET)
