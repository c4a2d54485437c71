"""Persistent state of the local eIM (test bed): one JSON document under DIR/eim/.

What the eIM knows survives a restart: the eUICCs it learnt (EID, certificates, profiles,
the last eUICC-package counter used for each), the operations scheduled through its REST
API and the packages in flight. ``EimStore`` is a plain dict behind an RLock; callers
mutate ``data`` inside ``with store:`` and the block's end writes the file atomically
(temporary file, fsync, rename). A lock file held for the store's lifetime keeps a second
eIM from writing the same state (two servers would hand out the same counters).
"""
from __future__ import annotations

import fcntl
import json
import os
import threading

from ..errors import InputError

STATE_VERSION = 1


class EimStore:
    def __init__(self, path: str | None):
        self.path = os.fspath(path) if path else None
        self._lock = threading.RLock()
        self._depth = 0
        self._lockfd: int | None = None
        if self.path:
            self._take_file_lock()
        try:
            self.data = self._load()
        except BaseException:
            self.close()
            raise
        for key, empty in (("euiccs", {}), ("operations", {}), ("notifications", [])):
            self.data.setdefault(key, empty)
        self.data.setdefault("next_euicc_id", 1)

    # --- locking and persistence -------------------------------------------------------

    def _take_file_lock(self) -> None:
        lock_path = self.path + ".lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise InputError(f"cannot open the eIM state lock {lock_path}: {e.strerror or e}",
                             code="sim_state_write") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise InputError(f"another local eIM is using {self.path}: stop it first, or give this one "
                             "another PKI directory", code="sim_state_busy") from None
        self._lockfd = fd

    def _load(self) -> dict:
        if not self.path or not os.path.exists(self.path):
            return {"version": STATE_VERSION}
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read the eIM state {self.path}: {e}; delete it to start afresh",
                             code="sim_state_unreadable") from None
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise InputError(f"the eIM state {self.path} is not a version-{STATE_VERSION} state; delete it",
                             code="sim_state_corrupt")
        return data

    def save(self) -> None:
        if not self.path:
            return
        with self._lock:
            text = json.dumps(self.data, indent=1)
            tmp = f"{self.path}.tmp{os.getpid()}"
            try:
                with open(tmp, "w", encoding="utf-8") as f:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except OSError as e:
                raise InputError(f"cannot write the eIM state {self.path}: {e.strerror or e}",
                                 code="sim_state_write") from None

    def __enter__(self) -> dict:
        self._lock.acquire()
        self._depth += 1
        return self.data

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._depth -= 1
            if self._depth == 0:
                self.save()
        finally:
            self._lock.release()

    def close(self) -> None:
        if self._lockfd is not None:
            try:
                fcntl.flock(self._lockfd, fcntl.LOCK_UN)
            finally:
                os.close(self._lockfd)
                self._lockfd = None
