"""``python -m device``: see :mod:`device.cli`."""

import os
import sys

# One BLAS thread, set before numpy is imported: numpy's OpenBLAS otherwise starts a thread per core for the
# per-field matrix products (the luma of a 224 px image, the head), and their spin-waits take the cores the
# interpreter's threads need (issue 13: 5 ms of CPU per field on a 2-core box). The products are tiny; the numbers
# are the same (checked on every frame of tests/device/test_prepare_identical.py, through the head). An explicit
# setting in the environment is kept.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from device.cli import main  # noqa: E402  (after the environment above)

if __name__ == "__main__":
    sys.exit(main())
