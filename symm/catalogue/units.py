"""Units: the factors acting on one set of hidden units, and how they appear where units are produced/consumed.

Activation -> group of one hidden layer (f(g.theta) = f(theta)):
  relu, leaky_relu (positively homogeneous): permutation x positive scaling
  tanh (odd):                                 permutation x sign flips
  gelu, silu:                                 permutation only (no continuous factor)
  any (activation unknown):                   permutation only (true for every elementwise activation)
  swiglu C(silu(Bx) * Ax):                    permutation x nonzero scaling of A rows / C columns (gate B unscaled):
                                              positive scaling x sign flips (the up branch is linear, any c != 0)
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UnsupportedArchitecture
from ..factors import Factor, GroupedPermutation, Permutation, PositiveScaling, SignFlip
from ..spec import On

#: activation name -> continuous part of its per-unit group
ACTIVATION_GROUPS: dict[str, str] = {
    "relu": "scaling",
    "leaky_relu": "scaling",
    "tanh": "sign",
    "gelu": "none",
    "silu": "none",
    "swiglu": "scaling-sign",
    "any": "none",  # unknown elementwise activation: only the permutation is safe
}


def activation_group(activation: str) -> str:
    try:
        return ACTIVATION_GROUPS[activation]
    except KeyError:
        known = ", ".join(sorted(ACTIVATION_GROUPS))
        raise UnsupportedArchitecture(f"activation {activation!r} has no catalogue entry (known: {known})") from None


@dataclass(frozen=True)
class Units:
    """A permutation of ``n`` units plus its per-unit child factors (scaling, sign, or both for SwiGLU)."""

    perm: Factor | None
    children: tuple[Factor, ...] = ()
    size: int = 0

    @staticmethod
    def fixed(n: int) -> "Units":
        """Units with no symmetry at all (e.g. a stream pinned by a fixed positional-encoding buffer)."""
        return Units(None, (), n)

    @property
    def factors(self) -> tuple[Factor, ...]:
        return ((self.perm,) if self.perm is not None else ()) + self.children

    @property
    def n(self) -> int:
        return self.perm.count if self.perm is not None else self.size

    def out(self, block: int = 1, with_child: bool = True) -> list[On]:
        """Where the units are produced (rows of the layer that writes them)."""
        if self.perm is None:
            return []
        acts = [On(self.perm.name, "out", block=block)]
        if with_child:
            acts += [On(c.name, "out", block=block) for c in self.children]
        return acts

    def inn(self, block: int = 1) -> list[On]:
        """Where the units are consumed (columns of the layer that reads them)."""
        if self.perm is None:
            return []
        acts = [On(self.perm.name, "in", block=block)]
        acts += [On(c.name, "in", block=block) for c in self.children]
        return acts


def neurons(name: str, n: int, activation: str) -> Units:
    """Hidden units of an activation: permutation x (scaling | sign | scaling and sign | nothing)."""
    group = activation_group(activation)
    perm = Permutation(name, n)
    children: list[Factor] = []
    if group in ("scaling", "scaling-sign"):
        children.append(PositiveScaling(f"{name}.scale", n, parent=name))
    if group in ("sign", "scaling-sign"):
        children.append(SignFlip(f"{name}.sign", n, parent=name))
    return Units(perm, tuple(children))


def channels(name: str, n: int, activation: str, groups: int | None = None) -> Units:
    """Conv channels; with GroupNorm (``groups``) the permutation must map norm groups to norm groups."""
    units = neurons(name, n, activation)
    if groups is None:
        return units
    perm = GroupedPermutation(name, n, groups=groups)
    return Units(perm, units.children)


def stream(name: str, d: int, signed: bool = False) -> Units:
    """A residual stream: one permutation shared by every writer and reader.

    ``signed`` (RMSNorm streams): plus a sign per channel, ``{+-1}^d x S_d``. RMSNorm commutes with a diagonal sign
    matrix S (rms(Sx) = rms(x), g * Sx = S(g * x)), so writers map W -> S W, readers W -> W S and the norm gains stay
    put (norms use ``out(with_child=False)``). LayerNorm's centring does not commute with S: no sign child there.
    """
    perm = Permutation(name, d)
    return Units(perm, (SignFlip(f"{name}.sign", d, parent=name),) if signed else ())
