import os

import pytest
import torch

# Tests never reach the network: the embedded model and corpus are local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def model():
    """The embedded model, loaded once for the whole session."""
    from saekit.models import load_model

    return load_model()
