from pathlib import Path

import numpy as np
import pytest
import torch

from federation.tasks import classify, seg2d, seg3d
from federation.tasks.segmentation import HeldOutVolume
from federation.tasks.store import DatasetStore, StoredDatasetError


def _seg2d() -> seg2d.SiteDataset:
    label = (np.arange(2 * 8 * 8).reshape(2, 8, 8) % 3 == 0).astype(np.uint8)
    held = HeldOutVolume(torch.rand(2, 1, 4, 4), torch.ones(2, 1, 4, 4), label)
    return seg2d.SiteDataset(torch.rand(5, 1, 4, 4), torch.zeros(5, 1, 4, 4), [held])


def test_each_task_dataset_comes_back_equal_and_memory_mapped(tmp_path):
    store = DatasetStore(tmp_path)
    params = seg3d.Seg3DParams(depth=4, patch_size=[4, 4, 4])
    datasets = {
        "seg2d": _seg2d(),
        "seg3d": seg3d.Seg3DSite([(torch.rand(1, 4, 4, 4), torch.ones(1, 4, 4, 4))], [], params),
        "classify": classify.ClassifySite(
            torch.rand(3, 2, 4, 4), torch.tensor([0, 1, 1]), torch.rand(1, 2, 4, 4),
            torch.tensor([1]), torch.tensor([0.5, 1.5]),
        ),
    }  # fmt: skip
    for name, dataset in datasets.items():
        store.save(name, dataset)
        loaded = store.load(name)
        assert type(loaded) is type(dataset)
        assert repr(loaded) == repr(dataset)  # same fields, values and nesting
    back = store.load("seg2d")
    held = back.val_volumes[0]
    assert isinstance(held, HeldOutVolume) and held.label.dtype == np.uint8
    np.testing.assert_array_equal(held.label, datasets["seg2d"].val_volumes[0].label)
    assert torch.equal(back.train_images, datasets["seg2d"].train_images)
    # Read from the file's pages, not copied; writes stay in this process (copy-on-write).
    assert str(tmp_path / "seg2d.pt") in Path("/proc/self/maps").read_text()
    back.train_images.zero_()
    assert torch.equal(store.load("seg2d").train_images, datasets["seg2d"].train_images)


def test_what_is_not_a_registered_type_is_refused_on_save_and_on_load(tmp_path):
    store = DatasetStore(tmp_path)
    with pytest.raises(StoredDatasetError, match="register the type"):
        store.save("bad", {"data": object()})
    # A file naming a type no task registered is not trusted: removed, prepared again.
    torch.save({"__type__": "os:system", "__fields__": {}}, tmp_path / "foreign.pt")
    assert store.load("foreign") is None and not (tmp_path / "foreign.pt").exists()
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04 truncated")
    assert store.load("cut") is None and not (tmp_path / "cut.pt").exists()


def test_prepared_once_keyed_by_inputs_and_least_recently_used_dropped(tmp_path):
    store = DatasetStore(tmp_path, keep=2)
    calls = []

    def prepare() -> seg2d.SiteDataset:
        calls.append(1)
        return _seg2d()

    key = store.key("seg2d", "cfg", 0, [("series-a", "seg", None)])
    assert key != store.key("seg2d", "cfg", 0, [("series-b", "seg", None)])
    assert key != store.key("seg2d", "cfg", 1, [("series-a", "seg", None)])
    first = store.load_or_prepare(key, prepare)
    again = store.load_or_prepare(key, prepare)
    assert len(calls) == 1 and torch.equal(first.train_masks, again.train_masks)
    for other in ("k2", "k3"):
        store.load_or_prepare(other, prepare)
    assert sorted(p.stem for p in tmp_path.glob("*.pt")) == ["k2", "k3"]
