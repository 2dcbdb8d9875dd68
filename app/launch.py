"""Start the explorer: ``streamlit run`` on the app script that ships inside the package.

The script is found through the installed package (``importlib.resources``), so ``saekit app``
works from a wheel as well as from an editable checkout. The SAE and model choices reach the
script through environment variables (streamlit gives the script no other clean channel that
``AppTest`` can also set).
"""

from __future__ import annotations

import os
import sys
from importlib import resources
from pathlib import Path

from saekit.errors import ConfigError

ENV_SAE, ENV_MODEL = "SAEKIT_APP_SAE", "SAEKIT_APP_MODEL"


def script_path() -> Path:
    """The Streamlit script of the explorer, inside the installed ``saekit.app`` package."""
    return Path(str(resources.files("saekit.app").joinpath("main.py")))


def command(port: int, address: str) -> list[str]:
    """The ``streamlit run`` command line: headless, no usage statistics (no network calls),
    no deploy button."""
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port must be between 1 and 65535, not {port}")
    return [sys.executable, "-m", "streamlit", "run", str(script_path()),
            "--server.port", str(port), "--server.address", address, "--server.headless", "true",
            "--browser.gatherUsageStats", "false", "--global.developmentMode", "false",
            "--client.toolbarMode", "minimal"]


def launch(sae: str | None, model: str | None, port: int = 8501, address: str = "127.0.0.1") -> None:
    """Become the streamlit server (``exec``), so that a signal to ``saekit app`` (Ctrl-C,
    ``kill``) reaches the server itself and leaves no orphaned child behind."""
    env = dict(os.environ)
    for key, value in ((ENV_SAE, sae), (ENV_MODEL, model)):
        if value:
            env[key] = str(Path(value).resolve()) if key == ENV_SAE else value
        else:
            env.pop(key, None)
    cmd = command(port, address)
    print(f"saekit app: http://{address}:{port} (Ctrl-C stops it)", flush=True)
    os.execve(cmd[0], cmd, env)
