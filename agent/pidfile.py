"""Writing our PID into a lock file we hold (pidlock.py's locks and the modem port's,
transport/at.py). Apart from pidlock.py so that opening a modem port does not compile and build
what only reporting a lock's holder needs (issue #8: every CLI command opens one)."""
from __future__ import annotations

import os


def write_pid(fd: int) -> None:
    """Our PID as the lock file's first line, in a fixed width so the next holder overwrites it in
    place: truncating a non-empty file is a journalled metadata change, which took up to 20 ms
    on every command when the disk was busy (the simulated modem saving its state). A shorter
    old file (an older version's) is cut once."""
    data = f"{os.getpid():<10}\n".encode()
    try:
        os.pwrite(fd, data, 0)
        if os.fstat(fd).st_size > len(data):
            os.ftruncate(fd, len(data))
    except OSError:
        pass
