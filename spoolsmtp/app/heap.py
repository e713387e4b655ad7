"""The cyclic garbage collector, set for a long-running worker.

A worker allocates and frees a great many small objects per envelope but makes few reference
cycles: a 10,000-envelope run of two delivery processes freed about 800 objects by collection.
With CPython's defaults (a young collection every 700 net allocations) each delivery process
spent 0.49-0.55 s of about 9.5 s of CPU in the collector over 5,000 envelopes, a full
collection walking every module and configuration object loaded at start-up (about 50 ms
each, the event loop stopped meanwhile). Benchmarks, the eighth session, has the figures.
"""

from __future__ import annotations

import gc

# the three thresholds as CPython 3.11 to 3.13 read them (an incremental collector, where one
# ships, reads the second and third differently)
YOUNG = 20_000  # net allocations between young collections (CPython's default: 700)
MIDDLE = 20  # young collections between middle ones (default 10)
OLD = 100  # middle collections between full ones (default 10; CPython also waits until a
# quarter more objects are long-lived than at the last full collection)


def settle() -> None:
    """Once start-up has loaded what the process keeps (modules, the configuration): that is
    moved out of the collector's generations (``gc.freeze``), so no collection walks it
    again, and collections come less often. No collection runs first: it took 30 ms of each
    process's start-up (a restart after kill -9 too) to free a handful of objects, which
    now stay. Cycles made later are still collected, and a frozen object is still freed
    when its last reference goes."""
    gc.freeze()
    gc.set_threshold(YOUNG, MIDDLE, OLD)
