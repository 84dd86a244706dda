"""
Quick start: fit, embed, reconstruct, sample and score
======================================================

The shortest path through neurovae. We simulate a small study of brain
images, turn them into one row of grey-matter voxels per subject with a
nilearn :class:`~nilearn.maskers.NiftiMasker`, and fit a :class:`neurovae.VAE`
on them. A VAE is a scikit-learn transformer, so the rest is the usual
vocabulary: ``transform`` gives the latent codes, ``inverse_transform``
decodes them, ``sample`` draws new subjects, ``score`` rates data under the
model, and the VAE fits into a :class:`~sklearn.pipeline.Pipeline`.

The brains come from :func:`neurovae.datasets.make_brain_population`
(nilearn's bundled MNI152 grey-matter template, deformed and rescaled per
subject), so nothing is downloaded.
"""

# sphinx_gallery_thumbnail_number = 2

# %%
# Data
# ----
# 80 subjects on an 8 mm grid: 40 controls and 40 patients, who lose up to
# half of their grey-matter intensity around the left hippocampus. The masker
# keeps the voxels of the grey-matter mask that comes with the data, one row
# per subject. We leave its ``standardize`` off: the VAE scales intensities
# itself, with statistics learned at ``fit`` only.
import time

import matplotlib.pyplot as plt
import numpy as np
from nilearn import plotting
from nilearn.maskers import NiftiMasker
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline

from neurovae import VAE
from neurovae.datasets import make_brain_population

start = time.perf_counter()
imgs, y, truth = make_brain_population(
    80, resolution=8, effect=0.5, effect_fwhm=40.0, random_state=0
)
masker = NiftiMasker(mask_img=truth["mask"], standardize=None).fit()
X = masker.transform(imgs)
X_train, X_test, y_train, y_test = train_test_split(
    X, y, test_size=0.25, stratify=y, random_state=0
)
print(f"{len(imgs)} images of shape {imgs[0].shape} -> X of shape {X.shape}")

# %%
# Fit
# ---
# Four latent components, an MLP encoder and decoder with one hidden layer
# of 128 units, minibatches of 16 subjects and 100 passes over the data
# (``max_iter``, as in scikit-learn's ``MLPRegressor``) at a learning rate of
# 0.003. ``random_state`` makes the fit reproducible. Sixty subjects are few
# for a network with almost a million weights: much longer training would
# overfit them, which the held-out score below would show. ``history_``
# holds the loss of every epoch: the negative evidence lower bound (ELBO), in
# nats per subject, which is the reconstruction term plus the KL term.
vae = VAE(
    n_components=4,
    hidden_layer_sizes=(128,),
    batch_size=16,
    learning_rate_init=3e-3,
    max_iter=100,
    random_state=0,
)
vae.fit(X_train)
loss = vae.history_["loss"]
print(f"{vae.n_iter_} epochs; loss {loss[0]:.0f} -> {loss[-1]:.0f} nats per subject")

fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(vae.history_["loss"], label="loss (negative ELBO)")
ax.plot(vae.history_["kl"], label="KL term")
ax.set(xlabel="epoch", ylabel="nats per subject", yscale="symlog")
ax.legend()
fig.tight_layout()

# %%
# Embed and reconstruct
# ---------------------
# ``transform`` returns the posterior means: four numbers per subject.
# ``inverse_transform`` decodes them back to voxels, in the raw intensities
# of the input. The held-out subjects are reconstructed with a sixth less
# error than by the simplest guess, the mean training image. Most of what
# varies between these brains is a smooth random deformation of each
# subject, which 60 training subjects cannot teach any model, so little more
# is possible here: PCA does as well or a little better on these data (see
# the embedding study in the neuroimaging section).
Z_test = vae.transform(X_test)
X_rec = vae.inverse_transform(Z_test)
print("codes:", Z_test.shape, "reconstructions:", X_rec.shape)
mse_vae = np.mean((X_rec - X_test) ** 2)
mse_mean = np.mean((X_train.mean(axis=0) - X_test) ** 2)
print(f"held-out MSE: VAE {mse_vae:.4f}, mean training image {mse_mean:.4f}")

# %%
# The masker maps rows of voxels back to images, so a reconstruction can be
# shown next to the subject it comes from.
show = dict(
    cut_coords=truth["effect_center"], cmap="gray", vmin=0, vmax=1.2, draw_cross=False
)
plotting.plot_img(
    masker.inverse_transform(X_test[0]), title="a held-out subject", **show
)
plotting.plot_img(
    masker.inverse_transform(X_rec[0]), title="its reconstruction", **show
)

# %%
# Sample and score
# ----------------
# The VAE is a generative model: ``sample`` decodes codes drawn from the
# prior N(0, I) into new subjects. ``score`` is the mean ELBO per subject, a
# lower bound on the log-likelihood of the raw data (higher is better, so
# that ``GridSearchCV`` can maximise it). Unlike the training loss, which is
# of the internally scaled data, it can be compared between models fitted on
# the same data with different scalings. A held-out score far below the
# training score is a sign of overfitting.
samples = vae.sample(4, random_state=0)
print("samples:", samples.shape)
print(
    f"ELBO per subject: training {vae.score(X_train):.0f} nats, "
    f"held out {vae.score(X_test):.0f} nats"
)
plotting.plot_img(
    masker.inverse_transform(samples[0]), title="a subject drawn from the model", **show
)

# %%
# In a pipeline
# -------------
# A VAE is a transformer like PCA, so it can feed a classifier. Here the
# masker, the VAE and a logistic regression are fitted together on the
# training images (the VAE without the labels), and the pipeline tells the
# patients from the controls among the held-out images. Chance is 0.5.
pipe = make_pipeline(
    NiftiMasker(mask_img=truth["mask"], standardize=None),
    clone(vae),  # the same settings, unfitted
    LogisticRegression(max_iter=1000),
)
imgs_train, imgs_test, y_train, y_test = train_test_split(
    imgs, y, test_size=0.25, stratify=y, random_state=0
)
pipe.fit(imgs_train, y_train)
print(f"held-out accuracy of the pipeline: {pipe.score(imgs_test, y_test):.2f}")
print(f"the example ran in {time.perf_counter() - start:.0f} s")
plt.show()
