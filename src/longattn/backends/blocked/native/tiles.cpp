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

#include <ATen/native/CPUBlas.h>

extern "C" {
// MKL's sgemm, linked into libtorch_cpu: the products where oneDNN's brgemm is not available.
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
}

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---- row-major products: C (m x n) = A (m x k) B (k x n) [+ C] ------------------------------------------
// Every product of the step is written in this one form (operands transposed once per call where needed):
// oneDNN's brgemm micro-kernel runs these small shapes at 108-112 GFLOP/s per Zen 4 core where MKL's sgemm
// gives 94.

bool use_brgemm = true;  // set once per process by probe_brgemm()

inline void mm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
               int64_t ldc, bool add) {
  if (use_brgemm) {
    at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, add, a, b, c, false);
    return;
  }
  const int mi = m, ni = n, ki = k, la = lda, lb = ldb, lc = ldc;
  const float one = 1.0f, beta = add ? 1.0f : 0.0f;
  sgemm_("N", "N", &ni, &mi, &ki, &one, b, &lb, a, &la, &beta, c, &lc);  // column-major: C^T = B^T A^T
}

bool probe_brgemm() {
  try {
    float a[4] = {1, 2, 3, 4}, b[4] = {1, 0, 0, 1}, c[4] = {0, 0, 0, 0};
    at::native::cpublas::brgemm(2, 2, 2, 2, 2, 2, false, a, b, c, false);
    use_brgemm = c[0] == 1 && c[1] == 2 && c[2] == 3 && c[3] == 4;
  } catch (...) {
    use_brgemm = false;
  }
  return use_brgemm;
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

// Per-call operands, transposed once so that every product is row-major A B:
//   qs = q * scale (b, h, Nq, d), kt = k^T (b, h, d, Nk), v (b, h, Nk, dv), and in backward also
//   vt = v^T, qt = qs^T (b, h, d, Nq), dot = dout^T (b, h, dv, Nq), with key gradients accumulated transposed.
struct Operands {
  const float *qs, *kt, *k, *v, *vt = nullptr, *qt = nullptr, *dout = nullptr, *dot = nullptr;
};

// s (m x cols, ld) = qs_tile kt[:, cols] + bias
void scores(const Call& c, const Item& it, const Operands& x, float* s, int64_t ld) {
  const int64_t bh = it.bi * c.h + it.hi, bs = c.block;
  const float* q = x.qs + (bh * c.nq + it.t->r0) * c.d;
  const float* kt = x.kt + bh * c.d * c.nk;
  for_runs(it, [&](int64_t first, int64_t len, int64_t col) {
    mm(it.m, len * bs, c.d, q, c.d, kt + first * bs, c.nk, s + col * bs, ld, false);
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

void forward_item(const Call& c, const Item& it, const Operands& x, float* out, float* lse, float* s,
                  std::vector<float>& inv) {
  const int64_t bh = it.bi * c.h + it.hi, bs = c.block, cols = it.n_blocks * bs, ld = c.max_cols;
  float* o = out + (bh * c.nq + it.t->r0) * c.dv;
  float* l = lse + bh * c.nq + it.t->r0;
  if (cols == 0) {
    std::fill(o, o + it.m * c.dv, 0.0f);
    std::fill(l, l + it.m, kNegInf);
    return;
  }
  scores(c, it, x, s, ld);
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
  const float* vb = x.v + bh * c.nk * c.dv;
  bool add = false;
  for_runs(it, [&](int64_t first, int64_t len, int64_t col) {
    mm(it.m, c.dv, len * bs, s + col * bs, ld, vb + first * bs * c.dv, c.dv, o, c.dv, add);
    add = true;
  });
  for (int64_t i = 0; i < it.m; ++i)
    for (int64_t j = 0; j < c.dv; ++j) o[i * c.dv + j] *= inv[i];
}

// Work items taken from a shared counter (dynamic: a thread slowed by another process takes fewer).
template <typename F>
void parallel_items(int64_t n_items, F&& f) {
  std::atomic<int64_t> next{0};
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_items)));
#pragma omp parallel num_threads(threads)
  {
    // BLAS called inside an OpenMP region runs on the calling thread
    f([&]() { return next.fetch_add(1, std::memory_order_relaxed); }, omp_get_thread_num());
  }
}

at::Tensor transposed(const at::Tensor& t) { return t.transpose(-1, -2).contiguous(); }

void check_float(std::initializer_list<const at::Tensor*> ts) {
  for (const at::Tensor* t : ts)
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->device().is_cpu(),
                "the fused tile step takes contiguous float32 CPU tensors");
}

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rows,
                                const std::vector<at::Tensor>& kv_index, const std::vector<at::Tensor>& kv_count,
                                const std::vector<c10::optional<at::Tensor>>& bias,
                                const std::vector<c10::optional<at::Tensor>>& dead, int64_t block, double scale) {
  check_float({&q, &k, &v});
  Call c = make_call(q, k, v, rows, kv_index, kv_count, bias, dead, block, scale);
  auto out = at::empty({c.b, c.h, c.nq, c.dv}, q.options());
  auto lse = at::empty({c.b, c.h, c.nq}, q.options());
  auto qs = q * scale;
  auto kt = transposed(k);
  Operands x{qs.data_ptr<float>(), kt.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>()};
  const int64_t bh_count = c.b * c.h, n_items = bh_count * static_cast<int64_t>(c.tiles.size());
  float *op = out.data_ptr<float>(), *lp = lse.data_ptr<float>();
  parallel_items(n_items, [&](auto next, int) {
    std::vector<float> s(c.max_rows * c.max_cols), inv(c.max_rows);
    // tile-major order: neighbouring items share their key bands in cache
    for (int64_t i = next(); i < n_items; i = next())
      forward_item(c, item_of(c, i % bh_count, i / bh_count), x, op, lp, s.data(), inv);
  });
  return {out, lse};
}

// ---- backward -------------------------------------------------------------------------------------------

// One item's gradients: dq rows written, dk^T / dv^T (b, h, d, Nk) accumulated.
void backward_item(const Call& c, const Item& it, const Operands& x, const float* lse, const float* delta, float* dq,
                   float* dkt, float* dvt, float* s, float* dp) {
  const int64_t bh = it.bi * c.h + it.hi, bs = c.block, cols = it.n_blocks * bs, ld = c.max_cols;
  const int64_t r0 = it.t->r0;
  float* dqt = dq + (bh * c.nq + r0) * c.d;
  if (cols == 0) {
    std::fill(dqt, dqt + it.m * c.d, 0.0f);
    return;
  }
  scores(c, it, x, s, ld);
  const float* l = lse + bh * c.nq + r0;
  const float* dl = delta + bh * c.nq + r0;
  const float* vt = x.vt + bh * c.dv * c.nk;
  const float* dout = x.dout + (bh * c.nq + r0) * c.dv;
  for_runs(it, [&](int64_t first, int64_t len, int64_t col) {  // dp = dout v^T
    mm(it.m, len * bs, c.dv, dout, c.dv, vt + first * bs, c.nk, dp + col * bs, ld, false);
  });
  // p = exp(s - lse); ds = scale * p * (dp - delta), in place over dp (scale: dq and dk take it)
  for (int64_t i = 0; i < it.m; ++i) {
    float* row = s + i * ld;
    float* drow = dp + i * ld;
    if (l[i] == kNegInf || is_dead(it, i)) {
      std::fill(row, row + cols, 0.0f);
      std::fill(drow, drow + cols, 0.0f);
      continue;
    }
    const float li = l[i], di = dl[i], sc = c.scale;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) {
      float p = fast_exp(row[j] - li);
      row[j] = p;
      drow[j] = sc * p * (drow[j] - di);
    }
  }
  const float* kb = x.k + bh * c.nk * c.d;
  const float* qt = x.qt + bh * c.d * c.nq + r0;  // (d x m), ld Nq: unscaled q^T
  const float* dot = x.dot + bh * c.dv * c.nq + r0;  // (dv x m), ld Nq
  float* dkb = dkt + bh * c.d * c.nk;
  float* dvb = dvt + bh * c.dv * c.nk;
  bool add = false;
  for_runs(it, [&](int64_t first, int64_t len, int64_t col) {
    const int64_t n = len * bs, key = first * bs;
    mm(it.m, c.d, n, dp + col * bs, ld, kb + key * c.d, c.d, dqt, c.d, add);  // dq = ds k
    add = true;
    mm(c.d, n, it.m, qt, c.nq, dp + col * bs, ld, dkb + key, c.nk, true);  // dk^T += q^T ds
    mm(c.dv, n, it.m, dot, c.nq, s + col * bs, ld, dvb + key, c.nk, true);  // dv^T += dout^T p
  });
}

std::vector<at::Tensor> backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                 const at::Tensor& lse, const at::Tensor& dout, const at::Tensor& rows,
                                 const std::vector<at::Tensor>& kv_index, const std::vector<at::Tensor>& kv_count,
                                 const std::vector<c10::optional<at::Tensor>>& bias,
                                 const std::vector<c10::optional<at::Tensor>>& dead, int64_t block, double scale) {
  check_float({&q, &k, &v, &out, &lse, &dout});
  Call c = make_call(q, k, v, rows, kv_index, kv_count, bias, dead, block, scale);
  auto delta = (dout * out).sum(-1).contiguous();  // rowsum(dO * O)
  auto qs = q * scale;
  auto kt = transposed(k), vt = transposed(v), qt = transposed(q), dot = transposed(dout);
  Operands x{qs.data_ptr<float>(), kt.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
             vt.data_ptr<float>(), qt.data_ptr<float>(), dout.data_ptr<float>(), dot.data_ptr<float>()};
  auto dq = at::empty_like(q);
  const int64_t n_tiles = static_cast<int64_t>(c.tiles.size()), bh_count = c.b * c.h;
  const int threads = at::get_num_threads();
  const float *lp = lse.data_ptr<float>(), *dlp = delta.data_ptr<float>();
  float* dqp = dq.data_ptr<float>();
  at::Tensor dkt, dvt;
  if (bh_count >= 2 * threads || threads == 1) {
    // Each (example, head) is one thread's: its key gradients have one writer.
    dkt = at::zeros({c.b, c.h, c.d, c.nk}, q.options());
    dvt = at::zeros({c.b, c.h, c.dv, c.nk}, q.options());
    float *dkp = dkt.data_ptr<float>(), *dvp = dvt.data_ptr<float>();
    parallel_items(bh_count, [&](auto next, int) {
      std::vector<float> s(c.max_rows * c.max_cols), dp(c.max_rows * c.max_cols);
      for (int64_t bh = next(); bh < bh_count; bh = next())
        for (int64_t t = 0; t < n_tiles; ++t)
          backward_item(c, item_of(c, bh, t), x, lp, dlp, dqp, dkp, dvp, s.data(), dp.data());
    });
  } else {
    // Few (example, head) pairs: tiles run in parallel, each thread with its own key gradients, summed after.
    const int64_t n_items = bh_count * n_tiles;
    const int used = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n_items)));
    auto dkt_t = at::zeros({used, c.b, c.h, c.d, c.nk}, q.options());
    auto dvt_t = at::zeros({used, c.b, c.h, c.dv, c.nk}, q.options());
    float *dkp = dkt_t.data_ptr<float>(), *dvp = dvt_t.data_ptr<float>();
    parallel_items(n_items, [&](auto next, int tid) {
      std::vector<float> s(c.max_rows * c.max_cols), dp(c.max_rows * c.max_cols);
      for (int64_t i = next(); i < n_items; i = next())
        backward_item(c, item_of(c, i % bh_count, i / bh_count), x, lp, dlp, dqp, dkp + tid * bh_count * c.d * c.nk,
                      dvp + tid * bh_count * c.dv * c.nk, s.data(), dp.data());
    });
    dkt = dkt_t.sum(0);
    dvt = dvt_t.sum(0);
  }
  return {dq, dkt.transpose(-1, -2).contiguous(), dvt.transpose(-1, -2).contiguous()};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "fused tile forward (float32): (out, lse)");
  m.def("backward", &backward, "fused tile backward (float32): (dq, dk, dv)");
  m.def("probe_brgemm", &probe_brgemm, "use oneDNN's brgemm where it works (else MKL's sgemm); returns which");
}
