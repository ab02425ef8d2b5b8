import pytest
from technique_helpers import tiny_llama


@pytest.fixture
def llama():
    return tiny_llama()
