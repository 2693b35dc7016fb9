"""Each shipped task runs as a real Flower simulation with DP from `medfed run task=...`."""

import math

import pytest

from server.loop import RunHistory
from tests.helpers import medfed_run

SIZES = {
    "seg3d": [
        "task.image_size=16",
        "task.batch_size=4",
        "task.params.depth=8",
        "task.params.patch_size=[8,16,16]",
        "task.params.patches_per_volume=2",
    ],
    "classify": [
        "task.image_size=16",
        "task.batch_size=4",
        "task.params.slices=4",
        "model.in_channels=4",
    ],
}


@pytest.mark.parametrize(("task", "metric"), [("seg3d", "dice"), ("classify", "auroc")])
def test_task_runs_federated_with_dp(tmp_path, labelled_consortium, task, metric):
    root, _ = labelled_consortium
    proc = medfed_run(tmp_path, root, f"task={task}", f"run_name={task}", *SIZES[task])
    assert proc.returncode == 0, proc.stderr[-4000:]
    # The round table and the log line show the task's primary metric.
    assert f"{metric} site-1" in proc.stdout and f"{metric} (all)" in proc.stdout
    assert "[round 2/2] 3 sites trained" in proc.stderr and f", {metric} " in proc.stderr
    history = RunHistory.load(tmp_path / "outputs" / task / "history.json")
    assert history.metric == metric
    for record in history.rounds[1:]:
        assert set(record.site_train) == {"site-1", "site-2", "site-3"}
        assert all(m["epsilon"] > 0 for m in record.site_train.values())
        values = [m[metric] for m in record.site_evaluate.values()]
        assert len(values) == 3 and all(0 <= v <= 1 for v in values)
        assert min(values) <= record.evaluate[metric] <= max(values)
        if task == "classify":
            assert 0 <= record.evaluate["balanced-accuracy"] <= 1
    best = [r.evaluate[metric] for r in history.rounds]
    assert all(math.isfinite(v) for v in best)
    assert (tmp_path / "outputs" / task / "best_model.pt").exists()
