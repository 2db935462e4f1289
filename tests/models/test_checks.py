import numpy as np
import pytest

from attnx.models.checks import (
    check_at_least,
    check_none_or_at_least,
    check_probability,
    check_rate,
    check_tokens,
)


def test_check_tokens_passes_integer_matrices_and_names_what_is_wrong():
    tokens = check_tokens("M.decode", [[1, 2], [3, 4]], batch=2)
    assert tokens.shape == (2, 2) and tokens.dtype.kind == "i"
    with pytest.raises(ValueError, match=r"^M.encode: tokens must be integers \[batch, length\]"):
        check_tokens("M.encode", np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"must be integers \[batch, length\], got int32\[3\]"):
        check_tokens("M.encode", np.zeros(3, np.int32))
    with pytest.raises(ValueError, match=r"M.step: tokens must be integers \[batch=3, 1\]"):
        check_tokens("M.step", np.zeros((3, 2), np.int32), batch=3, length=1)
    with pytest.raises(ValueError, match=r"^Enc: src must be integers \[batch=3, length\]"):
        check_tokens("Enc", np.zeros((2, 2), np.int32), batch=3, name="src")


def test_range_checks_name_the_field_and_the_value():
    check_at_least("C", a=1, b=5)
    check_at_least("C", minimum=0, layers=0)
    check_none_or_at_least("C", a=None, b=1)
    check_rate("C", dropout_rate=0.0, label_smoothing=0.99)
    check_probability("C", p=1.0)
    with pytest.raises(ValueError, match=r"^C: b must be >= 1, got 0$"):
        check_at_least("C", a=1, b=0)
    with pytest.raises(ValueError, match=r"^C: layers must be >= 0, got -1$"):
        check_at_least("C", minimum=0, layers=-1)
    with pytest.raises(ValueError, match=r"^C: b must be None or >= 1, got 0$"):
        check_none_or_at_least("C", b=0)
    with pytest.raises(ValueError, match=r"^C: dropout_rate must be in \[0, 1\), got 1.0$"):
        check_rate("C", dropout_rate=1.0)
    with pytest.raises(ValueError, match=r"^C: p must be in \[0, 1\], got -0.1$"):
        check_probability("C", p=-0.1)
