"""Reverse time and bidirectional layers: what they cost, measured in one run.

    python benchmarks/bidirectional.py [--repeats 5] [--seq-len 50 --batch 32 --size 64]

Prints three things, each contestant warmed up once and then run interleaved
with its reference (one repeat of each in turn, so a busy neighbour hits both
alike), as medians and the ratio of medians. On a machine shared with other
work, OMP_NUM_THREADS=1 keeps torch's and NumPy's threads from fighting the
neighbours' (oversubscribed, both slow down many times over, unevenly):

1. the NumPy backend's forward+backward with reverse=True against the same
   call with reverse=False (examples/lstm.cell, random lengths): the cost of
   permuting the steps where arrays enter and leave;
2. rnnc.torch.RNN.from_torch(nn.LSTM(num_layers=2, bidirectional=True))
   against that nn.LSTM on the CPU, on a PackedSequence, forward+backward;
3. how many device-to-device copies the CUDA backend makes to permute one
   [T, B, ...] array on the GPU: for lengths in random order, and sorted
   longest first (the order RNN pads a PackedSequence in).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import rnnc
import rnnc.torch
from rnnc.backends.reverse import flip_copies, step_order

from numpy_vs_torch import measure  # run as a script, so benchmarks/ is on the path

LSTM_CELL = Path(__file__).resolve().parent.parent / "examples" / "lstm.cell"


def report(title: str, got: dict, reference: str):
    print(title)
    for name, seconds in got.items():
        print(f"  {name:<28} {1e3 * seconds:8.1f} ms  {seconds / got[reference]:5.2f}x")


def numpy_reverse(T, B, H, lengths, repeats):
    mod = rnnc.compile(LSTM_CELL, dims={"D": H, "H": H}).load(backend="numpy", dtype="float32")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, B, H)).astype(np.float32)
    dy = rng.standard_normal((T, B, H)).astype(np.float32)
    params = mod.init_params(seed=0)

    def run(reverse):
        res = mod.forward(inputs={"x": x}, params=params, lengths=lengths, reverse=reverse)
        mod.backward(res, d_outputs={"y": dy})
    return measure({"forward time": lambda: run(False), "reverse=True": lambda: run(True)}, repeats)


def layer_against_torch(T, B, H, lengths, repeats):
    torch.manual_seed(0)
    net = torch.nn.LSTM(H, H, num_layers=2, bidirectional=True)
    ours = rnnc.torch.RNN.from_torch(net)
    x = torch.randn(T, B, H)
    packed = pack_padded_sequence(x, torch.as_tensor(lengths), enforce_sorted=False)

    def run(module):
        y, (h_n, c_n) = module(packed)
        (y.data.sum() + h_n.sum()).backward()
    return measure({"torch.nn.LSTM": lambda: run(net), "rnnc.torch.RNN.from_torch": lambda: run(ours)},
                   repeats)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seq-len", type=int, default=50)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=64, help="D = H")
    args = ap.parse_args(argv)
    T, B, H = args.seq_len, args.batch, args.size
    lengths = np.random.default_rng(1).integers(1, T + 1, size=B)
    lengths[0] = T
    print(f"T={T}, B={B}, D=H={H}, float32, random lengths {lengths.min()}..{lengths.max()}")
    report("NumPy backend, lstm.cell, forward+backward:", numpy_reverse(T, B, H, lengths, args.repeats),
           "forward time")
    report("2 layers, bidirectional, PackedSequence, forward+backward:",
           layer_against_torch(T, B, H, lengths, args.repeats), "torch.nn.LSTM")
    nbytes = T * B * H * 4
    print("CUDA backend, device copies to permute one [T, B, H] array:")
    for what, order in (("lengths in random order", lengths), ("sorted, longest first", np.sort(lengths)[::-1]),
                        ("no lengths", None)):
        print(f"  {what:<28} {len(flip_copies(step_order(T, B, order), nbytes)):6d}  (T*B = {T * B})")


if __name__ == "__main__":
    main()
