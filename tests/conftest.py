import pytest
import torch

# Deterministic and light on the shared 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)
