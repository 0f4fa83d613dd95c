"""Micro-benchmarks of the ops at one size, per usable backend (pytest-benchmark).

    pytest bench/ --benchmark-only

Kept out of the default test run (pyproject's testpaths is tests/). On the CPU only the torch
and sdpa backends are timed (the Triton interpreter is a correctness tool, not a timing target).
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workload import Config, build_partition, make_inputs  # noqa: E402

import sba_kernels as sk  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CFG = Config(batch=1, heads=4, head_dim=32, subgraph_size=64, dtype="bf16" if DEVICE == "cuda" else "fp32",
             device=DEVICE, backward=False)
NODES = 65536 if DEVICE == "cuda" else 8192
BACKENDS = [b for b in sk.available_backends() if DEVICE == "cuda" or b in ("torch", "sdpa")]


@pytest.fixture(scope="module")
def workload():
    partition = build_partition(NODES, CFG.subgraph_size).to(DEVICE)
    return partition, make_inputs(NODES, CFG, requires_grad=False)


def _timed(benchmark, fn):
    def run():
        out = fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    return benchmark(run)


@pytest.mark.parametrize("backend", BACKENDS)
def test_intra_attention(benchmark, workload, backend):
    partition, (q, k, v) = workload
    out = _timed(benchmark, lambda: sk.intra_attention(q, k, v, partition, backend=backend))
    assert out.shape == q.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_intra_attention_pooled(benchmark, workload, backend):
    partition, (q, k, v) = workload
    o, z = _timed(benchmark, lambda: sk.intra_attention_pooled(q, k, v, partition, backend=backend))
    assert o.shape == q.shape and z.shape == (1, partition.num_parts, *q.shape[2:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_segment_mean(benchmark, workload, backend):
    partition, (q, _, _) = workload
    x = q.flatten(2)
    out = _timed(benchmark, lambda: sk.segment_mean(x, partition, backend=backend))
    assert out.shape == (1, partition.num_parts, x.shape[2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_inter_attention(benchmark, workload, backend):
    partition, (q, k, v) = workload
    P = partition.num_parts
    out = _timed(benchmark, lambda: sk.inter_attention(q[:, :P], k[:, :P], v[:, :P], backend=backend))
    assert out.shape == q[:, :P].shape
