"""The exceptions saekit raises for bad input. Each message is one line that names the
problem and the fix; the CLI prints it and exits with code 2."""


class SaekitError(ValueError):
    """Base class of saekit's bad-input errors."""


class ModelLoadError(SaekitError):
    """A model could not be loaded."""


class DataSourceError(SaekitError):
    """A token source could not be opened or read."""


class HookError(SaekitError):
    """A hook name does not exist on the model."""


class ConfigError(SaekitError):
    """A configuration value is invalid or inconsistent."""


class SAEFileError(SaekitError):
    """An SAE or checkpoint file is missing, corrupt, or of an unknown layout."""


class DeviceError(SaekitError):
    """The device cannot run what was asked: it is not on this machine, or its torch build
    cannot compute in the dtype asked for."""


class MismatchError(SaekitError):
    """An SAE does not fit the model or hook it is used with."""


class DeviceMapError(ModelLoadError):
    """A device map leaves part of the model without a device."""
