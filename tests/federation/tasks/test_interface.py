"""The task interface: discovery by name, per-task checks, and the shipped tasks' data."""

import tempfile
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import federation.tasks
from federation.compose import compose_config, select_metric
from federation.config import PrivacyConfig, section_from_flat
from federation.config import TaskConfig as TaskSection
from federation.dicom.classlabels import read_class_labels
from federation.dicom.prepare import labelled_volumes
from federation.dicom.synth import ABNORMAL, NORMAL, has_lesion, patient_id
from federation.models import build_model
from federation.tasks import available_tasks, get_task
from federation.tasks.base import Task
from federation.tasks.classify import WeightedCrossEntropy
from federation.tasks.metrics import dice
from server.loop import site_config
from tests.conftest import SEED


def load_labelled_volumes(folder):
    """The folder's labelled volumes through the site pipeline, cached in a scratch folder."""
    return labelled_volumes(folder, Path(tempfile.mkdtemp(prefix="medfed-test-")))


def test_shipped_tasks_are_found_by_name_and_implement_the_interface():
    assert {"seg2d", "seg3d", "classify"} <= set(available_tasks())
    primary = {}
    for name in ("seg2d", "seg3d", "classify"):
        task = get_task(name)
        assert isinstance(task, Task) and task.name == name
        assert task.primary_metric == task.metrics[0]
        primary[name] = task.primary_metric
        cfg = compose_config([f"task={name}"])  # the task's yaml picks its model
        task.check(cfg.task, cfg.model)
        assert select_metric(cfg) == task.primary_metric
    assert primary == {"seg2d": "dice", "seg3d": "dice", "classify": "auroc"}
    with pytest.raises(ValueError, match=r"task\.name='nope' is unknown; available tasks"):
        get_task("nope")


def test_a_new_task_module_is_discovered_without_touching_client_or_server(tmp_path, monkeypatch):
    (tmp_path / "seg2d_copy.py").write_text(
        textwrap.dedent(
            """
            from federation.tasks.seg2d import Seg2D

            class Copy(Seg2D):
                name = "seg2d_copy"

            TASK = Copy()
            """
        )
    )
    (tmp_path / "broken.py").write_text("TASK = object()\n")
    monkeypatch.setattr(federation.tasks, "__path__", [*federation.tasks.__path__, str(tmp_path)])
    assert get_task("seg2d_copy").name == "seg2d_copy"
    cfg = compose_config(["task.name=seg2d_copy"])
    assert select_metric(cfg) == "dice"
    with pytest.raises(ValueError, match="must define TASK"):
        get_task("broken")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["task=classify", "task.params.slices=4"], "set model.in_channels=4"),
        (["task=classify", "model=unet2d"], "needs a 2D classifier"),
        (["task=seg3d", "model=unet2d"], "needs a 3D U-Net"),
        (["task=seg3d", "task.params.patch_size=[16,30,32]"], "each a multiple of 4"),
        (["task=seg3d", "task.params.depth=8"], "larger than the resampled volume"),
        (["task=seg2d", "model=densenet"], "needs a 2D U-Net"),
        (["evaluation.select_metric=auroc"], "not a metric of task 'seg2d'"),
    ],
)
def test_settings_a_task_cannot_run_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        compose_config(overrides)


def test_task_params_reach_the_sites_intact():
    cfg = compose_config(["task=seg3d", "task.params.patch_size=[8,16,16]"])
    flat = dict(site_config(cfg, "run"))
    assert flat["task.params.patch_size"] == [8, 16, 16]
    task = section_from_flat(flat, "task", TaskSection)
    assert task == cfg.task


def test_the_generator_labels_a_site_specific_share_of_series(labelled_consortium):
    root, profiles = labelled_consortium
    assert len({p.prevalence for p in profiles}) == len(profiles)
    for profile in profiles:
        volumes, _ = load_labelled_volumes(root / profile.name)  # labels.csv read by prepare
        assert sum(v.class_label is not None for v in volumes) == profile.patients
        labels = read_class_labels(root / profile.name / "labels.csv")
        by_patient = {}
        for p in range(profile.patients):
            by_patient[patient_id(profile, p)] = (
                ABNORMAL if has_lesion(profile, p, seed=SEED) else NORMAL
            )
        assert Counter(by_patient.values()) == {ABNORMAL: 2, NORMAL: 2}
        assert Counter(labels.values()) == {ABNORMAL: 4, NORMAL: 4}  # study and series UIDs
        for volume in volumes:
            # The lesion is hypodense: only abnormal series reach far below the background.
            low = float(np.mean(volume.hu < -150))
            assert (low > 0.002) == (volume.class_label == ABNORMAL)


def test_labels_csv_errors_say_what_is_wrong(tmp_path):
    bad = tmp_path / "a.csv"
    bad.write_text("uid,label\n1.2,normal\n")
    with pytest.raises(ValueError, match="needs a 'label' column and a 'SeriesInstanceUID'"):
        read_class_labels(bad)
    bad.write_text("SeriesInstanceUID,label\n1.2,normal\n1.2,abnormal\n")
    with pytest.raises(ValueError, match="labelled both 'normal' and 'abnormal'"):
        read_class_labels(bad)


def test_classification_split_keeps_both_classes_and_weights_them(labelled_consortium):
    root, _ = labelled_consortium
    cfg = compose_config(
        ["task=classify", "task.image_size=16", "task.params.slices=4", "model.in_channels=4"]
    )
    task = get_task("classify")
    volumes, _ = load_labelled_volumes(root / "site-1")
    data = task.prepare(volumes, cfg.task, seed=0)
    assert sorted(data.val_y.tolist()) == [0, 1] and sorted(data.train_y.tolist()) == [0, 1]
    assert data.train_x.shape == (2, 4, 16, 16)
    assert data.class_weights.tolist() == [1.0, 1.0]
    volumes[0].class_label = "unknown"
    with pytest.raises(ValueError, match=r"\['unknown'\] are not in task.params.classes"):
        task.prepare(volumes, cfg.task, seed=0)
    for v in volumes:
        v.class_label = NORMAL
    with pytest.raises(ValueError, match=r"classes \['abnormal'\] have fewer than 2 patients"):
        task.prepare(volumes, cfg.task, seed=0)


def test_weighted_loss_is_per_sample_and_weighs_the_rare_class():
    loss = WeightedCrossEntropy(torch.tensor([0.5, 2.0]))
    logits = torch.zeros(3, 2)  # cross-entropy log(2) for every sample
    target = torch.tensor([0, 1, 1])
    loss.reduction = "none"
    per_sample = loss(logits, target)
    assert per_sample.tolist() == pytest.approx([0.5 * np.log(2), 2 * np.log(2), 2 * np.log(2)])
    loss.reduction = "mean"
    assert float(loss(logits, target)) == pytest.approx(per_sample.mean().item())


@pytest.mark.parametrize("name", ["seg3d", "classify"])
def test_each_task_trains_under_dp_and_evaluates_its_metrics(labelled_consortium, name):
    root, _ = labelled_consortium
    small = {
        "seg3d": [
            "task.params.depth=8",
            "task.params.patch_size=[8,16,16]",
            "task.params.patches_per_volume=2",
        ],
        "classify": ["task.params.slices=4", "model.in_channels=4"],
    }[name]
    cfg = compose_config(
        [f"task={name}", "task.image_size=16", "task.local_epochs=1", "task.batch_size=4", *small]
    )
    task = get_task(name)
    volumes, _ = load_labelled_volumes(root / "site-2")
    data = task.prepare(volumes, cfg.task, seed=0)
    model = build_model(cfg.model, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    outcome = task.train(model, data, cfg.task, PrivacyConfig(), seed=0)
    assert outcome.num_examples == data.num_train
    assert [s.noise_multiplier for s in outcome.spent] == [1.3]
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    result = task.evaluate(model, data)
    assert set(result.metrics) == set(task.metrics)
    assert all(np.isfinite(v) and 0 <= v <= 1 for v in result.metrics.values())
    assert result.num_examples == data.num_val > 0


@pytest.mark.parametrize(
    ("name", "small"),
    [
        ("seg2d", []),
        ("seg3d", ["task.params.depth=8", "task.params.patch_size=[8,16,16]"]),
    ],
)
def test_the_dice_a_run_reports_is_the_dice_of_the_masks_a_site_writes(consortium, name, small):
    """Evaluation scores on each series' own grid, as its SEG is judged in the clinic."""
    root, _ = consortium
    cfg = compose_config([f"task={name}", "task.image_size=16", "task.local_epochs=1", *small])
    task = get_task(name)
    volumes, _ = load_labelled_volumes(root / "site-1")
    assert volumes[0].hu.shape[1] > 16  # the training grid is coarser than the series
    model = build_model(cfg.model, seed=0)
    task.train(model, task.prepare(volumes, cfg.task, seed=0), cfg.task, PrivacyConfig(), seed=0)
    reported = task.evaluate(model, task.prepare_holdout(volumes, cfg.task)).metrics["dice"]
    written = []
    for volume in volumes:
        mask = task.infer(model, volume, cfg.task).mask
        assert mask is not None and mask.shape == volume.hu.shape
        written.append(dice(mask, volume.label))
    assert 0 < reported < 1
    assert reported == pytest.approx(float(np.mean(written)), abs=1e-12)
