"""GPU tier: the CUDA backend on a real GPU equals the float64 NumPy reference,
for every example under every policy and precision, with and without lengths,
outputs, final states and all gradients (under tf32 against the reference
that rounds product inputs as the tensor cores do, at the tolerance
cuda_cases.tolerance derives from the precision). Skipped without PyCUDA, a
driver or a GPU."""
from __future__ import annotations

import pytest

import cuda_cases as cases
from conftest import EXAMPLES, compile_sized, example

pytestmark = pytest.mark.gpu


def gpu_available() -> str | None:
    """None when a GPU can run the backend, else why not."""
    try:
        import pycuda.driver as drv
        drv.init()
        return None if drv.Device.count() else "no GPU"
    except Exception as err:  # no PyCUDA, no driver: the tier is skipped, saying which
        return f"PyCUDA or the driver is missing ({err})"


REASON = gpu_available()
skip_without_gpu = pytest.mark.skipif(REASON is not None, reason=f"needs a GPU: {REASON}")


@skip_without_gpu
@pytest.mark.parametrize("precision", cases.PRECISIONS_RUN)
@pytest.mark.parametrize("policy", cases.POLICIES)
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_equals_numpy_reference(path, policy, precision):
    program = cases.compile_example(path, policy)
    module = program.load("cuda", precision=precision)
    args = cases.arguments(program)
    cases.assert_equals_reference(module, program, args, precision)


@skip_without_gpu
def test_gpuarrays_in_give_gpuarrays_out():
    import pycuda.gpuarray as gpuarray
    program = cases.compile_example(example("attention_lstm"), "auto")
    module = program.load("cuda")
    args = cases.arguments(program)

    def to_numpy(array):
        assert isinstance(array, gpuarray.GPUArray), type(array)
        return array.get()
    got = cases.run(module, args, cases.LENGTHS, to_array=gpuarray.to_gpu, to_numpy=to_numpy)
    assert not cases.mismatches(got, cases.reference(program, args, cases.LENGTHS))


@skip_without_gpu
@pytest.mark.parametrize("precision", cases.PRECISIONS_RUN)
def test_sizes_past_one_tile_and_one_block(precision):
    assert not cases.large_lstm_mismatches(lambda program: program.load("cuda", precision=precision), precision)


@skip_without_gpu
def test_torch_cell_on_gpu_equals_cpu():
    """rnnc.torch on CUDA tensors: the backward runs on autograd's own thread,
    results and working memory come from torch's allocator."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch without CUDA")
    import rnnc.torch

    def run(device):
        cell = rnnc.torch.Cell(example("lstm"), dims={"D": 5, "H": 7},
                               dtype=torch.float32).to(device)
        x = torch.linspace(-1, 1, 4 * 3 * 5).reshape(4, 3, 5).to(device).requires_grad_()
        outputs, states = cell(x, lengths=[4, 2, 3])
        (outputs["y"].square().sum() + states["h"].sum()).backward()
        return [t.detach().cpu() for t in (outputs["y"], states["h"], x.grad, *(p.grad for p in cell.params.values()))]
    for _ in range(2):  # a second step reuses memory torch freed after the first
        for got, want in zip(run("cuda"), run("cpu")):
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got - want).abs().max()


@skip_without_gpu
def test_torch_rnn_on_gpu_equals_torch():
    """A 2-layer bidirectional nn.LSTM and its rnnc RNN on CUDA tensors, packed: the backward
    direction's time reversal runs on device memory (device-to-device copies)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch without CUDA")
    import rnnc.torch
    from torch.nn.utils.rnn import pack_padded_sequence
    torch.manual_seed(0)
    net = torch.nn.LSTM(5, 7, num_layers=2, bidirectional=True).cuda()
    ours = rnnc.torch.RNN.from_torch(net)
    x = torch.randn(6, 4, 5, device="cuda")
    packed = pack_padded_sequence(x, torch.tensor([6, 2, 5, 1]), enforce_sorted=False)
    results = []
    for module in (ours, net):
        module.zero_grad()
        y, (h_n, c_n) = module(packed)
        (y.data.square().sum() + h_n.sum() + c_n.sum()).backward()
        results.append([y.data, h_n, c_n, *(p.grad for p in module.parameters())])
    for got, want in zip(*results):
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-4), (got - want).abs().max()


@skip_without_gpu
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_launch_by_launch_equals_numpy_reference(path):
    """The persistent kernels' fallback, the same kernels launched step by step."""
    program = cases.compile_example(path, "auto")
    module = program.load("cuda")
    module.persistent = False
    args = cases.arguments(program)
    cases.assert_equals_reference(module, program, args)


@skip_without_gpu
def test_persistent_lstm_at_the_benchmark_size_equals_launch_by_launch():
    """Grids of every block the GPU holds, many barriers: the persistent form
    at H=512, B=64 gives what the launches one by one give, to float32 rounding."""
    import numpy as np
    program = compile_sized(example("lstm"), {"D": 512, "H": 512})
    args = cases.arguments(program, steps=50, batch=64)
    module = program.load("cuda")
    got = {}
    for form in (True, False):
        module.persistent = form
        got[form] = cases.run(module, args, None)
    for name, value in got[True].items():
        np.testing.assert_allclose(value, got[False][name], rtol=1e-4, atol=1e-4 * np.abs(value).max())


@skip_without_gpu
def test_the_benchmark_runs():
    """benchmarks/gpu.py --quick: both forms, both batch sizes, every cell."""
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu.py"
    done = subprocess.run([sys.executable, str(script), "--quick", "--repeats", "2"], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("persistent") >= 8 and "B=4" in done.stdout, done.stdout
