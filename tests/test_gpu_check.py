"""benchmarks/gpu_check.py (the correctness and speed check for a machine with a GPU) runs on
the CPU with --quick, passes there, and reports a broken gradient as FAIL with a non-zero exit."""
import importlib.util
from pathlib import Path

import pytest

from raftorch import functional as RF

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_lines(out):
    return [line for line in out.splitlines() if line.startswith(("PASS  ", "FAIL  "))]


def test_gpu_check_passes_on_cpu_and_reports_a_broken_gradient(capsys, monkeypatch):
    script = load_script()
    rc = script.main(["--device", "cpu", "--quick", "--models", "paper"])
    out = capsys.readouterr().out
    lines = check_lines(out)
    assert rc == 0, out
    assert lines and all(line.startswith("PASS") for line in lines), out
    for part in ("(i) bp Linear", "(i) bp Conv2d", "(ii) RAF Linear", "(ii) RAF Conv2d",
                 "(iii) low-rank Conv2d", "(iii) low-rank Linear", "(iv) C++ fast path"):
        assert any(part in line for line in lines) or (part.startswith("(iv)") and "(iv)" in out), part
    assert "| (a) paper MLP | float32 |" in out and "| (a) paper MLP | bf16 |" in out, out

    # the low-rank conv's input gradient 0.1% off: every check that compares it fails, no other
    real = RF.ConvGeometry.input_grad
    monkeypatch.setattr(RF.ConvGeometry, "input_grad", lambda self, z, x, k: 1.001 * real(self, z, x, k))
    rc = script.main(["--device", "cpu", "--quick", "--models", "none"])
    out = capsys.readouterr().out
    failed = [line for line in check_lines(out) if line.startswith("FAIL  ")]
    assert rc != 0, out
    assert failed and all("Conv2d" in line and "input" in line for line in failed), out
    assert all(any(line.startswith(f"FAIL  {part}") for line in failed)
               for part in ("(ii) RAF Conv2d", "(iii) low-rank Conv2d")), out
    assert not any(line.startswith("FAIL  (i)") or "Linear" in line for line in failed), out
