"""The recurrent VAE module, its closed-form transition and the hook."""

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from neurovae.nn import make_backbone, make_likelihood
from neurovae.nn.recurrent import (
    RecurrentVAEModule,
    kl_gaussians,
    solve_transition,
    spectral_radius,
)
from neurovae.training import ClosedFormHook, Engine, EngineConfig, TensorBatches


def make_module(k=3, n_features=6, **kwargs):
    torch.manual_seed(0)
    encoder, decoder = make_backbone("mlp", (n_features,), k, hidden_layer_sizes=(8,))
    likelihood = make_likelihood("gaussian", (n_features,))
    return RecurrentVAEModule(encoder, decoder, 8, k, likelihood, **kwargs)


def batch(n=5, t=7, p=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, p, generator=g)
    lengths = torch.tensor([t, t, t - 2, 2, t - 1][:n])
    return x, lengths, torch.arange(n)


def test_kl_matches_torch():
    g = torch.Generator().manual_seed(0)
    mu, logvar, prior = (torch.randn(4, 3, generator=g) for _ in range(3))
    expected = kl_divergence(
        Normal(mu, torch.exp(0.5 * logvar)), Normal(prior, 0.7)
    ).sum(-1)
    torch.testing.assert_close(kl_gaussians(mu, logvar, prior, 0.49), expected)


def test_solve_transition_recovers_a_noise_free_system():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(300, 3, generator=g, dtype=torch.float64)
    F = torch.randn(3, 3, generator=g, dtype=torch.float64) / 2
    F_hat = solve_transition(X.T @ X, X.T @ (X @ F.T), 300, 0.5, 0.0)
    torch.testing.assert_close(F_hat, F)
    # the ridge shrinks towards zero
    shrunk = solve_transition(X.T @ X, X.T @ (X @ F.T), 300, 0.5, 10.0)
    assert shrunk.norm() < F.norm()


@pytest.mark.parametrize("temporal_loss", ["kl", "mse"])
@pytest.mark.parametrize("alpha", [0.0, 0.1, 3.0])
def test_gradient_of_the_objective_vanishes_at_the_solved_transition(
    temporal_loss, alpha
):
    # J(F) = temporal loss averaged over the M transitions + alpha ||F||^2,
    # computed by the module's own training loss with the same noise draw:
    # at the closed-form F its autograd gradient is zero
    sigma_h = 0.7
    module = make_module(
        temporal_loss=temporal_loss, sigma_h=sigma_h, ridge_alpha=alpha
    ).train()
    module.double()  # float64 throughout, so the gradient is exact
    x, lengths, subjects = batch()
    x = x.double()

    def objective(transition):
        module.transition = transition
        module.generator = torch.Generator().manual_seed(1)
        out = module.loss((x, lengths, subjects))
        n_transitions = module.step_statistics["count"]
        return out["loss"] * len(x) / n_transitions + alpha * transition.pow(2).sum()

    objective(torch.zeros(3, 3, dtype=torch.float64))
    stats = module.step_statistics
    assert float(stats["count"]) == float((lengths - 1).sum())
    solved = module.closed_form_update(stats)
    assert solved["spectral_radius"] == pytest.approx(
        spectral_radius(module.transition)
    )
    F = module.transition.clone().requires_grad_(True)
    value = objective(F)
    (grad,) = torch.autograd.grad(value, F)
    assert grad.abs().max() < 1e-6
    # and it is a minimum: moving away in any direction increases J
    with torch.no_grad():
        for _ in range(3):
            step = 0.05 * torch.randn(3, 3, dtype=torch.float64)
            assert objective(F + step) > value


def test_transition_starts_stable_and_is_a_buffer():
    module = make_module()
    assert torch.equal(module.transition, torch.zeros(3, 3))
    assert spectral_radius(module.transition) == 0.0
    assert "transition" in dict(module.named_buffers())
    assert all(p is not module.transition for p in module.parameters())


@pytest.mark.parametrize("subject_effects", ["amortized", "table", None])
def test_padding_and_batch_do_not_change_a_run_in_eval_mode(subject_effects):
    module = make_module(subject_effects=subject_effects, n_subjects=5).eval()
    x, lengths, subjects = batch()
    with torch.no_grad():
        together = module.terms(x, lengths, subjects)
        for i in range(len(x)):
            t = int(lengths[i])
            alone = module.terms(
                x[i : i + 1, :t], lengths[i : i + 1], subjects[i : i + 1]
            )
            for key in ("recon", "kl", "subject"):
                torch.testing.assert_close(
                    alone[key][0], together[key][i], rtol=1e-5, atol=1e-4
                )


def test_padded_frames_are_ignored():
    module = make_module().eval()
    x, lengths, subjects = batch()
    changed = x.clone()
    changed[2, int(lengths[2]) :] = 1e3  # beyond the run's end
    with torch.no_grad():
        a = module.elbo(x, lengths)
        b = module.elbo(changed, lengths)
    torch.testing.assert_close(a, b)


def test_training_noise_comes_from_the_generator():
    module = make_module().train()
    x, lengths, subjects = batch()
    losses = []
    for _ in range(2):
        module.generator = torch.Generator().manual_seed(3)
        losses.append(module.loss((x, lengths, subjects))["loss"])
    assert losses[0] == losses[1]
    module.eval()
    assert module.step_statistics is not None
    module.step_statistics = None
    module.loss((x, lengths, subjects))
    assert module.step_statistics is None  # only training steps feed F


def test_rollout_follows_the_transition():
    module = make_module()
    module.transition.copy_(torch.tensor([[0.5, 0, 0], [0, -1.0, 0], [0, 0, 0]]))
    states = module.rollout(torch.ones(2, 3), 3)
    torch.testing.assert_close(states[0, :, 0], torch.tensor([0.5, 0.25, 0.125]))
    torch.testing.assert_close(states[0, :, 1], torch.tensor([-1.0, 1.0, -1.0]))


def test_hook_solves_the_transition_after_every_epoch():
    module = make_module(ridge_alpha=0.0)
    x, lengths, subjects = batch()
    data = TensorBatches((x, lengths, subjects), batch_size=2)
    engine = Engine(
        module, EngineConfig(max_iter=3), torch.device("cpu"), hooks=[ClosedFormHook()]
    )
    history = engine.fit(data).history
    assert len(history["spectral_radius"]) == 3
    assert history["spectral_radius"][-1] == pytest.approx(
        spectral_radius(module.transition)
    )
    assert module.transition.abs().sum() > 0


def test_table_rows_follow_their_runs():
    module = make_module(subject_effects="table", n_subjects=5, subject_l1=0.0)
    with torch.no_grad():
        module.subject_table[3] = 100.0
    x, lengths, subjects = batch()
    module.eval()
    with torch.no_grad():
        recon = module.terms(x, lengths, subjects)["recon"]
        swapped = module.terms(x, lengths, torch.tensor([0, 1, 2, 4, 3]))["recon"]
    assert torch.allclose(recon[:3], swapped[:3])
    assert not torch.allclose(recon[3:], swapped[3:])
    l1 = make_module(subject_effects="table", n_subjects=5, subject_l1=2.0).eval()
    with torch.no_grad():
        l1.subject_table.fill_(0.5)
        subject = l1.terms(x, lengths, subjects)["subject"]
    np.testing.assert_allclose(subject.numpy(), 2.0 * 0.5 * 3)
