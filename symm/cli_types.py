"""Argument types for the command line: a bad number is refused by argparse with its option's name, before any work."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def int_at_least(low: int, why: str = "") -> Callable[[str], int]:
    """An argparse type accepting integers >= ``low`` (``why`` explains the bound in the error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}{f' ({why})' if why else ''}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"  # argparse names the type in some messages
    return parse


def float_above(low: float, *, inclusive: bool = False) -> Callable[[str], float]:
    """An argparse type accepting finite floats > ``low`` (>= with ``inclusive``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            bound = f">= {low:g}" if inclusive else f"> {low:g}"
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


positive = int_at_least(1)
non_negative = int_at_least(0)
positive_float = float_above(0.0)
non_negative_float = float_above(0.0, inclusive=True)

__all__ = ["float_above", "int_at_least", "non_negative", "non_negative_float", "positive", "positive_float"]
