// Subgraph attention in CUDA C++: forward (online softmax) and backward (dQ, dK/dV, dBias).
//
// A block handles one (batch, head) and one tile of TILE slots of one subgraph. Grid axis x
// runs over parts x tiles-per-part; blocks whose tile starts past the subgraph's end return.
// Tiles of q, k, v (and dO) are gathered through `index` into shared memory as fp32, so every
// dtype shares one arithmetic path. Each output row is written by exactly one block, and the
// bias gradient has its own kernel that loops over the batch (and heads) in a fixed order:
// no atomics, deterministic results.
#include <cmath>

#include "dtype.cuh"

namespace sba {
namespace {

constexpr int TILE = 32;      // query slots and key slots per tile
constexpr int THREADS = 128;

// Tile geometry of one block: which subgraph, which slots, which (batch, head).
struct TileCoord {
  int part, start, length, b, h;
};

__device__ inline bool locate(const AttentionProblem& p, int tiles_per_part, TileCoord& t) {
  t.part = blockIdx.x / tiles_per_part;
  t.start = (blockIdx.x % tiles_per_part) * TILE;
  t.length = p.lengths[t.part];
  t.b = blockIdx.y / p.heads;
  t.h = blockIdx.y % p.heads;
  return t.start < t.length;
}

// Gather rows start..start+TILE of subgraph `part` (zeros past its end) into dst[TILE][ld].
template <typename T>
__device__ void load_tile(const T* base, RowStrides s, const AttentionProblem& p, const TileCoord& t, int start,
                          int ld, float* dst) {
  const int d = p.head_dim;
  const int32_t* row_ids = p.index + static_cast<int64_t>(t.part) * p.max_size;
  for (int e = threadIdx.x; e < TILE * d; e += blockDim.x) {
    const int i = e / d, c = e % d, slot = start + i;
    float value = 0.f;
    if (slot < t.length) {
      const int64_t node = row_ids[slot];
      value = to_f(base[t.b * s.batch + node * s.row + t.h * s.head + c]);
    }
    dst[i * ld + c] = value;
  }
}

// Per-row fp32 values (lse, delta) of a [B, H, N] array for the tile's slots (0 past the end).
__device__ void load_row_values(const float* src, const AttentionProblem& p, const TileCoord& t, int start,
                                float* dst) {
  const int32_t* row_ids = p.index + static_cast<int64_t>(t.part) * p.max_size;
  const int64_t base = (static_cast<int64_t>(t.b) * p.heads + t.h) * p.nodes;
  for (int i = threadIdx.x; i < TILE; i += blockDim.x)
    dst[i] = start + i < t.length ? src[base + row_ids[start + i]] : 0.f;
}

template <typename T>
__device__ void store_tile(T* base, RowStrides s, const AttentionProblem& p, const TileCoord& t, int ld,
                           const float* src, const float* row_scale) {
  const int d = p.head_dim;
  const int32_t* row_ids = p.index + static_cast<int64_t>(t.part) * p.max_size;
  for (int e = threadIdx.x; e < TILE * d; e += blockDim.x) {
    const int i = e / d, c = e % d, slot = t.start + i;
    if (slot < t.length) {
      const int64_t node = row_ids[slot];
      const float v = src[i * ld + c] * (row_scale ? row_scale[i] : 1.f);
      base[t.b * s.batch + node * s.row + t.h * s.head + c] = from_f<T>(v);
    }
  }
}

// scale * q_i . k_j + bias[h, part, q_slot, k_slot]; the bias is fp32 whatever the inputs' dtype
__device__ inline float score(const float* Qs, const float* Ks, int i, int j, int ld, const AttentionProblem& p,
                              const float* bias_tile, int q_slot, int k_slot) {
  float s = 0.f;
  for (int c = 0; c < p.head_dim; ++c) s += Qs[i * ld + c] * Ks[j * ld + c];
  s *= p.scale;
  if (bias_tile) s += bias_tile[static_cast<int64_t>(q_slot) * p.max_size + k_slot];
  return s;
}

__device__ inline const float* bias_for(const AttentionProblem& p, int bias_head, int part) {
  if (!p.bias) return nullptr;
  const int64_t mm = static_cast<int64_t>(p.max_size) * p.max_size;
  return p.bias + (static_cast<int64_t>(bias_head) * p.parts + part) * mm;
}

// ------------------------------------------------------------------------------ forward
template <typename T>
__global__ void __launch_bounds__(THREADS) forward_kernel(AttentionProblem p, int tiles, const T* q, RowStrides sq,
                                                          const T* k, RowStrides sk, const T* v, RowStrides sv,
                                                          T* o, RowStrides so, float* lse) {
  TileCoord t;
  if (!locate(p, tiles, t)) return;
  float* smem = shared_floats();
  const int ld = p.head_dim + 1;  // +1: rows land in different banks
  float *Qs = smem, *Ks = Qs + TILE * ld, *Vs = Ks + TILE * ld, *Os = Vs + TILE * ld;
  float *S = Os + TILE * ld, *m = S + TILE * (TILE + 1), *l = m + TILE, *alpha = l + TILE;
  const float* bias = bias_for(p, p.bias_heads == 1 ? 0 : t.h, t.part);

  load_tile(q, sq, p, t, t.start, ld, Qs);
  for (int e = threadIdx.x; e < TILE * ld; e += blockDim.x) Os[e] = 0.f;
  for (int i = threadIdx.x; i < TILE; i += blockDim.x) {
    m[i] = -INFINITY;
    l[i] = 0.f;
  }
  for (int k0 = 0; k0 < t.length; k0 += TILE) {
    load_tile(k, sk, p, t, k0, ld, Ks);
    load_tile(v, sv, p, t, k0, ld, Vs);
    __syncthreads();
    for (int e = threadIdx.x; e < TILE * TILE; e += blockDim.x) {
      const int i = e / TILE, j = e % TILE;
      const bool real = k0 + j < t.length;
      const int q_slot = t.start + i < t.length ? t.start + i : t.start;  // padding query rows: any real slot
      S[i * (TILE + 1) + j] = real ? score(Qs, Ks, i, j, ld, p, bias, q_slot, k0 + j) : -INFINITY;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < TILE; i += blockDim.x) {  // online softmax, one row per thread
      float* row = S + i * (TILE + 1);
      float mx = m[i];
      for (int j = 0; j < TILE; ++j) mx = fmaxf(mx, row[j]);  // finite: slot k0 is real
      float sum = 0.f;
      for (int j = 0; j < TILE; ++j) {
        row[j] = expf(row[j] - mx);
        sum += row[j];
      }
      alpha[i] = expf(m[i] - mx);
      l[i] = l[i] * alpha[i] + sum;
      m[i] = mx;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < TILE * p.head_dim; e += blockDim.x) {
      const int i = e / p.head_dim, c = e % p.head_dim;
      float acc = Os[i * ld + c] * alpha[i];
      for (int j = 0; j < TILE; ++j) acc += S[i * (TILE + 1) + j] * Vs[j * ld + c];
      Os[i * ld + c] = acc;
    }
    __syncthreads();
  }
  for (int i = threadIdx.x; i < TILE; i += blockDim.x) alpha[i] = 1.f / l[i];
  __syncthreads();
  store_tile(o, so, p, t, ld, Os, alpha);
  const int32_t* row_ids = p.index + static_cast<int64_t>(t.part) * p.max_size;
  const int64_t base = (static_cast<int64_t>(t.b) * p.heads + t.h) * p.nodes;
  for (int i = threadIdx.x; i < TILE; i += blockDim.x)
    if (t.start + i < t.length) lse[base + row_ids[t.start + i]] = m[i] + logf(l[i]);
}

// ------------------------------------------------------------------------------ backward
template <typename T>
__global__ void delta_kernel(AttentionProblem p, const T* o, RowStrides so, const T* dout, RowStrides sdo,
                             float* delta) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;  // over B*N*H
  if (row >= static_cast<int64_t>(p.batch) * p.nodes * p.heads) return;
  const int h = row % p.heads;
  const int64_t n = (row / p.heads) % p.nodes;
  const int b = row / (static_cast<int64_t>(p.heads) * p.nodes);
  const T* orow = o + b * so.batch + n * so.row + h * so.head;
  const T* grow = dout + b * sdo.batch + n * sdo.row + h * sdo.head;
  float acc = 0.f;
  for (int c = 0; c < p.head_dim; ++c) acc += to_f(orow[c]) * to_f(grow[c]);
  delta[(static_cast<int64_t>(b) * p.heads + h) * p.nodes + n] = acc;
}

// ds_ij = p_ij (dO_i . v_j - delta_i), with p_ij = exp(s_ij - lse_i); 0 off the subgraph.
__device__ inline float score_grad(const float* Qs, const float* dOs, const float* Ks, const float* Vs, int i, int j,
                                   int ld, const AttentionProblem& p, const float* bias, int q_slot, int k_slot,
                                   int length, const float* lse, const float* delta, float* prob) {
  if (q_slot >= length || k_slot >= length) {
    if (prob) *prob = 0.f;
    return 0.f;
  }
  const float pr = expf(score(Qs, Ks, i, j, ld, p, bias, q_slot, k_slot) - lse[i]);
  float dp = 0.f;
  for (int c = 0; c < p.head_dim; ++c) dp += dOs[i * ld + c] * Vs[j * ld + c];
  if (prob) *prob = pr;
  return pr * (dp - delta[i]);
}

template <typename T>
__global__ void __launch_bounds__(THREADS) dq_kernel(AttentionProblem p, int tiles, const T* q, RowStrides sq,
                                                     const T* k, RowStrides sk, const T* v, RowStrides sv,
                                                     const T* dout, RowStrides sdo, const float* lse,
                                                     const float* delta, T* dq, RowStrides sg) {
  TileCoord t;
  if (!locate(p, tiles, t)) return;
  float* smem = shared_floats();
  const int ld = p.head_dim + 1;
  float *Qs = smem, *dOs = Qs + TILE * ld, *Ks = dOs + TILE * ld, *Vs = Ks + TILE * ld, *dQs = Vs + TILE * ld;
  float *DS = dQs + TILE * ld, *lse_s = DS + TILE * (TILE + 1), *delta_s = lse_s + TILE;
  const float* bias = bias_for(p, p.bias_heads == 1 ? 0 : t.h, t.part);
  load_tile(q, sq, p, t, t.start, ld, Qs);
  load_tile(dout, sdo, p, t, t.start, ld, dOs);
  load_row_values(lse, p, t, t.start, lse_s);
  load_row_values(delta, p, t, t.start, delta_s);
  for (int e = threadIdx.x; e < TILE * ld; e += blockDim.x) dQs[e] = 0.f;
  for (int k0 = 0; k0 < t.length; k0 += TILE) {
    load_tile(k, sk, p, t, k0, ld, Ks);
    load_tile(v, sv, p, t, k0, ld, Vs);
    __syncthreads();
    for (int e = threadIdx.x; e < TILE * TILE; e += blockDim.x) {
      const int i = e / TILE, j = e % TILE;
      DS[i * (TILE + 1) + j] = score_grad(Qs, dOs, Ks, Vs, i, j, ld, p, bias, t.start + i, k0 + j, t.length, lse_s,
                                          delta_s, static_cast<float*>(nullptr));
    }
    __syncthreads();
    for (int e = threadIdx.x; e < TILE * p.head_dim; e += blockDim.x) {
      const int i = e / p.head_dim, c = e % p.head_dim;
      float acc = 0.f;
      for (int j = 0; j < TILE; ++j) acc += DS[i * (TILE + 1) + j] * Ks[j * ld + c];
      dQs[i * ld + c] += p.scale * acc;
    }
    __syncthreads();
  }
  store_tile(dq, sg, p, t, ld, dQs, static_cast<const float*>(nullptr));
}

template <typename T>
__global__ void __launch_bounds__(THREADS) dkdv_kernel(AttentionProblem p, int tiles, const T* q, RowStrides sq,
                                                       const T* k, RowStrides sk, const T* v, RowStrides sv,
                                                       const T* dout, RowStrides sdo, const float* lse,
                                                       const float* delta, T* dk, T* dv, RowStrides sg) {
  TileCoord t;
  if (!locate(p, tiles, t)) return;
  float* smem = shared_floats();
  const int ld = p.head_dim + 1;
  float *Ks = smem, *Vs = Ks + TILE * ld, *Qs = Vs + TILE * ld, *dOs = Qs + TILE * ld, *dKs = dOs + TILE * ld;
  float *dVs = dKs + TILE * ld, *P = dVs + TILE * ld, *DS = P + TILE * (TILE + 1), *lse_s = DS + TILE * (TILE + 1);
  float* delta_s = lse_s + TILE;
  const float* bias = bias_for(p, p.bias_heads == 1 ? 0 : t.h, t.part);
  load_tile(k, sk, p, t, t.start, ld, Ks);
  load_tile(v, sv, p, t, t.start, ld, Vs);
  for (int e = threadIdx.x; e < TILE * ld; e += blockDim.x) dKs[e] = dVs[e] = 0.f;
  for (int q0 = 0; q0 < t.length; q0 += TILE) {
    load_tile(q, sq, p, t, q0, ld, Qs);
    load_tile(dout, sdo, p, t, q0, ld, dOs);
    load_row_values(lse, p, t, q0, lse_s);
    load_row_values(delta, p, t, q0, delta_s);
    __syncthreads();
    for (int e = threadIdx.x; e < TILE * TILE; e += blockDim.x) {
      const int i = e / TILE, j = e % TILE;  // i: query row of this q tile, j: key row of ours
      float pr;
      DS[i * (TILE + 1) + j] =
          score_grad(Qs, dOs, Ks, Vs, i, j, ld, p, bias, q0 + i, t.start + j, t.length, lse_s, delta_s, &pr);
      P[i * (TILE + 1) + j] = pr;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < TILE * p.head_dim; e += blockDim.x) {
      const int j = e / p.head_dim, c = e % p.head_dim;
      float acc_v = 0.f, acc_k = 0.f;
      for (int i = 0; i < TILE; ++i) {
        acc_v += P[i * (TILE + 1) + j] * dOs[i * ld + c];
        acc_k += DS[i * (TILE + 1) + j] * Qs[i * ld + c];
      }
      dVs[j * ld + c] += acc_v;
      dKs[j * ld + c] += p.scale * acc_k;
    }
    __syncthreads();
  }
  store_tile(dk, sg, p, t, ld, dKs, static_cast<const float*>(nullptr));
  store_tile(dv, sg, p, t, ld, dVs, static_cast<const float*>(nullptr));
}

// Grid: (parts x q tiles x k tiles, bias heads). Sums ds over the batch (and heads if shared).
template <typename T>
__global__ void __launch_bounds__(THREADS) dbias_kernel(AttentionProblem p, int tiles, const T* q, RowStrides sq,
                                                        const T* k, RowStrides sk, const T* v, RowStrides sv,
                                                        const T* dout, RowStrides sdo, const float* lse,
                                                        const float* delta, float* dbias) {
  const int pairs = tiles * tiles;
  const int part = blockIdx.x / pairs;
  const int q0 = (blockIdx.x % pairs) / tiles * TILE, k0 = (blockIdx.x % pairs) % tiles * TILE;
  const int length = p.lengths[part];
  if (q0 >= length || k0 >= length) return;
  const int bias_head = blockIdx.y;
  float* smem = shared_floats();
  const int ld = p.head_dim + 1;
  float *Qs = smem, *dOs = Qs + TILE * ld, *Ks = dOs + TILE * ld, *Vs = Ks + TILE * ld, *acc = Vs + TILE * ld;
  float *lse_s = acc + TILE * (TILE + 1), *delta_s = lse_s + TILE;
  const float* bias = bias_for(p, bias_head, part);
  for (int e = threadIdx.x; e < TILE * (TILE + 1); e += blockDim.x) acc[e] = 0.f;
  const int heads_summed = p.bias_heads == 1 ? p.heads : 1;
  for (int r = 0; r < p.batch * heads_summed; ++r) {
    TileCoord t{part, q0, length, r / heads_summed, p.bias_heads == 1 ? r % heads_summed : bias_head};
    __syncthreads();  // the previous round's tiles are no longer read
    load_tile(q, sq, p, t, q0, ld, Qs);
    load_tile(dout, sdo, p, t, q0, ld, dOs);
    load_tile(k, sk, p, t, k0, ld, Ks);
    load_tile(v, sv, p, t, k0, ld, Vs);
    load_row_values(lse, p, t, q0, lse_s);
    load_row_values(delta, p, t, q0, delta_s);
    __syncthreads();
    for (int e = threadIdx.x; e < TILE * TILE; e += blockDim.x) {
      const int i = e / TILE, j = e % TILE;
      acc[i * (TILE + 1) + j] += score_grad(Qs, dOs, Ks, Vs, i, j, ld, p, bias, q0 + i, k0 + j, length, lse_s,
                                            delta_s, static_cast<float*>(nullptr));
    }
  }
  __syncthreads();
  const int64_t mm = static_cast<int64_t>(p.max_size) * p.max_size;
  float* out = dbias + (static_cast<int64_t>(bias_head) * p.parts + part) * mm;
  for (int e = threadIdx.x; e < TILE * TILE; e += blockDim.x) {
    const int i = e / TILE, j = e % TILE;
    if (q0 + i < length && k0 + j < length)
      out[static_cast<int64_t>(q0 + i) * p.max_size + k0 + j] = acc[i * (TILE + 1) + j];
  }
}

// ------------------------------------------------------------------------------ launches
size_t tile_floats(const AttentionProblem& p, int row_tiles, int score_tiles, int row_vectors) {
  return static_cast<size_t>(row_tiles) * TILE * (p.head_dim + 1) + static_cast<size_t>(score_tiles) * TILE * (TILE + 1) +
         static_cast<size_t>(row_vectors) * TILE;
}

// Launch `kernel` with `floats` of dynamic shared memory (raising the 48 KB default cap).
template <typename Kernel, typename... Args>
cudaError_t launch(Kernel kernel, dim3 grid, size_t floats, cudaStream_t stream, Args... args) {
  const size_t bytes = floats * sizeof(float);
  if (cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             static_cast<int>(bytes));
      err != cudaSuccess)
    return err;
  kernel<<<grid, THREADS, bytes, stream>>>(args...);
  return cudaGetLastError();
}

int tiles_per_part(const AttentionProblem& p) { return (p.max_size + TILE - 1) / TILE; }

}  // namespace

cudaError_t attention_forward(const AttentionProblem& p, const void* q, RowStrides sq, const void* k, RowStrides sk,
                              const void* v, RowStrides sv, void* o, RowStrides so, float* lse) {
  const int tiles = tiles_per_part(p);
  const dim3 grid(p.parts * tiles, p.batch * p.heads);
  return with_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch(forward_kernel<T>, grid, tile_floats(p, 4, 1, 3), p.stream, p, tiles, static_cast<const T*>(q),
                  sq, static_cast<const T*>(k), sk, static_cast<const T*>(v), sv, static_cast<T*>(o), so, lse);
  });
}

cudaError_t attention_backward(const AttentionProblem& p, const void* q, RowStrides sq, const void* k,
                               RowStrides sk, const void* v, RowStrides sv, const void* o, RowStrides so,
                               const void* dout, RowStrides sdo, const float* lse, float* delta, void* dq,
                               void* dk, void* dv, float* dbias) {
  const int tiles = tiles_per_part(p);
  const RowStrides sg{static_cast<int64_t>(p.nodes) * p.heads * p.head_dim,
                      static_cast<int64_t>(p.heads) * p.head_dim, p.head_dim};
  return with_dtype(p.dtype, [&](auto tag) -> cudaError_t {
    using T = decltype(tag);
    const T *tq = static_cast<const T*>(q), *tk = static_cast<const T*>(k), *tv = static_cast<const T*>(v);
    const T* tdo = static_cast<const T*>(dout);
    const int64_t rows = static_cast<int64_t>(p.batch) * p.nodes * p.heads;
    delta_kernel<T><<<static_cast<unsigned>((rows + 255) / 256), 256, 0, p.stream>>>(p, static_cast<const T*>(o), so,
                                                                                       tdo, sdo, delta);
    if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
    const dim3 grid(p.parts * tiles, p.batch * p.heads);
    if (cudaError_t err = launch(dq_kernel<T>, grid, tile_floats(p, 5, 1, 2), p.stream, p, tiles, tq, sq, tk, sk, tv,
                                 sv, tdo, sdo, lse, static_cast<const float*>(delta), static_cast<T*>(dq), sg);
        err != cudaSuccess)
      return err;
    if (cudaError_t err = launch(dkdv_kernel<T>, grid, tile_floats(p, 6, 2, 2), p.stream, p, tiles, tq, sq, tk, sk,
                                 tv, sv, tdo, sdo, lse, static_cast<const float*>(delta), static_cast<T*>(dk),
                                 static_cast<T*>(dv), sg);
        err != cudaSuccess)
      return err;
    if (!dbias) return cudaSuccess;
    const dim3 bias_grid(p.parts * tiles * tiles, p.bias_heads);
    return launch(dbias_kernel<T>, bias_grid, tile_floats(p, 4, 1, 2), p.stream, p, tiles, tq, sq, tk, sk, tv, sv, tdo,
                  sdo, lse, static_cast<const float*>(delta), dbias);
  });
}

}  // namespace sba
