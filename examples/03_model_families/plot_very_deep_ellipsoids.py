"""
A very deep hierarchical VAE on 3-D ellipsoids
==============================================

A :class:`neurovae.VeryDeepVAE` (Child 2021) replaces the single latent
vector of a plain VAE by a hierarchy of latent *volumes*. A bottom-up
encoder of residual blocks runs over a pyramid of resolutions (the input
grid, then halved at each level) and keeps its activation at every level. A
top-down decoder starts at the coarsest level and, one latent group after
the other, coarsest first, draws a latent volume and adds it to its state,
upsampling between levels. Each group has a *learned* prior that depends on
the groups above it. Above them all sits one global latent vector with a
Gaussian prior: it holds the layout of a volume (where things are, how
large), and the spatial groups refine it (Sønderby et al. 2016; Child 2021).

We fit a small one on :func:`neurovae.datasets.make_ellipsoids` (one solid
ellipsoid per volume over a smooth noisy background), follow the KL of each
level during training, draw new volumes at two temperatures, and score
held-out volumes in bits per voxel. Everything is simulated, so nothing is
downloaded, and the example runs in under a minute on a laptop CPU.
"""

# %%
# Data
# ----
# 150 volumes of 16 x 16 x 16 voxels, 100 to train and 50 held out. Each
# holds one ellipsoid of random size, position, orientation and intensity
# (in [0.5, 1.5]) over smooth background noise. The small grid keeps the
# example under a minute; the benchmark of the documentation uses 32^3.
import time

import matplotlib.pyplot as plt

from neurovae import VeryDeepVAE
from neurovae.datasets import make_ellipsoids

start = time.perf_counter()
X, truth = make_ellipsoids(150, shape=(16, 16, 16), random_state=0)
X_train, X_test = X[:100], X[100:]
print(f"{len(X_train)} training and {len(X_test)} held-out volumes of {X.shape[1:]}")

# %%
# The hierarchy
# -------------
# The five list parameters have one entry per resolution, **highest
# resolution first**; their length is the number of resolutions. With three
# entries the pyramid is 16, 8 and 4 voxels a side (any grid works: sides
# that are not a multiple of ``2 ** (n_resolutions - 1)`` are zero-padded in
# the encoder and cropped back at the output).
#
# - ``channels``: width of the residual stream at each resolution.
# - ``channels_hidden``: bottleneck width inside the residual blocks.
# - ``channels_per_latent``: channels of each latent volume at that
#   resolution.
# - ``latents_per_resolution``: number of latent groups at that resolution.
#   Here one at 16, two at 8 and two at 4: five spatial groups. A
#   resolution without groups gets ``n_blocks_per_resolution`` plain
#   residual blocks in the decoder.
# - ``kernel_sizes``: kernel size of the middle convolutions of the blocks.
#
# Four parameters set up the global latent. ``global_latent_dim`` is its
# size: 32 here, against 8 by default. On this small grid the spatial groups
# carry little (a few nats), the global latent nearly all of it; with 8
# dimensions the spatial groups took more of the ellipsoids over, and a
# sixth of the samples held none (none of 64 with 32). For the first
# ``global_only_iter`` epochs the spatial groups are *closed* (they take
# their prior means and carry nothing), so the global latent has to learn
# the layout of the volumes; without this, the ellipsoid ends up spread over
# the spatial groups, whose priors are nearly independent from voxel to
# voxel, and samples are scattered blobs. Afterwards, for each volume with
# probability ``global_only_fraction`` (a half, the default) at every step,
# the spatial groups still carry nothing: they are drawn from their priors,
# as when sampling, so the decoder keeps rendering the ellipsoid from the
# global latent alone. Once trained, ``global_prior="fitted"`` (the default)
# replaces the standard normal prior of the global latent by the Gaussian
# that best fits the posteriors of the training volumes: draws then land
# where training volumes lie.
#
# The other parameters are those of the training loop. ``beta`` weighs the
# KL term and ``warmup_iter`` ramps it up linearly from 0 over that many
# epochs. The optimiser is Adamax, as in the reference implementation;
# ``max_grad_norm`` clips the gradient norm and ``skip_threshold`` skips the
# updates whose gradient norm exceeds it (both guard against the rare
# exploding step of deep hierarchies); ``ema_decay`` keeps an exponential
# moving average of the weights for inference; ``gradient_checkpointing``
# recomputes activations in the backward pass to save memory on large
# volumes.
est = VeryDeepVAE(
    channels=(16, 32, 64),
    channels_hidden=(8, 16, 32),
    channels_per_latent=(2, 4, 8),
    latents_per_resolution=(1, 2, 2),
    kernel_sizes=(3, 3, 3),
    n_blocks_per_resolution=1,
    global_latent_dim=32,
    global_only_iter=10,
    global_only_fraction=0.5,
    global_prior="fitted",
    beta=1.0,
    warmup_iter=5,
    optimizer="adamax",
    learning_rate_init=2e-3,
    max_grad_norm=None,
    skip_threshold=None,
    ema_decay=None,
    gradient_checkpointing=False,
    batch_size=8,
    max_iter=24,
    random_state=0,
)
fit_start = time.perf_counter()
est.fit(X_train)
print(f"fitted in {time.perf_counter() - fit_start:.0f} s")
print("latent groups, the global latent then coarsest first:")
print(est.module_.latent_shapes)

# %%
# Training curves
# ---------------
# ``history_["loss"]`` is the negative ELBO of the training batches, in nats
# per volume, averaged over each epoch (the data are standardised, so it can
# fall below zero). ``history_["kl_levelK"]`` is the KL of the groups at
# resolution ``K``, with ``K = 0`` the full grid, and ``history_["kl_global"]``
# that of the global latent: how many nats each level of the hierarchy
# carries about a volume. The spatial levels carry nothing while they are
# closed (the first 10 epochs, left of the dotted line). When they open, the
# full grid briefly takes hundreds of nats and the loss jumps, then the
# information goes back to the global latent: at the end it carries about
# 70 nats and the spatial levels a few.
n_levels = len(est.channels)
fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
axes[0].plot(est.history_["loss"])
axes[0].set(xlabel="epoch", ylabel="nats per volume", title="loss (negative ELBO)")
axes[1].plot(est.history_["kl_global"], label="global latent", color="k")
for k in range(n_levels):
    side = X.shape[1] // 2**k
    axes[1].plot(est.history_[f"kl_level{k}"], label=f"level {k} ({side}^3)")
axes[1].axvline(est.global_only_iter - 0.5, color="0.6", linestyle=":")
axes[1].set(xlabel="epoch", ylabel="nats per volume", title="KL per level")
axes[1].legend(fontsize=8)
fig.tight_layout()

# %%
# Samples at two temperatures
# ---------------------------
# ``sample`` runs the decoder from the priors alone: the global latent from
# its fitted Gaussian, then every spatial group from its learned prior.
# ``temperature`` scales the standard deviations of all the priors: 1 draws
# from the model as trained, lower values stay closer to the prior means and
# give smoother, more typical (and less varied) volumes; 0 gives the prior
# means. We show real held-out volumes, then samples at temperature 1 and
# 0.5, each as the middle axial slice and as a maximum-intensity projection
# along the same axis (a mid-slice misses the ellipsoids that lie away from
# the centre), and last the reconstructions of the held-out volumes.
#
# About half of the samples at temperature 1 hold one clear, smooth,
# roughly ellipsoidal blob, in varied places, sizes and orientations; the
# others hold a faint one. At temperature 0.5 the same draws are dimmer and
# smaller. None has the sharp edge of a real ellipsoid: the global latent
# places and sizes the blob, and the spatial groups, which would add the
# edge, carry little here. The reconstructions of held-out volumes are
# smooth too.
n = 8
rows = {
    "held-out volumes": X_test[:n],
    "samples, temperature 1": est.sample(n, temperature=1.0, random_state=0),
    "samples, temperature 0.5": est.sample(n, temperature=0.5, random_state=0),
    "held-out volumes, reconstructed": est.reconstruct(X_test[:n]),
}
middle = X.shape[3] // 2
fig, axes = plt.subplots(2 * len(rows), n, figsize=(n, 2.4 * len(rows)))
fig.subplots_adjust(left=0.02, right=0.98, bottom=0.01, top=0.96, hspace=0.3)
for r, (label, volumes) in enumerate(rows.items()):
    for view, image in enumerate([volumes[..., middle], volumes.max(axis=3)]):
        row = axes[2 * r + view]
        for axis, slice_ in zip(row, image):
            axis.imshow(slice_.T, cmap="gray", vmin=-0.2, vmax=1.5, origin="lower")
            axis.set_axis_off()
        kind = "middle slice" if view == 0 else "max. projection"
        row[0].set_title(f"{label}: {kind}", fontsize=8, loc="left")

# %%
# Held-out bits per voxel
# -----------------------
# ``bits_per_voxel`` is the negative ELBO of each volume divided by the
# number of voxels and by log(2): the usual unit of very deep VAEs,
# comparable across grids, and lower is better. The data are continuous, so
# it can be negative (a density, not a probability).
bpv_train = est.bits_per_voxel(X_train).mean()
bpv_test = est.bits_per_voxel(X_test).mean()
print(f"bits per voxel: training {bpv_train:.3f}, held out {bpv_test:.3f}")
print(f"the example ran in {time.perf_counter() - start:.0f} s")
plt.show()

# %%
# References
# ----------
# - C. K. Sønderby, T. Raiko, L. Maaløe, S. K. Sønderby and O. Winther,
#   "Ladder variational autoencoders", NeurIPS 2016.
# - R. Child, "Very deep VAEs generalize autoregressive models and can
#   outperform them on images", ICLR 2021.
# - P. Ghosh, M. S. M. Sajjadi, A. Vergari, M. Black and B. Schölkopf,
#   "From variational to deterministic autoencoders", ICLR 2020 (a density
#   fitted to the latent codes after training, as ``global_prior="fitted"``
#   does with one Gaussian).
