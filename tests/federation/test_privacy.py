import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant

from federation.privacy import MechanismStep, PrivacyHistory, calibrate_noise, plan_round


def test_epsilon_matches_opacus_published_rdp_value():
    # Opacus's own test value: q=0.04, sigma=1.5, 2250 steps, delta=1e-5.
    history = PrivacyHistory([MechanismStep(1.5, 0.04, 2250)])
    assert history.epsilon(delta=1e-5, accountant="rdp") == pytest.approx(7.32911117143, rel=1e-6)


def test_epsilon_composes_like_a_single_opacus_accountant():
    history = PrivacyHistory()
    reference = RDPAccountant()
    for steps in (10, 7, 12):
        history.extend([MechanismStep(1.1, 0.05, steps)])
        for _ in range(steps):
            reference.step(noise_multiplier=1.1, sample_rate=0.05)
    assert len(history.steps) == 1  # identical mechanism merged
    assert history.epsilon(delta=1e-5) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)


def test_no_steps_means_no_spend_and_unknown_accountant_is_rejected():
    assert PrivacyHistory().epsilon(delta=1e-5) == 0.0
    with pytest.raises(ValueError, match="gdp"):
        PrivacyHistory([MechanismStep(1.0, 0.1, 1)]).epsilon(delta=1e-5, accountant="gdp")


@settings(deadline=None, max_examples=25)
@given(
    st.lists(
        st.tuples(st.floats(0.5, 3.0), st.floats(0.001, 0.5), st.integers(1, 50)),
        min_size=1,
        max_size=6,
    )
)
def test_merging_keeps_every_step_and_the_epsilon(entries):
    history = PrivacyHistory()
    history.extend([MechanismStep(n, q, t) for n, q, t in entries])
    unmerged = RDPAccountant()
    unmerged.history = [(n, q, t) for n, q, t in entries]
    assert sum(s.steps for s in history.steps) == sum(t for *_, t in entries)
    assert history.epsilon(delta=1e-5) == pytest.approx(unmerged.get_epsilon(1e-5), rel=1e-9)


def test_prv_matches_opacus_published_value():
    history = PrivacyHistory([MechanismStep(1.5, 0.04, 2249)])
    assert history.epsilon(delta=1e-5, accountant="prv") == pytest.approx(
        6.777395712150674, rel=1e-6
    )


def test_noise_calibrated_to_a_target_spends_that_target():
    rate, steps = plan_round(num_examples=300, batch_size=32, epochs=2)
    assert (rate, steps) == (0.1, 20)
    for accountant in ("rdp", "prv"):
        sigma = calibrate_noise(
            target_epsilon=4.0,
            delta=1e-5,
            sample_rate=rate,
            steps=10 * steps,
            accountant=accountant,
        )
        spent = PrivacyHistory([MechanismStep(sigma, rate, 10 * steps)]).epsilon(
            delta=1e-5, accountant=accountant
        )
        assert 3.95 <= spent <= 4.0


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ghost"])
def test_empty_poisson_batches_still_take_a_noisy_counted_step(mode):
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from federation.config import ModelConfig, PrivacyConfig
    from federation.models import build_model
    from federation.privacy import make_private
    from federation.tasks.segmentation import SegmentationLoss

    model = build_model(ModelConfig(), seed=0)
    x = torch.rand(4, 1, 32, 32)
    private = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        DataLoader(TensorDataset(x, (x > 0.5).float()), batch_size=2),
        SegmentationLoss(),
        PrivacyConfig(grad_sample_mode=mode),
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    private.empty_step()
    private.optimizer.zero_grad(set_to_none=True)
    loss = private.criterion(private.model(x[:2]), (x[:2] > 0.5).float())
    loss.backward()
    private.optimizer.step()
    assert [s.steps for s in private.spent()] == [2]
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_clipped_noised_gradient_is_opacus_own_while_autograd_skips_weight_gradients():
    import torch
    from opacus import PrivacyEngine
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from federation.config import PrivacyConfig
    from federation.privacy import make_private

    x, y = torch.rand(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    noise, clip = 0.7, 0.05

    def step(ours: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.GroupNorm(2, 4),
            nn.ReLU(),
            nn.ConvTranspose2d(4, 2, 2, stride=2),
            nn.Flatten(),
            nn.Linear(2 * 16 * 16, 3),
        )
        loader = DataLoader(TensorDataset(x, y), batch_size=6)
        sgd = torch.optim.SGD(model.parameters(), lr=1.0)
        if ours:
            cfg = PrivacyConfig(noise_multiplier=noise, max_grad_norm=clip)
            private = make_private(model, sgd, loader, nn.CrossEntropyLoss(), cfg)
            optimizer = private.optimizer
            optimizer.zero_grad(set_to_none=True)
            private.forward_backward(x, y)
            assert all(p.grad is None for p in model.parameters())  # none computed
        else:  # Opacus as its tutorials use it
            wrapped, optimizer, _ = PrivacyEngine().make_private(
                module=model,
                optimizer=sgd,
                data_loader=loader,
                noise_multiplier=noise,
                max_grad_norm=clip,
                poisson_sampling=True,
            )
            optimizer.zero_grad(set_to_none=True)
            nn.CrossEntropyLoss()(wrapped(x), y).backward()
        per_sample = [p.grad_sample.clone() for p in model.parameters()]
        torch.manual_seed(1)  # the same noise draw for both
        optimizer.pre_step()  # clip, sum, add noise, scale: the gradient the step uses
        return per_sample, [p.grad.clone() for p in model.parameters()]

    ours_samples, ours = step(ours=True)
    ref_samples, ref = step(ours=False)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in ref_samples]).norm(dim=0)
    assert (norms > clip).all()  # every example is clipped
    for a, b in zip(ours_samples + ours, ref_samples + ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
