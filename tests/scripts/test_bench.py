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


def test_suite_quick_runs_benchmarks_and_writes_the_docs(tmp_path):
    suite = SCRIPT.parent / "suite.py"
    proc = subprocess.run(
        [sys.executable, str(suite), "--quick", "--only", "communication", "--docs", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["ok"] == ["communication"]
    saved = json.loads((tmp_path / "benchmarks.json").read_text())
    comm = saved["results"]["communication"]["result"]
    full, fp16 = comm["encodings"]["full"], comm["encodings"]["fp16-delta"]
    # Full weights are the float32 model plus .npy headers; fp16 deltas about half of it.
    assert 1.0 <= full["vs_float32_model"] < 1.05
    assert 0.5 <= fp16["vs_float32_model"] < 0.55
    page = (tmp_path / "benchmarks.md").read_text()
    assert "## communication" in page and "cores" in page and "fp16-delta" in page


def test_prepare_speed_quick_prints_every_ratio():
    script = SCRIPT.parent / "prepare_speed.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--quick", "--series", "2", "--slices", "8", "--rows", "64"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "prepare_speed" and result["files"] == 16
    assert set(result["seconds"]) == {"bytes", "naive", "monai", "cold", "warm"}
    for key in ("naive_over_cold", "monai_over_cold", "cold_over_bytes", "cold_over_warm"):
        assert result[key] > 0
    assert set(result["peak_mb"]) == {"2", "8"} and result["peak_mb_growth"] > 0
