"""Where the frozen RDA teacher's outputs are kept: the choice by size, and an append-only store on disk.

With ``rda_teacher="frozen"`` the trainer keeps, per training sample, the teacher's log-probabilities at
the sample's response tokens: the full distribution (``V`` float32 per token) or its top ``k`` (k float32
log-probs + k int32 token ids per token; :func:`hf_vitask.losses.rda_kl_cached` keeps the rest of the
mass). At the paper's scale (0.5M samples x ~10 tokens x a 152k vocabulary) the full distribution is
~2.8 TiB and even the top 256 are ~9.5 GiB, more than a process should hold in RAM. :func:`plan_cache`
picks the form from the estimated size; :class:`DiskTeacherCache` keeps the entries in files instead of
RAM, and a resumed run finds them there.

The store, ``<output_dir>/teacher_cache/``:

* ``meta.json``: what the entries are (vocabulary, k, temperature, a fingerprint of the teacher's
  weights); a store made for anything else is started afresh, never mixed.
* ``rows.bin``: fixed-size token rows, appended: ``width`` float32 log-probs, then (top-k) ``width``
  int32 token ids. A sample's entry is ``count`` consecutive rows.
* ``index.bin``: one fixed-size record per sample, appended after its rows (:data:`INDEX_RECORD`: the
  key's 16-byte digest, first row, row count, CRC-32 of the rows, CRC-32 of the record itself).

Rows are written before the record that points at them, so a run killed mid-write leaves at most a
partial record or rows no record points at. Opening verifies every record and its rows' checksum and
cuts the files back to the last complete sample, with a warning naming the file: a damaged store is
never read. Reads check the checksum again.

Several processes: the main process alone writes. The others read the same files; the entries of the
current step (gathered from every process) they keep in RAM until their next update, which comes
after the next gather, when the main process has written them.
"""

from __future__ import annotations

import array
import hashlib
import json
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

try:
    import fcntl
except ImportError:  # not POSIX: no lock against a second run writing the same store
    fcntl = None

logger = logging.getLogger(__name__)

#: The k kept when the full distribution is too large for :data:`MEMORY_BUDGET_GIB`.
DEFAULT_TOPK = 256
#: The most a cache may take in RAM when ``rda_teacher_cache="auto"`` (GiB); larger ones go to disk.
MEMORY_BUDGET_GIB = 4.0
FORMAT = 1
INDEX_RECORD = np.dtype([("key", "V16"), ("row", "<i8"), ("count", "<i4"), ("crc", "<u4"), ("check", "<u4")])
CHECKED = INDEX_RECORD.itemsize - 4  # the bytes of a record its own ``check`` covers

Entry = tuple[torch.Tensor, "torch.Tensor | None"]


def token_bytes(vocab: int, topk: int) -> int:
    """Bytes one response token takes: ``vocab`` float32, or ``topk`` float32 + ``topk`` int32."""
    return min(topk, vocab) * 8 if topk else vocab * 4


def size_text(nbytes: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} bytes"


@dataclass(frozen=True)
class CachePlan:
    """How the frozen teacher's outputs are kept: ``mode`` ("memory", "disk" or "off") and ``topk``
    (0: the full distribution), with the numbers the choice was made from (None: not known)."""

    mode: str
    topk: int
    vocab: int
    samples: int | None = None
    tokens: int | None = None

    def nbytes(self, topk: int | None = None) -> int | None:
        """Estimated size with ``topk`` (default: this plan's), at most ``tokens`` per sample."""
        if self.samples is None or self.tokens is None:
            return None
        return self.samples * self.tokens * token_bytes(self.vocab, self.topk if topk is None else topk)

    def describe(self, directory: Path | str | None = None) -> str:
        """One line: the form, where it is kept, its estimated size and how to choose another."""
        what = (
            f"the top {min(self.topk, self.vocab)} log-probs per token (float32 + int32 ids, the rest of "
            "the mass kept as one share)"
            if self.topk
            else f"the full distribution ({self.vocab} float32 log-probs per token)"
        )
        where = "in RAM" if self.mode == "memory" else f"on disk in {directory}"
        if self.nbytes() is None:
            size = "size not known in advance (an iterable dataset, or no task to measure the responses)"
        else:
            size = (
                f"up to {size_text(self.nbytes())} for {self.samples} samples x {self.tokens} response "
                f"tokens (the full distribution: {size_text(self.nbytes(0))})"
            )
        return (
            f"Frozen-teacher cache: {what}, {where}; {size}. Choose with rda_teacher_cache ('memory', "
            "'disk', 'off') and rda_teacher_topk."
        )


def plan_cache(
    setting: str,
    topk: int | None,
    vocab: int,
    samples: int | None,
    tokens: int | None,
    budget_gib: float = MEMORY_BUDGET_GIB,
) -> CachePlan:
    """The cache for ``rda_teacher_cache=setting`` and ``rda_teacher_topk=topk``.

    ``topk=None``: the full distribution when it fits ``budget_gib``, else the top
    :data:`DEFAULT_TOPK`. ``setting="auto"``: in RAM when the estimate fits ``budget_gib``, else on
    disk (also when the size is not known: a disk store cannot exhaust RAM)."""
    if setting == "off":
        return CachePlan("off", 0, vocab, samples, tokens)
    plan = CachePlan(setting, 0, vocab, samples, tokens)
    budget = budget_gib * 2**30
    if topk is None:
        fits = plan.nbytes(0) is not None and plan.nbytes(0) <= budget
        topk = 0 if fits or vocab <= DEFAULT_TOPK else DEFAULT_TOPK
    size = CachePlan(setting, topk, vocab, samples, tokens).nbytes()
    mode = setting if setting != "auto" else ("memory" if size is not None and size <= budget else "disk")
    return CachePlan(mode, topk, vocab, samples, tokens)


def key_digest(key: str) -> bytes:
    """The 16 bytes a sample key is stored under (keys of any length, a fixed-size record)."""
    return hashlib.blake2b(key.encode(), digest_size=16).digest()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class DiskTeacherCache:
    """Teacher log-probabilities per sample key in ``directory`` (see the module docstring).

    Used like the in-RAM dict it replaces: ``key in cache``, ``cache[key]`` -> ``(logprobs (n, width)
    float32, ids (n, width) int32 or None)``, ``cache.update(entries)``, ``len(cache)``. RAM holds the
    index only (a digest, first row, count and checksum per sample); entries are read from the files.

    Args:
        directory: the store's folder (created by the writer).
        meta: what the entries are (``vocab``, ``topk``, ...); a store holding anything else is
            started afresh by the writer and refused by a reader.
        writer: the one process that writes (takes a lock, repairs a damaged store). A reader must be
            opened after the writer has opened (a barrier) and sees the entries the writer had then;
            it registers later ones from ``update``, which every process calls with the same entries.
    """

    def __init__(self, directory: str | Path, meta: dict, writer: bool = True):
        self.directory = Path(directory)
        self.meta = {"format": FORMAT, **meta}
        self.vocab, self.topk = int(meta["vocab"]), int(meta["topk"])
        self.width = min(self.topk, self.vocab) if self.topk else self.vocab
        self.row_bytes = token_bytes(self.vocab, self.topk)
        self.writer = writer
        self.meta_path = self.directory / "meta.json"
        self.rows_path = self.directory / "rows.bin"
        self.index_path = self.directory / "index.bin"
        self._slots: dict[bytes, int] = {}  # key digest -> record number
        self._first = array.array("q")  # per record: first row, row count, CRC-32 of its rows
        self._count = array.array("i")
        self._crc = array.array("I")
        self._end = 0  # rows in use
        self._pending: dict[bytes, Entry] = {}  # a reader's entries of the last update
        self._fds: list[int] = []
        if writer:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock()
            if not self._meta_matches():
                self._start_afresh()
            for path in (self.rows_path, self.index_path):
                path.touch()
            self._load_index(verify=True)
            self._append_fd = self._open(self.rows_path, os.O_WRONLY | os.O_APPEND)
            self._index_fd = self._open(self.index_path, os.O_WRONLY | os.O_APPEND)
        else:
            stored = self._read_meta()
            if stored != self.meta:
                raise ValueError(
                    f"{self.meta_path} holds {stored}, not {self.meta}: the store is not the one the main "
                    "process opened (is output_dir on storage every process sees?)"
                )
            self._load_index(verify=False)
        self._read_fd = self._open(self.rows_path, os.O_RDONLY)

    # -- the mapping ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, key: str) -> bool:
        return key_digest(key) in self._slots

    def __getitem__(self, key: str) -> Entry:
        digest = key_digest(key)
        if digest in self._pending:
            return self._pending[digest]
        slot = self._slots[digest]
        first, count = self._first[slot], self._count[slot]
        data = os.pread(self._read_fd, count * self.row_bytes, first * self.row_bytes)
        if len(data) != count * self.row_bytes or zlib.crc32(data) != self._crc[slot]:
            raise RuntimeError(
                f"{self.rows_path}: the rows of sample {key} changed after the store was opened (another "
                "program writing it?). Delete the folder to rebuild the cache."
            )
        rows = np.frombuffer(data, dtype=np.uint32).reshape(count, -1)
        logprobs = torch.from_numpy(rows[:, : self.width].copy().view(np.float32))
        ids = torch.from_numpy(rows[:, self.width :].copy().view(np.int32)) if self.topk else None
        return logprobs, ids

    def update(self, entries: dict[str, Entry]) -> None:
        """Add the samples of ``entries`` not stored yet (in their order; the first of a key wins)."""
        if self.writer:  # new rows go where the file ends (also after another trainer of this process)
            self._end = os.fstat(self._append_fd).st_size // self.row_bytes
        else:
            self._pending.clear()  # the writer has written them: this update follows another gather
        new = []
        for key, entry in entries.items():
            digest = key_digest(key)
            if digest in self._slots:
                continue
            rows = self._rows(key, entry)
            self._register(digest, self._end, len(rows), zlib.crc32(rows))
            new.append((digest, rows))
            if not self.writer:
                self._pending[digest] = entry
        if new and self.writer:
            self._write(new)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored rows."""
        return self._end * self.row_bytes

    def close(self) -> None:
        fds = getattr(self, "_fds", [])
        while fds:
            os.close(fds.pop())

    def __del__(self):
        self.close()

    # -- writing -------------------------------------------------------------------------------------
    def _rows(self, key: str, entry: Entry) -> np.ndarray:
        """``entry`` as its rows (uint32 words: the float32 bits, then the int32 ids)."""
        logprobs, ids = entry
        if logprobs.dim() != 2 or logprobs.shape[1] != self.width or (ids is None) != (not self.topk):
            raise ValueError(
                f"Sample {key}: teacher entry {tuple(logprobs.shape)} (ids: {ids is not None}) does not fit "
                f"the store {self.directory} (width {self.width}, top-k {self.topk})"
            )
        words = [logprobs.detach().to("cpu", torch.float32).contiguous().numpy().view(np.uint32)]
        if ids is not None:
            words.append(ids.detach().to("cpu", torch.int32).contiguous().numpy().view(np.uint32))
        return np.ascontiguousarray(np.concatenate(words, axis=1))

    def _register(self, digest: bytes, first: int, count: int, crc: int) -> None:
        """Record number ``len(self._first)``: a position in ``index.bin``. Only a key's first record is
        looked up (a second one is written only by a second trainer of this process)."""
        self._slots.setdefault(digest, len(self._first))
        self._first.append(first)
        self._count.append(count)
        self._crc.append(crc)
        self._end = first + count

    def _write(self, new: list[tuple[bytes, np.ndarray]]) -> None:
        """The rows first, then the records that point at them (see the module docstring). A failed
        write (a full disk) leaves the store as it was before."""
        records = np.zeros(len(new), INDEX_RECORD)
        start = len(self._first) - len(new)
        for i, (digest, _) in enumerate(new):
            records[i] = (digest, self._first[start + i], self._count[start + i], self._crc[start + i], 0)
        raw = records.view(np.uint8).reshape(len(new), INDEX_RECORD.itemsize)
        records["check"] = [zlib.crc32(raw[i, :CHECKED]) for i in range(len(new))]
        rows_size, index_size = (os.fstat(fd).st_size for fd in (self._append_fd, self._index_fd))
        try:
            _write_all(self._append_fd, b"".join(rows.tobytes() for _, rows in new))
            _write_all(self._index_fd, records.tobytes())
        except OSError as err:
            os.truncate(self.rows_path, rows_size)
            os.truncate(self.index_path, index_size)
            for digest, _ in new:
                del self._slots[digest]
            for column in (self._first, self._count, self._crc):
                del column[start:]
            self._end = self._first[-1] + self._count[-1] if self._first else 0
            raise OSError(
                f"Cannot write the teacher cache {self.rows_path} ({err}): free space there, or keep fewer "
                "values per token (rda_teacher_topk)"
            ) from err

    # -- opening -------------------------------------------------------------------------------------
    def _open(self, path: Path, flags: int) -> int:
        fd = os.open(path, flags | os.O_CREAT if flags != os.O_RDONLY else flags, 0o644)
        self._fds.append(fd)
        return fd

    def _lock(self) -> None:
        """One writer per store: a second run writing the same output_dir would interleave rows."""
        path = self.directory / "lock"
        fd = self._open(path, os.O_RDWR)
        if fcntl is None:
            return
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError) as err:
            raise RuntimeError(
                f"{path} is locked by another process: another run is writing this teacher cache. Give each "
                "run its own output_dir."
            ) from err
        except OSError:  # a filesystem without locks
            pass

    def _read_meta(self) -> dict | None:
        try:
            return json.loads(self.meta_path.read_text())
        except FileNotFoundError:
            return None

    def _meta_matches(self) -> bool:
        """Whether the folder holds a store of this ``meta`` (an empty folder: nothing to warn about)."""
        try:
            stored = self._read_meta()
        except (ValueError, OSError) as err:
            logger.warning(f"The teacher cache's {self.meta_path} cannot be read ({err}): starting it afresh")
            return False
        if stored == self.meta:
            return True
        if stored is not None:
            changed = sorted(k for k in {**stored, **self.meta} if stored.get(k) != self.meta.get(k))
            logger.warning(
                f"The teacher cache {self.meta_path} was made for another {', '.join(changed)}: starting it "
                "afresh (its entries do not apply to this teacher)"
            )
        elif self.rows_path.exists() or self.index_path.exists():
            logger.warning(f"The teacher cache in {self.directory} has no meta.json: starting it afresh")
        return False

    def _start_afresh(self) -> None:
        for path in (self.rows_path, self.index_path):
            path.unlink(missing_ok=True)
        staged = self.meta_path.with_suffix(".json.tmp")
        staged.write_text(json.dumps(self.meta, indent=1, sort_keys=True))
        os.replace(staged, self.meta_path)  # the meta file is whole or absent

    def _load_index(self, verify: bool) -> None:
        """Read the index; ``verify`` (the writer): check every record and its rows, and cut both files
        back to the last complete, intact sample."""
        size = self.index_path.stat().st_size if self.index_path.exists() else 0
        whole = size // INDEX_RECORD.itemsize
        records = (
            np.fromfile(self.index_path, INDEX_RECORD, count=whole) if whole else np.zeros(0, INDEX_RECORD)
        )
        if not verify:
            for record in records:
                self._register(
                    bytes(record["key"]), int(record["row"]), int(record["count"]), int(record["crc"])
                )
            return
        problems = [f"{self.index_path} ends in a partial record"] if size % INDEX_RECORD.itemsize else []
        raw = records.view(np.uint8).reshape(whole, INDEX_RECORD.itemsize)
        good, end = whole, 0
        for i, record in enumerate(records):
            if (
                zlib.crc32(raw[i, :CHECKED]) != record["check"]
                or record["row"] != end
                or record["count"] <= 0
            ):
                problems.append(f"record {i} of {self.index_path} is damaged")
                good = i
                break
            end += int(record["count"])
        with open(self.rows_path, "rb") as rows:
            for i in range(good):
                data = rows.read(int(records["count"][i]) * self.row_bytes)
                if len(data) < int(records["count"][i]) * self.row_bytes:
                    problems.append(f"{self.rows_path} ends inside sample {i}")
                elif zlib.crc32(data) != records["crc"][i]:
                    problems.append(f"the rows of sample {i} in {self.rows_path} do not match their checksum")
                else:
                    continue
                good = i
                break
        for record in records[:good]:
            self._register(bytes(record["key"]), int(record["row"]), int(record["count"]), int(record["crc"]))
        extra = self.rows_path.stat().st_size - self.nbytes
        if extra > 0 and not problems:
            problems.append(f"{self.rows_path} holds {extra} bytes past its last complete sample")
        if problems:
            logger.warning(
                f"The teacher cache in {self.directory} is incomplete or damaged ({'; '.join(problems)}; the run "
                f"was stopped while writing?): kept its first {good} of {whole} samples, the others are "
                "computed again"
            )
            os.truncate(self.index_path, good * INDEX_RECORD.itemsize)
            os.truncate(self.rows_path, self.nbytes)
