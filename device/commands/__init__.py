"""The ``python -m device`` commands other than ``run``, one module per group; ``device.cli`` parses the
command line and calls them. Each ``cmd_*`` takes the parsed arguments and returns the exit code.
"""

from __future__ import annotations

import os

from device import config as config_mod

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def config_path(path: str | None) -> str | None:
    """``--config``, else ``$LEUKOSCREEN_CONFIG``, else None (the built-in defaults)."""
    return path or os.environ.get("LEUKOSCREEN_CONFIG") or None


def load_config(path: str | None) -> config_mod.Config:
    return config_mod.load(config_path(path))
