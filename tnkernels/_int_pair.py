"""Conv geometry arguments (kernel size, stride, padding, dilation): an int or an (h, w) pair, as nn.Conv2d takes."""

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
