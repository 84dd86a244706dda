"""Image-quality metrics: hand-computed values, batches, images, masks, errors."""

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from neurovae.metrics import mse, psnr, ssim

SHAPE = (13, 12, 14)


@pytest.fixture
def pair():
    """A batch of 3 reference volumes and noisy estimates of them."""
    rng = np.random.default_rng(0)
    reference = ndimage.gaussian_filter(rng.normal(size=(3, *SHAPE)), (0, 1, 1, 1))
    reference = 5.0 + reference / reference.std()
    estimate = reference + 0.3 * rng.normal(size=reference.shape)
    return reference, estimate


@pytest.fixture
def mask():
    mask = np.zeros(SHAPE, dtype=bool)
    mask[2:10, 3:9, 4:12] = True
    return mask


AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def as_images(batch, affine=AFFINE):
    """A 4-D image and a list of 3-D images holding ``batch`` (n, x, y, z)."""
    img4d = nib.Nifti1Image(np.moveaxis(batch, 0, -1), affine)
    return img4d, [nib.Nifti1Image(volume, affine) for volume in batch]


# -- hand-computed values ---------------------------------------------------
def test_mse_known_values():
    reference = np.zeros((2, 2, 2))
    estimate = np.zeros((2, 2, 2))
    estimate[0, 0, 0] = 2.0  # one error of 2 among 8 voxels
    assert mse(reference, estimate) == pytest.approx(4.0 / 8)
    assert isinstance(mse(reference, estimate), float)
    assert mse(reference, reference) == 0.0


def test_psnr_known_values():
    reference = np.zeros((2, 2, 2))
    reference[1] = 4.0  # range 4
    estimate = reference + 0.5  # mse 0.25
    assert psnr(reference, estimate) == pytest.approx(10 * np.log10(16 / 0.25))
    # an explicit data range replaces the reference's one
    assert psnr(reference, estimate, data_range=2.0) == pytest.approx(
        10 * np.log10(4 / 0.25)
    )


def test_psnr_of_identical_inputs_is_inf(pair):
    reference, _ = pair
    assert psnr(reference[0], reference[0]) == np.inf
    np.testing.assert_array_equal(psnr(reference, reference), np.inf)


def test_ssim_of_identical_volumes_is_one(pair):
    reference, _ = pair
    assert ssim(reference[0], reference[0]) == pytest.approx(1.0)


def test_ssim_of_inverted_contrast_is_negative(pair):
    # contrast inverted around the mean intensity: same local means, opposite
    # structure
    reference, _ = pair
    inverted = 2 * reference.mean() - reference
    assert ssim(reference[0], inverted[0]) < 0


def test_ssim_degrades_with_noise(pair):
    reference, estimate = pair
    noisier = reference + 3 * (estimate - reference)
    assert 0 < ssim(reference[0], noisier[0]) < ssim(reference[0], estimate[0]) < 1


@pytest.mark.parametrize("metric", [mse, psnr, ssim])
def test_symmetric(metric, pair):
    reference, estimate = pair
    # the default data range is the reference's: give both calls the same one
    kwargs = {} if metric is mse else {"data_range": 6.0}
    assert metric(reference[0], estimate[0], **kwargs) == pytest.approx(
        metric(estimate[0], reference[0], **kwargs)
    )


def test_masked_metrics_match_manual_computation(pair, mask):
    reference, estimate = pair
    ref, est = reference[0], estimate[0]
    squared = (ref[mask] - est[mask]) ** 2
    assert mse(ref, est, mask=mask) == pytest.approx(squared.mean())
    data_range = ref[mask].max() - ref[mask].min()
    assert psnr(ref, est, mask=mask) == pytest.approx(
        10 * np.log10(data_range**2 / squared.mean())
    )
    value, ssim_map = ssim(ref, est, mask=mask, return_map=True)
    assert value == pytest.approx(ssim_map[mask].mean())
    # the map does not depend on the mask (only the data range does)
    _, unmasked_map = ssim(ref, est, data_range=data_range, return_map=True)
    np.testing.assert_allclose(ssim_map, unmasked_map)
    # unmasked: the mean over the map cropped by the window radius (5 voxels)
    assert ssim(ref, est, data_range=data_range) == pytest.approx(
        unmasked_map[5:-5, 5:-5, 5:-5].mean()
    )


def test_default_data_range_is_the_reference_range_in_the_mask(pair, mask):
    reference, estimate = pair
    ref, est = reference[0], estimate[0]
    in_mask = ref[mask].max() - ref[mask].min()
    assert psnr(ref, est, mask=mask) == pytest.approx(
        psnr(ref, est, mask=mask, data_range=in_mask)
    )
    assert ssim(ref, est, mask=mask) == pytest.approx(
        ssim(ref, est, mask=mask, data_range=in_mask)
    )
    assert ssim(ref, est) == pytest.approx(
        ssim(ref, est, data_range=ref.max() - ref.min())
    )


def test_mask_image_equals_boolean_mask(pair, mask):
    reference, estimate = pair
    mask_img = nib.Nifti1Image(mask.astype(np.uint8), AFFINE)
    for metric in (mse, psnr, ssim):
        np.testing.assert_allclose(
            metric(reference, estimate, mask=mask_img),
            metric(reference, estimate, mask=mask),
        )
    # 0 / 1 arrays are accepted as masks too
    assert mse(reference[0], estimate[0], mask=mask.astype(int)) == pytest.approx(
        mse(reference[0], estimate[0], mask=mask)
    )


# -- batches and images -----------------------------------------------------
@pytest.mark.parametrize("metric", [mse, psnr, ssim])
@pytest.mark.parametrize("masked", [False, True])
def test_batch_gives_per_volume_values(metric, masked, pair, mask):
    reference, estimate = pair
    kwargs = {"mask": mask} if masked else {}
    values = metric(reference, estimate, **kwargs)
    assert isinstance(values, np.ndarray) and values.shape == (3,)
    expected = [metric(r, e, **kwargs) for r, e in zip(reference, estimate)]
    np.testing.assert_allclose(values, expected, rtol=1e-12)


@pytest.mark.parametrize("metric", [mse, psnr, ssim])
def test_images_give_the_numbers_of_arrays(metric, pair, mask):
    reference, estimate = pair
    expected = metric(reference, estimate)
    ref4d, ref_list = as_images(reference)
    est4d, est_list = as_images(estimate)
    np.testing.assert_allclose(metric(ref4d, est4d), expected, rtol=1e-12)
    np.testing.assert_allclose(metric(ref_list, est_list), expected, rtol=1e-12)
    # an image against an array in the same layout
    np.testing.assert_allclose(metric(ref4d, estimate), expected, rtol=1e-12)
    single = metric(ref_list[1], est_list[1], mask=mask)
    assert isinstance(single, float)
    assert single == pytest.approx(metric(reference[1], estimate[1], mask=mask))


def test_image_files(pair, tmp_path):
    reference, estimate = pair
    ref4d, _ = as_images(reference)
    _, est_list = as_images(estimate)
    nib.save(ref4d, tmp_path / "ref.nii.gz")
    paths = []
    for i, img in enumerate(est_list):
        nib.save(img, tmp_path / f"est{i}.nii.gz")
        paths.append(str(tmp_path / f"est{i}.nii.gz"))
    np.testing.assert_allclose(
        mse(tmp_path / "ref.nii.gz", paths), mse(reference, estimate), rtol=1e-6
    )


def test_ssim_map_shapes_and_images(pair):
    reference, estimate = pair
    value, ssim_map = ssim(reference, estimate, return_map=True)
    assert ssim_map.shape == reference.shape and value.shape == (3,)
    _, single_map = ssim(reference[0], estimate[0], return_map=True)
    np.testing.assert_allclose(single_map, ssim_map[0])
    ref4d, ref_list = as_images(reference)
    est4d, est_list = as_images(estimate)
    _, map_img = ssim(ref4d, est4d, return_map=True)
    assert map_img.shape == (*SHAPE, 3)
    np.testing.assert_allclose(map_img.affine, AFFINE)
    np.testing.assert_allclose(map_img.get_fdata(), np.moveaxis(ssim_map, 0, -1))
    _, map_img = ssim(ref_list[0], est_list[0], return_map=True)
    assert map_img.shape == SHAPE


# -- agreement with scikit-image ----------------------------------------------
@pytest.mark.parametrize("data_range", [None, 10.0])
@pytest.mark.parametrize("shape", [SHAPE, (11, 16, 20)])
def test_ssim_matches_scikit_image(shape, data_range):
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(1)
    reference = ndimage.gaussian_filter(rng.normal(size=shape), 1.0) * 4
    estimate = reference + 0.2 * rng.normal(size=shape)
    expected_range = reference.max() - reference.min()
    expected = metrics.structural_similarity(
        reference,
        estimate,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=expected_range if data_range is None else data_range,
    )
    assert abs(ssim(reference, estimate, data_range=data_range) - expected) < 1e-10


def test_psnr_matches_scikit_image(pair):
    metrics = pytest.importorskip("skimage.metrics")
    reference, estimate = pair
    expected = metrics.peak_signal_noise_ratio(
        reference[0], estimate[0], data_range=7.0
    )
    assert psnr(reference[0], estimate[0], data_range=7.0) == pytest.approx(expected)


# -- errors -----------------------------------------------------------------
@pytest.mark.parametrize("metric", [mse, psnr, ssim])
def test_mismatched_shapes_raise(metric, pair):
    reference, estimate = pair
    with pytest.raises(ValueError, match="same shape"):
        metric(reference, estimate[:2])
    with pytest.raises(ValueError, match="same shape"):
        metric(reference[0], estimate[:1])  # a volume vs a batch of one
    with pytest.raises(ValueError, match="same shape"):
        metric(reference[0], estimate[0, :-1])


@pytest.mark.parametrize("metric", [mse, psnr, ssim])
def test_mismatched_affines_raise(metric, pair):
    reference, estimate = pair
    ref4d, _ = as_images(reference)
    est4d, _ = as_images(estimate, affine=np.eye(4))
    with pytest.raises(ValueError, match="affines"):
        metric(ref4d, est4d)


def test_list_of_images_on_different_grids_raises(pair):
    reference, estimate = pair
    _, ref_list = as_images(reference)
    ref_list[2] = nib.Nifti1Image(reference[2], np.eye(4))
    with pytest.raises(ValueError, match=r"reference\[2\] has affine"):
        mse(ref_list, estimate)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.ones((3, 4)), "one volume"),
        (np.ones((2, 2, 3, 4, 5)), "one volume"),
        (np.zeros((0, 3, 4, 5)), "empty"),
    ],
)
def test_bad_ranks_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        mse(bad, bad)


def test_non_finite_values_raise(pair):
    reference, estimate = pair
    estimate = estimate.copy()
    estimate[1, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        mse(reference, estimate)


@pytest.mark.parametrize("metric", [mse, psnr, ssim])
def test_bad_masks_raise(metric, pair, mask):
    reference, estimate = pair
    with pytest.raises(ValueError, match="mask has shape"):
        metric(reference, estimate, mask=mask[:-1])
    with pytest.raises(ValueError, match="no voxel"):
        metric(reference, estimate, mask=np.zeros(SHAPE, dtype=bool))
    with pytest.raises(ValueError, match="boolean"):
        metric(reference, estimate, mask=mask * 0.5)
    ref4d, _ = as_images(reference)
    with pytest.raises(ValueError, match="grid"):
        metric(ref4d, estimate, mask=nib.Nifti1Image(mask.astype(np.uint8), np.eye(4)))


@pytest.mark.parametrize("metric", [psnr, ssim])
@pytest.mark.parametrize("data_range", [0.0, -1.0, np.inf, "1", True])
def test_bad_data_range_raises(metric, data_range, pair):
    reference, estimate = pair
    with pytest.raises(ValueError, match="data_range"):
        metric(reference, estimate, data_range=data_range)


@pytest.mark.parametrize("metric", [psnr, ssim])
def test_constant_reference_needs_a_data_range(metric, pair):
    _, estimate = pair
    constant = np.ones(SHAPE)
    with pytest.raises(ValueError, match="pass data_range"):
        metric(constant, estimate[0])
    assert np.isfinite(metric(constant, estimate[0], data_range=1.0))


def test_ssim_small_volume_needs_a_mask():
    volume = np.random.default_rng(0).normal(size=(10, 12, 12))
    with pytest.raises(ValueError, match=">= 11"):
        ssim(volume, volume + 0.1)
    assert ssim(volume, volume, mask=np.ones(volume.shape, bool)) == pytest.approx(1)
    assert ssim(volume, volume + 0.1, sigma=1.0) < 1  # a window of 7 voxels fits
