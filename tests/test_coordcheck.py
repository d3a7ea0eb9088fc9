"""The μP coordinate check passes under μP and fails under standard parametrization."""

from __future__ import annotations

from pathlib import Path

from windtunnel.cli import main
from windtunnel.compose import compose_run as compose
from windtunnel.coordcheck import coordcheck


def test_mup_is_stable_and_sp_is_not(tmp_path: Path) -> None:
    report = coordcheck(compose([]), widths=[64, 128, 256, 512], steps=4, seeds=1, out=tmp_path)
    assert report.mup_stable, report.table()
    assert not report.sp_stable, report.table()
    sp_blocks = [v for k, v in report.slopes["sp"].items() if k.startswith("block")]
    assert min(sp_blocks) > 1.0  # SP hidden activations grow about linearly with width
    assert max(abs(v) for v in report.slopes["mup"].values()) < report.tolerance
    assert (tmp_path / "coordcheck.png").stat().st_size > 10_000


def test_cli_exit_code_reflects_stability(tmp_path: Path) -> None:
    args = [
        "coordcheck",
        "--widths",
        "64",
        "128",
        "256",
        "--steps",
        "4",
        "--seeds",
        "1",
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 0
    assert (tmp_path / "coordcheck.json").exists()
    assert main(["coordcheck", "--widths", "64", "128", "--out", str(tmp_path)]) == 2  # too few
