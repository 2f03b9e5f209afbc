"""raftorch installed from a wheel, outside the checkout: the panel specs and configs ship as
package data (found through importlib.resources), ``--version`` and a run's provenance work."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel_python(tmp_path_factory):
    """A fresh venv with raftorch installed from a wheel built from this checkout; its other
    dependencies (torch, ...) come from the test interpreter's site-packages through a path
    file (not its .pth files, so the checkout's editable install is not visible)."""
    root = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(root / "dist"), str(REPO)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((root / "dist").glob("raftorch-*.whl"))
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    deps = sysconfig.get_paths()["purelib"]
    (Path(site) / "deps.pth").write_text(deps + "\n")
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", site, str(wheel)],
                          capture_output=True, text=True)
    assert inst.returncode == 0, inst.stderr[-2000:]
    return py, root


def run(py, *args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(py), "-m", "raftorch", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=600)


@pytest.mark.slow
def test_the_wheel_is_imported_from_the_venv_not_the_checkout(wheel_python):
    py, root = wheel_python
    where = subprocess.run([str(py), "-c", "import raftorch; print(raftorch.__file__)"], capture_output=True,
                           text=True, cwd=root, check=True).stdout.strip()
    assert str(root / "venv") in where and str(REPO) not in where


@pytest.mark.slow
def test_reproduce_finds_the_packaged_specs_outside_the_checkout(wheel_python):
    py, root = wheel_python
    out = run(py, "--version", cwd=root)
    assert out.returncode == 0 and out.stdout.strip().startswith("raftorch ")
    listing = run(py, "reproduce", "--list", cwd=root)
    assert listing.returncode == 0, listing.stderr
    for panel in ("fig2", "fig3a", "fig3b", "fig3c", "fig3d", "fig3e", "fig4b", "fig3f", "fig4cd"):
        assert panel in listing.stdout
    paper = run(py, "reproduce", "fig4cd", "--profile", "paper", "--dry-run", "--results", str(root / "r"), cwd=root)
    assert paper.returncode == 0 and "105 points" in paper.stdout, paper.stderr
    configs = subprocess.run([str(py), "-c", "from importlib import resources; "
                              "print((resources.files('raftorch') / 'configs' / 'paper' / 'vit-cifar10.yaml').is_file())"],
                             capture_output=True, text=True, cwd=root, check=True)
    assert configs.stdout.strip() == "True"


@pytest.mark.slow
def test_a_tiny_panel_runs_from_the_wheel_with_provenance(wheel_python):
    py, root = wheel_python
    spec = {"panel": "tiny", "title": "tiny", "paper": "-", "claim": "-", "notes": "-",
            "base": {"data": "digits", "model": "mlp", "model_options": {"hidden": [16]}, "epochs": 1,
                     "batch_size": 64, "eval_every": 0},
            "seeds": [0, 1], "series": [{"name": "BP", "set": {"rule": "bp"}},
                                        {"name": "RAF", "set": {"rule": "raf", "rank": 2}}],
            "figure": {"x": "rank"},
            "claims": [{"text": "RAF is within 50 points of BP", "type": "at_least",
                        "a": {"series": "RAF"}, "b": {"series": "BP"}, "margin": -50.0}],
            "cost": {"seconds_per_point": 2, "hardware": "one CPU thread"}}
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    res = run(py, "reproduce", "--spec", str(path), "--results", str(root / "results"), "--jobs", "1",
              "--threads", "1", "--no-progress", cwd=root)
    assert res.returncode == 0, res.stderr[-2000:]
    final = json.loads((root / "results" / "quick" / "tiny" / "runs" / "raf_s0" / "final.json").read_text())
    assert final["raftorch"] and final["torch"]
    claims = json.loads((root / "results" / "quick" / "tiny" / "claims.json").read_text())
    assert claims[0]["verdict"] in ("holds", "undecided")
