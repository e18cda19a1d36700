"""LSTM forward+backward on the CPU: rnnc's NumPy backend against torch.nn.LSTM.

    python benchmarks/numpy_vs_torch.py [--repeats 7] [--seq-len 100 --batch 32 --size 256]

T=100, B=32, D=H=256, float32 by default. Three contestants run in the same
process, interleaved (one repeat of each in turn, so drifting clock speeds or
a busy neighbour hit all of them alike): rnnc (examples/lstm.cell, numpy
backend), torch.nn.LSTM, and a plain hand-written NumPy LSTM that hoists the
input product out of the loop. The last is the floor for any NumPy
interpreter: the gap between it and rnnc is interpretation overhead. Prints
the median of each and the ratios of medians to torch.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import rnnc

LSTM_CELL = Path(__file__).resolve().parent.parent / "examples" / "lstm.cell"


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def numpy_lstm(x, W, U, b, dy):
    """Forward and backward of an LSTM (gate order i, f, g, o); returns (y, dW, dU, db, dx)."""
    T, B, D = x.shape
    H = U.shape[0]
    xw = (x.reshape(T * B, D) @ W + b).reshape(T, B, 4 * H)  # hoisted input product
    h, c = np.zeros((B, H), x.dtype), np.zeros((B, H), x.dtype)
    ys, tape = np.empty((T, B, H), x.dtype), []
    for t in range(T):
        gates = xw[t] + h @ U
        i, f, o = (sigmoid(gates[:, k * H:(k + 1) * H]) for k in (0, 1, 3))
        g = np.tanh(gates[:, 2 * H:3 * H])
        c_prev, h_prev = c, h
        c = f * c + i * g
        tc = np.tanh(c)
        h = o * tc
        ys[t] = h
        tape.append((i, f, g, o, c_prev, tc, h_prev))
    dU = np.zeros_like(U)
    d_gates = np.empty((T, B, 4 * H), x.dtype)
    dh, dc = np.zeros((B, H), x.dtype), np.zeros((B, H), x.dtype)
    for t in reversed(range(T)):
        i, f, g, o, c_prev, tc, h_prev = tape[t]
        dh = dh + dy[t]
        dc = dc + dh * o * (1 - tc * tc)
        dg = d_gates[t]
        dg[:, :H] = dc * g * i * (1 - i)
        dg[:, H:2 * H] = dc * c_prev * f * (1 - f)
        dg[:, 2 * H:3 * H] = dc * i * (1 - g * g)
        dg[:, 3 * H:] = dh * tc * o * (1 - o)
        dU += h_prev.T @ dg
        dh = dg @ U.T
        dc = dc * f
    flat = d_gates.reshape(T * B, 4 * H)
    dW = x.reshape(T * B, D).T @ flat  # hoisted parameter-gradient product
    return ys, dW, dU, flat.sum(0), (flat @ W.T).reshape(T, B, D)


def contestants(T, B, D, H, dtype):
    """name -> a function running one forward+backward on shared data."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, B, D)).astype(dtype)
    dy = rng.standard_normal((T, B, H)).astype(dtype)
    mod = rnnc.compile(LSTM_CELL, dims={"D": D, "H": H}).load(backend="numpy", dtype=dtype)
    params = mod.init_params(seed=0)
    net = torch.nn.LSTM(D, H).to(getattr(torch, dtype))
    tx, tdy = torch.from_numpy(x).requires_grad_(), torch.from_numpy(dy)

    def run_rnnc():
        res = mod.forward(inputs={"x": x}, params=params)
        mod.backward(res, d_outputs={"y": dy})

    def run_torch():
        y, _ = net(tx)
        y.backward(tdy)

    def run_numpy():
        numpy_lstm(x, params["W"], params["U"], params["b"], dy)

    return {"rnnc": run_rnnc, "torch": run_torch, "numpy": run_numpy}


def measure(runs: dict, repeats: int) -> dict:
    """Median seconds per contestant, one repeat of each in turn after one warm-up each."""
    times = {name: [] for name in runs}
    for fn in runs.values():
        fn()
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=100)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=256, help="D = H")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    T, B, S = args.seq_len, args.batch, args.size
    print(f"LSTM forward+backward, T={T} B={B} D=H={S} {args.dtype}, CPU "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads), "
          f"median of {args.repeats}, interleaved")
    med = measure(contestants(T, B, S, S, args.dtype), args.repeats)
    for name, seconds in med.items():
        print(f"  {name:6s} {seconds * 1e3:9.1f} ms   {seconds / med['torch']:5.2f}x torch")
    print(f"ratio of medians rnnc/torch: {med['rnnc'] / med['torch']:.2f}")
    print(f"ratio of medians numpy/torch: {med['numpy'] / med['torch']:.2f}")


if __name__ == "__main__":
    main()
