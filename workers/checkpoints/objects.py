"""Checkpoints in object storage (``s3://``, ``gs://``), read through fsspec.

The seam between "where checkpoints live" and everything that reads them is one object, the
:class:`Mirror`: a local tree of **sparse placeholders**, one per object under a run's prefix,
each with the object's size (``ftruncate``: no byte is stored) and its last-modified time.
Discovery, completeness, fingerprints and the readers then work on the mirror exactly as they
work on a run folder — the same names, sizes, depth limits, refusals — and the only thing that
differs is where a file's *bytes* come from: :class:`ObjectConfinement`, the
:class:`~alphawatch.workers.checkpoints.confine.Confinement` every reader already opens files
through, opens a placeholder as the object itself:

- ``.safetensors`` files and small side files (JSON, trackers) by **ranged reads** (one GET per
  read: the 8-byte prefix, the header, then one tensor at a time — memory bounded by the largest
  tensor, nothing downloaded whole); a tensor of at least two :data:`PART_BYTES` is fetched as
  parts of that size, :data:`PART_THREADS` ranged GETs at a time, each written straight into the
  tensor's buffer (one S3 stream gives ~100 MB/s; a 2 GB vocabulary matrix needs several);
- everything else (torch pickles, DCP ``.metadata`` and ``.distcp``) through a **bounded
  spool**: downloaded once into the placeholder, refused when it holds more or fewer bytes
  than listed (a size lie) or when the checkpoint's spooled bytes pass ``spool_max_bytes``,
  then read by the local readers with every local check (``weights_only``, size checks, bombs).

The one exception to "nothing downloaded whole, nothing kept past its analysis": the base
checkpoints of update spectra, read whole by every analysis, are downloaded once into the
worker's :class:`LocalCopies`, within their bound, and read from disk afterwards, whatever
their format (safetensors are then not read by ranges, pickles and DCP files not spooled
again): with ``deltas`` "init" the run's first checkpoint; with "prev" or "distances" the
checkpoint in hand itself, as it is read, so that the next checkpoint's analysis finds its
previous one on disk.

A listing is the only request a settled run costs: :meth:`Mirror.sync` lists the prefix
(one LIST per 1,000 objects) and touches a placeholder only when its object's (size, ETag /
generation, last-modified) changed, so an idle run keeps its folders' stamps and its
placeholders' inodes, and the watcher's memory (:mod:`~alphawatch.workers.checkpoints.memory`)
skips it with no further request. See docs/CHECKPOINTS.md, "Object storage".

Confinement: a run's URL must lie under an allowed URL prefix (or be named on the command
line); the mirror holds only the objects under that URL, keys with an empty, ``.`` or ``..``
segment are refused, and nothing but a placeholder's own object is ever requested.

Credentials come only from each cloud's standard chain (environment, profile, instance or
workload identity; ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` for S3-compatible stores):
nothing here reads, stores or logs them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
import weakref
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from alphawatch.locations import ObjectURL, url_allowed
from alphawatch.workers.checkpoints.confine import Confinement, OutsideRootError
from alphawatch.workers.checkpoints.errors import CheckpointError, CheckpointVanished, shown

RANGED_SUFFIXES = (".safetensors", ".json", ".txt", ".yaml", ".yml", ".md")
"""Placeholders read by ranged reads; any other file is spooled whole before it is read."""
NO_SUFFIX_RANGED = ("latest", "latest_checkpointed_iteration.txt")
"""Tracker files without a suffix (DeepSpeed's ``latest``): small, read by a ranged read."""

SPOOL_MAX_BYTES = 64 * 1024**3
"""Default bound of one analysis's spool (``ALPHAWATCH_SPOOL_MAX_MB``)."""
_CHUNK = 8 * 1024 * 1024
PART_BYTES = 32 * 1024 * 1024
"""A read of at least two of these is made of concurrent ranged GETs of this size."""
PART_THREADS = 8
"""Ranged GETs of one read in flight at once (S3 and GCS serve each stream at ~100 MB/s)."""
_PARTS: concurrent.futures.ThreadPoolExecutor | None = None
_PARTS_LOCK = threading.Lock()


def _part_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _PARTS
    with _PARTS_LOCK:
        if _PARTS is None:
            _PARTS = concurrent.futures.ThreadPoolExecutor(
                PART_THREADS, thread_name_prefix="alphawatch-object-part"
            )
        return _PARTS


NAME_MAX = 255
log = logging.getLogger(__name__)


class ObjectStoreError(CheckpointError):
    """The store could not be listed or read (no credentials, no bucket, no network)."""


def _missing_extra(scheme: str) -> ObjectStoreError:
    package = "s3fs" if scheme == "s3" else "gcsfs"
    return ObjectStoreError(
        Path(scheme),
        f"reading {scheme}:// needs {package}: pip install 'alphawatch[cloud]'",
    )


@dataclass
class Requests:
    """Requests made to a store, by kind: what an idle poll costs (docs/CHECKPOINTS.md)."""

    lists: int = 0
    heads: int = 0
    gets: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, *, lists: int = 0, heads: int = 0, gets: int = 0) -> None:
        with self.lock:
            self.lists += lists
            self.heads += heads
            self.gets += gets

    def total(self) -> int:
        return self.lists + self.heads + self.gets


class Store(Protocol):
    """What a mirror needs of a store: a listing, and a file to read by ranges."""

    def list(self, url: ObjectURL) -> dict[str, _Object]: ...

    def open(self, url: ObjectURL, listed: _Object) -> Any: ...


class ObjectStore:
    """One fsspec file system for a URL scheme, with listings never cached by fsspec (the
    mirror keeps its own) and every request counted in :attr:`requests`."""

    def __init__(self, scheme: str) -> None:
        try:
            import fsspec

            self.fs: Any = fsspec.filesystem(
                "s3" if scheme == "s3" else "gcs",
                skip_instance_cache=True,
                use_listings_cache=False,
                **_endpoint(scheme),
            )
        except ImportError as exc:
            raise _missing_extra(scheme) from exc
        self.scheme = scheme
        self.requests = Requests()

    def list(self, url: ObjectURL) -> dict[str, _Object]:
        """Every object at or below ``url``: its key relative to ``url`` ("" for ``url``
        itself), size, version and modification time. One LIST per 1,000 objects.

        Raises:
            ObjectStoreError: the store refused the listing (the message names the URL and the
                store's reason, never a credential).
        """
        base = url.partition("://")[2]
        try:
            found = self.fs.find(base, detail=True, withdirs=False)
        except FileNotFoundError:
            found = {}
        except Exception as exc:
            self.requests.add(lists=1)
            raise ObjectStoreError(
                Path(url.name), f"cannot list {url}: {type(exc).__name__}: {exc}"
            ) from exc
        self.requests.add(lists=max(1, -(-len(found) // 1000)))
        listed: dict[str, _Object] = {}
        for key, info in found.items():
            key = key.rstrip("/")
            if key == base:
                relative = ""
            elif key.startswith(base + "/"):
                relative = key[len(base) + 1 :]
            else:
                continue  # a sibling that shares the prefix's text ("run" and "run2")
            if info.get("type") == "directory":
                continue
            version = _version(info)
            listed[relative] = _Object(
                int(info.get("size") or 0),
                version,
                _stamp(info, version),
                str(info.get("generation") or ""),
            )
        return listed

    def open(self, url: ObjectURL, listed: _Object) -> Any:
        """A read-only file of ``url`` whose every read is one ranged GET (no read-ahead), at
        its listed size and version: no HEAD is made, and a read of an object replaced since
        it was listed fails (S3: its ETag no longer matches; GCS: its generation is gone)
        instead of mixing two versions."""
        return _Counted(lambda: self._open(url, listed), self.requests, url)

    def _open(self, url: ObjectURL, listed: _Object) -> Any:
        path = url.partition("://")[2]
        try:
            handle = self.fs.open(
                path, "rb", cache_type="none", size=listed.size, block_size=_CHUNK
            )
        except TypeError:  # a file system whose files do not take a known size: one HEAD
            handle = self.fs.open(path, "rb", cache_type="none", block_size=_CHUNK)
        # What fsspec would otherwise ask a HEAD for.
        details = {"name": path, "size": listed.size, "type": "file"}
        try:
            handle.details = details
        except AttributeError:  # gcsfs: a read-only property over ``_details``
            handle._details = details
        read_kw = getattr(handle, "read_kw", None)
        if listed.version and self.scheme == "s3" and isinstance(read_kw, dict):
            # Every ranged GET names the listed version: S3 answers 412 once it was replaced.
            handle.details["ETag"] = listed.version
            handle.read_kw = {**read_kw, "IfMatch": listed.version}
        elif listed.generation and self.scheme in ("gs", "gcs"):
            _pin_generation(handle, url, listed.generation)
        return handle


def _pin_generation(handle: Any, url: ObjectURL, generation: str) -> None:
    """Every ranged GET of a gcsfs file names the listed generation (gcsfs's own reads name
    none): GCS serves that generation's bytes while it is kept (a bucket with versioning), and
    answers 404 once it is gone, which is read as the file vanishing, as S3's 412 is."""
    fs, path, size = handle.fs, handle.path, handle.size

    def fetch(start: int | None = None, end: int | None = None) -> bytes:
        if (start or 0) >= (size if end is None else min(end, size)):
            return b""
        try:
            data: bytes = fs.cat_file(path, start=start, end=end, generation=generation)
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                f"{url} was replaced while being read (generation {generation} is gone)"
            ) from exc
        return data

    # The buffered file reads through its cache's fetcher (bound when it was opened).
    handle._fetch_range = fetch
    handle.cache.fetcher = fetch


class _Counted:
    """An fsspec file that counts its ranged reads (one GET each); a large :meth:`readinto`
    is fetched as concurrent parts, each on a handle of its own."""

    def __init__(self, opener: Callable[[], Any], requests: Requests, url: ObjectURL) -> None:
        self._opener = opener
        self._handle = opener()
        self._requests = requests
        self._url = url
        self.size: int = int(self._handle.size)

    def read(self, length: int = -1) -> bytes:
        start = self._handle.tell()
        if start < self.size and length != 0:
            self._requests.add(gets=1)
        with self._replaced_is_vanished():
            data: bytes = self._handle.read(length)
        return data

    @contextlib.contextmanager
    def _replaced_is_vanished(self) -> Iterator[None]:
        try:
            yield
        except FileNotFoundError:
            raise
        except OSError as exc:
            if type(exc).__name__ == "FileExpired":
                # Replaced since it was listed: gone as far as this reading is concerned; the
                # next listing sees the new version and it is read again.
                raise FileNotFoundError(f"{self._url} was replaced while being read") from exc
            raise

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        start = self._handle.tell()
        length = max(0, min(len(view), self.size - start))
        part = PART_BYTES
        if length < 2 * part:
            data = self.read(len(view))
            view[: len(data)] = data
            return len(data)

        def fetch(offset: int) -> int:
            # One ranged GET, on a handle of its own (fsspec files keep a position), written
            # into its slice of the buffer: no second copy of the tensor is ever held.
            size = min(part, length - offset)
            handle = self._opener()
            try:
                handle.seek(start + offset)
                with self._replaced_is_vanished():
                    data = handle.read(size)
            finally:
                handle.close()
            view[offset : offset + len(data)] = data
            return len(data)

        offsets = range(0, length, part)
        self._requests.add(gets=len(offsets))
        got = list(_part_pool().map(fetch, offsets))
        # A short part (the object shrank) makes a short read, as one GET would.
        done = 0
        for offset, n in zip(offsets, got, strict=True):
            if offset != done:
                break
            done += n
        self._handle.seek(start + done)
        return done

    def seek(self, offset: int, whence: int = 0) -> int:
        return int(self._handle.seek(offset, whence))

    def tell(self) -> int:
        return int(self._handle.tell())

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> _Counted:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_SHARED: dict[tuple[str, ...], ObjectStore] = {}
_SHARED_LOCK = threading.Lock()


def shared_store(scheme: str) -> ObjectStore:
    """One :class:`ObjectStore` per scheme, endpoint and access key id in this process: the
    analysis process reads many checkpoints, and a client (with its credential chain: an
    instance-metadata call on a cloud VM) is made once, not per checkpoint."""
    key = (
        scheme,
        os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "",
        os.environ.get("AWS_ACCESS_KEY_ID", ""),
        os.environ.get("AWS_PROFILE", ""),
    )
    with _SHARED_LOCK:
        if key not in _SHARED:
            _SHARED[key] = ObjectStore(scheme)
        return _SHARED[key]


def _endpoint(scheme: str) -> dict[str, Any]:
    """The endpoint of an S3-compatible store, from the standard variables (botocore reads
    them too; named here so that every s3fs/botocore version honours them)."""
    if scheme != "s3":
        return {}
    url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return {"client_kwargs": {"endpoint_url": url}} if url else {}


@dataclass(frozen=True)
class _Object:
    size: int
    version: str
    mtime_ns: int
    # GCS's generation of the object as listed (ranged reads name it); "" elsewhere.
    generation: str = ""


def _version(info: Mapping[str, Any]) -> str:
    for key in ("ETag", "etag", "generation", "md5Hash", "crc32c", "VersionId"):
        value = info.get(key)
        if value:
            return str(value)
    return ""


def _mtime_ns(info: Mapping[str, Any]) -> int:
    for key in ("LastModified", "last_modified", "updated", "mtime", "timeCreated"):
        value = info.get(key)
        if isinstance(value, datetime):
            return int(value.timestamp() * 1e9)
        if isinstance(value, int | float):
            return int(value * 1e9)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1e9)
    return 0


def _stamp(info: Mapping[str, Any], version: str) -> int:
    """The placeholder's mtime: the object's last-modified second, and below the second a
    number drawn from its version. Fingerprints hash sizes and mtimes, so an object replaced
    by another of the same size within the same second still changes its checkpoint's
    fingerprint (and is analysed again); settle times move by less than a second."""
    seconds = _mtime_ns(info) // 1_000_000_000
    return seconds * 1_000_000_000 + zlib.crc32(version.encode()) % 1_000_000_000


def _plain(relative: str) -> str | None:
    """Why a key (relative to the run's URL) gets no placeholder, or None when it is plain."""
    parts = relative.split("/")
    if any(p in ("", ".", "..") for p in parts) or "\x00" in relative:
        return "an empty, '.' or '..' segment"
    if any(len(p.encode("utf-8", "surrogateescape")) > NAME_MAX for p in parts):
        return f"a segment longer than {NAME_MAX} bytes"
    return None


class Mirror:
    """The sparse local tree of one run's prefix (see the module's docstring).

    Args:
        url: the run's URL (a prefix, or one object: a single checkpoint file).
        store: the store it is listed and read through.
        folder: an empty folder of this mirror's own; the run is ``folder / url.name``.
        spool_max_bytes: the most bytes :meth:`spool` downloads in all (analysis only).
    """

    def __init__(
        self,
        url: ObjectURL,
        store: Store,
        folder: Path,
        spool_max_bytes: int = SPOOL_MAX_BYTES,
    ) -> None:
        self.url = url
        self.store = store
        self.folder = folder
        self.root = folder / (url.name or url.bucket)
        self.objects: dict[str, _Object] = {}
        self.problems: tuple[str, ...] = ()
        self.spool_max_bytes = spool_max_bytes
        self.spooled: set[str] = set()  # downloaded into their placeholders
        self.charged: dict[str, int] = {}  # counted against the bound: spooled or copied
        # Where its ranged objects are read from a whole local copy instead (a base checkpoint).
        self.copies: LocalCopies | None = None
        self._lock = threading.Lock()

    def sync(self) -> bool:
        """List the prefix and bring the placeholders in step; whether anything changed.

        A placeholder whose object kept its (size, version, time) is not touched (same inode,
        same folder stamps). A changed object gets a new placeholder (a new inode: whatever
        was settled from the old one is read again); a removed one is removed.

        Raises:
            ObjectStoreError: the prefix could not be listed.
        """
        listed = self.store.list(self.url)
        problems: list[str] = []
        for relative in sorted(listed):
            why = _plain(relative) if relative else None
            if why is not None:
                del listed[relative]
                problems.append(
                    f"refused: object {shown(self.url.joined_text(relative))} has {why}; "
                    "alphawatch reads only keys of plain segments below the run's URL"
                )
        with self._lock:
            old = self.objects
            changed = False
            for relative in sorted(set(old) - set(listed), key=lambda r: -r.count("/")):
                changed = True
                self._remove(relative)
            for relative, obj in sorted(listed.items()):
                if old.get(relative) == obj:
                    continue
                changed = True
                try:
                    self._place(relative, obj)
                except OSError as exc:
                    del listed[relative]
                    problems.append(
                        f"refused: object {shown(self.url.joined_text(relative))} cannot be "
                        f"mirrored ({exc.strerror or exc}); a file and a folder of one name?"
                    )
            self.objects = listed  # less what could not be placed
            self.problems = tuple(problems)
        return changed

    def path(self, relative: str) -> Path:
        return self.root / relative if relative else self.root

    def relative(self, path: Path | str) -> str | None:
        """The key (relative to the run's URL) of a placeholder, or None when ``path`` is not
        in this mirror."""
        text = os.path.abspath(path)
        root = str(self.root)
        if text == root:
            return ""
        if text.startswith(root + "/"):
            return text[len(root) + 1 :]
        return None

    def url_text(self, path: Path | str) -> str | None:
        """The URL a mirror path stands for (``s3://b/run/checkpoint-5``), or None."""
        relative = self.relative(path)
        if relative is None:
            return None
        return self.url.joined_text(relative) if relative else str(self.url)

    def shown(self, text: str) -> str:
        """``text`` with this mirror's local root replaced by the run's URL."""
        return text.replace(str(self.root), str(self.url))

    def _place(self, relative: str, obj: _Object) -> None:
        path = self.path(relative)
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self.spooled.discard(relative)
        self.charged.pop(relative, None)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, obj.size)  # sparse: the size is recorded, no byte is stored
        finally:
            os.close(fd)
        os.utime(path, ns=(obj.mtime_ns, obj.mtime_ns))

    def _remove(self, relative: str) -> None:
        path = self.path(relative)
        self.spooled.discard(relative)
        self.charged.pop(relative, None)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        parent = path.parent
        while parent != self.folder and self.folder in parent.parents:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def ranged(self, relative: str) -> bool:
        """Whether a placeholder is read by ranged reads (else spooled first)."""
        name = relative.rpartition("/")[2]
        return name.endswith(RANGED_SUFFIXES) or name in NO_SUFFIX_RANGED

    def open_object(self, relative: str) -> Any:
        """The object of a placeholder, open for ranged reads at its listed size."""
        obj = self.objects.get(relative)
        if obj is None:
            raise FileNotFoundError(relative)
        url = self.url.joined(relative) if relative else self.url
        try:
            return self.store.open(url, obj)
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise ObjectStoreError(
                self.path(relative), f"cannot read {url}: {type(exc).__name__}: {exc}"
            ) from exc

    def spool(self, relative: str) -> None:
        """Download a placeholder's object into it, once, within the spool bound.

        Raises:
            CheckpointError: the object holds more bytes than listed (a size lie, or it was
                replaced), or the spool would pass ``spool_max_bytes``; CheckpointVanished
                when it holds fewer (it shrank or was removed).
        """
        with self._lock:
            if relative in self.spooled:
                return
            obj = self._charge(relative)
            path = self.path(relative)
            self.download(relative, path)
            os.utime(path, ns=(obj.mtime_ns, obj.mtime_ns))
            self.spooled.add(relative)

    def charge(self, relative: str) -> None:
        """Count a placeholder's object against the spool bound, once, as :meth:`spool`
        does: an object read whole from a local copy instead is refused where it would be
        refused from the spool, so copies never change what an analysis reads.

        Raises:
            CheckpointError: the spool would pass ``spool_max_bytes``.
        """
        with self._lock:
            self._charge(relative)

    def _charge(self, relative: str) -> _Object:
        obj = self.objects.get(relative)
        if obj is None:
            raise FileNotFoundError(relative)
        if relative in self.charged:
            return obj
        total = sum(self.charged.values()) + obj.size
        if total > self.spool_max_bytes:
            url = self.url.joined_text(relative) if relative else str(self.url)
            raise CheckpointError(
                self.path(relative),
                f"refused: {shown(url)}: spooling it would hold {total} bytes, more than "
                f"the {self.spool_max_bytes} an analysis may download "
                "(ALPHAWATCH_SPOOL_MAX_MB); safetensors are read by ranges instead",
            )
        self.charged[relative] = obj.size
        return obj

    def download(self, relative: str, target: Path) -> None:
        """Download a placeholder's object, as listed, into ``target``: written under a
        temporary name and renamed once whole, so a partial download is never at ``target``.

        Raises:
            CheckpointError: the object holds more bytes than listed (a size lie, or it was
                replaced); CheckpointVanished when it holds fewer (it shrank or was removed).
        """
        obj = self.objects.get(relative)
        if obj is None:
            raise FileNotFoundError(relative)
        path = self.path(relative)
        url = self.url.joined_text(relative) if relative else str(self.url)
        part = target.with_name(f"{target.name}.part{os.getpid()}")
        # Large objects in reads of PART_THREADS parts (concurrent ranged GETs, see _Counted).
        size = _CHUNK if obj.size < 2 * PART_BYTES else PART_BYTES * PART_THREADS
        buffer = memoryview(bytearray(min(size, obj.size + 1)))
        written = 0
        try:
            with self.open_object(relative) as source, open(part, "wb") as sink:
                while True:
                    n = source.readinto(buffer[: min(len(buffer), obj.size + 1 - written)])
                    if not n:
                        break
                    written += n
                    if written > obj.size:
                        raise CheckpointError(
                            path,
                            f"refused: {shown(url)} holds more than the {obj.size} bytes "
                            "it was listed with (replaced while read, or a size lie)",
                        )
                    sink.write(buffer[:n])
            if written < obj.size:
                raise CheckpointVanished(
                    path, f"{shown(url)} holds {written} of its {obj.size} listed bytes"
                )
            os.replace(part, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                part.unlink()


class Mirrors:
    """Every mirror of one process, under one temporary folder, by URL."""

    def __init__(self, spool_max_bytes: int = SPOOL_MAX_BYTES) -> None:
        self.spool_max_bytes = spool_max_bytes
        self._base: Path | None = None  # made with the first mirror: a local worker makes none
        self._cleanup: weakref.finalize[Any, Any] | None = None
        self._stores: dict[str, ObjectStore] = {}
        self._mirrors: dict[str, Mirror] = {}
        self._lock = threading.Lock()
        self._base_lock = threading.Lock()

    @property
    def base(self) -> Path:
        """The temporary folder of every mirror (made on first use)."""
        with self._base_lock:
            if self._base is None:
                self._base = Path(os.path.realpath(tempfile.mkdtemp(prefix="alphawatch-objects-")))
                # The placeholders go with the process, whichever way it ends short of a kill.
                self._cleanup = weakref.finalize(self, shutil.rmtree, self._base, True)
            return self._base

    def store(self, scheme: str) -> ObjectStore:
        """The process's store for ``scheme`` (one client, its credentials resolved once)."""
        with self._lock:
            if scheme not in self._stores:
                self._stores[scheme] = shared_store(scheme)
            return self._stores[scheme]

    def requests(self) -> Requests:
        """The requests of every store, summed."""
        total = Requests()
        for store in list(self._stores.values()):
            total.add(
                lists=store.requests.lists, heads=store.requests.heads, gets=store.requests.gets
            )
        return total

    def mirror(self, url: ObjectURL) -> Mirror:
        """The mirror of ``url`` (made, not yet listed, on first use)."""
        with self._lock:
            found = self._mirrors.get(url)
            if found is None:
                digest = hashlib.sha256(url.encode()).hexdigest()[:16]
                folder = self.base / digest
                folder.mkdir(parents=True, exist_ok=True)
                found = Mirror(url, _Lazy(self, url.scheme), folder, self.spool_max_bytes)
                self._mirrors[url] = found
            return found

    def root(self, url: ObjectURL) -> Path:
        """Where ``url``'s run lies in its mirror (as a run folder's path)."""
        return self.mirror(url).root

    def sync(self, url: ObjectURL) -> Path:
        """:meth:`Mirror.sync` of ``url``'s mirror; its root."""
        mirror = self.mirror(url)
        mirror.sync()
        return mirror.root

    def owner(self, path: Path | str) -> tuple[Mirror, str] | None:
        """The mirror a path lies in and its key there, or None for any other path."""
        if self._base is None:
            return None
        text = os.path.abspath(path)
        if not text.startswith(str(self._base) + "/"):
            return None
        for mirror in list(self._mirrors.values()):
            relative = mirror.relative(text)
            if relative is not None:
                return mirror, relative
        return None

    def text(self, path: Path | str) -> str:
        """A path's text as stored and shown: its URL for a mirror path, else ``str(path)``."""
        found = self.owner(path)
        if found is None:
            return str(path)
        mirror, relative = found
        return mirror.url_text(mirror.path(relative)) or str(path)

    def shown(self, message: str) -> str:
        """``message`` with every mirror's local root replaced by its URL."""
        if self._base is None or str(self._base) not in message:
            return message
        for mirror in list(self._mirrors.values()):
            message = mirror.shown(message)
        return message

    def forget(self, keep: set[ObjectURL]) -> None:
        """Drop the mirrors of runs no longer watched."""
        with self._lock:
            for url in set(self._mirrors) - keep:
                mirror = self._mirrors.pop(url)
                shutil.rmtree(mirror.folder, ignore_errors=True)

    def close(self) -> None:
        if self._cleanup is not None:
            self._cleanup()


class _Lazy:
    """A mirror's store, made on first use: a mirror can exist (and be named) before any
    client library is imported."""

    def __init__(self, mirrors: Mirrors, scheme: str) -> None:
        self._mirrors = mirrors
        self._scheme = scheme

    def list(self, url: ObjectURL) -> dict[str, _Object]:
        return self._mirrors.store(self._scheme).list(url)

    def open(self, url: ObjectURL, listed: _Object) -> Any:
        return self._mirrors.store(self._scheme).open(url, listed)


FREE_MARGIN_BYTES = 1024**3
"""Bytes a local copy of a base leaves free on the worker's disk, whatever its bound."""

_TRAINER_STATE = re.compile(
    r"^(optimizer.*|scheduler.*|scaler.*|rng_state.*|training_args\.bin|"
    r".*_optim_states\.pt|distrib_optim\.pt)$"
)
"""Files a trainer writes beside a checkpoint's weights (HF Trainer, DeepSpeed ZeRO, Megatron's
distributed optimizer) that reading the weights never opens: not counted in a base's size."""


def _trainer_state(relative: str) -> bool:
    return _TRAINER_STATE.match(relative.rpartition("/")[2]) is not None


class LocalCopies:
    """Whole local copies of the objects of base checkpoints, within ``max_bytes`` on disk.

    Update spectra read their base checkpoint whole at every analysis: by ranged GETs
    (safetensors) or spooled (torch pickles, DCP files), a 7B model's 14 GB more per
    checkpoint. With ``deltas`` "init" the base is the run's first checkpoint; with "prev" it
    is the checkpoint analysed just before (by a worker that keeps up), itself read whole by
    that analysis: so the checkpoint in hand is copied here as it is read, and the next
    analysis finds its base on disk. Objects are downloaded here once, as
    each is first opened (:meth:`Mirror.download`: the listed ETag or generation pinned,
    sizes checked, a temporary name renamed once whole) and read from disk while their
    listing is unchanged; a copy is only where the bytes lie, the readers that open it are
    the ones that open the spool (``weights_only``, the DCP metadata allow-list). A copy is
    named by its URL and its listed (size, version, time): an object replaced in the bucket
    has another name, and its old copy is removed when the new one is asked for.

    The copies an analysis reads (:meth:`held`: its init base, its previous checkpoint, the
    checkpoint in hand) never make room for one another; the least recently used of the rest
    make room, and a previous checkpoint's copies become the first to go once its successor
    is analysed (it will not be a base again; the init base and the newest checkpoint of each
    run stay). A checkpoint larger than ``max_bytes``, or one object that would take the
    analysis's copies past it, is read as without copies (by ranges, or spooled).

    The folder is the worker's (under its mirrors' temporary folder, removed when it stops);
    each analysis process keeps its state there, so a new one after a death reuses the copies
    (and removes the partial download a killed one left).
    """

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        # Runs (the folder of a checkpoint's URL) said once to have checkpoints larger than
        # the bound; "" once said that one analysis's checkpoints do not fit it together.
        self._told: set[str] = set()
        self._in_hand: set[str] = set()  # names of the copies the analysis in hand reads
        self._lock = threading.Lock()
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        for entry in folder.iterdir():
            if ".part" in entry.name:
                entry.unlink(missing_ok=True)

    def admits(self, mirror: Mirror) -> bool:
        """Whether the objects of ``mirror`` (a base checkpoint) that its reading opens fit
        the bound (every object but the trainer's state beside the weights: optimizer,
        scheduler, RNG); a base that does not is logged, once per run and process, and read
        as without copies."""
        size = sum(o.size for r, o in mirror.objects.items() if not _trainer_state(r))
        if size <= self.max_bytes:
            return True
        self._tell(mirror, size)
        return False

    @contextlib.contextmanager
    def held(self, mirrors: list[Mirror], spent: Mirror | None = None) -> Iterator[None]:
        """Within: the copies of ``mirrors`` (one analysis's) never make room for one another.
        After: the copies of ``spent`` (the previous checkpoint, compared with the checkpoint
        in hand) become the least recently used, the first to make room."""
        names = {self._name(m, r, o)[1] for m in mirrors for r, o in m.objects.items()}
        with self._lock:
            self._in_hand = names
        try:
            yield
        finally:
            with self._lock:
                self._in_hand = set()
                if spent is not None:
                    for relative, obj in spent.objects.items():
                        with contextlib.suppress(FileNotFoundError):
                            os.utime(self.folder / self._name(spent, relative, obj)[1], ns=(0, 0))

    def _tell(self, mirror: Mirror, size: int) -> None:
        # Once per run: with "prev" every checkpoint of it is a base, each as large.
        run = mirror.url.rstrip("/").rpartition("/")[0]
        with self._lock:
            if run in self._told:
                return
            self._told.add(run)
        log.warning(
            "base checkpoint %s holds %d bytes, more than the %d kept on disk "
            "(ALPHAWATCH_BASE_CACHE_MB): it is read by ranged GETs at each analysis "
            "(torch pickles and DCP files: spooled)",
            shown(mirror.url),
            size,
            self.max_bytes,
        )

    def copy(self, mirror: Mirror, relative: str) -> Path | None:
        """The local copy of a placeholder's object as listed, downloaded when there is none;
        None when it is not kept (no version to tell a replaced object by, or it would take
        the copies of its checkpoint, and of the others the analysis reads, past the bound).

        Raises:
            FileNotFoundError: the object is not listed, or was replaced while downloaded;
            CheckpointError: a size lie (see :meth:`Mirror.download`).
        """
        obj = mirror.objects.get(relative)
        if obj is None:
            raise FileNotFoundError(relative)
        if not obj.version:
            return None
        prefix, name = self._name(mirror, relative, obj)
        path = self.folder / name
        with self._lock:
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_size == obj.size:
                    os.utime(path)  # its mtime orders the copies by last use
                    return path
            for old in self.folder.glob(f"{prefix}-*"):  # a replaced object's copy
                old.unlink(missing_ok=True)
            keep = self._in_hand | {self._name(mirror, r, o)[1] for r, o in mirror.objects.items()}
            needed = self._held(keep - {name}) + obj.size
            if needed <= self.max_bytes:
                self._make_room(obj.size, keep)
                free = shutil.disk_usage(self.folder).free
                if free < obj.size + FREE_MARGIN_BYTES:
                    # The bound is not the disk: a copy that would leave the worker's disk
                    # all but full is not made (its object is read as without copies).
                    raise OSError(
                        errno.ENOSPC,
                        f"{free} bytes free, {obj.size} needed and {FREE_MARGIN_BYTES} kept free",
                    )
                mirror.download(relative, path)
                return path
        own = self._held(keep - self._in_hand - {name}) + obj.size
        if own > self.max_bytes:
            # :meth:`admits` judges by names: a file it took for trainer state that the base's
            # reading opens after all (Megatron's model_optim_rng.pt holds the weights too) is
            # kept only within the bound.
            self._tell(mirror, own)
        else:
            self._crowded()
        return None

    def _crowded(self) -> None:
        with self._lock:
            if "" in self._told:
                return
            self._told.add("")
        log.warning(
            "the checkpoints one analysis reads (the init base, the previous checkpoint and the "
            "one in hand) need more than the %d bytes kept on disk (ALPHAWATCH_BASE_CACHE_MB): "
            "some are read by ranged GETs as without copies (torch pickles and DCP files: "
            "spooled); room for three checkpoints' weights lets a worker read each once",
            self.max_bytes,
        )

    def _name(self, mirror: Mirror, relative: str, obj: _Object) -> tuple[str, str]:
        """A copy's name: a digest of its URL, then one of its listed (size, version, time)."""
        url = mirror.url.joined_text(relative) if relative else str(mirror.url)
        listed = f"{obj.size}\0{obj.version}\0{obj.generation}\0{obj.mtime_ns}"
        prefix = hashlib.sha256(url.encode()).hexdigest()[:32]
        return prefix, f"{prefix}-{hashlib.sha256(listed.encode()).hexdigest()[:16]}"

    def _held(self, names: set[str]) -> int:
        """Bytes of the copies of ``names`` on disk."""
        held = 0
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                held += (self.folder / name).stat().st_size
        return held

    def _make_room(self, size: int, keep: set[str]) -> None:
        """Remove the least recently used copies (none of ``keep``: those the analysis reads)
        until ``size`` more bytes fit the bound."""
        held = []
        for entry in self.folder.iterdir():
            with contextlib.suppress(FileNotFoundError):
                stat = entry.stat()
                held.append((stat.st_mtime_ns, stat.st_size, entry))
        used = sum(entry_size for _, entry_size, _ in held)
        for _, held_size, entry in sorted(held):
            if used + size <= self.max_bytes:
                break
            if entry.name not in keep:
                entry.unlink(missing_ok=True)
                used -= held_size


_COPIES: dict[tuple[Path, int], LocalCopies] = {}


def local_copies(folder: Path | None, max_bytes: int) -> LocalCopies | None:
    """The process's :class:`LocalCopies` in ``folder`` (None: no folder, or ``max_bytes``
    0): one per analysis process, so that a base too large is logged once, not per analysis."""
    if folder is None or max_bytes <= 0:
        return None
    with _SHARED_LOCK:
        if (folder, max_bytes) not in _COPIES:
            _COPIES[folder, max_bytes] = LocalCopies(folder, max_bytes)
        return _COPIES[folder, max_bytes]


@dataclass(frozen=True)
class ObjectConfinement(Confinement):
    """A :class:`Confinement` that also reads the placeholders of object mirrors.

    Local paths are confined and opened exactly as by :class:`Confinement` (its ``roots``);
    a placeholder of one of ``mirrors`` is opened as its object (ranged, or spooled first when
    ``spool``), or as its whole local copy when its mirror keeps :class:`LocalCopies` (a base
    checkpoint, or the checkpoint in hand with ``deltas`` "prev"), and only when the mirror's
    URL lies under ``url_roots`` (None: anywhere).
    """

    mirrors: Mirrors | None = field(default=None, compare=False)
    url_roots: tuple[str, ...] | None = None
    spool: bool = False

    @classmethod
    def around(
        cls,
        local: Confinement,
        mirrors: Mirrors,
        url_roots: tuple[str, ...] | None,
        *,
        spool: bool = False,
    ) -> ObjectConfinement:
        """``local``'s roots, with ``mirrors``' folder allowed besides them."""
        roots = None if local.roots is None else (*local.roots, mirrors.base)
        return cls(roots, mirrors, url_roots, spool)

    def describe(self) -> str:
        local = super().describe()
        if self.url_roots is None:
            return local
        return f"{local}; URLs: {', '.join(self.url_roots) or 'none'}"

    def url_allows(self, url: ObjectURL) -> bool:
        return self.url_roots is None or url_allowed(url, self.url_roots)

    @contextlib.contextmanager
    def open(self, path: Path | str, what: str = "file") -> Iterator[BinaryIO]:
        found = self.mirrors.owner(path) if self.mirrors is not None else None
        if found is None:
            with super().open(path, what) as handle:
                yield handle
            return
        mirror, relative = found
        if not self.url_allows(mirror.url):
            raise OutsideRootError(
                Path(path),
                f"refused: {what} {shown(mirror.url)} is outside the allowed roots "
                f"({self.describe()}) (ALPHAWATCH_ALLOWED_ROOTS)",
            )
        if not mirror.path(relative).is_file():
            raise FileNotFoundError(str(path))
        if self.spool and mirror.copies is not None and not mirror.ranged(relative):
            mirror.charge(relative)  # refused from a copy where the spool would refuse it
        copy = self._copy(mirror, relative)
        if copy is not None:
            # Any format: the readers get a local file, as from the spool, and apply the same
            # rules to it (a pickle that needs code is refused, never run).
            with open(copy, "rb") as local:
                yield local
            return
        if self.spool and not mirror.ranged(relative):
            mirror.spool(relative)
            with super().open(path, what) as handle:
                yield handle
            return
        with mirror.open_object(relative) as handle:
            yield handle

    @staticmethod
    def _copy(mirror: Mirror, relative: str) -> Path | None:
        """The whole local copy of a placeholder's object, when its mirror keeps copies and
        one is made; None: it is read as without copies (by ranges, or spooled)."""
        if mirror.copies is None:
            return None
        try:
            return mirror.copies.copy(mirror, relative)
        except FileNotFoundError:
            raise  # not listed, or replaced while downloaded: as a ranged read would
        except OSError as exc:
            # The worker's disk, not the object (full, read-only, removed): the base is read
            # as it would be without copies, never an analysis failed.
            log.warning(
                "no local copy of %s (%s: %s): read by ranged GETs as without copies "
                "(torch pickles and DCP files: spooled)",
                shown(mirror.url),
                type(exc).__name__,
                exc,
            )
            mirror.copies = None
            return None


def run_url_check(url: ObjectURL, url_roots: tuple[str, ...] | None) -> None:
    """Refuse a run's URL outside the allowed URL prefixes (None: anywhere).

    Raises:
        OutsideRootError: naming the URL and the roots.
    """
    if url_roots is not None and not url_allowed(url, url_roots):
        raise OutsideRootError(
            Path(url.name),
            f"refused: {url} is outside the allowed roots ({', '.join(url_roots) or 'none'}); "
            "add its prefix to ALPHAWATCH_ALLOWED_ROOTS",
        )


@contextlib.contextmanager
def staged(
    urls: list[ObjectURL | None],
    local: Confinement,
    url_roots: tuple[str, ...] | None,
    spool_max_bytes: int = SPOOL_MAX_BYTES,
    *,
    copies: LocalCopies | None = None,
    copied: tuple[ObjectURL, ...] = (),
    spent: ObjectURL | None = None,
) -> Iterator[tuple[list[Path | None], ObjectConfinement, Mirrors]]:
    """Mirrors of ``urls`` (listed once each) for one analysis, removed afterwards; the
    objects of each of ``copied`` (some of ``urls``: base checkpoints, or the checkpoint in
    hand that the next analysis compares with, in any format) are read from their whole
    local ``copies`` when it fits them; the copies of ``spent`` (the previous checkpoint)
    are the first to make room afterwards (see :meth:`LocalCopies.held`).

    Yields:
        the mirror root of each URL (None stays None), the confinement that reads them
        (ranged reads and a bounded spool), and the mirrors (for :meth:`Mirrors.shown`).

    Raises:
        OutsideRootError: a URL outside ``url_roots``; ObjectStoreError: one cannot be listed.
    """
    mirrors = Mirrors(spool_max_bytes=spool_max_bytes)
    try:
        roots: list[Path | None] = []
        for url in urls:
            if url is None:
                roots.append(None)
                continue
            run_url_check(url, url_roots)
            roots.append(mirrors.sync(url))
        confine = ObjectConfinement.around(local, mirrors, url_roots, spool=True)
        if copies is None or not copied:
            yield roots, confine, mirrors
            return
        kept = [mirrors.mirror(url) for url in dict.fromkeys(copied)]
        for mirror in kept:
            mirror.copies = copies if copies.admits(mirror) else None
        with copies.held(kept, mirrors.mirror(spent) if spent is not None else None):
            yield roots, confine, mirrors
    finally:
        mirrors.close()
