"""Suite-wide test settings."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models run faster on one thread than on two contending ones (measured: 4m51s -> 35s for the
    Perceiver tests on a loaded 2-core machine); every test gets one and the setting is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
