import pytest
from tiny_cases import FAMILY_CASES


@pytest.fixture(params=FAMILY_CASES)
def case(request):
    """The name of one tiny denoiser case (see tiny_cases.py)."""
    return request.param


@pytest.fixture
def eager_op_calls(monkeypatch):
    """A list that grows by one each time the op's eager fast path runs; code a compiler made from the op
    never calls it."""
    from pladis import ops

    calls = []
    eager = ops.fast_attention
    monkeypatch.setattr(ops, "fast_attention", lambda *a: calls.append(1) or eager(*a))
    return calls
