"""Running: a host loop over time launches the generated kernels.

`Executor` interprets a `Schedule` on a `Device`: it allocates the buffers of
one call in one pool, copies the caller's arrays in, runs the once-per-sequence
launches, then the per-step launches for t = 0..T-1 (and T-1..0 backward), and
copies results out. `PycudaDevice` is the real device; anything with the same
few methods works (the tests run the kernels through a CPU emulation of CUDA).

`CudaModule` has the NumPy module's API. It takes NumPy arrays, PyCUDA
GPUArrays or anything with `__cuda_array_interface__` (contiguous float32, on
the module's GPU), and returns NumPy arrays for NumPy input, GPUArrays (or what
the device's `empty` makes) otherwise.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from ..args import bind_cotangents, bind_forward, concrete_shape
from ..numpy import ForwardResult, Gradients, NumpyModule
from . import ToolchainError
from .codegen import Schedule

ALIGN = 256  # bytes between buffers of a pool (the alignment cudaMalloc gives)


class CudaUnavailable(ToolchainError):
    """PyCUDA, the driver or a GPU is missing; the message says which and what to do."""


# --- arrays the caller passes ------------------------------------------------------------
class DeviceArray:
    """A caller's device array seen through `__cuda_array_interface__`."""

    def __init__(self, obj):
        cai = obj.__cuda_array_interface__
        self.obj, self.shape = obj, tuple(cai["shape"])
        self.dtype = np.dtype(cai["typestr"])
        self.ndim = len(self.shape)
        self.ptr = int(cai["data"][0])
        if not is_dense(self.shape, cai.get("strides"), self.dtype.itemsize):
            raise ValueError(f"a device array of shape {list(self.shape)} is not C-contiguous "
                             "(make it contiguous first)")

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def is_dense(shape: tuple, strides, itemsize: int) -> bool:
    """C-contiguous: no strides given, or each axis longer than 1 strided by what follows it."""
    if strides is None:
        return True
    expected = itemsize
    for n, s in reversed(list(zip(shape, strides))):
        if n > 1 and s != expected:
            return False
        expected *= n
    return True


def wrap(array):
    """A caller's array as np.ndarray or DeviceArray (None and others unchanged, for the checks)."""
    if array is None or isinstance(array, np.ndarray) or not hasattr(array, "__cuda_array_interface__"):
        return array
    return DeviceArray(array)


def wrap_all(arrays: dict | None):
    return None if arrays is None else {k: wrap(v) for k, v in arrays.items()}


# --- the schedule's interpreter ------------------------------------------------------------
@dataclass
class Slotted:
    """A buffer in a pool: `slots` slots; a segment's buffer counts them from the segment's start."""

    ptr: int
    slots: int
    slot_bytes: int
    per_segment: bool

    def at(self, step: int, start: int = 0) -> int:
        index = step - start if self.per_segment else step
        return self.ptr + (index % self.slots if self.slots else 0) * self.slot_bytes  # T = 0: no slots


@dataclass(frozen=True)
class Steps:
    """Steps start..stop of a sequence of T steps, batch B: one segment of a call."""

    T: int
    B: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return (self.stop - self.start) * self.B


def segments(plan, T: int, train: bool) -> list:
    """(start, stop) of each segment the Plan runs; inference keeps nothing, so one segment."""
    lengths = plan.segments_for(T) if train else ((T,) if T else ())
    bounds, start = [], 0
    for n in lengths:
        bounds.append((start, start + n))
        start += n
    return bounds or [(0, 0)]


def slot_count(buffer, T: int, longest: int, train: bool) -> int:
    if buffer.whole_sequence:
        return T
    steps = longest
    return {"one": 1, "T": steps, "tape": steps if train else 1, "state": steps + 1 if train else 2}[buffer.slots]


class Executor:
    def __init__(self, schedule: Schedule, device):
        self.schedule, self.device = schedule, device
        forward = {name for k in ("forward_seq", "forward_pre", "forward_step")
                   for launch in getattr(schedule, k) for name, _ in launch.args}
        buffers = schedule.buffers.values()
        self.transient = [b for b in buffers if b.role == "transient"]  # only while forward_pre runs
        self.forward_buffers = [b for b in buffers if b.role != "transient" and (
            b.name in forward or b.role in ("input", "param", "context", "state", "output"))]
        self.backward_buffers = [b for b in buffers if b.role != "transient" and b not in self.forward_buffers]

    def allocate(self, buffers, T: int, B: int, longest: int, train: bool):
        """One pool for `buffers`: (name -> Slotted, the pool to keep alive)."""
        layout, offset = {}, 0
        for b in buffers:
            slot_bytes = (B if b.batched else 1) * b.numel * 4
            slots = slot_count(b, T, longest, train)
            layout[b.name] = (offset, slots, slot_bytes, not b.whole_sequence)
            offset += -(-max(slots * slot_bytes, 1) // ALIGN) * ALIGN
        base, pool = self.device.alloc(offset)
        return {n: Slotted(base + o, *rest) for n, (o, *rest) in layout.items()}, pool

    def run(self, launches, memory: dict, steps: Steps, t: int, lengths: int):
        for launch in launches:
            rows = steps.B if launch.rows == "B" else steps.rows
            grid = tuple(min(-(-(e.n * (rows if e.rows else 1)) // e.div), limit) or 1
                         for e, limit in zip(launch.grid, GRID_LIMITS))
            index = {"base": steps.start, "t": t, "t+1": t + 1}
            ptrs = [memory[name].at(index[sel], steps.start) for name, sel in launch.args]
            self.device.launch(launch.kernel, grid, launch.block, rows, t, lengths, ptrs)


# grid-stride loops (and the product kernel's loop over g) make any grid size correct,
# so huge launches are capped at the hardware's limits
GRID_LIMITS = (2**31 - 1, 65535, 65535)


@dataclass
class Call:
    """What one forward keeps for its backward."""

    T: int
    B: int
    bounds: list  # (start, stop) per segment
    memory: dict
    pools: list  # device memory to keep alive
    lengths: int  # device pointer
    checkpoints: dict  # state name -> Slotted: the states at the start of every segment but the last
    on_device: bool
    replayed: bool = False  # a backward replayed segments, overwriting the last one's values


# --- the module --------------------------------------------------------------------------------
class CudaModule:
    """The NumPy module's API on the GPU (see the module docstring)."""

    backend = "cuda"

    def __init__(self, program, schedule: Schedule, device, dtype="float32"):
        if np.dtype(dtype) != np.float32:
            raise ValueError(f"dtype: the cuda backend runs float32 only, got {dtype!r} "
                             "(use backend='numpy' for float64)")
        self.program, self.cell = program, program.cell
        self.dtype = np.dtype(np.float32)
        self.device = device
        self.executor = Executor(schedule, device)
        self.buffers = schedule.buffers
        self.states = [d.name for d in self.cell.of_kind("state")]

    def init_params(self, seed: int = 0) -> dict:
        """The same parameters as the NumPy module's, in float32 NumPy arrays."""
        return NumpyModule(self.program, "float32").init_params(seed)

    # --- moving arrays -------------------------------------------------------------------------
    def _copy_in(self, ptr: int, array):
        if isinstance(array, DeviceArray):
            self.device.dtod(ptr, array.ptr, array.nbytes)
        else:
            self.device.htod(ptr, np.ascontiguousarray(array))

    def _copy_out(self, ptr: int, shape: tuple, on_device: bool):
        if on_device:
            out = self.device.empty(shape)
            self.device.dtod(int(out.__cuda_array_interface__["data"][0]), ptr, math.prod(shape) * 4)
            return out
        out = np.empty(shape, np.float32)
        self.device.dtoh(out, ptr)
        return out

    def _value_shape(self, name: str) -> tuple:
        return concrete_shape(self.program.cell.graph.values()[name].shape)

    # --- forward -----------------------------------------------------------------------------------
    def forward(self, inputs, params, states=None, contexts=None, lengths=None, train=True):
        with self.device.active():  # the device's context, on whichever thread calls
            return self._forward(inputs, params, states, contexts, lengths, train)

    def _forward(self, inputs, params, states, contexts, lengths, train):
        T, B, inputs, params, states, contexts, lengths = bind_forward(
            self.cell, self.dtype, wrap_all(inputs), wrap_all(params), wrap_all(states),
            wrap_all(contexts), lengths, (np.ndarray, DeviceArray))
        ex, sched = self.executor, self.executor.schedule
        bounds = segments(self.program.plan, T, train)
        longest = max(stop - start for start, stop in bounds)
        memory, pool = ex.allocate(ex.forward_buffers, T, B, longest, train)
        checkpoints, ckpt_pool = self._checkpoints(B, len(bounds) - 1 if train else 0)
        call = Call(T, B, bounds, memory, [pool, ckpt_pool], 0, checkpoints,
                    isinstance(next(iter(inputs.values())), DeviceArray))
        for kind, given in (("input", inputs), ("param", params), ("context", contexts)):
            for name, array in given.items():
                self._copy_in(memory[f"{kind}:{name}"].ptr, array)
        for s in self.states:
            slot = memory[f"state:{s}"]
            if s in states:
                self._copy_in(slot.ptr, states[s])
            else:
                self.device.memset0(slot.ptr, slot.slot_bytes)
        call.lengths, lengths_pool = self.device.alloc(B * 4)
        call.pools.append(lengths_pool)
        self.device.htod(call.lengths, np.full(B, T, np.int32) if lengths is None else lengths.astype(np.int32))
        ex.run(sched.forward_seq, memory, Steps(T, B, 0, 0), 0, call.lengths)
        self._run_segments(call)
        start, stop = bounds[-1]
        outputs = {o: self._copy_out(memory[f"output:{o}"].ptr, (T, B) + self._value_shape(v), call.on_device)
                   for o, v in self.cell.outputs}
        final = {s: self._copy_out(memory[f"state:{s}"].at(stop, start), (B,) + self._value_shape(s),
                                   call.on_device) for s in self.states}
        return ForwardResult(outputs, final, self.stored_bytes(T, B) if train else 0, call if train else None)

    def _checkpoints(self, B: int, count: int):
        sizes = {s: B * self.buffers[f"state:{s}"].numel * 4 for s in self.states}
        base, pool = self.device.alloc(sum(-(-max(n * count, 1) // ALIGN) * ALIGN for n in sizes.values()))
        out, offset = {}, 0
        for s, n in sizes.items():
            out[s] = Slotted(base + offset, count, n, False)
            offset += -(-max(n * count, 1) // ALIGN) * ALIGN
        return out, pool

    def _run_segments(self, call: Call):
        """Every segment in order from the initial states in slot 0 of the state
        buffers, checkpointing each segment's states but the last one's."""
        for j, (start, stop) in enumerate(call.bounds):
            if j < len(call.bounds) - 1:
                self._copy_states(call.memory, 0, call.checkpoints, j)
            self._run_segment(call.memory, Steps(call.T, call.B, start, stop), call.lengths)
            if j < len(call.bounds) - 1 and stop > start:  # the next segment starts from slot 0
                for s in self.states:
                    state = call.memory[f"state:{s}"]
                    self.device.dtod(state.ptr, state.at(stop, start), state.slot_bytes)

    def _copy_states(self, memory: dict, slot: int, checkpoints: dict, j: int, restore: bool = False):
        """Each state's slot `slot` into checkpoint j, or back when `restore`."""
        for s in self.states:
            state, ckpt = memory[f"state:{s}"].at(slot), checkpoints[s].at(j)
            self.device.dtod(*((state, ckpt) if restore else (ckpt, state)), memory[f"state:{s}"].slot_bytes)

    def _run_segment(self, memory: dict, steps: Steps, lengths: int):
        """The hoisted rows of the segment's steps, then the steps, from the states in slot 0."""
        ex = self.executor
        scratch, scratch_pool = ex.allocate(ex.transient, steps.T, steps.B, steps.stop - steps.start, True)
        ex.run(ex.schedule.forward_pre, {**memory, **scratch}, steps, steps.start, lengths)
        del scratch, scratch_pool  # the hoisted regions' scratch is not held past them
        for t in range(steps.start, steps.stop):
            ex.run(ex.schedule.forward_step, memory, steps, t, lengths)

    # --- backward -------------------------------------------------------------------------------------
    def backward(self, result: ForwardResult, d_outputs=None, d_states=None) -> Gradients:
        with self.device.active():  # torch's autograd calls this from its own thread
            return self._backward(result, d_outputs, d_states)

    def _backward(self, result: ForwardResult, d_outputs, d_states) -> Gradients:
        """Segments last first: replay a segment from its checkpoint (the forward
        kept the last one), backpropagate through its steps, then its rows' products."""
        call = result._tape
        if call is None:
            raise ValueError("backward: this result came from forward(..., train=False), which keeps "
                             "nothing for the backward; run forward with train=True")
        T, B = call.T, call.B
        d_outputs, d_states = bind_cotangents(self.cell, self.dtype, T, B, wrap_all(d_outputs),
                                              wrap_all(d_states), (np.ndarray, DeviceArray))
        ex, sched = self.executor, self.executor.schedule
        longest = max(stop - start for start, stop in call.bounds)
        own, pool = ex.allocate(ex.backward_buffers, T, B, longest, True)
        memory = {**call.memory, **own}
        for name in sched.zero_before_backward:
            self.device.memset0(memory[name].ptr, memory[name].slots * memory[name].slot_bytes)
        for kind, given, names in (("d_output", d_outputs, [o for o, _ in self.cell.outputs]),
                                   ("d_state", d_states, self.states)):
            for name in names:
                m = memory[f"{kind}:{name}"]
                if name in given:
                    self._copy_in(m.ptr, given[name])
                else:
                    self.device.memset0(m.ptr, m.slots * m.slot_bytes)
        if call.replayed:  # an earlier backward overwrote the last segment's values: rebuild them
            self._copy_states(memory, 0, call.checkpoints, 0, restore=True)
            self._run_segments(call)
        for j in reversed(range(len(call.bounds))):
            start, stop = call.bounds[j]
            steps = Steps(T, B, start, stop)
            if j < len(call.bounds) - 1:  # replay: the forward kept only its checkpoint
                self._copy_states(memory, 0, call.checkpoints, j, restore=True)
                self._run_segment(memory, steps, call.lengths)
                call.replayed = True
            for t in reversed(range(start, stop)):
                ex.run(sched.backward_step, memory, steps, t, call.lengths)
            ex.run(sched.backward_segment, memory, steps, start, call.lengths)
        ex.run(sched.backward_seq, memory, Steps(T, B, 0, 0), 0, call.lengths)

        def out(buf, lead, name):
            return self._copy_out(memory[buf].ptr, lead + self._value_shape(name), call.on_device)
        cell = self.cell
        return Gradients(
            params={d.name: out(f"d_acc:{d.name}", (), d.name) for d in cell.of_kind("param")},
            inputs={d.name: out(f"d_row:{d.name}", (T, B), d.name) for d in cell.of_kind("input")},
            states={s: out(f"d_state:{s}", (B,), s) for s in self.states},
            contexts={d.name: out(f"d_acc:{d.name}", (B,), d.name) for d in cell.of_kind("context")},
            peak_bytes=self.peak_bytes(T, B))

    # --- memory ------------------------------------------------------------------------------------------
    def _held(self, T: int, B: int, names) -> int:
        """Bytes of `names` for a training call of T steps: the longest segment's slots
        (the final state is returned, not held)."""
        longest = max(stop - start for start, stop in segments(self.program.plan, T, True))
        total = 0
        for name in names:
            b = self.buffers[name]
            slots = slot_count(b, T, longest, True) - (b.slots == "state")
            total += slots * (B if b.batched else 1) * b.numel * 4
        return total

    def stored_bytes(self, T: int, B: int) -> int:
        """What the forward keeps for the backward: the hoisted values, the
        checkpoints, and the states before every step and the values the Plan
        stores per step for one segment."""
        kept = [n for n in self.buffers if n.split(":", 1)[0] in ("seq", "pre", "tape", "state")]
        checkpoints = (len(segments(self.program.plan, T, True)) - 1) * sum(
            B * self.buffers[f"state:{s}"].numel * 4 for s in self.states)
        return self._held(T, B, kept) + checkpoints

    def peak_bytes(self, T: int, B: int) -> int:
        """The stored bytes plus what the backward holds across steps: the
        cotangents of the hoisted values (accumulated for the `seq` values,
        per step for the `pre` values, read by the batched products)."""
        decls = {d.name for d in self.cell.decls}
        held = [name for name in self.buffers
                if name.split(":", 1)[0] in ("d_row", "d_acc") and name.split(":", 1)[1] not in decls]
        return self.stored_bytes(T, B) + self._held(T, B, held)


# --- PyCUDA -----------------------------------------------------------------------------------------
class PycudaDevice:
    """The real device: a PyCUDA context and the cubin's functions.

    `ordinal=None` runs in the PyCUDA context active on this thread (pycuda.autoinit's,
    say), else in pycuda.autoprimaryctx's: a GPU's primary context (GPU 0's unless
    CUDA_DEVICE says otherwise), left active on this thread (so the caller can make and
    read GPUArrays) until PyCUDA pops it at exit. An ordinal picks that GPU's primary
    context, the one the CUDA runtime and PyTorch use, and leaves no context active.

    PyCUDA keeps a context stack per thread, so every call pushes the context and pops
    it after (`active`): the module works from any thread, such as torch's autograd
    threads. `empty(shape)` makes float32 device arrays (results, and the pools behind
    them): PyCUDA GPUArrays unless given. PyCUDA frees its device memory only where its
    context is active or on the thread that made the context (elsewhere it leaks it,
    with a warning), so rnnc.torch passes torch.empty.
    """

    def __init__(self, ordinal: int | None = None, empty=None):
        drv = import_pycuda()
        try:
            drv.init()
            count = drv.Device.count()
            if count == 0:
                raise CudaUnavailable("backend='cuda': the CUDA driver sees no GPU; run on a machine "
                                      "with an NVIDIA GPU or use backend='numpy'")
            if ordinal is None and drv.Context.get_current() is None:
                import pycuda.autoprimaryctx  # noqa: F401  (its first import pushes the context)
            current = drv.Context.get_current() if ordinal is None else None
            if current is not None:
                self.context, self.gpu = current, drv.Context.get_device()
            else:
                if not 0 <= (ordinal or 0) < count:
                    raise CudaUnavailable(f"backend='cuda': there is no GPU {ordinal}; the CUDA driver "
                                          f"sees {count} (0 to {count - 1})")
                self.gpu = drv.Device(ordinal or 0)
                self.context = self.gpu.retain_primary_context()
        except drv.Error as err:
            raise CudaUnavailable(f"backend='cuda': the CUDA driver failed ({err}); install the NVIDIA "
                                  "driver or use backend='numpy'") from None
        self.drv = drv
        self.empty = empty or self._gpuarray
        self.functions = {}

    @contextmanager
    def active(self):
        self.context.push()
        try:
            yield
        finally:
            self.drv.Context.pop()

    @property
    def arch(self) -> str:
        major, minor = self.gpu.compute_capability()
        return f"sm_{major}{minor}"

    def load_module(self, cubin_path, arities: dict):
        """The cubin's kernels, each prepared for (rows, t, lengths, buffers...)."""
        with self.active():
            try:
                self.module = self.drv.module_from_file(str(cubin_path))
            except self.drv.Error as err:  # PyCUDA's errors are not RuntimeErrors: say what this one means
                raise CudaUnavailable(f"backend='cuda': this GPU ({self.arch}) cannot load {cubin_path} "
                                      f"({err}); rebuild it for {self.arch}") from None
            for name, n in arities.items():
                f = self.module.get_function(name)
                f.prepare("iiP" + "P" * n)
                self.functions[name] = f

    @staticmethod
    def _gpuarray(shape):
        from pycuda import gpuarray
        return gpuarray.empty(shape, np.float32)

    def alloc(self, nbytes: int):
        pool = self.empty((max(-(-nbytes // 4), 1),))
        return int(pool.__cuda_array_interface__["data"][0]), pool

    # the driver's copies and memsets run in order with the launches (all on stream 0);
    # empty arrays may have a null pointer, which the driver need not accept
    def htod(self, ptr: int, array: np.ndarray):
        if array.nbytes:
            self.drv.memcpy_htod(ptr, array)

    def dtoh(self, out: np.ndarray, ptr: int):
        if out.nbytes:
            self.drv.memcpy_dtoh(out, ptr)

    def dtod(self, dst: int, src: int, nbytes: int):
        if nbytes:
            self.drv.memcpy_dtod(dst, src, nbytes)

    def memset0(self, ptr: int, nbytes: int):
        if nbytes:
            self.drv.memset_d8(ptr, 0, nbytes)

    def launch(self, kernel, grid, block, rows, t, lengths, ptrs):
        self.functions[kernel].prepared_call(grid, (block, 1, 1), np.int32(rows), np.int32(t),
                                             np.uintp(lengths), *[np.uintp(p) for p in ptrs])


def import_pycuda():
    try:
        import pycuda.driver as drv
    except ImportError as err:
        if "libcuda" in str(err):
            raise CudaUnavailable(f"backend='cuda': the NVIDIA driver is missing ({err}); install it "
                                  "on a machine with an NVIDIA GPU, or use backend='numpy'") from None
        raise CudaUnavailable("backend='cuda' needs PyCUDA: pip install 'rnnc[cuda]' (or pip install "
                              "pycuda), with the NVIDIA driver and a GPU; or use backend='numpy'") from None
    return drv


def load(program, dtype="float32", generated=None, cubin_for=None, device: int | None = None,
         empty=None) -> CudaModule:
    """A CudaModule for a Program: the generated kernels (given, or generated
    now) built for the GPU, or `cubin_for(arch)`'s cubin, loaded with PyCUDA
    (`device` and `empty`: see PycudaDevice)."""
    from .build import compile_cubin
    from .codegen import generate
    if np.dtype(dtype) != np.float32:
        raise ValueError(f"dtype: the cuda backend runs float32 only, got {dtype!r} "
                         "(use backend='numpy' for float64)")
    device = PycudaDevice(device, empty)  # fails first, and says why, without a GPU
    generated = generated or generate(program)
    arch = device.arch
    cubin_path = cubin_for(arch) if cubin_for else compile_cubin(generated.source, arch).path
    device.load_module(cubin_path, generated.schedule.arities())
    return CudaModule(program, generated.schedule, device, dtype)
