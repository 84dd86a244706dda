"""
Normative modelling of brain images: NIfTI in, NIfTI out
=========================================================

Train a convolutional :class:`neurovae.VAE` on the brains of healthy
controls, given as a list of NIfTI files that are read batch by batch, and
use it as a normative model: voxel-wise reconstruction errors of new subjects
mark where they deviate from what the model learned as typical. Patients
carry a planted regional atrophy, which the error maps should find.

The brains come from :func:`neurovae.datasets.make_brain_population`: nilearn's
bundled MNI152 grey-matter template with smooth random deformations and
intensity changes per subject, so nothing is downloaded.
"""

# sphinx_gallery_thumbnail_number = 3

# %%
# Data: 70 controls and 20 patients on a 10 mm grid, with the grey-matter
# mask and the true atrophy map. The images are written to disk, as a study's
# would be, in a temporary folder that is removed at the end; the model reads
# them lazily.
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
from nilearn import plotting
from nilearn.image import concat_imgs, mean_img

from neurovae import VAE
from neurovae.datasets import make_brain_population
from neurovae.metrics import psnr, ssim
from neurovae.plotting import plot_history, plot_reconstruction, plot_samples

imgs, y, truth = make_brain_population(
    90, resolution=10, effect=0.5, effect_fwhm=40.0, n_patients=20, random_state=0
)
mask = truth["mask"]
tmp = tempfile.TemporaryDirectory()
folder = Path(tmp.name)
paths = []
for i, img in enumerate(imgs):
    paths.append(folder / f"sub-{i:02d}_gm.nii.gz")
    img.to_filename(paths[-1])
controls = [p for p, label in zip(paths, y) if label == 0]
patients = [p for p, label in zip(paths, y) if label == 1]
train, test_controls = controls[:55], controls[55:]
print(
    f"{len(train)} training controls, {len(test_controls)} held-out controls, "
    f"{len(patients)} patients; images of shape {imgs[0].shape}"
)

# %%
# Fit on the training controls only. ``mask_img`` restricts the loss to grey
# matter and zeroes the outputs outside it; intensities are scaled
# internally ("zscore" by default) and outputs come back in raw units.
vae = VAE(
    n_components=8,
    channels=(8, 16, 32),
    max_iter=40,
    batch_size=16,
    mask_img=mask,
    random_state=0,
).fit(train)
print("fitted on a grid of shape", vae.input_shape_, "with affine")
print(vae.affine_)
plot_history(vae)

# %%
# Outputs are NIfTI images on the training grid: one 4-D image, samples along
# the 4th axis. Held-out controls are reconstructed well.
recon = vae.reconstruct(test_controls)
print(type(recon).__name__, recon.shape)
reference = concat_imgs(test_controls)
print(
    f"held-out SSIM {ssim(reference, recon, mask=mask).mean():.3f}, "
    f"PSNR {psnr(reference, recon, mask=mask).mean():.1f} dB"
)
plot_reconstruction(reference, recon, mask=mask, title="a held-out control")

# %%
# Normative deviation maps: the squared reconstruction error of each subject,
# as a z-score against the errors of held-out controls at each voxel.
errors_controls = vae.reconstruction_error(test_controls).get_fdata()
errors_patients = vae.reconstruction_error(patients).get_fdata()
mu = errors_controls.mean(axis=-1, keepdims=True)
sd = errors_controls.std(axis=-1, keepdims=True) + 1e-6
z_patients = (errors_patients - mu) / sd
z_map = np.where(mask.get_fdata() > 0, z_patients.mean(axis=-1), 0.0)
z_img = nib.Nifti1Image(z_map, vae.affine_)

atrophy = truth["atrophy_map"].get_fdata()
inside = mask.get_fdata() > 0
r = np.corrcoef(z_map[inside], atrophy[inside])[0, 1]
print(f"correlation of the patients' mean deviation with the true atrophy: {r:.2f}")
plotting.plot_stat_map(
    z_img,
    bg_img=mean_img(imgs[:10]),
    title="patients: mean deviation (z)",
    threshold=1.0,
    display_mode="ortho",
)

# %%
# The model is generative: brains drawn from the prior, as NIfTI images.
samples = vae.sample(10, random_state=0)
plot_samples(samples, n_cols=5)
tmp.cleanup()
plt.show()
