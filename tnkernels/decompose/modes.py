"""Factorizing feature sizes into MPO modes."""

from __future__ import annotations

import math

# A mode more than this many times the balanced size n**(1/num_cores) means the size has a large prime factor
# (50257 = 29 * 1733): such a split gives a lopsided chain that compresses badly, so it is refused, not returned.
_MAX_IMBALANCE = 4.0


def prime_factors(n: int) -> list[int]:
    """Prime factors of n in ascending order, with multiplicity."""
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return out


def auto_modes(n: int, num_cores: int) -> tuple[int, ...]:
    """Split a feature size `n` into `num_cores` balanced integer modes whose product is exactly `n`.

    Primes are dealt largest first to the currently smallest mode, then modes are sorted in descending order.
    Raises ValueError when `n` cannot be split into `num_cores` modes of at least 2, or when a large prime factor
    makes the split lopsided (for example GPT-2's vocabulary, 50257 = 29 * 1733); pick explicit modes for a padded
    size in that case, or leave the layer dense.

    >>> auto_modes(768, 2)
    (32, 24)
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"auto_modes: n must be a positive int, got {n!r}")
    if not isinstance(num_cores, int) or num_cores < 1:
        raise ValueError(f"auto_modes: num_cores must be a positive int, got {num_cores!r}")
    if num_cores == 1:
        return (n,)
    primes = prime_factors(n)
    if len(primes) < num_cores:
        raise ValueError(
            f"auto_modes: {n} = {' * '.join(map(str, primes)) or '1'} cannot be split into {num_cores} modes of at "
            f"least 2; use fewer cores (num_cores <= {max(len(primes), 1)}) or explicit modes"
        )
    modes = [1] * num_cores
    for p in sorted(primes, reverse=True):
        k = min(range(num_cores), key=lambda c: modes[c])
        modes[k] *= p
    modes.sort(reverse=True)
    balanced = n ** (1.0 / num_cores)
    if modes[0] > _MAX_IMBALANCE * balanced:
        raise ValueError(
            f"auto_modes: {n} has the large prime factor {primes[-1]}, so any split into {num_cores} modes is "
            f"lopsided ({tuple(modes)}); pass explicit modes, pad the layer to a nearby size such as "
            f"{nearest_balanced_size(n, num_cores)}, or leave this layer dense"
        )
    return tuple(modes)


def nearest_balanced_size(n: int, num_cores: int) -> int:
    """The smallest m >= n that auto_modes can split into `num_cores` balanced modes (a padding suggestion)."""
    m = n
    while True:
        primes = prime_factors(m)
        if len(primes) >= num_cores:
            modes = [1] * num_cores
            for p in sorted(primes, reverse=True):
                modes[min(range(num_cores), key=lambda c: modes[c])] *= p
            if max(modes) <= _MAX_IMBALANCE * m ** (1.0 / num_cores):
                return m
        m += 1


def max_bonds(in_modes: tuple[int, ...], out_modes: tuple[int, ...]) -> list[int]:
    """Largest useful internal bonds: the rank of the unfolding at each cut (min of left and right sizes)."""
    sizes = [i * j for i, j in zip(in_modes, out_modes)]
    total = math.prod(sizes)
    bonds, left = [], 1
    for s in sizes[:-1]:
        left *= s
        bonds.append(min(left, total // left))
    return bonds
