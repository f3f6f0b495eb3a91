"""Fixtures shared by the training tests."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """torch on one thread for the test: tiny models gain nothing from threads, and on a
    busy CPU their waits for each other only add noise."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
