"""
Samples and healthy twins as NIfTI files
========================================

A model fitted on brain images gives brain images back: ``sample`` and
:meth:`~neurovae.ContrastiveVAE.background_twin` return
:class:`nibabel.nifti1.Nifti1Image` objects on the training grid, with the
training affine, ready to be saved with nibabel and opened in any viewer.

We fit a :class:`neurovae.ContrastiveVAE` on controls and patients, draw new
brains of both groups, and compute the *healthy twin* of every patient: the
patient decoded without what the model found to be patient-specific. Every
image is written to a temporary folder as ``.nii.gz``, read back, and shown
with nilearn. The twin should differ from the patient's reconstruction where
the simulated atrophy is, and hardly anywhere else.

The brains come from :func:`neurovae.datasets.make_brain_population`, so
nothing is downloaded, and the temporary folder is removed at the end.
"""

# %%
# Data and model
# --------------
# 40 subjects on an 8 mm grid, 20 controls and 20 patients who lose up to
# 60 % of their grey-matter intensity around the left hippocampus. The
# contrastive VAE has two shared dimensions (variation of both groups) and
# two salient ones (variation of the patients only); a small convolutional
# network, the default for images, trains on the images directly. A high
# learning rate keeps the fit short; a real study would train longer and
# check several seeds.
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
from nilearn import image, plotting

from neurovae import ContrastiveVAE
from neurovae.datasets import make_brain_population

start = time.perf_counter()
imgs, y, truth = make_brain_population(
    40, resolution=8, effect=0.6, effect_fwhm=40.0, random_state=0
)
mask = truth["mask"]
cvae = ContrastiveVAE(
    n_components=2,
    n_salient_components=2,
    channels=(4, 8, 16),
    batch_size=8,
    learning_rate_init=1e-2,
    max_iter=20,
    mask_img=mask,
    random_state=0,
).fit(imgs, y)
print(f"fitted on {len(imgs)} images; training grid {cvae.input_shape_}")

# %%
# Samples, saved and read back
# ----------------------------
# ``sample`` returns one 4-D image, the samples along the 4th axis, as
# :meth:`nilearn.maskers.NiftiMasker.inverse_transform` does. ``group``
# picks the model of the controls (salient code set to zero) or of the
# patients. We save each 4-D image as one file, and also split the patient
# samples into one 3-D file per sample, as most pipelines expect. Everything
# goes into a :class:`tempfile.TemporaryDirectory`, which we remove at the
# end of the example (it is also removed when Python exits, should the
# example stop halfway; in a script of your own, a ``with`` block does
# both).
tmp = tempfile.TemporaryDirectory()
folder = Path(tmp.name)

samples = {
    group: cvae.sample(4, group=group, random_state=0)
    for group in ("background", "target")
}
for group, img in samples.items():
    print(f"{group} samples: {type(img).__name__} of shape {img.shape}")
    nib.save(img, folder / f"samples_{group}.nii.gz")
for i, volume in enumerate(image.iter_img(samples["target"])):
    nib.save(volume, folder / f"sample-{i:02d}_patient.nii.gz")
print("written:", ", ".join(sorted(p.name for p in folder.iterdir())))

# %%
# Read back, the files hold the same voxels on the same grid as the
# training images (float32, so the round trip is exact).
loaded = nib.load(folder / "samples_target.nii.gz")
print(
    "affine as in training:",
    np.allclose(loaded.affine, imgs[0].affine),
    "| data unchanged:",
    np.array_equal(loaded.get_fdata(), samples["target"].get_fdata()),
)

# %%
# A sampled control and a sampled patient, read from the files and shown
# with nilearn, through the centre of the simulated atrophy. They are decoded
# from the same latent draw, the patient with a salient code added, so they
# share their anatomy. The salient code of a sample is drawn at random too,
# so a sampled patient may be a mild or a severe case, and at this scale the
# two look alike. The healthy twins below show where the model puts the
# difference between patients and controls.
controls_file = folder / "samples_background.nii.gz"
patients_file = folder / "samples_target.nii.gz"
show = dict(
    cut_coords=truth["effect_center"],
    cmap="gray",
    vmin=0,
    vmax=1.2,
    draw_cross=False,
    annotate=False,
)
fig, axes = plt.subplots(2, 1, figsize=(7, 4.6))
for ax, path, title in zip(
    axes, (controls_file, patients_file), ("sampled control", "sampled patient")
):
    plotting.plot_img(image.index_img(path, 0), title=title, axes=ax, **show)

# %%
# Healthy twins, saved and read back
# ----------------------------------
# ``background_twin`` decodes each patient twice, with and without its
# salient code. It returns the twins and the differences (reconstruction
# minus twin), one 4-D image each; we save both, then read them back to
# compare the twins with the patients.
patients = [img for img, label in zip(imgs, y) if label == 1]
twin, difference = cvae.background_twin(patients)
nib.save(twin, folder / "healthy_twins.nii.gz")
nib.save(difference, folder / "patient_minus_twin.nii.gz")
twins = nib.load(folder / "healthy_twins.nii.gz")
differences = nib.load(folder / "patient_minus_twin.nii.gz")
print(f"{twins.shape[-1]} healthy twins and differences of shape {twins.shape[:3]}")

# %%
# Where does each twin differ from its patient? The atrophy lowers
# intensities, so the twin is brighter than the reconstruction where the
# patient has lost grey matter: ``-difference`` is the loss the model
# attributes to the disease. We compare it, inside the mask, with the true
# atrophy map of the simulation: their correlation, and how much larger the
# loss is in the 10 % of the mask where the atrophy is strongest than in
# the rest.
inside = mask.get_fdata() > 0
atrophy = truth["atrophy_map"].get_fdata()
loss = -differences.get_fdata()  # (x, y, z, n_patients)
core = inside & (atrophy >= np.quantile(atrophy[inside], 0.9))
r = [np.corrcoef(m[inside], atrophy[inside])[0, 1] for m in np.moveaxis(loss, -1, 0)]
ratio = np.abs(loss[core]).mean() / np.abs(loss[inside & ~core]).mean()
print(f"correlation with the true atrophy, median over patients: {np.median(r):.2f}")
print(f"mean |patient - twin|, most atrophied 10 % of the mask / rest: {ratio:.1f}")

# %%
# One patient (the one whose map matches the truth best), its healthy twin,
# and the loss the model attributes to the disease, next to the true
# atrophy, all through the atrophy centre. The twin looks like the patient
# except around the left hippocampus, where it has the grey matter the
# patient lost.
i = int(np.argmax(r))
patient_img = image.index_img(cvae.reconstruct(patients), i)
fig, axes = plt.subplots(4, 1, figsize=(7, 9))
for ax, img, title in zip(
    axes[:2],
    (patient_img, image.index_img(twins, i)),
    ("a patient (reconstruction)", "its healthy twin"),
):
    plotting.plot_img(img, title=title, axes=ax, **show)
for ax, img, title in zip(
    axes[2:],
    (image.math_img("-d", d=image.index_img(differences, i)), truth["atrophy_map"]),
    (f"twin - reconstruction (r = {r[i]:.2f})", "true atrophy map"),
):
    plotting.plot_stat_map(
        img,
        bg_img=truth["template"],
        cut_coords=truth["effect_center"],
        threshold=0.25 * np.abs(img.get_fdata()).max(),
        title=title,
        axes=ax,
        draw_cross=False,
        annotate=False,
    )

# %%
# Cleaning up: the temporary folder and the files in it are removed.
tmp.cleanup()
print("folder removed:", not folder.exists())
print(f"the example ran in {time.perf_counter() - start:.0f} s")
plt.show()
