"""One exception tree for the appliance.

Every leaf also subclasses the builtin a caller would naturally catch
(``ValueError``, ``FileNotFoundError``...), so library-style ``except`` clauses
keep working, while ``main()`` can catch :class:`ScreenError` alone and print a
one-line message instead of a traceback.
"""

from __future__ import annotations


class ScreenError(Exception):
    """Root of every error the appliance raises on purpose."""


class ConfigError(ScreenError, ValueError):
    """The TOML config has an unknown key, a bad value or cannot be read."""


class BundleError(ScreenError, ValueError):
    """The model bundle is missing, corrupt, or its parts disagree."""


class BundleMissingError(BundleError, FileNotFoundError):
    """A file the manifest names is not there."""


class ImageError(ScreenError, ValueError):
    """An input image cannot be decoded or is not a usable smear photograph."""


class RuntimeUnavailableError(ScreenError, ImportError):
    """No TFLite runtime (ai-edge-litert or tflite-runtime) could be imported."""


class CameraError(ScreenError, OSError):
    """The frame source failed (cable, driver, or garbage frames)."""


class StoreError(ScreenError, OSError):
    """The result store could not write (disk full, read-only, locked)."""
