"""Random ids (trace and span ids, request ids) in hex, from one buffered OS read.

`random_hex(n)` hands out slices of one `os.urandom` read of `_RAND_BYTES`, kept as hex:
one getrandom call per few hundred ids instead of one per id. Every draw takes bytes no
other draw took. A forked child drops what it inherited (`os.register_at_fork`), so parent
and child never hand out the same bytes.
"""

from __future__ import annotations

import os

__all__ = ["random_hex"]

_RAND_BYTES = 4096
_rand_buf = ""  # hex digits, two per random byte
_rand_pos = 0  # the next unused digit of _rand_buf


def _drop_random() -> None:
    global _rand_buf, _rand_pos
    _rand_buf, _rand_pos = "", 0


os.register_at_fork(after_in_child=_drop_random)


def random_hex(nbytes: int) -> str:
    """`nbytes` random bytes from the OS, as 2 * `nbytes` lower-case hex digits."""
    global _rand_buf, _rand_pos
    pos = _rand_pos
    end = pos + 2 * nbytes
    if end > len(_rand_buf):
        if nbytes > _RAND_BYTES:
            return os.urandom(nbytes).hex()
        _rand_buf, pos, end = os.urandom(_RAND_BYTES).hex(), 0, 2 * nbytes
    _rand_pos = end
    return _rand_buf[pos:end]
