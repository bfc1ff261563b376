"""Translations (softmax router rows): the shift that best matches B's rows to A's is the mean difference."""

from __future__ import annotations

from symm.element import GroupElement

from .state import MatchState


def translation_step(state: MatchState, name: str) -> bool:
    """Centre B's shifted rows on A's: t = mean over the shifted axis of (A - B). Never counts as a change."""
    if not state.free(name):
        return False
    ((pname, shift),) = state.spec.shifts_of(name)
    t = (state.a[pname] - state.b[pname]).double().mean(shift.axis).reshape(-1)
    state.apply(GroupElement.identity(state.spec).replace(**{name: t}), [name])
    return False
