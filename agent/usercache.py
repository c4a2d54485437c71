"""The user's cache directory: where the agent keeps what it can rebuild (the compiled
ASN.1 tables, asn1tables.py; what a configuration file says about the daemon's socket,
quick.py), whom a cached file may be trusted from, and writing one atomically.

Only the standard library's os at import (a command's start-up imports this; issue #8).
"""
from __future__ import annotations

import os


def dirs():
    """User cache first ($XDG_CACHE_HOME or ~/.cache), then a per-user temp dir
    (yielded lazily so the common case never imports tempfile)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    yield os.path.join(base, "esim-agent")
    yield _tmp_dir()


def _tmp_dir() -> str:
    import tempfile   # lazily: only needed when the user cache is unusable
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return os.path.join(tempfile.gettempdir(), f"esim-agent-{uid}")


def trusted(path) -> bool:
    """A cached file we may act on: owned by us, in a directory we own, neither writable by
    others (the fallback lives under the shared /tmp, where anyone may create names)."""
    if not hasattr(os, "getuid"):
        return True
    try:
        for st in (os.stat(os.path.dirname(path)), os.stat(path)):
            if st.st_uid != os.getuid() or st.st_mode & 0o022:
                return False
    except OSError:
        return False
    return True


def trusted_dir(d) -> bool:
    if not hasattr(os, "getuid"):
        return True
    try:
        st = os.stat(d)
    except OSError:
        return False
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def store(path, blob: bytes, *, prefix: str = ".cache-") -> bool:
    """Write ``blob`` to ``path`` atomically (a temporary file in the same directory, then a
    rename: a concurrent reader sees the old file or the new one, never half of one).
    False when the directory cannot be made, is not ours, or the write fails."""
    try:
        parent = os.path.dirname(path)
        os.makedirs(parent, mode=0o700, exist_ok=True)
        if not trusted_dir(parent):
            return False
        import tempfile
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=prefix, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return True
    except OSError:
        return False


def sha256():
    """hashlib.sha256 without importing hashlib (which loads OpenSSL's libcrypto: ~4 ms and
    ~3.5 MB of RSS for a CLI command that needs no TLS). Same digest."""
    try:
        from _sha2 import sha256 as make          # Python >= 3.12
    except ImportError:
        try:
            from _sha256 import sha256 as make    # Python 3.11
        except ImportError:
            from hashlib import sha256 as make
    return make()
