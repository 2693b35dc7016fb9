import pytest
import torch
from opacus.validators import ModuleValidator

from federation.config import ModelConfig
from federation.models import build_model


def test_model_is_dp_ready_and_keys_match_everywhere():
    a = build_model(ModelConfig(), seed=1)
    b = build_model(ModelConfig(), seed=2)
    assert ModuleValidator.validate(a, strict=False) == []
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in a.modules())
    assert not any(getattr(m, "inplace", False) for m in a.modules())
    assert a.state_dict().keys() == b.state_dict().keys()


def test_batchnorm_is_replaced_for_dp():
    net = build_model(ModelConfig(norm="batch"), seed=0)
    assert any(isinstance(m, torch.nn.GroupNorm) for m in net.modules())
    assert ModuleValidator.validate(net, strict=False) == []


def test_seed_makes_initial_weights_reproducible():
    a = build_model(ModelConfig(), seed=7).state_dict()
    b = build_model(ModelConfig(), seed=7).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_output_shape():
    net = build_model(ModelConfig(), seed=0)
    assert net(torch.zeros(2, 1, 32, 32)).shape == (2, 1, 32, 32)


@pytest.mark.parametrize(("field", "value"), [("name", "resnet"), ("norm", "layer")])
def test_unknown_model_settings_are_rejected(field, value):
    with pytest.raises(ValueError, match=value):
        build_model(ModelConfig(**{field: value}))
