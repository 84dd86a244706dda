"""Niimg-like input and output: the io helpers and the estimators' NIfTI face."""

import os
import pickle

import nibabel as nib
import numpy as np
import pytest
import torch

from neurovae import VAE, BetaVAE, load
from neurovae.io import (
    DataStatistics,
    ImageCollection,
    Preprocessing,
    VolumeDataset,
    check_mask,
    check_niimgs,
    is_niimg_like,
    load_volumes,
    to_img,
)

AFFINE = np.array([[2.0, 0, 0, -10], [0, 2.0, 0, -12], [0, 0, 2.0, -8], [0, 0, 0, 1]])
SHAPE = (9, 10, 8)


@pytest.fixture
def data():
    """12 volumes of raw-scanner-like intensities (float32)."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=SHAPE)
    values = 500 + 100 * (base + 0.5 * rng.normal(size=(12, *SHAPE)))
    return values.astype(np.float32)


@pytest.fixture
def mask():
    mask = np.zeros(SHAPE, dtype=bool)
    mask[2:7, 2:8, 1:7] = True
    return mask


@pytest.fixture
def imgs(data):
    """The volumes as in-memory 3-D images."""
    return [nib.Nifti1Image(v, AFFINE) for v in data]


@pytest.fixture
def paths(data, tmp_path):
    """The volumes as files, alternately .nii and .nii.gz."""
    out = []
    for i, volume in enumerate(data):
        path = tmp_path / f"sub-{i:02d}.nii{'.gz' if i % 2 else ''}"
        nib.save(nib.Nifti1Image(volume, AFFINE), path)
        out.append(str(path))
    return out


@pytest.fixture
def conv():
    """A tiny convolutional model."""
    return dict(
        n_components=2,
        channels=(4, 8),
        max_iter=2,
        batch_size=5,
        device="cpu",
        random_state=0,
    )


def weights(est):
    return est.module_.state_dict()


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


# ----------------------------------------------------------------------
# io helpers
# ----------------------------------------------------------------------
def test_is_niimg_like(imgs, paths):
    assert is_niimg_like(imgs[0]) and is_niimg_like(imgs) and is_niimg_like(paths)
    assert is_niimg_like(paths[0]) and is_niimg_like(tuple(imgs))
    assert not is_niimg_like(np.zeros((3, 4)))
    assert not is_niimg_like([[1.0, 2.0]])
    assert not is_niimg_like([])


def test_check_niimgs_forms(data, imgs, paths):
    four_d = nib.Nifti1Image(np.moveaxis(data, 0, -1), AFFINE)
    for X in (imgs, paths, four_d):
        images = check_niimgs(X)
        assert images.n_samples == len(data)
        assert images.shape == SHAPE
        np.testing.assert_array_equal(images.affine, AFFINE)
        np.testing.assert_array_equal(images.load(), data)
        np.testing.assert_array_equal(images.load([3, 1]), data[[3, 1]])
    assert check_niimgs(imgs).in_memory
    assert not check_niimgs(paths).in_memory
    # a 3-D image with a trailing axis of one counts as 3-D
    squeezed = nib.Nifti1Image(data[0][..., None], AFFINE)
    assert check_niimgs([squeezed, imgs[1]]).n_samples == 2


def test_check_niimgs_reads_files_lazily(paths, monkeypatch):
    images = check_niimgs(paths)  # headers only
    calls = []
    original = ImageCollection.read

    def read(self, index, dtype=np.float32):
        calls.append(index)
        return original(self, index, dtype)

    monkeypatch.setattr(ImageCollection, "read", read)
    assert calls == []
    images.load([4])
    assert calls == [4]


def test_single_3d_image_is_an_error(imgs, paths):
    with pytest.raises(ValueError, match=r"single 3-D image.*list of 3-D images"):
        check_niimgs(imgs[0])
    with pytest.raises(ValueError, match="single 3-D image"):
        check_niimgs(paths[0])
    assert check_niimgs(imgs[0], allow_single=True).n_samples == 1


def test_4d_image_in_a_list_is_an_error(data, imgs):
    four_d = nib.Nifti1Image(np.moveaxis(data[:3], 0, -1), AFFINE)
    with pytest.raises(ValueError, match=r"X\[1\] is a 4-D image.*3-D images"):
        check_niimgs([imgs[0], four_d])


def test_missing_and_unreadable_files(paths, tmp_path):
    missing = str(tmp_path / "nope.nii.gz")
    with pytest.raises(ValueError, match=r"X\[1\].*does not exist"):
        check_niimgs([paths[0], missing])
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=r"X\[2\].*cannot read"):
        check_niimgs([paths[0], paths[1], str(garbage)])
    with pytest.raises(ValueError, match="empty list"):
        check_niimgs([])
    with pytest.raises(TypeError, match="X\\[1\\] is a ndarray"):
        check_niimgs([paths[0], np.zeros(SHAPE)])


def test_truncated_file_fails_when_read(data, tmp_path):
    path = tmp_path / "cut.nii"
    nib.save(nib.Nifti1Image(data[0], AFFINE), path)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    images = check_niimgs([str(path), str(path)])  # the header is intact
    with pytest.raises(ValueError, match=r"X\[0\].*cut.nii.*reading"):
        images.read(0)


@pytest.mark.parametrize("what", ["shape", "affine"])
def test_grid_mismatch_names_the_first_bad_image(what, data, imgs, paths):
    if what == "shape":
        bad = nib.Nifti1Image(data[0][:, :, :-1], AFFINE)
    else:
        shifted = AFFINE.copy()
        shifted[0, 3] += 1.0
        bad = nib.Nifti1Image(data[0], shifted)
    X = [*paths[:3], bad, bad]
    with pytest.raises(ValueError, match=rf"X\[3\] has {what}.*X\[0\].*sub-00"):
        check_niimgs(X)
    # against a given grid (a fitted model's)
    with pytest.raises(ValueError, match=rf"{what}.*training grid"):
        check_niimgs([bad], shape=SHAPE, affine=AFFINE)


def test_to_img_round_trip(data):
    img = to_img(data, AFFINE)
    assert img.shape == (*SHAPE, len(data))
    np.testing.assert_array_equal(img.affine, AFFINE)
    np.testing.assert_array_equal(check_niimgs(img).load(), data)
    with pytest.raises(ValueError, match="n_samples, x, y, z"):
        to_img(data[0], AFFINE)


def test_load_volumes(data, imgs):
    volumes, affine, batch = load_volumes(imgs[0])
    assert volumes.shape == (1, *SHAPE) and not batch
    np.testing.assert_array_equal(affine, AFFINE)
    volumes, affine, batch = load_volumes(to_img(data, AFFINE), dtype=np.float32)
    assert batch and volumes.dtype == np.float32
    np.testing.assert_array_equal(volumes, data)
    with pytest.raises(ValueError, match="NaN"):
        load_volumes(np.full(SHAPE, np.nan))


def test_check_mask(mask):
    assert check_mask(mask, SHAPE, None).sum() == mask.sum()
    assert check_mask(mask.astype(np.int8), SHAPE, AFFINE).dtype == bool
    with pytest.raises(ValueError, match="boolean array"):
        check_mask(mask * 0.5, SHAPE, None)
    with pytest.raises(ValueError, match="selects no voxel"):
        check_mask(np.zeros(SHAPE, bool), SHAPE, None)
    with pytest.raises(ValueError, match="has shape"):
        check_mask(mask[:-1], SHAPE, None)


def test_mask_image_on_another_grid_is_resampled(mask):
    # the same mask at twice the resolution (1 mm voxels) covers the same space
    fine = np.repeat(np.repeat(np.repeat(mask, 2, 0), 2, 1), 2, 2)
    fine_affine = AFFINE.copy()
    fine_affine[:3, :3] = np.eye(3)
    fine_affine[:3, 3] -= 0.5  # voxel centres of the finer grid
    fine_img = nib.Nifti1Image(fine.astype(np.uint8), fine_affine)
    np.testing.assert_array_equal(check_mask(fine_img, SHAPE, AFFINE), mask)
    with pytest.raises(ValueError, match="not on the grid"):
        check_mask(fine_img, SHAPE, AFFINE, resample=False)


def test_preprocessing_round_trip_and_mask(data, mask):
    stats = DataStatistics()
    stats.update(data, mask=mask)
    prep = Preprocessing.fit(stats, "zscore", mask)
    x = torch.from_numpy(data.copy())
    x[:, ~mask] = float("nan")  # ignored outside the mask
    scaled = prep.forward(x)
    assert torch.isfinite(scaled).all()
    assert (scaled[:, ~mask] == 0).all()
    inside = scaled[:, mask].double()
    assert abs(float(inside.mean())) < 1e-4 and abs(float(inside.std()) - 1) < 1e-3
    back = prep.inverse(scaled.numpy().astype(np.float64))
    np.testing.assert_allclose(back[:, mask], data[:, mask], rtol=1e-5)
    assert (back[:, ~mask] == 0).all()
    minmax = Preprocessing.fit(stats, "minmax", None)
    values = minmax.forward(torch.from_numpy(data.copy()))[:, mask]
    assert float(values.min()) == 0.0 and abs(float(values.max()) - 1) < 1e-6
    # constant data: a unit scale rather than a division by zero
    constant = DataStatistics()
    constant.update(np.ones((3, 4)))
    assert Preprocessing.fit(constant, "zscore", None).scale == 1.0


def test_data_statistics_do_not_depend_on_batching(data, mask):
    whole, single = DataStatistics(), DataStatistics()
    whole.update(data, mask=mask)
    for volume in data:
        single.update(volume[None], mask=mask)
    assert whole == single
    values = data[:, mask].astype(np.float64)
    assert whole.n_values == values.size
    assert whole.mean == pytest.approx(values.mean(), rel=1e-12)
    assert whole.std == pytest.approx(values.std(), rel=1e-10)
    assert (whole.min, whole.max) == (values.min(), values.max())
    bad = data.copy()
    bad[2, 4, 4, 4] = np.inf
    with pytest.raises(ValueError, match="sub-2 contains NaN"):
        DataStatistics().update(bad, mask=mask, where=[f"sub-{i}" for i in range(12)])


def test_volume_dataset(paths):
    labels = torch.arange(len(paths))
    dataset = VolumeDataset(check_niimgs(paths), (1, *SHAPE), targets=(labels,))
    x, label = dataset[3]
    assert x.shape == (1, *SHAPE) and x.dtype == torch.float32
    assert int(label) == 3 and len(dataset) == len(paths)


# ----------------------------------------------------------------------
# the estimators' NIfTI face
# ----------------------------------------------------------------------
def test_fit_on_images_gives_images_back(paths, data, conv, one_thread):
    vae = VAE(**conv).fit(paths)
    assert vae.input_shape_ == SHAPE and vae.n_features_in_ == np.prod(SHAPE)
    np.testing.assert_array_equal(vae.affine_, AFFINE)
    Z = vae.transform(paths)
    assert Z.shape == (12, 2) and Z.dtype == np.float32
    for out in (vae.inverse_transform(Z), vae.reconstruct(paths), vae.sample(3)):
        assert isinstance(out, nib.Nifti1Image)
        assert out.shape[:3] == SHAPE
        np.testing.assert_array_equal(out.affine, AFFINE)
    assert vae.sample(3).shape == (*SHAPE, 3)
    errors = vae.reconstruction_error(paths[:4])
    assert errors.shape == (*SHAPE, 4)
    recon = vae.reconstruct(paths[:4]).get_fdata()
    expected = (np.moveaxis(data[:4], 0, -1) - recon) ** 2
    np.testing.assert_allclose(errors.get_fdata(), expected, rtol=1e-4)
    # raw intensities come back: reconstructions live on the data's scale
    assert abs(recon.mean() - data.mean()) < 0.2 * data.std()


def test_fit_on_arrays_gives_arrays_back(data, conv, one_thread):
    vae = VAE(**conv).fit(data)
    assert not hasattr(vae, "affine_")
    out = vae.inverse_transform(vae.transform(data))
    assert isinstance(out, np.ndarray) and out.shape == data.shape
    assert isinstance(vae.reconstruct(data), np.ndarray)
    assert vae.reconstruction_error(data).shape == data.shape
    # images on the same shape are accepted by an array-fitted volume model
    np.testing.assert_allclose(
        vae.transform(to_img(data, AFFINE)), vae.transform(data), rtol=1e-6
    )


def test_images_arrays_images_round_trip(imgs, data, conv, one_thread):
    vae = VAE(**conv).fit(imgs)
    four_d = to_img(data, AFFINE)
    np.testing.assert_array_equal(vae.transform(four_d), vae.transform(imgs))
    # an image-fitted model also takes the arrays and gives images back
    np.testing.assert_array_equal(vae.transform(data), vae.transform(imgs))
    out = vae.reconstruct(data)
    assert isinstance(out, nib.Nifti1Image)
    np.testing.assert_array_equal(out.affine, AFFINE)


def test_streaming_and_in_memory_give_the_same_weights(
    paths, imgs, data, mask, conv, one_thread
):
    kw = dict(conv, mask_img=mask)
    streamed = VAE(**kw).fit(paths)
    assert_same_weights(streamed, VAE(**kw).fit(imgs))
    assert_same_weights(streamed, VAE(**kw).fit(data))
    assert_same_weights(streamed, VAE(**kw, num_workers=1).fit(paths))
    # with a validation split too (a subset of the streamed dataset)
    kw.update(early_stopping=True, validation_fraction=0.25)
    assert_same_weights(VAE(**kw).fit(paths), VAE(**kw).fit(data))
    np.testing.assert_array_equal(
        VAE(**kw).fit(paths).transform(paths), VAE(**kw).fit(data).transform(data)
    )


def test_streamed_fit_never_loads_all_images(paths, conv, monkeypatch, one_thread):
    def refuse(self, indices=None, dtype=np.float32):
        raise AssertionError("all images loaded at once")

    monkeypatch.setattr(ImageCollection, "load", refuse)
    vae = VAE(**conv).fit(paths)
    vae.transform(paths)
    vae.score(paths)
    vae.reconstruct(paths)


def test_mask_restricts_the_loss_and_zeroes_outputs(data, mask, conv, one_thread):
    vae = VAE(**conv, mask_img=mask).fit(data)
    assert vae.mask_img_.dtype == bool and vae.mask_img_.sum() == mask.sum()
    # values outside the mask, even NaN in images, change nothing
    noisy = data.copy()
    noisy[:, ~mask] = np.random.default_rng(1).normal(size=(12, (~mask).sum()))
    assert_same_weights(vae, VAE(**conv, mask_img=mask).fit(noisy))
    nan_imgs = data.copy()
    nan_imgs[:, ~mask] = np.nan
    assert_same_weights(
        vae,
        VAE(**conv, mask_img=mask).fit([nib.Nifti1Image(v, AFFINE) for v in nan_imgs]),
    )
    for out in (vae.sample(4), vae.reconstruct(data), vae.reconstruction_error(data)):
        assert (out[:, ~mask] == 0).all()
        assert (out[:, mask] != 0).any()
    # the likelihood counts the voxels inside the mask only
    assert vae.module_.likelihood.mask.sum() == mask.sum()


def test_mask_image_is_kept_on_the_training_grid(imgs, mask, conv, one_thread):
    mask_img = nib.Nifti1Image(mask.astype(np.uint8), AFFINE)
    vae = VAE(**conv, mask_img=mask_img).fit(imgs)
    assert isinstance(vae.mask_img_, nib.Nifti1Image)
    np.testing.assert_array_equal(vae.mask_img_.get_fdata() > 0, mask)
    np.testing.assert_array_equal(vae.mask_img_.affine, AFFINE)
    assert (vae.sample(2).get_fdata()[~mask] == 0).all()


def test_mask_errors(data, mask, conv):
    with pytest.raises(ValueError, match="mask_img needs volumes"):
        VAE(**conv, mask_img=mask).fit(data.reshape(12, -1))
    with pytest.raises(ValueError, match="mask_img has shape"):
        VAE(**conv, mask_img=mask[:-1]).fit(data)
    with pytest.raises(ValueError, match="mask_img"):
        VAE(**conv, mask_img="not a mask").fit(data)
    with pytest.raises(ValueError, match="mask_img.*None, a 3-D mask image"):
        VAE(**conv, mask_img=3).fit(data)


def test_nan_inside_the_mask_names_the_file(data, mask, tmp_path, conv):
    bad = data.copy()
    bad[3][mask] = np.nan
    files = []
    for i, volume in enumerate(bad):
        files.append(str(tmp_path / f"s{i}.nii"))
        nib.save(nib.Nifti1Image(volume, AFFINE), files[-1])
    with pytest.raises(ValueError, match=r"X\[3\].*s3.nii.*NaN"):
        VAE(**conv, mask_img=mask).fit(files)
    vae = VAE(**conv, mask_img=mask).fit(files[:3])
    with pytest.raises(ValueError, match=r"X\[1\].*s3.nii.*NaN.*inside the mask"):
        vae.transform(files[2:5])


@pytest.mark.parametrize("scaling", ["zscore", "minmax"])
def test_scaling_makes_fits_invariant_to_intensity_units(
    scaling, data, conv, one_thread
):
    small = (data - 500) / 100  # the same images in other units
    a = VAE(**conv, scaling=scaling).fit(data)
    b = VAE(**conv, scaling=scaling).fit(small)
    np.testing.assert_allclose(a.transform(data), b.transform(small), atol=1e-4)
    np.testing.assert_allclose(
        a.reconstruct(data), 500 + 100 * b.reconstruct(small), rtol=1e-4, atol=0.01
    )
    # scores are densities of the raw data: they shift by the log-Jacobian
    shift = data[0].size * np.log(100)
    np.testing.assert_allclose(
        a.score_samples(data), b.score_samples(small) - shift, rtol=1e-4
    )


def test_scaling_is_fitted_on_training_data(data, mask, conv, one_thread):
    vae = VAE(**conv, scaling="zscore", mask_img=mask).fit(data)
    inside = data[:, mask].astype(np.float64)
    assert vae.intensity_offset_ == pytest.approx(inside.mean(), rel=1e-10)
    assert vae.intensity_scale_ == pytest.approx(inside.std(), rel=1e-8)
    vae = VAE(**conv, scaling="minmax").fit(data)
    assert vae.intensity_offset_ == data.min()
    assert vae.intensity_scale_ == pytest.approx(data.max() - data.min())
    vae.set_params(warm_start=True).fit(data * 3)  # kept by warm starts
    assert vae.intensity_offset_ == data.min()
    vae = VAE(**conv, scaling=None).fit(data)
    assert (vae.intensity_offset_, vae.intensity_scale_) == (0.0, 1.0)


def test_raw_scanner_intensities_train(conv, one_thread):
    """With the default scaling, raw intensities (~3000) train; without it
    the network cannot even reach the intensity level in the same epochs."""
    rng = np.random.default_rng(0)
    base, patterns = rng.normal(size=SHAPE), rng.normal(size=(2, *SHAPE))
    codes = rng.normal(size=(40, 2))
    signal = base + np.einsum("nk,kxyz->nxyz", codes, patterns)
    X = (3000 + 300 * signal + 30 * rng.normal(size=(40, *SHAPE))).astype(np.float32)
    kw = dict(conv, max_iter=30, batch_size=10)
    errors = {
        scaling: np.mean((VAE(**kw, scaling=scaling).fit(X).reconstruct(X) - X) ** 2)
        for scaling in ("auto", None)
    }
    total_variance = np.mean((X - X.mean()) ** 2)
    assert errors["auto"] < 0.8 * total_variance
    assert errors["auto"] < 0.1 * errors[None]


def test_wrong_input_for_an_image_model(paths, data, conv, one_thread):
    vae = VAE(**conv).fit(paths[:4])
    with pytest.raises(ValueError, match="single 3-D image"):
        vae.transform(paths[0])
    with pytest.raises(ValueError, match="shape.*training grid"):
        vae.transform([nib.Nifti1Image(data[0][:-1], AFFINE)])
    shifted = AFFINE.copy()
    shifted[1, 3] = 5.0
    with pytest.raises(ValueError, match="affine.*training grid"):
        vae.transform([nib.Nifti1Image(data[0], shifted)])
    with pytest.raises(ValueError, match="fitted on volumes"):
        vae.transform(data.reshape(12, -1))
    flat = VAE(n_components=2, max_iter=1, device="cpu").fit(data.reshape(12, -1))
    with pytest.raises(ValueError, match="cannot be passed"):
        flat.transform(paths)
    with pytest.raises(ValueError, match="at least 2 samples"):
        VAE(**conv).fit(paths[:1])


@pytest.mark.parametrize("how", ["pickle", "safe"])
def test_image_model_round_trips(how, paths, mask, conv, tmp_path, one_thread):
    mask_img = nib.Nifti1Image(mask.astype(np.uint8), AFFINE)
    vae = BetaVAE(**conv, mask_img=mask_img).fit(paths)
    if how == "pickle":
        copy = pickle.loads(pickle.dumps(vae))
    else:
        vae.save(tmp_path / "model.nvae")
        copy = load(tmp_path / "model.nvae")
        assert isinstance(copy.mask_img, nib.Nifti1Image)  # the fitted mask
    np.testing.assert_array_equal(copy.transform(paths), vae.transform(paths))
    np.testing.assert_array_equal(copy.affine_, AFFINE)
    np.testing.assert_array_equal(copy.mask_img_.get_fdata(), mask)
    assert copy.intensity_scale_ == vae.intensity_scale_
    out = copy.reconstruct(paths[:2])
    assert isinstance(out, nib.Nifti1Image)
    np.testing.assert_array_equal(
        out.get_fdata(), vae.reconstruct(paths[:2]).get_fdata()
    )
    np.testing.assert_array_equal(copy.score_samples(paths), vae.score_samples(paths))


def test_safe_format_keeps_a_mask_path(paths, mask, conv, tmp_path, one_thread):
    mask_path = str(tmp_path / "mask.nii.gz")
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), AFFINE), mask_path)
    vae = VAE(**conv, mask_img=mask_path).fit(paths)
    vae.save(tmp_path / "model.nvae")
    copy = load(tmp_path / "model.nvae")
    assert copy.mask_img == mask_path
    np.testing.assert_array_equal(copy.transform(paths), vae.transform(paths))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_streamed_input_leaves_the_global_generators_alone(paths, conv, num_workers):
    # the DataLoaders over files draw their base seed from their own generator
    torch.manual_seed(123)
    before = torch.get_rng_state().clone()
    est = VAE(**{**conv, "num_workers": num_workers}).fit(paths)
    est.transform(paths)
    est.reconstruction_error(paths)
    est.score(paths)
    assert torch.equal(torch.get_rng_state(), before)
