"""Test-wide settings.

Results must not depend on how many threads the machine gives torch: a matmul's reduction order
changes with the thread count, and 3 Adam steps amplify that rounding past the layout tests' 1e-5
tolerance (1.6e-5 was seen with the default threads on a busy machine). So every test process, and
every process it starts, runs torch on one thread: the ranks of ``parallel.testing.run_distributed``
pin themselves, and this pins the pytest process (the single-process references) and, through
``OMP_NUM_THREADS``, the subprocesses the tests launch.
"""
import os

os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

torch.set_num_threads(1)
