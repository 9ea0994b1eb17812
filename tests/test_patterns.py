import pytest

from prunescope.errors import PrunescopeError
from prunescope.pruning.patterns import SparsityPattern, parse_pattern


@pytest.mark.parametrize(
    "text, sparsity, expected",
    [
        ("unstructured", None, SparsityPattern(0.5)),
        ("unstructured", 0.3, SparsityPattern(0.3)),
        ("0.7", None, SparsityPattern(0.7)),
        ("25%", None, SparsityPattern(0.25)),
        ("2:4", None, SparsityPattern(0.5, 2, 4)),
        ("4:8", 0.5, SparsityPattern(0.5, 4, 8)),
        (" 1:4 ", None, SparsityPattern(0.25, 1, 4)),
    ],
)
def test_parse_pattern(text, sparsity, expected):
    assert parse_pattern(text, sparsity) == expected


def test_labels_and_compatibility():
    nm = parse_pattern("2:4")
    assert nm.is_nm and nm.label == "2:4"
    assert nm.compatible(8) and not nm.compatible(6)
    un = parse_pattern("unstructured", 0.5)
    assert not un.is_nm and un.label == "unstructured" and un.compatible(7)


@pytest.mark.parametrize(
    "text, sparsity, message",
    [
        ("3:2", None, "0 < N < M"),
        ("0:4", None, "0 < N < M"),
        ("4:4", None, "0 < N < M"),
        ("2:x", None, "bad N:M pattern '2:x'"),
        ("half", None, "bad sparsity pattern 'half'"),
        ("1.5", None, "sparsity must be in (0, 1)"),
        ("unstructured", 0.0, "sparsity must be in (0, 1)"),
        ("unstructured", 1.0, "sparsity must be in (0, 1)"),
        ("2:4", 0.7, "contradicts pattern '2:4'"),
    ],
)
def test_bad_patterns(text, sparsity, message):
    with pytest.raises(PrunescopeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_pattern(text, sparsity)
