"""Running: the CUDA runtime interprets the Plan's schedule (rnnc/passes/schedule.py).

`CudaModule` has the NumPy module's API. A call copies the caller's arrays
in and runs the schedule's events one by one: an event makes the device
buffers of the roles it allocates (one block of the executor's caching pool
per schedule buffer; the lowering gave every buffer its role), runs its
launch lists (`launches.Launches`) with their scratch made for the run, and
frees what the schedule says, back to the pool, so the next call reuses it;
then the results are copied out. The bytes of the
buffers it holds are counted as it makes and frees them, and equal the
Plan's predictions. `executor.Executor` runs the launches on a device
(`device.PycudaDevice`, or the tests' CPU emulation of CUDA).

It takes NumPy arrays, PyCUDA GPUArrays or anything with
`__cuda_array_interface__` (contiguous float32, on the module's GPU), and
returns NumPy arrays for NumPy input, GPUArrays (or what the device's `empty`
makes) otherwise. A module of bfloat16 or float16 (rnnc/dtypes.py) takes and
gives NumPy arrays of its dtype: its states and their cotangents, kept in
float32 on the device, and its gradients, summed in float32, are converted
on the host.
"""
from __future__ import annotations

import math
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from ...dtypes import is_narrow, storage
from ...ops import counter_values
from ...precision import for_dtype
from ..args import bind_cotangents, bind_forward, bind_seed, concrete_shape, saved_for_backward
from ..numpy import ForwardResult, Gradients, NumpyModule
from ..reverse import flip, flip_copies, step_order
from .device import PycudaDevice
from .executor import Executor, Steps, held_slots
from .launches import BACKWARD_CALLER, ELEMS, FORWARD_CALLER, Buffer, Launches
from .lowering import CUDA_DTYPES


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


@dataclass
class Call:
    """One forward call and what its events hold."""

    T: int
    B: int
    schedule: object  # rnnc/passes/schedule.Schedule
    on_device: bool
    memory: dict = field(default_factory=dict)  # name -> Slotted: every live buffer a kernel may read
    held: dict = field(default_factory=dict)  # schedule buffer key -> (name -> Slotted, blocks, bytes)
    current: int = 0  # bytes of the schedule's buffers held now ...
    peak: int = 0  # ... and at most
    used: bool = False  # a backward freed what the forward kept
    order: np.ndarray | None = None  # reverse=True: the steps' permutation (see backends/reverse.py)


class CudaModule:
    """The NumPy module's API on the GPU (see the module docstring)."""

    backend = "cuda"

    def __init__(self, program, launches: Launches, device, dtype="float32", precision: str | None = None,
                 persistent: bool = True):
        self.program, self.cell = program, program.cell
        # the per-step lists with a persistent kernel run as one launch; False (settable on a
        # loaded module): launch by launch, to compare the two. On a device that cannot size the
        # persistent grid, launch by launch.
        self.persistent = persistent
        self.dtype = cuda_dtype(dtype)
        self.precision = for_dtype(self.dtype, precision or program.precision)
        built = {ELEMS[b.elem].dtype for b in launches.buffers.values()} - {"float32"}
        if built != ({self.dtype.name} if is_narrow(self.dtype) else set()):
            raise ValueError(f"dtype: these kernels were generated for {', '.join(built) or 'float32'} "
                             f"arrays, not {self.dtype.name}")
        self.device = device
        self.executor = Executor(launches, device)
        self.buffers = launches.buffers
        self.states = [d.name for d in self.cell.of_kind("state")]
        # the runtime's own state buffers: the caller's initial states, the
        # states between segments, and a checkpoint's
        self.own = {kind: [Buffer(f"{kind}:{s}", self.buffers[f"state:{s}"].numel, True, "one", role)
                           for s in self.states]
                    for kind, role in (("initial", "state"), ("carry", "state"), ("checkpoint", "checkpoint"))}

    def init_params(self, seed: int = 0) -> dict:
        """The same parameters as the NumPy module's, in NumPy arrays of the module's dtype."""
        return NumpyModule(self.program, self.dtype, None).init_params(seed)

    # --- moving arrays -------------------------------------------------------------------------
    def _copy_in(self, ptr: int, array, elem: str = "float", order=None):
        """A caller's array into a buffer of `elem`s (a 16-bit module's states: converted to
        float32); a [T, B, ...] one with its steps permuted by `order`."""
        if isinstance(array, DeviceArray):
            for dst, src, nbytes in flip_copies(order, array.nbytes):
                self.device.dtod(ptr + dst, array.ptr + src, nbytes)
        else:
            self.device.htod(ptr, as_bits(np.ascontiguousarray(flip(array, order),
                                                                storage(ELEMS[elem].dtype))))

    def _copy_out(self, ptr: int, shape: tuple, on_device: bool, elem: str = "float", order=None):
        """A buffer of `elem`s as an array of the module's dtype; a [T, B, ...] one with its
        steps permuted by `order`."""
        if on_device:
            out = self.device.empty(shape)
            base = int(out.__cuda_array_interface__["data"][0])
            for dst, src, nbytes in flip_copies(order, math.prod(shape) * 4):
                self.device.dtod(base + dst, ptr + src, nbytes)
            return out
        out = np.empty(shape, storage(ELEMS[elem].dtype))
        self.device.dtoh(as_bits(out), ptr)
        return flip(out.astype(self.dtype, copy=False), order)

    def _copy_states(self, to: dict, to_kind: str, source: dict, source_kind: str, at=(0, 0)):
        """Each state from `source_kind:s` in `source` into `to_kind:s` in `to`,
        slot `at` (step, segment start) of a per-step state buffer."""
        for s in self.states:
            dst = to[f"{to_kind}:{s}"]
            src = source[f"{source_kind}:{s}"]
            self.device.dtod(dst.at(*at) if to_kind == "state" else dst.ptr,
                             src.at(*at) if source_kind == "state" else src.ptr, dst.slot_bytes)

    def _elem(self, buffer: str) -> str:
        """The element type of a buffer (the runtime's own: float32)."""
        own = self.buffers.get(buffer)
        return own.elem if own else "float"

    def _wrapped(self, **groups) -> list:
        """The caller's arrays of each group (inputs=..., params=...) as `wrap`
        gives them; a 16-bit module takes NumPy arrays only, and says so."""
        wrapped = [wrap_all(arrays) for arrays in groups.values()]
        if is_narrow(self.dtype):
            for group, arrays in zip(groups, wrapped):
                for name, array in (arrays or {}).items():
                    if isinstance(array, DeviceArray):
                        raise ValueError(f"{group}[{name!r}]: a device array, but the cuda backend's "
                                         f"{self.dtype.name} modules take NumPy arrays only (16-bit device "
                                         "arrays are not supported yet)")
        return wrapped

    def _array_types(self) -> tuple:
        return (np.ndarray,) if is_narrow(self.dtype) else (np.ndarray, DeviceArray)

    def _value_shape(self, name: str) -> tuple:
        return concrete_shape(self.program.hoisted.values()[name].shape)

    def _caller(self, call: Call, buffers) -> dict:
        """Device memory for the caller's arrays, back to the pool when the call is gone."""
        memory, blocks = self.executor.allocate(buffers, Steps(call.T, call.B))
        call.memory.update(memory)
        weakref.finalize(call, self.executor.release, blocks)
        return memory

    # --- forward -----------------------------------------------------------------------------------
    def forward(self, inputs, params, states=None, contexts=None, lengths=None, train=True, seed=None,
                stochastic=None, reverse=False):
        with self.device.active():  # the device's context, on whichever thread calls
            return self._forward(inputs, params, states, contexts, lengths, train, seed, stochastic, reverse)

    def _forward(self, inputs, params, states, contexts, lengths, train, seed, stochastic, reverse):
        T, B, inputs, params, states, contexts, lengths = bind_forward(
            self.cell, self.dtype, *self._wrapped(inputs=inputs, params=params, states=states, contexts=contexts),
            lengths, self._array_types())
        seed = bind_seed(seed)
        schedule = self.program.plan.schedule(T, B, self.dtype, train)
        self.executor.check_sizes(T, B, max((e.stop - e.start for e in schedule.events), default=0))
        order = step_order(T, B, lengths) if reverse else None
        call = Call(T, B, schedule,
                    isinstance(next(iter(inputs.values())), DeviceArray), order=order)
        caller = [b for b in self.buffers.values() if b.role in FORWARD_CALLER]
        memory = self._caller(call, caller + self.own["initial"] + self.own["carry"])
        for kind, given in (("input", inputs), ("param", params), ("context", contexts), ("initial", states)):
            for name, array in given.items():
                self._copy_in(memory[f"{kind}:{name}"].ptr, array, self._elem(f"{kind}:{name}"),
                              order if kind == "input" else None)
        for s in self.states:
            if s not in states:
                self.device.memset0(memory[f"initial:{s}"].ptr, memory[f"initial:{s}"].slot_bytes)
        steps = np.arange(T)[:, None] < (np.full(B, T) if lengths is None else lengths)[None, :]
        self.device.htod(memory["valid"].ptr, steps.astype(np.float32))
        drawing = train if stochastic is None else bool(stochastic)
        counter = counter_values(T, B, seed, drawing, np.float32)  # the key's words go in as floats' bits
        for b in self.buffers.values():
            if b.role in counter:
                self.device.htod(memory[b.name].ptr, np.ascontiguousarray(counter[b.role]))
        self._run_forward(call)
        outputs = {o: self._copy_out(memory[f"output:{o}"].ptr, (T, B) + self._value_shape(v), call.on_device,
                                     self._elem(f"output:{o}"), order)
                   for o, v in self.program.hoisted.outputs}
        final = {s: self._copy_out(memory[f"carry:{s}"].ptr, (B,) + self._value_shape(s), call.on_device)
                 for s in self.states}
        return ForwardResult(outputs, final, call.current, call if train else None, seed)

    def _run_forward(self, call: Call):
        self._copy_states(call.memory, "carry", call.memory, "initial")
        self._run(call, call.schedule.forward())

    # --- the interpreter --------------------------------------------------------------------------
    def _run(self, call: Call, events):
        for event in events:
            restored = self._release(call, event.restores) if event.restores else None
            for buffer in event.allocs:
                self._hold(call, buffer, event)
            getattr(self, f"_on_{event.kind}")(call, event, restored)
            if restored:
                self.executor.release(restored[1])
            for buffer in event.frees:
                self.executor.release(self._release(call, buffer)[1])

    def _hold(self, call: Call, buffer, event):
        """The device buffers of schedule buffer `buffer`, made for `event`'s steps."""
        steps = Steps(call.T, call.B, event.start, event.stop, tape=True)
        buffers = self.own["checkpoint"] if buffer.role == "checkpoint" else self.executor.role(buffer.role)
        memory, blocks = self.executor.allocate(buffers, steps)
        if buffer.role in ("d_seq", "d_rows"):  # sums, and rows a step may leave unwritten
            for m in memory.values():
                self.device.memset0(m.ptr, m.slots * m.slot_bytes)
        nbytes = sum(held_slots(b, steps) * memory[b.name].slot_bytes for b in buffers)
        call.held[buffer.key] = (memory, blocks, nbytes)
        call.current += nbytes
        call.peak = max(call.peak, call.current)
        if buffer.role != "checkpoint":  # only the runtime reads checkpoints
            call.memory.update(memory)

    def _release(self, call: Call, buffer) -> tuple:
        """Forget `buffer`; its (memory, blocks), for a last use before the blocks go back to the pool."""
        memory, blocks, nbytes = call.held.pop(buffer.key)
        call.current -= nbytes
        for name in memory:
            call.memory.pop(name, None)
        return memory, blocks

    @contextmanager
    def _scratch(self, call: Call, kind: str, steps: Steps, extra=()):
        """Device memory for one run of launch list `kind`: its scratch, and `extra`."""
        memory, blocks = self.executor.allocate(self.executor.scratch[kind] + list(extra), steps)
        call.memory.update(memory)
        try:
            yield
        finally:
            for name in memory:
                del call.memory[name]
            self.executor.release(blocks)

    def _launch(self, call: Call, kind: str, steps: Steps, times, extra=()):
        """Launch list `kind` for each step in `times`, with its scratch."""
        with self._scratch(call, kind, steps, extra):
            self._steps(call, kind, steps, times)

    def _steps(self, call: Call, kind: str, steps: Steps, times):
        """Launch list `kind` for each step in `times`, its arguments packed once
        for all of them: in one launch of its persistent kernel where it has
        one and the module runs them (`persistent`) on a device that holds it,
        else launch by launch."""
        times = list(times)
        if self.persistent and kind in self.executor.launches.persistent and hasattr(self.device, "co_resident"):
            # (a call of T = 0 has no steps to launch)
            if not times or self.executor.run_persistent(kind, call.memory, steps, times):
                return
        for launches in self.executor.prepare(kind, call.memory, steps, times):
            self.executor.run(launches)

    def _on_seq(self, call, event, restored):
        self._launch(call, "seq", Steps(call.T, call.B), [0])

    def _on_checkpoint(self, call, event, restored):
        self._copy_states(call.held[event.allocs[0].key][0], "checkpoint", call.memory, "carry")

    def _on_forward(self, call, event, restored):
        """The hoisted rows of the segment's steps, then its steps, from the
        states after the last segment (a replay: from its checkpoint)."""
        tape = event.allocated("tape") is not None
        steps = Steps(call.T, call.B, event.start, event.stop, tape)
        self._launch(call, "rows", steps, [event.start])
        # without a tape, the stored values and states of one step at a time are scratch
        working = [] if tape else self.executor.role("tape")
        with self._scratch(call, "step", steps, working):
            at = (event.start, event.start)
            if restored:
                self._copy_states(call.memory, "state", restored[0], "checkpoint", at)
            else:
                self._copy_states(call.memory, "state", call.memory, "carry", at)
            self._steps(call, "step", steps, event.steps)
            if event.kind == "forward":
                self._copy_states(call.memory, "carry", call.memory, "state", (event.stop, event.start))

    _on_replay = _on_forward

    def _on_backward(self, call, event, restored):
        steps = Steps(call.T, call.B, event.start, event.stop, tape=True)
        self._launch(call, "backward_step", steps, reversed(event.steps))

    def _on_param_grads(self, call, event, restored):
        steps = Steps(call.T, call.B, event.start, event.stop, tape=True)
        self._launch(call, "param_grads", steps, [event.start])

    def _on_backward_seq(self, call, event, restored):
        self._launch(call, "backward_seq", Steps(call.T, call.B), [0])

    # --- backward -------------------------------------------------------------------------------------
    def backward(self, result: ForwardResult, d_outputs=None, d_states=None) -> Gradients:
        with self.device.active():  # torch's autograd calls this from its own thread
            return self._backward(result, d_outputs, d_states)

    def _backward(self, result: ForwardResult, d_outputs, d_states) -> Gradients:
        call = saved_for_backward(result)
        T, B = call.T, call.B
        d_outputs, d_states = bind_cotangents(self.cell, self.dtype, T, B,
                                              *self._wrapped(d_outputs=d_outputs, d_states=d_states),
                                              self._array_types())
        if call.used:  # an earlier backward freed what the forward kept: rebuild it
            self._run_forward(call)
        call.used = True
        memory, blocks = self.executor.allocate(
            [b for b in self.buffers.values() if b.role in BACKWARD_CALLER], Steps(T, B))
        call.memory.update(memory)
        given = {"d_output": d_outputs, "d_state": d_states}
        for name, m in memory.items():
            kind, value = name.split(":", 1)
            if value in given.get(kind, {}):  # a state's cotangent after the last step: slot T
                self._copy_in(m.at(T) if kind == "d_state" else m.ptr, given[kind][value], self._elem(name),
                              call.order if kind == "d_output" else None)
            else:  # gradients summed into, and cotangents not given
                self.device.memset0(m.ptr, m.slots * m.slot_bytes)
        self._run(call, call.schedule.backward())

        def out(buf, lead, name, order=None):
            return self._copy_out(memory[buf].at(0), lead + self._value_shape(name), call.on_device,
                                  self._elem(buf), order)
        cell = self.cell
        grads = Gradients(
            params={d.name: out(f"d_acc:{d.name}", (), d.name) for d in cell.of_kind("param")},
            inputs={d.name: out(f"d_row:{d.name}", (T, B), d.name, call.order) for d in cell.of_kind("input")},
            states={s: out(f"d_state:{s}", (B,), s) for s in self.states},
            contexts={d.name: out(f"d_acc:{d.name}", (B,), d.name) for d in cell.of_kind("context")},
            peak_bytes=call.peak)
        for name in memory:
            del call.memory[name]
        self.executor.release(blocks)  # the copies out are queued before any reuse
        return grads


# --- PyCUDA -----------------------------------------------------------------------------------------

def load(program, dtype="float32", device: int | None = None, empty=None, cubin_for=None,
         made: dict | None = None, precision: str | None = None) -> CudaModule:
    """A CudaModule for a Program, loaded with PyCUDA (`device` and `empty`: see
    PycudaDevice): the program's `cuda` and `cubin` stages (rnnc/driver.py),
    its products at `precision` (default: the Program's), built for the GPU,
    or `cubin_for(arch)`'s cubin of the `cuda` stage (given in `made`, or made now)."""
    dtype = cuda_dtype(dtype).name
    precision = for_dtype(dtype, precision or program.precision).name
    precision = program.precision if is_narrow(dtype) else precision  # the option's name; the dtype decides
    device = PycudaDevice(device, empty)  # fails first, and says why, without a GPU
    if cubin_for is None:
        made = program.build("cubin", made, arch=device.arch, precision=precision, dtype=dtype)
        cubin = made["cubin"].path
    else:
        made = program.build("cuda", made, precision=precision, dtype=dtype)
        cubin = cubin_for(device.arch)
    launches = made["cuda"].launches
    device.load_module(cubin, launches.arities())
    return CudaModule(program, launches, device, dtype, precision)


def cuda_dtype(dtype) -> np.dtype:
    """A dtype the CUDA backend runs, or a ValueError naming them."""
    try:
        return storage(dtype, CUDA_DTYPES)
    except ValueError as err:
        raise ValueError(f"{err} (the cuda backend runs these; backend='numpy' runs float64)") from None


def as_bits(array: np.ndarray) -> np.ndarray:
    """A 16-bit array as its bits (what PyCUDA's copies take), others as they are."""
    return array.view(np.uint16) if array.dtype.itemsize == 2 else array
