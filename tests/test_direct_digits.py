"""End to end on digits (64-256-256-256-256-10 MLP, Adam), through raftorch train's own loop:
dRAF from the output with r = 10 reaches backprop, dRAF from the penultimate layer learns,
DFA runs. The same comparison as a table: ``raftorch compare --data digits --rules bp,draf,dfa
--ranks 10 [--source penultimate]``."""
import pytest

from raftorch.training.loop import train

EPOCHS, BATCH, LR = 30, 32, 1e-3


def train_digits(rule, rank=None, source="output", seed=0, epochs=EPOCHS):
    """Test accuracy (%) after ``epochs`` of Adam; the last epoch's, not the best."""
    final = train({"data": "digits", "model": "mlp", "model_options": {"hidden": [256] * 4}, "rule": rule,
                   "rank": rank, "rule_options": {"source": source} if rule in ("dfa", "draf") else {},
                   "lr": LR, "batch_size": BATCH, "epochs": epochs, "seed": seed, "eval_every": 0,
                   "device": "cpu", "threads": 1}, progress=False)
    return 100.0 * final["test_accuracy"]


@pytest.mark.slow
def test_draf_on_digits_reaches_bp_learns_from_the_penultimate_layer_and_dfa_runs():
    seeds = (0, 1, 2, 3)  # dRAF varies by +-1.4 points between seeds: compare means
    bp = sum(train_digits("bp", seed=s) for s in seeds) / len(seeds)
    draf = sum(train_digits("draf", 10, seed=s) for s in seeds) / len(seeds)
    draf_pen = train_digits("draf", 10, source="penultimate")
    dfa = train_digits("dfa", epochs=5)
    assert bp > 97.0, bp
    assert draf >= bp - 2.0, (draf, bp)
    assert draf_pen > 80.0, draf_pen
    assert dfa > 50.0, dfa
