"""Shared fixtures."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """Run a test on one CPU thread and restore the count after it: the tensors of most unit
    tests are tiny, and one thread avoids thread hand-offs on a busy (CI: two-core) machine.
    A module uses it for every test with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
