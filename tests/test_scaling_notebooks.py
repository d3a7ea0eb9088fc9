"""The analysis notebooks are committed without outputs, execute cleanly, and compute the right
thing: each ends with a cell printing its key results as one line of JSON, which the tests check
against the law the data came from (synthetic points) or the published fit (Epoch AI's Chinchilla
re-extraction, when ``shared/anchors`` is checked out next to the repo)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, SHARED

NOTEBOOKS = sorted((REPO / "analysis").glob("scaling_*.ipynb"))
EPOCH_CSV = SHARED / "anchors" / "data" / "epoch_chinchilla_svg_extracted_data.csv"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Epoch AI's replication of Chinchilla approach 3 (Besiroglu et al. 2024, table 1) on the same
# 240 points: E 1.82, A 482.01, B 2085.43, alpha 0.3478, beta 0.3658.
EPOCH = {"E": 1.82, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}
# The laws the notebooks draw their synthetic points from (see their data cells).
CSV_TRUTH = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
MLFLOW_TRUTH = {"C_N": 7.15e-2, "C_D": 3.0e-1, "alpha": 0.29, "beta": 0.23, "L0": 0.31}
BPB_PER_NAT = 1 / math.log(2) / 3.5  # synthetic_points: bpb = loss / ln2 / bytes_per_token


def _optimal(law: dict[str, float], C: float) -> tuple[float, float]:
    """Compute-optimal (N, D/N) of ``E + A/N^α + B/D^β`` under C = 6ND, in closed form."""
    al, be = law["alpha"], law["beta"]
    N = (al * law["A"] / (be * law["B"])) ** (1 / (al + be)) * (C / 6) ** (be / (al + be))
    return N, C / 6 / N**2


def _execute(path: Path, monkeypatch: pytest.MonkeyPatch, **env: str) -> dict[str, Any]:
    """Run the notebook; return the JSON its last cell prints."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    for var in ("WT_FIT_CSV", "WT_EXPERIMENT", "MLFLOW_TRACKING_URI", "WT_TARGET"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WT_N_BOOT", "30")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()  # raises CellExecutionError with the failing cell's traceback
    last = nb.cells[-1]
    text = "".join(o.get("text", "") for o in last.outputs if o.output_type == "stream")
    lines = [x for x in text.splitlines() if x.startswith("{")]
    assert lines, f"{path.name}: the last cell must print the key results as JSON, got {text!r}"
    return json.loads(lines[-1])


def _is_png(p: str | Path) -> bool:
    p = Path(p)
    return p.is_file() and p.stat().st_size > 1000 and p.read_bytes()[:8] == PNG_MAGIC


def test_notebooks_exist_and_are_stripped():
    nbformat = pytest.importorskip("nbformat")
    assert {p.name for p in NOTEBOOKS} >= {"scaling_fit_csv.ipynb", "scaling_fit_mlflow.ipynb"}
    for p in NOTEBOOKS:
        nb = nbformat.read(p, as_version=4)
        for c in nb.cells:
            if c.cell_type == "code":
                assert not c.outputs and c.execution_count is None, (
                    f"{p.name}: outputs not stripped"
                )


def _check_law(r: dict[str, Any], truth: dict[str, float], tol: float) -> None:
    """Exponents within ``tol`` of the truth, inside their bootstrap intervals, and a + b = 1."""
    for k in ("alpha", "beta"):
        assert r[k] == pytest.approx(truth[k], abs=tol), (k, r[k])
        lo, hi = r["intervals"][k]
        assert lo <= r[k] <= hi, (k, lo, r[k], hi)
    assert r["a"] == pytest.approx(r["beta"] / (r["alpha"] + r["beta"]), rel=1e-6)
    assert r["a"] + r["b"] == pytest.approx(1.0)


def _check_csv_notebook(r: dict[str, Any], expected_source: str) -> None:
    assert r["source"] == expected_source
    assert r["n_boot"] == 30 and r["n_boot_failed"] <= 3
    assert len(r["plots"]) >= 3 and all(_is_png(p) for p in r["plots"]), r["plots"]
    if expected_source == "epoch":  # 245 points less the 5 of highest loss
        truth, tol, e_tol = EPOCH, 0.02, 0.05
        assert r["n_points"] == 240
    else:  # 7 sizes × 5 multiples, 0.5% noise: the exponents come back within a few hundredths
        truth, tol, e_tol = CSV_TRUTH, 0.04, 0.1
        assert r["n_points"] == 35
    _check_law(r, truth, tol)
    assert r["E"] == pytest.approx(truth["E"], abs=e_tol)
    # the allocation at Chinchilla's budget: Epoch's law gives ≈18 tokens per parameter
    N_opt, ratio = _optimal(truth, 5.76e23)
    assert N_opt / 1.5 < r["N_opt"] < N_opt * 1.5, (r["N_opt"], N_opt)
    assert ratio / 2.25 < r["tokens_per_param"] < ratio * 2.25, (r["tokens_per_param"], ratio)
    lo, hi = r["tokens_per_param_interval"]
    assert lo <= r["tokens_per_param"] <= hi


def _check_mlflow_notebook(r: dict[str, Any]) -> None:
    t = MLFLOW_TRUTH
    assert r["source"] == "synthetic" and r["target"] == "bpb"
    assert r["n_points"] == 20  # 5 sizes × 4 multiples, read back from the MLflow store
    assert r["rms_log_residual"] < 0.01  # 0.3% noise
    _check_law(r, t, 0.03)
    # the fit is on bpb: the MiniCPM coefficients scale with nats → bits per byte
    assert r["minicpm"]["L0"] == pytest.approx(t["L0"] * BPB_PER_NAT, rel=0.1)
    assert r["minicpm"]["alpha"] == r["alpha"] and r["minicpm"]["beta"] == r["beta"]
    # the plan spends 1e21 FLOPs near the true compute-optimal size (a real shape, so not exact)
    plan = r["plan"]
    assert plan["C_6ND"] == pytest.approx(1e21, rel=1e-3)
    truth = {"A": t["C_N"] * 1e9 ** t["alpha"], "B": t["C_D"] * 1e9 ** t["beta"], **t}
    N_opt, _ = _optimal(truth, 1e21)
    assert N_opt / 1.5 < plan["N"] < N_opt * 1.5, (plan["N"], N_opt)
    assert plan["tokens_per_param"] == pytest.approx(plan["D"] / plan["N"])
    E, A, B = t["L0"], truth["A"], truth["B"]
    true_bpb = (E + A / plan["N"] ** t["alpha"] + B / plan["D"] ** t["beta"]) * BPB_PER_NAT
    assert plan["loss"] == pytest.approx(true_bpb, rel=0.03)
    assert {"fit.json", "points.csv", "loss_vs_compute.png", "bootstrap.png"} <= set(r["outputs"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_results(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each notebook as a user opens it (no environment variables)."""
    r = _execute(path, monkeypatch)
    if path.name == "scaling_fit_csv.ipynb":
        _check_csv_notebook(r, "epoch" if EPOCH_CSV.is_file() else "synthetic")
    elif path.name == "scaling_fit_mlflow.ipynb":
        _check_mlflow_notebook(r)
    else:
        pytest.fail(f"{path.name}: add a check of its results to this test")


def test_csv_notebook_fits_a_given_csv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``$WT_FIT_CSV`` is what it fits (here the notebook's own synthetic law, whichever data
    the default path would have found)."""
    import numpy as np

    from windtunnel.scaling import DataModelLaw
    from windtunnel.scaling.synthetic import synthetic_points

    csv = tmp_path / "points.csv"
    pts = synthetic_points(
        DataModelLaw(**CSV_TRUTH), np.geomspace(1e7, 3e9, 7), (5, 10, 20, 40, 80), noise=0.005
    )
    pts.to_csv(csv, index=False)
    r = _execute(REPO / "analysis" / "scaling_fit_csv.ipynb", monkeypatch, WT_FIT_CSV=str(csv))
    _check_csv_notebook(r, "csv")
