import pytest
from tiny_cases import FAMILY_CASES


@pytest.fixture(params=FAMILY_CASES)
def case(request):
    """The name of one tiny denoiser case (see tiny_cases.py)."""
    return request.param
