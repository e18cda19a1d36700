"""The PyCUDA path of the CUDA backend (PycudaDevice, runtime.load, and how
rnnc.torch loads it) against a fake `pycuda` that checks every call against
PyCUDA's real API and semantics, and runs the kernels through the CPU
emulation (tests/cuda_emulator.py).

What the fake holds the runtime to, as PyCUDA 2026.1 does:
- a context stack per thread: allocating, loading a module, copying and
  launching need a context pushed on the calling thread, and every push is
  popped (PyCUDA aborts at a thread's exit when its stack is not empty);
- `Function.prepare` takes one struct character per kernel argument, and
  `_launch_kernel(grid, block, arg_buf, shared_size, stream)` (what
  `prepared_call` calls once it has packed its arguments with that format)
  takes the packed bytes, exactly the struct's size; grid and block are
  tuples of Python ints (boost.python's `extract<unsigned>` takes no NumPy
  integers) within the hardware's limits;
- device pointers and sizes given to memcpy_*/memset_d8 are Python ints
  (boost.python's CUdeviceptr converter takes no NumPy integers), inside a
  live allocation;
- a DeviceAllocation freed on a thread that did not make its context, with
  the context not active there, is leaked with a warning;
- importing `pycuda.autoprimaryctx` pushes GPU 0's primary context, once;
- a device's limits come from `Device.get_attribute(device_attribute.X)` and a
  kernel's resources from `Function.num_regs`, `shared_size_bytes` and
  `max_threads_per_block` (the fake: an H100's, and a kernel of 64 registers);
  a persistent kernel's launch may not exceed what the GPU holds at once;
- a launch's dynamic shared memory above 48 KB needs the kernel's
  `set_attribute(function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES, n)` first.
"""
from __future__ import annotations

import ctypes
import struct
import sys
import threading
import types
import warnings

import numpy as np
import pytest

import rnnc
from rnnc.backends.cuda.device import CudaUnavailable, PycudaDevice
from rnnc.backends.cuda.launches import PER_STEP
from rnnc.backends.cuda.lowering import generate
from rnnc.backends.cuda.runtime import load

import cuda_cases as cases
import cuda_emulator
from conftest import example

pytestmark = pytest.mark.skipif(not cuda_emulator.available(), reason="needs g++ for the CUDA emulation")

GRID_MAX = (2**31 - 1, 65535, 65535)
LSTM = example("lstm")


class FakeError(Exception):
    """pycuda.driver.Error"""


class DeviceAttribute:
    """A member of pycuda.driver.device_attribute."""

    def __init__(self, name):
        self.name = name


# an H100's limits, as its driver reports them (the CUDA C++ Programming Guide's table for 9.0)
H100_ATTRIBUTES = {"MULTIPROCESSOR_COUNT": 132, "MAX_THREADS_PER_MULTIPROCESSOR": 2048,
                   "MAX_BLOCKS_PER_MULTIPROCESSOR": 32, "MAX_REGISTERS_PER_MULTIPROCESSOR": 65536,
                   "MAX_REGISTERS_PER_BLOCK": 65536, "MAX_SHARED_MEMORY_PER_MULTIPROCESSOR": 233472,
                   "RESERVED_SHARED_MEMORY_PER_BLOCK": 1024, "MAX_SHARED_MEMORY_PER_BLOCK_OPTIN": 232448}
FUNCTION_RESOURCES = (64, 20000, 1024)  # every kernel's registers, static shared memory, most threads
# 256 threads of 64 registers: 4 blocks a multiprocessor by registers (and by shared memory, what
# the kernel's launch adds to its static 20000 bytes allows)
FAKE_BLOCKS_PER_SM = 4


class FakeCuda:
    """The state behind one fake `pycuda`: devices, allocations, context stacks, modules."""

    def __init__(self, devices=1, capability=(9, 0)):
        self.devices, self.capability = devices, capability
        self.local = threading.local()
        self.allocations = {}  # base -> size in bytes
        self.libraries = {}  # path -> (emulator library, kernel arities, persistent kernels)
        self.launches = []  # (kernel, grid, block, packed values)
        self.leaks = []

    # --- contexts ---------------------------------------------------------------------------
    def stack(self) -> list:
        if not hasattr(self.local, "stack"):
            self.local.stack = []
        return self.local.stack

    def need_context(self, what: str):
        if not self.stack():
            raise FakeError(f"{what} failed: invalid device context - no currently active context?")

    # --- memory --------------------------------------------------------------------------------
    def check_range(self, what: str, ptr, nbytes: int):
        assert type(ptr) is int, f"{what}: device pointer {ptr!r} is a {type(ptr).__name__}, not an int"
        assert type(nbytes) is int and nbytes >= 0, f"{what}: size {nbytes!r}"
        assert any(base <= ptr and ptr + nbytes <= base + size for base, size in self.allocations.items()), \
            f"{what}: [{ptr:#x}, +{nbytes}) is outside every allocation"


AUTOPRIMARYCTX = """
import pycuda.driver as cuda
context = cuda.Device(0).retain_primary_context()
context.push()
"""


def fake_pycuda(monkeypatch, cuda: FakeCuda, package_dir) -> types.ModuleType:
    """Install a fake `pycuda` (its `autoprimaryctx` in `package_dir`), `pycuda.driver`
    and `pycuda.gpuarray` backed by `cuda`."""
    drv = types.ModuleType("pycuda.driver")
    drv.Error = FakeError

    def init():
        pass

    class Context:
        def __init__(self, device):
            self.device, self.thread = device, threading.get_ident()

        def push(self):
            cuda.stack().append(self)

        @staticmethod
        def pop():
            if not cuda.stack():
                raise FakeError("context::pop failed: cannot pop non-current context")
            cuda.stack().pop()

        @staticmethod
        def get_current():
            return cuda.stack()[-1] if cuda.stack() else None

        @staticmethod
        def get_device():
            cuda.need_context("cuCtxGetDevice")
            return cuda.stack()[-1].device

    class Device:
        def __init__(self, ordinal):
            if not (type(ordinal) is int and 0 <= ordinal < cuda.devices):
                raise FakeError(f"cuDeviceGet failed: invalid device ordinal {ordinal!r}")
            self.ordinal = ordinal

        @staticmethod
        def count():
            return cuda.devices

        def compute_capability(self):
            return cuda.capability

        def retain_primary_context(self):
            return Context(self)

        def name(self):
            return "Fake H100"

        def get_attribute(self, attribute):
            assert isinstance(attribute, DeviceAttribute), attribute
            return H100_ATTRIBUTES[attribute.name]

    class DeviceAllocation:
        def __init__(self, nbytes):
            cuda.need_context("explicit_context_dependent")
            self.context = cuda.stack()[-1]
            self.memory = np.full(nbytes + 256, 0xFF, np.uint8)  # NaN bytes: unwritten memory shows
            self.ptr = (self.memory.ctypes.data + 255) // 256 * 256
            cuda.allocations[self.ptr] = nbytes

        def __int__(self):
            return self.ptr

        def __del__(self):
            if self.context not in cuda.stack() and self.context.thread != threading.get_ident():
                cuda.leaks.append(self.ptr)
                warnings.warn("device_allocation in out-of-thread context could not be cleaned up")
            cuda.allocations.pop(self.ptr, None)

    def mem_alloc(nbytes):
        assert type(nbytes) is int and nbytes > 0, f"mem_alloc({nbytes!r})"
        return DeviceAllocation(nbytes)

    def memcpy_htod(dest, src):
        cuda.need_context("cuMemcpyHtoD")
        src = memoryview(src)
        assert src.c_contiguous
        cuda.check_range("memcpy_htod", dest, src.nbytes)
        ctypes.memmove(dest, np.frombuffer(src, np.uint8).ctypes.data, src.nbytes)

    def memcpy_dtoh(dest, src):
        cuda.need_context("cuMemcpyDtoH")
        assert isinstance(dest, np.ndarray) and dest.flags.c_contiguous and dest.flags.writeable
        cuda.check_range("memcpy_dtoh", src, dest.nbytes)
        ctypes.memmove(dest.ctypes.data, src, dest.nbytes)

    def memcpy_dtod(dest, src, size):
        cuda.need_context("cuMemcpyDtoD")
        cuda.check_range("memcpy_dtod dest", dest, size)
        cuda.check_range("memcpy_dtod src", src, size)
        ctypes.memmove(dest, src, size)

    def memset_d8(dest, data, size):
        cuda.need_context("cuMemsetD8")
        assert type(data) is int and 0 <= data < 256
        cuda.check_range("memset_d8", dest, size)
        ctypes.memset(dest, data, size)

    class Function:
        num_regs, shared_size_bytes, max_threads_per_block = FUNCTION_RESOURCES

        def __init__(self, name, library, arity, persistent):
            self.name, self.library, self.arity, self.persistent = name, library, arity, persistent
            self.max_dynamic_shared = 48 * 1024  # more is the kernel's to opt into

        def set_attribute(self, attribute, value):
            assert attribute is drv.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES, attribute
            opt_in = H100_ATTRIBUTES["MAX_SHARED_MEMORY_PER_BLOCK_OPTIN"]
            assert type(value) is int and self.shared_size_bytes + value <= opt_in, value
            self.max_dynamic_shared = value

        def prepare(self, arg_types):  # as pycuda.driver's function_prepare, for strings
            assert isinstance(arg_types, str), "arg types: a string of struct characters"
            self.arg_format = arg_types
            return self

        def _launch_kernel(self, grid, block, arg_buf, shared_size, stream):
            cuda.need_context("cuLaunchKernel")
            assert isinstance(block, tuple), "block: a tuple (an int is PyCUDA's deprecated form)"
            assert isinstance(grid, tuple) and 1 <= len(grid) <= 3 and 1 <= len(block) <= 3
            for what, dims in (("grid", grid), ("block", block)):
                assert all(type(d) is int and d >= 1 for d in dims), f"{what} {dims!r}: positive Python ints"
            assert all(d <= limit for d, limit in zip(grid, GRID_MAX)), f"grid {grid} past the limits"
            assert np.prod(block) <= 1024 and block[0] <= 1024, f"block {block} past the limits"
            assert len(self.arg_format) == 1 + self.arity, \
                f"{self.name}: format {self.arg_format!r}, {self.arity} buffers"
            assert isinstance(arg_buf, bytes) and len(arg_buf) == struct.calcsize(self.arg_format), \
                f"{self.name}: {len(arg_buf)} bytes of arguments for format {self.arg_format!r}"
            assert type(shared_size) is int and stream is None
            if shared_size > self.max_dynamic_shared:
                raise FakeError(f"cuLaunchKernel failed: too many resources requested for launch ({self.name}: "
                                f"{shared_size} bytes of dynamic shared memory, {self.max_dynamic_shared} allowed)")
            packed = struct.unpack(self.arg_format, arg_buf)
            rows, *ptrs = packed
            grid3, block3 = grid + (1,) * (3 - len(grid)), block + (1,) * (3 - len(block))
            assert block3[1:] == (1, 1), "the kernels index threads along x only"
            cuda.launches.append((self.name, grid, block, packed))
            for p in ptrs:
                cuda.check_range(f"{self.name} buffer", p, 4)
            if self.persistent:  # every block resident at once, on the fake H100
                per_sm = min(FAKE_BLOCKS_PER_SM, H100_ATTRIBUTES["MAX_SHARED_MEMORY_PER_MULTIPROCESSOR"]
                             // (self.shared_size_bytes + shared_size + 1024))
                assert grid3[0] <= 132 * per_sm, f"{self.name}: grid {grid} past what the GPU holds"
            self.library.run(self.name, grid3, block3[0], rows, ptrs, seed=0, together=self.persistent)

    class Module:
        def __init__(self, path):
            cuda.need_context("explicit_context_dependent")
            self.library, self.arities, self.persistent = cuda.libraries[path]

        def get_function(self, name):
            if name not in self.arities:
                raise FakeError(f"cuModuleGetFunction failed: named symbol not found ({name})")
            return Function(name, self.library, self.arities[name], name in self.persistent)

    def module_from_file(filename):
        assert isinstance(filename, str)
        return Module(filename)

    drv.init, drv.Context, drv.Device, drv.mem_alloc = init, Context, Device, mem_alloc
    drv.memcpy_htod, drv.memcpy_dtoh, drv.memcpy_dtod, drv.memset_d8 = \
        memcpy_htod, memcpy_dtoh, memcpy_dtod, memset_d8
    drv.module_from_file = module_from_file
    drv.device_attribute = types.SimpleNamespace(**{name: DeviceAttribute(name) for name in H100_ATTRIBUTES})
    drv.function_attribute = types.SimpleNamespace(MAX_DYNAMIC_SHARED_SIZE_BYTES=object())

    gpuarray = types.ModuleType("pycuda.gpuarray")

    class GPUArray:
        def __init__(self, shape, dtype, allocator=mem_alloc):
            self.shape, self.dtype = tuple(shape), np.dtype(dtype)
            self.size = int(np.prod(self.shape))
            self.strides = np.empty(self.shape, self.dtype).strides  # C order
            self.gpudata = allocator(self.size * self.dtype.itemsize) if self.size else None

        @property
        def __cuda_array_interface__(self):
            return {"shape": self.shape, "strides": self.strides, "typestr": self.dtype.str,
                    "data": (int(self.gpudata) if self.gpudata is not None else 0, False),
                    "stream": None, "version": 3}

        def get(self):
            out = np.empty(self.shape, self.dtype)
            if self.size:
                memcpy_dtoh(out, int(self.gpudata))
            return out

    def to_gpu(array):
        array = np.ascontiguousarray(array)
        out = GPUArray(array.shape, array.dtype)
        if array.size:
            memcpy_htod(int(out.gpudata), array)
        return out

    gpuarray.GPUArray, gpuarray.empty, gpuarray.to_gpu = GPUArray, GPUArray, to_gpu
    package = types.ModuleType("pycuda")
    package.driver, package.gpuarray = drv, gpuarray
    (package_dir / "autoprimaryctx.py").write_text(AUTOPRIMARYCTX)
    package.__path__ = [str(package_dir)]
    for name, module in (("pycuda", package), ("pycuda.driver", drv), ("pycuda.gpuarray", gpuarray)):
        monkeypatch.setitem(sys.modules, name, module)
    # importing autoprimaryctx runs the fake; afterwards the real one (or none) is back
    monkeypatch.setitem(sys.modules, "pycuda.autoprimaryctx", None)
    del sys.modules["pycuda.autoprimaryctx"]
    return drv


@pytest.fixture
def cuda(monkeypatch, tmp_path):
    fake = FakeCuda()
    fake_pycuda(monkeypatch, fake, tmp_path)
    return fake


def loaded(cuda: FakeCuda, program, workdir, **options):
    """runtime.load with the fake: the 'cubin' is the generated source, built for the emulation."""
    generated = generate(program)
    archs = []

    def cubin_for(arch):
        archs.append(arch)
        path = workdir / f"{program.cell.name}.{arch}.cubin"
        path.write_text(generated.source)
        library = cuda_emulator.library(generated, workdir)
        cuda.libraries[str(path)] = (library, generated.launches.arities(),
                                     {p.kernel for p in generated.launches.persistent.values()})
        return path
    module = load(program, "float32", cubin_for=cubin_for, made={"cuda": generated}, **options)
    return module, archs


@pytest.mark.parametrize("persistent", [True, False])
def test_numpy_in_numpy_out_equals_reference(cuda, workdir, persistent):
    """Every step of an event in one launch of a persistent kernel, or
    (`persistent = False`) each step's kernels launched one by one."""
    program = cases.compile_example(LSTM, "auto")
    module, archs = loaded(cuda, program, workdir)
    module.persistent = persistent
    assert archs == ["sm_90"]  # the GPU's compute capability, 9.0
    args = cases.arguments(program)
    cases.assert_equals_reference(module, program, args)
    # every push popped: what stays active is GPU 0's primary context, as pycuda.autoprimaryctx leaves it
    assert cuda.launches and cuda.stack() == [module.device.context]
    assert module.device.context is sys.modules["pycuda.autoprimaryctx"].context
    launches = generate(program).launches
    step_kernels = {launch.kernel for kind in PER_STEP for launch in getattr(launches, kind)}
    persistent_kernels = {p.kernel for p in launches.persistent.values()}
    assert persistent_kernels and step_kernels
    unused = step_kernels if persistent else persistent_kernels
    assert {name for name, *_ in cuda.launches} == set(launches.kernels()) - unused


def test_gpuarrays_in_give_gpuarrays_out(cuda, workdir):
    from pycuda import gpuarray
    program = cases.compile_example(example("attention_lstm"), "auto")
    module, _ = loaded(cuda, program, workdir)  # as on a GPU: load first, then make GPUArrays
    args = cases.arguments(program)

    def to_numpy(array):
        assert isinstance(array, gpuarray.GPUArray), type(array)
        cai = array.__cuda_array_interface__
        assert cai["typestr"] == "<f4" and cai["strides"] == np.empty(array.shape, np.float32).strides
        return array.get()
    got = cases.run(module, args, cases.LENGTHS, to_array=gpuarray.to_gpu, to_numpy=to_numpy)
    assert not cases.mismatches(got, cases.reference(program, args, cases.LENGTHS))


def test_the_backward_reads_the_copies_the_forward_made(cuda, workdir):
    """Unlike the NumPy backend, which refuses it, the CUDA backend may see the
    caller's arrays change after the forward: it copied them to the device."""
    program = cases.compile_example(example("attention_lstm"), "auto")
    module, _ = loaded(cuda, program, workdir)
    args = cases.arguments(program)
    lengths = cases.LENGTHS.copy()
    result = module.forward(args["inputs"], args["params"], args["states"], args["contexts"], lengths)
    for group in ("inputs", "params", "states", "contexts"):
        for array in args[group].values():
            array *= 2
    lengths[:] = 1
    grads = module.backward(result, args["d_outputs"], args["d_states"])
    for group in ("inputs", "params", "states", "contexts"):
        for array in args[group].values():
            array /= 2  # exactly as they were, for the reference
    want = cases.reference(program, args, cases.LENGTHS)
    for group in ("params", "inputs", "states", "contexts"):
        for name, g in getattr(grads, group).items():
            ref = want[f"grad {group} {name}"]
            assert np.abs(g - ref).max() <= cases.TOLERANCE * np.abs(ref).max(), (group, name)


def test_runs_in_the_context_active_when_loaded(cuda, workdir):
    user = sys.modules["pycuda.driver"].Device(0).retain_primary_context()
    user.push()  # as pycuda.autoinit does
    try:
        module, _ = loaded(cuda, rnnc.compile(LSTM, dims={"D": 2, "H": 3}), workdir)
        assert module.device.context is user and "pycuda.autoprimaryctx" not in sys.modules
        args = cases.arguments(module.program, steps=2, batch=2)
        module.forward(args["inputs"], args["params"])
        assert cuda.stack() == [user]
    finally:
        user.pop()


def test_backward_on_another_thread(cuda, workdir):
    """torch's autograd runs the backward on its own thread, where PyCUDA has no context."""
    program = cases.compile_example(LSTM, "all")
    module, _ = loaded(cuda, program, workdir)
    args = cases.arguments(program)
    res = module.forward(args["inputs"], args["params"], args["states"], lengths=cases.LENGTHS)
    done = {}

    def backward():
        try:
            done["grads"] = module.backward(res, args["d_outputs"], args["d_states"])
            done["balanced"] = cuda.stack() == []
        except BaseException as err:  # noqa: BLE001 -- reported by the main thread
            done["error"] = err
    thread = threading.Thread(target=backward)
    thread.start()
    thread.join()
    assert "error" not in done, done["error"]
    assert done["balanced"] and not cuda.leaks  # the backward's own pools were freed in its context
    f64 = {k: {n: a.astype(np.float64) for n, a in v.items()} for k, v in args.items()}
    ref = program.load("numpy", "float64")
    want = ref.backward(ref.forward(f64["inputs"], f64["params"], f64["states"], lengths=cases.LENGTHS),
                        f64["d_outputs"], f64["d_states"])
    for name, value in want.params.items():
        assert np.allclose(done["grads"].params[name], value, rtol=1e-4, atol=1e-4), name


def test_empty_makes_all_memory(cuda, workdir, monkeypatch):
    """`empty` (torch.empty, for rnnc.torch) makes the results and every pool: no
    PyCUDA allocation is left to be freed on a thread without its context."""
    made = []

    def host(array):
        array = cuda_emulator.HostArray(array)
        cuda.allocations[array.array.ctypes.data] = array.array.nbytes  # posing as device memory
        return array

    def empty(shape):
        made.append(tuple(shape))
        return host(np.empty(shape, np.float32))
    program = cases.compile_example(LSTM, "auto")
    module, _ = loaded(cuda, program, workdir, empty=empty)
    monkeypatch.setattr(sys.modules["pycuda.driver"], "mem_alloc",
                        lambda nbytes: pytest.fail("PyCUDA allocated device memory"))
    args = {k: {n: host(a) for n, a in v.items()} for k, v in cases.arguments(program).items()}
    res = module.forward(args["inputs"], args["params"], args["states"])
    g = module.backward(res, args["d_outputs"])
    assert isinstance(res.outputs["y"], cuda_emulator.HostArray)
    assert isinstance(g.params["W"], cuda_emulator.HostArray)
    assert (cases.T, cases.B, cases.DIMS["H"]) in made


def test_device_ordinal_picks_that_gpus_primary_context(monkeypatch, tmp_path, workdir):
    cuda = FakeCuda(devices=2, capability=(8, 6))
    drv = fake_pycuda(monkeypatch, cuda, tmp_path)
    other = drv.Device(0).retain_primary_context()
    other.push()  # a context of another GPU active on this thread does not matter
    try:
        module, archs = loaded(cuda, rnnc.compile(LSTM, dims={"D": 2, "H": 3}), workdir, device=1)
        assert archs == ["sm_86"]
        assert module.device.context.device.ordinal == 1
    finally:
        other.pop()
    with pytest.raises(CudaUnavailable, match=r"no GPU 2; the CUDA driver sees 2 \(0 to 1\)"):
        PycudaDevice(2)


def test_cubin_the_gpu_cannot_load_says_so(cuda, workdir, monkeypatch):
    def module_from_file(filename):
        raise FakeError("cuModuleLoad failed: no kernel image is available for execution on the device")
    monkeypatch.setattr(sys.modules["pycuda.driver"], "module_from_file", module_from_file)
    with pytest.raises(CudaUnavailable, match=r"this GPU \(sm_90\) cannot load .*no kernel image.*rebuild"):
        loaded(cuda, rnnc.compile(LSTM, dims={"D": 2, "H": 3}), workdir)
    assert cuda.stack() == [sys.modules["pycuda.autoprimaryctx"].context]  # load's push popped


def test_no_gpu_says_so(monkeypatch, tmp_path):
    fake_pycuda(monkeypatch, FakeCuda(devices=0), tmp_path)
    with pytest.raises(CudaUnavailable, match="sees no GPU.*backend='numpy'"):
        PycudaDevice()


def test_driver_failure_says_so(monkeypatch, tmp_path):
    drv = fake_pycuda(monkeypatch, FakeCuda(), tmp_path)

    def init():
        raise FakeError("cuInit failed: no CUDA-capable device is detected")
    monkeypatch.setattr(drv, "init", init)
    with pytest.raises(CudaUnavailable, match="driver failed.*no CUDA-capable device.*backend='numpy'"):
        PycudaDevice()


def test_no_pycuda_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycuda", None)  # import pycuda raises ImportError
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    with pytest.raises(CudaUnavailable, match=r"pip install 'rnnc\[cuda\]'"):
        PycudaDevice()


def test_torch_cells_run_on_the_tensors_gpu_with_torchs_memory(monkeypatch):
    torch = pytest.importorskip("torch")
    import rnnc.torch
    from rnnc.backends.cuda import runtime
    seen = {}

    def load(program, dtype, device=None, empty=None):
        seen.update(dtype=dtype, device=device, array=empty((2, 3)))
        return object()
    monkeypatch.setattr(runtime, "load", load)
    monkeypatch.setattr(torch, "empty", lambda shape, dtype, device: ("torch.empty", shape, dtype, device))
    cell = rnnc.torch.Cell(LSTM, dims={"D": 2, "H": 3}, dtype=torch.float32)
    cell._compiled.backend(torch.device("cuda", 1), torch.float32)
    assert seen == {"dtype": "float32", "device": 1,
                    "array": ("torch.empty", (2, 3), torch.float32, torch.device("cuda", 1))}


def test_reverse_on_gpuarrays_permutes_device_memory(cuda, workdir):
    """reverse=True with device arrays: the steps are permuted by device-to-device copies
    (each checked to lie inside an allocation), and the result is the NumPy reference's."""
    from pycuda import gpuarray
    program = cases.compile_example(LSTM, "all")
    module, _ = loaded(cuda, program, workdir)
    args = cases.arguments(program)
    f64 = {k: {n: a.astype(np.float64) for n, a in v.items()} for k, v in args.items()}
    ref = program.load("numpy", "float64")
    res = ref.forward(f64["inputs"], f64["params"], f64["states"], lengths=cases.LENGTHS, reverse=True)
    want = ref.backward(res, f64["d_outputs"], f64["d_states"])
    on = {k: {n: gpuarray.to_gpu(a) for n, a in v.items()} for k, v in args.items()}
    got = module.forward(on["inputs"], on["params"], on["states"], lengths=cases.LENGTHS, reverse=True)
    grads = module.backward(got, on["d_outputs"], on["d_states"])
    for label, mine, theirs in (("y", got.outputs["y"], res.outputs["y"]),
                                ("h", got.states["h"], res.states["h"]),
                                ("dx", grads.inputs["x"], want.inputs["x"]),
                                ("dW", grads.params["W"], want.params["W"])):
        assert isinstance(mine, gpuarray.GPUArray), label
        np.testing.assert_allclose(mine.get(), theirs, rtol=1e-4, atol=1e-4, err_msg=label)
