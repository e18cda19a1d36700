"""Train a bidirectional, two-layer rnnc LSTM to tag sequences of varying length, on the CPU.

    python examples/train_tagger.py [--steps 200] [--seed 0]

The task: each sequence holds 2 to MAX_LEN random symbols (out of ALPHABET);
the tag of each position is the sum of its two neighbours' symbols modulo
ALPHABET (a missing neighbour, at either end, counts as 0). A tag depends on
the past and on the future, so a one-directional layer cannot beat chance,
a cross-entropy of ln(ALPHABET) = 1.39; knowing both neighbours gives 0.

The model is rnnc's examples/lstm.cell as a layer like torch.nn.LSTM
(rnnc.torch.RNN, 2 layers, bidirectional), fed a PackedSequence, and an
nn.Linear tagger over its packed outputs; Adam trains both.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import rnnc.torch
from rnnc.examples import training

LSTM_CELL = Path(__file__).resolve().parent / "lstm.cell"
ALPHABET, MAX_LEN, HIDDEN, BATCH = 4, 10, 24, 32


def make_batch(gen: torch.Generator, batch: int = BATCH):
    """(inputs, tags): PackedSequences of one-hot symbols [ALPHABET] and of tags, in the same order."""
    lengths = torch.randint(2, MAX_LEN + 1, (batch,), generator=gen)
    symbols = [torch.randint(ALPHABET, (int(n),), generator=gen) for n in lengths]
    tags = [(nn.functional.pad(s[:-1], (1, 0)) + nn.functional.pad(s[1:], (0, 1))) % ALPHABET
            for s in symbols]
    one_hot = [nn.functional.one_hot(s, ALPHABET).float() for s in symbols]
    return pack_sequence(one_hot, enforce_sorted=False), pack_sequence(tags, enforce_sorted=False)


class Tagger(nn.Module):
    """A 2-layer bidirectional rnnc LSTM, then a linear map of each position's outputs to tag logits."""

    def __init__(self, seed: int):
        super().__init__()
        self.rnn = rnnc.torch.RNN(LSTM_CELL, dims={"D": ALPHABET, "H": HIDDEN}, num_layers=2,
                                  bidirectional=True, seed=seed)
        self.tag = nn.Linear(2 * HIDDEN, ALPHABET)

    def forward(self, packed):
        outputs, _ = self.rnn(packed)  # a PackedSequence, both directions side by side
        return self.tag(outputs.data)  # [positions, ALPHABET] logits, in packed order


def batch_loss(model, gen: torch.Generator):
    """The cross-entropy of the model's tags for a fresh batch."""
    inputs, tags = make_batch(gen)
    return nn.functional.cross_entropy(model(inputs), tags.data)


def train(steps: int = 200, seed: int = 0, report=None) -> list:
    """Train for `steps` batches; return the loss of each. `report(step, loss)` sees each one."""
    return training.fit(Tagger, batch_loss, steps, seed, report)


if __name__ == "__main__":
    training.main(__doc__, train, 200, f"tagging: each symbol's tag is the sum of its neighbours "
                  f"mod {ALPHABET}", chance_of=ALPHABET)
