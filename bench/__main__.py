"""``python -m bench``: see :mod:`bench.cli`."""

import os
import sys

# As ``python -m device`` runs (see device/__main__.py): the loop is timed in this process.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from bench.cli import main  # noqa: E402  (after the environment above)

if __name__ == "__main__":
    sys.exit(main())
