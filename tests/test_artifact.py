"""Artifacts: `rnnc compile -o DIR` and `rnnc.load(DIR)`.

The directory round-trips (loaded with the NumPy backend it computes exactly
what the program compiled directly does); a damaged or missing file is an
error naming it (exit 1 from the CLI); writes are atomic; two processes
building the same cell into one cache both succeed with one intact cubin.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import rnnc
from rnnc.artifact import ArtifactError, read, write
from rnnc.backends.cuda import build
from rnnc.cli import main

import cuda_cases as cases
from conftest import example

LSTM = example("lstm")
HAS_NVCC = bool(build.shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").exists())
needs_nvcc = pytest.mark.skipif(not HAS_NVCC, reason="needs nvcc (the CUDA toolkit)")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RNNC_CACHE_DIR", str(tmp_path / "cache"))


def compiled(tmp_path, path=LSTM, policy="none", arch="sm_80") -> Path:
    out = tmp_path / f"{path.stem}_mod"
    assert main(["compile", str(path), *sum((["-D", f"{k}={v}"] for k, v in cases.dims_of(path).items()), []),
                 "--recompute", policy, "--arch", arch, "-o", str(out)]) == 0
    return out


@pytest.mark.parametrize("path", [LSTM, example("attention_lstm")], ids=lambda p: p.stem)
def test_round_trip_with_the_numpy_backend(tmp_path, path):
    out = compiled(tmp_path, path, "none")
    names = {p.name for p in out.iterdir()}
    assert {"module.json", "kernels.cu", "cell.ir"} <= names
    assert ("kernels.sm_80.cubin" in names) == HAS_NVCC
    program = rnnc.compile(path, dims=cases.dims_of(path), recompute="none")
    args = {k: {n: a.astype(np.float64) for n, a in v.items()} for k, v in cases.arguments(program).items()}
    direct = cases.run(program.load("numpy"), args, cases.LENGTHS)
    loaded = cases.run(rnnc.load(out, backend="numpy"), args, cases.LENGTHS)
    assert direct.keys() == loaded.keys()
    for name in direct:
        np.testing.assert_array_equal(loaded[name], direct[name], err_msg=name)


def test_memory_budget_survives_the_round_trip(tmp_path):
    out = tmp_path / "budget_mod"
    assert main(["compile", str(LSTM), "-D", "D=8", "-D", "H=16", "--memory-budget", "40KiB",
                 "--seq-len", "50", "--batch", "4", "-o", str(out)]) == 0
    direct = rnnc.compile(LSTM, dims={"D": 8, "H": 16}, memory_budget=40 << 10, seq_len=50, batch=4)
    loaded = rnnc.load(out)
    assert len(direct.plan.segments) > 1
    assert loaded.program.plan.segments == direct.plan.segments


def test_module_json_describes_the_module(tmp_path):
    out = compiled(tmp_path, policy="all")
    module = json.loads((out / "module.json").read_text())
    assert module["format"] == 1 and module["rnnc_version"] == rnnc.__version__
    assert module["cell"] == "lstm" and module["dims"] == {"D": 3, "H": 5}
    assert module["plan"]["policy"] == "all" and module["recompute"] == "all"
    assert module["kernels"] and all(k in (out / "kernels.cu").read_text() for k in module["kernels"])
    launches = module["launches"]["step"]
    assert launches and all(len(x["grid"]) == 3 and x["block"] == 256 for x in launches)
    assert any(b["name"] == "state:h" for b in module["launches"]["buffers"])
    assert "plan (recompute=all" in (out / "cell.ir").read_text()


def test_truncated_module_json_names_the_file(tmp_path, capsys):
    out = compiled(tmp_path)
    text = (out / "module.json").read_text()
    (out / "module.json").write_text(text[: len(text) // 2])
    with pytest.raises(ArtifactError, match=r"module\.json: damaged"):
        rnnc.load(out)
    assert main(["run", str(out), "--seq-len", "2", "--batch", "2"]) == 1
    assert "module.json" in capsys.readouterr().err


@needs_nvcc
def test_missing_cubin_names_the_file(tmp_path, capsys):
    out = compiled(tmp_path)
    (out / "kernels.sm_80.cubin").unlink()
    with pytest.raises(ArtifactError, match=r"kernels\.sm_80\.cubin: missing"):
        rnnc.load(out, backend="numpy")
    assert main(["run", str(out), "--backend", "cuda"]) == 1
    assert "kernels.sm_80.cubin" in capsys.readouterr().err


def test_changed_kernels_are_detected_by_hash(tmp_path):
    out = compiled(tmp_path)
    with open(out / "kernels.cu", "a") as f:
        f.write("// edited\n")
    with pytest.raises(ArtifactError, match=r"kernels\.cu: damaged"):
        read(out)


def test_other_format_versions_are_refused(tmp_path):
    out = compiled(tmp_path)
    module = json.loads((out / "module.json").read_text())
    module["format"] = 99
    (out / "module.json").write_text(json.dumps(module))
    with pytest.raises(ArtifactError, match="format version 99"):
        read(out)


def test_missing_module_json_and_non_directories(tmp_path):
    with pytest.raises(ArtifactError, match="not a directory"):
        rnnc.load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match=r"module\.json: missing"):
        rnnc.load(tmp_path / "empty")


def test_writes_replace_an_artifact_and_leave_no_temporaries(tmp_path):
    out = compiled(tmp_path, policy="none")
    program = rnnc.compile(LSTM, dims={"D": 3, "H": 5}, recompute="all")
    write(program, out, build=False)
    assert json.loads((out / "module.json").read_text())["plan"]["policy"] == "all"
    assert not (out / "kernels.sm_80.cubin").exists()  # nothing left from the old artifact
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    read(out)


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() if p.is_file() else None for p in sorted(d.rglob("*"))}


def a_users_project(d: Path) -> dict:
    """A directory that has a module.json of its own, and more."""
    (d / "src").mkdir(parents=True)
    (d / "module.json").write_text('{"name": "my-js-module"}')
    (d / "notes.txt").write_text("keep me")
    (d / "src" / "main.c").write_text("int main(void) { return 0; }\n")
    return snapshot(d)


def damaged_artifact(d: Path) -> dict:
    write(rnnc.compile(LSTM, dims={"D": 3, "H": 5}), d, build=False)
    (d / "cell.ir").write_text("edited by hand\n")
    return snapshot(d)


def artifact_with_notes(d: Path) -> dict:
    write(rnnc.compile(LSTM, dims={"D": 3, "H": 5}), d, build=False)
    (d / "NOTES").write_text("what I tried")
    return snapshot(d)


@pytest.mark.parametrize("make,reason", [
    (a_users_project, r"not a complete rnnc artifact \(module\.json: format version None"),
    (damaged_artifact, r"not a complete rnnc artifact \(cell\.ir: damaged"),
    (artifact_with_notes, r"also holds NOTES, which rnnc did not write"),
], ids=["project", "damaged", "notes"])
def test_compile_never_replaces_what_is_not_a_complete_artifact(tmp_path, capsys, make, reason):
    before = make(tmp_path / "mine")
    assert main(["compile", str(LSTM), "-D", "D=3", "-D", "H=5", "-o", str(tmp_path / "mine")]) == 1
    assert re.search(reason + r".*refusing to replace it", capsys.readouterr().err)
    assert snapshot(tmp_path / "mine") == before
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]  # no temporaries either


@pytest.mark.parametrize("target,message", [
    (".", r"-o \.: name a directory of its own"),
    ("..", r"-o \.\.: name a directory of its own"),
    ("a_file", r"a_file: exists and is a file, not an artifact directory"),
    ("a_link", r"a_link: exists and is a symbolic link"),
])
def test_compile_into_the_current_directory_a_file_or_a_link_is_refused(tmp_path, monkeypatch, capsys,
                                                                        target, message):
    (tmp_path / "a_file").write_text("mine")
    write(rnnc.compile(LSTM, dims={"D": 3, "H": 5}), tmp_path / "mod", build=False)
    (tmp_path / "a_link").symlink_to(tmp_path / "mod")
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    assert main(["compile", str(LSTM), "-D", "D=3", "-D", "H=5", "-o", target]) == 1
    assert re.search(message, capsys.readouterr().err)
    assert snapshot(tmp_path) == before


def test_an_empty_directory_becomes_the_artifact(tmp_path):
    (tmp_path / "empty").mkdir()
    write(rnnc.compile(LSTM, dims={"D": 3, "H": 5}), tmp_path / "empty", build=False)
    assert read(tmp_path / "empty").module["cell"] == "lstm"


KILLED_BETWEEN_RENAMES = """
import os, sys, rnnc
from rnnc.artifact import write
real_replace = os.replace

def replace(src, dst):  # the first rename moves the old artifact aside; then the process dies
    real_replace(src, dst)
    os._exit(9)
os.replace = replace
write(rnnc.compile(sys.argv[1], dims={"D": 3, "H": 5}, recompute="all"), sys.argv[2], build=False)
"""


def stranded(tmp_path) -> list:
    return sorted(p.name.split("-")[0] for p in tmp_path.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("then", ["load", "compile"])
def test_a_writer_killed_between_its_renames_is_recovered(tmp_path, then):
    out = tmp_path / "mod"
    write(rnnc.compile(LSTM, dims={"D": 3, "H": 5}, recompute="none"), out, build=False)
    done = subprocess.run([sys.executable, "-c", KILLED_BETWEEN_RENAMES, str(LSTM), str(out)])
    assert done.returncode == 9
    assert not out.exists() and stranded(tmp_path) == [".mod.old", ".mod.tmp"]
    if then == "load":  # the old artifact is back, whole
        assert rnnc.load(out).program.plan.policy == "none"
    else:
        write(rnnc.compile(LSTM, dims={"D": 3, "H": 5}, recompute="auto"), out, build=False)
        assert read(out).module["plan"]["policy"] == "auto"
    assert stranded(tmp_path) == []


CONCURRENT_WRITES = """
import sys, rnnc
from rnnc.artifact import write
program = rnnc.compile(sys.argv[1], dims={"D": 3, "H": 5}, recompute=sys.argv[3])
for _ in range(6):
    write(program, sys.argv[2], build=False)
"""


def test_concurrent_writers_and_a_loader_all_succeed(tmp_path):
    out = tmp_path / "mod"
    write(rnnc.compile(LSTM, dims={"D": 3, "H": 5}), out, build=False)
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_WRITES, str(LSTM), str(out), policy],
                              stderr=subprocess.PIPE, text=True) for policy in ("none", "all")]
    policies = set()
    while any(p.poll() is None for p in procs):
        policies.add(rnnc.load(out).program.plan.policy)  # never a missing or half-written artifact
    assert [p.wait() for p in procs] == [0, 0], [p.stderr.read() for p in procs]
    assert policies and policies <= {"auto", "none", "all"}
    assert read(out).module["plan"]["policy"] in ("none", "all")
    assert stranded(tmp_path) == []


def test_a_writer_that_cannot_get_the_lock_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(rnnc.artifact, "LOCK_WAIT", 0.2)
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as another rnnc writing beside it would
        with pytest.raises(ArtifactError, match=r"mod: another rnnc process has held .* for 0 s.*try again"):
            write(rnnc.compile(LSTM, dims={"D": 3, "H": 5}), tmp_path / "mod", build=False)
    finally:
        os.close(fd)
    assert list(tmp_path.iterdir()) == []


def test_compile_without_nvcc_writes_an_artifact_without_cubin(tmp_path):
    env = {**os.environ, "PATH": os.path.dirname(sys.executable), "CUDA_HOME": str(tmp_path / "none")}
    out = tmp_path / "mod"
    done = subprocess.run([sys.executable, "-m", "rnnc.cli", "compile", str(LSTM), "-D", "D=3", "-D", "H=5",
                           "-o", str(out)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "nvcc not found" in done.stderr
    assert not list(out.glob("*.cubin"))
    assert rnnc.load(out).cell.name == "lstm"


CONCURRENT_BUILD = """
import sys
from rnnc.backends.cuda.build import compile_cubin
cubin = compile_cubin(open(sys.argv[1]).read(), "sm_80", cache=sys.argv[2])
print(cubin.path)
"""


@needs_nvcc
def test_two_processes_building_one_cell_into_one_cache(tmp_path):
    source = tmp_path / "kernels.cu"
    source.write_text(rnnc.driver.emit(rnnc.driver.read_source(LSTM), "cuda", dims={"D": 3, "H": 5}))
    cache = tmp_path / "shared-cache"
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_BUILD, str(source), str(cache)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    assert [r[2] for r in results] == [0, 0], [r[1] for r in results]
    paths = {r[0].strip() for r in results}
    assert len(paths) == 1
    cubins = list(cache.glob("*.cubin"))
    assert [str(c) for c in cubins] == list(paths)
    assert not [p for p in cache.iterdir() if p.name.startswith(".build-")]  # no temporaries left
    direct = build.compile_cubin(source.read_text(), "sm_80", cache=tmp_path / "other")
    assert cubins[0].read_bytes() == direct.path.read_bytes()  # intact: the bytes nvcc gives


TINY_KERNEL = 'extern "C" __global__ void tiny(float *x) { x[threadIdx.x] *= 2.0f; }\n'


@needs_nvcc
@pytest.mark.parametrize("damage", [b"", b"\x7fELF but cut short", None], ids=["empty", "cut", "deleted"])
def test_a_damaged_cache_entry_is_built_again_never_served(tmp_path, damage):
    cache = tmp_path / "cache"
    first = build.compile_cubin(TINY_KERNEL, "sm_80", cache=cache)
    assert first.data[:4] == b"\x7fELF" and first.path.read_bytes() == first.data
    if damage is None:
        first.path.unlink()
    else:
        first.path.write_bytes(damage)
    again = build.compile_cubin(TINY_KERNEL, "sm_80", cache=cache)
    assert again.log  # nvcc ran: ptxas reported
    assert again.data == first.data and again.path.read_bytes() == first.data
    assert [p.name for p in cache.glob("*.cubin")] == [again.path.name]
    assert build.compile_cubin(TINY_KERNEL, "sm_80", cache=cache).log == ""  # served, intact


@needs_nvcc
def test_an_artifact_never_gets_a_damaged_cached_cubin(tmp_path, capsys):
    out = compiled(tmp_path)
    cubin = (out / "kernels.sm_80.cubin").read_bytes()
    for entry in (tmp_path / "cache").glob("*.cubin"):
        entry.write_bytes(b"")
    again = compiled(tmp_path)  # the same cell: its cache entry, now empty
    assert (again / "kernels.sm_80.cubin").read_bytes() == cubin
    assert read(again).files["kernels.sm_80.cubin"] == cubin


@needs_nvcc
def test_an_unusable_cache_directory_is_a_warning(tmp_path, monkeypatch, capsys):
    a_file = tmp_path / "not_a_directory"
    a_file.write_text("")
    for cache in (a_file, a_file / "below"):
        monkeypatch.setenv("RNNC_CACHE_DIR", str(cache))
        with pytest.warns(build.CacheWarning, match=f"the cubin cache {cache} is unusable.*RNNC_CACHE_DIR"):
            cubin = build.compile_cubin(TINY_KERNEL, "sm_80")
        assert cubin.data[:4] == b"\x7fELF" and cubin.path.read_bytes() == cubin.data
        assert main(["compile", str(LSTM), "-D", "D=3", "-D", "H=5", "-o", str(tmp_path / "mod")]) == 0
        err = capsys.readouterr().err
        assert err.startswith("rnnc: warning: the cubin cache") and err.count("\n") == 1
        assert (tmp_path / "mod" / "kernels.sm_80.cubin").read_bytes()[:4] == b"\x7fELF"
    assert a_file.read_text() == ""


def test_emit_prints_exactly_the_kernels_compile_builds_under_a_memory_budget(tmp_path, capsys):
    """Both go through the driver's stage table with the same options: under a
    budget roomy enough for `none`, the plan stores everything, so the kernels
    differ from the default's, and emit shows the ones compile builds."""
    dims = {"D": 8, "H": 16}
    budget = rnnc.compile(LSTM, dims=dims, recompute="none").plan.peak_bytes(50, 4)
    options = ["-D", "D=8", "-D", "H=16", "--memory-budget", str(budget), "--seq-len", "50", "--batch", "4"]
    out = tmp_path / "mod"
    assert main(["compile", str(LSTM), *options, "--arch", "sm_80", "-o", str(out)]) == 0
    capsys.readouterr()

    def emitted(*extra) -> str:
        assert main(["emit", str(LSTM), "--stage", "cuda", *extra]) == 0
        return capsys.readouterr().out.removesuffix("\n")
    built = (out / "kernels.cu").read_text()
    assert emitted(*options) == built
    assert emitted("-D", "D=8", "-D", "H=16") != built  # the budget's plan is another plan
    program = rnnc.load(out).program
    assert program.plan.policy == "none" and program.plan.budget == budget
    assert (program.options.memory_budget, program.options.seq_len, program.options.batch,
            program.options.recompute) == (budget, 50, 4, "auto")


def test_a_program_records_the_options_it_was_compiled_with():
    program = rnnc.compile(LSTM, dims={"D": 3, "H": 5}, recompute=["c_new"], memory_budget="64KiB",
                           seq_len=30, batch=2, dtype="float64")
    assert program.options == rnnc.driver.Options(dims={"D": 3, "H": 5}, recompute=["c_new"],
                                                  memory_budget="64KiB", seq_len=30, batch=2, dtype="float64")
    again = rnnc.compile(LSTM, **program.options.as_dict())
    assert again.plan == program.plan
    assert program.build("cuda")["cuda"].source == again.build("cuda")["cuda"].source
