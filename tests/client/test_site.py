import shutil
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict

import client.site as site_module
from client.site import (
    DATASETS_DIR,
    SimulatedSites,
    SiteIdentity,
    load_site_dataset,
    site_from_node_config,
)
from federation.config import TaskConfig
from federation.errors import SiteDataError
from federation.tasks import seg2d


def _context(node_config):
    return Context(run_id=1, node_id=42, node_config=node_config, state=RecordDict(), run_config={})


def test_missing_folder_names_site_and_path(tmp_path):
    site = SiteIdentity("st-mary", tmp_path / "nowhere", tmp_path / "state")
    with pytest.raises(SiteDataError) as err:
        load_site_dataset(site, seg2d.TASK, TaskConfig(), seed=0)
    assert "st-mary" in str(err.value)
    assert str(tmp_path / "nowhere") in str(err.value)
    assert "does not exist" in str(err.value)


def test_folder_without_usable_series_is_refused(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(SiteDataError, match="no usable labelled series"):
        load_site_dataset(
            SiteIdentity("empty", tmp_path, tmp_path / "state"), seg2d.TASK, TaskConfig(), seed=0
        )


def test_site_dataset_is_split_by_patient(consortium, tmp_path):
    root, profiles = consortium
    cfg = TaskConfig(image_size=32, val_fraction=0.34)
    prepared = load_site_dataset(
        SiteIdentity("site-3", root / "site-3", tmp_path / "state"), seg2d.TASK, cfg, seed=0
    )
    assert prepared.fingerprint.startswith("ds-") and prepared.num_series == profiles[2].patients
    data = prepared.data
    assert data.train_images.shape[1:] == (1, 32, 32)
    assert 0.0 <= float(data.train_images.min()) and float(data.train_images.max()) <= 1.0
    assert set(data.train_masks.unique().tolist()) <= {0.0, 1.0}
    held_out = len(data.val_volumes)
    assert held_out == round(0.34 * profiles[2].patients)
    slices = data.val_volumes[0].image.shape[0]
    assert data.num_train + data.num_val == profiles[2].patients * slices


def test_site_dataset_is_prepared_once_and_again_when_its_series_change(
    consortium, tmp_path, monkeypatch
):
    root, _ = consortium
    data = tmp_path / "site-1"
    shutil.copytree(root / "site-1", data)
    site = SiteIdentity("site-1", data, tmp_path / "state")
    cfg = TaskConfig(image_size=32, val_fraction=0.34)
    first = load_site_dataset(site, seg2d.TASK, cfg, seed=0)
    stored = list((tmp_path / "state").rglob(f"{DATASETS_DIR}/*.pt"))
    assert len(stored) == 1
    # A new ClientApp process (empty in-process cache) loads the stored dataset.
    site_module._CACHE.clear()
    prepares = []
    real = seg2d.TASK.prepare
    monkeypatch.setattr(seg2d.TASK, "prepare", lambda *a, **k: prepares.append(1) or real(*a, **k))
    again = load_site_dataset(site, seg2d.TASK, cfg, seed=0)
    assert prepares == [] and torch.equal(again.data.train_images, first.data.train_images)
    assert again.fingerprint == first.fingerprint
    # Another setting, or a series fewer, is prepared anew.
    site_module._CACHE.clear()
    load_site_dataset(site, seg2d.TASK, TaskConfig(image_size=16, val_fraction=0.34), seed=0)
    assert prepares == [1]
    patient = sorted(p for p in data.iterdir() if p.is_dir())[0]
    shutil.rmtree(patient)
    site_module._CACHE.clear()
    fewer = load_site_dataset(site, seg2d.TASK, cfg, seed=0)
    assert prepares == [1, 1] and fewer.num_series == first.num_series - 1


def test_site_identity_from_node_config_and_simulation(tmp_path):
    ctx = _context({"site-name": "st-mary", "data-path": str(tmp_path), "state-dir": "/st"})
    assert site_from_node_config(ctx) == SiteIdentity("st-mary", tmp_path, Path("/st"))
    with pytest.raises(SiteDataError, match="data-path"):
        site_from_node_config(_context({}))
    sim = SimulatedSites(("a", "b"), str(tmp_path), "/state")
    assert sim(_context({"partition-id": 1, "num-partitions": 2})) == SiteIdentity(
        "b", tmp_path / "b", Path("/state/b")
    )


def test_classification_needs_class_labels_not_masks(labelled_consortium, tmp_path):
    import shutil

    from client.site import SiteIdentity, load_site_dataset
    from federation.compose import compose_config
    from federation.tasks import get_task

    root, _ = labelled_consortium
    site = tmp_path / "site-1"
    shutil.copytree(root / "site-1", site, ignore=shutil.ignore_patterns("seg.dcm"))
    cfg = compose_config(["task=classify"])
    task = get_task("classify")
    prepared = load_site_dataset(
        SiteIdentity("site-1", site, tmp_path / "state"), task, cfg.task, seed=0
    )
    assert prepared.num_series == 4  # every series has a class label, none a mask
    assert prepared.data.num_train + prepared.data.num_val > 0
