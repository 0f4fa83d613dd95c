"""Every GPU code path compiled as the GPU will compile it, on a machine without a GPU.

The Triton interpreter and the CUDA emulator run the kernels' arithmetic on the CPU, but both
take code a GPU compiler refuses (seen here: an annotated constexpr global, and a binding helper
that called itself, which only the real ``#else`` branch contained). So:

* every Triton launch configuration of the triton backend is compiled for sm_90 and sm_80
  (`sba_kernels.triton_aot`), failing on a compile error, a spill, or shared memory above the
  architecture's limit; the kernels are discovered, not listed;
* every ``csrc/*.cu`` goes through nvcc for sm_80 and sm_90 with ``-Xptxas -v``, failing on a
  warning or a spill;
* the real (non-emulated) ``csrc/bindings.cpp`` is compiled against torch's headers with
  ``-Wall -Werror``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from sba_kernels import triton_aot
from sba_kernels import triton_kernels as kern

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"


# ----------------------------------------------------------------------------- Triton
# About 1138 compiles (569 configurations, each for sm_90 and sm_80), near 0.9 s of one core
# each: some 17 core-minutes, started in the background when the session's collection ends
# (conftest.py), waited for by the first test that asks.
COMPILE_ALL = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def triton_reports(aot_compile_run):
    """One compile per distinct configuration and architecture, shared by the checks below."""
    return aot_compile_run.reports()


@COMPILE_ALL
def test_every_triton_kernel_is_launched_and_compiled(triton_reports):
    launched = {launch.kernel for launch in triton_aot.recorded_launches()}
    assert launched == set(triton_aot.kernels()), "a kernel of triton_kernels that the backend never launches"
    for arch in (90, 80):
        assert {r.kernel for r in triton_reports if r.arch == arch} == launched


@COMPILE_ALL
def test_triton_kernels_compile_without_spills_within_shared_memory(triton_reports):
    failed = [f"sm_{r.arch} {r.config}: {r.error}" for r in triton_reports if not r.ok]
    assert not failed, "\n".join(failed[:5])
    spilled = [f"sm_{r.arch} {r.config}: {r.spill_stores} B spill stores, {r.local_bytes} B local"
               for r in triton_reports if r.spills]
    assert not spilled, f"{len(spilled)} configurations spill:\n" + "\n".join(spilled[:10])
    over = [f"sm_{r.arch} {r.config}: {r.shared_bytes} B" for r in triton_reports if r.shared_over_limit]
    assert not over, "shared memory over the limit:\n" + "\n".join(over)
    assert all(r.programs_per_sm >= 1 and 0 < r.registers <= 255 for r in triton_reports)


@COMPILE_ALL
def test_the_configurations_cover_what_the_issue_asks(triton_reports):
    configs = " ".join(r.config for r in triton_reports if r.kernel == "attention_fwd" and r.arch == 90)
    for d in triton_aot.HEAD_DIMS:
        assert f"HEAD_DIM={d}," in configs
    for block in (16, 32, 64):
        assert f"BLOCK_M={block}," in configs
    for flag in ("HAS_BIAS=True", "HAS_BIAS=False", "PRECISION=tf32x3", "PRECISION=tf32,"):   # pooling: a runtime flag
        assert flag in configs


@COMPILE_ALL
def test_one_tile_kernels_fit_three_programs_per_sm_at_head_dim_64(triton_reports):
    """Issue 13's register target on sm_90 (fp16 and bf16, d = 64, 64-row tiles): the one-tile
    forward, with or without a bias and with or without the loop over a bias tile, and the fused
    backward, without a bias, with one, and summing its gradient (shared or per head), and
    taking the pooled forward's gradient where it does (no bias, or a frozen one), take at
    most 168 registers, three programs of 128 threads per SM, no spill. The backward summing a
    bias gradient fits from Triton 3.9 on; 3.6 compiles the same source to 196-219 registers
    (`triton_kernels._pair_grads`), so with an older Triton its rows are not held to it."""
    rows = [r for r in triton_reports if r.arch == 90 and "HEAD_DIM=64," in r.config and "BLOCK=64," in r.config
            and r.kernel in ("attention_fwd_one_tile", "attention_bwd_one_tile")]
    kinds = {(r.kernel, "HAS_BIAS=True" in r.config, "BIAS_LOOP=True" in r.config or "BIAS_GRAD=True" in r.config,
              "SHARED_BIAS=True" in r.config, "POOLED=True" in r.config, r.config.split("[dtype=")[1].split(",")[0])
             for r in rows}
    # forward: no bias, a bias per pair (one kernel whether it is shared or per head), and the
    # bias loop (shared, per head); backward: no bias, a frozen bias (one kernel), its gradient
    # (shared, per head), and pooled: no bias, bias frozen; each in fp16 and bf16
    assert len(kinds) == len(rows) == 20, sorted(kinds)
    recent = tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 9)
    held = [r for r in rows if recent or not r.meta.get("BIAS_GRAD")]
    over = [f"{r.config}: {r.registers} registers, {r.threads} threads, {r.spill_stores} B spilled" for r in held
            if not (r.registers <= 168 and r.threads == 128 and r.programs_per_sm >= 3 and not r.spills)]
    assert not over, "\n".join(over)


@COMPILE_ALL
def test_no_ptxas_performance_warning(triton_reports):
    """ptxas reports wgmma serialisation and its kin as "Potential Performance Loss" lines
    (info, not warnings): none may appear in any configuration."""
    warned = [f"sm_{r.arch} {r.config}: {r.ptxas_warnings}" for r in triton_reports if r.ptxas_warnings]
    assert not warned, "\n".join(warned[:5])


@COMPILE_ALL
def test_biased_bf16_head_dim_64_kernels_compile_for_sm90_and_sm80(triton_reports):
    """The case that failed on a GPU before: any kernel reading the bias, bf16, d = 64."""
    biased = [r for r in triton_reports if "HEAD_DIM=64," in r.config and
              ("HAS_BIAS=True" in r.config or r.kernel == "attention_bwd_dbias")]
    bf16 = [r for r in biased if "dtype=bfloat16," in r.config]
    assert {(r.kernel, r.arch) for r in bf16} >= {(k, a) for k in ("attention_fwd", "attention_bwd_dq",
                                                                   "attention_bwd_dkdv", "attention_bwd_dbias")
                                                  for a in (90, 80)}
    assert all(r.ok and not r.spills for r in bf16)


def test_annotated_constexpr_global_is_refused_by_the_gpu_compiler(tmp_path):
    """The rule the interpreter does not enforce: a kernel reading ``X: tl.constexpr = ...``
    fails to compile for sm_90 (so the check above would catch one), and ``tl.constexpr(...)``
    compiles."""
    source = tmp_path / "annotated.py"
    source.write_text(
        "import triton, triton.language as tl\n"
        "GOOD = tl.constexpr(2.0)\n"
        "BAD: tl.constexpr = 2.0\n"
        "@triton.jit\n"
        "def good(X):\n"
        "    tl.store(X, tl.load(X) * GOOD)\n"
        "@triton.jit\n"
        "def bad(X):\n"
        "    tl.store(X, tl.load(X) * BAD)\n")
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); import annotated, triton\n"
        "from triton.backends.compiler import GPUTarget\nfrom triton.compiler import ASTSource\n"
        "def build(fn):\n"
        "    try:\n"
        "        triton.compile(ASTSource(fn, {'X': '*fp32'}, {}), target=GPUTarget('cuda', 90, 32)); return 'ok'\n"
        "    except Exception as e:\n"
        "        return type(e).__name__\n"
        "print(build(annotated.good), build(annotated.bad))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    done = subprocess.run([os.sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.stdout.split() == ["ok", "CompilationError"], done.stderr[-2000:]


@triton.jit
def _bias_offsets_probe(Out, start, s_bi, BLOCK: tl.constexpr):
    slots = start + tl.arange(0, BLOCK)
    offsets = kern._bias_tile_offsets(start.to(tl.int64) * 0, slots, slots, s_bi)
    tl.store(Out + tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :], offsets)


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the probe in the interpreter on CPU tensors")
def test_bias_offsets_do_not_overflow_int32():
    """Slot 46,341 of a subgraph with a row stride of 46,357 is at 2.148e9 > 2^31: the bias of an
    inter attention over P > 46,340 tokens. int32 arithmetic would wrap to a negative offset."""
    start, stride, block = 46_341, 46_357, 16
    out = torch.zeros(block, block, dtype=torch.int64)
    _bias_offsets_probe[(1,)](out, start, stride, BLOCK=block)
    slots = torch.arange(start, start + block, dtype=torch.int64)
    expected = slots[:, None] * stride + slots[None, :]
    assert expected.min() > 2**31
    assert torch.equal(out, expected)


# ----------------------------------------------------------------------------- CUDA C++
def _nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH (CI has it)")
    return nvcc


def _cuda_include() -> Path:
    """The CUDA toolkit's include folder (cuda_runtime.h), found from CUDA_HOME or nvcc."""
    candidates = [Path(os.environ[v]) / "include" for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    done = subprocess.run([_nvcc(), "--dryrun", "-x", "cu", "-c", os.devnull], capture_output=True, text=True)
    candidates += [Path(p) for p in re.findall(r'-I"?([^"\s]+)"?', done.stderr)]
    for path in candidates:
        if (path / "cuda_runtime.h").is_file():
            return path
    pytest.skip("no CUDA toolkit headers found (CI has them)")


@pytest.mark.parametrize("source", sorted(p.name for p in CSRC.glob("*.cu")))
def test_cu_sources_compile_for_sm80_and_sm90_without_spills(source, tmp_path):
    cmd = [_nvcc(), "-std=c++20", "-c", "-O3", "-Werror", "all-warnings", "-Xptxas", "-v",
           "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
           str(CSRC / source), "-o", str(tmp_path / "out.o")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", done.stderr)
    assert spills, "ptxas -v printed no spill line: was anything compiled?"
    assert all(s == ("0", "0") for s in spills), done.stderr[-3000:]


def test_real_cuda_binding_compiles_with_all_warnings_as_errors(tmp_path):
    """``csrc/bindings.cpp`` without SBA_CPU_EMULATION: the branch a GPU build compiles.
    The CPU torch wheel lacks one generated header, so a stub stands in for it."""
    from torch.utils import cpp_extension

    stub = tmp_path / "stub" / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#pragma once\n")
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    includes = [tmp_path / "stub", *cpp_extension.include_paths(), _cuda_include(), sysconfig.get_paths()["include"],
                CSRC]
    cmd = [compiler, "-std=c++20", "-c", "-Wall", "-Werror", "-Werror=infinite-recursion",
           "-DTORCH_EXTENSION_NAME=sba_cuda_ext", *(f"-I{p}" for p in includes),
           str(CSRC / "bindings.cpp"), "-o", str(tmp_path / "bindings.o")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
