"""Run table from DataFrames and CSV/parquet (from MLflow: tests/test_tracking_runs.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from windtunnel.scaling import DataModelLaw, InputError
from windtunnel.scaling.synthetic import synthetic_points
from windtunnel.scaling.table import load_curves, load_table

LAW = DataModelLaw(E=1.6, A=350.0, B=900.0, alpha=0.32, beta=0.3)


def test_csv_and_parquet_with_column_mapping(tmp_path):
    df = synthetic_points(LAW, np.geomspace(1e7, 1e9, 4))
    raw = df.rename(columns={"N": "Model Size", "C": "Training FLOP"}).drop(columns="D")
    raw.to_csv(tmp_path / "t.csv", index=False)
    raw.to_parquet(tmp_path / "t.parquet")
    for name in ("t.csv", "t.parquet"):
        t = load_table(tmp_path / name, columns={"N": "Model Size", "C": "Training FLOP"})
        assert np.allclose(t["D"], df["D"])  # D = C / (6N)
    # integer columns: C = 6ND must not overflow int64
    big = pd.DataFrame({"N": [10**9, 2 * 10**9], "D": [2 * 10**10, 4 * 10**10], "loss": [2.5, 2.4]})
    assert (load_table(big)["C"] > 1e20).all()
    with pytest.raises(InputError, match="no such file"):
        load_table(tmp_path / "missing.csv")
    with pytest.raises(InputError, match="lacks"):
        load_table(tmp_path / "t.csv", columns={"N": "params"})


def test_load_table_takes_frames_and_files_only(tmp_path):
    """MLflow is read by windtunnel.tracking.runs; scaling only takes its DataFrame."""
    with pytest.raises(InputError, match=r"tracking\.runs\.runs_table"):
        load_table("ladder")
    df = pd.DataFrame({"N": [1e6], "C": [1.2e14], "loss": [3.0], "run_id": ["a"]})
    assert load_table(df)["D"].tolist() == [2e7]


def test_load_curves(tmp_path):
    curves = pd.DataFrame({"run_id": ["a"], "batch_tokens": [8], "tokens": [64], "loss": [3.0]})
    curves.to_csv(tmp_path / "c.csv", index=False)
    assert load_curves(tmp_path / "c.csv").equals(curves)
    assert load_curves(curves).equals(curves)
    with pytest.raises(InputError, match=r"lacks column\(s\) \['loss'\]"):
        load_curves(curves.drop(columns="loss"))


def test_scaling_imports_no_tracking_mlflow_or_heavy_deps():
    """scaling/ is pure (pandas in, results out): only cli.py reaches into windtunnel.tracking,
    and only inside its _mlflow_* functions."""
    import ast
    from pathlib import Path

    import windtunnel.scaling

    banned = ("windtunnel.tracking", "windtunnel.cli", "mlflow", "optuna", "torch")
    for path in sorted(Path(windtunnel.scaling.__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                if name.startswith(banned):
                    assert path.name == "cli.py" and name == "windtunnel.tracking.runs", (
                        f"{path.name} imports {name}"
                    )
