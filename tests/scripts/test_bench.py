import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import medfed_run

BENCH = Path(__file__).resolve().parents[2] / "scripts" / "bench"


def bench(script, *args, timeout=900):
    """Run a benchmark script; the JSON object on its last line."""
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_dp_overhead_quick_prints_ratios_for_every_mode():
    result = bench("dp_overhead.py", "--quick", "--size", 32, "--steps", 1, "--warmup", 1)
    assert result["benchmark"] == "dp_overhead"
    assert set(result["modes"]) == {"hooks", "functorch", "ew", "ghost"}
    assert result["modes"]["hooks"]["ok"] and result["modes"]["hooks"]["time_ratio"] > 0
    # Expanded weights has no rule for ConvTranspose: reported, not crashed.
    assert not result["modes"]["ew"]["ok"] and "conv_transpose" in result["modes"]["ew"]["error"]
    assert result["fastest_mode"] in {"hooks", "functorch", "ghost"}
    # Where the hooks step goes: per-sample gradients and the DP optimizer step, timed.
    parts = result["hooks_step_parts_s"]
    assert parts["per_sample_gradients"] > 0 and parts["dp_optimizer"] > 0
    assert parts["non_private_step"] > 0


def test_strategies_quick_reports_each_strategy(tmp_path):
    result = bench(
        "strategies.py",
        "--quick",
        "--rounds",
        1,
        "--strategies",
        "fedbn",
        "--work",
        tmp_path,
        "--plot",
        tmp_path / "s.png",
    )
    assert result["benchmark"] == "strategies" and result["failed"] == []
    assert 0 <= result["final_dice"]["fedbn"] <= 1
    assert (tmp_path / "s.png").stat().st_size > 0


def test_suite_quick_runs_a_benchmark_keeps_earlier_results_and_writes_the_docs(tmp_path):
    earlier = {"communication": {"ok": False, "error": ["stopped by hand"], "seconds": 1.0}}
    (tmp_path / "benchmarks.json").write_text(json.dumps({"quick": True, "results": earlier}))
    result = bench("suite.py", "--quick", "--only", "prepare_speed", "--docs", tmp_path)
    assert result["ok"] == ["prepare_speed"]
    saved = json.loads((tmp_path / "benchmarks.json").read_text())
    assert saved["results"]["communication"] == earlier["communication"]
    assert saved["results"]["prepare_speed"]["machine"] == saved["machine"]  # where it ran
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


def test_overhead_quick_measures_medfed_plain_flower_and_nvflare_in_deployment(tmp_path):
    # The first run also makes NVFlare's venv (a few minutes).
    args = ("--quick", "--sites", 2, "--rounds", 3, "--work", tmp_path)
    result = bench("overhead.py", *args, timeout=1800)
    assert [(r["engine"], r["sites"]) for r in result["rows"]] == [("deployment", 2)]
    (row,) = result["rows"]
    for app in ("medfed", "plain_flower", "nvflare", "nvflare_tuned"):
        measured = row[app]
        assert 0 < measured["slowest_site_seconds"] < measured["phase_seconds"], app
        assert 0 < measured["overhead_share"] < 1
        # The overhead is the measured phase beyond the slowest site's training.
        assert measured["overhead_seconds"] == pytest.approx(
            measured["phase_seconds"] - measured["slowest_site_seconds"], abs=0.05
        )
        # The sites' training spans at least the slowest site's own training.
        assert 0 <= measured["idle_share"] <= measured["overhead_share"] + 1e-9
    # The plain app ran on stock Flower over TLS: its SuperLink served HTTPS and each
    # SuperNode received the training messages.
    plain = tmp_path / "overhead-deployment-2-e1-plain"
    assert "Uvicorn running on https://127.0.0.1:" in (plain / "superlink.log").read_text()
    for node in ("node-0.log", "node-1.log"):
        assert (plain / node).read_text().count("Receiving: train message") == 3
    # NVFlare trained medfed's exported tensors in its POC deployment, each site each
    # round (its Client API script logs the training's own span).
    timing = tmp_path / "overhead-deployment-2-e1-workload" / "timing"
    for site in ("site-1", "site-2"):
        assert len((timing / f"{site}.jsonl").read_text().splitlines()) == 3
    # Over TLS, stock Flower's 3 s polls dominate its rounds; medfed's fixed cost is lower.
    assert row["medfed"]["overhead_seconds"] < row["plain_flower"]["overhead_seconds"]
    assert result["medfed_at_most_plain"] == (
        row["medfed"]["overhead_share"] <= row["plain_flower"]["overhead_share"]
    )
    best = min(row[p]["overhead_seconds"] for p in ("nvflare", "nvflare_tuned"))
    assert result["medfed_at_most_nvflare"] == (
        row["medfed"]["overhead_seconds"] <= best
        and row["medfed"]["phase_seconds"]
        <= min(row[p]["phase_seconds"] for p in ("nvflare", "nvflare_tuned"))
    )
    # Where medfed's time went: CPU per process role, a site's processes and memory, and
    # the Fleet requests the sites made through the gate.
    where = row["medfed"]["where"]
    assert {"superlink", "supernode", "clientapp"} <= set(where["cpu_seconds_per_round"])
    assert where["processes_per_site"] >= 3 and where["site_pss_mb"] > 0
    assert where["fleet_requests"]["pull-messages"]["per_round"] > 0
    assert where["superlink_cpu_ms_per_fleet_request"] > 0
    # Sites keep their TLS connections to the gate between rounds (0 new per round at 3
    # and 10 sites in the last suite run).
    assert where["fleet_connections_per_round"] <= 1
    # The profile samples every process of the run but costs little of the 2 cores.
    assert 0 < where["profiler_cpu_per_second"] < 0.1


def test_predict_quick_gives_speed_stage_shares_flat_memory_and_the_runs_dice(tmp_path, consortium):
    root, _ = consortium
    proc = medfed_run(tmp_path, root, "run_name=for-predict")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "outputs" / "for-predict"
    result = bench("predict.py", "--quick", "--run", run, "--data", root)
    assert result["benchmark"] == "predict" and result["series"] == 8
    assert result["series_per_second"] > 0 and result["ms_per_slice"] > 0
    assert set(result["shares"]) == {"decode", "model", "encode", "store"}
    assert sum(result["shares"].values()) == pytest.approx(1.0)
    assert result["model_share"] == result["shares"]["model"]
    assert result["stored_to"] == "orthanc-dicomweb"  # CI installs Orthanc
    assert result["shares"]["store"] > 0
    # streaming: 4x the series costs far less than 4x the memory
    assert result["memory_ratio_4x_series"] < 1.5
    # The written SEGs, read back and scored against the ground truth on each site's
    # held-out patients, give the Dice the run reported for the packaged round.
    dice = result["dice"]
    assert dice["round"] >= 0 and 0 <= dice["written_segs"] <= 1
    assert dice["difference"] < 1e-3


def test_deid_quick_compares_deidentification_with_plain_reads_at_flat_memory():
    result = bench("deid.py", "--quick")
    assert result["benchmark"] == "deid" and result["files"] == 26  # 2 x (12 slices + SEG)
    # Writing a copy costs more than reading; de-identifying costs more than copying.
    assert result["read_files_per_s"] > result["copy_files_per_s"] > result["deid_files_per_s"] > 0
    assert result["deid_vs_read_time"] > result["deid_vs_copy_time"] > 1
    # Streaming: 4x the files, about the same peak memory.
    assert set(result["peak_mb"]) == {"26", "104"} and result["memory_growth_4x"] < 1.1


def test_a_failed_nvflare_run_is_reported_in_its_row_and_its_processes_are_stopped(tmp_path):
    sys.path.insert(0, str(BENCH))
    try:
        import nvflare_peer
        import overhead
        import suite
    finally:
        sys.path.remove(str(BENCH))
    work = tmp_path / "overhead-deployment-30-e1-nvflare_tuned"
    left = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(work)])
    nvflare_peer._stop_leftovers(work)
    assert left.wait(timeout=10) != 0  # killed, not finished

    ours = {"phase_seconds": 9.0, "overhead_seconds": 3.0}
    row = {
        "engine": "deployment",
        "sites": 30,
        "local_epochs": 1,
        "medfed": {**ours, "slowest_site_seconds": 6.0, "overhead_share": 0.33, "idle_share": 0.1},
        "nvflare": {"phase_seconds": 8.0, "overhead_seconds": 2.5},
        "nvflare_tuned": {"failed": "NVFlare deployment run failed (no sign of life for 301 s)"},
    }
    assert not overhead.at_most_nvflare(row)  # judged on the run that finished
    row["nvflare"] = {"phase_seconds": 10.0, "overhead_seconds": 3.5}
    assert overhead.at_most_nvflare(row)
    row["nvflare"] = {"failed": "NVFlare deployment run failed"}
    assert not overhead.at_most_nvflare(row)  # nothing to be at most of

    text = suite.render_overhead(
        {"rounds": 4, "rows": [row], "medfed_at_most_plain": True, "medfed_at_most_nvflare": False}
    )
    assert "| NVFlare (0.1 s polls) | failed |" in text
    assert "Failed: deployment/30 NVFlare (0.1 s polls): NVFlare deployment run failed" in text


def test_the_profile_classifies_processes_and_counts_their_cpu():
    sys.path.insert(0, str(BENCH))
    try:
        from _profile import ProcessProfile, role_of
    finally:
        sys.path.remove(str(BENCH))

    assert (
        role_of("python -m client.supernode --superlink x", "python -m medfed.cli site start")
        == "supernode"
    )
    forkserver = "python -c from multiprocessing.forkserver import main; main(3)"
    assert role_of(forkserver, "python -m client.supernode") == "forkserver"
    assert role_of(forkserver, forkserver) == "clientapp"  # a ClientApp it forked
    busy = subprocess.Popen(
        [sys.executable, "-m", "client.supernode", "--help"], stdout=subprocess.DEVNULL
    )
    profile = ProcessProfile([busy.pid], interval=0.05).start()
    busy.wait()
    profile.stop()
    seen = [s for s in profile.samples if s.count]
    assert seen and all(s.count == {"supernode": 1} for s in seen)
    assert max(s.cpu["supernode"] for s in seen) > 0.1  # its imports, while sampled
