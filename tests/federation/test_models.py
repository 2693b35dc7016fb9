import pytest
import torch
from opacus.validators import ModuleValidator

from federation.config import ModelConfig
from federation.models import build_model, frozen_names, weights_sha256


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


def test_freezing_the_encoder_leaves_it_untouched_by_dp_training():
    from federation.config import PrivacyConfig, TaskConfig
    from federation.tasks.base import private_train

    cfg = ModelConfig(freeze=["encoder"])
    net = build_model(cfg, seed=0)
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    assert frozen == frozen_names(net, cfg)
    assert "model.0.conv.unit0.conv.weight" in frozen  # first down block
    assert "model.1.submodule.1.submodule.1.submodule.conv.unit0.conv.weight" in frozen  # bottom
    assert not any(n.startswith("model.2.") for n in frozen)  # the last up block trains
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    data = torch.utils.data.TensorDataset(torch.rand(8, 1, 32, 32), torch.ones(8, 1, 32, 32))
    private_train(
        net,
        data,
        torch.nn.BCEWithLogitsLoss(),
        TaskConfig(local_epochs=1, batch_size=4),
        PrivacyConfig(),
        seed=0,
        num_examples=8,
    )
    after = dict(net.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in frozen)
    assert any(not torch.equal(before[n], after[n]) for n in after if n not in frozen)


def test_freeze_patterns_are_prefixes_or_globs_and_a_stray_one_is_refused():
    net = build_model(ModelConfig(), seed=0)
    assert frozen_names(net, ModelConfig(freeze=["model.2"])) == {
        n for n, _ in net.named_parameters() if n.startswith("model.2.")
    }
    norms = frozen_names(net, ModelConfig(freeze=["*.adn.N.*"]))
    assert norms and all(".adn.N." in n for n in norms)
    assert frozen_names(
        build_model(ModelConfig(name="densenet"), seed=0),
        ModelConfig(name="densenet", freeze=["encoder"]),
    )
    with pytest.raises(ValueError, match=r"'decoder' matches no parameter.*top-level parts"):
        build_model(ModelConfig(freeze=["decoder"]))


def test_weights_digest_changes_with_any_value():
    state = build_model(ModelConfig(), seed=0).state_dict()
    other = {k: v.clone() for k, v in state.items()}
    assert weights_sha256(state) == weights_sha256(other)
    next(iter(other.values())).view(-1)[0] += 1e-3
    assert weights_sha256(state) != weights_sha256(other)
