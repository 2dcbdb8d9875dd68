"""saekit.training: the one training loop, its losses, checkpoints and entry points."""


def __getattr__(name):
    if name in ("train_sae", "run_training", "cache_activations"):
        from saekit.training import run

        return getattr(run, name)
    if name in ("TrainConfig", "DataOptions", "OptimOptions", "RunOptions"):
        from saekit.training import config

        return getattr(config, name)
    raise AttributeError(f"module 'saekit.training' has no attribute {name!r}")
