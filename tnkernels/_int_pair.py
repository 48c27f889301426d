"""Integer arguments of the public API: conv geometry (an int or an (h, w) pair, as nn.Conv2d takes), mode and
bond tuples, counts. Each refuses floats, bools and strings with a message naming the owner and the argument."""

from __future__ import annotations

import operator


def int_pair(value, name: str, owner: str) -> tuple[int, int]:
    """(h, w) from an int or a pair of ints (numpy integers too). Floats, bools, strings and other lengths are
    refused with a message naming `owner` (the layer or function) and the argument: a silently truncated 1.5 or a
    3-tuple cut to its first two entries would give a different convolution."""
    if type(value) is int:  # the common case first: functional calls pass through here every time
        return (value, value)
    if type(value) is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        return value  # what the layers store and pass on
    if isinstance(value, (tuple, list)) and len(value) == 2:
        pair = [_index(v) for v in value]
        if None not in pair:
            return (pair[0], pair[1])
    elif _index(value) is not None:  # a numpy integer scalar
        return (_index(value), _index(value))
    raise ValueError(f"{owner}: {name} must be an int or a pair of ints (h, w), got {value!r}")


def _index(v) -> int | None:
    if isinstance(v, bool):
        return None
    try:
        return operator.index(v)
    except TypeError:
        return None


def int_tuple(value, name: str, owner: str, *, length: int | None = None, minimum: int = 1) -> tuple[int, ...]:
    """A tuple of ints >= `minimum` from a sequence of ints (numpy integers too); anything else (an int where a
    sequence belongs, floats, bools, strings, None, the wrong length) is refused with a message naming `owner` and
    the argument: tuple(8) or torch.empty(..., 2.5, ...) failed with bare Python / torch errors."""
    items = list(value) if isinstance(value, (tuple, list)) else None
    ints = [_index(v) for v in items] if items is not None else [None]
    if None in ints or (length is not None and len(ints) != length) or any(v < minimum for v in ints):
        size = f"{length} " if length is not None else ""
        raise ValueError(f"{owner}: {name} must be a tuple or list of {size}ints >= {minimum}, got {value!r}")
    return tuple(ints)


def check_index(value, name: str, owner: str, *, minimum: int = 1) -> int:
    """`value` as an int >= `minimum` (numpy integers too; not bools, floats or strings), else ValueError."""
    v = _index(value)
    if v is None or v < minimum:
        raise ValueError(f"{owner}: {name} must be an int >= {minimum}, got {value!r}")
    return v
