// The low-rank feedback Linear (rules fa-lowrank, raf-q, raf) as one C++ autograd Function.
//
// Same arithmetic as raftorch.functional.LinearLowRankFeedback + lowrank_feedback + oja_grad
// (see their docstrings for the equations). On float32 CPU tensors the thin (rank-r) part of
// the backward runs as one fused, multithreaded pass over the rows (row_pass below); other
// dtypes and layouts run the same steps as ATen operations. Built on first use by
// raftorch.extension, with -fopenmp so that at::parallel_for shares PyTorch's OpenMP threads.
#include <torch/extension.h>

#include <algorithm>
#include <vector>

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

enum Scale : int64_t { kNone = 0, kMaxStd = 1, kRms = 2 };

bool fusable(const Tensor& t) {
  return t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous();
}

// The factor k of grad_P = k ((A P^T) P - A) (see oja_grad) from the per-feature sums `csum`
// and sums of squares `ssq` of the M x n signal: var_j M = ssq_j - csum_j^2 / M (centred),
// s2 = max_j (maxstd) or mean_j (rms) of it; a numerically constant signal gets k = 0.
double oja_factor(int64_t M, int64_t n, const double* csum, const double* ssq, bool center,
                  int64_t scale, bool reduce_mean) {
  double k = reduce_mean ? 1.0 / M : 1.0;
  if (scale == kNone) return k;
  double mx = 0.0, sum = 0.0, tot = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    const double v = center ? ssq[j] - csum[j] * csum[j] / M : ssq[j];
    mx = std::max(mx, v);
    sum += v;
    tot += ssq[j];
  }
  const double s2 = scale == kMaxStd ? mx : sum / n;
  return s2 > 1e-6 * tot / n + 1e-30 * M ? k * M / s2 : 0.0;
}

// The mean of the signal dominates its spread (sum_j M mean_j^2 > sum_j M var_j): the rank-one
// centring of A = z^T e would cancel most of A's digits (3% error at mean/std = 20 and 100k rows).
bool mean_dominates(int64_t M, int64_t n, const double* csum, const double* ssq) {
  double m2 = 0.0, tot = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    m2 += csum[j] * csum[j] / M;
    tot += ssq[j];
  }
  return m2 > tot - m2;
}

// grad_P with the signal centred explicitly first (raftorch.functional.oja_grad_explicit):
// e_c = e - mean e, v_j = sum_n e_c,nj^2, s2 = max_j / mean_j v_j, the floor on the uncentred
// mean square `sq_mean` as in oja_factor; grad_P = mult k ((A P^T) P - A), A = (e_c P^T)^T e_c.
Tensor centred_oja(const Tensor& P, const Tensor& e, double sq_mean, int64_t scale, bool reduce_mean,
                   double mult) {
  const int64_t M = e.size(0);
  const Tensor ec = e - e.mean(0, true);
  double k = reduce_mean ? 1.0 / M : 1.0;
  if (scale != kNone) {
    const Tensor v = (ec * ec).sum(0).to(at::kDouble);
    const double s2 = (scale == kMaxStd ? v.max() : v.mean()).item<double>();
    k = s2 > 1e-6 * sq_mean + 1e-30 * M ? k * M / s2 : 0.0;
  }
  k *= mult;
  const Tensor A = at::mm(at::mm(P, ec.t()), ec);
  return at::addmm(A, at::mm(A, P.t()), P, -k, k);
}

// Generic path (any dtype and layout): grad_P = mult k ((A P^T) P - A) with A = z_c^T e, z = e P^T
// given transposed as zt (r x M), colsum = e.sum(0). No rows (an empty batch): exactly zero.
Tensor oja_grad(const Tensor& P, const Tensor& e, const Tensor& zt, const Tensor& colsum,
                bool center, int64_t scale, bool reduce_mean, double mult) {
  const int64_t M = e.size(0), n = e.size(1);
  if (M == 0) return at::zeros_like(P, at::MemoryFormat::Contiguous);
  double k = reduce_mean ? 1.0 / M : 1.0;
  if (scale != kNone || center) {
    const Tensor s = at::stack({colsum, (e * e).sum(0)}).to(at::kDouble).contiguous();
    const double* ps = s.const_data_ptr<double>();
    if (center && mean_dominates(M, n, ps, ps + n))
      return centred_oja(P, e, s[1].sum().item<double>() / n, scale, reduce_mean, mult);
    if (scale != kNone) k = oja_factor(M, n, ps, ps + n, center, scale, reduce_mean);
  }
  Tensor A = at::mm(zt, e);
  if (center) A.addr_(zt.sum(1), colsum, 1.0, -1.0 / M);
  k *= mult;
  return at::addmm(A, at::mm(A, P.t()), P, -k, k);
}

// ---------------------------------------------------------------------------------------------
// Fused row pass (float32, CPU). With z_i = P g_i the compressed error of row i, one sweep over
// the rows of g (M x n) and x (M x m) accumulates every thin product of the backward:
//   z = g P^T (kept per block only),  gx = z Q^T (the input gradient, M x m),
//   A = z^T g (Oja's cross term),  gQt = z^T x (Q's gradient, transposed),
//   the column sums and sums of squares of g (Oja's statistics, the bias gradient), sum_i z_i.
// BLAS runs these as separate products with r (= 10) rows that each read g or x again, at a
// fraction of the machine's speed; here g and x are read once, four rows at a time, while the
// accumulators (r x n and r x m floats) stay in cache. Rows are split between threads, each
// with its own accumulators, added up at the end.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
// one compiled copy per instruction set (AVX-512, AVX2 + FMA, baseline), picked at load time
#define RAF_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RAF_CLONES
#endif
#if defined(__GNUC__)
#define RAF_INLINE inline __attribute__((always_inline))
#else
#define RAF_INLINE inline
#endif

#if defined(__GNUC__)  // GCC / Clang vector extensions: 8 floats, one AVX register where there is one
typedef float vec8 __attribute__((vector_size(32)));
#define RAF_LOAD8(p) ({ vec8 v_; std::memcpy(&v_, (p), sizeof v_); v_; })
#define RAF_STORE8(p, v) do { const vec8 v_ = (v); std::memcpy((p), &v_, sizeof v_); } while (0)
#define RAF_SUM8(v) (((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])))
#endif

constexpr int64_t kMaxFusedRank = 64;
// Accumulator rows are padded by one cache line: with widths that are multiples of 1024 floats
// their rows would all map to the same L1 cache sets (4 KiB apart) and evict each other.
constexpr int64_t kPad = 16;
constexpr int kLanes = 8;  // the pairwise sum in dots4 is written for 8

struct RowPass {
  int64_t r = 0, n = 0, m = 0;  // rank, width of g, width of x
  int64_t lda = 0, ldq = 0;     // row strides of the A and gQt accumulators (see kPad)
  const float* P = nullptr;     // r x n
  const float* g = nullptr;     // M x n
  const float* x = nullptr;     // M x m (read only for gQt)
  const float* Qt = nullptr;    // r x m, Q transposed (read only for gx)
  float* gx = nullptr;          // M x m, written (the input gradient z Q^T) if not null
  bool stats = false, cross = false, qgrad = false;
};

struct RowAcc {  // one thread's accumulators, zero on entry
  float* A;      // r x n, row stride lda   (cross)
  float* gQt;    // r x m, row stride ldq   (qgrad)
  double* csum;  // n       (stats)
  double* ssq;   // n       (stats)
  double* zsum;  // r       (cross)
};

// z[b][k] = P_k . g_b for the four rows g_0..g_3 and k < r, two rows of P at a time (each load
// of g feeds two products), in kLanes independent lanes summed pairwise at the end.
RAF_INLINE void dots4(const float* __restrict P, int64_t r, int64_t n, const float* __restrict g0,
                      const float* __restrict g1, const float* __restrict g2,
                      const float* __restrict g3, float (*z)[kMaxFusedRank]) {
  for (int64_t k = 0; k < r; k += 2) {
    const float* __restrict p = P + k * n;
    const float* __restrict q = k + 1 < r ? p + n : p;  // an odd r repeats its last row
    float a[8][kLanes] = {};
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes)
      for (int l = 0; l < kLanes; ++l) {
        const float u = p[j + l], v = q[j + l];
        const float h0 = g0[j + l], h1 = g1[j + l], h2 = g2[j + l], h3 = g3[j + l];
        a[0][l] += u * h0, a[1][l] += u * h1, a[2][l] += u * h2, a[3][l] += u * h3;
        a[4][l] += v * h0, a[5][l] += v * h1, a[6][l] += v * h2, a[7][l] += v * h3;
      }
    float s[8];
    for (int t = 0; t < 8; ++t)
      s[t] = ((a[t][0] + a[t][4]) + (a[t][1] + a[t][5])) + ((a[t][2] + a[t][6]) + (a[t][3] + a[t][7]));
    for (; j < n; ++j) {
      const float u = p[j], v = q[j];
      s[0] += u * g0[j], s[1] += u * g1[j], s[2] += u * g2[j], s[3] += u * g3[j];
      s[4] += v * g0[j], s[5] += v * g1[j], s[6] += v * g2[j], s[7] += v * g3[j];
    }
    for (int b = 0; b < 4; ++b) {
      z[b][k] = s[b];
      if (k + 1 < r) z[b][k + 1] = s[4 + b];
    }
  }
}

// out[k][j] += sum_b c[b][k] a_b[j] for k < r, j < w, over four rows a_0..a_3, in column tiles
// small enough that the four rows' tile and its r accumulator rows stay in L1.
RAF_INLINE void outer4(float* __restrict out, int64_t ld, const float (*c)[kMaxFusedRank], int64_t r,
                       const float* __restrict a0, const float* __restrict a1,
                       const float* __restrict a2, const float* __restrict a3, int64_t w) {
  constexpr int64_t kTile = 256;
  for (int64_t j0 = 0; j0 < w; j0 += kTile) {
    const int64_t j1 = std::min(w, j0 + kTile);
    for (int64_t k = 0; k < r; ++k) {
      const float c0 = c[0][k], c1 = c[1][k], c2 = c[2][k], c3 = c[3][k];
      float* __restrict o = out + k * ld;
      for (int64_t j = j0; j < j1; ++j) o[j] += (c0 * a0[j] + c1 * a1[j]) + (c2 * a2[j] + c3 * a3[j]);
    }
  }
}

// out_b = sum_k Z[b][k] Qt_k for the K <= 4 rows of a block (the input gradient z Q^T): 16
// columns at a time in registers, each loaded element of Qt feeding the four rows.
RAF_INLINE void combine4(float* __restrict out, int64_t K, const float (*Z)[kMaxFusedRank],
                         const float* __restrict Qt, int64_t r, int64_t m) {
  int64_t j = 0;
#if defined(__GNUC__)
  for (; j + 16 <= m; j += 16) {
    vec8 a[4][2] = {};
    for (int64_t k = 0; k < r; ++k) {
      const vec8 q0 = RAF_LOAD8(Qt + k * m + j), q1 = RAF_LOAD8(Qt + k * m + j + 8);
      for (int b = 0; b < 4; ++b) {
        a[b][0] += Z[b][k] * q0;
        a[b][1] += Z[b][k] * q1;
      }
    }
    for (int64_t b = 0; b < K; ++b) {
      RAF_STORE8(out + b * m + j, a[b][0]);
      RAF_STORE8(out + b * m + j + 8, a[b][1]);
    }
  }
#endif
  for (; j < m; ++j)
    for (int64_t b = 0; b < K; ++b) {
      float s = 0.f;
      for (int64_t k = 0; k < r; ++k) s += Z[b][k] * Qt[k * m + j];
      out[b * m + j] = s;
    }
}

RAF_CLONES __attribute__((noinline)) void row_pass(const RowPass& p, int64_t begin, int64_t end,
                                                   RowAcc acc) {
  const int64_t r = p.r, n = p.n, m = p.m;
  // float sums over at most 256 rows, added up in double: the error does not grow with M
  std::vector<float> cblock(p.stats ? n : 0), sblock(p.stats ? n : 0);
  int64_t rows_in_block = 0;
  auto flush = [&]() {
    for (int64_t j = 0; j < n; ++j) {
      acc.csum[j] += cblock[j];
      acc.ssq[j] += sblock[j];
      cblock[j] = 0.f;
      sblock[j] = 0.f;
    }
    rows_in_block = 0;
  };
  float zb[4][kMaxFusedRank];
  for (int64_t i = begin; i < end;) {
    const int64_t nb = std::min<int64_t>(4, end - i);
    // a block of fewer than four rows repeats its first row, with a zero coefficient
    const float* g0 = p.g + i * n;
    const float* g1 = nb > 1 ? g0 + n : g0;
    const float* g2 = nb > 2 ? g0 + 2 * n : g0;
    const float* g3 = nb > 3 ? g0 + 3 * n : g0;
    dots4(p.P, r, n, g0, g1, g2, g3, zb);
    for (int64_t b = nb; b < 4; ++b)
      for (int64_t k = 0; k < r; ++k) zb[b][k] = 0.f;
    if (p.stats) {
      float* __restrict cp = cblock.data();
      float* __restrict sp = sblock.data();
      for (int64_t b = 0; b < nb; b += 2) {  // two rows at a time (a lone last row alone)
        const float* __restrict u = g0 + b * n;
        if (b + 1 < nb) {
          const float* __restrict v = u + n;
          for (int64_t j = 0; j < n; ++j) {
            cp[j] += u[j] + v[j];
            sp[j] += u[j] * u[j] + v[j] * v[j];
          }
        } else {
          for (int64_t j = 0; j < n; ++j) {
            cp[j] += u[j];
            sp[j] += u[j] * u[j];
          }
        }
      }
      rows_in_block += nb;
      if (rows_in_block >= 256) flush();
    }
    if (p.cross) {
      outer4(acc.A, p.lda, zb, r, g0, g1, g2, g3, n);
      for (int64_t k = 0; k < r; ++k) acc.zsum[k] += double(zb[0][k]) + zb[1][k] + zb[2][k] + zb[3][k];
    }
    if (p.gx) combine4(p.gx + i * m, nb, zb, p.Qt, r, m);
    if (p.qgrad) {
      const float* x0 = p.x + i * m;
      outer4(acc.gQt, p.ldq, zb, r, x0, nb > 1 ? x0 + m : x0, nb > 2 ? x0 + 2 * m : x0,
             nb > 3 ? x0 + 3 * m : x0, m);
    }
    i += nb;
  }
  if (p.stats && rows_in_block > 0) flush();
}

// out = f ((A P^T) P - A) for A (r x n, row stride lda) and P (r x n): Oja's update from its
// cross term (oja_grad).
RAF_CLONES __attribute__((noinline)) void oja_finish(const float* A, int64_t lda, const float* P,
                                                     int64_t r, int64_t n, double f, float* out) {
  std::vector<float> C(r * r);  // A P^T
  for (int64_t a = 0; a < r; ++a) {
    const float* __restrict u = A + a * lda;
    int64_t b = 0;
#if defined(__GNUC__)
    for (; b + 4 <= r; b += 4) {  // four products at once, in 8 lanes each
      const float* __restrict v = P + b * n;
      vec8 s0 = {}, s1 = {}, s2 = {}, s3 = {};
      int64_t j = 0;
      for (; j + 8 <= n; j += 8) {
        const vec8 x = RAF_LOAD8(u + j);
        s0 += x * RAF_LOAD8(v + j);
        s1 += x * RAF_LOAD8(v + n + j);
        s2 += x * RAF_LOAD8(v + 2 * n + j);
        s3 += x * RAF_LOAD8(v + 3 * n + j);
      }
      float t[4] = {RAF_SUM8(s0), RAF_SUM8(s1), RAF_SUM8(s2), RAF_SUM8(s3)};
      for (; j < n; ++j)
        for (int c = 0; c < 4; ++c) t[c] += u[j] * v[c * n + j];
      for (int c = 0; c < 4; ++c) C[a * r + b + c] = t[c];
    }
#endif
    for (; b < r; ++b) {
      const float* __restrict v = P + b * n;
      int64_t j = 0;
      float t = 0.f;
#if defined(__GNUC__)
      vec8 s0 = {};
      for (; j + 8 <= n; j += 8) s0 += RAF_LOAD8(u + j) * RAF_LOAD8(v + j);
      t = RAF_SUM8(s0);
#endif
      for (; j < n; ++j) t += u[j] * v[j];
      C[a * r + b] = t;
    }
  }
  for (int64_t a = 0; a < r; ++a) {
    float* __restrict row = out + a * n;
    const float* __restrict u = A + a * lda;
    for (int64_t j = 0; j < n; ++j) row[j] = -u[j];
    for (int64_t b = 0; b < r; ++b) {
      const float c = C[a * r + b];
      const float* __restrict v = P + b * n;
      for (int64_t j = 0; j < n; ++j) row[j] += c * v[j];
    }
    const float ff = float(f);
    for (int64_t j = 0; j < n; ++j) row[j] *= ff;
  }
}

struct Fused {
  Tensor colsum, grad_x, grad_Q, grad_P;  // grad_Q in Q's (m x r) layout
};

// The thin part of the backward from one row pass over g (M x n) and x (M x m), all float32
// contiguous: the column sums of g (if stats), the input gradient z Q^T (if need_x), Q's
// gradient x^T z in Q's layout (if qgrad) and Oja's update of P (if oja; needs stats when
// centring or scaling), with z = g P^T.
Fused fused_backward(const Tensor& g, const Tensor& x, const Tensor& Q, const Tensor& P, bool stats,
                     bool need_x, bool oja, bool qgrad, bool center, int64_t scale, bool reduce_mean,
                     double mult) {
  const int64_t M = g.size(0), n = g.size(1), r = P.size(0), m = x.size(1);
  const int64_t T = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), M / 64));
  const int64_t lda = n + kPad, ldq = m + kPad;
  const int64_t fsize = (oja ? r * lda : 0) + (qgrad ? r * ldq : 0);
  const int64_t dsize = (stats ? 2 * n : 0) + (oja ? r : 0);
  std::vector<float> fbuf(T * fsize, 0.f);
  std::vector<double> dbuf(T * dsize, 0.0);
  Fused out;
  RowPass p;
  p.r = r, p.n = n, p.m = m, p.lda = lda, p.ldq = ldq, p.P = P.const_data_ptr<float>(), p.g = g.const_data_ptr<float>();
  p.x = qgrad ? x.const_data_ptr<float>() : nullptr;
  p.stats = stats, p.cross = oja, p.qgrad = qgrad;
  std::vector<float> Qt;
  if (need_x) {  // Q (m x r) transposed, so that each of its r columns is read contiguously
    Qt.resize(r * m);
    const float* q = Q.const_data_ptr<float>();
    for (int64_t j = 0; j < m; ++j)
      for (int64_t k = 0; k < r; ++k) Qt[k * m + j] = q[j * r + k];
    out.grad_x = at::empty({M, m}, g.options());
    p.Qt = Qt.data(), p.gx = out.grad_x.data_ptr<float>();
  }
  auto acc_of = [&](int64_t t) {
    float* f = fbuf.data() + t * fsize;
    double* d = dbuf.data() + t * dsize;
    return RowAcc{f, f + (oja ? r * lda : 0), d, d + n, d + (stats ? 2 * n : 0)};
  };
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) row_pass(p, M * t / T, M * (t + 1) / T, acc_of(t));
  });
  const RowAcc tot = acc_of(0);  // the other threads' parts are added into thread 0's
  for (int64_t t = 1; t < T; ++t) {
    const RowAcc a = acc_of(t);
    for (int64_t i = 0; i < fsize; ++i) tot.A[i] += a.A[i];
    for (int64_t i = 0; i < dsize; ++i) tot.csum[i] += a.csum[i];
  }
  if (stats) {
    out.colsum = at::empty({n}, g.options());
    float* c = out.colsum.data_ptr<float>();
    for (int64_t j = 0; j < n; ++j) c[j] = float(tot.csum[j]);
  }
  if (qgrad) {
    out.grad_Q = at::empty({m, r}, g.options());
    float* q = out.grad_Q.data_ptr<float>();
    for (int64_t j = 0; j < m; ++j)
      for (int64_t k = 0; k < r; ++k) q[j * r + k] = tot.gQt[k * ldq + j];
  }
  if (oja && M == 0) {  // no rows (an empty batch): no update, never 0/0 (oja_grad)
    out.grad_P = at::zeros({r, n}, g.options());
  } else if (oja && center && mean_dominates(M, n, tot.csum, tot.ssq)) {
    double sq = 0.0;
    for (int64_t j = 0; j < n; ++j) sq += tot.ssq[j];
    out.grad_P = centred_oja(P, g, sq / n, scale, reduce_mean, mult);
  } else if (oja) {  // grad_P = k ((A P^T) P - A), A centred by the rank-one correction (oja_grad)
    float* A = tot.A;
    if (center)
      for (int64_t k = 0; k < r; ++k) {
        const double zk = tot.zsum[k] / M;
        for (int64_t j = 0; j < n; ++j) A[k * lda + j] -= float(zk * tot.csum[j]);
      }
    out.grad_P = at::empty({r, n}, g.options());
    oja_finish(A, lda, p.P, r, n, mult * oja_factor(M, n, tot.csum, tot.ssq, center, scale, reduce_mean),
               out.grad_P.data_ptr<float>());
  }
  return out;
}

// ---------------------------------------------------------------------------------------------

struct LowRankLinear : public torch::autograd::Function<LowRankLinear> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                        const c10::optional<Tensor>& bias, const Tensor& Q, const Tensor& P, bool center,
                        int64_t scale, bool reduce_mean, const Tensor& loss_scale) {
    ctx->save_for_backward({x, Q, P});
    // raftorch.functional.LossScale's tensor, read when the backward runs (not when saved)
    ctx->saved_data["loss_scale"] = loss_scale;
    ctx->saved_data["center"] = center;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["mean"] = reduce_mean;
    ctx->saved_data["bias"] = bias.has_value();
    return at::linear(x, weight, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // grad mode is on inside a backward exactly under create_graph=True (double backward)
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "raftorch.Linear (low-rank rule): backward with create_graph=True (double backward) is "
                "not defined for a feedback rule; use rule='bp' (exactly nn.Linear / nn.Conv2d) for "
                "higher-order gradients");
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &Q = saved[1], &P = saved[2];
    // inputs that are tensors, in order (an absent bias is not one)
    const int b = ctx->saved_data["bias"].toBool() ? 1 : 0;
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1),
               need_b = b && ctx->needs_input_grad(2), need_Q = ctx->needs_input_grad(2 + b),
               need_P = ctx->needs_input_grad(3 + b);
    const bool center = ctx->saved_data["center"].toBool();
    const int64_t scale = ctx->saved_data["scale"].toInt();
    const bool mean = ctx->saved_data["mean"].toBool();
    // Oja's update times c (1 / c for scale none): see raftorch.functional.LossScale
    const double c = ctx->saved_data["loss_scale"].toTensor().item<double>();
    const double mult = scale == kNone ? 1.0 / c : c;
    const Tensor g = grads[0].reshape({-1, grads[0].size(-1)});
    const Tensor x2 = x.reshape({-1, x.size(-1)});
    // grad_Q = x^T z = x^T g P^T = (P grad_W)^T: r n m multiply-adds once grad_W exists,
    // instead of r M m over the rows; taken where it is less work (M = batch x tokens > n)
    const bool q_from_w = need_Q && need_w && g.size(0) > g.size(1);
    const bool q_rows = need_Q && !q_from_w;
    const bool thin = need_x || q_rows || need_P;
    const bool stats = need_b || (need_P && (center || scale != kNone));
    Tensor grad_x, grad_w, grad_b, grad_Q, grad_P;
    bool fused = thin && fusable(g) && fusable(P) && P.size(0) <= kMaxFusedRank;
    fused = fused && (!q_rows || fusable(x2)) && (!need_x || fusable(Q));
    if (fused) {
      Fused f = fused_backward(g, x2, Q, P, stats, need_x, need_P, q_rows, center, scale, mean, mult);
      grad_b = f.colsum, grad_Q = f.grad_Q, grad_P = f.grad_P;
      if (need_x) grad_x = f.grad_x.view(x.sizes());
    } else {  // other dtypes and layouts: the same steps as ATen operations
      if (stats) grad_b = g.sum(0);
      if (thin) {
        const Tensor zt = at::mm(P, g.t());
        if (need_P) grad_P = oja_grad(P, g, zt, grad_b, center, scale, mean, mult);
        if (q_rows) grad_Q = at::mm(zt, x2).t();
        if (need_x) grad_x = at::mm(zt.t(), Q.t()).view(x.sizes());
      }
    }
    if (need_w) grad_w = at::mm(g.t(), x2);
    if (q_from_w) grad_Q = at::mm(P, grad_w).t();
    return {grad_x, grad_w, need_b ? grad_b : Tensor(), grad_Q, grad_P,
            Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor lowrank_linear(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
                      const Tensor& Q, const Tensor& P, bool center, int64_t scale,
                      bool reduce_mean, const Tensor& loss_scale) {
  return LowRankLinear::apply(x, weight, bias, Q, P, center, scale, reduce_mean, loss_scale);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lowrank_linear", &lowrank_linear,
        "y = x W^T + b with the low-rank feedback backward (rules fa-lowrank, raf-q, raf)");
}
