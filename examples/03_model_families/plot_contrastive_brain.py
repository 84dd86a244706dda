"""
Contrastive VAE: what is specific to patients, and their healthy twins
======================================================================

A :class:`neurovae.ContrastiveVAE` learns two latent spaces from two groups:
a *shared* space for the variation that patients and controls have in common
(here a global intensity factor, deformations and a bias field), and a
*salient* space for what only the patients have (here a planted atrophy).
Controls are decoded from their shared code alone, so whatever the salient
space holds must be patient-specific (Abid & Zou 2019; Aglinskas et al.
2022).

We check both spaces against the ground truth of the simulation, then decode
every patient with its salient code set to zero: its *healthy twin*. The
difference between a patient's reconstruction and its twin is a map of the
atrophy of that patient, which we compare with the true atrophy map.

The brains come from :func:`neurovae.datasets.make_brain_population`
(nilearn's bundled MNI152 grey-matter template, warped and rescaled per
subject), so nothing is downloaded.
"""

# %%
# Data: 30 controls and 30 patients on an 8 mm grid. The patients lose up to
# 30 %, 60 % or 90 % of their grey-matter intensity (ten of each) in a smooth
# region around the left hippocampus, so that the salient space has a
# severity to find. Each severity is drawn by its own call to the generator
# (with its own seed); all calls share the grid, the mask and the shape of
# the atrophy region.
import time

import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
from nilearn import plotting
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.model_selection import cross_val_score

from neurovae import ContrastiveVAE
from neurovae.datasets import make_brain_population
from neurovae.plotting import plot_latent_space

start = time.perf_counter()
common = dict(resolution=8, effect_fwhm=40.0)
imgs, y, truth = make_brain_population(30, n_patients=0, random_state=0, **common)
severity = [0.0] * 30
intensity = list(truth["intensity_factors"])
for seed, effect in enumerate((0.3, 0.6, 0.9), start=1):
    more, _, info = make_brain_population(
        10, effect=effect, n_patients=10, random_state=seed, **common
    )
    imgs += more
    severity += [effect] * 10
    intensity += list(info["intensity_factors"])
severity, intensity = np.array(severity), np.array(intensity)
y = (severity > 0).astype(int)  # 0: control (background), 1: patient (target)

mask = truth["mask"]
inside = mask.get_fdata() > 0
# the shape of the atrophy, height 1 (each patient loses ``severity`` times it)
atrophy = info["atrophy_map"].get_fdata() / effect
affine = truth["affine"]
print(f"{len(imgs)} images of shape {imgs[0].shape}, {inside.sum()} voxels in the mask")

# %%
# Fit: a small convolutional backbone (the default for images; the encoder is
# copied for the shared and the salient space), two shared and two salient
# dimensions, ``mask_img`` to restrict the loss to grey matter. Every training
# step draws ``batch_size`` patients and ``batch_size`` controls. A high
# learning rate and 30 epochs keep the example under a minute on one CPU
# core; with so little training the split between the spaces depends on the
# seed (now and then the shared space takes part of the atrophy too), so give
# a real study more epochs and check several seeds. ``gamma`` weighs a penalty
# on the total correlation between the two spaces, estimated by a
# discriminator: a loss of log(4) ~ 1.39 means it cannot tell true (salient,
# shared) pairs of a patient from shuffled ones, a lower loss that it can.
cvae = ContrastiveVAE(
    n_components=2,
    n_salient_components=2,
    channels=(4, 8, 16),
    batch_size=8,
    learning_rate_init=1e-2,
    max_iter=30,
    mask_img=mask,
    random_state=0,
).fit(imgs, y)
print(f"discriminator loss at the last epoch: {cvae.history_['discriminator'][-1]:.2f}")

# %%
# Salient versus shared embeddings
# --------------------------------
# ``transform`` gives the salient means by default; with
# ``transform_space="both"`` it gives the salient then the shared ones. A
# linear probe tells patients from controls far better in the salient space
# than in the shared one, and the salient codes of the patients track their
# severity. The salient encoder is trained on patients only: controls land
# next to the mildest patients.
codes = cvae.set_params(transform_space="both").transform(imgs)
salient, shared = codes[:, :2], codes[:, 2:]
cvae.set_params(transform_space="salient")
patients = y == 1


def auc(Z):
    probe = LogisticRegression()
    return cross_val_score(probe, Z, y, cv=5, scoring="roc_auc").mean()


def r2(Z, target, rows=patients):
    return LinearRegression().fit(Z[rows], target[rows]).score(Z[rows], target[rows])


print("patients vs controls, cross-validated ROC AUC of a linear probe:")
print(f"  salient space {auc(salient):.2f}, shared space {auc(shared):.2f}")
print("severity of the patients, R^2 of a linear fit:")
print(
    f"  salient space {r2(salient, severity):.2f}, "
    f"shared space {r2(shared, severity):.2f}"
)

# %%
# What each dimension holds: its correlation, across subjects, with the
# severity (patients) and with the global intensity factor (everyone). The
# shared dimensions hold the intensity factor, which both groups vary in. So
# does the second salient dimension: it copies a shared one, variation the
# patients share with the controls. The total-correlation penalty is meant to
# prevent such copies, but at ``gamma=1`` it is a fraction of a nat against a
# reconstruction term of thousands of nats per image, and 30 epochs leave the
# copy in place. It costs little here: setting it to zero adds only a faint,
# diffuse term to the healthy-twin differences below, which come from the
# first salient dimension.
names = ["salient 0", "salient 1", "shared 0", "shared 1"]
print("dimension   corr. with severity   corr. with intensity factor")
for name, z in zip(names, codes.T):
    r_severity = np.corrcoef(z[patients], severity[patients])[0, 1]
    r_intensity = np.corrcoef(z, intensity)[0, 1]
    print(f"{name:<10}  {r_severity:>18.2f}   {r_intensity:>26.2f}")

# %%
# The salient space separates the groups and orders the patients by
# severity; the shared space mixes the groups and is ordered by the intensity
# factor instead (right: the shared space again, coloured by that factor).
groups = np.where(patients, [f"patient, {e:.0%}" for e in severity], "control")
fig, axes = plt.subplots(1, 3, figsize=(15, 4))
plot_latent_space(salient, groups, ax=axes[0])
plot_latent_space(shared, groups, ax=axes[1])
plot_latent_space(shared, intensity, ax=axes[2])
axes[0].get_legend().set_title("group")
axes[1].get_legend().set_title("group")
axes[2].collections[0].colorbar.set_label("intensity factor")
for ax, title in zip(axes, ["salient space", "shared space", "shared space"]):
    ax.set_title(title)
fig.tight_layout()

# %%
# Healthy twins
# -------------
# ``background_twin`` decodes each patient twice, with and without its
# salient code, and returns the twin and the difference (reconstruction minus
# twin) as 4-D NIfTI images on the training grid. The atrophy lowers
# intensities, so twin minus reconstruction is the intensity each patient has
# lost. We compare it with the true atrophy map, inside the mask, and with the
# plain group difference as a baseline: the mean control image minus the mean
# patient image, or, one patient at a time, the mean control image minus the
# patient's image.
patient_imgs = [img for img, p in zip(imgs, y) if p]
twin, difference = cvae.background_twin(patient_imgs)
loss = -difference.get_fdata()  # (x, y, z, n_patients), zero outside the mask
mean_loss = loss.mean(axis=-1)

data = np.stack([img.get_fdata() for img in imgs])
mean_control = data[~patients].mean(axis=0)
group_difference = mean_control - data[patients].mean(axis=0)


def corr(a):
    return np.corrcoef(a[inside], atrophy[inside])[0, 1]


r_twin = corr(mean_loss)
r_group = corr(group_difference)
print("correlation with the true atrophy map, inside the mask:")
print(f"  mean over patients of twin - reconstruction   {r_twin:.2f}")
print(f"  mean control image - mean patient image       {r_group:.2f}")
print("  one patient at a time (median over the patients):")
r_each_twin = [corr(m) for m in np.moveaxis(loss, -1, 0)]
r_each_group = [corr(mean_control - x) for x in data[patients]]
print(f"    twin - reconstruction                       {np.median(r_each_twin):.2f}")
print(f"    mean control image - patient image          {np.median(r_each_group):.2f}")

# the 10 % of the mask where the atrophy is strongest
core = inside & (atrophy >= np.quantile(atrophy[inside], 0.9))
ratio = np.abs(loss[core]).mean() / np.abs(loss[inside & ~core]).mean()
print(f"mean |twin - reconstruction|, 10 % most atrophied voxels / rest: {ratio:.1f}")

# %%
# The mean loss of the patients next to the true atrophy map and the group
# difference, through the centre of the atrophy, on the grey-matter template.
# The twin maps are smooth: they are decoded, where the group difference
# keeps the noise and the deformations of the subjects.


def show(values, title, ax):
    """Three slices through the atrophy centre, above a quarter of the peak."""
    values = np.where(inside, values, 0.0).astype(np.float32)
    plotting.plot_stat_map(
        nib.Nifti1Image(values, affine),
        bg_img=truth["template"],
        cut_coords=truth["effect_center"],
        threshold=0.25 * np.abs(values).max(),
        title=title,
        axes=ax,
        draw_cross=False,
        annotate=False,
    )


fig, axes = plt.subplots(3, 1, figsize=(7, 7))
show(atrophy, "true atrophy (fraction lost at severity 1)", axes[0])
show(mean_loss, f"patients: twin - reconstruction (r = {r_twin:.2f})", axes[1])
show(group_difference, f"controls - patients (r = {r_group:.2f})", axes[2])

# %%
# One patient at a time the difference is clearer still: here the most
# severe patient, its image minus the mean control image against its twin
# minus its reconstruction.
i = int(np.argmax(severity[patients]))
fig, axes = plt.subplots(2, 1, figsize=(7, 4.7))
show(
    mean_control - data[patients][i],
    f"one patient: mean control - patient (r = {r_each_group[i]:.2f})",
    axes[0],
)
show(
    loss[..., i],
    f"one patient: twin - reconstruction (r = {r_each_twin[i]:.2f})",
    axes[1],
)

# %%
# The salient code sets how much each patient loses: in the most atrophied
# voxels the loss grows with the severity, though the model shrinks it
# (expected: severity x atrophy x the mean control image). Controls, decoded
# with the salient code their encoder gives them rather than zero, show a
# little of it too.
_, control_difference = cvae.background_twin([img for img, p in zip(imgs, y) if not p])
print("mean loss in the 10 % most atrophied voxels:")
print(f"  controls                  {-control_difference.get_fdata()[core].mean():.3f}")
for effect in (0.3, 0.6, 0.9):
    found = loss[core][:, severity[patients] == effect].mean()
    expected = (effect * atrophy[core] * mean_control[core]).mean()
    print(f"  patients, severity {effect:.1f}   {found:.3f} (expected {expected:.3f})")
print(f"the example ran in {time.perf_counter() - start:.0f} s")
plt.show()
