"""The NumPy backend's memory: the buffers of the schedule a call holds, measured."""
from __future__ import annotations

import numpy as np


def _root(array: np.ndarray) -> np.ndarray:
    """The array that owns the memory `array` views."""
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


class Ledger:
    """The buffers of the schedule a call holds, each a list of dicts of
    arrays (one per step for a tape), counted by the memory they own.

    Every array enters through `keep`, which copies it unless it is the whole
    of a buffer nothing else held uses (a slice would keep its whole buffer
    alive; a broadcast is smaller than it looks), so the total is the memory
    the process really holds for them, and the plan's prediction is checked
    against it."""

    def __init__(self):
        self.buffers: dict = {}  # (role, segment) -> [dict of arrays, ...]
        self.owners: dict = {}  # id of an owning array -> that array
        self.current = self.peak = 0

    def holds(self, array) -> bool:
        return id(_root(array)) in self.owners

    def keep(self, buffer, arrays: dict) -> dict:
        """`arrays` added to `buffer`'s (as the ledger's own, see the class doc)."""
        kept = {}
        for name, array in arrays.items():
            root = _root(array)
            if id(root) in self.owners or root.nbytes != array.nbytes:
                array = root = array.copy()
            self.owners[id(root)] = root
            self.current += root.nbytes
            kept[name] = array
        self.peak = max(self.peak, self.current)
        self.buffers.setdefault(buffer.key, []).append(kept)
        return kept

    def arrays(self, role: str, segment=None) -> list:
        return self.buffers[role, segment]

    def release(self, buffer) -> list:
        """Forget `buffer`; its arrays, for a last use."""
        parts = self.buffers.pop(buffer.key, [])
        for arrays in parts:
            for array in arrays.values():
                self.current -= self.owners.pop(id(_root(array))).nbytes
        return parts
