"""Forward+backward on the GPU: rnnc's CUDA backend against PyTorch.

    python benchmarks/gpu.py [--precision fp32|tf32 | --dtype bfloat16|float16] [--quick] [--repeats 10]

- lstm, gru: against torch.nn.LSTM / torch.nn.GRU (cuDNN);
- milstm, attention_lstm: against the same cell written as a PyTorch loop
  over time (what a user without rnnc writes), autograd for the backward.

Like with like: `--precision fp32` (the default) runs rnnc's exact products
against PyTorch with TF32 off for cuDNN's RNNs and for matmuls; `--precision
tf32` runs rnnc on tensor cores against cuDNN's default (TF32 RNNs) and
matmuls in TF32 too; `--dtype bfloat16` or `float16` runs rnnc with arrays
of that type (tensor-core products in it, float32 sums and states) against
cuDNN and the loops with every tensor in that type. rnnc's 16-bit CUDA
module takes NumPy arrays only (no 16-bit device arrays yet), so under
`--dtype` its times include copying the arrays to the GPU and back, and say
so. H=512, B=64, T=100 (D=512; attention: E=256 over S=32
encoder positions), at B=64 and B=4; `--quick` runs H=128, B=16 and 4,
T=20. Arrays are float32 and stay on the GPU (rnnc takes the torch tensors
through `__cuda_array_interface__`). rnnc runs twice, its steps in
persistent kernels (a launch for all the steps of a forward or a backward,
the default) and launch by launch (`module.persistent = False`). Prints the
median time of each, rnnc's time over PyTorch's, rnnc's kernel launches per
call, its rough TFLOP/s, and how each event's steps ran. Without a GPU,
PyCUDA or a CUDA build of PyTorch it says so and exits 0.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def why_not_runnable() -> str | None:
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed (pip install 'rnnc[torch]')"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to PyTorch"
    try:
        import pycuda.driver  # noqa: F401
    except ImportError:
        return "PyCUDA is not installed (pip install 'rnnc[cuda]')"
    return None


def median_ms(fn, args, repeats: int) -> float:
    import torch
    fn(*args)  # warm-up: the allocator, cuDNN's plans, autograd's graph
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn(*args)
        torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def set_torch_precision(precision: str) -> str:
    """PyTorch's float32 cuDNN RNNs and matmuls exact ("fp32") or in TF32
    ("tf32"); returns the setting, to print. PyTorch 2.9 and later have a
    setting per backend (and refuse a mix of it with the older allow_tf32)."""
    import torch
    tf32 = precision == "tf32"
    if hasattr(getattr(torch.backends.cudnn, "rnn", None), "fp32_precision"):
        value = "tf32" if tf32 else "ieee"
        torch.backends.cudnn.rnn.fp32_precision = value
        torch.backends.cuda.matmul.fp32_precision = value
        return f"torch.backends.cudnn.rnn.fp32_precision = torch.backends.cuda.matmul.fp32_precision = {value!r}"
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    return f"torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = {tf32}"


# --- PyTorch contestants -------------------------------------------------------------
def torch_builtin(kind, D, H, dtype):
    import torch
    layer = getattr(torch.nn, kind)(D, H).to("cuda", dtype)

    def run(x, dy):
        layer.zero_grad(set_to_none=True)
        y, _ = layer(x)
        y.backward(dy)
    return run


def torch_milstm(p):
    import torch

    def run(x, dy):
        H = p["U"].shape[0]
        h = c = x.new_zeros(x.shape[1], H)
        ys = []
        for t in range(x.shape[0]):
            wx, uh = x[t] @ p["W"] + p["bw"], h @ p["U"] + p["bu"]
            gates = p["alpha"] * wx * uh + p["beta1"] * uh + p["beta2"] * wx + p["b"]
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            ys.append(h)
        torch.stack(ys).backward(dy)
    return run


def torch_attention_lstm(p, enc):
    import torch

    def run(x, dy):
        H, E = p["Wd"].shape
        B = x.shape[1]
        h, c, ctx = (x.new_zeros(B, n) for n in (H, H, E))
        keys = enc @ p["We"]
        ys = []
        for t in range(x.shape[0]):
            gates = x[t] @ p["W"] + torch.cat([h, ctx], 1) @ p["U"] + p["b"]
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            score = (torch.tanh(keys + (h @ p["Wd"])[:, None, :]) * p["v"]).sum(-1)
            alpha = torch.softmax(score, dim=1)
            ctx = (alpha[:, :, None] * enc).sum(1)
            ys.append(h)
        torch.stack(ys).backward(dy)
    return run


# --- rnnc ----------------------------------------------------------------------------------
def rnnc_run(module, params, contexts=None):
    def run(x, dy):
        res = module.forward(inputs={"x": x}, params=params, contexts=contexts)
        module.backward(res, d_outputs={"y": dy})
    return run


def to_host(t, module):
    """A torch tensor as a NumPy array of the module's 16-bit dtype (made before
    the timing; rnnc's copies to the GPU and back are in it)."""
    return t.float().cpu().numpy().astype(module.dtype)


def bench(name, dims, torch_side, repeats, T, B, precision, dtype):
    import torch

    import rnnc
    program = rnnc.compile(EXAMPLES / f"{name}.cell", dims=dims, recompute="auto", precision=precision)
    module = program.load("cuda", dtype=dtype)
    tensor_dtype = getattr(torch, dtype)
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = {k: torch.from_numpy(v.astype("float32")).to("cuda", tensor_dtype)
              for k, v in module.init_params(0).items()}
    x = torch.randn(T, B, dims["D"], device="cuda", generator=gen).to(tensor_dtype)
    dy = torch.randn(T, B, dims["H"], device="cuda", generator=gen).to(tensor_dtype)
    contexts = None
    if "S" in dims:
        contexts = {"enc": torch.randn(B, dims["S"], dims["E"], device="cuda", generator=gen).to(tensor_dtype)}
    if dtype == "float32":
        run, args = rnnc_run(module, params, contexts), (x, dy)
    else:  # host arrays (see the module docstring)
        run = rnnc_run(module, {k: to_host(v, module) for k, v in params.items()},
                       contexts and {k: to_host(v, module) for k, v in contexts.items()})
        args = (to_host(x, module), to_host(dy, module))
    module.persistent = False
    per_step, per_step_launches = median_ms(run, args, repeats), launches_per_call(module, run, args)
    module.persistent = True
    ours, our_launches = median_ms(run, args, repeats), launches_per_call(module, run, args)
    leaf = {k: v.clone().requires_grad_() for k, v in params.items()}
    builders = {"builtin": lambda: torch_builtin(name.upper(), dims["D"], dims["H"], tensor_dtype),
                "milstm": lambda: torch_milstm(leaf),
                "attention_lstm": lambda: torch_attention_lstm(leaf, contexts and contexts["enc"])}
    theirs = median_ms(builders[torch_side](), (x, dy), repeats)
    label = "cuDNN" if torch_side == "builtin" else "PyTorch loop"
    copies = "" if dtype == "float32" else " (rnnc's with host copies)"
    # a product's backward is two products of its size: forward+backward is about 3 forwards
    tflops = 3 * program.plan.forward_flops(T, B) / (ours * 1e-3) / 1e12
    print(f"{name:>15} B={B:<3}: rnnc persistent {ours:8.2f} ms, per step {per_step:8.2f} ms   {label:>12} "
          f"{theirs:8.2f} ms   rnnc/{label} = {ours / theirs:.2f} persistent, {per_step / theirs:.2f} per step"
          f"{copies}   (launches a call: {our_launches} persistent, {per_step_launches} per step; "
          f"~{tflops:.1f} TFLOP/s persistent)")
    for kind in ("step", "backward_step"):
        print(f"{'':>23}{kind}: {module.executor.launches.form(kind)}")


def launches_per_call(module, run, args) -> int:
    """The kernel launches of one call of `run`, counted at the device."""
    device = module.device
    counted = []
    launch = device.launch

    def counting(*launched):
        counted.append(launched[0])
        launch(*launched)
    device.launch = counting
    try:
        run(*args)
    finally:
        del device.launch  # the method again
    return len(counted)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--precision", choices=("fp32", "tf32"), default="fp32",
                   help="of products, for both contestants: fp32 exact, tf32 tensor cores (default fp32)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="of every array, for both contestants; bfloat16 and float16 take --precision fp32")
    p.add_argument("--quick", action="store_true", help="H=128, B=16, T=20")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    reason = why_not_runnable()
    if reason:
        print(f"benchmarks/gpu.py: skipped: {reason}; it needs an NVIDIA GPU, PyCUDA and CUDA PyTorch")
        return 0
    H, batches, T = (128, (16, 4), 20) if args.quick else (512, (64, 4), 100)
    E, S = H // 2, 32
    if args.dtype != "float32" and args.precision != "fp32":
        p.error(f"--dtype {args.dtype} multiplies in {args.dtype}; --precision is for float32 arrays")
    products = args.precision if args.dtype == "float32" else f"{args.dtype} tensor-core"
    print(f"forward+backward, {args.dtype} arrays, {products} products, H={H} D={H} B={' and '.join(map(str, batches))} "
          f"T={T} (attention: E={E}, S={S}); median of {args.repeats}")
    print(f"PyTorch: {set_torch_precision(args.precision)}")
    for name, dims, side in (("lstm", {"D": H, "H": H}, "builtin"), ("gru", {"D": H, "H": H}, "builtin"),
                             ("milstm", {"D": H, "H": H}, "milstm"),
                             ("attention_lstm", {"D": H, "H": H, "E": E, "S": S}, "attention_lstm")):
        for B in batches:
            bench(name, dims, side, args.repeats, T, B, args.precision, args.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
