import pytest
import torch
from torch import nn

from federation.config import ModelConfig, PrivacyConfig, TaskConfig
from federation.dicom.prepare import labelled_volumes
from federation.models import build_model
from federation.tasks import seg2d

TASK = TaskConfig(image_size=32, local_epochs=1, batch_size=8)


@pytest.fixture(scope="module")
def data(consortium, tmp_path_factory):
    root, _ = consortium
    volumes, report = labelled_volumes(root / "site-1", tmp_path_factory.mktemp("cache"))
    assert not report.problems
    return seg2d.prepare(volumes, TASK, seed=0)


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_dp_training_spends_one_mechanism_step_per_batch(data):
    model = build_model(ModelConfig(), seed=0)
    outcome = seg2d.train(model, data, TASK, PrivacyConfig(), seed=0)
    batches = -(-data.num_train // TASK.batch_size)
    assert outcome.num_examples == data.num_train
    assert [(s.noise_multiplier, s.steps) for s in outcome.spent] == [(1.3, batches)]
    assert outcome.spent[0].sample_rate == pytest.approx(1 / batches)


def test_dp_noise_is_not_predictable_from_the_coordinators_seed(data):
    runs = []
    for _ in range(2):
        model = build_model(ModelConfig(), seed=0)
        seg2d.train(model, data, TASK, PrivacyConfig(), seed=0)
        runs.append(_weights(model))
    assert any(not torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_non_private_training_is_reproducible(data):
    runs = []
    for _ in range(2):
        model = build_model(ModelConfig(), seed=0)
        outcome = seg2d.train(model, data, TASK, PrivacyConfig(mode="none"), seed=0)
        assert outcome.spent == []
        runs.append(_weights(model))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


class _Oracle(nn.Module):
    """Predicts a fixed answer: everything foreground or everything background."""

    def __init__(self, logit: float) -> None:
        super().__init__()
        self.logit = logit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, self.logit)


def test_dice_is_per_held_out_volume(data):
    background = seg2d.evaluate(_Oracle(-10.0), data)
    assert background.metrics["dice"] == 0.0  # every held-out volume has a lesion
    everything = seg2d.evaluate(_Oracle(10.0), data)
    # scored on each series' own grid, against its full-resolution label
    expected = [2 * float(v.label.sum()) / (v.label.sum() + v.label.size) for v in data.val_volumes]
    assert everything.metrics["dice"] == pytest.approx(sum(expected) / len(expected))
    assert everything.num_examples == data.num_val


@pytest.mark.parametrize("privacy", [PrivacyConfig(mode="none"), PrivacyConfig()])
def test_fedprox_term_pulls_weights_back_to_the_received_model(data, privacy):
    model = build_model(ModelConfig(), seed=0)
    start = _weights(model)
    # lr * mu = 1: every proximal step lands exactly on the received weights.
    seg2d.train(model, data, TASK, privacy, seed=0, proximal_mu=1 / TASK.lr)
    params = dict(model.named_parameters())
    assert all(torch.allclose(params[k], start[k], atol=1e-6) for k in params)
    free = build_model(ModelConfig(), seed=0)
    seg2d.train(free, data, TASK, privacy, seed=0)
    assert any(not torch.allclose(v, start[k]) for k, v in free.named_parameters())
