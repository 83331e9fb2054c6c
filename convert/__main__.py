"""``python -m convert <step>``: the host toolchain, one step at a time or all of it."""

from __future__ import annotations

import sys

from convert.cli import main

sys.exit(main())
