"""Keys and certificates loaded from the files settings name, reloaded when a file changes."""

from __future__ import annotations

import os
import threading
from typing import Any


class FileCache:
    """Objects loaded from files, reloaded when a file's mtime, size or inode changes.

    Keys and certificates are read on request paths (signing, issuance, CRLs); re-reading
    and re-parsing them every time would be wasted work, and a replaced file must still be
    picked up without a restart.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, ...], tuple[tuple[int, ...], Any]] = {}

    def get(self, paths: tuple[str, ...], load: Any) -> Any:
        stamp: tuple[int, ...] = ()
        for path in paths:
            stat = os.stat(path)
            stamp += (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        with self._lock:
            cached = self._entries.get(paths)
            if cached is not None and cached[0] == stamp:
                return cached[1]
        value = load()
        with self._lock:
            self._entries[paths] = (stamp, value)
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


# The one cache of this process: the signing key and the CA files.
loaded_files = FileCache()


def reset_file_cache() -> None:
    """Forget loaded keys and CA files (tests that swap settings call this)."""
    loaded_files.clear()
