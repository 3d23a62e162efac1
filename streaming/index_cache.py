"""The serving index: loaded once per version, swapped only at a micro-batch boundary.

``--index`` names either an index directory, or a *pointer*: a directory holding a ``CURRENT`` file
whose one line names the version directory (relative to it, or absolute), or a symlink to the version
directory. Publishing a new version = build it beside the old one, then atomically replace the
pointer (write ``CURRENT.tmp`` and rename it, or ``ln -sfn``). The job re-resolves the pointer at each
micro-batch boundary (a ``stat`` and a small read), loads a new version in a background thread (so a
slow load never stalls serving), and swaps when it is ready. A version that fails to load (corrupt,
checksum mismatch) or is incompatible with the serving one (another samples-per-signal) is refused:
the old version keeps serving, and the refusal is logged once and counted.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from batch_index.errors import EcgSearchError, IndexFormatError
from batch_index.index_files import MANIFEST
from batch_index.search import SearchIndex

logger = logging.getLogger(__name__)

POINTER_FILE: Final[str] = "CURRENT"
Loader = Callable[[Path], SearchIndex]


def resolve_index(path: str | Path) -> Path:
    """The version directory that ``path`` designates now (follows ``CURRENT`` files and symlinks)."""
    p = Path(path)
    if not p.exists():
        raise IndexFormatError(f"index path {str(p)!r} does not exist")
    if not p.is_dir():
        raise IndexFormatError(f"index path {str(p)!r} is not a directory; expected an index directory or a "
                               f"directory holding a {POINTER_FILE} file that names one")
    pointer = p / POINTER_FILE
    if pointer.is_file():
        try:
            name = pointer.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise IndexFormatError(f"cannot read index pointer {str(pointer)!r}: {e}") from e
        if not name:
            raise IndexFormatError(f"index pointer {str(pointer)!r} is empty; expected a version directory")
        target = (p / name).resolve()
        if not Path(name).is_absolute() and target.parent != p.resolve():
            raise IndexFormatError(f"index pointer {str(pointer)!r} names {name!r}; expected a directory "
                                   f"directly inside {str(p)!r} (or an absolute path)")
        if not target.is_dir():
            raise IndexFormatError(f"index pointer {str(pointer)!r} names {name!r}, which is not a directory")
        return target
    return p.resolve()


@dataclass
class IndexHolder:
    """Holds the index serving now; :meth:`current` is called at each micro-batch boundary."""

    path: Path
    loader: Loader = field(default=lambda path: SearchIndex.load(path).warm())
    reloads: int = 0
    refused: int = 0
    _index: SearchIndex | None = None
    _dir: Path | None = None
    _loading: threading.Thread | None = None
    _ready: tuple[Path, SearchIndex] | None = None
    _bad: set[tuple[Path, float]] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def load_initial(self) -> SearchIndex:
        """Load the version the pointer names now, synchronously; raises if it cannot be served."""
        target = resolve_index(self.path)
        self._index, self._dir = self.loader(target), target
        logger.info("serving index %s from %s (%d signals, dim %d)", self._index.version, target,
                    self._index.size, self._index.dim)
        return self._index

    def current(self) -> SearchIndex:
        """The index to answer this micro-batch with (a newly published version once it has loaded)."""
        if self._index is None:
            return self.load_initial()
        with self._lock:
            ready, self._ready = self._ready, None
        if ready is not None:
            old = self._index.version
            self._dir, self._index = ready
            self.reloads += 1
            logger.info("index upgraded at batch boundary: %s -> %s (%s)", old, self._index.version, self._dir)
        self._maybe_start_reload()
        return self._index

    def wait_idle(self, timeout: float | None = None) -> None:
        """Wait for a background load to finish (tests and shutdown)."""
        t = self._loading
        if t is not None:
            t.join(timeout)

    def _maybe_start_reload(self) -> None:
        if self._loading is not None and self._loading.is_alive():
            return
        try:
            target = resolve_index(self.path)
        except IndexFormatError as e:
            self._refuse(Path(self.path), str(e))
            return
        if target == self._dir or self._known_bad(target):
            return
        self._loading = threading.Thread(target=self._load, args=(target,), name="index-loader", daemon=True)
        self._loading.start()

    def _load(self, target: Path) -> None:
        try:
            idx = self.loader(target)
            assert self._index is not None
            if idx.dim != self._index.dim:
                raise IndexFormatError(f"it has {idx.dim} samples per signal; the serving index has "
                                       f"{self._index.dim} (restart the job to change the query length)")
        except (EcgSearchError, OSError, ValueError) as e:
            self._refuse(target, str(e))
            return
        with self._lock:
            self._ready = (target, idx)

    def _known_bad(self, target: Path) -> bool:
        return (target, _mtime(target)) in self._bad

    def _refuse(self, target: Path, why: str) -> None:
        key = (target, _mtime(target))
        if key not in self._bad:
            self._bad.add(key)
            self.refused += 1
            logger.error("refusing new index version %s: %s; still serving %s", target, why,
                         None if self._index is None else self._index.version)


def _mtime(p: Path) -> float:
    """Changes when a refused version is rebuilt in place (the manifest is written last)."""
    try:
        return max(os.stat(p).st_mtime, os.stat(p / MANIFEST).st_mtime)
    except OSError:
        return -1.0


_CACHE: dict[str, IndexHolder] = {}


def holder_for(path: str | Path) -> IndexHolder:
    """The process-wide holder of ``path`` (one per process, so each version is loaded once)."""
    key = str(Path(path).resolve())
    if key not in _CACHE:
        _CACHE[key] = IndexHolder(Path(path))
    return _CACHE[key]
