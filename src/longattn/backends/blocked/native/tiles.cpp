// The blocked backend's fused tile step (optional; kernel.py is the reference and the fallback).
//
// One parallel region per call: threads take (example, head, tile) items from a shared counter, so a thread
// slowed by another process takes fewer items instead of holding the others at a barrier. Per item the
// scores, the softmax and both products stay in a thread's own cache-sized buffers, with one BLAS call per
// run of consecutive key blocks (a sliding window's band is one run).
//
// Row-major notation: q, k, v, out are (b, h, N, d) contiguous; a tile is rows [r0, r1) with the key blocks
// kv_index[b', h', 0:kv_count[b', h']] (b', h' broadcast when the pattern is shared); its additive bias is
// (Bb, Hb, rows, C) with Bb, Hb in {1, b} and {1, h}; dead rows keep nothing and output zeros.

#include <torch/extension.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include <omp.h>

extern "C" {
// MKL, linked into libtorch_cpu: Fortran sgemm and the bf16 x bf16 -> fp32 CBLAS product.
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void cblas_gemm_bf16bf16f32(int layout, int ta, int tb, int m, int n, int k, float alpha, const uint16_t* a,
                            int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc);
}

namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---- row-major products: C (m x n) = alpha * op(A) op(B) + beta * C -------------------------------------

// C = alpha A B^T + beta C; A (m x k), B (n x k)
inline void gemm_nt(int m, int n, int k, float alpha, const float* a, int lda, const float* b, int ldb, float beta,
                    float* c, int ldc) {
  sgemm_("T", "N", &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
}
// C = alpha A B + beta C; A (m x k), B (k x n)
inline void gemm_nn(int m, int n, int k, float alpha, const float* a, int lda, const float* b, int ldb, float beta,
                    float* c, int ldc) {
  sgemm_("N", "N", &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
}
// C = alpha A^T B + beta C; A (k x m), B (k x n)
inline void gemm_tn(int m, int n, int k, float alpha, const float* a, int lda, const float* b, int ldb, float beta,
                    float* c, int ldc) {
  sgemm_("N", "T", &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc);
}
inline void gemm_nt(int m, int n, int k, float alpha, const at::BFloat16* a, int lda, const at::BFloat16* b, int ldb,
                    float beta, float* c, int ldc) {
  cblas_gemm_bf16bf16f32(kRowMajor, kNoTrans, kTrans, m, n, k, alpha, reinterpret_cast<const uint16_t*>(a), lda,
                         reinterpret_cast<const uint16_t*>(b), ldb, beta, c, ldc);
}
inline void gemm_nn(int m, int n, int k, float alpha, const at::BFloat16* a, int lda, const at::BFloat16* b, int ldb,
                    float beta, float* c, int ldc) {
  cblas_gemm_bf16bf16f32(kRowMajor, kNoTrans, kNoTrans, m, n, k, alpha, reinterpret_cast<const uint16_t*>(a), lda,
                         reinterpret_cast<const uint16_t*>(b), ldb, beta, c, ldc);
}

// exp for the softmax: 2^n * p(r), |relative error| < 2e-7, 0 below -87 (masked scores give exact zeros).
// Plain arithmetic so that the compiler vectorises the row loops.
inline float fast_exp(float x) {
  const float lo = -87.0f, hi = 88.0f;
  bool zero = x < lo;
  x = x > hi ? hi : (x < lo ? lo : x);
  float n = std::nearbyint(x * 1.44269504088896341f);
  float r = x - n * 0.693145751953125f;
  r = r - n * 1.428606765330187045e-06f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return zero ? 0.0f : p * scale;
}

// ---- one call's layout ----------------------------------------------------------------------------------

struct TileSpec {
  int64_t r0, r1;  // query rows
  const int64_t* kv_index;  // (B', H', K)
  const int64_t* kv_count;  // (B', H')
  int64_t bp, hp, kmax;  // B', H', K
  const float* bias;  // (Bb, Hb, rows, C) or null
  int64_t bb, hb, bias_cols;
  const bool* dead;  // (Bd, Hd, rows) or null
  int64_t bd, hd;
};

struct Call {
  int64_t b, h, nq, nk, d, dv, block;
  float scale;
  std::vector<TileSpec> tiles;
  int64_t max_rows = 0, max_cols = 0;
};

Call make_call(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rows,
               const std::vector<at::Tensor>& kv_index, const std::vector<at::Tensor>& kv_count,
               const std::vector<c10::optional<at::Tensor>>& bias, const std::vector<c10::optional<at::Tensor>>& dead,
               int64_t block, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v: (b, h, N, d)");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "q, k, v must be contiguous");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.is_contiguous(), "rows: (T, 2) int64");
  Call c{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), v.size(3), block, static_cast<float>(scale), {}};
  TORCH_CHECK(q.size(2) % block == 0 && k.size(2) % block == 0, "q and k rows must be padded to the block");
  const int64_t n_tiles = rows.size(0);
  TORCH_CHECK(static_cast<int64_t>(kv_index.size()) == n_tiles && static_cast<int64_t>(kv_count.size()) == n_tiles &&
              static_cast<int64_t>(bias.size()) == n_tiles && static_cast<int64_t>(dead.size()) == n_tiles,
              "one kv_index, kv_count, bias and dead entry per tile");
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t t = 0; t < n_tiles; ++t) {
    const at::Tensor& ki = kv_index[t];
    const at::Tensor& kc = kv_count[t];
    TORCH_CHECK(ki.dim() == 3 && ki.scalar_type() == at::kLong && ki.is_contiguous(), "kv_index: (B', H', K) int64");
    TORCH_CHECK(kc.dim() == 2 && kc.scalar_type() == at::kLong && kc.is_contiguous(), "kv_count: (B', H') int64");
    TileSpec s{rp[2 * t], rp[2 * t + 1], ki.data_ptr<int64_t>(), kc.data_ptr<int64_t>(), ki.size(0), ki.size(1),
               ki.size(2), nullptr, 1, 1, 0, nullptr, 1, 1};
    const int64_t m = s.r1 - s.r0;
    if (bias[t].has_value()) {
      const at::Tensor& bt = *bias[t];
      TORCH_CHECK(bt.dim() == 4 && bt.scalar_type() == at::kFloat && bt.is_contiguous() && bt.size(2) == m,
                  "bias: (B|1, H|1, rows, C) float32 contiguous");
      TORCH_CHECK(bt.size(3) >= s.kmax * block, "bias: C >= K * block");
      s.bias = bt.data_ptr<float>();
      s.bb = bt.size(0), s.hb = bt.size(1), s.bias_cols = bt.size(3);
    }
    if (dead[t].has_value()) {
      const at::Tensor& dt = *dead[t];
      TORCH_CHECK(dt.dim() == 4 && dt.scalar_type() == at::kBool && dt.is_contiguous() && dt.size(2) == m,
                  "dead: (B|1, H|1, rows, 1) bool contiguous");
      s.dead = dt.data_ptr<bool>();
      s.bd = dt.size(0), s.hd = dt.size(1);
    }
    c.max_rows = std::max(c.max_rows, m);
    c.max_cols = std::max(c.max_cols, s.kmax * block);
    c.tiles.push_back(s);
  }
  return c;
}

// An item's view of its tile: which key blocks, which bias and dead rows.
struct Item {
  const TileSpec* t;
  int64_t bi, hi, m, n_blocks;
  const int64_t* blocks;
  const float* bias;  // (m, bias_cols) or null
  const bool* dead;  // (m,) or null
};

inline Item item_of(const Call& c, int64_t bh, int64_t tile) {
  const TileSpec& t = c.tiles[tile];
  Item it{&t, bh / c.h, bh % c.h, t.r1 - t.r0, 0, nullptr, nullptr, nullptr};
  const int64_t kb = t.bp > 1 ? it.bi : 0, kh = t.hp > 1 ? it.hi : 0;
  it.n_blocks = t.kv_count[kb * t.hp + kh];
  it.blocks = t.kv_index + (kb * t.hp + kh) * t.kmax;
  if (t.bias) it.bias = t.bias + ((t.bb > 1 ? it.bi : 0) * t.hb + (t.hb > 1 ? it.hi : 0)) * it.m * t.bias_cols;
  if (t.dead) it.dead = t.dead + ((t.bd > 1 ? it.bi : 0) * t.hd + (t.hd > 1 ? it.hi : 0)) * it.m;
  return it;
}

// Runs of consecutive key blocks: (first block, blocks, first column).
template <typename F>
inline void for_runs(const Item& it, F&& f) {
  int64_t i = 0, col = 0;
  while (i < it.n_blocks) {
    int64_t j = i + 1;
    while (j < it.n_blocks && it.blocks[j] == it.blocks[j - 1] + 1) ++j;
    f(it.blocks[i], j - i, col);
    col += j - i;
    i = j;
  }
}

// Scores of an item: s (m x cols, ld) = scale * q_tile k_cols^T + bias.
template <typename T>
void scores(const Call& c, const Item& it, const T* q, const T* k, float* s, int64_t ld) {
  const int64_t bh = it.bi * c.h + it.hi, bs = c.block;
  const T* qt = q + (bh * c.nq + it.t->r0) * c.d;
  const T* kb = k + bh * c.nk * c.d;
  for_runs(it, [&](int64_t first, int64_t len, int64_t col) {
    gemm_nt(it.m, len * bs, c.d, c.scale, qt, c.d, kb + first * bs * c.d, c.d, 0.0f, s + col * bs, ld);
  });
  const int64_t cols = it.n_blocks * bs;
  if (it.bias) {
    for (int64_t i = 0; i < it.m; ++i) {
      float* row = s + i * ld;
      const float* br = it.bias + i * it.t->bias_cols;
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) row[j] += br[j];
    }
  }
}

inline bool is_dead(const Item& it, int64_t i) { return it.dead && it.dead[i]; }

// ---- forward --------------------------------------------------------------------------------------------

template <typename T>
void forward_item(const Call& c, const Item& it, const T* q, const T* k, const T* v, float* out, float* lse,
                  float* s, T* p_low) {
  const int64_t bh = it.bi * c.h + it.hi, bs = c.block, cols = it.n_blocks * bs, ld = c.max_cols;
  float* o = out + (bh * c.nq + it.t->r0) * c.dv;
  float* l = lse + bh * c.nq + it.t->r0;
  if (cols == 0) {
    std::fill(o, o + it.m * c.dv, 0.0f);
    std::fill(l, l + it.m, kNegInf);
    return;
  }
  scores(c, it, q, k, s, ld);
  std::vector<float> inv(it.m);
  for (int64_t i = 0; i < it.m; ++i) {
    float* row = s + i * ld;
    float mx = kNegInf;
    for (int64_t j = 0; j < cols; ++j) mx = std::max(mx, row[j]);
    if (is_dead(it, i) || mx == kNegInf) {
      std::fill(row, row + cols, 0.0f);
      inv[i] = 0.0f, l[i] = kNegInf;
      continue;
    }
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < cols; ++j) {
      float e = fast_exp(row[j] - mx);
      row[j] = e;
      sum += e;
    }
    inv[i] = 1.0f / sum, l[i] = mx + std::log(sum);
  }
  // out = (unnormalised p) v / rowsum: one pass over (m x dv) instead of one over (m x cols)
  const T* vb = v + bh * c.nk * c.dv;
  const T* p = nullptr;
  int64_t ldp = ld;
  if constexpr (std::is_same_v<T, float>) {
    p = s;
  } else {
    for (int64_t i = 0; i < it.m; ++i)
      for (int64_t j = 0; j < cols; ++j) p_low[i * ld + j] = static_cast<T>(s[i * ld + j]);
    p = p_low;
  }
  bool first_run = true;
  for_runs(it, [&](int64_t first, int64_t len, int64_t col) {
    gemm_nn(it.m, c.dv, len * bs, 1.0f, p + col * bs, ldp, vb + first * bs * c.dv, c.dv, first_run ? 0.0f : 1.0f, o,
            c.dv);
    first_run = false;
  });
  for (int64_t i = 0; i < it.m; ++i)
    for (int64_t j = 0; j < c.dv; ++j) o[i * c.dv + j] *= inv[i];
}

// Work items taken from a shared counter (dynamic: a thread slowed by another process takes fewer).
template <typename F>
void parallel_items(int64_t n_items, F&& f) {
  std::atomic<int64_t> next{0};
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), n_items));
#pragma omp parallel num_threads(threads)
  {
    // MKL called inside an OpenMP region runs on the calling thread
    f([&]() { return next.fetch_add(1, std::memory_order_relaxed); }, omp_get_thread_num());
  }
}

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rows,
                                const std::vector<at::Tensor>& kv_index, const std::vector<at::Tensor>& kv_count,
                                const std::vector<c10::optional<at::Tensor>>& bias,
                                const std::vector<c10::optional<at::Tensor>>& dead, int64_t block, double scale) {
  Call c = make_call(q, k, v, rows, kv_index, kv_count, bias, dead, block, scale);
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "q, k, v: one dtype");
  auto out = at::empty({c.b, c.h, c.nq, c.dv}, q.options().dtype(at::kFloat));
  auto lse = at::empty({c.b, c.h, c.nq}, q.options().dtype(at::kFloat));
  const int64_t n_tiles = static_cast<int64_t>(c.tiles.size()), n_items = c.b * c.h * n_tiles;
  auto run = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* qp = reinterpret_cast<const T*>(q.data_ptr());
    const T* kp = reinterpret_cast<const T*>(k.data_ptr());
    const T* vp = reinterpret_cast<const T*>(v.data_ptr());
    parallel_items(n_items, [&](auto next, int) {
      std::vector<float> s(c.max_rows * c.max_cols);
      std::vector<T> p_low(std::is_same_v<T, float> ? 0 : c.max_rows * c.max_cols);
      for (int64_t i = next(); i < n_items; i = next()) {
        // tile-major order: neighbouring items share their key bands in cache
        Item it = item_of(c, i % (c.b * c.h), i / (c.b * c.h));
        forward_item<T>(c, it, qp, kp, vp, out.data_ptr<float>(), lse.data_ptr<float>(), s.data(), p_low.data());
      }
    });
  };
  if (q.scalar_type() == at::kFloat) {
    run(static_cast<float*>(nullptr));
  } else if (q.scalar_type() == at::kBFloat16) {
    run(static_cast<at::BFloat16*>(nullptr));
  } else {
    TORCH_CHECK(false, "the native tile kernel takes float32 or bfloat16, got ", q.scalar_type());
  }
  return {out, lse};
}

// ---- backward (float32) ---------------------------------------------------------------------------------

// One item's gradients: dq rows written, dk/dv accumulated into the given (b, h, Nk, d) buffers.
void backward_item(const Call& c, const Item& it, const float* q, const float* k, const float* v, const float* dout,
                   const float* lse, const float* delta, float* dq, float* dk, float* dv, float* s, float* dp) {
  const int64_t bh = it.bi * c.h + it.hi, bs = c.block, cols = it.n_blocks * bs, ld = c.max_cols;
  const int64_t r0 = it.t->r0;
  float* dqt = dq + (bh * c.nq + r0) * c.d;
  if (cols == 0) {
    std::fill(dqt, dqt + it.m * c.d, 0.0f);
    return;
  }
  scores(c, it, q, k, s, ld);
  const float* l = lse + bh * c.nq + r0;
  const float* dl = delta + bh * c.nq + r0;
  const float* qt = q + (bh * c.nq + r0) * c.d;
  const float* dot = dout + (bh * c.nq + r0) * c.dv;
  const float* kb = k + bh * c.nk * c.d;
  const float* vb = v + bh * c.nk * c.dv;
  // dp = dout v^T over the item's columns
  for_runs(it, [&](int64_t first, int64_t len, int64_t col) {
    gemm_nt(it.m, len * bs, c.dv, 1.0f, dot, c.dv, vb + first * bs * c.dv, c.dv, 0.0f, dp + col * bs, ld);
  });
  // p = exp(s - lse); ds = p * (dp - delta), in place over dp
  for (int64_t i = 0; i < it.m; ++i) {
    float* row = s + i * ld;
    float* drow = dp + i * ld;
    if (l[i] == kNegInf || is_dead(it, i)) {
      std::fill(row, row + cols, 0.0f);
      std::fill(drow, drow + cols, 0.0f);
      continue;
    }
    const float li = l[i], di = dl[i];
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) {
      float p = fast_exp(row[j] - li);
      row[j] = p;
      drow[j] = p * (drow[j] - di);
    }
  }
  bool first_run = true;
  float* dkb = dk + bh * c.nk * c.d;
  float* dvb = dv + bh * c.nk * c.dv;
  for_runs(it, [&](int64_t first, int64_t len, int64_t col) {
    const int64_t n = len * bs;
    // dq = scale * ds k
    gemm_nn(it.m, c.d, n, c.scale, dp + col * bs, ld, kb + first * bs * c.d, c.d, first_run ? 0.0f : 1.0f, dqt, c.d);
    first_run = false;
    // dk += scale * ds^T q; dv += p^T dout
    gemm_tn(n, c.d, it.m, c.scale, dp + col * bs, ld, qt, c.d, 1.0f, dkb + first * bs * c.d, c.d);
    gemm_tn(n, c.dv, it.m, 1.0f, s + col * bs, ld, dot, c.dv, 1.0f, dvb + first * bs * c.dv, c.dv);
  });
}

std::vector<at::Tensor> backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                 const at::Tensor& lse, const at::Tensor& dout, const at::Tensor& rows,
                                 const std::vector<at::Tensor>& kv_index, const std::vector<at::Tensor>& kv_count,
                                 const std::vector<c10::optional<at::Tensor>>& bias,
                                 const std::vector<c10::optional<at::Tensor>>& dead, int64_t block, double scale) {
  Call c = make_call(q, k, v, rows, kv_index, kv_count, bias, dead, block, scale);
  for (const at::Tensor* t : {&q, &k, &v, &out, &lse, &dout})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(), "backward: float32 contiguous tensors");
  auto delta = (dout * out).sum(-1).contiguous();  // rowsum(dO * O)
  auto dq = at::empty_like(q);
  auto dk = at::zeros_like(k);
  auto dv = at::zeros_like(v);
  const int64_t n_tiles = static_cast<int64_t>(c.tiles.size()), bh_count = c.b * c.h;
  const int threads = at::get_num_threads();
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float *dop = dout.data_ptr<float>(), *lp = lse.data_ptr<float>(), *dlp = delta.data_ptr<float>();
  if (bh_count >= 2 * threads || threads == 1) {
    // Each (example, head) is one thread's: its key gradients have one writer.
    parallel_items(bh_count, [&](auto next, int) {
      std::vector<float> s(c.max_rows * c.max_cols), dp(c.max_rows * c.max_cols);
      for (int64_t bh = next(); bh < bh_count; bh = next())
        for (int64_t t = 0; t < n_tiles; ++t)
          backward_item(c, item_of(c, bh, t), qp, kp, vp, dop, lp, dlp, dq.data_ptr<float>(), dk.data_ptr<float>(),
                        dv.data_ptr<float>(), s.data(), dp.data());
    });
  } else {
    // Few (example, head) pairs: tiles run in parallel, each thread with its own key gradients, summed after.
    const int64_t n_items = bh_count * n_tiles;
    const int used = static_cast<int>(std::min<int64_t>(threads, n_items));
    auto dk_t = at::zeros({used, c.b, c.h, c.nk, c.d}, k.options());
    auto dv_t = at::zeros({used, c.b, c.h, c.nk, c.dv}, v.options());
    parallel_items(n_items, [&](auto next, int tid) {
      std::vector<float> s(c.max_rows * c.max_cols), dp(c.max_rows * c.max_cols);
      float* dkp = dk_t.data_ptr<float>() + tid * bh_count * c.nk * c.d;
      float* dvp = dv_t.data_ptr<float>() + tid * bh_count * c.nk * c.dv;
      for (int64_t i = next(); i < n_items; i = next())
        backward_item(c, item_of(c, i % bh_count, i / bh_count), qp, kp, vp, dop, lp, dlp, dq.data_ptr<float>(), dkp,
                      dvp, s.data(), dp.data());
    });
    dk = dk_t.sum(0);
    dv = dv_t.sum(0);
  }
  return {dq, dk, dv};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "fused tile forward: (out float32, lse float32)");
  m.def("backward", &backward, "fused tile backward (float32): (dq, dk, dv)");
}
