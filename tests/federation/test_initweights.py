import json

import pytest
import torch

from federation.config import ModelConfig, TaskConfig
from federation.initweights import check_fits, load_initial_weights
from federation.modelpack import ModelCard, ModelPackage
from federation.models import build_model


def _load(reference, tmp_path):
    return load_initial_weights(
        str(reference), tracking_uri=f"sqlite:///{tmp_path / 'none.db'}", output_dir=tmp_path
    )


def test_a_monai_bundle_folder_gives_its_weights_and_name(tmp_path):
    state = build_model(ModelConfig(), seed=3).state_dict()
    bundle = tmp_path / "spleen_ct_seg"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    (bundle / "configs" / "metadata.json").write_text(json.dumps({"version": "0.5.2"}))
    torch.save({f"module.{k}": v for k, v in state.items()}, bundle / "models" / "model.pt")
    init = _load(bundle, tmp_path)
    assert init.source == "MONAI bundle spleen_ct_seg 0.5.2" and init.package is None
    assert init.state.keys() == state.keys()  # DataParallel's prefix dropped
    assert all(torch.equal(init.state[k], v) for k, v in state.items())
    (bundle / "models" / "model.pt").unlink()
    with pytest.raises(ValueError, match=r"has no models/model\.pt"):
        _load(bundle, tmp_path)


def test_files_package_run_and_state_dict(tmp_path):
    state = build_model(ModelConfig(), seed=3).state_dict()
    torch.save({"state_dict": state}, tmp_path / "weights.pt")
    assert _load(tmp_path / "weights.pt", tmp_path).source == f"file {tmp_path / 'weights.pt'}"
    card = ModelCard("medfed-seg2d", "", "run-a", 4, "0" * 64)
    (tmp_path / "run-a").mkdir()
    ModelPackage(TaskConfig(), ModelConfig(), state, card).save(
        tmp_path / "run-a" / "model.medfed.pt"
    )
    by_run = _load("run-a", tmp_path)
    assert by_run.source == "run run-a (round 4)" and by_run.package is not None
    torch.save([1, 2], tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="holds no state dict of tensors"):
        _load(tmp_path / "junk.pt", tmp_path)
    with pytest.raises(ValueError, match="no model 'nope'"):
        _load("nope", tmp_path)


def test_weights_of_another_network_are_refused_naming_the_layers():
    small = build_model(ModelConfig(channels=[4, 8, 16, 32]), seed=0).state_dict()
    expected = build_model(ModelConfig(), seed=0).state_dict()
    with pytest.raises(ValueError) as err:
        check_fits(small, expected, source="'x'")
    message = str(err.value)
    assert "layers of another shape (weights != network)" in message
    assert "model.0.conv.unit0.conv.weight (4, 1, 3, 3) != (8, 1, 3, 3)" in message
    del small["model.2.1.conv.unit0.conv.bias"]
    with pytest.raises(ValueError, match=r"the weights lack \(1\): model.2.1.conv.unit0.conv.bias"):
        check_fits(small, expected, source="'x'")
