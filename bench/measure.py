"""Timing and peak memory of one method at one size, on a GPU or a CPU.

GPU: median of `triton.testing.do_bench` (CUDA events, warm-up first); peak memory is
``max_memory_allocated`` after a reset, minus what was allocated before the call.
CPU: median wall time of repeated calls after a warm-up (and their median process CPU time,
steadier on a shared machine); peak memory is the process's peak
resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) minus the resident set before
the call. CPU points run in a fresh process each (see scaling.py), so one point's allocator
cache cannot hide another's.

Forward is measured under ``torch.no_grad()`` (inference); forward+backward with inputs that
require grad and a random output gradient.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def proc_status_kb(field: str) -> int:
    """A ``/proc/self/status`` field in kB (``VmRSS``, ``VmHWM``, ``VmSize``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_cpu_peak() -> int:
    """Reset the peak resident set to the current one; return the current one in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return proc_status_kb("VmRSS") * 1024


def peak_bytes(fn: Callable[[], object], device: str) -> int:
    """Bytes the call adds at its peak over what was held before it. Call ``fn`` once before,
    so one-time setup (autograd's threads, compiled kernels, workspaces) stays out."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    before = _reset_cpu_peak()
    fn()
    return max(0, proc_status_kb("VmHWM") * 1024 - before)


def median_ms(fn: Callable[[], object], device: str, budget_s: float) -> float:
    """Median milliseconds per call, spending about ``budget_s`` seconds in timed calls (at
    least one). Call ``fn`` once before: the first call's setup is not timed."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=max(1, int(budget_s * 250)), rep=max(1, int(budget_s * 1000)),
                                             return_mode="median"))
    return cpu_medians_ms(fn, budget_s)[0]


def cuda_graph_replay(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` captured once in a CUDA graph; the call returned replays it: the same kernels on
    the same buffers, issued by one host call in place of ``fn``'s Python, autograd and launches.
    What a small-N call costs when the host is out of the way (``scaling.py --cuda-graph``), and
    how a training loop gets there (`torch.cuda.graphs`). ``fn`` must be capturable: no host
    synchronisation, no copy from pageable host memory. Warmed up on a side stream first, as
    PyTorch's CUDA-graph notes ask. A capture that fails raises a RuntimeError naming what
    ``fn`` did wrong, not the capture's own "invalidated" error that follows it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        # The outer stream context restores the caller's stream even when the capture's end
        # raises (torch.cuda.graph's own exit then skips restoring it).
        with torch.cuda.stream(side), torch.cuda.graph(graph, stream=side):
            fn()
    except Exception as err:
        cause = err.__context__ if err.__context__ is not None else err
        raise RuntimeError(f"CUDA graph capture failed: {type(cause).__name__}: {cause}") from err
    return graph.replay


def cpu_medians_ms(fn: Callable[[], object], budget_s: float) -> tuple[float, float]:
    """CPU: median wall milliseconds and median process CPU milliseconds (all threads) per call,
    over the same calls. Other users' load on a shared machine stretches the wall time but not
    the CPU time, so the CPU time is the steadier measure of the work done."""
    wall, cpu = [], []
    while not wall or (sum(wall) < budget_s and len(wall) < 50):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return 1e3 * statistics.median(wall), 1e3 * statistics.median(cpu)


def copy_bandwidth(device: str, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    ms = median_ms(lambda: dst.copy_(src), device, budget_s=0.5)
    return 2 * nbytes / (ms * 1e-3)


def attention_floor_bytes(batch: int, nodes: int, heads: int, head_dim: int, elem: int, backward: bool) -> int:
    """Fewest bytes subgraph attention must move (SPEC 5b): forward reads q, k, v and writes o
    and the fp32 log-sum-exp; backward also reads o, dO, lse and writes dq, dk, dv."""
    tokens = batch * nodes * heads
    fwd = 4 * tokens * head_dim * elem + 4 * tokens
    if not backward:
        return fwd
    return fwd + 8 * tokens * head_dim * elem + 4 * tokens
