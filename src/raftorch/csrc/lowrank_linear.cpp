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

// s2 (the scale, times the rows M) and the floor below which the signal counts as constant,
// as in oja_grad: var_j M = sum_i e_ij^2 - (sum_i e_ij)^2 / M.
std::pair<double, double> oja_scale(const Tensor& e, const Tensor& colsum, bool center,
                                    int64_t scale) {
  const int64_t M = e.size(0), n = e.size(1);
  if (e.device().is_cpu() && e.scalar_type() == at::kFloat && e.is_contiguous() &&
      colsum.is_contiguous()) {
    std::vector<float> sq(n, 0.f);
    const float* pe = e.const_data_ptr<float>();
    float* s = sq.data();
    for (int64_t i = 0; i < M; ++i) {
      const float* row = pe + i * n;
      for (int64_t j = 0; j < n; ++j) s[j] += row[j] * row[j];
    }
    const float* pc = colsum.const_data_ptr<float>();
    double mx = 0.0, sum = 0.0, tot = 0.0;
    for (int64_t j = 0; j < n; ++j) {
      const double v = center ? double(s[j]) - double(pc[j]) * pc[j] / M : double(s[j]);
      mx = std::max(mx, v);
      sum += v;
      tot += s[j];
    }
    return {scale == kMaxStd ? mx : sum / n, 1e-6 * tot / n + 1e-30 * M};
  }
  Tensor sq = (e * e).sum(0);
  Tensor var = center ? at::addcmul(sq, colsum, colsum, -1.0 / M) : sq;
  const double s2 = (scale == kMaxStd ? var.max() : var.mean()).item<double>();
  return {s2, 1e-6 * sq.mean().item<double>() + 1e-30 * M};
}

// grad_P = k ((A P^T) P - A) with A = z_c^T e, see oja_grad.
Tensor oja_grad(const Tensor& P, const Tensor& e, const Tensor& zt, const Tensor& colsum,
                bool center, int64_t scale, bool reduce_mean) {
  const int64_t M = e.size(0);
  Tensor A = at::mm(zt, e);
  if (center) A.addr_(zt.sum(1), colsum, 1.0, -1.0 / M);
  double k = reduce_mean ? 1.0 / M : 1.0;
  if (scale != kNone) {
    const auto [s2, floor] = oja_scale(e, colsum, center, scale);
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
    // passes over g first, while it is in cache (see lowrank_feedback)
    if (need_b || (need_P && (center || scale != kNone))) grad_b = g.sum(0);
    if (need_x || need_Q || need_P) zt = at::mm(P, g.t());
    if (need_P)
      grad_P = oja_grad(P, g, zt, grad_b, center, scale, ctx->saved_data["mean"].toBool());
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
