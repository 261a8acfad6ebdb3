// The blocked backend's fused tile step (optional; kernel.py is the reference and the fallback).
//
// One parallel region per call: threads take work items from a shared counter ((example, head) pairs, or
// (pair, tile) items when pairs are fewer than twice the threads), so a thread slowed by another process takes
// fewer items instead of holding the others at a barrier. Per item the scores, the softmax and the products
// stay in the thread's own cache-sized buffers: one small product per key block (oneDNN's brgemm), rows wider
// than 1,024 keys in chunks (online softmax), probabilities recomputed in backward from the kept log-sum-exp.
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
#include <memory>
#include <vector>

#include <omp.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

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
// Every product of the step is written in this one form (keys and values transposed into block panels, and
// an item's p and ds transposed in cache, where a product needs them the other way round):
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
  const float round = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer, vectorised
  float n = (x * 1.44269504088896341f + round) - round;
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

// The largest of n floats (-inf for none). Written with intrinsics: GCC leaves a max reduction scalar
// without -ffast-math (which the -inf scores forbid), and the scalar loop was a tenth of a BigBird forward.
inline float row_max(const float* x, int64_t n) {
  float mx = kNegInf;
  int64_t j = 0;
#if defined(__AVX512F__)
  __m512 acc = _mm512_set1_ps(kNegInf);
  for (; j + 16 <= n; j += 16) acc = _mm512_max_ps(acc, _mm512_loadu_ps(x + j));
  mx = _mm512_reduce_max_ps(acc);
#elif defined(__AVX2__)
  __m256 acc = _mm256_set1_ps(kNegInf);
  for (; j + 8 <= n; j += 8) acc = _mm256_max_ps(acc, _mm256_loadu_ps(x + j));
  float lanes[8];
  _mm256_storeu_ps(lanes, acc);
  for (float l : lanes) mx = mx > l ? mx : l;
#endif
  for (; j < n; ++j) mx = mx > x[j] ? mx : x[j];
  return mx;
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

// A run of consecutive key blocks: its first block, its length and its first column block within its chunk.
struct Run {
  int64_t first, len, col;
};

// Wide rows (BigBird's global queries read every key) are taken in chunks of columns, so that a thread's
// buffers stay in its L2 cache: the forward merges chunks by their running maxima (online softmax), the
// backward needs no merge (it has the log-sum-exp).
constexpr int64_t kChunkColumns = 1024;

struct Chunk {
  int64_t col0, cols;  // first column and columns
  std::vector<Run> runs;
};

inline int64_t chunk_blocks(int64_t block) { return std::max<int64_t>(1, kChunkColumns / block); }

// An item's chunks, each with its runs (a run that crosses a chunk's end is split there).
std::vector<Chunk> chunks_of(const Item& it, int64_t block) {
  const int64_t per = chunk_blocks(block);
  std::vector<Chunk> out;
  int64_t i = 0;
  while (i < it.n_blocks) {
    int64_t j = i + 1;
    while (j < it.n_blocks && it.blocks[j] == it.blocks[j - 1] + 1) ++j;
    for (int64_t a = i; a < j;) {  // blocks [a, z) of the run that fall in one chunk
      const int64_t chunk = a / per, z = std::min(j, (chunk + 1) * per);
      if (out.empty() || out.back().col0 != chunk * per * block)
        out.push_back({chunk * per * block, 0, {}});
      out.back().runs.push_back({it.blocks[i] + (a - i), z - a, a - chunk * per});
      out.back().cols = (z - chunk * per) * block;
      a = z;
    }
    i = j;
  }
  return out;
}

// The transposed key operands of one (example, head), so that every product is row-major A B, in key-block
// panels: kst = (scale * k)^T as (Nk / block) panels of (d x block), vt = v^T as panels of (dv x block). A
// panel is 16 KB in one piece where a (d x Nk) matrix spreads a block over 64 rows N apart (8-12% slower).
// With at least two (example, head) pairs per thread each thread transposes the pairs it takes into its own
// buffers instead of a call allocating copies of k and v: fresh pages cost 10-15% of a forward+backward here.
struct HeadOperands {
  const float* kst;
  const float* vt;
};

#if defined(__AVX2__)
// out (8 x 8, ldo) = scale * x (8 x 8, ldx)^T in registers
inline void transpose8(const float* x, int64_t ldx, float scale, float* out, int64_t ldo) {
  const __m256 sc = _mm256_set1_ps(scale);
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_mul_ps(_mm256_loadu_ps(x + i * ldx), sc);
  for (int i = 0; i < 8; i += 2) t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]), t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44), r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44), r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(out + i * ldo, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(out + (i + 4) * ldo, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}
#endif

// out (cols x rows, ldo) = scale * x (rows x cols, ldx)^T; 8 x 8 blocks in registers (a strided scalar copy
// was most of the backward's own time)
void transpose(const float* x, int64_t rows, int64_t cols, int64_t ldx, float scale, float* out, int64_t ldo) {
  int64_t i0 = 0;
#if defined(__AVX2__)
  for (; i0 + 8 <= rows; i0 += 8) {
    int64_t j0 = 0;
    for (; j0 + 8 <= cols; j0 += 8) transpose8(x + i0 * ldx + j0, ldx, scale, out + j0 * ldo + i0, ldo);
    for (; j0 < cols; ++j0)
      for (int64_t i = i0; i < i0 + 8; ++i) out[j0 * ldo + i] = scale * x[i * ldx + j0];
  }
#endif
  for (; i0 < rows; ++i0)
    for (int64_t j = 0; j < cols; ++j) out[j * ldo + i0] = scale * x[i0 * ldx + j];
}

// Where they come from: a thread's own buffers (filled per pair) or, with few pairs, tensors filled once per
// call; both by fill(), so the panel layout is written in one place.
struct KeyOperands {
  const Call& c;
  const float *k, *v;
  bool want_vt;
  at::Tensor kst_all, vt_all;  // (b, h, Nk / block, d, block), (b, h, Nk / block, dv, block) when shared

  KeyOperands(const Call& call, const at::Tensor& k_, const at::Tensor& v_, bool shared, bool want_v)
      : c(call), k(k_.data_ptr<float>()), v(v_.data_ptr<float>()), want_vt(want_v) {
    if (!shared) return;
    kst_all = at::empty({c.b, c.h, c.d, c.nk}, k_.options());
    if (want_vt) vt_all = at::empty({c.b, c.h, c.dv, c.nk}, v_.options());
    for (int64_t bh = 0; bh < c.b * c.h; ++bh)
      fill(bh, kst_all.data_ptr<float>() + bh * c.d * c.nk, want_vt ? vt_all.data_ptr<float>() + bh * c.dv * c.nk : nullptr);
  }
  bool shared() const { return kst_all.defined(); }
  // pair bh's panels into kst (d * Nk floats) and, when given, vt (dv * Nk)
  void fill(int64_t bh, float* kst, float* vt) const {
    const int64_t bs = c.block;
    for (int64_t blk = 0; blk < c.nk / bs; ++blk) {
      transpose(k + (bh * c.nk + blk * bs) * c.d, bs, c.d, c.d, c.scale, kst + blk * c.d * bs, bs);
      if (vt) transpose(v + (bh * c.nk + blk * bs) * c.dv, bs, c.dv, c.dv, 1.0f, vt + blk * c.dv * bs, bs);
    }
  }
  HeadOperands shared_head(int64_t bh) const {
    return {kst_all.data_ptr<float>() + bh * c.d * c.nk, want_vt ? vt_all.data_ptr<float>() + bh * c.dv * c.nk : nullptr};
  }
  HeadOperands own_head(int64_t bh, std::vector<float>& kbuf, std::vector<float>& vbuf) const {
    kbuf.resize(c.d * c.nk);
    vbuf.resize(want_vt ? c.dv * c.nk : 0);
    fill(bh, kbuf.data(), want_vt ? vbuf.data() : nullptr);
    return {kbuf.data(), want_vt ? vbuf.data() : nullptr};
  }
};

// s (m x chunk.cols, ld) = q_tile kst[:, chunk] + bias[:, chunk], one product per key block
void scores(const Call& c, const Item& it, const Chunk& chunk, const float* q, const HeadOperands& x, float* s,
            int64_t ld) {
  const int64_t bh = it.bi * c.h + it.hi, bs = c.block;
  const float* qt = q + (bh * c.nq + it.t->r0) * c.d;
  for (const Run& r : chunk.runs)
    for (int64_t i = 0; i < r.len; ++i)
      mm(it.m, bs, c.d, qt, c.d, x.kst + (r.first + i) * c.d * bs, bs, s + (r.col + i) * bs, ld, false);
  if (it.bias) {
    for (int64_t i = 0; i < it.m; ++i) {
      float* row = s + i * ld;
      const float* br = it.bias + i * it.t->bias_cols + chunk.col0;
#pragma omp simd
      for (int64_t j = 0; j < chunk.cols; ++j) row[j] += br[j];
    }
  }
}

inline bool is_dead(const Item& it, int64_t i) { return it.dead && it.dead[i]; }

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

// Backward items are whole (example, head) pairs where there are enough of them to share out: a pair's key
// operands are transposed once by the thread that takes it, and its key gradients have one writer.
bool per_pair(const Call& c) { return c.b * c.h >= 2 * at::get_num_threads() || at::get_num_threads() == 1; }

// Runs f(item, head operands, thread) over every (pair, tile), in one parallel region.
template <typename F>
void for_items(const Call& c, const KeyOperands& keys, F&& f) {
  const int64_t pairs = c.b * c.h, n_tiles = static_cast<int64_t>(c.tiles.size());
  if (!keys.shared()) {
    parallel_items(pairs, [&](auto next, int tid) {
      std::vector<float> kbuf, vbuf;
      for (int64_t bh = next(); bh < pairs; bh = next()) {
        HeadOperands x = keys.own_head(bh, kbuf, vbuf);
        for (int64_t t = 0; t < n_tiles; ++t) f(item_of(c, bh, t), x, tid);
      }
    });
    return;
  }
  const int64_t n_items = pairs * n_tiles;
  parallel_items(n_items, [&](auto next, int tid) {
    // tile-major order: neighbouring items share their key bands in cache
    for (int64_t i = next(); i < n_items; i = next()) f(item_of(c, i % pairs, i / pairs), keys.shared_head(i % pairs), tid);
  });
}

void check_float(std::initializer_list<const at::Tensor*> ts) {
  for (const at::Tensor* t : ts)
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->device().is_cpu(),
                "the fused tile step takes contiguous float32 CPU tensors");
}

// ---- forward --------------------------------------------------------------------------------------------

struct Buffers {  // one thread's: (rows x chunk) scores and, in backward, dP and the two transposes
  int64_t ld;
  std::vector<float> s, dp, t1, t2, top, sum;
  Buffers(const Call& c, bool backward)
      : ld(std::min(c.max_cols, chunk_blocks(c.block) * c.block)), s(c.max_rows * ld), dp(backward ? c.max_rows * ld : 0),
        t1(backward ? c.max_rows * ld : 0), t2(backward ? c.max_rows * ld : 0), top(c.max_rows), sum(c.max_rows) {}
};

void forward_item(const Call& c, const Item& it, const float* q, const float* v, const HeadOperands& x, float* out,
                  float* lse, Buffers& buf) {
  const int64_t bh = it.bi * c.h + it.hi, bs = c.block, ld = buf.ld, m = it.m;
  float* o = out + (bh * c.nq + it.t->r0) * c.dv;
  float* l = lse + bh * c.nq + it.t->r0;
  std::fill(o, o + m * c.dv, 0.0f);
  float *s = buf.s.data(), *top = buf.top.data(), *sum = buf.sum.data();
  std::fill(top, top + m, kNegInf);
  std::fill(sum, sum + m, 0.0f);
  const float* vb = v + bh * c.nk * c.dv;
  const std::vector<Chunk> chunks = chunks_of(it, bs);
  for (const Chunk& chunk : chunks) {
    scores(c, it, chunk, q, x, s, ld);
    for (int64_t i = 0; i < m; ++i) {
      float* row = s + i * ld;
      const float mx = std::max(top[i], row_max(row, chunk.cols));
      if (is_dead(it, i) || mx == kNegInf) {  // no key yet: the row's products add nothing
        std::fill(row, row + chunk.cols, 0.0f);
        continue;
      }
      if (mx > top[i] && top[i] != kNegInf) {  // a larger maximum: rescale what earlier chunks summed
        const float alpha = fast_exp(top[i] - mx);
        sum[i] *= alpha;
        for (int64_t j = 0; j < c.dv; ++j) o[i * c.dv + j] *= alpha;
      }
      top[i] = mx;
      float total = 0.0f;
#pragma omp simd reduction(+ : total)
      for (int64_t j = 0; j < chunk.cols; ++j) {
        float e = fast_exp(row[j] - mx);
        row[j] = e;
        total += e;
      }
      sum[i] += total;
    }
    // out += (unnormalised p) v: normalised once at the end, one pass over (m x dv)
    for (const Run& r : chunk.runs) mm(m, c.dv, r.len * bs, s + r.col * bs, ld, vb + r.first * bs * c.dv, c.dv, o, c.dv, true);
  }
  for (int64_t i = 0; i < m; ++i) {
    const bool live = !is_dead(it, i) && sum[i] > 0.0f;
    const float r = live ? 1.0f / sum[i] : 0.0f;
    l[i] = live ? top[i] + std::log(sum[i]) : kNegInf;
#pragma omp simd
    for (int64_t j = 0; j < c.dv; ++j) o[i * c.dv + j] *= r;
  }
}

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rows,
                                const std::vector<at::Tensor>& kv_index, const std::vector<at::Tensor>& kv_count,
                                const std::vector<c10::optional<at::Tensor>>& bias,
                                const std::vector<c10::optional<at::Tensor>>& dead, int64_t block, double scale) {
  check_float({&q, &k, &v});
  Call c = make_call(q, k, v, rows, kv_index, kv_count, bias, dead, block, scale);
  auto out = at::empty({c.b, c.h, c.nq, c.dv}, q.options());
  auto lse = at::empty({c.b, c.h, c.nq}, q.options());
  // Whole (example, head) pairs per thread where there are enough, each transposing its own keys: a
  // call-wide transposed copy of k is fresh memory every call (its page faults made the time per key grow
  // with N: 10.9, 12.2 and 13.8 ms per 1K keys at 4K, 8K and 16K for Longformer-512).
  KeyOperands keys(c, k, v, !per_pair(c), false);
  const float *qp = q.data_ptr<float>(), *vp = v.data_ptr<float>();
  float *op = out.data_ptr<float>(), *lp = lse.data_ptr<float>();
  std::vector<std::unique_ptr<Buffers>> bufs(at::get_num_threads());
  for_items(c, keys, [&](const Item& it, const HeadOperands& x, int tid) {
    if (!bufs[tid]) bufs[tid] = std::make_unique<Buffers>(c, false);
    forward_item(c, it, qp, vp, x, op, lp, *bufs[tid]);
  });
  return {out, lse};
}

// ---- backward -------------------------------------------------------------------------------------------

// One item's gradients: dq rows written; dk and dv rows (b, h, Nk, d) accumulated, from transposed copies of
// the item's ds and p (in cache) so that the key gradients stay in row layout.
void backward_item(const Call& c, const Item& it, const float* q, const float* k, const float* dout,
                   const HeadOperands& x, const float* lse, const float* delta, float* dq, float* dk, float* dv,
                   Buffers& buf) {
  const int64_t bh = it.bi * c.h + it.hi, bs = c.block, ld = buf.ld, m = it.m;
  const int64_t r0 = it.t->r0;
  float* dqt = dq + (bh * c.nq + r0) * c.d;
  std::fill(dqt, dqt + m * c.d, 0.0f);
  float *s = buf.s.data(), *dp = buf.dp.data(), *pt = buf.t1.data(), *dst = buf.t2.data();
  const float* l = lse + bh * c.nq + r0;
  const float* dl = delta + bh * c.nq + r0;
  const float* dot = dout + (bh * c.nq + r0) * c.dv;
  const float* kb = k + bh * c.nk * c.d;
  const float* qt = q + (bh * c.nq + r0) * c.d;
  float* dkb = dk + bh * c.nk * c.d;
  float* dvb = dv + bh * c.nk * c.dv;
  for (const Chunk& chunk : chunks_of(it, bs)) {
    const int64_t cols = chunk.cols;
    scores(c, it, chunk, q, x, s, ld);
    for (const Run& r : chunk.runs)  // dp = dout v^T
      for (int64_t i = 0; i < r.len; ++i)
        mm(m, bs, c.dv, dot, c.dv, x.vt + (r.first + i) * c.dv * bs, bs, dp + (r.col + i) * bs, ld, false);
    // p = exp(s - lse); ds = scale * p * (dp - delta) (dq and dk take the scale)
    for (int64_t i = 0; i < m; ++i) {
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
    transpose(s, m, cols, ld, 1.0f, pt, m);
    transpose(dp, m, cols, ld, 1.0f, dst, m);
    for (const Run& r : chunk.runs) {
      const int64_t n = r.len * bs, key = r.first * bs, c0 = r.col * bs;
      mm(m, c.d, n, dp + c0, ld, kb + key * c.d, c.d, dqt, c.d, true);  // dq += ds k
      mm(n, c.d, m, dst + c0 * m, m, qt, c.d, dkb + key * c.d, c.d, true);  // dk += ds^T q
      mm(n, c.dv, m, pt + c0 * m, m, dot, c.dv, dvb + key * c.dv, c.dv, true);  // dv += p^T dout
    }
  }
}

std::vector<at::Tensor> backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                 const at::Tensor& lse, const at::Tensor& dout, const at::Tensor& rows,
                                 const std::vector<at::Tensor>& kv_index, const std::vector<at::Tensor>& kv_count,
                                 const std::vector<c10::optional<at::Tensor>>& bias,
                                 const std::vector<c10::optional<at::Tensor>>& dead, int64_t block, double scale) {
  check_float({&q, &k, &v, &out, &lse, &dout});
  Call c = make_call(q, k, v, rows, kv_index, kv_count, bias, dead, block, scale);
  auto delta = (dout * out).sum(-1);  // rowsum(dO * O)
  auto dq = at::empty_like(q);
  const bool own = per_pair(c);
  KeyOperands keys(c, k, v, !own, true);
  // One writer per pair's key gradients; with few pairs, one set per thread, summed after.
  const int threads = own ? 1 : at::get_num_threads();
  auto dk = at::zeros({threads, c.b, c.h, c.nk, c.d}, q.options());
  auto dv = at::zeros({threads, c.b, c.h, c.nk, c.dv}, q.options());
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *dop = dout.data_ptr<float>();
  const float *lp = lse.data_ptr<float>(), *dlp = delta.data_ptr<float>();
  float *dqp = dq.data_ptr<float>(), *dkp = dk.data_ptr<float>(), *dvp = dv.data_ptr<float>();
  const int64_t dk_stride = own ? 0 : c.b * c.h * c.nk * c.d, dv_stride = own ? 0 : c.b * c.h * c.nk * c.dv;
  std::vector<std::unique_ptr<Buffers>> bufs(at::get_num_threads());
  for_items(c, keys, [&](const Item& it, const HeadOperands& x, int tid) {
    if (!bufs[tid]) bufs[tid] = std::make_unique<Buffers>(c, true);
    backward_item(c, it, qp, kp, dop, x, lp, dlp, dqp, dkp + tid * dk_stride, dvp + tid * dv_stride, *bufs[tid]);
  });
  return {dq, threads == 1 ? dk[0] : dk.sum(0), threads == 1 ? dv[0] : dv.sum(0)};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "fused tile forward (float32): (out, lse)");
  m.def("backward", &backward, "fused tile backward (float32): (dq, dk, dv)");
  m.def("probe_brgemm", &probe_brgemm, "use oneDNN's brgemm where it works (else MKL's sgemm); returns which");
}
