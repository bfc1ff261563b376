"""2-D convolution catalogue entries: channel permutations through convs, norms, pooling and flatten.

BatchNorm: its affine weight/bias and running statistics move with their channel; with a positively
homogeneous activation the per-channel scaling acts on the norm's weight and bias (the running statistics
describe the norm's input, which is not rescaled). GroupNorm: a channel permutation must map norm groups
to norm groups (a grouped permutation). LayerNorm over (C, H, W) ties channels to positions: not supported
as a channel symmetry here. Average pooling commutes with every per-channel factor; max pooling commutes
with permutations and positive scaling but not with sign flips.

Modes: ``"eval"`` (the default, what aligners use) is the group of the function with fixed running statistics.
``"train"`` adds what batch statistics create: BatchNorm in training mode normalises each channel by its own batch
statistics, so the filter feeding it may be rescaled per channel, weights and bias together (a one-sided
:class:`~symm.factors.NormScale`, law ||w_c||^2 + b_c^2); exact only with eps = 0 (torch refuses eps = 0 in training
mode; eps = 1e-300 behaves as 0), approximate at torch's default 1e-5. (It also makes the filter's bias gradient
vanish, a per-channel bias translation that is not catalogued.)
"""

from __future__ import annotations

from collections.abc import Sequence

from ..factors import NormScale
from ..spec import Fragment, On, param
from .mlp import linear
from .units import Units, channels

#: ``"eval"``: the symmetries of the function with fixed norm statistics; ``"train"``: plus those of batch statistics
SPEC_MODES = ("eval", "train")
#: torch.nn.BatchNorm2d's default epsilon
BATCHNORM_EPS = 1e-5


def check_mode(mode: str) -> str:
    if mode not in SPEC_MODES:
        raise ValueError(f"mode must be one of {SPEC_MODES}, got {mode!r}")
    return mode


def batchnorm_scale(name: str, units: Units, norm: str, eps: float = BATCHNORM_EPS) -> NormScale:
    """Per-channel scale of the layer feeding BatchNorm ``norm`` in training mode: n(a x) = n(x) over the batch."""
    if units.perm is None:
        raise ValueError(f"factor {name!r}: channels feeding {norm!r} need a permutation factor to index the scale")
    return NormScale(name, units.n, parent=units.perm.name, norm=f"{norm} (BatchNorm, batch statistics)", eps=eps, training_only=True)


def conv2d(prefix: str, c_out: int, c_in: int, kernel: tuple[int, int], out: Sequence[On] | None, inn: Sequence[On] | None, bias: bool = True) -> Fragment:
    """``{prefix}.weight`` (c_out, c_in, kh, kw): out-channels on axis 0, in-channels on axis 1."""
    params = {f"{prefix}.weight": param((c_out, c_in, *kernel), list(out) if out else None, list(inn) if inn else None)}
    if bias:
        params[f"{prefix}.bias"] = param((c_out,), list(out) if out else None)
    return Fragment.of(params=params)


def batchnorm(prefix: str, units: Units) -> Fragment:
    """BatchNorm affine (perm x scaling) and running stats (perm only)."""
    n = units.n
    perm_only = units.out(with_child=False)
    return Fragment.of(
        params={
            f"{prefix}.weight": param((n,), units.out()),
            f"{prefix}.bias": param((n,), units.out()),
            f"{prefix}.running_mean": param((n,), perm_only),
            f"{prefix}.running_var": param((n,), perm_only),
            f"{prefix}.num_batches_tracked": param(()),
        }
    )


def groupnorm(prefix: str, units: Units) -> Fragment:
    return Fragment.of(params={f"{prefix}.weight": param((units.n,), units.out()), f"{prefix}.bias": param((units.n,), units.out())})


def cnn(
    conv_names: Sequence[str],
    norm_names: Sequence[str] | None,
    head_name: str,
    in_channels: int,
    widths: Sequence[int],
    kernel: tuple[int, int],
    n_classes: int,
    head_pixels: int,
    activation: str,
    norm: str = "none",
    groups: int = 1,
    bias: bool = True,
    mode: str = "eval",
    bn_eps: float = BATCHNORM_EPS,
) -> Fragment:
    """conv -> [norm] -> activation (-> pooling) blocks, then flatten and a linear head of ``head_pixels`` per channel.

    ``mode="train"`` with BatchNorm adds each conv's per-channel norm scale (see the module docstring).
    """
    if norm not in ("none", "batch", "group"):
        raise ValueError(f"norm must be 'none', 'batch' or 'group', got {norm!r}")
    train_bn = check_mode(mode) == "train" and norm == "batch"
    frag = Fragment()
    inn: list[On] | None = None
    c_in = in_channels
    units = None
    for i, (name, width) in enumerate(zip(conv_names, widths)):
        units = channels(f"{name}.channels", width, activation, groups=groups if norm == "group" else None)
        frag = frag + Fragment.of(units.factors)
        conv_out = units.out(with_child=norm == "none")
        if train_bn:
            scale = batchnorm_scale(f"{name}.bn_scale", units, norm_names[i], bn_eps)
            note = f"{name}: BatchNorm in training mode absorbs a per-channel scale of the filter (law ||w_c||^2 + b_c^2)"
            frag = frag + Fragment.of([scale], notes=[note])
            conv_out = conv_out + [On(scale.name, "out")]
        frag = frag + conv2d(name, width, c_in, kernel, conv_out, inn, bias)
        if norm == "batch":
            frag = frag + batchnorm(norm_names[i], units)
        elif norm == "group":
            frag = frag + groupnorm(norm_names[i], units)
        inn, c_in = units.inn(), width
    assert units is not None
    return frag + linear(head_name, n_classes, c_in * head_pixels, None, units.inn(block=head_pixels), bias)
