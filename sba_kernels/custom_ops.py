"""The ``sba::`` torch.library custom ops, their autograd, and `KernelBackend`, the backend that
runs a kernel module (Triton, CUDA C++) through them.

A kernel module supplies four launch functions, which `KernelBackend` subclasses expose:

* ``attention_forward(q, k, v, index, lengths, bias, scale, pool, starts=None) -> (o, lse, z)``:
  q, k, v, o ``[B, N, H, d]``; lse fp32 ``[B, H, N]`` in whatever log base its backward uses;
  with ``pool``, z ``[B, P, H, d]`` the subgraph means of o, else an empty tensor;
* ``attention_backward(do, q, k, v, o, lse, index, lengths, bias, scale, need_dbias, starts=None)
  -> (dq, dk, dv, dbias)``: dbias in the bias's shape and dtype, or empty when not needed;
  a module that also supplies ``takes_pooled_gradient(max_len, q, need_dbias) -> bool`` gets, where that
  says so and o has a gradient of its own, the pooled forward's ``dz`` ``[B, P, H, d]`` as
  ``attention_backward(..., dz=dz)`` and adds ``dz[part(i)] / n_part(i)`` to dO's rows itself;
  otherwise dO comes with it added;
* ``segment_mean_forward(x, index, lengths, starts=None) -> z`` and
  ``segment_mean_backward(dz, assignment, lengths) -> dx``.

``starts`` is `Partition.starts`: int32 ``[P]``, each subgraph's first node when every subgraph
is a run of consecutive node ids, else None. A module may address rows from it instead of
gathering through ``index`` (the Triton one-tile kernels and segment mean do); ``index`` always
comes too.

Each op takes the backend's name as its last argument and calls that backend's launch, so one
set of ops (shape-only fake versions for torch.compile, autograd) serves every kernel backend.
Inter attention is intra attention over one subgraph holding all P tokens.

Eager calls skip torch.library's dispatch: `KernelBackend` sends plain tensors outside
torch.compile (`_eager`) through `_EagerAttention` / `_EagerSegmentMean`, autograd Functions
over the same bodies, context setup and backward as the ops. The dispatch adds about 0.15 ms of
host code to a forward+backward (349 against 204 us on a 2-core CPU, launches stubbed:
`bench/results/host_time_cpu.md`), where the kernels take 0.35 ms at N = 1e5 on an H200
(`bench/results/gpu-h200/run5/profile.md`). Traced code, fake tensors and tensor subclasses
still take the ops.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import backends
from ._checks import refuse_double_backward
from .backends import Backend

Tensor = torch.Tensor


def _rows(t: Tensor) -> Tensor:
    """The kernels want the last dim contiguous; other strides are free."""
    return t if t.stride(-1) == 1 else t.contiguous()


# Tensor types the eager path takes as they are (Parameter disables __torch_function__); any
# other subclass (DTensor, one with its own __torch_dispatch__) goes through the custom ops.
_PLAIN = (Tensor, torch.nn.Parameter)


def _eager(*tensors: Optional[Tensor]) -> bool:
    """Whether a call may skip the custom ops: eager mode and plain tensors (a learned bias is an
    ``nn.Parameter``) only."""
    return not torch.compiler.is_compiling() and all(t is None or type(t) in _PLAIN for t in tensors)


def _eager_function(name: str, body, setup_context, backward) -> type:
    """An autograd Function running a custom op's ``body`` with the op's own context setup and
    backward, without torch.library's dispatch. The setup runs inside ``forward``: a separate
    ``setup_context`` makes ``apply`` bind the arguments to forward's signature through
    `inspect` on every call."""

    def forward(ctx, *inputs):
        output = body(*inputs)
        setup_context(ctx, inputs, output)
        return output

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward), "backward": staticmethod(backward),
        "__doc__": f"``{body.__name__}`` and its autograd, for eager calls (see the module doc)."})


# ----------------------------------------------------------------------------- attention
def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, index: Tensor, lengths: Tensor, starts: Optional[Tensor],
                   assignment: Tensor, bias: Optional[Tensor], scale: float, pool: bool,
                   backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(o, lse, z) of subgraph attention, z the subgraph means of o when ``pool`` (else empty).
    ``assignment`` is not read here: the op takes it so that its context can keep it for the
    backward, which spreads z's gradient over the nodes through it."""
    return backends.get(backend).launches.attention_forward(q, k, v, index, lengths, bias, scale, pool,
                                                            starts=starts)


attention_fwd = torch.library.custom_op("sba::attention_fwd", _attention_fwd, mutates_args=())


@attention_fwd.register_fake
def _(q, k, v, index, lengths, starts, assignment, bias, scale, pool, backend):
    B, N, H, d = q.shape
    z = q.new_empty((B, index.shape[0], H, d)) if pool else q.new_empty(0)
    return q.new_empty((B, N, H, d)), q.new_empty((B, H, N), dtype=torch.float32), z


def _attention_bwd(do: Tensor, dz: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                   index: Tensor, lengths: Tensor, starts: Optional[Tensor], bias: Optional[Tensor], scale: float,
                   need_dbias: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dbias) from o's gradient ``do`` and, where the backend sums it in
    (`_fuses_pooled_gradient`), the subgraph means' gradient ``dz``; dbias empty unless
    ``need_dbias``."""
    extra = {} if dz is None else {"dz": dz}
    return backends.get(backend).launches.attention_backward(do, q, k, v, o, lse, index, lengths, bias, scale,
                                                             need_dbias, starts=starts, **extra)


attention_bwd = torch.library.custom_op("sba::attention_bwd", _attention_bwd, mutates_args=())


@attention_bwd.register_fake
def _(do, dz, q, k, v, o, lse, index, lengths, starts, bias, scale, need_dbias, backend):
    return (*(q.new_empty(q.shape) for _ in range(3)), bias.new_empty(bias.shape) if need_dbias else q.new_empty(0))


def _attention_setup(ctx, inputs, output):
    q, k, v, index, lengths, starts, assignment, bias, scale, pool, backend = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], index, lengths, starts, assignment, bias)
    ctx.scale, ctx.pool, ctx.backend = scale, pool, backend
    # An output no loss used (lse always; o or z sometimes) reaches the backward as None, not
    # as zeros autograd would allocate and fill for it: lse's are [B, H, N] fp32, 32 MB at
    # N = 1e6, H = 8, written on every backward for nothing.
    ctx.set_materialize_grads(False)


def _fuses_pooled_gradient(backend: str, max_len: int, q: Tensor, need_dbias: bool) -> bool:
    """Whether ``backend``'s attention backward adds z's gradient to dO's rows itself (see the
    module doc), sparing a pass that writes the summed rows first."""
    takes = getattr(backends.get(backend).launches, "takes_pooled_gradient", None)
    return takes is not None and takes(max_len, q, need_dbias)


def _attention_backward(ctx, do, _dlse, dz):
    refuse_double_backward(ctx.backend)
    q, k, v, o, lse, index, lengths, starts, assignment, bias = ctx.saved_tensors
    eager = _eager(do, q, dz)
    dz = dz if ctx.pool else None
    need_dbias = bias is not None and ctx.needs_input_grad[7]
    if dz is not None and (do is None or not _fuses_pooled_gradient(ctx.backend, index.shape[1], q, need_dbias)):
        # z = segment mean of o, so o's whole gradient is do + dz[part(i)] / n_part(i): summed here
        B, N, H, d = q.shape
        mean_bwd = _segment_mean_bwd if eager else segment_mean_bwd
        dz_rows = mean_bwd(dz.reshape(B, -1, H * d).contiguous(), assignment, lengths, ctx.backend).view(B, N, H, d)
        do, dz = (dz_rows if do is None else do + dz_rows), None
    if do is None:                    # neither o nor z was used (lse's gradient is not followed: no
        return (None,) * 11           # public op returns lse)
    dq, dk, dv, dbias = (_attention_bwd if eager else attention_bwd)(
        _rows(do), dz, q, k, v, o, lse, index, lengths, starts, bias, ctx.scale, need_dbias, ctx.backend)
    return dq, dk, dv, None, None, None, None, dbias if need_dbias else None, None, None, None


attention_fwd.register_autograd(_attention_backward, setup_context=_attention_setup)


_EagerAttention = _eager_function("_EagerAttention", _attention_fwd, _attention_setup, _attention_backward)


# ----------------------------------------------------------------------------- segment mean
def _segment_mean_fwd(x: Tensor, index: Tensor, lengths: Tensor, starts: Optional[Tensor], assignment: Tensor,
                      backend: str) -> Tensor:
    """``[B, N, C] -> [B, P, C]`` subgraph means."""
    return backends.get(backend).launches.segment_mean_forward(x, index, lengths, starts=starts)


segment_mean_fwd = torch.library.custom_op("sba::segment_mean_fwd", _segment_mean_fwd, mutates_args=())


@segment_mean_fwd.register_fake
def _(x, index, lengths, starts, assignment, backend):
    return x.new_empty((x.shape[0], index.shape[0], x.shape[2]))


def _segment_mean_bwd(dz: Tensor, assignment: Tensor, lengths: Tensor, backend: str) -> Tensor:
    """``dx[b, i] = dz[b, part(i)] / n_part(i)``."""
    return backends.get(backend).launches.segment_mean_backward(dz, assignment, lengths)


segment_mean_bwd = torch.library.custom_op("sba::segment_mean_bwd", _segment_mean_bwd, mutates_args=())


@segment_mean_bwd.register_fake
def _(dz, assignment, lengths, backend):
    return dz.new_empty((dz.shape[0], assignment.shape[0], dz.shape[2]))


def _mean_setup(ctx, inputs, output):
    _, _, lengths, _, assignment, backend = inputs
    ctx.save_for_backward(assignment, lengths)
    ctx.backend = backend


def _mean_backward(ctx, dz):
    assignment, lengths = ctx.saved_tensors
    if torch.is_grad_enabled() and dz.requires_grad:     # create_graph=True: dx must keep dz's graph
        return (dz / lengths.unsqueeze(-1)).index_select(1, assignment), None, None, None, None, None
    mean_bwd = _segment_mean_bwd if _eager(dz) else segment_mean_bwd
    return mean_bwd(_rows(dz), assignment, lengths, ctx.backend), None, None, None, None, None


segment_mean_fwd.register_autograd(_mean_backward, setup_context=_mean_setup)


_EagerSegmentMean = _eager_function("_EagerSegmentMean", _segment_mean_fwd, _mean_setup, _mean_backward)


# ----------------------------------------------------------------------------- the backend
class KernelBackend(Backend):
    """A backend whose kernels launch from the four functions in the module doc, found in the
    module ``launches``, run through the ``sba::`` ops. Subclasses set ``name``,
    ``auto_devices`` and ``unavailable``."""

    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    max_head_dim = 128
    # The launch grids' second axis holds one program per (batch, head) pair of the attention
    # launches and per batch row of segment_mean's; CUDA allows at most 65535 there.
    max_grid_y = 65535

    def __init__(self, launches):
        self.launches = launches

    def supports(self, x, bias=None):
        """Why this backend cannot run ``x`` (``[B, N, H, d]``, or ``[B, N, C]`` for
        segment_mean) with ``bias``, or None when it can."""
        kinds = ", ".join(str(t).removeprefix("torch.") for t in self.dtypes)
        if x.dtype not in self.dtypes:
            return f"{self.name} takes {kinds} inputs, got {x.dtype}"
        if bias is not None and bias.dtype not in self.dtypes:
            return f"{self.name} takes a {kinds} bias, got {bias.dtype}"
        if x.dim() == 4 and x.shape[-1] > self.max_head_dim:
            return f"{self.name} takes head dims up to {self.max_head_dim}, got {x.shape[-1]}"
        pairs = x.shape[0] * (x.shape[2] if x.dim() == 4 else 1)
        if pairs > self.max_grid_y:
            what = "batch x heads" if x.dim() == 4 else "the batch"
            return (f"{self.name}'s launch grid holds {what} = {pairs} on an axis CUDA caps at "
                    f"{self.max_grid_y}: split the batch")
        return self.unavailable(x.device)

    def _attention(self, q, k, v, index, lengths, starts, assignment, bias, scale, pool: bool):
        run = _EagerAttention.apply if _eager(q, k, v, bias) else attention_fwd
        return run(_rows(q), _rows(k), _rows(v), index, lengths, starts, assignment,
                   None if bias is None else bias.contiguous(), scale, pool, self.name)

    def _intra(self, q, k, v, partition, bias, scale, pool: bool):
        return self._attention(q, k, v, partition.index, partition.lengths, partition.starts, partition.assignment,
                               bias, scale, pool)

    def intra_attention(self, q, k, v, partition, bias, scale):
        return self._intra(q, k, v, partition, bias, scale, pool=False)[0]

    def intra_attention_pooled(self, q, k, v, partition, bias, scale):
        o, _, z = self._intra(q, k, v, partition, bias, scale, pool=True)
        return o, z

    def inter_attention(self, q, k, v, bias, scale):
        # One subgraph holding all P tokens, built from shapes alone (no Partition and its checks:
        # this runs inside torch.compile traces, which cannot branch on tensor values).
        P = q.shape[1]
        index = torch.arange(P, dtype=torch.int32, device=q.device).unsqueeze(0)
        lengths = torch.full((1,), P, dtype=torch.int32, device=q.device)
        starts = torch.zeros(1, dtype=torch.int32, device=q.device)       # tokens 0..P-1: one run
        assignment = torch.zeros(P, dtype=torch.long, device=q.device)
        if bias is not None:       # [P, P] -> [1, P, P];  [H, P, P] -> [H, 1, P, P]
            bias = bias.unsqueeze(-3)
        return self._attention(q, k, v, index, lengths, starts, assignment, bias, scale, pool=False)[0]

    def segment_mean(self, x, partition):
        run = _EagerSegmentMean.apply if _eager(x) else segment_mean_fwd
        return run(_rows(x), partition.index, partition.lengths, partition.starts, partition.assignment, self.name)
