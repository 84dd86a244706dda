"""
VAE versus PCA on handwritten digits
====================================

Fit a :class:`neurovae.VAE` with eight latent components on scikit-learn's
digits, and compare it with :class:`~sklearn.decomposition.PCA` at the same
size: held-out reconstruction error, a linear probe on the embeddings, and
what the two models reconstruct. The VAE is a generative model, so we also
draw new digits from it.
"""

# %%
# Data: 8x8 grey-level digits scaled to [0, 1], 20 % held out.
import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from neurovae import VAE

digits = load_digits()
X = digits.data / 16.0
X_train, X_test, y_train, y_test = train_test_split(
    X, digits.target, test_size=0.2, random_state=0
)

# %%
# Fit both models. The VAE uses its defaults (an MLP encoder and decoder and
# a Gaussian likelihood whose scale is learned).
vae = VAE(n_components=8, random_state=0).fit(X_train)
pca = PCA(n_components=8, random_state=0).fit(X_train)

for name, model in [("VAE", vae), ("PCA", pca)]:
    recon = model.inverse_transform(model.transform(X_test))
    probe = LogisticRegression(max_iter=5000).fit(model.transform(X_train), y_train)
    print(
        f"{name}: held-out MSE {np.mean((recon - X_test) ** 2):.4f}, "
        f"linear-probe accuracy {probe.score(model.transform(X_test), y_test):.3f}"
    )

# %%
# Training curves: the loss is the negative ELBO (nats per image); the KL term
# shows how much information the latent code carries.
fig, ax = plt.subplots(1, 2, figsize=(8, 3))
ax[0].plot(vae.history_["loss"])
ax[0].set(xlabel="epoch", ylabel="loss (nats)", title="training loss")
ax[1].plot(vae.history_["kl"])
ax[1].set(xlabel="epoch", ylabel="KL (nats)", title="KL term")
fig.tight_layout()

# %%
# Reconstructions of held-out digits (top: original, middle: VAE, bottom:
# PCA).
n = 8
rows = [
    X_test[:n],
    vae.inverse_transform(vae.transform(X_test[:n])),
    pca.inverse_transform(pca.transform(X_test[:n])),
]
fig, axes = plt.subplots(3, n, figsize=(n, 3.3))
for r, (row, label) in enumerate(zip(rows, ["original", "VAE", "PCA"])):
    for c in range(n):
        axes[r, c].imshow(row[c].reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
        axes[r, c].set_axis_off()
    axes[r, 0].set_title(label, fontsize=8, loc="left")
fig.tight_layout()

# %%
# New digits drawn from the prior: decoder means of z ~ N(0, I).
samples = vae.sample(16, random_state=0)
fig, axes = plt.subplots(2, 8, figsize=(8, 2.2))
for image, axis in zip(samples, axes.ravel()):
    axis.imshow(image.reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
    axis.set_axis_off()
plt.show()
