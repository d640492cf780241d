import logging

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


@pytest.fixture
def unconfigured():
    """Logging as in a program that never ran `pladis` (earlier tests here ran cli.main in this process)."""
    logger = logging.getLogger("pladis")
    saved = logger.handlers[:], logger.level
    logger.handlers[:] = [h for h in logger.handlers if not getattr(h, "_pladis", False)]
    logger.setLevel(logging.NOTSET)
    yield
    logger.handlers[:], logger.level = saved[0], saved[1]
