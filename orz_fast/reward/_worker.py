"""Entry point of a verifier worker process: ``python -m orz_fast.reward._worker IN_FD OUT_FD SOFT_TIMEOUT MEM``."""

import os
import sys
from multiprocessing.connection import Connection

from orz_fast.reward.verify import worker_main

if __name__ == "__main__":
    worker_main(
        Connection(int(sys.argv[1]), writable=False),
        Connection(int(sys.argv[2]), readable=False),
        float(sys.argv[3]),
        int(sys.argv[4]),
    )
    os._exit(0)  # skip interpreter teardown (sympy's caches make it slow); there is nothing to flush
