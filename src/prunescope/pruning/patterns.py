"""Sparsity patterns, parsed once at the edge: unstructured fractions and N:M groups.

Forms accepted by :func:`parse_pattern` (as users type them):

- ``"unstructured"``: unstructured sparsity, the fraction given separately (``--sparsity``);
- ``"0.5"`` or ``"50%"``: unstructured sparsity with that fraction;
- ``"N:M"`` with integers ``0 < N < M``: in every group of ``M`` consecutive weights along the
  input dimension of a Linear weight (``[out, in]``), the ``N`` least important are zeroed
  (``2:4`` and ``4:8`` are 50%). Groups never straddle rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from prunescope.errors import PrunescopeError

UNSTRUCTURED = "unstructured"


@dataclass(frozen=True)
class SparsityPattern:
    """What to zero: a fraction of all weights, or ``n`` of every ``m`` along the input dimension.

    Attributes:
        sparsity: fraction of weights to zero, in (0, 1); ``n / m`` for N:M.
        n: zeros per group (N:M only; 0 for unstructured).
        m: group size along the input dimension (N:M only; 0 for unstructured).
    """

    sparsity: float
    n: int = 0
    m: int = 0

    def __post_init__(self) -> None:
        if self.m or self.n:
            if not 0 < self.n < self.m:
                raise PrunescopeError(
                    f"N:M pattern needs integers 0 < N < M, got {self.n}:{self.m}; e.g. 2:4 or 4:8"
                )
        if not 0.0 < self.sparsity < 1.0:
            raise PrunescopeError(f"sparsity must be in (0, 1), got {self.sparsity}")

    @property
    def is_nm(self) -> bool:
        """True for an N:M pattern."""
        return self.m > 0

    @property
    def label(self) -> str:
        """``"unstructured"`` or ``"N:M"``, as written in reports."""
        return f"{self.n}:{self.m}" if self.is_nm else UNSTRUCTURED

    def compatible(self, in_features: int) -> bool:
        """Whether a weight with ``in_features`` columns can take this pattern."""
        return not self.is_nm or in_features % self.m == 0

    @classmethod
    def nm(cls, n: int, m: int) -> "SparsityPattern":
        """An N:M pattern (validated)."""
        if not 0 < n < m:
            raise PrunescopeError(
                f"N:M pattern needs integers 0 < N < M, got {n}:{m}; e.g. 2:4 or 4:8"
            )
        return cls(sparsity=n / m, n=n, m=m)


def _parse_nm(text: str) -> SparsityPattern:
    left, _, right = text.partition(":")
    try:
        n, m = int(left.strip()), int(right.strip())
    except ValueError:
        raise PrunescopeError(
            f"bad N:M pattern {text!r}; N and M must be integers with 0 < N < M, e.g. 2:4 or 4:8"
        ) from None
    return SparsityPattern.nm(n, m)


def _parse_fraction(text: str) -> float:
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise PrunescopeError(
            f"bad sparsity pattern {text!r}; use 'unstructured', a fraction like 0.5 or 50%, "
            "or N:M like 2:4"
        ) from None
    return value


def parse_pattern(text: str, sparsity: float | None = None) -> SparsityPattern:
    """Parse a pattern string, combined with an optional separate ``sparsity``.

    Args:
        text: ``"unstructured"``, a fraction (``"0.5"``, ``"50%"``) or ``"N:M"``.
        sparsity: the fraction from ``--sparsity``; needed for ``"unstructured"`` (default 0.5),
            and if given with a fraction or N:M it must agree with it.

    Raises:
        PrunescopeError: a malformed pattern (``3:2``, ``0:4``, ``2:x``), a fraction outside
            (0, 1), or a ``sparsity`` that contradicts the pattern.
    """
    raw = text.strip().lower()
    if raw == UNSTRUCTURED:
        return SparsityPattern(0.5 if sparsity is None else sparsity)
    pattern = _parse_nm(raw) if ":" in raw else SparsityPattern(_parse_fraction(raw))
    if sparsity is not None and abs(sparsity - pattern.sparsity) > 1e-9:
        raise PrunescopeError(
            f"--sparsity {sparsity} contradicts pattern {text!r} (which means "
            f"{pattern.sparsity:g}); leave --sparsity out or make them agree"
        )
    return pattern
