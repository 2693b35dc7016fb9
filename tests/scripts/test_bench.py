import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench" / "dp_overhead.py"


def test_dp_overhead_quick_prints_ratios_for_every_mode():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--size", "32", "--steps", "1", "--warmup", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "dp_overhead"
    assert set(result["modes"]) == {"hooks", "functorch", "ew", "ghost"}
    assert result["modes"]["hooks"]["ok"] and result["modes"]["hooks"]["time_ratio"] > 0
    # Expanded weights has no rule for ConvTranspose: reported, not crashed.
    assert not result["modes"]["ew"]["ok"] and "conv_transpose" in result["modes"]["ew"]["error"]
    assert result["fastest_mode"] in {"hooks", "functorch", "ghost"}


def test_strategies_quick_reports_each_strategy(tmp_path):
    script = SCRIPT.parent / "strategies.py"
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            "--quick",
            "--rounds",
            "1",
            "--strategies",
            "fedbn",
            "--work",
            str(tmp_path),
            "--plot",
            str(tmp_path / "s.png"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "strategies" and result["failed"] == []
    assert 0 <= result["final_dice"]["fedbn"] <= 1
    assert (tmp_path / "s.png").stat().st_size > 0
