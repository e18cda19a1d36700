"""Running: a host loop over time launches the generated kernels.

`CudaModule` has the NumPy module's API. Per call it allocates the buffers
in pools, copies the caller's arrays in, runs the once-per-sequence launches,
then per segment of steps the hoisted rows and the per-step launches for
t = start..stop-1 (and back, last segment first, for the backward, replaying
a segment from its checkpoint), and copies results out; `executor.Executor`
runs the launches on a device (`device.PycudaDevice`, or the tests' CPU
emulation of CUDA).

It takes NumPy arrays, PyCUDA GPUArrays or anything with
`__cuda_array_interface__` (contiguous float32, on the module's GPU), and
returns NumPy arrays for NumPy input, GPUArrays (or what the device's `empty`
makes) otherwise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ...precision import precision as find_precision
from ..args import bind_cotangents, bind_forward, concrete_shape, module_dtype, saved_for_backward
from ..numpy import ForwardResult, Gradients, NumpyModule
from .device import PycudaDevice
from .executor import Executor, Slotted, Steps, aligned, segments, slot_count
from .schedule import Schedule


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

    def __init__(self, program, schedule: Schedule, device, dtype="float32", precision: str | None = None):
        if np.dtype(dtype) != np.float32:
            raise ValueError(f"dtype: the cuda backend runs float32 only, got {dtype!r} "
                             "(use backend='numpy' for float64)")
        self.program, self.cell = program, program.cell
        self.precision = find_precision(precision or program.precision)
        self.dtype = np.dtype(np.float32)
        self.device = device
        self.executor = Executor(schedule, device)
        self.buffers = schedule.buffers
        self.states = [d.name for d in self.cell.of_kind("state")]

    def init_params(self, seed: int = 0) -> dict:
        """The same parameters as the NumPy module's, in float32 NumPy arrays."""
        return NumpyModule(self.program, "float32", self.precision.name).init_params(seed)

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
        ex.check_sizes(T, B, longest)
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
        base, pool = self.device.alloc(sum(aligned(n * count) for n in sizes.values()))
        out, offset = {}, 0
        for s, n in sizes.items():
            out[s] = Slotted(base + offset, count, n, False)
            offset += aligned(n * count)
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
        call = saved_for_backward(result)
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

def load(program, dtype="float32", generated=None, cubin_for=None, device: int | None = None,
         empty=None, precision: str | None = None) -> CudaModule:
    """A CudaModule for a Program: the generated kernels (given, or generated
    now at `precision`, default the Program's) built for the GPU, or
    `cubin_for(arch)`'s cubin, loaded with PyCUDA (`device` and `empty`: see
    PycudaDevice)."""
    from .build import compile_cubin
    from .lowering import generate
    if module_dtype(dtype) != np.float32:
        raise ValueError(f"dtype: the cuda backend runs float32 only, got {dtype!r} "
                         "(use backend='numpy' for float64)")
    precision = find_precision(precision or program.precision).name
    device = PycudaDevice(device, empty)  # fails first, and says why, without a GPU
    generated = generated or generate(program, precision)
    arch = device.arch
    cubin_path = cubin_for(arch) if cubin_for else compile_cubin(generated.source, arch).path
    device.load_module(cubin_path, generated.schedule.arities())
    return CudaModule(program, generated.schedule, device, dtype, precision)
