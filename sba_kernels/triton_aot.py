"""Compile every Triton launch of the ``"triton"`` backend for a GPU, ahead of time, on any machine.

The CPU interpreter (``TRITON_INTERPRET=1``) runs the kernels' arithmetic but none of the GPU
compiler's rules (seen here: an annotated global that compiles nowhere but interprets fine).
This module closes that gap without a GPU:

1. `recorded_launches` calls the backend's own launch functions over every input kind it
   accepts (dtype and fp32 dot precision, head dim, tile size, bias none / shared / per head,
   pooled or not, forward and backward, segment mean) with `triton_backend.LAUNCH_RECORDER`
   set, so nothing runs and every launch is captured as the backend makes it. A kernel added
   later is found the same way; `kernels()` lists the module's kernels so a test can tell when
   one is never launched.
2. `compile_launch` specialises the captured arguments as Triton's launcher would (pointer
   alignment, integer divisibility) for a ``GPUTarget``, compiles to a cubin, and reads what
   the compiler decided: registers per thread, spill bytes (from the ptxas log), stack, shared
   memory, threads per program, and how many programs fit on one SM from those numbers.
   These are compiler facts, not timings.
3. `compile_all` (or `CompileRun`, which starts the work and waits for it later) shards the
   distinct configurations over worker processes that run without ``TRITON_INTERPRET``
   (compiling needs real ``@triton.jit`` functions) and a fresh cache (a cache hit would skip
   ptxas and its log).

Command line: ``python -m sba_kernels.triton_aot --arch 90 80 --json out.jsonl``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch

# Per-SM limits by compute capability: registers, shared memory a program may opt into, shared
# memory per SM (minus 1 KB the driver reserves per program), threads, resident programs.
SM_LIMITS = {
    80: dict(registers=65536, shared_per_program=166912, shared_per_sm=167936, threads=2048, programs=32),
    86: dict(registers=65536, shared_per_program=101376, shared_per_sm=102400, threads=1536, programs=16),
    89: dict(registers=65536, shared_per_program=101376, shared_per_sm=102400, threads=1536, programs=24),
    90: dict(registers=65536, shared_per_program=232448, shared_per_sm=233472, threads=2048, programs=32),
}
DTYPES = (("float16", False), ("bfloat16", False), ("float32", False), ("float32", True))  # (dtype, tf32)
HEAD_DIMS = (16, 24, 32, 64, 128)
SUBGRAPH_SIZES = (16, 32, 64, 200)       # each tile bucket up to 64 rows, and one over two 128-row tiles
CHANNELS = (16, 32, 64, 128)             # segment mean: one per channel block
BIAS_KINDS = (None, "shared", "per_head")


@dataclass(frozen=True)
class Launch:
    """One launch configuration: the kernel's name, its arguments as the launcher saw them
    (tensors reduced to dtype and a flag for 16-byte alignment), and its keyword meta."""

    kernel: str
    args: tuple
    meta: tuple

    @classmethod
    def recorded(cls, kernel, args, meta: dict) -> "Launch":
        """The launch `triton_backend.LAUNCH_RECORDER` holds as ``(kernel, grid, args, meta)``."""
        name = kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__
        return cls(name, tuple(_freeze(a) for a in args), tuple(sorted(meta.items())))

    def describe(self) -> str:
        """``kernel[dtype=..., META=...]``, dtype being the first tensor argument's."""
        dtype = next(a[1] for a in self.args if isinstance(a, tuple) and a[:1] == ("tensor",))
        return f"{self.kernel}[dtype={dtype}, " + ", ".join(f"{k}={v}" for k, v in self.meta) + "]"


@dataclass
class CompileReport:
    """What the GPU compiler decided for one launch configuration on one architecture.
    ``config`` describes the launch for people (`Launch.describe`); ``meta`` holds its keyword
    meta-parameters (``BLOCK``, ``num_warps``, ...) for code to match on."""

    kernel: str
    config: str
    arch: int
    ok: bool
    meta: dict = field(default_factory=dict)
    error: str = ""
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack_bytes: int = 0
    local_bytes: int = 0
    shared_bytes: int = 0
    threads: int = 0
    programs_per_sm: int = 0
    ptxas_warnings: str = ""

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0 or self.local_bytes > 0

    @property
    def shared_over_limit(self) -> bool:
        return self.shared_bytes > SM_LIMITS[self.arch]["shared_per_program"]

    @property
    def unusable(self) -> str:
        """Why this configuration must not run ("" when it may): a compile error, a spill, or
        shared memory over the limit."""
        if not self.ok:
            return f"does not compile: {self.error.splitlines()[0]}"
        if self.spills:
            return f"spills {max(self.spill_stores, self.spill_loads)} bytes"
        if self.shared_over_limit:
            return f"needs {self.shared_bytes} bytes of shared memory"
        return ""


def kernels() -> list[str]:
    """The launchable kernels of `triton_kernels`: its public ``@triton.jit`` functions
    (helpers start with an underscore)."""
    from . import triton_kernels

    return sorted(name for name, obj in vars(triton_kernels).items()
                  if not name.startswith("_") and hasattr(obj, "fn") and callable(getattr(obj, "fn")))


# ----------------------------------------------------------------------------- 1. record
@contextlib.contextmanager
def recording() -> Iterator[list]:
    """Inside the block the backend's launch functions, called from this thread, append their
    launches to the list yielded, as ``(kernel, grid, args, meta)``, instead of running them;
    other threads' launches run."""
    from . import triton_backend

    with _ONE_RECORDING:      # two threads tuning at once take turns
        triton_backend.LAUNCH_RECORDER, triton_backend.RECORDING_THREAD = [], threading.get_ident()
        try:
            yield triton_backend.LAUNCH_RECORDER
        finally:
            triton_backend.LAUNCH_RECORDER, triton_backend.RECORDING_THREAD = None, None


_ONE_RECORDING = threading.Lock()


def _freeze(value):
    """A launch argument as a hashable description."""
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype).removeprefix("torch."))
    return value


def _one_subgraph(m: int):
    """index ``[1, m]`` and lengths ``[1]`` of one subgraph holding nodes 0..m-1."""
    return torch.arange(m, dtype=torch.int32).view(1, m), torch.tensor([m], dtype=torch.int32)


def _record_attention(dtype: torch.dtype, head_dim: int, m: int, bias_kind: Optional[str]) -> None:
    from . import triton_backend as tb

    B, H = 2, 2
    q, k, v, do = (torch.zeros(B, m, H, head_dim, dtype=dtype) for _ in range(4))
    index, lengths = _one_subgraph(m)
    bias = None
    if bias_kind is not None:
        bias = torch.zeros(((H,) if bias_kind == "per_head" else ()) + (1, m, m), dtype=dtype)
    # One subgraph here: with the bias loop's thresholds at 1 and at their values, both forms
    # of the one-tile forward (one program per pair, one per bias tile) are recorded.
    for forced in (True, False):
        with tb.bias_tuning(min_parts=1, min_pairs=1) if forced else contextlib.nullcontext():
            o, lse, _ = tb.attention_forward(q, k, v, index, lengths, bias, 0.125, False)
            tb.attention_forward(q, k, v, index, lengths, bias, 0.125, True)
    for need_dbias in ((False, True) if bias is not None else (False,)):     # a bias can be frozen
        # The pooled forward's backward takes z's gradient inside the one-tile kernel.
        pooled = tb.takes_pooled_gradient(m, q, need_dbias)
        for dz in (None, torch.zeros(B, 1, H, head_dim, dtype=dtype)) if pooled else (None,):
            tb.attention_backward(do, q, k, v, o, lse, index, lengths, bias, 0.125, need_dbias=need_dbias, dz=dz)


def _record_segment_mean(dtype: torch.dtype, channels: int) -> None:
    from . import triton_backend as tb

    index, lengths = _one_subgraph(40)
    x = torch.zeros(2, 40, channels, dtype=dtype)
    z = tb.segment_mean_forward(x, index, lengths)
    tb.segment_mean_backward(z, torch.zeros(40, dtype=torch.long), lengths)


def recorded_launches() -> list[Launch]:
    """Every distinct launch configuration of the triton backend, in a fixed order."""
    saved_tf32 = torch.backends.cuda.matmul.allow_tf32
    seen: dict[Launch, None] = {}
    try:
        with recording() as launches:
            for dtype_name, tf32 in DTYPES:
                torch.backends.cuda.matmul.allow_tf32 = tf32
                dtype = getattr(torch, dtype_name)
                for head_dim in HEAD_DIMS:
                    for m in SUBGRAPH_SIZES:
                        for bias_kind in BIAS_KINDS:
                            _record_attention(dtype, head_dim, m, bias_kind)
                for channels in CHANNELS:
                    _record_segment_mean(dtype, channels)
            for kernel, _grid, args, meta in launches:
                seen.setdefault(Launch.recorded(kernel, args, meta), None)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved_tf32
    return list(seen)


# ----------------------------------------------------------------------------- 2. compile
def _example_args(launch: Launch) -> list:
    """Arguments that specialise like the recorded ones: a small 16-byte-aligned tensor of the
    recorded dtype for each tensor, the recorded value for everything else."""
    return [torch.empty(64, dtype=getattr(torch, a[1])) if isinstance(a, tuple) and a[:1] == ("tensor",) else a
            for a in launch.args]


def cuobjdump(cubin: bytes, flag: str) -> str:
    """What ``cuobjdump <flag>`` (the one Triton ships) prints for ``cubin``: ``-sass`` for the
    machine code, ``--dump-resource-usage`` for registers and memory."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), flag, f.name], capture_output=True, text=True, check=True).stdout


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED, LOCAL of the cubin's one function, from ``cuobjdump``."""
    out = cuobjdump(cubin, "--dump-resource-usage")
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {k: int(v) for k, v in found.items()}


def programs_per_sm(arch: int, registers: int, threads: int, shared_bytes: int) -> int:
    """Resident programs per SM allowed by registers (allocated per warp in units of 256),
    shared memory, threads and the programs-per-SM cap."""
    lim = SM_LIMITS[arch]
    warps = threads // 32
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_regs = (lim["registers"] // regs_per_warp) // warps
    by_shared = lim["shared_per_sm"] // (shared_bytes + 1024)
    return int(min(by_regs, by_shared, lim["threads"] // threads, lim["programs"]))


def _specialize(launch: Launch, arch: int):
    """(target, signature, constexprs, attrs, options) as Triton's launcher would build them."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from . import triton_kernels

    kernel = getattr(triton_kernels, launch.kernel)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    meta = dict(launch.meta)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*_example_args(launch), **meta)
    return (target, *kernel._pack_args(backend, meta, bound, specialization, options)[1:],
            backend.parse_options(meta))


def distinct_configs(launches: list[Launch], arch: int) -> list[Launch]:
    """One launch per configuration: kernel, argument types, constexprs and options.

    Launches that differ only in values Triton does not specialise on compile to the same
    binary. Triton also specialises integers on divisibility by 16 (a bias row stride of 64 vs
    65); those variants are not compiled separately: each configuration is compiled once, with
    the attributes of its first recorded launch, whose sizes are multiples of 16.
    """
    seen: dict[str, Launch] = {}
    for launch in launches:
        seen.setdefault(config_key(launch, arch), launch)
    return list(seen.values())


def config_key(launch: Launch, arch: int) -> str:
    """What one compiled binary is for: kernel, argument types, constexprs and options (not
    the values of the integers Triton does not specialise on, such as N)."""
    _, signature, constexprs, _attrs, options = _specialize(launch, arch)
    return repr((launch.kernel, sorted(signature.items()), sorted(constexprs.items()),
                 sorted(options.__dict__.items())))


def compile_launch(launch: Launch, arch: int) -> CompileReport:
    """Compile ``launch`` for ``sm_<arch>`` with Triton's own specialisation. A compile error is
    the finding, reported with ``ok=False``; only a failure to read the cubin (cuobjdump) raises."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource

    from . import triton_kernels

    config, meta = launch.describe(), dict(launch.meta)
    try:
        target, signature, constexprs, attrs, options = _specialize(launch, arch)
        log = io.StringIO()
        with knobs.nvidia.scope(), contextlib.redirect_stdout(log):      # scope: the knob and its env var restored
            knobs.nvidia.dump_ptxas_log = True
            compiled = triton.compile(ASTSource(getattr(triton_kernels, launch.kernel), signature, constexprs, attrs),
                                      target=target, options=options.__dict__)
    except Exception as err:  # a compile error is the finding: report it, keep compiling the rest
        return CompileReport(launch.kernel, config, arch, ok=False, meta=meta,
                             error=f"{type(err).__name__}: {err}"[:2000])
    text = log.getvalue()
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    usage = resource_usage(compiled.asm["cubin"])
    threads = 32 * compiled.metadata.num_warps
    shared = int(compiled.metadata.shared)
    # ptxas reports some performance problems (wgmma serialised, C7510 and kin) as "info" lines.
    warnings = [line.strip() for line in text.splitlines()
                if "warning" in line.lower() or "performance loss" in line.lower()]
    return CompileReport(
        launch.kernel, config, arch, ok=True, meta=meta, registers=usage.get("REG", 0),
        spill_stores=int(spills.group(1)) if spills else 0, spill_loads=int(spills.group(2)) if spills else 0,
        stack_bytes=usage.get("STACK", 0), local_bytes=usage.get("LOCAL", 0), shared_bytes=shared, threads=threads,
        programs_per_sm=programs_per_sm(arch, usage.get("REG", 0), threads, shared),
        ptxas_warnings=" | ".join(warnings),
    )


@contextlib.contextmanager
def cold_cache() -> Iterator[None]:
    """Inside the block Triton compiles into an empty cache of its own, so ptxas runs and prints
    the log `compile_launch` reads spills from (a cache hit would skip it)."""
    from triton import knobs

    with tempfile.TemporaryDirectory(prefix="sba-aot-cache-") as cache, knobs.cache.scope():
        knobs.cache.dir = cache        # scope: the old dir and TRITON_CACHE_DIR come back after
        yield


# ----------------------------------------------------------------------------- 3. shard
def _run_shard(archs: list[int], shard: int, shards: int, out: Path) -> None:
    """Compile every ``shards``-th configuration starting at ``shard``, for each arch; one JSON
    line per report, appended to ``out`` as it comes."""
    launches = recorded_launches()
    jobs = [(launch, arch) for arch in archs for launch in distinct_configs(launches, arch)][shard::shards]
    with cold_cache(), open(out, "a") as f:
        for launch, arch in jobs:
            f.write(json.dumps(asdict(compile_launch(launch, arch))) + "\n")
            f.flush()


def compiler_env() -> dict[str, str]:
    """The environment of a child process that compiles for a GPU: no ``TRITON_INTERPRET``
    (compiling needs real ``@triton.jit`` kernels), FMA contraction on as Triton's default says,
    and this checkout first on ``PYTHONPATH``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")      # the default, said out loud (triton 3.9 warns)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


class CompileRun:
    """Every launch configuration being compiled for every arch in ``archs``, over ``workers``
    processes started at construction; `reports` waits for them. ``nice``: the workers' added
    niceness, so that a run started early (the test session does) takes only idle cores."""

    def __init__(self, archs=(90, 80), workers: int = 2, nice: int = 0):
        env = compiler_env()
        self._tmp = Path(tempfile.mkdtemp(prefix="sba-aot-"))
        self._procs = []
        self._reports: Optional[list[CompileReport]] = None
        try:
            for shard in range(workers):
                out, log = self._tmp / f"shard{shard}.json", self._tmp / f"shard{shard}.log"
                cmd = [sys.executable, "-m", "sba_kernels.triton_aot", "--arch", *map(str, archs),
                       "--shard", f"{shard}/{workers}", "--json", str(out), "--nice", str(nice)]
                with open(log, "w") as err:       # a file, not a pipe: nothing blocks while no one reads
                    self._procs.append((subprocess.Popen(cmd, env=env, stdout=err, stderr=subprocess.STDOUT), out, log))
        except BaseException:
            self.stop()
            raise

    def reports(self, timeout: Optional[float] = None) -> list[CompileReport]:
        """Every report, once all workers are done (``timeout`` seconds for each at most)."""
        if self._reports is not None:
            return self._reports
        try:
            reports = []
            for proc, out, log in self._procs:
                proc.wait(timeout=timeout)
                if proc.returncode != 0:
                    raise RuntimeError(f"triton_aot worker failed ({proc.returncode}):\n{log.read_text()[-4000:]}")
                reports += [CompileReport(**json.loads(line)) for line in out.read_text().splitlines()]
            self._reports = reports
            return reports
        finally:       # done, timed out or failed: stop the others too
            self.stop()

    def stop(self) -> None:
        """Kill the workers still running and delete their files."""
        for proc, _, _ in self._procs:
            proc.kill()
            proc.wait()
        shutil.rmtree(self._tmp, ignore_errors=True)


def compile_all(archs=(90, 80), workers: int = 2, timeout: Optional[float] = None) -> list[CompileReport]:
    """Every launch configuration compiled for every arch, over ``workers`` processes."""
    return CompileRun(archs, workers).reports(timeout)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(SM_LIMITS))
    parser.add_argument("--shard", default="0/1", help="i/n: compile every n-th configuration from the i-th")
    parser.add_argument("--json", required=True, help="where to append the reports, one JSON line each")
    parser.add_argument("--nice", type=int, default=0, help="run at this added niceness (lower priority)")
    args = parser.parse_args(argv)
    os.nice(args.nice)
    shard, shards = map(int, args.shard.split("/"))
    _run_shard(args.arch, shard, shards, Path(args.json))


if __name__ == "__main__":
    main()
