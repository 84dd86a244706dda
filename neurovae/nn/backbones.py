"""Encoder / decoder backbones: MLP for flat features, 3-D conv and ResNet.

Every encoder maps a batch ``(n, *sample_shape)`` to features of any shape;
the latent head flattens them. Every decoder maps ``(n, n_components)`` to the
raw output ``(n, *sample_shape)``. Nothing depends on a hard-coded input size:
the convolutional backbones compute the grid of every level from the input
shape, so odd sizes such as 91 x 109 x 91 work, and upsample to exactly those
grids on the way back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

_ACTIVATIONS = {
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
}


def make_activation(name: str) -> nn.Module:
    """Instantiate the activation called ``name``."""
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; use one of {sorted(_ACTIVATIONS)}"
        ) from None


def _groups(channels: int, max_groups: int = 8) -> int:
    """Largest number of GroupNorm groups <= max_groups that divides channels."""
    return max(g for g in range(1, max_groups + 1) if channels % g == 0)


def level_shapes(spatial_shape: Sequence[int], n_levels: int) -> list[tuple]:
    """Grids of a pyramid of stride-2 levels: ``[input, /2, /4, ...]``.

    A stride-2, kernel-3, padding-1 convolution maps a side ``s`` to
    ``ceil(s / 2)``; the decoder upsamples back to exactly these grids.
    """
    shapes = [tuple(int(s) for s in spatial_shape)]
    for _ in range(n_levels):
        shapes.append(tuple(math.ceil(s / 2) for s in shapes[-1]))
    return shapes


@torch.no_grad()
def dry_run(module: nn.Module, in_shape: Sequence[int]) -> tuple[int, ...]:
    """Shape of one output sample of ``module`` for input samples of ``in_shape``.

    Runs the module once on a zero batch of one sample, on the module's
    device and in eval mode (restored afterwards), so that shapes of user
    modules need not be declared.

    Parameters
    ----------
    module : torch.nn.Module
        Module mapping a batch ``(n, *in_shape)`` to a tensor.
    in_shape : tuple of int
        Shape of one input sample (without the batch dimension).

    Returns
    -------
    tuple of int
        Shape of one output sample (without the batch dimension).

    Raises
    ------
    TypeError
        If the module does not return a tensor.

    Examples
    --------
    >>> from torch import nn
    >>> from neurovae.nn import dry_run
    >>> dry_run(nn.Linear(3, 5), (3,))
    (5,)
    >>> dry_run(nn.Conv3d(1, 2, kernel_size=3, stride=2, padding=1), (1, 9, 11, 7))
    (2, 5, 6, 4)
    """
    was_training = module.training
    module.eval()
    try:
        param = next(module.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        out = module(torch.zeros((1, *in_shape), device=device))
    finally:
        module.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the module must return a tensor, got {type(out).__name__}")
    return tuple(int(s) for s in out.shape[1:])


def infer_output_size(module: nn.Module, sample_shape: Sequence[int]) -> int:
    """Number of values per sample that ``module`` outputs for ``sample_shape``.

    Used to size the latent head after a user encoder of unknown output.

    Parameters
    ----------
    module : torch.nn.Module
        Module mapping a batch ``(n, *sample_shape)`` to a tensor.
    sample_shape : tuple of int
        Shape of one input sample.

    Returns
    -------
    int
        Product of the output sample's dimensions.

    Examples
    --------
    >>> from torch import nn
    >>> from neurovae.nn import infer_output_size
    >>> infer_output_size(nn.Flatten(), (2, 3, 4))
    24
    """
    return math.prod(dry_run(module, sample_shape))


class MLPEncoder(nn.Module):
    """Fully connected encoder: flatten, then Linear + activation per layer.

    Parameters
    ----------
    in_features : int
        Number of input features (the input is flattened).
    hidden_layer_sizes : sequence of int
        Width of each hidden layer.
    activation : str, default="silu"
        Activation between layers: "relu", "silu", "elu", "tanh" or
        "leaky_relu".

    Attributes
    ----------
    out_features : int
        Width of the output, the last hidden layer size (``in_features`` when
        there is no hidden layer).

    See Also
    --------
    MLPDecoder : The matching decoder.
    make_backbone : Build both halves at once.

    Examples
    --------
    >>> import torch
    >>> from neurovae.nn import MLPEncoder
    >>> encoder = MLPEncoder(in_features=12, hidden_layer_sizes=(8, 4))
    >>> encoder(torch.zeros(5, 3, 4)).shape  # (n, 3, 4) is flattened to (n, 12)
    torch.Size([5, 4])
    >>> encoder.out_features
    4
    """

    def __init__(
        self,
        in_features: int,
        hidden_layer_sizes: Sequence[int],
        activation: str = "silu",
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for size in hidden_layer_sizes:
            layers += [nn.Linear(width, size), make_activation(activation)]
            width = size
        self.net = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MLPDecoder(nn.Module):
    """Fully connected decoder, the mirror of :class:`MLPEncoder`.

    Parameters
    ----------
    n_components : int
        Latent dimension.
    hidden_layer_sizes : sequence of int
        Width of the hidden layers in encoder order (they are used reversed).
    out_shape : tuple of int
        Shape of one output sample.
    activation : str, default="silu"
        Activation between layers.

    See Also
    --------
    MLPEncoder : The matching encoder.

    Examples
    --------
    >>> import torch
    >>> from neurovae.nn import MLPDecoder
    >>> decoder = MLPDecoder(2, hidden_layer_sizes=(8, 4), out_shape=(3, 4))
    >>> decoder(torch.zeros(5, 2)).shape  # latent codes (n, 2) to samples (n, 3, 4)
    torch.Size([5, 3, 4])
    """

    def __init__(
        self,
        n_components: int,
        hidden_layer_sizes: Sequence[int],
        out_shape: Sequence[int],
        activation: str = "silu",
    ) -> None:
        super().__init__()
        self.out_shape = tuple(out_shape)
        layers: list[nn.Module] = []
        width = n_components
        for size in reversed(tuple(hidden_layer_sizes)):
            layers += [nn.Linear(width, size), make_activation(activation)]
            width = size
        layers.append(nn.Linear(width, math.prod(self.out_shape)))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).view(z.shape[0], *self.out_shape)


def _conv_block(c_in: int, c_out: int, stride: int, activation: str) -> nn.Module:
    return nn.Sequential(
        nn.Conv3d(c_in, c_out, kernel_size=3, stride=stride, padding=1),
        nn.GroupNorm(_groups(c_out), c_out),
        make_activation(activation),
    )


class _Upsample(nn.Module):
    """Nearest-neighbour upsampling to a fixed grid (no checkerboard)."""

    def __init__(self, size: tuple[int, ...]) -> None:
        super().__init__()
        self.size = tuple(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.interpolate(x, size=self.size, mode="nearest")


class ConvEncoder3d(nn.Module):
    """3-D convolutional encoder: one stride-2 conv + GroupNorm per level.

    Parameters
    ----------
    in_channels : int
        Channels of the input volumes.
    channels : sequence of int
        Output channels of each level; each level halves the grid (a side
        ``s`` becomes ``ceil(s / 2)``).
    activation : str, default="silu"
        Activation after each normalisation.

    See Also
    --------
    ConvDecoder3d : The matching decoder.

    Examples
    --------
    >>> import torch
    >>> from neurovae.nn import ConvEncoder3d
    >>> encoder = ConvEncoder3d(in_channels=1, channels=(4, 8))
    >>> encoder(torch.zeros(2, 1, 9, 11, 7)).shape  # 9 x 11 x 7 -> 5 x 6 x 4 -> ...
    torch.Size([2, 8, 3, 3, 2])
    """

    def __init__(
        self, in_channels: int, channels: Sequence[int], activation: str = "silu"
    ) -> None:
        super().__init__()
        blocks = []
        c_prev = in_channels
        for c in channels:
            blocks.append(_conv_block(c_prev, c, stride=2, activation=activation))
            c_prev = c
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvDecoder3d(nn.Module):
    """3-D convolutional decoder, the mirror of :class:`ConvEncoder3d`.

    A linear layer maps the latent code to the coarsest grid; each level
    upsamples to the exact grid of the matching encoder level and convolves.

    Parameters
    ----------
    n_components : int
        Latent dimension.
    channels : sequence of int
        Channels of the encoder levels, in encoder order.
    out_shape : tuple of int
        ``(channels, x, y, z)`` of one output volume.
    activation : str, default="silu"
        Activation after each normalisation.

    See Also
    --------
    ConvEncoder3d : The matching encoder.

    Examples
    --------
    >>> import torch
    >>> from neurovae.nn import ConvDecoder3d
    >>> decoder = ConvDecoder3d(4, channels=(4, 8), out_shape=(1, 9, 11, 7))
    >>> decoder(torch.zeros(2, 4)).shape  # the odd grid is recovered exactly
    torch.Size([2, 1, 9, 11, 7])
    """

    def __init__(
        self,
        n_components: int,
        channels: Sequence[int],
        out_shape: Sequence[int],
        activation: str = "silu",
    ) -> None:
        super().__init__()
        channels = tuple(channels)
        out_channels, *spatial = out_shape
        shapes = level_shapes(spatial, len(channels))
        self.bottom = (channels[-1], *shapes[-1])
        self.fc = nn.Linear(n_components, math.prod(self.bottom))
        blocks: list[nn.Module] = [make_activation(activation)]
        for level in range(len(channels) - 1, -1, -1):
            c_out = channels[level - 1] if level > 0 else channels[0]
            blocks += [
                _Upsample(shapes[level]),
                _conv_block(channels[level], c_out, stride=1, activation=activation),
            ]
        blocks.append(nn.Conv3d(channels[0], out_channels, kernel_size=3, padding=1))
        self.net = nn.Sequential(*blocks)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(self.fc(z).view(z.shape[0], *self.bottom))


class ResBlock3d(nn.Module):
    """Pre-activation residual block: (GroupNorm, act, conv) x 2 + identity.

    The second convolution starts at zero, so every block starts as the
    identity and a deep stack trains stably.
    """

    def __init__(self, channels: int, activation: str = "silu") -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.GroupNorm(_groups(channels), channels),
            make_activation(activation),
            nn.Conv3d(channels, channels, kernel_size=3, padding=1),
            nn.GroupNorm(_groups(channels), channels),
            make_activation(activation),
            nn.Conv3d(channels, channels, kernel_size=3, padding=1),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class ResNetEncoder3d(nn.Module):
    """Residual 3-D encoder in the spirit of MONAI's MAISI autoencoder.

    A stem convolution, then per level a stride-2 convolution followed by
    ``n_res_blocks`` residual blocks with GroupNorm and SiLU.

    Parameters
    ----------
    in_channels : int
        Channels of the input volumes.
    channels : sequence of int
        Channels of each level; each level halves the grid.
    n_res_blocks : int, default=1
        Residual blocks per level.
    activation : str, default="silu"
        Activation inside the blocks.

    See Also
    --------
    ResNetDecoder3d : The matching decoder.

    Examples
    --------
    >>> import torch
    >>> from neurovae.nn import ResNetEncoder3d
    >>> encoder = ResNetEncoder3d(in_channels=1, channels=(4, 8))
    >>> encoder(torch.zeros(2, 1, 9, 11, 7)).shape
    torch.Size([2, 8, 3, 3, 2])
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int],
        n_res_blocks: int = 1,
        activation: str = "silu",
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv3d(in_channels, channels[0], kernel_size=3, padding=1)
        ]
        c_prev = channels[0]
        for c in channels:
            layers.append(nn.Conv3d(c_prev, c, kernel_size=3, stride=2, padding=1))
            layers += [ResBlock3d(c, activation) for _ in range(n_res_blocks)]
            c_prev = c
        layers += [nn.GroupNorm(_groups(c_prev), c_prev), make_activation(activation)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ResNetDecoder3d(nn.Module):
    """Residual 3-D decoder, the mirror of :class:`ResNetEncoder3d`.

    Parameters
    ----------
    n_components : int
        Latent dimension.
    channels : sequence of int
        Channels of the encoder levels, in encoder order.
    out_shape : tuple of int
        ``(channels, x, y, z)`` of one output volume.
    n_res_blocks : int, default=1
        Residual blocks per level.
    activation : str, default="silu"
        Activation inside the blocks.

    See Also
    --------
    ResNetEncoder3d : The matching encoder.

    Examples
    --------
    >>> import torch
    >>> from neurovae.nn import ResNetDecoder3d
    >>> decoder = ResNetDecoder3d(4, channels=(4, 8), out_shape=(1, 9, 11, 7))
    >>> decoder(torch.zeros(2, 4)).shape
    torch.Size([2, 1, 9, 11, 7])
    """

    def __init__(
        self,
        n_components: int,
        channels: Sequence[int],
        out_shape: Sequence[int],
        n_res_blocks: int = 1,
        activation: str = "silu",
    ) -> None:
        super().__init__()
        channels = tuple(channels)
        out_channels, *spatial = out_shape
        shapes = level_shapes(spatial, len(channels))
        self.bottom = (channels[-1], *shapes[-1])
        self.fc = nn.Linear(n_components, math.prod(self.bottom))
        layers: list[nn.Module] = []
        for level in range(len(channels) - 1, -1, -1):
            c = channels[level]
            c_next = channels[level - 1] if level > 0 else channels[0]
            layers += [ResBlock3d(c, activation) for _ in range(n_res_blocks)]
            layers += [
                _Upsample(shapes[level]),
                nn.Conv3d(c, c_next, kernel_size=3, padding=1),
            ]
        c0 = channels[0]
        layers += [
            nn.GroupNorm(_groups(c0), c0),
            make_activation(activation),
            nn.Conv3d(c0, out_channels, kernel_size=3, padding=1),
        ]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(self.fc(z).view(z.shape[0], *self.bottom))


BACKBONES = ("mlp", "conv", "resnet")


def make_backbone(
    kind: str,
    sample_shape: Sequence[int],
    n_components: int,
    *,
    hidden_layer_sizes: Sequence[int] = (256, 128),
    channels: Sequence[int] = (16, 32, 64),
    activation: str = "silu",
) -> tuple[nn.Module, nn.Module]:
    """Build the ``(encoder, decoder)`` pair of a built-in backbone.

    Parameters
    ----------
    kind : {"mlp", "conv", "resnet"}
        Backbone family. "conv" and "resnet" need ``sample_shape`` to be
        ``(channels, x, y, z)``; "mlp" flattens any shape.
    sample_shape : tuple of int
        Shape of one sample.
    n_components : int
        Latent dimension.
    hidden_layer_sizes : sequence of int
        Hidden widths of the MLP.
    channels : sequence of int
        Channels per level of the convolutional backbones.
    activation : str, default="silu"
        Activation function.

    Returns
    -------
    encoder, decoder : torch.nn.Module

    Examples
    --------
    >>> import torch
    >>> from neurovae.nn import make_backbone
    >>> enc, dec = make_backbone("conv", (1, 9, 11, 9), 4, channels=(4, 8))
    >>> dec(torch.zeros(2, 4)).shape
    torch.Size([2, 1, 9, 11, 9])
    """
    sample_shape = tuple(int(s) for s in sample_shape)
    if kind == "mlp":
        return (
            MLPEncoder(math.prod(sample_shape), hidden_layer_sizes, activation),
            MLPDecoder(n_components, hidden_layer_sizes, sample_shape, activation),
        )
    if kind in ("conv", "resnet") and len(sample_shape) != 4:
        raise ValueError(
            f"backbone {kind!r} needs samples of shape (channels, x, y, z); "
            f"got {sample_shape}"
        )
    if kind == "conv":
        return (
            ConvEncoder3d(sample_shape[0], channels, activation),
            ConvDecoder3d(n_components, channels, sample_shape, activation),
        )
    if kind == "resnet":
        return (
            ResNetEncoder3d(sample_shape[0], channels, activation=activation),
            ResNetDecoder3d(
                n_components, channels, sample_shape, activation=activation
            ),
        )
    raise ValueError(f"unknown backbone {kind!r}; use one of {BACKBONES}")
