"""VeryDeepVAE (work in progress): the estimator face on tiny volumes."""

import nibabel as nib
import numpy as np
import pytest

from neurovae.very_deep import VeryDeepVAE

TINY = dict(
    channels=(4, 8, 8),
    channels_hidden=(2, 4, 4),
    channels_per_latent=(1, 2, 2),
    latents_per_resolution=(0, 1, 2),
    kernel_sizes=(1, 3, 3),
    max_iter=2,
    batch_size=4,
    device="cpu",
    random_state=0,
)


@pytest.fixture
def volumes():
    rng = np.random.default_rng(0)
    return rng.normal(size=(10, 9, 10, 7)).astype(np.float32)  # odd grid: padded


def test_shapes_levels_and_outputs(volumes, one_thread):
    est = VeryDeepVAE(**TINY).fit(volumes)
    assert {"kl_level0", "kl_level1", "kl_level2", "n_skipped"} <= set(est.history_)
    Z = est.transform(volumes)
    top = est.module_.latent_shapes[0]
    assert Z.shape == (10, int(np.prod(top))) and Z.dtype == np.float32
    levels = est.transform_levels(volumes)
    assert [lv.shape[1:] for lv in levels] == est.module_.latent_shapes
    np.testing.assert_allclose(levels[0].reshape(10, -1), Z, rtol=1e-5, atol=1e-6)
    assert est.inverse_transform(Z).shape == volumes.shape
    assert est.reconstruct(volumes).shape == volumes.shape
    cold = est.sample(3, temperature=0.0, random_state=0)
    np.testing.assert_array_equal(cold, est.sample(3, temperature=0.0, random_state=1))
    warm = est.sample(3, random_state=0)
    np.testing.assert_array_equal(warm, est.sample(3, random_state=0))
    assert not np.allclose(warm, cold)
    bpv = est.bits_per_voxel(volumes)
    np.testing.assert_allclose(
        bpv, -est.score_samples(volumes) / (volumes[0].size * np.log(2))
    )


def test_images_in_images_out(volumes, one_thread):
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    imgs = [nib.Nifti1Image(v, affine) for v in volumes]
    est = VeryDeepVAE(**TINY).fit(imgs)
    out = est.sample(2)
    assert isinstance(out, nib.Nifti1Image) and out.shape == (9, 10, 7, 2)


def test_lists_of_the_wrong_length(volumes):
    with pytest.raises(
        ValueError, match="kernel_sizes has 2 entries but channels has 3"
    ):
        VeryDeepVAE(**{**TINY, "kernel_sizes": (1, 3)}).fit(volumes)


def test_needs_volumes():
    with pytest.raises(ValueError, match="needs volumes"):
        VeryDeepVAE(**TINY).fit(np.zeros((10, 5)))


def test_skip_threshold_and_ema_reach_the_engine(volumes, one_thread):
    est = VeryDeepVAE(**TINY, skip_threshold=1e12, ema_decay=0.9).fit(volumes)
    assert est.history_["n_skipped_large"] == [0, 0]
