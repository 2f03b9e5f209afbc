"""The arithmetic of every feedback path, as ``torch.autograd.Function``s.

Notation (row convention, a batch of ``M`` rows; token tensors ``(N, T, D)`` are flattened to
``M = N T`` rows, convolution error maps to ``M = N H W`` pixels):

* ``x``  the layer input ``h_l``, ``(M, n_in)``; ``g`` the error at its output
  ``delta_{l+1}`` (``grad_output``), ``(M, n_out)``; ``W`` the weight ``(n_out, n_in)``.
* Every path keeps the weight update exact: ``grad_W = g^T x``, ``grad_b = sum_rows g``.
* Only ``grad_input`` (the error sent down) changes, and the feedback parameters receive
  their *local* updates in ``.grad``, so any ``torch.optim`` optimizer, weight decay,
  gradient clipping, AMP and DDP all-reduce apply to them unchanged.

Full-rank path (rules ``bp``, ``fa``, ``kp``), ``B`` of shape ``(n_in, n_out)``::

    grad_input = g B^T                  (bp passes B = W^T, detached)
    grad_B     = x^T g = grad_W^T       (only if B learns: Kolen-Pollack, dB = -eta h delta^T)

Low-rank path (rules ``fa-lowrank``, ``raf-q``, ``raf``), ``Q (n_in, r)``, ``P (r, n_out)``::

    z          = g P^T                  (M, r)   the low-dimensional error
    grad_input = z Q^T                  (M, n_in)
    grad_Q     = x^T z = (P grad_W)^T   (only if Q learns: Kolen-Pollack-like, dQ = -eta h z^T)
    grad_P     = -(z_n^T e_n - (z_n^T z_n) P) / M        (only if P learns: Oja's subspace rule)

where ``e_n`` is the Oja signal (the error ``g`` or, on an output layer with
``oja_source="target"``, the targets), centred and scaled as :class:`OjaOptions` says, and
``z_n = e_n P^T``. Gradient *descent* on ``grad_P`` is Oja's ascent
``dP = eta (z e^T - z z^T P)``, whose averaged flow ``dP/dt = eta (P C - P C P^T P)`` drives the
rows of ``P`` to an orthonormal basis of the top-``r`` principal subspace of
``C = E[e e^T]``.

Convolutions: ``B`` (``fa``/``kp``) has the weight's shape and is used like the transpose of
the forward convolution; ``P`` ``(r, C_out)`` acts as a 1x1 convolution on the error map and
``Q`` ``(r, C_in / groups, kH, kW)`` is the kernel of a virtual convolution ``x -> z`` with the
forward geometry, whose exact transpose brings ``z`` back to the input
(``grad_input = conv_transpose(z, Q)``, ``grad_Q = conv_weight_grad(x, z)``). Every pixel is
one sample of Oja's covariance.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function

from raftorch import extension

OJA_SCALES = ("maxstd", "rms", "std", "none")
OJA_REDUCES = ("mean", "sum")
OJA_SOURCES = ("error", "target")


@dataclass(frozen=True)
class OjaOptions:
    """How the signal ``e`` that drives Oja's rule on ``P`` is prepared.

    Oja's update is quadratic in ``e``, so its scale sets the effective learning rate of ``P``.

    * ``source``: ``"error"`` (``e = grad_output``, the default, eq. 11 of the paper) or
      ``"target"`` (``e = the targets`` fed with :func:`raftorch.feed_targets`; the paper's
      appendix does this for the output layer).
    * ``center``: subtract the per-feature mean over the batch (default ``True``).
    * ``scale``: divide ``e`` by its largest per-feature standard deviation (``"maxstd"``, the
      default, as in the authors' layer-wise code), by its root-mean-square (``"rms"``: the
      square root of the mean over features of the per-feature variances), **each feature by
      its own** standard deviation (``"std"``, as in the authors' dRAF) or not at all
      (``"none"``; then the update scales with the loss's batch reduction). A feature (for
      ``"std"``) or a whole signal (the scalar scales) whose variance is below
      ``1e-6`` times its mean square (plus ``1e-30`` per row) carries no direction and gives
      no update, never 0/0.
    * ``ddof``: the variance estimator of the scales, ``sum_n (e_n - mean)^2 / (M - ddof)``:
      ``0`` (population, the default) or ``1`` (unbiased, ``torch.std``, as the authors). With
      ``M - ddof <= 0`` (one row and ``ddof=1``) the update is zero. ``scale="none"`` estimates
      no variance, so ``ddof`` plays no part there (one centred row is zero anyway; one
      uncentred row updates ``P`` as with ``ddof=0``).
    * An empty signal (``M = 0``: an empty batch, or a process's empty slice under
      :func:`raftorch.sync_oja`) gives exactly zero, whatever the options.
    * ``reduce``: ``"mean"`` (default) or ``"sum"`` of the per-sample updates over the batch
      (the authors summed).
    """

    source: str = "error"
    center: bool = True
    scale: str = "maxstd"
    reduce: str = "mean"
    ddof: int = 0

    def __post_init__(self):
        for name, value, valid in (
            ("oja_source", self.source, OJA_SOURCES),
            ("oja_scale", self.scale, OJA_SCALES),
            ("oja_reduce", self.reduce, OJA_REDUCES),
        ):
            if value not in valid:
                raise ValueError(f"{name}={value!r} is not valid; choose one of {valid}")
        if not isinstance(self.center, bool):
            raise ValueError(f"oja_center must be True or False, got {self.center!r}")
        if isinstance(self.ddof, bool) or self.ddof not in (0, 1):
            raise ValueError(f"oja_ddof must be 0 or 1, got {self.ddof!r}")


def check_error_clamp(value) -> float | None:
    """``error_clamp``: ``None`` or a positive finite number ``c``; the input gradient a layer
    (or direct path) sends down is clamped to ``[-c, c]`` (the authors' backward hook, c = 1)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < float("inf")):
        raise ValueError(f"error_clamp must be None or a positive finite number, got {value!r}")
    return float(value)


class LossScale:
    """By what factor ``c`` the loss of the current backward was multiplied (set by
    :func:`raftorch.loss_scale`; 1 otherwise), held by each layer / direct feedback object.

    Every gradient but Oja's is linear in the loss, so it arrives multiplied by ``c`` and the
    training loop undoes it (``GradScaler.unscale_`` divides by ``s = c``; accumulating ``k``
    micro-batches of ``loss / k`` sums ``c = 1/k`` times each). Oja's update of ``P`` is not:
    it depends on the Oja signal ``e`` only through ``e / scale(e)`` (``maxstd``, ``rms``,
    ``std``) or quadratically (``none``), and not at all on the loss with ``oja_source="target"``.
    So that ``P`` is treated like ``W``, the layer writes ``c G(e / c)`` into ``P.grad``, where
    ``G`` is :func:`oja_grad` and ``e / c`` the signal the unscaled loss would have sent: that is
    ``c G(e)`` for the scale-invariant scales and for targets, ``G(e) / c`` for ``scale="none"``
    on the error (:meth:`multiplier`). Then ``P``'s step after unscaling / accumulation equals
    the unscaled one / the mean of the micro-batch updates, exactly as ``W``'s.

    The value lives in a 0-dim float64 CPU tensor, read when the backward runs (the C++ fast
    path reads the same tensor).

    Distributed data parallel (``group`` set by :func:`raftorch.sync_oja`): each of the ``w``
    processes backpropagates its own loss (its share of the global mean, times ``w``) and DDP
    averages the gradients, i.e. divides by ``w``: a loss scale ``c = w``. With ``group`` the
    Oja statistics (mean, per-feature variances, rows) are all-reduced, so every process
    normalises by the global batch's, sums its own rows' terms, divides by the global rows
    (``reduce="mean"``), and multiplies by the extra ``c = w`` (``1 / w`` for ``scale="none"``
    on the error): the average over the processes is then the single-process ``grad_P`` of the
    global batch.
    """

    __slots__ = ("tensor", "group")

    def __init__(self):
        # on the CPU even inside ``with torch.device("meta" / "cuda")`` (a host scalar)
        self.tensor = torch.ones((), dtype=torch.float64, device="cpu")
        self.group = None  # a torch.distributed process group: all-reduce Oja's statistics

    @property
    def value(self) -> float:
        return float(self.tensor.item())

    def multiplier(self, opts: "OjaOptions", on_error: bool = True) -> float:
        """The factor applied to :func:`oja_grad`'s result: ``c``, or ``1 / c`` for
        ``scale="none"`` on the error (``c`` times the world size under :func:`sync_oja`)."""
        c = self.value * (1 if self.group is None else _world(self.group))
        if c == 1.0:
            return 1.0
        return 1.0 / c if (opts.scale == "none" and on_error) else c

    def __deepcopy__(self, memo):
        new = LossScale()
        new.tensor.copy_(self.tensor)
        new.group = self.group
        return new

    def __getstate__(self):
        return {"value": self.value}

    def __setstate__(self, state):
        self.tensor = torch.full((), float(state["value"]), dtype=torch.float64, device="cpu")
        self.group = None


def _world(group) -> int:
    import torch.distributed as dist

    return dist.get_world_size(group)


def _all_reduce(t: Tensor, group) -> Tensor:
    import torch.distributed as dist

    dist.all_reduce(t, group=group)
    return t


def no_double_backward(what: str) -> None:
    """Feedback rules have no defined second derivative: refuse ``create_graph=True`` (inside a
    custom backward, grad mode is on exactly when the caller asked for ``create_graph``)."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{what}: backward with create_graph=True (double backward) is not defined for a "
            "feedback rule; use rule='bp' (exactly nn.Linear / nn.Conv2d) for higher-order gradients")


class TargetSlot:
    """Holds the targets a layer with ``oja_source="target"`` uses in its next backward."""

    __slots__ = ("value", "owner")

    def __init__(self, owner: str = "layer"):
        self.value: Tensor | None = None
        self.owner = owner

    def take(self, rows: int, n_out: int, like: Tensor) -> Tensor:
        """The held targets, emptying the slot: a ``(rows, n_out)`` tensor in ``like``'s dtype, integer class
        labels one-hot encoded; a ``RuntimeError`` if none were fed or their number is not ``rows``."""
        t = self.value
        if t is None:
            raise RuntimeError(
                f"{self.owner} learns P on the targets (oja_source='target') but no targets were "
                "given: call raftorch.feed_targets(model, targets) before loss.backward()"
            )
        self.value = None
        if t.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
            t = F.one_hot(t.reshape(-1).long(), n_out)
        t = t.reshape(-1, n_out).to(like.dtype)
        if t.shape[0] != rows:
            raise RuntimeError(
                f"{self.owner}: {t.shape[0]} targets were fed for a batch of {rows} outputs"
            )
        return t


# Read the scale on the host (``.item()``) on CPU tensors; elsewhere (and where this is set
# to False, which tests use to run the device branch on the CPU) keep it a tensor: no sync.
HOST_SCALARS = True
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def oja_grad(P: Tensor, e: Tensor, z: Tensor, opts: OjaOptions, colsum: Tensor | None = None,
             mult: float = 1.0, group=None) -> Tensor:
    """``grad_P = -(z_n^T e_n - z_n^T z_n P)`` (divided by the rows for ``reduce="mean"``),
    times ``mult`` (the loss-scale correction of :class:`LossScale`).

    ``e`` is the Oja signal ``(M, n_out)`` and ``z = e P^T`` ``(M, r)``, both uncentred
    (``z`` is fastest as a transposed view of a contiguous ``(r, M)`` tensor); ``colsum``, if
    given, is ``e.sum(0)`` (a layer's bias gradient, reused). ``e_n = (e - mean e) / s`` as
    :class:`OjaOptions` says, ``z_n = e_n P^T``.

    Fast path (float32 / float64 signals, scalar scales): centring and the scalar scale ``s``
    never touch the ``(M, n_out)`` signal: the centred ``z_n`` is orthogonal to the constant
    column, so ``z_n^T e_n = z_n^T e / s = (z^T e - (z^T 1)(1^T e) / M) / s``: a rank-one
    correction of ``A = z^T e`` (``r x n_out``). Then ``z_n^T z_n = A P^T`` (as ``P P^T`` need
    not be the identity, this is exact only because ``z_n = e_n P^T``), so
    ``grad_P = ((A P^T) P - A) / s^2``, with ``s^2 = max_j`` (``maxstd``) or ``mean_j``
    (``rms``) of ``v_j / (M - ddof)``, ``v_j = sum_n e_nj^2 - (sum_n e_nj)^2 / M``. The only
    passes over the batch are ``z^T e`` and the per-feature sums of squares for ``s``.

    Explicit path (:func:`oja_grad_explicit`), for ``scale="std"``, for float16 / bfloat16
    signals, and for a centred signal whose mean dominates its spread
    (``sum_j mean_j^2 > sum_j var_j``: the rank-one correction would cancel most digits of
    ``A``; at mean/std = 20 and 100k float32 rows it left 3% error): everything in float32,
    the signal centred before any product. Off the host (GPU, or ``HOST_SCALARS = False``) a
    centred signal always takes it: deciding would need a device sync, the extra pass is cheap.
    So does a ``group`` (statistics all-reduced over it, :class:`LossScale`).

    An empty signal (``M = 0``: an empty batch) carries no direction: the update is exactly
    zero (:func:`_no_rows`), never 0/0; with a ``group`` the statistics are still all-reduced
    (the other processes wait for them) and the global rows decide.
    """
    if e.shape[0] == 0 and group is None:
        return _no_rows(P)
    if not _oja_fast_path_fits(opts, e.dtype, P, group):
        return oja_grad_explicit(P, e, opts, mult, group)
    rows = e.shape[0]
    need_sum = opts.center or opts.scale != "none"
    if need_sum and colsum is None:
        colsum = e.sum(0)
    sq = (e * e).sum(0) if need_sum else None
    if opts.center and _mean_dominates(colsum, sq, rows):
        return oja_grad_explicit(P, e, opts, mult)
    zt = z.t()
    return _oja_from_stats(P, zt @ e, zt.sum(1) if opts.center else None, colsum, sq, rows, opts, mult)


def _no_rows(P: Tensor) -> Tensor:
    """Oja's update from a signal without rows (an empty batch): exactly zero."""
    return torch.zeros_like(P, memory_format=torch.contiguous_format)


def _oja_from_stats(P: Tensor, A: Tensor, zsum: Tensor | None, colsum: Tensor | None,
                    sq: Tensor | None, rows: int, opts: OjaOptions, mult: float) -> Tensor:
    """The rest of :func:`oja_grad`'s fast path from the batch statistics of the signal ``e``
    ``(M, n)`` and ``z = e P^T``: ``A = z^T e`` (uncentred, ``r x n``), ``zsum = z^T 1``
    (only if ``center``), ``colsum = e^T 1`` and ``sq`` the per-feature sums of squares
    (only if ``center`` or a scale). The caller has checked that this path applies (scalar
    scale, float32 / float64 on the host, mean not dominating)."""
    if opts.center:
        A = torch.addr(A, zsum, colsum, alpha=-1.0 / rows)
    grad = torch.addmm(A, A @ P.t(), P, beta=-1.0)
    reduce = rows if opts.reduce == "mean" else 1
    if opts.scale == "none":
        return grad.mul_(mult / reduce)
    # per-feature variances times the rows, from one fused pass (Tensor.var over dim 0 is ~15x
    # slower on CPU); the mean does not dominate here, so the cancellation is harmless
    var = torch.addcmul(sq, colsum, colsum, value=-1.0 / rows) if opts.center else sq
    s2 = var.max() if opts.scale == "maxstd" else var.mean()
    # a (numerically) constant signal carries no direction: no update rather than 0/0
    floor = sq.mean() * 1e-6
    dof = max(rows - opts.ddof, 0)  # s^2 = v / (M - ddof): grad * (M - ddof) / v
    if _host_scalars(P):  # scalars are free to read on the CPU
        s2, floor = s2.item(), floor.item() + 1e-30 * rows
        return grad.mul_(mult * dof / (reduce * s2) if s2 > floor else 0.0)
    floor = floor + 1e-30 * rows
    return grad.mul_((s2 > floor) * (mult * dof) / (reduce * torch.maximum(s2, floor)))


def _host_scalars(t: Tensor) -> bool:
    """Whether scalars of tensors on ``t``'s device are read on the host (see ``HOST_SCALARS``)."""
    return t.device.type == "cpu" and HOST_SCALARS


def _mean_dominates(colsum: Tensor, sq: Tensor, rows: int) -> bool:
    """``sum_j M mean_j^2 > sum_j v_j``: centring by a rank-one correction would cancel digits."""
    mean_sq = (colsum @ colsum).item() / rows
    return mean_sq > sq.sum().item() - mean_sq


def _oja_fast_path_fits(opts: OjaOptions, e_dtype, P: Tensor, group) -> bool:
    """Whether :func:`oja_grad`'s statistics path may run (before the mean-dominance check)."""
    return not (opts.scale == "std" or e_dtype in _LOW_PRECISION or P.dtype in _LOW_PRECISION
                or group is not None or (opts.center and not _host_scalars(P)))


def oja_grad_explicit(P: Tensor, e: Tensor, opts: OjaOptions, mult: float = 1.0, group=None) -> Tensor:
    """:func:`oja_grad` with the normalised signal formed explicitly, in float32 (float64 stays
    float64) whatever the input dtype, returned in that dtype:
    ``e_c = e - mean e`` (if ``center``), ``v_j = sum_n e_c,nj^2``, ``d = M - ddof``,
    ``e_n = e_c / s`` with ``s^2 = max_j v_j / d`` (``maxstd``), ``mean_j v_j / d`` (``rms``),
    ``1`` (``none``), or per feature ``e_n,:j = e_c,:j / sqrt(v_j / d)`` (``std``); then
    ``z_n = e_n P^T``, ``A = z_n^T e_n``, ``grad_P = mult ((A P^T) P - A) / reduce``.

    Floors: a scalar scale below ``1e-6 mean_j sum_n e_nj^2 + 1e-30 M`` gives a zero update;
    for ``std`` a feature with ``v_j <= 1e-6 sum_n e_nj^2 + 1e-30 M`` is left out (zero).
    Sums of squares of float16 errors overflow (65504) at a loss scale of ~2^16, and the
    rank-one centring of the fast path loses every digit in bfloat16 when ``|mean| >> std``:
    hence float32 and explicit centring.

    With a process ``group`` the statistics are those of the union of every process's rows
    (two small all-reduces in float64: the column sums, sums of squares and rows; then the
    centred sums of squares): ``M``, the mean, ``v_j`` and the floors are global, the products
    ``z_n^T e_n`` cover this process's rows (:class:`LossScale` says how they add up)."""
    work = torch.float64 if e.dtype == torch.float64 else torch.float32
    e = e.to(work)
    Pw = P.to(work)
    sq = (e * e).sum(0)
    if group is None:
        rows = e.shape[0]
        mean = e.mean(0) if opts.center else None
    else:
        stats = _all_reduce(torch.cat([e.sum(0), sq, e.new_full((1,), e.shape[0])]).double(), group)
        n = e.shape[1]
        rows = int(stats[-1].item())
        mean = (stats[:n] / rows).to(work) if opts.center else None
        sq = stats[n:2 * n].to(work)
    if rows == 0:  # no rows here (nor, with a group, anywhere): no update
        return _no_rows(P)
    dof = max(rows - opts.ddof, 0)
    reduce = rows if opts.reduce == "mean" else 1
    if opts.center:
        e = e - mean
    if opts.scale != "none":
        v = (e * e).sum(0)
        if group is not None:
            v = _all_reduce(v.double(), group).to(work)
        if opts.scale == "std":
            keep = v > sq * 1e-6 + 1e-30 * rows
            inv = torch.where(keep, (dof / torch.where(keep, v, torch.ones_like(v))).sqrt(),
                              torch.zeros_like(v))
            e = e * inv
        else:
            s2 = v.max() if opts.scale == "maxstd" else v.mean()
            floor = sq.mean() * 1e-6 + 1e-30 * rows
            factor = (s2 > floor) * dof / torch.maximum(s2, floor)
            e = e * factor.sqrt()
    zn = e @ Pw.t()
    A = zn.t() @ e
    grad = torch.addmm(A, A @ Pw.t(), Pw, beta=-1.0)
    # float32 even for a float16 / bfloat16 P: autograd casts it to the dtype of the parameter
    # given to the Function (under autocast a float32 P, cast inside forward: no rounding)
    return grad.mul_(mult / reduce)


# --------------------------------------------------------------------------- autocast


def autocast_inputs(x: Tensor, *tensors):
    """Under autocast, cast the floating inputs to the autocast dtype (custom Functions are
    not autocast by PyTorch), so the forward (where autocast then has nothing left to cast)
    and the saved tensors share one dtype. A device without autocast (``meta``, whose autocast
    query PyTorch refuses) runs as it is."""
    dev = x.device.type
    if not (torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev)):
        return (x, *tensors)
    dtype = torch.get_autocast_dtype(dev)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in (x, *tensors))


# --------------------------------------------------------------------------- Linear


def clamp_error(t: Tensor | None, c: float | None) -> Tensor | None:
    """``error_clamp``: ``t`` clamped to ``[-c, c]`` in place (``t`` itself when ``t`` or ``c`` is ``None``)."""
    return t if t is None or c is None else t.clamp_(-c, c)


class LinearFullFeedback(Function):
    """``y = x W^T + b``; backward sends ``g B^T`` down (clamped to ``[-c, c]`` with
    ``error_clamp=c``); ``grad_B = grad_W^T`` if B learns."""

    @staticmethod
    def forward(ctx, x, weight, bias, B, clamp=None):
        x, weight, bias, B = autocast_inputs(x, weight, bias, B)
        ctx.save_for_backward(x, B)
        ctx.clamp = clamp
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        no_double_backward("raftorch.Linear (fa/kp)")
        x, B = ctx.saved_tensors
        need_x, need_w, need_b, need_B = ctx.needs_input_grad[:4]
        g2 = g.reshape(-1, g.shape[-1])
        grad_x = grad_w = grad_b = grad_B = None
        if need_x:
            grad_x = clamp_error((g2 @ B.t()).view(x.shape), ctx.clamp)
        if need_w or need_B:
            grad_w = g2.t() @ x.reshape(-1, x.shape[-1])
            if need_B:
                grad_B = grad_w.t()
        if need_b:
            grad_b = g2.sum(0)
        return grad_x, grad_w if need_w else None, grad_b, grad_B, None


def lowrank_feedback(g: Tensor, x: Tensor, Q: Tensor, P: Tensor, oja: OjaOptions | None,
                     need_x: bool, need_Q: bool, need_P: bool, *, targets: TargetSlot | None = None,
                     need_w: bool = False, need_b: bool = False, scale: LossScale | None = None,
                     clamp: float | None = None):
    """The low-rank feedback path for rows ``g`` ``(M, n_out)`` arriving at activity ``x``
    ``(M, n_in)``: ``(g P^T Q^T, x^T z, Oja's grad_P, g^T x, sum_rows g)``, each ``None``
    unless asked for (the last two are a Linear layer's weight and bias gradients).

    Shared by the layer-wise rules and the direct ones (where ``g`` is the source error).
    With ``targets``, Oja runs on the fed targets instead of ``g``. ``scale`` (the loss scale
    of this backward) multiplies Oja's update as :class:`LossScale` says; ``clamp`` clamps
    ``grad_x`` to ``[-clamp, clamp]``.

    The order is chosen for the CPU's caches: on 2 cores, a pass over a ``256 x 512`` ``g``
    costs ~45 us more once the big ``g^T x`` product has pushed it out of cache than while it
    is still there from the op that produced it. So every pass over ``g`` (bias gradient,
    ``z``, Oja's statistics) comes first, then ``g^T x``, then ``x^T z`` and last ``grad_x``,
    which the op below reads next.
    """
    grad_x = grad_Q = grad_P = grad_w = grad_b = None
    oja_on_g = need_P and targets is None
    if need_b or (oja_on_g and (oja.center or oja.scale != "none")):
        grad_b = g.sum(0)
    # z^T = P g^T, kept (r, M) contiguous: thin products are 2-6x faster on CPU this way
    # grad_Q from grad_W where that is less work (more rows than outputs: tokens)
    q_from_w = need_Q and need_w and g.shape[0] > g.shape[1]
    zt = P @ g.t() if (need_x or (need_Q and not q_from_w) or oja_on_g) else None
    group = None if scale is None else scale.group
    if oja_on_g:
        mult = 1.0 if scale is None else scale.multiplier(oja, on_error=True)
        grad_P = oja_grad(P, g, zt.t(), oja, grad_b, mult, group)
    elif need_P:
        mult = 1.0 if scale is None else scale.multiplier(oja, on_error=False)
        e = targets.take(g.shape[0], g.shape[1], g)
        grad_P = oja_grad(P, e, (P @ e.t()).t(), oja, mult=mult, group=group)
    if need_w:
        grad_w = g.t() @ x
    if need_Q:  # x^T z = (P grad_W)^T: r n_out n_in multiply-adds instead of r M n_in
        grad_Q = (P @ grad_w).t() if q_from_w else (zt @ x).t()
    if need_x:
        grad_x = clamp_error(zt.t() @ Q.t(), clamp)
    return grad_x, grad_Q, grad_P, grad_w, grad_b if need_b else None


_SCALE_CODES = {"none": 0, "maxstd": 1, "rms": 2}


def _fast_path_fits(x: Tensor, P: Tensor, oja: OjaOptions | None, clamp, scale: "LossScale | None" = None) -> bool:
    """The C++ path covers CPU float32/float64 tensors outside autocast, Oja on the error with
    ``ddof=0`` and a scalar scale, no ``error_clamp`` and no :func:`raftorch.sync_oja` group;
    everything else runs in Python."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and P.dtype == x.dtype
            and clamp is None and not torch.is_autocast_enabled("cpu")
            and (scale is None or scale.group is None or oja is None)
            and (oja is None or (oja.source == "error" and oja.scale != "std" and oja.ddof == 0)))


def linear_lowrank(x: Tensor, weight: Tensor, bias: Tensor | None, Q: Tensor, P: Tensor,
                   oja: OjaOptions | None, targets: TargetSlot | None = None,
                   scale: LossScale | None = None, clamp: float | None = None) -> Tensor:
    """``y = x W^T + b`` with the low-rank feedback backward: the C++ fast path
    (:mod:`raftorch.extension`) where :func:`_fast_path_fits`, otherwise
    :class:`LinearLowRankFeedback`. Both compute the same thing (tested equal)."""
    if _fast_path_fits(x, P, oja, clamp, scale):
        ext = extension.get()
        if ext is not None:
            mult = (scale or LossScale()).tensor
            if oja is None:  # P does not learn: the Oja settings are never read
                return ext.lowrank_linear(x, weight, bias, Q, P, False, 0, True, mult)
            return ext.lowrank_linear(x, weight, bias, Q, P, oja.center, _SCALE_CODES[oja.scale],
                                      oja.reduce == "mean", mult)
    return LinearLowRankFeedback.apply(x, weight, bias, Q, P, oja, targets, scale, clamp)


class LinearLowRankFeedback(Function):
    """``y = x W^T + b``; backward sends ``(g P^T) Q^T`` down, ``grad_Q = x^T z``, Oja on P."""

    @staticmethod
    def forward(ctx, x, weight, bias, Q, P, oja: OjaOptions, targets: TargetSlot | None,
                scale: LossScale | None = None, clamp: float | None = None):
        x, weight, bias, Q, P = autocast_inputs(x, weight, bias, Q, P)
        ctx.save_for_backward(x, Q, P)
        ctx.oja, ctx.targets, ctx.scale, ctx.clamp = oja, targets, scale, clamp
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        no_double_backward("raftorch.Linear (low-rank rule)")
        x, Q, P = ctx.saved_tensors
        need_x, need_w, need_b, need_Q, need_P = ctx.needs_input_grad[:5]
        g2 = g.reshape(-1, g.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        targets = ctx.targets if need_P and ctx.oja.source == "target" else None
        grad_x, grad_Q, grad_P, grad_w, grad_b = lowrank_feedback(
            g2, x2, Q, P, ctx.oja, need_x, need_Q, need_P, targets=targets,
            need_w=need_w, need_b=need_b, scale=ctx.scale, clamp=ctx.clamp)
        if grad_x is not None:
            grad_x = grad_x.view(x.shape)
        return grad_x, grad_w, grad_b, grad_Q, grad_P, None, None, None, None


# --------------------------------------------------------------------------- Conv2d


@dataclass(frozen=True)
class ConvGeometry:
    """Stride, padding (explicit ints), dilation and groups of a 2-d convolution."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int

    def conv(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """``F.conv2d`` of ``x`` with ``weight`` (and ``bias``) in this geometry."""
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def backward(self, g: Tensor, x: Tensor, weight: Tensor, mask, bias: bool = False):
        """Gradients of ``conv(x, weight)`` for output gradient ``g``:
        ``(grad_input, grad_weight, grad_bias)``, each computed only where ``mask`` says."""
        return torch.ops.aten.convolution_backward(
            g, x, weight, [weight.shape[0]] if bias else None,
            list(self.stride), list(self.padding), list(self.dilation),
            False, [0, 0], self.groups, [mask[0], mask[1], bias],
        )


    def input_grad(self, z: Tensor, x: Tensor, kernel: Tensor) -> Tensor:
        """``conv_transpose(z, kernel)`` back to ``x``'s shape: the input gradient of
        ``conv(x, kernel)`` for output gradient ``z``.

        With stride 1 this is the *forward* convolution of ``z`` with the kernel transposed
        per group (``(C_in, C_z / groups, kH, kW)``) and flipped in space, padded by
        ``dilation (k - 1) - padding``. oneDNN runs a forward convolution with few input
        channels (``z`` has ``r``) far better than the transposed one on a CPU (about 4x for
        ``r = 4`` and 9x9 kernels, about 1.6x for 3x3 with ``r = 10``). Other strides (or padding
        beyond the kernel) use ``convolution_backward``."""
        k = kernel.shape[2:]
        pad = [d * (kk - 1) - p for d, kk, p in zip(self.dilation, k, self.padding)]
        if any(s != 1 for s in self.stride) or min(pad) < 0:
            return self.backward(z, x, kernel, (True, False))[0]
        g = self.groups
        cz, ci = kernel.shape[0], kernel.shape[1]
        flipped = (kernel.view(g, cz // g, ci, *k).transpose(1, 2)
                   .reshape(g * ci, cz // g, *k).flip(2, 3))
        return F.conv2d(z, flipped, None, 1, pad, self.dilation, g)


class Conv2dFullFeedback(Function):
    """Convolution; backward sends ``conv_transpose(g, B)`` down; ``grad_B = grad_W`` if B learns."""

    @staticmethod
    def forward(ctx, x, weight, bias, B, geom: ConvGeometry, clamp: float | None = None):
        x, weight, bias, B = autocast_inputs(x, weight, bias, B)
        ctx.save_for_backward(x, B)
        ctx.geom, ctx.clamp = geom, clamp
        return geom.conv(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        no_double_backward("raftorch.Conv2d (fa/kp)")
        x, B = ctx.saved_tensors
        need_x, need_w, need_b, need_B = ctx.needs_input_grad[:4]
        grad_x, grad_w, grad_b = ctx.geom.backward(
            g, x, B, (need_x, need_w or need_B), bias=need_b
        )
        grad_B = grad_w.clone() if need_B else None
        return clamp_error(grad_x, ctx.clamp), grad_w if need_w else None, grad_b, grad_B, None, None


class Conv2dLowRankFeedback(Function):
    """Convolution; backward: ``z = P * g`` (1x1), ``grad_input = conv_transpose(z, Q)``,
    ``grad_Q = conv_weight_grad(x, z)``, Oja on ``P`` over batch and pixels.

    Fast steps (each tested equal to the plain one):

    * ``grad_Q = sum_o P[k, o] grad_W[o]`` (``P`` times ``grad_W`` flattened to
      ``(C_out, C_in k_H k_W)``): ``z`` is a per-pixel linear map of ``g`` and the weight
      gradient is linear in the output gradient, so the virtual convolution's weight gradient
      is this small product, not a second pass over ``x`` -- when ``W`` learns (``grad_W``
      exists) and ``groups == 1`` (with groups, ``z``'s channels mix outputs of every group,
      whose weight gradients saw other input channels).
    * ``z = P g`` as one batched matrix product on the contiguous ``(N, C_out, H W)`` error
      (3x faster than a 1x1 convolution on CPU), in the layout the transposed convolution reads.
    * ``grad_input`` with stride 1 as the forward convolution of ``z`` with ``Q`` transposed
      and flipped (:meth:`ConvGeometry.input_grad`).
    * Oja's statistics straight from the ``(N, C, H W)`` maps: ``z^T e = sum_n z_n e_n^T`` (a
      batched product), per-channel sums and sums of squares over ``(N, H, W)``: no
      ``(N H W, C)`` copies (:func:`_oja_from_stats`). The explicit path (``scale="std"``, low
      precision, a :func:`raftorch.sync_oja` group, a dominating mean) still takes the copies.
    * Near full rank (where it costs fewer multiply-adds per pixel, :func:`_combine_kernel`;
      ``groups == 1``, contiguous error): ``grad_input = conv_transpose(g, P^T Q)`` with the kernel
      ``P^T Q`` formed once (``(C_out, C_in, kH, kW)``, no batch dimension), computed with the
      weight gradient in one ``convolution_backward`` as the full-rank rules do, and Oja's
      ``z^T e = P S`` from the error's Gram matrix ``S = sum_n g_n g_n^T`` (``C_out x C_out``;
      its diagonal is the sums of squares), so ``z`` is never formed: a full-rank RAF
      convolution costs a Kolen-Pollack one plus ``S``, the kernel and ``grad_Q = P grad_W``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, Q, P, geom: ConvGeometry, oja: OjaOptions,
                scale: LossScale | None = None, clamp: float | None = None):
        x, weight, bias, Q, P = autocast_inputs(x, weight, bias, Q, P)
        ctx.save_for_backward(x, weight, Q, P)
        ctx.geom, ctx.oja, ctx.scale, ctx.clamp = geom, oja, scale, clamp
        return geom.conv(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        no_double_backward("raftorch.Conv2d (low-rank rule)")
        x, weight, Q, P = ctx.saved_tensors
        need_x, need_w, need_b, need_Q, need_P = ctx.needs_input_grad[:5]
        geom = ctx.geom
        grad_x = grad_w = grad_b = grad_Q = grad_P = None
        flat = g.is_contiguous()  # (N, C, H, W) viewable as (N, C, H W)
        g3 = g.view(g.shape[0], g.shape[1], g.shape[2] * g.shape[3]) if flat else None
        if flat and need_x and geom.groups == 1 and _combine_kernel(Q, P, need_P):
            kernel = (P.t() @ Q.reshape(Q.shape[0], -1)).view(weight.shape)  # P^T Q
            grad_x, grad_w, grad_b = geom.backward(g, x, kernel, (True, need_w or need_Q), bias=need_b)
            if need_Q:
                grad_Q = (P @ grad_w.reshape(grad_w.shape[0], -1)).view(Q.shape)
            if need_P:
                grad_P = _conv_oja_gram(P, g, g3, grad_b, ctx.oja, ctx.scale)
            return (clamp_error(grad_x, ctx.clamp), grad_w if need_w else None, grad_b, grad_Q, grad_P,
                    None, None, None, None)
        if need_w or need_b:
            _, grad_w, grad_b = geom.backward(g, x, weight, (False, need_w), bias=need_b)
        if need_x or need_Q or need_P:
            if flat:
                z3 = torch.bmm(P.expand(g.shape[0], *P.shape), g3)  # (N, r, H W), no copies
                z = z3.view(g.shape[0], P.shape[0], *g.shape[2:])
            else:  # channels_last or other strides: the 1x1 convolution keeps the layout
                z = F.conv2d(g, P[:, :, None, None])  # (N, r, H, W)
            if need_Q and grad_w is not None and geom.groups == 1:
                grad_Q = (P @ grad_w.reshape(grad_w.shape[0], -1)).view(Q.shape)
            elif need_Q:
                _, grad_Q, _ = geom.backward(z, x, Q, (False, True))
            if need_x:
                grad_x = geom.input_grad(z, x, Q)
            if need_P:
                grad_P = conv_oja_grad(P, g, z, g3, z3 if flat else None, grad_b, ctx.oja, ctx.scale)
        return (clamp_error(grad_x, ctx.clamp), grad_w if need_w else None, grad_b, grad_Q, grad_P,
                None, None, None, None)


def _combine_kernel(Q: Tensor, P: Tensor, need_P: bool) -> bool:
    """Whether the backward of a low-rank convolution costs fewer multiply-adds per output pixel
    through the kernel ``P^T Q`` (its transposed convolution, ``C_out C_in k``) and the Gram
    matrix of the error (``C_out^2``, for Oja) than through ``z = P g`` (``r C_out``), ``z``'s
    transposed convolution (``r C_in k``) and ``z^T e`` (``r C_out``, for Oja); ``k`` is the
    kernel's size. Forming the kernel (``C_out r C_in k`` once per step) is left out: on small
    maps it costs more than ``z``, yet the kernel path, one ``convolution_backward`` for the input
    and weight gradients, timed faster than a separate transposed convolution of ``z`` at every
    full-rank layer of the quick VGG (``docs/results/bench_conv_feedback.md``)."""
    r, c_out = P.shape
    c_in_k = Q[0].numel()
    combined = c_out * c_in_k + (c_out * c_out if need_P else 0)
    factored = r * c_in_k + r * c_out + (r * c_out if need_P else 0)
    return combined < factored


def cross_sum(a3: Tensor, b3: Tensor) -> Tensor:
    """``sum_n a_n b_n^T`` ``(A, B)`` of ``(N, A, L)`` and ``(N, B, L)`` maps: per-sample
    products summed where the maps are long, one product of the ``(A, N L)`` and ``(B, N L)``
    copies where they are short (there the per-sample products are many thin ones, which run
    far below the matrix unit's speed). ``cross_sum(g3, g3)`` is the error's Gram matrix."""
    if a3.shape[2] >= max(a3.shape[1], b3.shape[1]):
        return torch.bmm(a3, b3.transpose(1, 2)).sum(0)
    a = a3.transpose(0, 1).reshape(a3.shape[1], -1)
    b = a if b3 is a3 else b3.transpose(0, 1).reshape(b3.shape[1], -1)
    return a @ b.t()


def _conv_oja_gram(P: Tensor, g: Tensor, g3: Tensor, colsum: Tensor | None, oja: OjaOptions,
                   scale: LossScale | None) -> Tensor:
    """Oja's ``grad_P`` of a convolution from the Gram matrix ``S = sum_n g_n g_n^T`` of the
    ``(N, C, H W)`` error ``g3``: ``z^T e = P S``, ``z^T 1 = P (e^T 1)``, the sums of squares
    ``diag S``. Where :func:`_oja_from_stats` does not apply (see :func:`conv_oja_grad`), ``z`` is
    formed and :func:`conv_oja_grad` takes over."""
    mult = 1.0 if scale is None else scale.multiplier(oja)
    group = None if scale is None else scale.group
    rows = g.shape[0] * g.shape[2] * g.shape[3]
    if rows and _oja_fast_path_fits(oja, g.dtype, P, group):
        if colsum is None:
            colsum = g3.sum((0, 2))
        S = cross_sum(g3, g3)
        sq = S.diagonal().clone()
        if not (oja.center and _mean_dominates(colsum, sq, rows)):
            zsum = P @ colsum if oja.center else None
            return _oja_from_stats(P, P @ S, zsum, colsum, sq, rows, oja, mult)
    z3 = torch.bmm(P.expand(g.shape[0], *P.shape), g3)
    return conv_oja_grad(P, g, z3.view(g.shape[0], P.shape[0], *g.shape[2:]), g3, z3, colsum, oja, scale)


def conv_oja_grad(P: Tensor, g: Tensor, z: Tensor, g3: Tensor | None, z3: Tensor | None,
              colsum: Tensor | None, oja: OjaOptions, scale: LossScale | None) -> Tensor:
    """Oja's ``grad_P`` of a convolution: every pixel of the ``(N, C, H, W)`` error map ``g``
    is one row of the signal (rows ``N H W``, features ``C``); ``z = P * g``. From the maps'
    statistics where :func:`oja_grad`'s fast path applies, else on the ``(N H W, C)`` copy."""
    mult = 1.0 if scale is None else scale.multiplier(oja)
    group = None if scale is None else scale.group
    rows = g.shape[0] * g.shape[2] * g.shape[3]
    # no rows: oja_grad's guard (the statistics below would divide by them)
    if g3 is not None and rows and _oja_fast_path_fits(oja, g.dtype, P, group):
        stats = oja.center or oja.scale != "none"
        if stats and colsum is None:
            colsum = g3.sum((0, 2))
        sq = (g3 * g3).sum((0, 2)) if stats else None
        if not (oja.center and _mean_dominates(colsum, sq, rows)):
            A = cross_sum(z3, g3)  # z^T e, (r, C)
            zsum = z3.sum((0, 2)) if oja.center else None
            return _oja_from_stats(P, A, zsum, colsum, sq, rows, oja, mult)
    e = g.transpose(0, 1).reshape(g.shape[1], rows).t()
    zr = z.transpose(0, 1).reshape(z.shape[1], rows).t()
    return oja_grad(P, e, zr, oja, colsum, mult, group)
