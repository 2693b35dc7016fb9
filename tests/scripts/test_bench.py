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


def test_suite_quick_runs_a_benchmark_keeps_earlier_results_and_writes_the_docs(tmp_path):
    earlier = {"communication": {"ok": False, "error": ["stopped by hand"], "seconds": 1.0}}
    (tmp_path / "benchmarks.json").write_text(json.dumps({"quick": True, "results": earlier}))
    suite = SCRIPT.parent / "suite.py"
    proc = subprocess.run(
        [sys.executable, str(suite), "--quick", "--only", "prepare_speed", "--docs", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["ok"] == ["prepare_speed"]
    saved = json.loads((tmp_path / "benchmarks.json").read_text())
    assert saved["results"]["communication"] == earlier["communication"]
    result = saved["results"]["prepare_speed"]["result"]
    measured = {"bytes", "naive", "monai", "cold", "warm"}
    if result["cold_over_bytes_disk"] is not None:  # where the page cache could be dropped
        measured |= {"bytes-disk", "cold-disk"}
        assert result["cold_over_bytes_disk"] > 0
    assert set(result["seconds"]) == measured
    for key in ("naive_over_cold", "monai_over_cold", "cold_over_bytes", "cold_over_warm"):
        assert result[key] > 0
    assert set(result["peak_mb"]) == {"4", "16"} and result["peak_mb_growth"] > 0
    page = (tmp_path / "benchmarks.md").read_text()
    assert "## prepare_speed" in page and "cores" in page and "naive / cold" in page
    assert "## communication" in page and "stopped by hand" in page
