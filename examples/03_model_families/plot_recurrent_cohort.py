"""
Recurrent VAE: latent dynamics of fMRI runs, forecasts and group differences
============================================================================

A :class:`neurovae.RecurrentVAE` encodes every volume of a run together with
the previous latent state, and ties consecutive states by a linear transition
``h_t = h_(t-1) F^T + noise``. F is not learned by gradient descent: after
every epoch it is solved in closed form by ridge regression on the latent
trajectories.

The runs come from :func:`neurovae.datasets.make_fmri_cohort`: four smooth
spatial networks whose time courses are AR(1) processes (coefficient 0.8),
plus noise; in patients the first network carries half the signal. We look
at the fitted dynamics (the eigenvalues of F should be near 0.8), plot latent
trajectories per group, forecast the end of every run from its beginning,
and classify the groups from the embedding, cross-validated. Nothing is
downloaded.
"""

# %%
# Data: 15 controls and 15 patients, 50 volumes of 10 x 10 x 10 voxels each,
# as 4-D NIfTI images (one run per subject, time along the 4th axis). We fit
# on the first 40 volumes and keep the last 10 to check forecasts.
import time

import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from neurovae import RecurrentVAE
from neurovae.datasets import make_fmri_cohort

start = time.perf_counter()
runs, y, truth = make_fmri_cohort(15, 15, 50, shape=(10, 10, 10), random_state=0)
context, horizon = 40, 10
observed = [img.slicer[..., :context] for img in runs]
print(f"{len(runs)} runs of shape {runs[0].shape}; fit on {context} volumes")

# %%
# Fit: four latent components, the MLP backbone (it flattens each volume; the
# default for images is a 3-D convolutional network, slower on a CPU), and
# amortised subject offsets (inferred from each run, so new subjects need no
# refitting). ``history_`` logs the spectral radius of F after every epoch:
# F starts at zero and stays stable.
params = dict(
    n_components=4,
    backbone="mlp",
    hidden_layer_sizes=(64,),
    learning_rate_init=3e-3,
    max_iter=60,
    random_state=0,
)
model = RecurrentVAE(**params).fit(observed)
radius = model.history_["spectral_radius"]
eigenvalues = np.linalg.eigvals(model.transition_)
print("eigenvalues of F:", np.round(np.sort(np.abs(eigenvalues))[::-1], 2))
print(f"true AR(1) coefficient: {truth['ar_coef']}")

fig, axes = plt.subplots(1, 2, figsize=(9, 3))
axes[0].plot(model.history_["loss"])
axes[0].set(xlabel="epoch", ylabel="negative ELBO per run", title="training")
axes[1].plot(radius)
axes[1].axhline(truth["ar_coef"], color="gray", linestyle="--", label="true AR")
axes[1].set(xlabel="epoch", ylabel="spectral radius of F", title="dynamics")
axes[1].legend()
fig.tight_layout()

# %%
# Latent trajectories per group: ``transform_sequence`` gives each run's
# filtered posterior means, ``(n_timepoints, n_components)``. The component
# whose amplitude over time differs most between the groups (the damped
# network, in some rotation of the latent space) is plotted for three
# subjects of each group.
trajectories = model.transform_sequence(observed)
amplitude = np.array([t.std(axis=0) for t in trajectories])
gap = np.abs(amplitude[y == 0].mean(0) - amplitude[y == 1].mean(0))
component = int(np.argmax(gap))
fig, ax = plt.subplots(figsize=(8, 3))
for group, color, name in ((0, "tab:blue", "control"), (1, "tab:red", "patient")):
    for i, subject in enumerate(np.flatnonzero(y == group)[:3]):
        ax.plot(
            trajectories[subject][:, component],
            color=color,
            alpha=0.8,
            label=name if i == 0 else None,
        )
ax.set(xlabel="time point", ylabel=f"latent component {component}")
ax.set_title("Latent trajectories: patients move less along the damped network")
ax.legend()
fig.tight_layout()

# %%
# Forecast: roll the fitted dynamics forward from the end of each observed
# run and decode the predicted volumes (one 4-D image per run). We compare
# with the held-out volumes, and with the persistence baseline (the last
# observed volume repeated), in the voxels of the first network.
forecasts = model.forecast(observed, n_steps=horizon)
inside = truth["effect_mask"].get_fdata() > 0
errors = {"RecurrentVAE": [], "persistence": []}
for img, prediction in zip(runs, forecasts):
    data = img.get_fdata()
    future = data[..., context:]
    last = data[..., context - 1 : context]
    errors["RecurrentVAE"].append(((prediction.get_fdata() - future)[inside]) ** 2)
    errors["persistence"].append(((last - future)[inside]) ** 2)
for name, values in errors.items():
    per_step = np.mean([v.mean(axis=0) for v in values], axis=0)
    print(f"{name:13} forecast MSE, steps 1-{horizon}: {np.round(per_step, 2)}")

subject = 0
series = runs[subject].get_fdata()[inside].mean(axis=0)
predicted = forecasts[subject].get_fdata()[inside].mean(axis=0)
fig, ax = plt.subplots(figsize=(8, 3))
ax.plot(series, color="black", label="data (network average)")
steps = np.arange(context, context + horizon)
ax.plot(steps, predicted, color="tab:orange", marker="o", label="forecast")
ax.axvline(context - 0.5, color="gray", linestyle=":")
ax.set(xlabel="time point", ylabel="signal", title="Forecast against the truth")
ax.legend()
fig.tight_layout()
print(isinstance(forecasts[0], nib.Nifti1Image), forecasts[0].shape)

# %%
# Classification: ``transform`` returns one row per run (the time average and
# the standard deviation of each latent component, and the subject offset), so
# a pipeline can classify subjects. The VAE is refitted without labels in every
# fold of the cross-validation.
cv = StratifiedKFold(5, shuffle=True, random_state=0)
pipe = make_pipeline(
    RecurrentVAE(**params), StandardScaler(), LogisticRegression(max_iter=1000)
)
scores = cross_val_score(pipe, observed, y, cv=cv)
print(f"cross-validated accuracy: {scores.mean():.2f} +- {scores.std():.2f}")
print(f"chance level: {max(y.mean(), 1 - y.mean()):.2f}")
print(f"example ran in {time.perf_counter() - start:.0f} s")
plt.show()
