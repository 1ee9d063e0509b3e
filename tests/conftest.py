import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models are op-overhead bound and reproducible on one thread; restore the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
