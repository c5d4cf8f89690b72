"""Reusable work memory for the operators and the solver.

A large array freshly allocated is backed by new pages the kernel must fault in and zero on first touch, one
thread at a time, so writing a result into fresh memory is markedly slower than into a reused array, and more
so with several threads. The reconstruction therefore lends its arrays from one :class:`Scratch`.
"""

import numpy as np


class Scratch:
    """Work memory lent out by :meth:`take` and handed back by :meth:`give`; :meth:`clear` frees it all.

    A loan lasts either until the borrower gives the array back (the solver's whole volumes: directions,
    weights; an array it is done with becomes the next one it needs, so the number of live arrays, the peak
    memory, stays the same), or, for a numbered ``slot``, until the next loan of the same slot (the operators'
    intermediates, which ping-pong between slots 0 and 1: each slot's memory grows to the largest request and
    is reused otherwise). Not for concurrent use of the same slot.
    """

    def __init__(self):
        self._slots = {}
        self._free = []

    def take(self, shape, dtype, slot=None):
        """A C-contiguous array of ``shape`` and ``dtype``, uninitialised.

        Without ``slot``: one given back earlier with the same shape and dtype, or a new one. With ``slot``
        (an int): a view of that slot's memory, valid until the next ``take`` of the slot (not given back).
        """
        if slot is not None:
            return self._slot_view(slot, shape, dtype)
        free = self._free
        for n, a in enumerate(free):
            if a.shape == tuple(shape) and a.dtype == np.dtype(dtype):
                return free.pop(n)
        return np.empty(shape, dtype=dtype)

    def give(self, array):
        """Hand back an array from :meth:`take` (or any C-contiguous one that owns its memory) for reuse;
        the caller must not use it afterwards. Slot views and None are ignored."""
        if array is not None and array.flags.c_contiguous and array.flags.owndata:
            self._free.append(array)

    def clear(self):
        """Free the memory."""
        self._slots.clear()
        self._free = []

    def _slot_view(self, slot, shape, dtype):
        n = int(np.prod(shape))
        key = (slot, np.dtype(dtype))
        buf = self._slots.get(key)
        if buf is None or buf.size < n:
            self._slots.pop(key, None)
            buf = np.empty(n, dtype=dtype)
            self._slots[key] = buf
        return buf[:n].reshape(shape)


__all__ = ["Scratch"]
