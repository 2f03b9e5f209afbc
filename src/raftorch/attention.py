r"""``nn.MultiheadAttention`` trained with a feedback rule: q, k, v and the output projection
each get their own feedback path.

``torch.nn.MultiheadAttention`` never calls a ``Linear`` for its input projection: it hands
the packed weight ``in_proj_weight`` ``(3E, E)`` to ``F.multi_head_attention_forward``. So
:class:`MultiheadAttention` subclasses it (same attributes, same ``state_dict`` keys
``in_proj_weight``, ``in_proj_bias`` (or ``q/k/v_proj_weight`` when ``kdim``/``vdim``
differ), ``out_proj.weight``, ``out_proj.bias``, ``bias_k``, ``bias_v``), keeps the packed
parameters, and computes the input projection with one custom autograd Function per
``linear`` call that PyTorch makes (one packed call for self-attention), whose forward is that
same ``F.linear`` (the forward output is PyTorch's, bit for bit) and whose backward splits the
output gradient ``g = [g_q | g_k | g_v]`` into its three parts:

* ``grad_W = g^T x`` and ``grad_b = sum_rows g`` (exact, as for every rule);
* the error sent to the input is ``sum_i g_i B_i^T`` over the parts projected from that
  input, with ``B_i`` (``fa``, ``kp``; ``kp`` learns ``grad_B_i = grad_W_i^T``) or
  ``Q_i P_i`` (low-rank rules; ``grad_Q_i = x^T (g_i P_i^T)``, Oja's rule on ``P_i`` from
  ``g_i``), exactly the arithmetic of :class:`raftorch.Linear` on that part.

For ``bp`` the projections are PyTorch's own ``F.linear`` calls (plain autograd, so second
derivatives are exact too); the feedback rules refuse ``create_graph=True``.

The feedback parameters live in the submodules ``q_feedback``, ``k_feedback`` and
``v_feedback`` (:class:`ProjectionFeedback`); ``out_proj`` is a :class:`raftorch.Linear`.
Design choice: the packed parameter is kept (rather than three separate ``Linear`` weights
with a ``state_dict`` hook) so the original ``state_dict`` loads as it is (``strict=False``:
only the feedback parameters are missing from it), optimizers and weight tying see the same
``Parameter``, and PyTorch's fused inference path (used by ``nn.TransformerEncoderLayer`` in
eval mode without grad) reads the same weights. When no gradient can flow (grad mode off, or
neither the inputs nor any parameter requires grad), the forward is
``nn.MultiheadAttention.forward`` itself (fast path included), so inference equals the
original module's exactly; otherwise it follows the same sequence of operations
as ``F.multi_head_attention_forward`` (tested ``torch.equal`` for ``batch_first``, masks,
``need_weights``, ``is_causal``, ``bias_k``/``add_zero_attn`` and ``kdim``/``vdim``).

The attention product itself (``softmax(q k^T / sqrt(d)) v``, dropout) keeps its exact
autograd backward, as in :class:`raftorch.models.vit.Attention`.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import Function

from raftorch.functional import LossScale, autocast_inputs, lowrank_feedback, no_double_backward
from raftorch.layers import Linear, init_feedback_, parse_options
from raftorch.rules import check_rank, get_rule

__all__ = ["MultiheadAttention", "ProjectionFeedback"]


class ProjectionFeedback(nn.Module):
    r"""The feedback path of one input projection (``q``, ``k`` or ``v``) of
    :class:`MultiheadAttention`: like a :class:`raftorch.Linear` from ``n_in`` to ``n_out``
    features without the forward weight (that is a slice of the packed ``in_proj_weight``).

    Parameters: ``B`` ``(n_in, n_out)`` for ``fa``/``kp``; ``Q`` ``(n_in, r)``, ``P``
    ``(r, n_out)`` for the low-rank rules (``r`` clamped to ``min(n_in, n_out)``); none for
    ``bp``. Initialised by :func:`raftorch.layers.init_feedback_` with fan-in ``n_in``.
    Options as :class:`raftorch.Linear` (Oja options, ``error_clamp``, :func:`raftorch.loss_scale`),
    except ``oja_source="target"`` (an output-layer option); ``error_clamp`` clamps the whole
    error one projection call sends to its input (the sum over its parts).
    """

    def __init__(self, part: str, n_in: int, n_out: int, rule, rank=None, *, device=None,
                 dtype=None, **options):
        super().__init__()
        self.part, self.n_in, self.n_out = part, int(n_in), int(n_out)
        self.rule = get_rule(rule)
        if self.rule.path != "transpose" and min(self.n_in, self.n_out) < 1:
            raise ValueError(f"the {part} projection ({self.n_in} -> {self.n_out} features) with rule "
                             f"{self.rule.name!r}: a feedback rule needs at least one input and one output")
        self.rank = check_rank(self.rule, rank, min(n_in, n_out), layer=f"the {part} projection")
        self.oja, self.error_clamp = parse_options(self.rule, options)
        # the factor the current backward's loss was multiplied by (raftorch.loss_scale)
        self.scale_slot = LossScale() if self.oja is not None else None
        if self.oja is not None and self.oja.source == "target":
            raise ValueError("oja_source='target' is only meaningful for a Linear output layer, "
                             "not an attention projection")
        for name, shape in self.feedback_shapes().items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape, device=device, dtype=dtype),
                                                       requires_grad=name in self.rule.learns))
        init_feedback_(self, self.n_in)

    def feedback_shapes(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the feedback parameters (empty for ``bp``)."""
        if self.rule.path == "full":
            return {"B": (self.n_in, self.n_out)}
        if self.rule.path == "lowrank":
            return {"Q": (self.n_in, self.rank), "P": (self.rank, self.n_out)}
        return {}

    def tensors(self) -> list[Tensor]:
        """The feedback parameters of this projection in the rule's ``feedback_names`` order (``B``, or ``Q``
        and ``P``), as the projection's autograd function takes them."""
        return [getattr(self, n) for n in self.rule.feedback_names]

    @torch.no_grad()
    def feedback_matrix(self, weight: Tensor) -> Tensor:
        """The effective ``B`` ``(n_in, n_out)``: ``weight^T`` for bp, ``B``, or ``Q P``."""
        if self.rule.path == "lowrank":
            return self.Q @ self.P
        if self.rule.path == "full":
            return self.B.detach().clone()
        return weight.t().clone()

    def extra_repr(self) -> str:
        rank = f", rank={self.rank}" if self.rank is not None else ""
        return f"{self.part}: {self.n_in} -> {self.n_out}, rule={self.rule.name!r}{rank}"


class _ProjectionPlan:
    """The parts of one projection call: for each, its feedback path, Oja options, output
    width and how many feedback tensors it passes."""

    def __init__(self, parts: list[ProjectionFeedback]):
        self.path = parts[0].rule.path
        self.clamp = parts[0].error_clamp
        self.parts = [(p.oja, p.scale_slot, p.n_out, len(p.rule.feedback_names)) for p in parts]


class _Projection(Function):
    """``y = F.linear(x, W, b)`` with ``W``'s rows split into consecutive parts, each sending
    its share of the error down through its own feedback path (``fa``/``kp``: ``B_i``;
    low-rank rules: ``Q_i P_i``; see the module docstring). ``bp`` does not come here."""

    @staticmethod
    def forward(ctx, plan: _ProjectionPlan, x, weight, bias, *feedback):
        x, weight, bias, *feedback = autocast_inputs(x, weight, bias, *feedback)
        ctx.plan = plan
        ctx.save_for_backward(x, *feedback)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        no_double_backward("raftorch.MultiheadAttention (feedback rule)")
        plan = ctx.plan
        x, *feedback = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[1:4]
        need_fb = ctx.needs_input_grad[4:]
        g2 = g.reshape(-1, g.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        grads_fb: list[Tensor | None] = [None] * len(feedback)
        grad_w = g2.t() @ x2 if need_w or (plan.path == "full" and any(need_fb)) else None
        grad_b = None
        if need_b:  # summed as autograd sums it after F.linear's matmul + add_ (3-d, strided x)
            fused = x.dim() <= 2 or (x.dim() == 3 and x.is_contiguous())
            grad_b = g2.sum(0) if fused else g.sum(tuple(range(g.dim() - 1)))
        grad_x = None
        start = j = 0
        for oja, scale, width, count in plan.parts:
            gi = g2[:, start:start + width]
            if plan.path == "full":
                part_x = gi @ feedback[j].t() if need_x else None
                if need_fb[j]:  # kp: grad_B_i = grad_W_i^T
                    grads_fb[j] = grad_w[start:start + width].t()
            else:
                Q, P = feedback[j], feedback[j + 1]
                part_x, grads_fb[j], grads_fb[j + 1], _, _ = lowrank_feedback(
                    gi, x2, Q, P, oja, need_x, need_fb[j], need_fb[j + 1], scale=scale)
            if part_x is not None:
                grad_x = part_x if grad_x is None else grad_x + part_x
            start, j = start + width, j + count
        if grad_x is not None:
            grad_x = grad_x.view(x.shape)
            if plan.clamp is not None:  # error_clamp: on the whole error this call sends down
                grad_x = grad_x.clamp(-plan.clamp, plan.clamp)
        return (None, grad_x, grad_w if need_w else None, grad_b, *grads_fb)


def _split_heads_first(proj: Tensor, parts: int, width: int) -> Tensor:
    """``(..., parts * width)`` -> ``(parts, ..., width)``, contiguous (PyTorch's layout)."""
    return proj.unflatten(-1, (parts, width)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()


class MultiheadAttention(nn.MultiheadAttention):
    r"""``torch.nn.MultiheadAttention`` whose four projections learn with a feedback rule.

    Args: as ``torch.nn.MultiheadAttention``, plus ``rule``, ``rank`` (for each of q, k, v
    and ``out_proj``, clamped per projection) and ``**options`` (Oja options) as
    :class:`raftorch.Linear`. :meth:`from_torch` converts an existing module (what
    :func:`raftorch.convert` does); :meth:`to_torch` gives the plain module back.

    ``forward`` takes the arguments of ``nn.MultiheadAttention.forward`` and returns the same
    ``(attn_output, attn_weights)``, bit for bit (see the module docstring).
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim=None, vdim=None,
                 batch_first: bool = False, *, rule: str = "raf", rank=None, device=None,
                 dtype=None, **options):
        super().__init__(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim,
                         vdim, batch_first, device=device, dtype=dtype)
        self._setup(rule, rank, options)

    def _setup(self, rule, rank, options) -> None:
        factory = {"device": self.out_proj.weight.device, "dtype": self.out_proj.weight.dtype}
        old = self.out_proj
        self.out_proj = Linear(self.embed_dim, self.embed_dim, old.bias is not None, rule=rule,
                               rank=rank, **factory, **options)
        self.out_proj.weight = old.weight
        if old.bias is not None:
            self.out_proj.bias = old.bias
        self.out_proj.train(old.training)
        E = self.embed_dim
        for part, n_in in (("q", E), ("k", self.kdim), ("v", self.vdim)):
            self.add_module(f"{part}_feedback",
                            ProjectionFeedback(part, n_in, E, rule, rank, **factory, **options))
        self.rule, self.rank = self.out_proj.rule, self.out_proj.rank

    @classmethod
    def from_torch(cls, old: nn.MultiheadAttention, rule: str = "raf", rank=None, **options):
        """The converted twin of ``old``, holding ``old``'s own ``Parameter`` objects (so its
        forward output is ``old``'s and tied parameters stay tied), with new feedback paths."""
        new = cls.__new__(cls)
        for key, value in old.__dict__.items():  # the module's own dicts are copied, not shared
            new.__dict__[key] = copy.copy(value) if isinstance(value, dict) else value
        new._setup(rule, rank, options)
        return new

    def to_torch(self) -> nn.MultiheadAttention:
        """A plain ``nn.MultiheadAttention`` with this module's parameters (the same
        ``Parameter`` objects) and no feedback paths."""
        # assembled from this module's attributes: nn.MultiheadAttention's constructor would draw
        # new weights and cannot take existing Parameters
        plain = nn.MultiheadAttention.__new__(nn.MultiheadAttention)
        nn.Module.__init__(plain)
        for key, value in self.__dict__.items():
            if key not in ("_parameters", "_buffers", "_modules", "rule", "rank"):
                plain.__dict__[key] = value
        plain.__dict__["_parameters"] = dict(self._parameters)
        plain.__dict__["_buffers"] = dict(self._buffers)
        out = nn.utils.skip_init(nn.modules.linear.NonDynamicallyQuantizableLinear, self.embed_dim,
                                 self.embed_dim, self.out_proj.bias is not None,
                                 device=self.out_proj.weight.device, dtype=self.out_proj.weight.dtype)
        out.weight = self.out_proj.weight
        if self.out_proj.bias is not None:
            out.bias = self.out_proj.bias
        out.train(self.out_proj.training)
        plain.__dict__["_modules"] = {"out_proj": out}
        return plain

    def projection_feedback(self) -> list[tuple[str, ProjectionFeedback, Tensor]]:
        """``(part, feedback, weight)`` for q, k, v: each part's feedback path and the slice
        of the forward weight it stands for ``(E, n_in)``."""
        E = self.embed_dim
        if self._qkv_same_embed_dim:
            weights = [self.in_proj_weight[i * E:(i + 1) * E] for i in range(3)]
        else:
            weights = [self.q_proj_weight, self.k_proj_weight, self.v_proj_weight]
        return [(p, getattr(self, f"{p}_feedback"), w) for p, w in zip("qkv", weights)]

    # ------------------------------------------------------------------ forward

    def _project(self, x: Tensor, weight: Tensor, bias, parts: str) -> Tensor:
        """``F.linear(x, weight, bias)`` whose output is the concatenation of ``parts``
        (``"qkv"``, ``"kv"`` or one of them), each with its own feedback path."""
        fbs = [getattr(self, f"{p}_feedback") for p in parts]
        if fbs[0].rule.path == "transpose":  # bp: plain autograd (double backward included)
            return F.linear(x, weight, bias)
        tensors = [t for fb in fbs for t in fb.tensors()]
        return _Projection.apply(_ProjectionPlan(fbs), x, weight, bias, *tensors)

    def _in_projection(self, q: Tensor, k: Tensor, v: Tensor):
        E = self.embed_dim
        b = self.in_proj_bias
        if not self._qkv_same_embed_dim:
            bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
            return (self._project(q, self.q_proj_weight, bq, "q"),
                    self._project(k, self.k_proj_weight, bk, "k"),
                    self._project(v, self.v_proj_weight, bv, "v"))
        w = self.in_proj_weight
        if k is v and q is k:
            proj = _split_heads_first(self._project(q, w, b, "qkv"), 3, E)
            return proj[0], proj[1], proj[2]
        if k is v:
            w_q, w_kv = w.split([E, 2 * E])
            b_q, b_kv = (None, None) if b is None else b.split([E, 2 * E])
            kv = _split_heads_first(self._project(k, w_kv, b_kv, "kv"), 2, E)
            return self._project(q, w_q, b_q, "q"), kv[0], kv[1]
        (w_q, w_k, w_v), (b_q, b_k, b_v) = w.chunk(3), ((None,) * 3 if b is None else b.chunk(3))
        return (self._project(q, w_q, b_q, "q"), self._project(k, w_k, b_k, "k"),
                self._project(v, w_v, b_v, "v"))

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask=None,
                need_weights: bool = True, attn_mask=None, average_attn_weights: bool = True,
                is_causal: bool = False):
        if not (torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (query, key, value, *self.parameters()))):
            # nothing to learn from this call: PyTorch's own forward (and its fast path)
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)
        if query.is_nested or key.is_nested or value.is_nested:
            raise ValueError("raftorch.MultiheadAttention does not take nested tensors when training")
        # F._canonical_mask / F._none_or_dtype / F._mha_shape_check (private, no public API exists):
        # nn.MultiheadAttention.forward and F.multi_head_attention_forward check and convert the masks
        # (bool -> additive float in the query's dtype, with PyTorch's errors and warnings) and the
        # input shapes with them; calling the same helpers keeps this forward equal to PyTorch's.
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask),
                                             other_name="attn_mask", target_type=query.dtype)
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None,
                                      other_name="", target_type=query.dtype, check_other=False)
        batched = query.dim() == 3
        if self.batch_first and batched:  # to (L, N, E), keeping which inputs are the same tensor
            same_qk, same_kv = query is key, key is value
            query = query.transpose(1, 0)
            key = query if same_qk else key.transpose(1, 0)
            value = key if same_kv else value.transpose(1, 0)
        out, weights = self._attention(query, key, value, key_padding_mask, need_weights,
                                       attn_mask, average_attn_weights, is_causal)
        if self.batch_first and batched:
            out = out.transpose(1, 0)
        return out, weights

    def _attention(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                   average_attn_weights, is_causal):
        """``F.multi_head_attention_forward``'s sequence of operations on ``(L, N, E)``
        inputs, with the input projection of :meth:`_in_projection` and ``out_proj`` called
        as a module."""
        h = self.num_heads
        # private torch helpers, as in forward (no public API exists): PyTorch's own shape and mask checks
        batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, h)
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, E = query.shape
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask),
                                             other_name="attn_mask", target_type=query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("is_causal=True needs attn_mask (e.g. "
                               "nn.Transformer.generate_square_subsequent_mask)")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None
        else:
            attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None,
                                          other_name="", target_type=query.dtype, check_other=False)
            if key_padding_mask is not None:
                is_causal = False
        d = E // h
        q, k, v = self._in_projection(query, key, value)
        if attn_mask is not None and attn_mask.dim() == 2:
            attn_mask = attn_mask.unsqueeze(0)
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        q = q.view(tgt_len, bsz * h, d).transpose(0, 1)
        k = k.view(k.shape[0], bsz * h, d).transpose(0, 1)
        v = v.view(v.shape[0], bsz * h, d).transpose(0, 1)
        if self.add_zero_attn:
            zeros = torch.zeros((bsz * h, 1, d), dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros.to(v.dtype)], dim=1)
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        src_len = k.size(1)
        if key_padding_mask is not None:
            key_padding_mask = (key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, h, -1, -1)
                                .reshape(bsz * h, 1, src_len))
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        p = self.dropout if self.training else 0.0
        if need_weights:
            q_scaled = q * math.sqrt(1.0 / float(d))
            if attn_mask is not None:
                scores = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            else:
                scores = torch.bmm(q_scaled, k.transpose(-2, -1))
            weights = F.softmax(scores, dim=-1)
            if p > 0.0:
                weights = F.dropout(weights, p=p)
            out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, E)
            out = self.out_proj(out)
            out = out.view(tgt_len, bsz, out.size(1))
            weights = weights.view(bsz, h, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                out, weights = out.squeeze(1), weights.squeeze(0)
            return out, weights
        if attn_mask is not None:
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(bsz, h, -1, src_len)
        out = F.scaled_dot_product_attention(q.view(bsz, h, tgt_len, d), k.view(bsz, h, src_len, d),
                                             v.view(bsz, h, src_len, d), attn_mask, p, is_causal)
        out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, E)
        out = self.out_proj(out)
        out = out.view(tgt_len, bsz, out.size(1))
        return (out if batched else out.squeeze(1)), None
