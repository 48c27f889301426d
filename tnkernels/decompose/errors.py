"""Exception types shared by the decompositions and the conversion code."""


class RatioUnreachableError(ValueError):
    """A requested compression ratio cannot be reached by this layer's structure (even at the smallest ranks)."""
