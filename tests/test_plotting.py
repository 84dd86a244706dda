"""Figures: what each plotting function draws, its inputs, and its errors."""

import matplotlib

matplotlib.use("Agg")  # headless, before pyplot is imported

import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from sklearn.exceptions import NotFittedError  # noqa: E402

from neurovae import VAE, BetaVAE  # noqa: E402
from neurovae.plotting import (  # noqa: E402
    plot_history,
    plot_latent_space,
    plot_reconstruction,
    plot_samples,
)

SHAPE = (6, 7, 5)
AFFINE = np.diag([2.0, 3.0, 1.0, 1.0])


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture
def volumes():
    return np.random.default_rng(0).normal(size=(4, *SHAPE))


def images(batch):
    """A 4-D image and a list of 3-D images holding ``batch`` (n, x, y, z)."""
    img4d = nib.Nifti1Image(np.moveaxis(batch, 0, -1), AFFINE)
    return img4d, [nib.Nifti1Image(volume, AFFINE) for volume in batch]


def styles(ax):
    return {line.get_label(): line.get_linestyle() for line in ax.get_lines()}


# -- plot_history -------------------------------------------------------------
HISTORY = {
    "loss": [3.0, 2.0, 1.5],
    "recon": [2.9, 1.8, 1.2],
    "kl": [0.1, 0.2, 0.3],
    "n_skipped": [0, 0, 0],
    "beta": [1.0, 1.0, 1.0],
    "val_loss": [3.1, 2.2, 1.9],
    "val_recon": [3.0, 2.0, 1.6],
    "val_kl": [0.1, 0.2, 0.3],
    "time": [0.1, 0.1, 0.1],
}


def test_plot_history_dict():
    fig = plot_history(HISTORY)
    assert isinstance(fig, matplotlib.figure.Figure)
    (ax,) = fig.axes
    lines = styles(ax)
    # one line per term, validation dashed; bookkeeping left out
    assert lines == {
        "loss": "-",
        "val_loss": "--",
        "recon": "-",
        "val_recon": "--",
        "kl": "-",
        "val_kl": "--",
        "beta": "-",  # a dict does not say which keys are scheduled weights
    }
    by_label = {line.get_label(): line for line in ax.get_lines()}
    assert by_label["loss"].get_color() == by_label["val_loss"].get_color()
    assert by_label["loss"].get_color() != by_label["kl"].get_color()
    np.testing.assert_array_equal(by_label["kl"].get_xdata(), [1, 2, 3])
    np.testing.assert_array_equal(by_label["kl"].get_ydata(), HISTORY["kl"])
    assert ax.get_xlabel() == "epoch"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(lines)


def test_plot_history_keys_and_axes():
    fig, ax = plt.subplots()
    assert plot_history(HISTORY, keys=["kl", "time"], ax=ax) is fig
    assert styles(ax) == {"kl": "-", "val_kl": "--", "time": "-"}
    ax = plot_history(HISTORY, keys="val_loss").axes[0]
    assert styles(ax) == {"val_loss": "--"}
    # a history without validation
    ax = plot_history({"loss": [2.0, 1.0]}).axes[0]
    assert styles(ax) == {"loss": "-"}


def test_plot_history_log_scale():
    assert plot_history(HISTORY, log_scale=True).axes[0].get_yscale() == "log"
    negative = {"loss": [1.0, -2.0]}  # e.g. a Gaussian NLL with a learned scale
    assert plot_history(negative, log_scale=True).axes[0].get_yscale() == "symlog"
    assert plot_history(HISTORY).axes[0].get_yscale() == "linear"


@pytest.mark.parametrize("early_stopping", [False, True])
def test_plot_history_estimator(early_stopping, one_thread):
    X = np.random.default_rng(0).normal(size=(30, 5))
    model = VAE(
        n_components=2,
        hidden_layer_sizes=(8,),
        max_iter=3,
        device="cpu",
        random_state=0,
        early_stopping=early_stopping,
    ).fit(X)
    ax = plot_history(model).axes[0]
    expected = {"loss": "-", "recon": "-", "kl": "-"}
    if early_stopping:
        expected.update({"val_loss": "--", "val_recon": "--", "val_kl": "--"})
    assert styles(ax) == expected  # no beta, time, n_skipped
    assert len(ax.get_lines()[0].get_xdata()) == model.n_iter_


def test_plot_history_hides_scheduled_weights(one_thread):
    X = np.random.default_rng(0).normal(size=(30, 5))
    model = BetaVAE(
        n_components=2,
        hidden_layer_sizes=(8,),
        max_iter=2,
        device="cpu",
        random_state=0,
        capacity=5.0,
    ).fit(X)
    assert {"capacity", "gamma"} <= set(model.history_)
    assert set(styles(plot_history(model).axes[0])) == {"loss", "recon", "kl"}


def test_plot_history_errors():
    with pytest.raises(NotFittedError, match="fit"):
        plot_history(VAE())
    with pytest.raises(ValueError, match="empty"):
        plot_history({})
    with pytest.raises(ValueError, match="not in the history"):
        plot_history(HISTORY, keys=["elbo"])
    with pytest.raises(TypeError, match="history must be"):
        plot_history([1.0, 2.0])
    with pytest.raises(TypeError, match="ax must be"):
        plot_history(HISTORY, ax="left")


# -- plot_reconstruction ------------------------------------------------------
def image_axes(fig):
    return [ax for ax in fig.axes if ax.get_images() and ax.get_label() != "<colorbar>"]


def test_plot_reconstruction_arrays(volumes):
    reconstruction = 0.8 * volumes
    fig = plot_reconstruction(volumes, reconstruction, index=2, title="subject 2")
    axes = image_axes(fig)
    assert len(axes) == 9 and len(fig.axes) == 11  # and two colour bars
    assert fig.get_suptitle() == "subject 2"
    assert [ax.get_title() for ax in axes[:3]] == ["x = 3", "y = 3", "z = 2"]
    assert axes[0].get_ylabel() == "input"
    assert axes[3].get_ylabel() == "reconstruction"
    assert axes[6].get_ylabel().startswith("|error|")
    # the slices shown are those of the chosen sample, input and reconstruction
    # on one colour scale
    shown = axes[2].get_images()[0]
    np.testing.assert_allclose(shown.get_array(), volumes[2, :, :, 2].T)
    assert shown.get_clim() == axes[5].get_images()[0].get_clim()
    error = axes[8].get_images()[0].get_array()
    np.testing.assert_allclose(error, 0.2 * np.abs(volumes[2, :, :, 2].T))
    # one volume; negative index; explicit cut; anisotropic voxels of images
    fig = plot_reconstruction(volumes[0], reconstruction[0], cut_coords=(1, 2, 4))
    assert [ax.get_title() for ax in image_axes(fig)[:3]] == [
        "x = 1",
        "y = 2",
        "z = 4",
    ]
    plot_reconstruction(volumes, reconstruction, index=-1)


def test_plot_reconstruction_images(volumes):
    img4d, img_list = images(volumes)
    rec4d, rec_list = images(0.8 * volumes)
    expected = image_axes(plot_reconstruction(volumes, 0.8 * volumes, index=1))
    for original, reconstruction in [(img4d, rec4d), (img_list, rec_list)]:
        axes = image_axes(plot_reconstruction(original, reconstruction, index=1))
        for ax, reference in zip(axes, expected):
            np.testing.assert_allclose(
                ax.get_images()[0].get_array(), reference.get_images()[0].get_array()
            )
    # voxel sizes set the aspect ratio: a z slice shows x (2 mm) and y (3 mm)
    axes = image_axes(plot_reconstruction(img_list[0], rec_list[0]))
    assert axes[2].get_aspect() == pytest.approx(1.5)


def test_plot_reconstruction_mask(volumes):
    mask = np.zeros(SHAPE, dtype=bool)
    mask[1:4, 2:6, 1:3] = True
    fig = plot_reconstruction(volumes, volumes + 1.0, mask=mask)
    axes = image_axes(fig)
    # default cut through the mask's centre; voxels outside left blank
    assert [ax.get_title() for ax in axes[:3]] == ["x = 2", "y = 4", "z = 2"]
    shown = axes[2].get_images()[0].get_array()
    assert shown.mask.sum() == shown.size - mask[:, :, 2].sum()
    assert "MSE 1" in axes[6].get_ylabel()


def test_plot_reconstruction_into_figure(volumes):
    figure = plt.figure()
    figure.add_subplot()  # cleared before drawing
    assert plot_reconstruction(volumes, volumes, figure=figure) is figure
    assert len(figure.axes) == 11


def test_plot_reconstruction_errors(volumes):
    with pytest.raises(ValueError, match="same shape"):
        plot_reconstruction(volumes, volumes[:2])
    with pytest.raises(ValueError, match="index"):
        plot_reconstruction(volumes, volumes, index=4)
    with pytest.raises(ValueError, match="cut_coords"):
        plot_reconstruction(volumes, volumes, cut_coords=(1, 2))
    with pytest.raises(ValueError, match=r"cut_coords\[2\]"):
        plot_reconstruction(volumes, volumes, cut_coords=(1, 2, 5))
    img4d, _ = images(volumes)
    other = nib.Nifti1Image(np.moveaxis(volumes, 0, -1), np.eye(4))
    with pytest.raises(ValueError, match="affines"):
        plot_reconstruction(img4d, other)
    with pytest.raises(TypeError, match="figure must be"):
        plot_reconstruction(volumes, volumes, figure="new")


# -- plot_samples ---------------------------------------------------------------
@pytest.mark.parametrize("n_cols, n_rows", [(3, 2), (10, 1)])
def test_plot_samples_grid(volumes, n_cols, n_rows):
    fig = plot_samples(volumes, n_cols=n_cols)
    assert len(fig.axes) == 4  # empty cells removed
    geometry = fig.axes[0].get_subplotspec().get_geometry()
    assert geometry[:2] == (n_rows, min(n_cols, 4))
    assert [ax.get_title() for ax in fig.axes] == ["0", "1", "2", "3"]
    # the middle z slice, on one colour scale for all
    np.testing.assert_allclose(
        fig.axes[1].get_images()[0].get_array(), volumes[1, :, :, 2].T
    )
    clims = {ax.get_images()[0].get_clim() for ax in fig.axes}
    assert clims == {(volumes[..., 2].min(), volumes[..., 2].max())}


@pytest.mark.parametrize("axis, expected_shape", [("x", (5, 7)), ("y", (5, 6))])
def test_plot_samples_axis_and_index(volumes, axis, expected_shape):
    fig = plot_samples(volumes, axis=axis, slice_index=1)
    assert fig.axes[0].get_images()[0].get_array().shape == expected_shape
    assert fig.get_suptitle() == f"{axis} = 1"


def test_plot_samples_images(volumes):
    expected = plot_samples(volumes).axes
    img4d, img_list = images(volumes)
    for samples in (img4d, img_list):
        fig = plot_samples(samples)
        assert len(fig.axes) == 4
        for ax, reference in zip(fig.axes, expected):
            np.testing.assert_allclose(
                ax.get_images()[0].get_array(), reference.get_images()[0].get_array()
            )
    assert len(plot_samples(volumes[0]).axes) == 1  # one volume


def test_plot_samples_errors(volumes):
    with pytest.raises(ValueError, match="axis"):
        plot_samples(volumes, axis=2)
    with pytest.raises(ValueError, match="slice_index"):
        plot_samples(volumes, axis="z", slice_index=5)
    with pytest.raises(ValueError, match="n_cols"):
        plot_samples(volumes, n_cols=0)
    with pytest.raises(ValueError, match="one volume"):
        plot_samples(volumes.reshape(4, -1))


# -- plot_latent_space ----------------------------------------------------------
@pytest.fixture
def codes():
    return np.random.default_rng(0).normal(size=(24, 4))


def offsets(ax):
    return np.concatenate([c.get_offsets() for c in ax.collections])


def test_plot_latent_space_two_components(codes):
    ax = plot_latent_space(codes[:, :2]).axes[0]
    np.testing.assert_allclose(offsets(ax), codes[:, :2])
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("latent 0", "latent 1")
    # method=None keeps the first two of more components
    np.testing.assert_allclose(
        offsets(plot_latent_space(codes, method=None).axes[0]), codes[:, :2]
    )


def test_plot_latent_space_pca(codes):
    from sklearn.decomposition import PCA

    ax = plot_latent_space(codes).axes[0]
    assert ax.get_xlabel().startswith("PC 1")
    np.testing.assert_allclose(
        offsets(ax), PCA(n_components=2).fit_transform(codes), atol=1e-12
    )


def test_plot_latent_space_tsne(codes):
    ax = plot_latent_space(codes, method="tsne", random_state=0).axes[0]
    assert offsets(ax).shape == (24, 2)
    assert ax.get_xlabel() == "t-SNE 1"


@pytest.mark.parametrize(
    "y, classes",
    [
        (np.repeat(["patient", "control"], 12), ["control", "patient"]),
        (np.arange(24) % 3, ["0", "1", "2"]),
        (np.arange(24) % 2 == 0, ["False", "True"]),
        ((np.arange(24) % 2).astype(float), ["0.0", "1.0"]),
    ],
)
def test_plot_latent_space_categories(codes, y, classes):
    fig = plot_latent_space(codes, y)
    ax = fig.axes[0]
    assert len(fig.axes) == 1  # no colour bar
    assert len(ax.collections) == len(classes)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == classes
    assert len(offsets(ax)) == 24


@pytest.mark.parametrize(
    "y",
    [np.linspace(20, 80, 24), np.arange(24)],  # ages: 24 distinct values
)
def test_plot_latent_space_continuous(codes, y):
    fig, ax = plt.subplots()
    assert plot_latent_space(codes, y, ax=ax, cmap="magma") is fig
    assert len(fig.axes) == 2  # the scatter and its colour bar
    (scatter,) = ax.collections
    np.testing.assert_allclose(scatter.get_array(), y)
    assert scatter.get_cmap().name == "magma"
    assert ax.get_legend() is None


def test_plot_latent_space_errors(codes):
    with pytest.raises(ValueError, match="2 components"):
        plot_latent_space(codes[:, :1])
    with pytest.raises(ValueError, match="2 samples"):
        plot_latent_space(codes[:1])
    with pytest.raises(ValueError, match="one label per sample"):
        plot_latent_space(codes, y=np.arange(5))
    with pytest.raises(ValueError, match="method"):
        plot_latent_space(codes, method="umap")
    bad = codes.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        plot_latent_space(bad)
