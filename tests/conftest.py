import os

# The Triton kernels are tested in Triton's CPU interpreter, which must be switched on before
# anything imports triton; saekit itself only runs Triton when asked (impl="triton") or on CUDA.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tests never reach the network: the embedded model and corpus are local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def model():
    """The embedded model, loaded once for the whole session."""
    from saekit.models import load_model

    return load_model()


@pytest.fixture(autouse=True)
def _reset_saekit_logger():
    """``saekit.cli.main`` gives the "saekit" logger its own stderr handler, level INFO and no
    propagation, for the rest of the process; a later test counting INFO records
    (test_resolve_impl) would then see records logged outside its ``caplog.at_level``.
    Undo it after every test, as a fresh process would start."""
    yield
    import logging

    log = logging.getLogger("saekit")
    log.handlers.clear()
    log.setLevel(logging.NOTSET)
    log.propagate = True
