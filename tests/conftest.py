"""Shared test set-up.

- tests/ is on sys.path, so that test modules import `helpers`.
- A guard on `torch.testing.assert_close`: comparing float64 tensors at the default (float64)
  tolerances when one side is a float32 result upcast (every entry survives a round trip through
  float32 unchanged, and they are not all integers) holds float32 arithmetic to float64 precision,
  so the test passes or fails with the summation order of the BLAS underneath. Such a comparison
  fails at once, naming the fix: compute both sides in float64, or give float32 tolerances.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

_assert_close = torch.testing.assert_close


def _float32_valued(x) -> bool:
    """A float64 tensor whose finite entries are exactly float32 values, not all integers."""
    if not torch.is_tensor(x) or x.dtype != torch.float64:
        return False
    finite = x.detach()[torch.isfinite(x.detach())]
    if finite.numel() == 0 or torch.equal(finite, finite.round()):
        return False
    return torch.equal(finite.float().double(), finite)


def _assert_close_at_its_precision(actual, expected, *args, **kwargs):
    default_tolerance = not args and kwargs.get("rtol") is None and kwargs.get("atol") is None
    if default_tolerance and (_float32_valued(actual) or _float32_valued(expected)):
        raise AssertionError(
            "assert_close at float64 tolerances on float32 results (upcast to float64): compute "
            "both sides in float64, or pass float32 tolerances (rtol=1.3e-6, atol=1e-5)"
        )
    return _assert_close(actual, expected, *args, **kwargs)


torch.testing.assert_close = _assert_close_at_its_precision
