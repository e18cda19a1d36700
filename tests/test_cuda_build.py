"""No-GPU tier of the CUDA backend: generated source, nvcc builds, the cache.

Every example under every policy and precision, and in bfloat16 and
float16, compiles with nvcc to cubins for sm_80 and sm_90 with no register
spills, at the tests' small sizes and at the benchmark's (where the products
take their largest tiles); under tf32, bfloat16 and float16 every product
kernel with more than one row, column and summand runs on tensor cores (HMMA
in its SASS, read with cuobjdump), and under fp32 none does. The LSTM's source is compared with a golden file
(RNNC_UPDATE_GOLDEN=1 rewrites it).
"""
from __future__ import annotations

import keyword
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest

import rnnc
from rnnc.backends.cuda import build, occupancy
from rnnc.backends.cuda.executor import work_blocks
from rnnc.backends.cuda.cexpr import mangle
from rnnc.backends.cuda.device import CudaUnavailable
from rnnc.backends.cuda.lowering import generate
from rnnc.backends.cuda.kernels import Generator, Launched
from rnnc.backends.cuda.launches import Extent, Launch, Launches
from rnnc.backends.cuda.runtime import CudaModule
from rnnc.cli import main

import cuda_cases as cases
from conftest import EXAMPLES, compile_sized, example

GOLDEN = Path(__file__).parent / "golden" / "lstm_D3_H5_auto.cu"
ARCHS = ("sm_80", "sm_90")
needs_nvcc = pytest.mark.skipif(not build.shutil.which("nvcc") and not Path("/usr/local/cuda/bin/nvcc").exists(),
                                reason="needs nvcc (the CUDA toolkit)")


BENCHMARK_DIMS = {"D": 512, "H": 512, "E": 256, "S": 32, "P": 256}  # benchmarks/gpu.py's sizes


MODES = cases.PRECISIONS_RUN + cases.DTYPES_RUN  # fp32, tf32 (float32 arrays), bfloat16, float16


def generate_in(program, mode: str):
    """The source of `program` in a mode: a precision of float32 arrays, or a 16-bit dtype."""
    return generate(program, None, mode) if mode in cases.DTYPES_RUN else generate(program, mode)


def sources() -> dict:
    """Generated source of every example at the tests' sizes, under every policy
    in fp32 and under `all` (the most products) in the other modes, where only
    the product kernels and element types differ and the policy changes how
    many there are, not their kind; and under `auto` in every mode at the
    benchmark's sizes (identical ones once): source -> (label, mode)."""
    out = {}
    for path in EXAMPLES:
        for mode in MODES:
            for policy in cases.POLICIES if mode == "fp32" else ("all",):
                out.setdefault(generate_in(cases.compile_example(path, policy), mode).source,
                               (f"{path.stem}/{policy}/{mode}", mode))
            big = compile_sized(path, BENCHMARK_DIMS)
            out.setdefault(generate_in(big, mode).source, (f"{path.stem}/benchmark/{mode}", mode))
    return out


@pytest.fixture(scope="module")
def cubins(tmp_path_factory):
    """Every source of `sources()` built for sm_80 and sm_90: [(label, mode, arch, Cubin, source)]."""
    cache = tmp_path_factory.mktemp("cubins")
    jobs = [(src, label, mode, arch) for src, (label, mode) in sources().items() for arch in ARCHS]

    def compile_one(job):
        src, label, mode, arch = job
        return label, mode, arch, build.compile_cubin(src, arch, cache=cache), src
    with ThreadPoolExecutor(2) as pool:  # nvcc is single-threaded; the test machines have 2 cores
        return list(pool.map(compile_one, jobs))


@needs_nvcc
def test_every_example_compiles_for_sm80_and_sm90_without_spills_or_warnings(cubins):
    assert len(cubins) >= 2 * len(MODES) * 2 * len(EXAMPLES)  # archs, modes, sizes
    for label, _, arch, cubin, _ in cubins:
        assert cubin.path.read_bytes()[:4] == b"\x7fELF", (label, arch)
        assert "Compiling entry function" in cubin.log  # ptxas -v really reported
        assert cubin.spills() == 0, f"{label} {arch}: {re.findall(r'.*spill.*', cubin.log)}"
        assert not cubin.warned, f"{label} {arch}: {cubin.warned}"


@lru_cache(maxsize=None)
def cuobjdump() -> list | None:
    """The command that prints a cubin's SASS: cuobjdump from the CUDA toolkit, or
    from the nvidia-cuda-cuobjdump wheel (the test extra) with nvdisasm from
    nvidia-cuda-nvdisasm beside it; None without either."""
    found = shutil.which("cuobjdump") or next(
        (str(p) for p in [Path("/usr/local/cuda/bin/cuobjdump")] if p.exists()), None)
    if not found:
        try:
            import nvidia  # the namespace package of NVIDIA's wheels
        except ImportError:
            return None
        found = next((str(p) for root in nvidia.__path__ for p in sorted(Path(root).glob("*/bin/cuobjdump"))
                      if (p.parent / "nvdisasm").exists()), None)
    return [found, "-sass"] if found else None


def sass_by_kernel(cubin_path) -> dict:
    """Each kernel's SASS text in a cubin, by name."""
    tool = cuobjdump()
    env = dict(os.environ, PATH=f"{Path(tool[0]).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    text = subprocess.run(tool + [str(cubin_path)], capture_output=True, text=True, check=True, env=env).stdout
    parts = re.split(r"\n\s*Function : (\w+)\n", text)
    return dict(zip(parts[1::2], parts[2::2]))


def single_row_column_or_summand(source: str, body: str) -> bool:
    """A product's body whose M, N or K is 1 (the body says in its first line)."""
    text = source.split(f" {body}(", 1)[1]
    sizes = dict(re.findall(r"\b([MNK]) = ([^,;]+)", text.split(";", 1)[0]))
    return "1" in (sizes["M"], sizes["N"], sizes["K"])


KERNEL = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\([^)]*\) )?(\w+)\(')


def bodies_by_kernel(source: str) -> dict:
    """The kernels of a source, each with the bodies (device functions) it runs."""
    return {head.group(1): re.findall(r"\b(\w+_body)\(", source[head.end():source.index("\n}", head.end())])
            for head in KERNEL.finditer(source)}


@needs_nvcc
@pytest.mark.skipif(cuobjdump() is None, reason="needs cuobjdump (pip install nvidia-cuda-cuobjdump "
                                                "nvidia-cuda-nvdisasm, or the CUDA toolkit's)")
def test_tf32_and_16_bit_products_run_on_tensor_cores_and_fp32_products_do_not(cubins):
    checked = set()
    for label, mode, arch, cubin, source in cubins:
        if "/benchmark/" not in label:
            continue
        sass = sass_by_kernel(cubin.path)
        bodies = bodies_by_kernel(source)
        assert set(sass) == set(bodies)
        products = {k: [b for b in called if b.endswith("_dot_body")] for k, called in bodies.items()}
        products = {k: dots for k, dots in products.items() if dots}
        assert products
        for kernel, dots in products.items():  # a launch of several kernels: HMMA where any product has it
            expected = mode != "fp32" and not all(single_row_column_or_summand(source, b) for b in dots)
            assert ("HMMA" in sass[kernel]) == expected, f"{label} {arch} {kernel}"
        if label.split("/")[0] in ("lstm", "gru") and mode != "fp32":  # all their products are big
            assert all("HMMA" in sass[k] for k in products), (label, arch)
        checked.add((label, arch))
    assert len(checked) == len(EXAMPLES) * len(MODES) * len(ARCHS)


# the GPUs each architecture's cubin runs on (occupancy.GPUS)
GPUS_OF = {"sm_80": ("A100",), "sm_90": ("H100", "H200")}


@needs_nvcc
def test_persistent_grids_fit_on_the_gpu_at_once(cubins):
    """Every example's persistent kernels at the benchmark's sizes, on the
    A100 (sm_80), H100 and H200 (sm_90), from ptxas's registers and shared
    memory: at least a block per multiprocessor fits, and the grid the
    runtime launches at B=64 and B=4 (`executor.run_persistent`) is at most
    what the GPU holds at once, so no block waits at a grid barrier for one
    that cannot start."""
    checked = 0
    for label, mode, arch, cubin, _ in cubins:
        stem, size, _ = label.split("/")
        if size != "benchmark":
            continue
        launches = generate_in(compile_sized(example(stem), BENCHMARK_DIMS), mode).launches
        used = build.kernel_resources(cubin.log)
        for kind, persistent in launches.persistent.items():
            registers, shared = used[persistent.kernel]
            shared += persistent.shared  # its static shared memory (none) and what it takes at launch
            for gpu in GPUS_OF[arch]:
                limits = occupancy.GPUS[gpu]
                capacity = occupancy.co_resident(limits, persistent.block, registers, shared)
                assert capacity >= limits.sms, (label, arch, gpu, kind, registers, shared)
                for batch in (64, 4):
                    needed = max(work_blocks(launch, batch) for launch in getattr(launches, kind))
                    assert 1 <= occupancy.persistent_grid(capacity, needed) <= capacity
                    checked += 1
    assert checked >= len(EXAMPLES) * len(MODES) * 3 * 2  # examples, modes, GPUs, batches, a kind at least


def test_launch_lists_that_cannot_be_one_kernel_say_why():
    """A persistent kernel's blocks run every kernel of the list: kernels on
    blocks of other sizes cannot share them, nor is there a kernel to run
    without launches; both run launch by launch, and the schedule says why."""
    gen = Generator("fp32")
    lists = {"sizes": [Launch(f"k{block}", (Extent(1),) * 3, block, "B", ()) for block in (128, 256)], "none": []}
    gen.launched = {launch.kernel: Launched((), 0) for launch in lists["sizes"]}
    made = {name: gen.persistent(f"p_{name}", launches) for name, launches in lists.items()}
    assert made["sizes"] == (None, "its kernels take blocks of 128 and 256 threads")
    assert made["none"] == (None, "no launches a step")
    assert gen.sources == []
    launches = Launches(step=lists["sizes"], why_per_step={"step": made["sizes"][1], "backward_step": "no launches a step"})
    assert "forward, replay: per step: 2 launches a step (its kernels take blocks of 128 and 256 threads)" \
        in launches.forms()


def test_kernel_resources_are_parsed():
    log = ("ptxas info    : Compiling entry function 'a' for 'sm_90'\n"
           "ptxas info    : Function properties for a\n"
           "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
           "ptxas info    : Used 78 registers, used 1 barriers, 19472 bytes smem\n"
           "ptxas info    : Compiling entry function 'b' for 'sm_80'\n"
           "ptxas info    : Used 12 registers, 380 bytes cmem[0]\n")
    assert build.kernel_resources(log) == {"a": (78, 19472), "b": (12, 0)}


def test_bare_nvcc_compiles_the_source(tmp_path):
    """kernels.cu needs no include path, macro or flag: `nvcc -cubin -arch=sm_80 kernels.cu`."""
    src = tmp_path / "kernels.cu"
    src.write_text(generate(cases.compile_example(example("attention_lstm"), "auto")).source)
    done = subprocess.run([build.nvcc_path(), "-cubin", "-arch=sm_80", "kernels.cu"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "kernels.cubin").stat().st_size > 0


def test_lstm_source_matches_golden_file():
    source = generate(rnnc.compile(example("lstm"), dims={"D": 3, "H": 5},
                                   recompute="auto")).source
    if os.environ.get("RNNC_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(source)
    assert GOLDEN.exists(), f"{GOLDEN} is missing: run with RNNC_UPDATE_GOLDEN=1 to write it"
    assert source == GOLDEN.read_text(), "generated source changed: review, then RNNC_UPDATE_GOLDEN=1"


def test_generated_source_is_deterministic():
    program = cases.compile_example(example("recurrent_attention_lstm"), "all")
    assert generate(program).source == generate(program).source


def test_mangled_names_are_distinct_identifiers_never_keywords():
    names = ["float", "threadIdx", "a_b", "a:b", "a_3ab", "%1", "%step:1", "d:h", "v_float", "x", "é"]
    mangled = [mangle(n) for n in names]
    assert len(set(mangled)) == len(names)
    for m in mangled:
        assert re.fullmatch(r"v_[A-Za-z0-9_]+", m) and not keyword.iskeyword(m)
    assert mangle("float") != "float" and mangle("threadIdx") != "threadIdx"


def test_user_names_reach_c_only_mangled():
    source = generate(rnnc.compile(example("attention_lstm"),
                                   dims=cases.dims_of(example("attention_lstm")))).source
    code = "\n".join(line.split("//")[0] for line in source.splitlines())
    for name in ("enc", "keys", "alpha", "ctx", "h_new"):
        assert not re.search(rf"(?<![A-Za-z0-9_]){name}(?![A-Za-z0-9_])", code), name


def test_launches_survive_json():
    generated = generate(cases.compile_example(example("attention_lstm"), "none"))
    again = Launches.from_json(generated.launches.to_json())
    assert again == generated.launches
    assert set(again.kernels()) == set(re.findall(r'extern "C" __global__ void (?:__launch_bounds__\([^)]*\) )?(\w+)',
                                                   generated.source))


def test_float64_is_refused_on_cuda():
    program = rnnc.compile(example("lstm"), dims={"D": 3, "H": 5})
    with pytest.raises(ValueError, match="'float32', 'bfloat16', 'float16', got 'float64'.*numpy"):
        program.load("cuda", dtype="float64")
    with pytest.raises(ValueError, match="'float32', 'bfloat16', 'float16', got 'float64'"):
        generate(program, None, "float64")


def test_missing_nvcc_says_what_to_install(monkeypatch):
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    monkeypatch.setenv("CUDA_HOME", "/nonexistent")
    with pytest.raises(build.BuildError, match="install the CUDA toolkit"):
        build.compile_cubin("extern \"C\" __global__ void k() {}", "sm_80")


def test_missing_pycuda_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycuda", None)  # import pycuda fails as if not installed
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    program = rnnc.compile(example("lstm"), dims={"D": 3, "H": 5})
    with pytest.raises(CudaUnavailable, match=r"pip install 'rnnc\[cuda\]'"):
        program.load("cuda")


def test_bad_arch_is_a_value_error():
    with pytest.raises(ValueError, match="sm_80"):
        build.check_arch("80")


def test_spill_report_is_parsed():
    log = ("ptxas info    : Function properties for k\n"
           "    8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
           "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n")
    assert build.spill_bytes(log) == 12


def test_emit_stage_cuda_prints_the_source(capsys):
    from rnnc.cli import main
    assert main(["emit", str(example("indrnn")), "--stage", "cuda", "-D", "D=2", "-D", "H=3"]) == 0
    out = capsys.readouterr().out
    assert out.count('extern "C" __global__') >= 4 and "rnnc_step_" in out


# --- sizes past 32 bits and nvcc's warnings ------------------------------------------------
@needs_nvcc
def test_nvcc_warnings_reach_the_user_built_and_cached(tmp_path):
    """What nvcc warns is an NvccWarning on every build, the cached ones too;
    ptxas's register report is not a warning."""
    source = ('extern "C" __global__ void k(float* x) {\n'
              '    const int n = 3000000000;\n    x[threadIdx.x % n] = 1.0f;\n}\n')
    for build_or_cache in range(2):
        with pytest.warns(build.NvccWarning) as caught:
            cubin = build.compile_cubin(source, "sm_80", cache=tmp_path)
        message = str(caught[0].message)
        assert "kernels.cu(2): warning" in message and "change of sign" in message
        assert "ptxas info" not in message and str(tmp_path) not in message
    assert cubin.log == ""  # the second came from the cache


def test_per_example_sizes_past_the_kernels_indices_are_refused_when_generated(capsys):
    """32-bit int indices reach 2^30 elements per buffer (a grid-stride loop
    steps past the end by up to its length); a larger per-example size is a
    ValueError naming it, from the API, `rnnc emit --stage cuda` and `rnnc compile`."""
    program = rnnc.compile(example("indrnn"), dims={"D": 2, "H": 2**29 + 1}, recompute="none")
    with pytest.raises(ValueError, match=r"'param:W' has 1,073,741,826 elements.*2\^30"):
        generate(program)
    assert generate(rnnc.compile(example("indrnn"), dims={"D": 2, "H": 2**29}))  # exactly 2^30: taken
    for argv in (["emit", "--stage", "cuda"], ["compile", "-o", "never-written"]):
        assert main([*argv[:1], str(example("indrnn")), *argv[1:], "-D", "D=4", "-D", "H=3000000000"]) == 1
        err = capsys.readouterr().err
        assert "3,000,000,000 elements per example" in err and "32-bit" in err, err
    assert not Path("never-written").exists()


class NoDevice:
    """A device that must not be used: the size check comes before any allocation."""

    def active(self):
        return nullcontext()

    def __getattr__(self, name):
        raise AssertionError(f"device.{name} called")


def test_rows_times_sizes_past_the_kernels_indices_are_refused_at_the_call():
    """T*B rows of 2^20 units: one launch over all rows of the hoisted product
    would index past 2^30 elements; the call says so, naming T, B and the
    sizes, before it allocates anything."""
    program = rnnc.compile(example("indrnn"), dims={"D": 1, "H": 2**20}, recompute="none")
    module = CudaModule(program, generate(program).launches, NoDevice())
    params = {k: np.zeros(v.shape, np.float32) for k, v in module.init_params().items()}
    inputs = {"x": np.zeros((1025, 1, 1), np.float32)}
    with pytest.raises(ValueError, match=r"T=1025, B=1: .*1,025 rows of 1,048,576 elements.*2\^30"):
        module.forward(inputs=inputs, params=params)
    with pytest.raises(AssertionError, match="device"):  # 1,024 rows, exactly 2^30: past the check
        module.forward(inputs={"x": inputs["x"][:1024]}, params=params)
