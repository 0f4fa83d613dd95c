"""Triton kernels for SBA: subgraph attention and segment mean.

Two families of attention kernels:

* one-tile (`attention_fwd_one_tile`, `attention_bwd_one_tile`), for partitions whose every
  subgraph fits one tile: grid axis 0 runs over the P subgraphs, one program holds a whole
  subgraph for one ``(batch, head)`` (or loops over those that share a bias tile), and the
  backward is one fused launch;
* tiled (`attention_fwd`; `attention_bwd_delta`, `_dq`, `_dkdv`, `_dbias`), for any size: a
  program handles one ``(batch, head)`` and one tile of one subgraph, grid axis 0 runs over
  ``P x tiles_per_part`` (``tiles_per_part = ceil(M / BLOCK)``), and a program whose tile starts
  past its subgraph's end returns at once.

Grid sizes depend on shapes only, which keeps the ops traceable by torch.compile. Conventions
shared by every attention kernel:

* node tensors are ``[B, N, H, d]`` with the last dim contiguous; offsets are int64;
* a tile's rows are gathered through ``index[part, slot]``: slot ``s`` of subgraph ``p`` is
  node ``index[p, s]``; slots ``>= lengths[p]`` are masked out. The one-tile kernels and the
  segment mean take a runtime flag ``contiguous``: when every subgraph is a run of consecutive
  node ids (the model's node order makes them so), ``Index`` holds each subgraph's first node
  ``[P]`` instead and slot ``s`` is node ``first[p] + s``, one scalar load in place of a tile
  of ids (`_tile_rows`). The tiled kernels always gather: their loops sit at the register
  limit, and the flag made some of them spill (fp32 dQ at head dim 128, ahead-of-time compiles);
* scores live in log2 units (``scale * log2(e)`` folded into one multiplier) so the softmax
  uses ``exp2``; the saved log-sum-exp ``lse`` is in the same units, fp32 ``[B, H, N]``;
* the bias is indexed by slot: ``bias[h, p, i, j]`` at ``h * s_bh + p * s_bp + i * s_bi + j``
  (``s_bh = 0`` when one bias is shared by all heads);
* sizes and the bias row stride ``s_bi`` (= M) are ``do_not_specialize``: one binary serves
  every N, M, B and H, so the ahead-of-time compile check (`triton_aot`) sees exactly the code
  every shape runs, and a new M never triggers a recompile.

Dense attention among P tokens is the same computation over one subgraph holding them all.
"""

import triton
import triton.language as tl

# A global a kernel reads must be a constexpr *instance*: Triton >= 3.3 refuses an annotated
# global (``X: tl.constexpr = ...``) when compiling for a GPU, though the interpreter takes it.
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _round_to_tf32(x):
    """fp32 rounded to the nearest TF32 value (10 mantissa bits, ties away from zero): add half
    of the 13 dropped bits' unit, then clear them."""
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """``a @ b`` with fp32 accumulation. Under "tf32", fp32 operands are rounded to TF32 first:
    the tensor cores truncate them otherwise (Triton issue 4574), which biased every product
    and broke the 1e-3 TF32 tolerance on an H200 (inter attention, d = 128)."""
    if PRECISION == "tf32" and a.dtype == tl.float32:
        a = _round_to_tf32(a)
        b = _round_to_tf32(b)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _tile_rows(Index, part, start, length, M, contiguous, BLOCK: tl.constexpr):
    """Slots ``start..start+BLOCK`` of subgraph ``part``: (slots, mask, node ids as int64).
    ``Index`` is the ``[P, M]`` node ids, or with ``contiguous`` the ``[P]`` first node ids;
    then the ids of masked slots run past the subgraph (every use of them is masked). Of the
    two loads, the one not wanted is fully masked: it moves no memory."""
    slots = start + tl.arange(0, BLOCK)
    mask = slots < length
    # A [BLOCK] flag, not a scalar: Triton's interpreter makes a bool tensor & a scalar bool ints.
    gathered = tl.full([BLOCK], contiguous, tl.int32) == 0
    first = tl.load(Index + part, mask=contiguous != 0, other=0)
    ids = tl.load(Index + part.to(tl.int64) * M + slots, mask=mask & gathered, other=0)
    return slots, mask, (ids + tl.where(gathered, 0, first + slots)).to(tl.int64)


@triton.jit
def _load_tile(Base, row_offsets, row_mask, offs_d, HEAD_DIM: tl.constexpr):
    """A ``[len(row_offsets), BLOCK_D]`` tile, row ``r`` at ``Base + row_offsets[r]``; zeros where masked."""
    ptrs = Base + row_offsets[:, None] + offs_d[None, :]
    return tl.load(ptrs, mask=row_mask[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def _store_tile(Base, row_offsets, row_mask, offs_d, value, HEAD_DIM: tl.constexpr):
    """`_load_tile`'s inverse: ``value`` (cast to Base's dtype) at ``Base + row_offsets[r]``, where masked in."""
    ptrs = Base + row_offsets[:, None] + offs_d[None, :]
    tl.store(ptrs, value.to(Base.dtype.element_ty), mask=row_mask[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _row_offsets(rows, b, h, s_b, s_n, s_h):
    """Element offsets of ``rows`` of the (batch ``b``, head ``h``) slice of a ``[B, N, H, d]``
    tensor with strides ``(s_b, s_n, s_h, 1)``; int64 (``b`` and ``rows`` are; ``h`` is widened
    here, where it meets a stride, rather than held as int64 in the loops)."""
    return rows * s_n + (b * s_b + h.to(tl.int64) * s_h)


@triton.jit
def _load_rows(Base, rows, stride_n, row_mask, offs_d, HEAD_DIM: tl.constexpr):
    """A ``[len(rows), BLOCK_D]`` tile of rows of one (batch, head) slice; zeros where masked."""
    return _load_tile(Base, rows * stride_n, row_mask, offs_d, HEAD_DIM)


@triton.jit
def _store_rows(Base, rows, stride_n, row_mask, offs_d, value, HEAD_DIM: tl.constexpr):
    _store_tile(Base, rows * stride_n, row_mask, offs_d, value, HEAD_DIM)


@triton.jit
def _bias_tile_offsets(bias_off, slots_m, slots_n, s_bi):
    """``[len(slots_m), len(slots_n)]`` int64 element offsets of a bias tile:
    ``bias_off + i * s_bi + j``. In int64 because ``i * s_bi`` passes 2^31 once a subgraph has
    more than 46,340 slots (the inter attention over P > 46,340 pooled tokens, with a bias)."""
    return bias_off + slots_m.to(tl.int64)[:, None] * s_bi + slots_n[None, :]


@triton.jit
def _scores(q, k, Bias, bias_off, slots_m, slots_n, mask_m, mask_n, s_bi, qk_scale,
            HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
    """``[BLOCK_M, BLOCK_N]`` scores in log2 units: ``(scale * q.k + bias) * log2(e)``."""
    s = _dot(q, tl.trans(k), PRECISION) * qk_scale
    if HAS_BIAS:
        b_ptrs = Bias + _bias_tile_offsets(bias_off, slots_m, slots_n, s_bi)
        s += tl.load(b_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32) * LOG2E
    return s


@triton.jit
def _program_tile(Lengths, TILES_PER_PART, H, BLOCK: tl.constexpr):
    """This program's (subgraph, its length, tile start slot, batch as int64, head)."""
    part = tl.program_id(0) // TILES_PER_PART
    length = tl.load(Lengths + part)
    start = (tl.program_id(0) % TILES_PER_PART) * BLOCK
    bh = tl.program_id(1)
    return part, length, start, (bh // H).to(tl.int64), (bh % H).to(tl.int64)


@triton.jit
def _probs_and_grad(q, k, v, do, lse, delta, Bias, bias_off, slots_m, slots_n, mask_m, mask_n, s_bi, qk_scale,
                    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
    """Recomputed ``p = exp2(s - lse)`` (0 off the subgraph) and the score gradient
    ``ds = p * (dO . v - delta)``, both ``[BLOCK_M, BLOCK_N]``."""
    s = _scores(q, k, Bias, bias_off, slots_m, slots_n, mask_m, mask_n, s_bi, qk_scale, HAS_BIAS, PRECISION)
    p = tl.where(mask_m[:, None] & mask_n[None, :], tl.math.exp2(s - lse[:, None]), 0.0)
    dp = _dot(do, tl.trans(v), PRECISION)
    return p, p * (dp - delta[:, None])


@triton.jit
def _pooled_row(b, part, h, P, H, offs_d, HEAD_DIM: tl.constexpr):
    """Element offsets of row ``[b, part, h, :]`` of a contiguous ``[B, P, H, HEAD_DIM]`` tensor:
    the pooled outputs (a subgraph's mean, or a tile's share of it) and z's gradient."""
    return ((b * P + part) * H + h) * HEAD_DIM + offs_d


# ----------------------------------------------------------------------------- forward
@triton.jit(do_not_specialize=['s_bi', 'TILES_PER_PART', 'H', 'N', 'M', 'pool'])
def attention_fwd(Q, K, V, O, LSE, Pooled, Bias, Index, Lengths, TILES_PER_PART,
                  s_qb, s_qn, s_qh, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh, s_ob, s_on, s_oh,
                  s_bh, s_bp, s_bi, H, N, M, pool, qk_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
    """One query tile of one subgraph for one (batch, head): online softmax over its keys.

    With ``pool`` (a runtime flag: one compiled kernel serves both uses), the epilogue also
    writes the tile's share of its subgraph's mean output, ``sum_{i in tile} o_i / n_p``, fp32,
    to ``Pooled[b, program_id(0), h, :]`` (a contiguous ``[B, P x TILES_PER_PART, H, HEAD_DIM]``
    buffer): summing over a subgraph's tiles gives its pooled token without reading o back.
    Tiles past a subgraph's end write nothing; the caller zeroes the buffer when a subgraph can
    span several tiles.
    """
    part, length, start, b, h = _program_tile(Lengths, TILES_PER_PART, H, BLOCK_M)
    if start >= length:
        return
    if HAS_BIAS and BLOCK_M >= 64:
        # The key loop runs at least once. Told so, the compiler drops a path that skips it,
        # where ptxas found the last p.v wgmma's accumulator redefined while in flight and
        # serialised the wgmmas (C7515; sm_90, 2-byte dtypes, a bias, 64-row tiles: the only
        # configurations with it). Elsewhere the hint only cost registers (compile report).
        tl.assume(length > 0)
    offs_d = tl.arange(0, BLOCK_D)
    slots_m, mask_m, rows_m = _tile_rows(Index, part, start, length, M, contiguous=0, BLOCK=BLOCK_M)
    q = _load_rows(Q + b * s_qb + h * s_qh, rows_m, s_qn, mask_m, offs_d, HEAD_DIM)
    bias_off = h.to(tl.int64) * s_bh + part.to(tl.int64) * s_bp

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for k_start in range(0, length, BLOCK_N):
        slots_n, mask_n, rows_n = _tile_rows(Index, part, k_start, length, M, contiguous=0, BLOCK=BLOCK_N)
        k = _load_rows(K + b * s_kb + h * s_kh, rows_n, s_kn, mask_n, offs_d, HEAD_DIM)
        v = _load_rows(V + b * s_vb + h * s_vh, rows_n, s_vn, mask_n, offs_d, HEAD_DIM)
        s = _scores(q, k, Bias, bias_off, slots_m, slots_n, mask_m, mask_n, s_bi, qk_scale, HAS_BIAS, PRECISION)
        s = tl.where(mask_n[None, :], s, float("-inf"))
        # Slot 0 of every tile row is a real key on the first pass, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    _store_rows(O + b * s_ob + h * s_oh, rows_m, s_on, mask_m, offs_d, acc, HEAD_DIM)
    tl.store(LSE + (b * H + h) * N + rows_m, m_i + tl.math.log2(l_i), mask=mask_m)
    if pool:
        # Padding query rows of acc hold a weighted average of real v rows, not zeros: mask them.
        share = tl.sum(tl.where(mask_m[:, None], acc, 0.0), 0) / length.to(tl.float32)
        tile_row = _pooled_row(b, tl.program_id(0), h, tl.num_programs(0), H, offs_d, HEAD_DIM)
        tl.store(Pooled + tile_row, share, mask=offs_d < HEAD_DIM)


# ----------------------------------------------------------------------------- one-tile forward
@triton.jit
def _one_tile_bias(Bias, bias_off, slots, mask, s_bi, HAS_BIAS: tl.constexpr):
    """A subgraph's ``[BLOCK, BLOCK]`` bias tile in its own dtype (0.0 without a bias)."""
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(Bias + _bias_tile_offsets(bias_off, slots, slots, s_bi), mask=mask[:, None] & mask[None, :],
                       other=0.0)
    return bias


@triton.jit
def _one_tile_output(Q, K, V, O, LSE, Pooled, bias, mask, rows, offs_d, b, h, part, length,
                     s_qb, s_qn, s_qh, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh, s_ob, s_on, s_oh,
                     H, N, P, pool, qk_scale,
                     HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
    """o and lse of one (batch, head) of a one-tile subgraph, written: a plain softmax, since
    every key is in the tile; with ``pool``, the subgraph's mean output too (fp32, at
    ``Pooled[b, part, h, :]`` of a contiguous ``[B, P, H, HEAD_DIM]`` buffer)."""
    q = _load_tile(Q, _row_offsets(rows, b, h, s_qb, s_qn, s_qh), mask, offs_d, HEAD_DIM)
    k = _load_tile(K, _row_offsets(rows, b, h, s_kb, s_kn, s_kh), mask, offs_d, HEAD_DIM)
    s = _dot(q, tl.trans(k), PRECISION) * qk_scale
    if HAS_BIAS:
        s += bias.to(tl.float32) * LOG2E
    s = tl.where(mask[None, :], s, float("-inf"))
    m = tl.max(s, 1)
    p = tl.math.exp2(s - m[:, None])
    l = tl.sum(p, 1)
    v = _load_tile(V, _row_offsets(rows, b, h, s_vb, s_vn, s_vh), mask, offs_d, HEAD_DIM)
    o = _dot(p.to(v.dtype), v, PRECISION) / l[:, None]
    _store_tile(O, _row_offsets(rows, b, h, s_ob, s_on, s_oh), mask, offs_d, o, HEAD_DIM)
    tl.store(LSE + (b * H + h) * N + rows, m + tl.math.log2(l), mask=mask)
    if pool:
        # Padding query rows of o hold a weighted average of real v rows, not zeros: mask them.
        mean = tl.sum(tl.where(mask[:, None], o, 0.0), 0) / length.to(tl.float32)
        tl.store(Pooled + _pooled_row(b, part, h, P, H, offs_d, HEAD_DIM), mean, mask=offs_d < HEAD_DIM)


@triton.jit(do_not_specialize=['s_bi', 'B', 'H', 'N', 'M', 'contiguous', 'P', 'pool', 'zero'])
def attention_fwd_one_tile(Q, K, V, O, LSE, Pooled, Bias, Index, Lengths,
                           s_qb, s_qn, s_qh, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh, s_ob, s_on, s_oh,
                           s_bh, s_bp, s_bi, B, H, N, M, contiguous, P, pool, zero, qk_scale,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr,
                           HAS_BIAS: tl.constexpr, BIAS_LOOP: tl.constexpr, SHARED_BIAS: tl.constexpr,
                           PRECISION: tl.constexpr):
    """The forward of subgraphs that fit one tile (``M <= BLOCK``): `_one_tile_output`.

    Without ``BIAS_LOOP``: grid (P, B * H), one (batch, head) per program. With it, one
    program per bias tile loops over every (batch, head) that reads the tile, as the one-tile
    backward does for the bias gradient, so the bias is read once rather than once per head
    and batch: grid (P, H) looping over the batch for a per-head bias, (P, 1) looping over
    batch and heads for a ``SHARED_BIAS``.
    """
    part = tl.program_id(0)
    length = tl.load(Lengths + part)
    offs_d = tl.arange(0, BLOCK_D)
    strides = (s_qb, s_qn, s_qh, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh, s_ob, s_on, s_oh)
    h0 = tl.program_id(1) if BIAS_LOOP else tl.program_id(1) % H      # the bias head; 0 when shared
    bias_off = h0.to(tl.int64) * s_bh + part.to(tl.int64) * s_bp
    if not BIAS_LOOP:
        slots, mask, rows = _tile_rows(Index, part, 0, length, M, contiguous, BLOCK)
        bias = _one_tile_bias(Bias, bias_off, slots, mask, s_bi, HAS_BIAS)
        _one_tile_output(Q, K, V, O, LSE, Pooled, bias, mask, rows, offs_d, (tl.program_id(1) // H).to(tl.int64),
                         h0, part, length, *strides, H, N, P, pool, qk_scale, HEAD_DIM, HAS_BIAS, PRECISION)
    else:
        heads = H if SHARED_BIAS else 1
        slots = tl.arange(0, BLOCK)               # the bias is indexed by slot: no node ids needed
        bias = _one_tile_bias(Bias, bias_off, slots, slots < length, s_bi, HAS_BIAS)
        # Nothing is hoisted out of this loop: not by LLVM (``disable_licm``, see `_pair_grads`),
        # and not the rows, whose start ``i * zero`` is 0 without the compiler knowing it. Their
        # address and mask tiles are rebuilt each pass instead of holding registers for the
        # whole loop.
        for i in tl.range(0, B * heads, disable_licm=True):
            _, pass_mask, pass_rows = _tile_rows(Index, part, i * zero, length, M, contiguous, BLOCK)
            _one_tile_output(Q, K, V, O, LSE, Pooled, bias, pass_mask, pass_rows, offs_d, (i // heads).to(tl.int64),
                             h0 + i % heads, part, length, *strides, H, N, P, pool, qk_scale,
                             HEAD_DIM, HAS_BIAS, PRECISION)


# ----------------------------------------------------------------------------- backward
@triton.jit(do_not_specialize=['H', 'N'])
def attention_bwd_delta(O, DO, Delta, s_ob, s_on, s_oh, s_db, s_dn, s_dh, H, N,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    """``delta[b, h, n] = sum_d dO * O``, fp32."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    mask = rows < N
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(O + b * s_ob + h * s_oh, rows, s_on, mask, offs_d, HEAD_DIM).to(tl.float32)
    do = _load_rows(DO + b * s_db + h * s_dh, rows, s_dn, mask, offs_d, HEAD_DIM).to(tl.float32)
    tl.store(Delta + (b * H + h) * N + rows, tl.sum(o * do, 1), mask=mask)


@triton.jit(do_not_specialize=['s_bi', 'TILES_PER_PART', 'H', 'N', 'M'])
def attention_bwd_dq(Q, K, V, DO, LSE, Delta, DQ, Bias, Index, Lengths, TILES_PER_PART,
                     s_qb, s_qn, s_qh, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh, s_db, s_dn, s_dh,
                     s_gb, s_gn, s_gh, s_bh, s_bp, s_bi, H, N, M, qk_scale, scale,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
    """dQ for one query tile: ``dq_i = scale * sum_j p_ij (dp_ij - delta_i) k_j``."""
    part, length, start, b, h = _program_tile(Lengths, TILES_PER_PART, H, BLOCK_M)
    if start >= length:
        return
    offs_d = tl.arange(0, BLOCK_D)
    slots_m, mask_m, rows_m = _tile_rows(Index, part, start, length, M, contiguous=0, BLOCK=BLOCK_M)
    q = _load_rows(Q + b * s_qb + h * s_qh, rows_m, s_qn, mask_m, offs_d, HEAD_DIM)
    do = _load_rows(DO + b * s_db + h * s_dh, rows_m, s_dn, mask_m, offs_d, HEAD_DIM)
    lse = tl.load(LSE + (b * H + h) * N + rows_m, mask=mask_m, other=0.0)
    delta = tl.load(Delta + (b * H + h) * N + rows_m, mask=mask_m, other=0.0)
    bias_off = h.to(tl.int64) * s_bh + part.to(tl.int64) * s_bp

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for k_start in range(0, length, BLOCK_N):
        slots_n, mask_n, rows_n = _tile_rows(Index, part, k_start, length, M, contiguous=0, BLOCK=BLOCK_N)
        k = _load_rows(K + b * s_kb + h * s_kh, rows_n, s_kn, mask_n, offs_d, HEAD_DIM)
        v = _load_rows(V + b * s_vb + h * s_vh, rows_n, s_vn, mask_n, offs_d, HEAD_DIM)
        _, ds = _probs_and_grad(q, k, v, do, lse, delta, Bias, bias_off, slots_m, slots_n, mask_m, mask_n, s_bi,
                                qk_scale, HAS_BIAS, PRECISION)
        dq += _dot(ds.to(k.dtype), k, PRECISION)
    _store_rows(DQ + b * s_gb + h * s_gh, rows_m, s_gn, mask_m, offs_d, dq * scale, HEAD_DIM)


@triton.jit(do_not_specialize=['s_bi', 'TILES_PER_PART', 'H', 'N', 'M'])
def attention_bwd_dkdv(Q, K, V, DO, LSE, Delta, DK, DV, Bias, Index, Lengths, TILES_PER_PART,
                       s_qb, s_qn, s_qh, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh, s_db, s_dn, s_dh,
                       s_gb, s_gn, s_gh, s_bh, s_bp, s_bi, H, N, M, qk_scale, scale,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
    """dK, dV for one key tile: ``dv_j = sum_i p_ij do_i``, ``dk_j = scale * sum_i ds_ij q_i``.

    Each key row is written by exactly one program: no atomics. dk and dv are written with the
    gradient strides s_g* (contiguous buffers, whatever the strides of k and v).
    """
    part, length, start, b, h = _program_tile(Lengths, TILES_PER_PART, H, BLOCK_N)
    if start >= length:
        return
    offs_d = tl.arange(0, BLOCK_D)
    slots_n, mask_n, rows_n = _tile_rows(Index, part, start, length, M, contiguous=0, BLOCK=BLOCK_N)
    k = _load_rows(K + b * s_kb + h * s_kh, rows_n, s_kn, mask_n, offs_d, HEAD_DIM)
    v = _load_rows(V + b * s_vb + h * s_vh, rows_n, s_vn, mask_n, offs_d, HEAD_DIM)
    bias_off = h.to(tl.int64) * s_bh + part.to(tl.int64) * s_bp

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for q_start in range(0, length, BLOCK_M):
        slots_m, mask_m, rows_m = _tile_rows(Index, part, q_start, length, M, contiguous=0, BLOCK=BLOCK_M)
        q = _load_rows(Q + b * s_qb + h * s_qh, rows_m, s_qn, mask_m, offs_d, HEAD_DIM)
        do = _load_rows(DO + b * s_db + h * s_dh, rows_m, s_dn, mask_m, offs_d, HEAD_DIM)
        lse = tl.load(LSE + (b * H + h) * N + rows_m, mask=mask_m, other=0.0)
        delta = tl.load(Delta + (b * H + h) * N + rows_m, mask=mask_m, other=0.0)
        p, ds = _probs_and_grad(q, k, v, do, lse, delta, Bias, bias_off, slots_m, slots_n, mask_m, mask_n, s_bi,
                                qk_scale, HAS_BIAS, PRECISION)
        dv += _dot(tl.trans(p).to(do.dtype), do, PRECISION)
        dk += _dot(tl.trans(ds).to(q.dtype), q, PRECISION)
    _store_rows(DK + b * s_gb + h * s_gh, rows_n, s_gn, mask_n, offs_d, dk * scale, HEAD_DIM)
    _store_rows(DV + b * s_gb + h * s_gh, rows_n, s_gn, mask_n, offs_d, dv, HEAD_DIM)


@triton.jit(do_not_specialize=['s_bi', 'Q_TILES', 'K_TILES', 'B', 'H', 'N', 'M', 'HEADS_SUMMED'])
def attention_bwd_dbias(Q, K, V, DO, LSE, Delta, DBias, Bias, Index, Lengths, Q_TILES, K_TILES,
                        s_qb, s_qn, s_qh, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh, s_db, s_dn, s_dh,
                        s_bh, s_bp, s_bi, B, H, N, M, HEADS_SUMMED, qk_scale,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """dBias for one (query tile, key tile) pair of a subgraph: ``sum_{b[,h]} ds``.

    The bias is broadcast over the batch, and over heads when one bias is shared by all heads
    (``HEADS_SUMMED = H``; a per-head bias has ``HEADS_SUMMED = 1``), so its gradient sums ds
    over them. One program owns each bias tile and loops over the batch (and heads) in a fixed
    order: deterministic, no atomics, and no B x H-sized buffer. Grid: (P x Q_TILES x K_TILES,
    heads of the bias). DBias has Bias's layout.
    """
    part = tl.program_id(0) // (Q_TILES * K_TILES)
    pair = tl.program_id(0) % (Q_TILES * K_TILES)
    length = tl.load(Lengths + part)
    q_start = (pair // K_TILES) * BLOCK_M
    k_start = (pair % K_TILES) * BLOCK_N
    if (q_start >= length) | (k_start >= length):
        return
    hb = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    slots_m, mask_m, rows_m = _tile_rows(Index, part, q_start, length, M, contiguous=0, BLOCK=BLOCK_M)
    slots_n, mask_n, rows_n = _tile_rows(Index, part, k_start, length, M, contiguous=0, BLOCK=BLOCK_N)
    bias_off = hb.to(tl.int64) * s_bh + part.to(tl.int64) * s_bp
    dbias = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for i in range(0, B * HEADS_SUMMED):
        b = (i // HEADS_SUMMED).to(tl.int64)
        h = (hb + i % HEADS_SUMMED).to(tl.int64)     # shared: hb = 0, h runs over heads; per head: h = hb
        q = _load_rows(Q + b * s_qb + h * s_qh, rows_m, s_qn, mask_m, offs_d, HEAD_DIM)
        do = _load_rows(DO + b * s_db + h * s_dh, rows_m, s_dn, mask_m, offs_d, HEAD_DIM)
        k = _load_rows(K + b * s_kb + h * s_kh, rows_n, s_kn, mask_n, offs_d, HEAD_DIM)
        v = _load_rows(V + b * s_vb + h * s_vh, rows_n, s_vn, mask_n, offs_d, HEAD_DIM)
        lse = tl.load(LSE + (b * H + h) * N + rows_m, mask=mask_m, other=0.0)
        delta = tl.load(Delta + (b * H + h) * N + rows_m, mask=mask_m, other=0.0)
        _, ds = _probs_and_grad(q, k, v, do, lse, delta, Bias, bias_off, slots_m, slots_n, mask_m, mask_n, s_bi,
                                qk_scale, True, PRECISION)
        dbias += ds
    ptrs = DBias + _bias_tile_offsets(bias_off, slots_m, slots_n, s_bi)
    tl.store(ptrs, dbias.to(DBias.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ----------------------------------------------------------------------------- one-tile backward
@triton.jit
def _one_tile_grads(Q, K, V, DO, DZ, LSE, DQ, DK, DV, bias, mask, rows, offs_d, b, h, part, length,
                    s_qb, s_qn, s_qh, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh, s_db, s_dn, s_dh,
                    s_gb, s_gn, s_gh, H, N, P, qk_scale, scale,
                    HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, POOLED: tl.constexpr, PRECISION: tl.constexpr):
    """dq, dk, dv of one (batch, head) of a one-tile subgraph, written; returns ds ``[BLOCK, BLOCK]``
    fp32. ``mask``, ``rows``: ``[BLOCK]`` slots in use and their node ids (int64); ``bias``: the
    subgraph's ``[BLOCK, BLOCK]`` bias tile in its dtype, if HAS_BIAS. With ``POOLED`` the
    forward also returned z, the subgraph means of o, and ``DZ`` (a contiguous
    ``[B, P, H, HEAD_DIM]``) is z's gradient: o's whole gradient is then
    ``dO[i] + dz[part] / length``, taken into dv and dp here. Each operand is loaded just before
    its first use, so fewer tiles are live at once."""
    # Row offsets include this pair's (batch, head) offset: a program looping over pairs then
    # builds each tile's addresses inside the loop instead of keeping seven [BLOCK, BLOCK_D]
    # address tiles, hoisted out of it, in registers.
    q = _load_tile(Q, _row_offsets(rows, b, h, s_qb, s_qn, s_qh), mask, offs_d, HEAD_DIM)
    k = _load_tile(K, _row_offsets(rows, b, h, s_kb, s_kn, s_kh), mask, offs_d, HEAD_DIM)
    # lse = inf on padding rows makes their p 0, so only padding columns need a mask.
    lse = tl.load(LSE + (b * H + h) * N + rows, mask=mask, other=float("inf"))
    s = _dot(q, tl.trans(k), PRECISION) * qk_scale
    if HAS_BIAS:
        s += bias.to(tl.float32) * LOG2E
    p = tl.where(mask[None, :], tl.math.exp2(s - lse[:, None]), 0.0)
    grad_rows = _row_offsets(rows, b, h, s_gb, s_gn, s_gh)          # dq, dk and dv share one layout
    do = _load_tile(DO, _row_offsets(rows, b, h, s_db, s_dn, s_dh), mask, offs_d, HEAD_DIM)
    dv = _dot(tl.trans(p).to(do.dtype), do, PRECISION)
    if POOLED:
        # o's whole gradient is dO + 1 share^T, share = dz[part] / length (the same for every
        # row). Its terms join the products, p^T 1 share^T and 1 share^T v^T, rather than the dO
        # tile: added to the tile before the dots, it took 20 more registers (compile report).
        share = tl.load(DZ + _pooled_row(b, part, h, P, H, offs_d, HEAD_DIM), mask=offs_d < HEAD_DIM,
                        other=0.0).to(tl.float32) / length.to(tl.float32)
        dv += tl.sum(p, 0)[:, None] * share[None, :]
    _store_tile(DV, grad_rows, mask, offs_d, dv, HEAD_DIM)
    v = _load_tile(V, _row_offsets(rows, b, h, s_vb, s_vn, s_vh), mask, offs_d, HEAD_DIM)
    dp = _dot(do, tl.trans(v), PRECISION)
    if POOLED:
        dp += tl.sum(v.to(tl.float32) * share[None, :], 1)[None, :]
    ds = p * (dp - tl.sum(p * dp, 1)[:, None])
    dq = _dot(ds.to(k.dtype), k, PRECISION)
    _store_tile(DQ, grad_rows, mask, offs_d, dq * scale, HEAD_DIM)
    dk = _dot(tl.trans(ds).to(q.dtype), q, PRECISION)
    _store_tile(DK, grad_rows, mask, offs_d, dk * scale, HEAD_DIM)
    return ds


@triton.jit
def _pair_grads(Q, K, V, DO, DZ, LSE, DQ, DK, DV, Bias, Index, part, start, length, M, contiguous, bias_off, b, h,
                s_qb, s_qn, s_qh, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh, s_db, s_dn, s_dh,
                s_gb, s_gn, s_gh, s_bi, H, N, P, qk_scale, scale,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr,
                HAS_BIAS: tl.constexpr, POOLED: tl.constexpr, PRECISION: tl.constexpr):
    """`_one_tile_grads` of (batch ``b``, head ``h``) of subgraph ``part``, its rows and bias
    tile gathered here. ``start`` is the first slot, 0, passed in so that a caller looping over
    pairs can hide that it is the same every pass. Returns ds.

    Inside the bias-gradient loop of `attention_bwd_one_tile` this body takes 163-165
    registers, no spill, three programs of 128 threads per SM (64 rows, fp16 and bf16, d = 64,
    sm_90, Triton 3.9; compiler facts, bench/results/static/kernels.md), near the 116-118 of
    one pair without the loop, because of two things; with neither it took 247-255 and two
    programs per SM:

    * the loop may not be hoisted from (``tl.range(..., disable_licm=True)``): LLVM moved every
      per-thread constant of the body (lane offsets of each shared-memory layout conversion,
      element coordinates of the masks) out of it, holding registers through the whole loop;
    * that launch turns FMA contraction off (``enable_fp_fusion=False``, `triton_backend`):
      contracted, ``dbias += p * (dp - delta)`` became one FMA placed after the dq and dk
      products, so p and ``dp - delta`` (two fp32 tiles) stayed live through them where ds
      alone would. dq before dk saves a few more (per-head bias: 178 -> 164).

    Triton 3.6 compiles the same source to 196-219 registers, two programs per SM. (A form
    that called this body as a function the compiler may not inline took 158-161 registers,
    but ptxas serialised its wgmma instructions; it went once the inlined form fit.)
    """
    slots, mask, rows = _tile_rows(Index, part, start, length, M, contiguous, BLOCK)
    bias = _one_tile_bias(Bias, bias_off, slots, mask, s_bi, HAS_BIAS)
    return _one_tile_grads(Q, K, V, DO, DZ, LSE, DQ, DK, DV, bias, mask, rows, tl.arange(0, BLOCK_D), b, h, part,
                           length, s_qb, s_qn, s_qh, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh, s_db, s_dn, s_dh,
                           s_gb, s_gn, s_gh, H, N, P, qk_scale, scale, HEAD_DIM, HAS_BIAS, POOLED, PRECISION)


@triton.jit(do_not_specialize=['s_bi', 'B', 'H', 'N', 'M', 'P', 'contiguous', 'zero'])
def attention_bwd_one_tile(Q, K, V, DO, DZ, LSE, DQ, DK, DV, DBias, Bias, Index, Lengths,
                           s_qb, s_qn, s_qh, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh, s_db, s_dn, s_dh,
                           s_gb, s_gn, s_gh, s_bh, s_bp, s_bi, B, H, N, M, P, contiguous, zero, qk_scale, scale,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr,
                           HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, SHARED_BIAS: tl.constexpr,
                           POOLED: tl.constexpr, PRECISION: tl.constexpr):
    """The whole backward of subgraphs that fit one tile (``M <= BLOCK``), in one launch.

    A subgraph's queries and keys are the same rows, so one program loads its q, k, v, dO and
    lse once and computes the probabilities and their gradient once for both sides
    (`_one_tile_grads`): ``dv = p^T dO``, ``dp = dO v^T``, ``delta_i = sum_j p_ij dp_ij``
    (equal to ``rowsum(dO * O)``, without reading O), ``ds = p (dp - delta)``,
    ``dq = scale ds k``, ``dk = scale ds^T q``. Every row of dq, dk, dv is written once. With
    ``POOLED`` (not with ``BIAS_GRAD``), z's gradient ``DZ`` joins dO's in `_one_tile_grads`: no
    pass over the rows adds it first. In the bias-gradient loop it took 183-185 registers, two
    programs per SM on sm_90 where three fit without it (compiler facts, d = 64, 64 rows): that
    launch takes dO with the share added, until a GPU times the two against each other.

    Without ``BIAS_GRAD``: grid (P, B * H), one (batch, head) per program. With it, the bias
    gradient sums ds over what the bias is broadcast over, so one program owns each bias tile
    and loops over those pairs in a fixed order: grid (P, H) looping over the batch for a
    per-head bias, (P, 1) looping over batch and heads for a ``SHARED_BIAS``. Deterministic and
    without atomics; q, k, v, dO and lse are read once, the bias tile once per pair. The
    loop's register count, and the launch options it needs: `_pair_grads`. Every entry of the
    ``[M, M]`` tile is written, those past the subgraph's length as the 0 they sum to (p is 0
    there), so DBias needs no zero fill first.
    """
    tl.static_assert(not (POOLED and BIAS_GRAD), "the bias-gradient loop takes dO with z's share added")
    part = tl.program_id(0)
    length = tl.load(Lengths + part)
    strides = (s_qb, s_qn, s_qh, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh, s_db, s_dn, s_dh, s_gb, s_gn, s_gh, s_bi)
    h0 = tl.program_id(1) if BIAS_GRAD else tl.program_id(1) % H      # the bias head; 0 when shared
    bias_off = h0.to(tl.int64) * s_bh + part.to(tl.int64) * s_bp
    if not BIAS_GRAD:
        _pair_grads(Q, K, V, DO, DZ, LSE, DQ, DK, DV, Bias, Index, part, 0, length, M, contiguous, bias_off,
                    (tl.program_id(1) // H).to(tl.int64), h0, *strides, H, N, P, qk_scale, scale,
                    HEAD_DIM, BLOCK_D, BLOCK, HAS_BIAS, POOLED, PRECISION)
    else:
        heads = H if SHARED_BIAS else 1
        dbias = tl.zeros([BLOCK, BLOCK], tl.float32)
        for i in tl.range(0, B * heads, disable_licm=True):     # no hoisting: see `_pair_grads`
            # Rows and bias are rebuilt each pass (``i * zero`` is 0, but the compiler cannot
            # know it): hoisted out of the loop, their [BLOCK, BLOCK] address and mask tiles
            # would stay in registers for the whole loop and spill. So the bias tile is read
            # once per pair here (from cache after the first), not once per program.
            b, h = (i // heads).to(tl.int64), h0 + i % heads
            dbias += _pair_grads(Q, K, V, DO, DZ, LSE, DQ, DK, DV, Bias, Index, part, i * zero, length, M,
                                 contiguous, bias_off, b, h, *strides, H, N, P, qk_scale, scale,
                                 HEAD_DIM, BLOCK_D, BLOCK, HAS_BIAS, POOLED, PRECISION)
        slots = tl.arange(0, BLOCK)
        in_tile = slots < M          # the whole [M, M] tile: zeros past the length included
        tl.store(DBias + _bias_tile_offsets(bias_off, slots, slots, s_bi), dbias.to(DBias.dtype.element_ty),
                 mask=in_tile[:, None] & in_tile[None, :])


# ----------------------------------------------------------------------------- segment mean
@triton.jit(do_not_specialize=['C', 'M', 'contiguous'])
def segment_mean_fwd(X, Z, Index, Lengths, s_xb, s_xn, s_zb, s_zp, C, M, contiguous,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """``z[b, p, c] = mean_{i in S_p} x[b, i, c]``. Grid: (P, B, channel blocks)."""
    part = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    length = tl.load(Lengths + part)
    acc = tl.zeros([BLOCK_C], tl.float32)
    for start in range(0, length, BLOCK_R):
        _, mask_r, rows = _tile_rows(Index, part, start, length, M, contiguous, BLOCK_R)
        x = tl.load(X + b * s_xb + rows[:, None] * s_xn + offs_c[None, :],
                    mask=mask_r[:, None] & mask_c[None, :], other=0.0)
        acc += tl.sum(x.to(tl.float32), 0)
    z = acc / length.to(tl.float32)
    tl.store(Z + b * s_zb + part.to(tl.int64) * s_zp + offs_c, z.to(Z.dtype.element_ty), mask=mask_c)


@triton.jit(do_not_specialize=['N', 'C'])
def segment_mean_bwd(DZ, DX, Assignment, Lengths, s_zb, s_zp, s_xb, s_xn, N, C,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """``dx[b, i, c] = dz[b, part(i), c] / n_part(i)``. Grid: (node blocks, B, channel blocks)."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_r = rows < N
    mask = mask_r[:, None] & (offs_c[None, :] < C)
    part = tl.load(Assignment + rows, mask=mask_r, other=0)
    inv_n = 1.0 / tl.load(Lengths + part, mask=mask_r, other=1).to(tl.float32)
    dz = tl.load(DZ + b * s_zb + part[:, None] * s_zp + offs_c[None, :], mask=mask, other=0.0)
    dx = dz.to(tl.float32) * inv_n[:, None]
    tl.store(DX + b * s_xb + rows[:, None] * s_xn + offs_c[None, :], dx.to(DX.dtype.element_ty), mask=mask)
