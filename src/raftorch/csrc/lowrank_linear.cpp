// The low-rank feedback Linear (rules fa-lowrank, raf-q, raf) as one C++ autograd Function.
//
// Same arithmetic as raftorch.functional.LinearLowRankFeedback + lowrank_feedback + oja_grad
// (see their docstrings for the equations); only the Python dispatch between the ~20 small
// operations of the backward is gone, and Oja's per-feature statistics on a float32 CPU
// signal come from one pass instead of four. Built on first use by raftorch._ext.
#include <torch/extension.h>

#include <algorithm>
#include <vector>

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

enum Scale : int64_t { kNone = 0, kMaxStd = 1, kRms = 2 };

bool fusable(const Tensor& e) {
  return e.device().is_cpu() && e.scalar_type() == at::kFloat && e.is_contiguous();
}

// Column sums and sums of squares of a float32 CPU matrix in one pass, four rows at a time
// (one load and store of the accumulators per four rows), in blocks of 256 rows whose float
// partial sums are added up in double (the error does not grow with the number of rows).
Tensor column_stats(const Tensor& e, std::vector<float>& sq) {
  const int64_t M = e.size(0), n = e.size(1);
  const float* pe = e.const_data_ptr<float>();
  std::vector<float> c(n), s(n);
  std::vector<double> c_total(n, 0.0), s_total(n, 0.0);
  for (int64_t start = 0; start < M; start += 256) {
    const int64_t end = std::min(M, start + 256);
    std::fill(c.begin(), c.end(), 0.f);
    std::fill(s.begin(), s.end(), 0.f);
    float* cp = c.data();
    float* sp = s.data();
    int64_t i = start;
    for (; i + 4 <= end; i += 4) {
      const float *r0 = pe + i * n, *r1 = r0 + n, *r2 = r1 + n, *r3 = r2 + n;
      for (int64_t j = 0; j < n; ++j) {
        cp[j] += (r0[j] + r1[j]) + (r2[j] + r3[j]);
        sp[j] += (r0[j] * r0[j] + r1[j] * r1[j]) + (r2[j] * r2[j] + r3[j] * r3[j]);
      }
    }
    for (; i < end; ++i) {
      const float* r0 = pe + i * n;
      for (int64_t j = 0; j < n; ++j) {
        cp[j] += r0[j];
        sp[j] += r0[j] * r0[j];
      }
    }
    for (int64_t j = 0; j < n; ++j) {
      c_total[j] += cp[j];
      s_total[j] += sp[j];
    }
  }
  Tensor colsum = at::empty({n}, e.options());
  float* out = colsum.data_ptr<float>();
  sq.resize(n);
  for (int64_t j = 0; j < n; ++j) {
    out[j] = float(c_total[j]);
    sq[j] = float(s_total[j]);
  }
  return colsum;
}

// s2 (the scale, times the rows M) and the floor below which the signal counts as constant,
// as in oja_grad: var_j M = sum_i e_ij^2 - (sum_i e_ij)^2 / M. `sq` holds the sums of
// squares when column_stats made them, else is empty.
std::pair<double, double> oja_scale(const Tensor& e, const Tensor& colsum,
                                    const std::vector<float>& sq, bool center, int64_t scale) {
  const int64_t M = e.size(0), n = e.size(1);
  if (!sq.empty()) {
    const float* pc = colsum.const_data_ptr<float>();
    double mx = 0.0, sum = 0.0, tot = 0.0;
    for (int64_t j = 0; j < n; ++j) {
      const double v = center ? double(sq[j]) - double(pc[j]) * pc[j] / M : double(sq[j]);
      mx = std::max(mx, v);
      sum += v;
      tot += sq[j];
    }
    return {scale == kMaxStd ? mx : sum / n, 1e-6 * tot / n + 1e-30 * M};
  }
  Tensor sqt = (e * e).sum(0);
  Tensor var = center ? at::addcmul(sqt, colsum, colsum, -1.0 / M) : sqt;
  const double s2 = (scale == kMaxStd ? var.max() : var.mean()).item<double>();
  return {s2, 1e-6 * sqt.mean().item<double>() + 1e-30 * M};
}

// grad_P = k ((A P^T) P - A) with A = z_c^T e, see oja_grad.
Tensor oja_grad(const Tensor& P, const Tensor& e, const Tensor& zt, const Tensor& colsum,
                const std::vector<float>& sq, bool center, int64_t scale, bool reduce_mean) {
  const int64_t M = e.size(0);
  Tensor A = at::mm(zt, e);
  if (center) A.addr_(zt.sum(1), colsum, 1.0, -1.0 / M);
  double k = reduce_mean ? 1.0 / M : 1.0;
  if (scale != kNone) {
    const auto [s2, floor] = oja_scale(e, colsum, sq, center, scale);
    k = s2 > floor ? k * M / s2 : 0.0;
  }
  return at::addmm(A, at::mm(A, P.t()), P, -k, k);
}

struct LowRankLinear : public torch::autograd::Function<LowRankLinear> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                        const c10::optional<Tensor>& bias, const Tensor& Q, const Tensor& P, bool center,
                        int64_t scale, bool reduce_mean) {
    ctx->save_for_backward({x, Q, P});
    ctx->saved_data["center"] = center;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["mean"] = reduce_mean;
    ctx->saved_data["bias"] = bias.has_value();
    return at::linear(x, weight, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &Q = saved[1], &P = saved[2];
    // inputs that are tensors, in order (an absent bias is not one)
    const int b = ctx->saved_data["bias"].toBool() ? 1 : 0;
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1),
               need_b = b && ctx->needs_input_grad(2), need_Q = ctx->needs_input_grad(2 + b),
               need_P = ctx->needs_input_grad(3 + b);
    const bool center = ctx->saved_data["center"].toBool();
    const int64_t scale = ctx->saved_data["scale"].toInt();
    const Tensor g = grads[0].reshape({-1, grads[0].size(-1)});
    const Tensor x2 = x.reshape({-1, x.size(-1)});
    Tensor grad_x, grad_w, grad_b, grad_Q, grad_P, zt;
    std::vector<float> sq;
    // passes over g first, while it is in cache (see lowrank_feedback)
    if (need_P && scale != kNone && fusable(g))
      grad_b = column_stats(g, sq);
    else if (need_b || (need_P && (center || scale != kNone)))
      grad_b = g.sum(0);
    if (need_x || need_Q || need_P) zt = at::mm(P, g.t());
    if (need_P)
      grad_P = oja_grad(P, g, zt, grad_b, sq, center, scale, ctx->saved_data["mean"].toBool());
    if (need_w) grad_w = at::mm(g.t(), x2);
    if (need_Q) grad_Q = at::mm(zt, x2).t();
    if (need_x) grad_x = at::mm(zt.t(), Q.t()).view(x.sizes());
    return {grad_x, grad_w, need_b ? grad_b : Tensor(), grad_Q, grad_P,
            Tensor(), Tensor(), Tensor()};
  }
};

Tensor lowrank_linear(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
                      const Tensor& Q, const Tensor& P, bool center, int64_t scale,
                      bool reduce_mean) {
  return LowRankLinear::apply(x, weight, bias, Q, P, center, scale, reduce_mean);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lowrank_linear", &lowrank_linear,
        "y = x W^T + b with the low-rank feedback backward (rules fa-lowrank, raf-q, raf)");
}
