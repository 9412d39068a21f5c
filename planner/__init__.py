"""memplan's planner: the reference step, the machine that replays and compiles it, the layouts
that compose ranks and stages, the catalog and the routes' planners.

numpy's OpenBLAS is held to one thread before numpy is first imported. The planner's matrix
products are small; a BLAS worker thread buys nothing on them, and OpenBLAS can deadlock at
process exit when that thread is still going to sleep after a product (``blas_thread_shutdown_``
joins a thread that missed its wake-up), which left a finished ``memplan estimate`` hanging. A
value set by the user (``OPENBLAS_NUM_THREADS``) is kept.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
