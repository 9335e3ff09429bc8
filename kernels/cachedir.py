"""Where the kernels keep what they write at run time: Numba's compiled machine code and the auto backend's
stored decisions.

The user cache directory: $VITNP_CACHE_DIR, else $XDG_CACHE_HOME/vitnp, else ~/.cache/vitnp, created on demand.
Never the installed package: Numba's default places a module's cache in the `__pycache__` beside its source,
which fails on a read-only install (system packages, container images) and leaves a folder behind in
site-packages on uninstall, one that then shadows a later editable install of the same package as a namespace
package.  When no cache directory is writable, kernels compile into a directory of this process's own that is
removed at exit (compiled in memory, in effect; the warm-up's helper processes share it), and a warning says so
once.
"""
from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile

from numba.core import caching

ENV_VAR = "VITNP_CACHE_DIR"
NUMBA_SUBDIR = "numba"
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_log = logging.getLogger("vitnp")
_fallback: list[str] = []   # this process's own cache root, once the user's turned out not to be writable
_writable: dict[str, str | None] = {}  # kernel cache directory -> None if writable, else why not (probed once)


def cache_root() -> str:
    """The directory vitnp writes its caches under (not created here)."""
    root = os.environ.get(ENV_VAR)
    if root:
        return os.path.abspath(os.path.expanduser(root))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vitnp")


def _probe(path: str) -> str | None:
    """None if `path` can be created and written to, else why not."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        return e.strerror or str(e)
    return None


def root_in_use() -> str:
    """The cache root this process writes compiled kernels under: cache_root() if its kernel directory is
    writable, else this process's own temporary one (created, with a warning, the first time)."""
    root = cache_root()
    path = os.path.join(root, NUMBA_SUBDIR)
    if path not in _writable:
        _writable[path] = _probe(path)
    if _writable[path] is None:
        return root
    if not _fallback:
        _fallback.append(tempfile.mkdtemp(prefix="vitnp-cache-"))
        atexit.register(shutil.rmtree, _fallback[0], ignore_errors=True)
        _log.warning("vitnp: no writable kernel cache (%s: %s); kernels are compiled for this process only. "
                     "Set %s to a writable directory to keep them.", path, _writable[path], ENV_VAR)
    return _fallback[0]


def numba_cache_dir() -> str:
    """Where the compiled kernels go: the user cache if it is writable, else a directory of this process's."""
    return os.path.join(root_in_use(), NUMBA_SUBDIR)


class KernelCacheLocator(caching.UserProvidedCacheLocator):
    """Numba cache locator for the functions defined in this package's files, and only those."""

    def __init__(self, py_func, py_file):
        super().__init__(py_func, py_file)
        self._cache_path = os.path.join(numba_cache_dir(), self.get_suitable_cache_subpath(py_file))

    @classmethod
    def from_function(cls, py_func, py_file):
        path = os.path.abspath(py_file)
        if os.path.commonpath([path, _PACKAGE_DIR]) != _PACKAGE_DIR:
            return None  # somebody else's function: Numba's own locators decide
        self = cls(py_func, py_file)
        try:
            self.ensure_cache_path()
        except OSError:  # writable when probed, no longer now: this process's own directory then
            _writable[os.path.join(cache_root(), NUMBA_SUBDIR)] = "not writable"
            self = cls(py_func, py_file)
            self.ensure_cache_path()
        return self


def install_locator() -> None:
    """Put KernelCacheLocator first in Numba's list, before any kernel is decorated (idempotent).  Numba has no
    public hook for this; the list is read each time a cached function is created."""
    locators = caching.CacheImpl._locator_classes
    if KernelCacheLocator not in locators:
        locators.insert(0, KernelCacheLocator)
