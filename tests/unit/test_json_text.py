"""JSON helpers hold up against values nested far deeper than the interpreter's stack."""

import pytest

from app.src.utils import json_provider, json_text


def deep(levels: int, leaf: object) -> object:
    value = leaf
    for _ in range(levels):
        value = {"k": [value]}
    return value


def test_contains_nul_walks_100_000_levels_without_recursion() -> None:
    assert json_text.contains_nul(deep(100_000, "a\x00b")) is True
    assert json_text.contains_nul(deep(100_000, "ab")) is False
    assert json_text.contains_nul({"key\x00": 1}) is True


def test_a_value_too_deep_to_write_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="nested too deeply"):
        json_text.dumps(deep(100_000, 1))


@pytest.mark.parametrize(
    ("raw", "exceeds"),
    [
        (b"[[[1]]]", False),
        (b"[[[[1]]]]", True),
        (b'["[[[[[[", {"a": "}}}}\\"[[[["}]', False),
        (b'[[[["\\\\"]]]]', True),
        (b"[1], [2], [3], [4], [5]", False),
    ],
)
def test_nesting_is_measured_outside_strings(raw: bytes, exceeds: bool) -> None:
    assert json_provider.nesting_exceeds(raw, 3) is exceeds
