"""Fixtures shared by the estimator-level tests: tiny data and tiny models."""

import numpy as np
import pytest
import torch


@pytest.fixture
def small():
    """Parameters of a model that fits in a fraction of a second on a CPU."""
    return dict(
        hidden_layer_sizes=(16,),
        max_iter=3,
        batch_size=16,
        device="cpu",
        random_state=0,
    )


@pytest.fixture
def X():
    """40 samples of 6 features: a rank-2 signal plus noise (float64)."""
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(40, 2))
    mixing = rng.normal(size=(2, 6))
    return latent @ mixing + 0.1 * rng.normal(size=(40, 6))


@pytest.fixture
def volumes():
    """8 volumes on an odd 9 x 11 x 7 grid, shape (n, x, y, z) (float32)."""
    rng = np.random.default_rng(1)
    return rng.normal(size=(8, 9, 11, 7)).astype(np.float32)


@pytest.fixture
def one_thread():
    """Run torch on one thread for the test, then restore the setting.

    The models here are tiny: a second intra-op thread gains nothing, and on a
    shared CPU it makes a fit many times slower when other processes compete.
    """
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)
