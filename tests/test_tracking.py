"""Representation metrics (``--track subspace``) and ``raftorch plot``: exact oracles for the
subspace overlap and the participation ratio, the errors captured from a model, no side effect
on training, the per-epoch records, and the curves figure."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import raftorch
import raftorch.training.loop as T
from raftorch.analysis.curves import load_run, plot_curves
from raftorch.subspace import (as_samples, capture_errors, error_covariance, participation_ratio,
                                        plain_copy, principal_subspace, subspace_overlap, track_subspace)
from raftorch.training.checkpoint import load_checkpoint
from raftorch.cli import main as cli_main
from raftorch.training.config import TrainConfig


pytestmark = pytest.mark.usefixtures("one_thread")


def orthonormal(d, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64)).Q


def centred_design(M, k, seed=0):
    """``Z`` ``(M, k)``: orthonormal columns, each orthogonal to the constant column, so that
    ``Z^T Z = I`` and ``Z`` is already centred."""
    g = torch.Generator().manual_seed(seed)
    A = torch.cat([torch.ones(M, 1, dtype=torch.float64), torch.randn(M, k, generator=g, dtype=torch.float64)], 1)
    return torch.linalg.qr(A).Q[:, 1:]


def errors_with_covariance(V, lam, M, seed=0):
    """Samples ``X`` ``(M, d)`` whose centred sample covariance ``X^T X / M`` is exactly
    ``V diag(lam) V^T``: ``X = sqrt(M) Z diag(sqrt(lam)) V^T`` with ``Z`` a centred orthonormal
    design."""
    lam = torch.as_tensor(lam, dtype=torch.float64)
    Z = centred_design(M, len(lam), seed)
    return math.sqrt(M) * Z @ torch.diag(lam.sqrt()) @ V.t()


# --------------------------------------------------------------------------- pure functions

LAM = [5.0, 4.0, 3.0, 1.0, 0.5, 0.2, 0.1, 0.05]


def test_overlap_is_one_for_any_basis_of_the_top_subspace_and_zero_for_an_orthogonal_one():
    V = orthonormal(8, 8)
    C = V @ torch.diag(torch.tensor(LAM, dtype=torch.float64)) @ V.t()
    R = torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    P_top = R @ V[:, :3].t()  # a rotated, non-orthonormal basis of the top-3 subspace
    assert subspace_overlap(P_top, C) == pytest.approx(1.0, abs=1e-12)
    assert subspace_overlap(V[:, 3:6].t(), C) == pytest.approx(0.0, abs=1e-12)
    assert subspace_overlap(V[:, [0, 4, 5]].t(), C) == pytest.approx(1 / 3, abs=1e-12)
    # samples with exactly this covariance give the same numbers, both through X^T X (M >= d)...
    X = errors_with_covariance(V, LAM, M=64)
    assert torch.allclose(error_covariance(X), C, atol=1e-12)
    assert subspace_overlap(P_top, errors=X) == pytest.approx(1.0, abs=1e-12)
    assert subspace_overlap(V[:, 3:6].t(), errors=X) == pytest.approx(0.0, abs=1e-12)


def test_overlap_of_a_basis_rotated_by_theta_is_the_mean_cos2_of_the_principal_angles():
    V = orthonormal(8, 8, seed=2)
    C = V @ torch.diag(torch.tensor(LAM, dtype=torch.float64)) @ V.t()
    t1, t2 = 0.3, 1.1
    P = torch.stack([math.cos(t1) * V[:, 0] + math.sin(t1) * V[:, 5],
                     math.cos(t2) * V[:, 1] + math.sin(t2) * V[:, 6]])
    expected = (math.cos(t1) ** 2 + math.cos(t2) ** 2) / 2
    assert subspace_overlap(P, C) == pytest.approx(expected, abs=1e-12)
    assert subspace_overlap(P[:1], C) == pytest.approx(math.cos(t1) ** 2, abs=1e-12)
    assert subspace_overlap(P, errors=errors_with_covariance(V, LAM, M=50)) == pytest.approx(expected, abs=1e-12)


def test_with_fewer_samples_than_features_the_gram_path_finds_the_same_subspace():
    d, M = 40, 16  # M < d: eigenvectors come from X X^T
    V = orthonormal(d, 5, seed=3)
    X = errors_with_covariance(V, [4.0, 3.0, 2.0, 1.0, 0.5], M=M)
    lam, U = principal_subspace(errors=X)
    assert torch.allclose(lam, torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64), atol=1e-12)
    assert torch.allclose((U.t() @ V).abs(), torch.eye(5, dtype=torch.float64), atol=1e-10)
    assert subspace_overlap(V[:, :3].t(), errors=X) == pytest.approx(1.0, abs=1e-12)
    assert subspace_overlap(V[:, 3:].t(), errors=X, r=2) == pytest.approx(0.0, abs=1e-12)
    # an error of rank 5 compared with a rank-8 P: the fraction of the 5-dim error space P holds
    W = orthonormal(d, 4, seed=4)
    outside = torch.linalg.qr(W - V @ (V.t() @ W)).Q  # 4 directions orthogonal to the error's
    P8 = torch.cat([V[:, :4], outside], 1).t()
    assert subspace_overlap(P8, errors=X) == pytest.approx(4 / 5, abs=1e-10)


@pytest.mark.parametrize("M, d, k", [(60, 12, 4), (10, 50, 7), (30, 30, 1)])
def test_participation_ratio_of_k_equal_eigenvalues_is_k(M, d, k):
    X = 2.5 * centred_design(M, k, seed=k) @ orthonormal(d, k, seed=d).t()
    assert participation_ratio(X) == pytest.approx(k, abs=1e-10)
    assert participation_ratio(cov=error_covariance(X)) == pytest.approx(k, abs=1e-10)
    # eigenvalues (2, 1): (2 + 1)^2 / (4 + 1)
    assert participation_ratio(cov=torch.diag(torch.tensor([2.0, 1.0, 0.0]))) == pytest.approx(9 / 5)


def test_centring_is_an_option_and_a_constant_offset_only_counts_uncentred():
    X = centred_design(40, 3, seed=5) @ orthonormal(6, 3, seed=6).t()
    offset = X + 10.0 * orthonormal(6, 6, seed=6)[:, 5]  # a direction orthogonal to the error's
    assert participation_ratio(offset) == pytest.approx(3.0, abs=1e-10)
    assert participation_ratio(offset, center=False) < 1.2  # the offset dominates E[e e^T]
    assert participation_ratio(torch.zeros(5, 4)) != participation_ratio(torch.zeros(5, 4))  # nan


def test_a_conv_error_counts_every_pixel_as_a_sample():
    g = torch.randn(3, 5, 4, 2, generator=torch.Generator().manual_seed(0))
    manual = g.permute(0, 2, 3, 1).reshape(-1, 5).double()
    assert torch.equal(as_samples(g), manual)
    manual_c = manual - manual.mean(0)
    assert torch.allclose(error_covariance(g), manual_c.t() @ manual_c / 24, atol=1e-12)
    assert participation_ratio(g) == pytest.approx(participation_ratio(manual), abs=1e-12)
    # a Linear layer's (N, T, D) error: one sample per token
    t = torch.randn(2, 3, 4)
    assert torch.equal(as_samples(t), t.reshape(6, 4).double())


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="either"):
        subspace_overlap(torch.eye(2), torch.eye(2), errors=torch.eye(2))
    with pytest.raises(ValueError, match="columns"):
        subspace_overlap(torch.eye(3), torch.eye(2))
    with pytest.raises(ValueError, match="either"):
        participation_ratio()


# --------------------------------------------------------------------------- models


def small_convnet(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5))


def batch(n=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 5, (n,), generator=g)


def raf_convnet():
    net = small_convnet()
    with torch.no_grad():  # BatchNorm with statistics of its own, so eval mode is not the identity
        net[4].running_mean.uniform_(-0.5, 0.5)
        net[4].running_var.uniform_(0.5, 2.0)
    model = raftorch.convert(net, "raf", 2, exclude=["6"])
    raftorch.convert(model, "raf", 2, include=["6"], inplace=True, oja_source="target")
    return net, model


def test_the_backprop_error_is_plain_autograds_output_gradient():
    net, model = raf_convnet()
    x, y = batch()
    net.eval()
    W1, fc, bn, out = net[0], net[3], net[4], net[6]
    a1 = F.conv2d(x, W1.weight, W1.bias, padding=1)
    a3 = F.linear(F.relu(a1).flatten(1), fc.weight, fc.bias)
    h = F.relu(F.batch_norm(a3, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps))
    a6 = F.linear(h, out.weight, out.bias)
    oracle = dict(zip(["0", "3", "6"], torch.autograd.grad(F.cross_entropy(a6, y), [a1, a3, a6])))

    bp = capture_errors(plain_copy(model), x, y)
    assert bp.keys() == oracle.keys()
    for k in oracle:
        assert torch.allclose(bp[k], oracle[k], rtol=1e-5, atol=1e-8), k

    # under RAF the layer below the output receives ((g P^T) Q^T) * BN' * relu'
    got = capture_errors(model, x, y)
    assert torch.allclose(got["6"], oracle["6"], rtol=1e-5, atol=1e-8)  # the output error is the same
    g_h = oracle["6"] @ model[6].P.t() @ model[6].Q.t()
    bn_gain = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    expected = g_h * (h > 0) * bn_gain
    assert torch.allclose(got["3"], expected, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(got["3"], oracle["3"], rtol=1e-2)  # RAF's error is not backprop's

    # track_subspace puts these through the pure functions, each layer as Oja sees it
    m = track_subspace(model, x, y)
    assert set(m) == {"subspace", "error_dim", "error_dim_received"}
    assert m["error_dim"]["3"] == pytest.approx(participation_ratio(oracle["3"]), rel=1e-6)
    assert m["error_dim"]["0"] == pytest.approx(participation_ratio(oracle["0"].permute(0, 2, 3, 1).reshape(-1, 4)),
                                                rel=1e-6)
    assert m["error_dim_received"]["3"] == pytest.approx(participation_ratio(expected), rel=1e-5)
    assert m["subspace"]["3"] == pytest.approx(subspace_overlap(model[3].P, errors=got["3"]), abs=1e-12)
    assert m["subspace"]["0"] == pytest.approx(subspace_overlap(model[0].P, errors=got["0"], feature_dim=1), abs=1e-12)
    assert all(isinstance(v, float) for group in m.values() for v in group.values())


def test_the_overlap_is_centred_as_the_layers_oja_rule_centres():
    x, y = batch()
    model = raftorch.convert(small_convnet(), "raf", 2, oja_center=False)
    got = capture_errors(model, x, y)
    m = track_subspace(model, x, y)["subspace"]
    uncentred = subspace_overlap(model[3].P, errors=got["3"], center=False)
    assert m["3"] == pytest.approx(uncentred, abs=1e-12)
    assert abs(subspace_overlap(model[3].P, errors=got["3"]) - uncentred) > 1e-4


def test_the_plain_copy_is_plain_pytorch_with_the_same_forward():
    net, model = raf_convnet()
    plain = plain_copy(model)
    assert not any(isinstance(m, raftorch.layers.FeedbackLayer) for m in plain.modules())
    assert type(plain[0]) is nn.Conv2d and type(plain[6]) is nn.Linear
    x, _ = batch()
    model.eval(), plain.eval()
    assert torch.equal(plain(x), model(x))
    assert isinstance(model[0], raftorch.Conv2d)  # the model itself is untouched

    dr = raftorch.convert(small_convnet(), "draf", 3, example_input=x[:2])
    p = plain_copy(dr)
    assert "direct_feedback" not in p._modules and "direct_feedback" in dr._modules
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in p.modules())


def test_direct_rules_report_each_path_against_the_source_error():
    x, y = batch()
    base = small_convnet()
    base.eval()
    model = raftorch.convert(base, "draf", 3, example_input=x[:2])
    m = track_subspace(model, x, y)
    assert set(m["subspace"]) == {"direct_feedback.paths.0", "direct_feedback.paths.1"}
    e = capture_errors(model, x, y, names=[""])[""]  # the source error: dLoss/dlogits
    path = model.direct_feedback.paths[1]
    assert m["subspace"]["direct_feedback.paths.1"] == pytest.approx(subspace_overlap(path.P, errors=e), abs=1e-12)
    bp = capture_errors(base, x, y)
    assert m["error_dim"]["3"] == pytest.approx(participation_ratio(bp["3"]), rel=1e-6)
    assert m["error_dim_received"]["6"] == pytest.approx(m["error_dim"]["6"], rel=1e-6)  # the output is exact
    assert "subspace" not in track_subspace(raftorch.convert(base, "dfa", example_input=x[:2]), x, y)


def test_tracking_leaves_the_model_and_the_next_training_step_unchanged():
    def make():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Flatten(), nn.Linear(36, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Dropout(0.3),
                            nn.Linear(12, 5))
        model = raftorch.convert(net, "raf", 3, exclude=["5"])
        raftorch.convert(model, "raf", 3, include=["5"], inplace=True, oja_source="target")
        return model, torch.optim.Adam(model.parameters(), lr=1e-2)

    def step(model, opt, x, y, seed):
        torch.manual_seed(seed)
        opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(model(x), y)
        raftorch.feed_targets(model, y)
        loss.backward()
        opt.step()

    x, y = batch(24)
    (a, opt_a), (b, opt_b) = make(), make()
    for model, opt in ((a, opt_a), (b, opt_b)):
        step(model, opt, x, y, seed=1)
    before = copy.deepcopy((a.state_dict(), [p.grad for p in a.parameters()], opt_a.state_dict()))
    rng = torch.get_rng_state()
    sentinel = torch.arange(24) % 5
    a[5].target_slot.value = sentinel  # targets fed but not used yet: tracking must put them back
    track_subspace(a, x, y)
    assert a[5].target_slot.value is sentinel
    a[5].target_slot.value = None
    assert torch.equal(torch.get_rng_state(), rng)
    assert a.training and all(m.training for m in a.modules())
    after = (a.state_dict(), [p.grad for p in a.parameters()], opt_a.state_dict())
    for k in before[0]:
        assert torch.equal(before[0][k], after[0][k]), k  # weights, feedback, BatchNorm statistics
    assert all(torch.equal(g0, g1) for g0, g1 in zip(before[1], after[1]))
    assert before[2]["state"].keys() == after[2]["state"].keys()
    for i in before[2]["state"]:
        for k, v in before[2]["state"][i].items():
            assert torch.equal(v, after[2]["state"][i][k])
    for model, opt in ((a, opt_a), (b, opt_b)):
        step(model, opt, x, y, seed=2)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


# --------------------------------------------------------------------------- training and the CLI

TINY = dict(data="digits", model="mlp", model_options={"hidden": [24, 24], "dropout": 0.1, "batchnorm": True},
            rule="raf", rank=4, layer_options={"out": {"oja_source": "target"}}, crop_padding=1, flip=True,
            lr=3e-3, batch_size=128, epochs=2, seed=3, val_fraction=0.1, device="cpu", threads=1)
TRACKED = {"subspace", "error_dim", "error_dim_received", "track_seconds", "seconds", "eval_seconds"}


def untracked(record):
    return {k: v for k, v in record.items() if k not in TRACKED}


def test_a_tracked_run_trains_exactly_as_an_untracked_one_and_logs_every_epoch(tmp_path):
    plain = T.train(dict(TINY, out=str(tmp_path / "plain")), progress=False)
    tracked = T.train(dict(TINY, track=["subspace"], out=str(tmp_path / "tracked")), progress=False)
    assert {k: v for k, v in plain.items() if "seconds" not in k} == \
        {k: v for k, v in tracked.items() if "seconds" not in k}
    wa, wb = (load_checkpoint(tmp_path / n / "checkpoint.pt")["model"] for n in ("plain", "tracked"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    records = [json.loads(line) for line in (tmp_path / "tracked" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for r in records:
        assert set(r["subspace"]) == {"fc1", "fc2", "out"}
        assert set(r["error_dim"]) == set(r["error_dim_received"]) == {"fc1", "fc2", "out"}
        assert all(0 <= v <= 1 for v in r["subspace"].values())
    header = (tmp_path / "tracked" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"subspace.fc1", "error_dim.out", "error_dim_received.fc2", "track_seconds"} <= set(header)
    assert yaml.safe_load((tmp_path / "tracked" / "config.yaml").read_text())["track"] == ["subspace"]
    assert yaml.safe_load((tmp_path / "plain" / "config.yaml").read_text())["track"] is None


def test_tracking_can_be_switched_on_when_resuming_and_the_run_stays_the_same(tmp_path):
    full = T.train(dict(TINY, epochs=3, track=["subspace"], out=str(tmp_path / "full")), progress=False)
    T.train(dict(TINY, epochs=3, out=str(tmp_path / "r")), progress=False, stop_after=1)
    resumed = T.train(dict(TINY, epochs=3, track=["subspace"], out=str(tmp_path / "r")), resume=True,
                      progress=False)
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    full_records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert "subspace" not in records[0] and records[2]["subspace"] == full_records[2]["subspace"]
    assert [untracked(r) for r in records] == [untracked(r) for r in full_records]
    assert resumed["test_accuracy"] == full["test_accuracy"]


def test_raf_aligns_P_with_the_error_it_receives_and_fixed_P_does_not(tmp_path):
    """Digits, MLP 64-64, rank 3: after six epochs the rows of the learned P of the layer below
    the output span most of its error's top-3 subspace; a fixed random P stays near chance."""
    common = dict(data="digits", model="mlp", model_options={"hidden": [64, 64]}, rank=3, lr=3e-3,
                  epochs=6, batch_size=64, seed=0, device="cpu", threads=1, track=["subspace"], eval_every=0)
    history = {}
    for rule in ("raf", "fa-lowrank"):
        T.train(dict(common, rule=rule, out=str(tmp_path / rule)), progress=False)
        history[rule] = [json.loads(line) for line in (tmp_path / rule / "metrics.jsonl").read_text().splitlines()]
    raf, fixed = history["raf"], history["fa-lowrank"]
    s_raf = [r["subspace"]["fc2"] for r in raf]
    s_fixed = [r["subspace"]["fc2"] for r in fixed]
    assert s_raf[-1] > 0.8 and s_raf[-1] > s_raf[0] + 0.3
    assert max(s_fixed) < 0.2


def test_track_is_validated_and_parsed_from_the_command_line(tmp_path, capsys):
    assert TrainConfig.from_dict({"track": "subspace, subspace"}).track == ["subspace"]
    assert TrainConfig.from_dict({"track": []}).track is None
    with pytest.raises(ValueError, match="unknown track metric.*'angles'.*subspace"):
        TrainConfig.from_dict({"track": ["subspace", "angles"]})
    with pytest.raises(ValueError, match="track must be a list"):
        TrainConfig.from_dict({"track": 3})
    rc = cli_main(["train", "--track", "subspaces", "--out", str(tmp_path / "x"), "--no-progress"])
    assert rc == 2 and capsys.readouterr().err.count("\n") == 1  # bad input: exit status 2
    out = tmp_path / "cli"
    rc = cli_main(["train", "--data", "digits", "--model-option", "hidden=[16]", "--rule", "raf", "--rank", "2",
                   "--epochs", "1", "--device", "cpu", "--threads", "1", "--track", "subspace",
                   "--out", str(out), "--no-progress"])
    assert rc == 0
    record = json.loads((out / "metrics.jsonl").read_text())
    assert set(record["subspace"]) == {"fc1", "out"} and set(record["error_dim"]) == {"fc1", "out"}


# --------------------------------------------------------------------------- raftorch plot


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    small = dict(data="digits", model="mlp", model_options={"hidden": [16]}, rank=2, epochs=2, device="cpu",
                 threads=1, batch_size=256)
    T.train(dict(small, rule="raf", track=["subspace"], out=str(root / "raf")), progress=False)
    T.train(dict(small, rule="bp", rank=None, out=str(root / "bp")), progress=False)
    return root / "raf", root / "bp"


def test_plot_draws_several_runs_into_one_png(two_runs, tmp_path, capsys):
    raf, bp = two_runs
    out = tmp_path / "fig" / "curves.png"
    assert cli_main(["plot", str(raf), str(bp), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.parent.iterdir() if p.name != "curves.png"]  # no temporary file left
    assert cli_main(["plot", str(raf)]) == 0 and (raf / "curves.png").exists()
    assert load_run(raf).label == "raf (raf, r=2)" and load_run(bp).label == "bp (bp)"
    pdf = plot_curves([raf], tmp_path / "m.pdf", metrics=["subspace", "test_accuracy", "error_dim_received"])
    assert pdf.read_bytes()[:4] == b"%PDF"


@pytest.mark.parametrize("args, fragment", [
    (["{missing}"], "does not exist"),
    (["{empty}"], "has no metrics.jsonl"),
    (["{raf}", "{bp}"], "several runs need --out"),
    (["{bp}", "--metrics", "subspace"], "no run logged 'subspace' (train with --track subspace"),
    (["{bp}", "--metrics", "loss,nope"], "no run logged 'nope'"),
    (["{raf}", "--out", "{tmp}/f.jpg"], "must end in .png"),
    (["{corrupt}"], "line 2 is not valid JSON"),
])
def test_plot_bad_input_is_one_line_and_exit_2(two_runs, tmp_path, capsys, args, fragment):
    raf, bp = two_runs
    (tmp_path / "empty").mkdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "metrics.jsonl").write_text('{"epoch": 1}\n{not json\n')
    paths = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "raf": raf, "bp": bp, "tmp": tmp_path,
             "corrupt": corrupt}
    assert cli_main(["plot", *[a.format(**paths) for a in args]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raftorch plot: error: ") and err.count("\n") == 1 and fragment in err


def test_error_alignment_tracking_logs_the_metric_of_the_trained_model_and_changes_nothing(tmp_path):
    plain = T.train(dict(TINY, out=str(tmp_path / "plain")), progress=False)
    tracked = T.train(dict(TINY, track=["error_alignment"], out=str(tmp_path / "tracked")), progress=False)
    assert {k: v for k, v in plain.items() if "seconds" not in k} == \
        {k: v for k, v in tracked.items() if "seconds" not in k}
    records = [json.loads(line) for line in (tmp_path / "tracked" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(set(r["error_alignment"]) == {"fc1", "fc2", "out"} for r in records)
    # the last record is raftorch.metrics.error_alignment of the final model on the held-out batch
    run = T.setup(T.TrainConfig.from_dict(dict(TINY, out=str(tmp_path / "tracked"), epochs=2)), resume=True)
    expected = raftorch.metrics.error_alignment(run.model, *T.held_out_batch(run.data))
    assert records[-1]["error_alignment"] == pytest.approx(expected, abs=1e-9)
    assert records[-1]["error_alignment"]["out"] == pytest.approx(0.0, abs=1e-3)
    assert 0 < records[-1]["error_alignment"]["fc1"] < 90
