"""A small forward and backward of every cuda-backend kernel, for compute-sanitizer.

    compute-sanitizer --tool memcheck python3 bench/cuda_small_case.py
    compute-sanitizer --tool racecheck python3 bench/cuda_small_case.py

Ragged subgraphs (a singleton, one spanning three 32-slot tiles), a per-head bias, fp32 and
bf16: every kernel in csrc/ runs at least once, on sizes the sanitizer gets through quickly.
Exits non-zero if the backend is unavailable or a result is not finite.
"""

import sys

import torch

import sba_kernels as sk
from sba_kernels import cuda_backend


def main() -> int:
    if not cuda_backend.is_available():
        print("cuda backend unavailable:", cuda_backend.unavailable_reason())
        return 1
    lengths = [70, 1, 9, 5, 15]
    part = sk.Partition.from_assignment(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)))
    part = part.to("cuda")
    n, heads = part.num_nodes, 2
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = (torch.randn(2, n, heads, 32, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
        bias = torch.randn(heads, part.num_parts, part.max_size, part.max_size, device="cuda", dtype=dtype,
                           requires_grad=True)
        o, z = sk.intra_attention_pooled(q, k, v, part, bias=bias, backend="cuda")
        g = sk.inter_attention(z, z, z, backend="cuda")
        (o.float().square().sum() + g.float().sum()).backward()
        for t in (o, z, g, q.grad, k.grad, v.grad, bias.grad):
            if not torch.isfinite(t).all():
                print("non-finite result in", dtype)
                return 1
    torch.cuda.synchronize()
    print("cuda small case: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
