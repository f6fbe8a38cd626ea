"""MXNet RecordIO (.rec/.idx) reader and writer in pure Python, byte-compatible with mxnet's.

API mirrors `mxnet.recordio` (RecordIO, IndexedRecordIO, IRHeader, pack, unpack) so scripts port by
changing one import. Formats (dmlc-core recordio.h, mxnet recordio.py):

    record   := uint32 magic 0xCED7230A | uint32 lrec = cflag << 29 | length | data | zero pad to 4 bytes
    cflag    := 0 whole record; 1 / 2 / 3 first / middle / last part of a record split where the payload
                holds the magic at a 4-byte aligned offset (the writer drops those 4 bytes, the reader
                puts them back between parts)
    .idx     := text lines "<key>\t<byte offset>\n"
    payload  := IRHeader struct '<IfQQ' (flag, label, id, id2); if flag > 0, flag float32 labels follow;
                then the encoded image

The file handle is opened lazily and re-opened after a fork, so DataLoader workers never share one
(upstream's MXFaceDataset opens it in the parent).
"""
import os
import struct
from collections import namedtuple

import numpy as np

from ..errors import DataError

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LEN_MASK = (1 << 29) - 1
_HEAD = struct.Struct("<II")

IRHeader = namedtuple("HEADER", ["flag", "label", "id", "id2"])
_IR_FORMAT = "<IfQQ"
_IR_SIZE = struct.calcsize(_IR_FORMAT)


def pack(header, s):
    """Pack an IRHeader and a byte string; an array label becomes flag=len(label) floats before the data."""
    header = IRHeader(*header)
    label = header.label
    if isinstance(label, (int, float, np.integer, np.floating)):
        header = header._replace(flag=0)
        head = struct.pack(_IR_FORMAT, 0, float(label), int(header.id), int(header.id2))
        return head + bytes(s)
    label = np.asarray(label, dtype=np.float32).ravel()
    head = struct.pack(_IR_FORMAT, label.size, 0.0, int(header.id), int(header.id2))
    return head + label.tobytes() + bytes(s)


def unpack(s):
    """Inverse of pack: (IRHeader, payload). A multi-float label comes back as a float32 array."""
    if len(s) < _IR_SIZE:
        raise DataError(f"record of {len(s)} bytes is shorter than the {_IR_SIZE}-byte IRHeader")
    flag, label, id_, id2 = struct.unpack(_IR_FORMAT, s[:_IR_SIZE])
    s = s[_IR_SIZE:]
    if flag > 0:
        if len(s) < 4 * flag:
            raise DataError(f"record header announces {flag} float labels but only {len(s)} bytes follow")
        label = np.frombuffer(s[: 4 * flag], dtype=np.float32).copy()
        s = s[4 * flag:]
    return IRHeader(flag, label, id_, id2), s


def _split_at_magic(data):
    """Payload parts between 4-byte aligned occurrences of the magic (which the format drops)."""
    parts, start = [], 0
    pos = data.find(_MAGIC_BYTES)
    while pos != -1:
        if pos % 4 == 0:
            parts.append(data[start:pos])
            start = pos + 4
            pos = data.find(_MAGIC_BYTES, start)
        else:
            pos = data.find(_MAGIC_BYTES, pos + 1)
    parts.append(data[start:])
    return parts


class RecordIO:
    """Sequential .rec access (flag 'r' or 'w'), as mxnet.recordio.MXRecordIO."""

    def __init__(self, uri, flag):
        if flag not in ("r", "w"):
            raise ValueError(f"flag must be 'r' or 'w', got {flag!r}")
        self.uri = str(uri)
        self.flag = flag
        self.writable = flag == "w"
        self._fh = None
        self._pid = None
        if self.writable:
            self._open()
        elif not os.path.isfile(self.uri):
            raise DataError(f"RecordIO file not found: {self.uri}")

    # -- file handle, per process ------------------------------------------------------------
    def _open(self):
        self._fh = open(self.uri, "wb" if self.writable else "rb")
        self._pid = os.getpid()

    @property
    def handle(self):
        if self._fh is None or self._pid != os.getpid():
            if self.writable and self._fh is not None:
                raise DataError(f"{self.uri}: a RecordIO writer cannot be used after fork")
            self._open()
        return self._fh

    def __getstate__(self):  # picklable for DataLoader workers: the handle is re-opened on the other side
        state = dict(self.__dict__)
        state["_fh"] = None
        state["_pid"] = None
        return state

    def close(self):
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def reset(self):
        self.close()
        self._open()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- records -----------------------------------------------------------------------------
    def tell(self):
        return self.handle.tell()

    def write(self, buf):
        if not self.writable:
            raise DataError(f"{self.uri} is open for reading")
        fh = self.handle
        parts = _split_at_magic(bytes(buf))
        n = len(parts)
        for i, part in enumerate(parts):
            if len(part) > _LEN_MASK:
                raise DataError(f"{self.uri}: record part of {len(part)} bytes exceeds the 2^29-1 byte limit")
            cflag = 0 if n == 1 else (1 if i == 0 else (3 if i == n - 1 else 2))
            fh.write(_HEAD.pack(MAGIC, (cflag << 29) | len(part)))
            fh.write(part)
            pad = (4 - len(part) % 4) % 4
            if pad:
                fh.write(b"\x00" * pad)

    def read(self):
        """Next record's bytes, or None at the end of the file."""
        if self.writable:
            raise DataError(f"{self.uri} is open for writing")
        return self._read_at(None)

    def read_at(self, offset, key=None):
        """The record starting at byte `offset` (split records joined); `key` only names it in errors."""
        if self.writable:
            raise DataError(f"{self.uri} is open for writing")
        return self._read_at(int(offset), key=key)

    def _read_at(self, offset, key=None):
        fh = self.handle
        if offset is not None:
            fh.seek(offset)
        chunks = []
        while True:
            where = fh.tell()
            head = fh.read(8)
            if not head and not chunks and offset is None:
                return None
            if len(head) < 8:
                raise DataError(self._where(key, where) + ": truncated record header (file ends early)")
            magic, lrec = _HEAD.unpack(head)
            if magic != MAGIC:
                raise DataError(self._where(key, where) + f": wrong magic 0x{magic:08X}, expected 0x{MAGIC:08X} "
                                "(corrupt file, or the .idx does not belong to this .rec)")
            cflag, length = lrec >> 29, lrec & _LEN_MASK
            data = fh.read(length)
            if len(data) < length:
                raise DataError(self._where(key, where) + f": truncated record, {length} bytes announced, "
                                f"{len(data)} present")
            pad = (4 - length % 4) % 4
            if pad:
                fh.seek(pad, os.SEEK_CUR)
            if cflag == 0:
                if chunks:
                    raise DataError(self._where(key, where) + ": whole record inside a split record")
                return data
            if cflag == 1:
                chunks = [data]
            elif not chunks:
                raise DataError(self._where(key, where) + f": continuation part (cflag {cflag}) without a first part")
            else:
                chunks.append(data)
                if cflag == 3:
                    return _MAGIC_BYTES.join(chunks)

    def _where(self, key, offset):
        k = f" key {key}" if key is not None else ""
        return f"{self.uri}{k} at byte offset {offset}"


class IndexedRecordIO(RecordIO):
    """Random access through the .idx file, as mxnet.recordio.MXIndexedRecordIO(idx_path, uri, flag)."""

    def __init__(self, idx_path, uri, flag, key_type=int):
        self.idx_path = str(idx_path)
        self.key_type = key_type
        self.idx = {}
        self.keys = []
        if flag == "r":
            if not os.path.isfile(self.idx_path):
                raise DataError(f"index file not found: {self.idx_path}; rebuild it from the .rec with "
                                f"`python tools/pack_rec.py reindex {uri}`")
            self._load_index(uri)
        super().__init__(uri, flag)
        if flag == "r":
            size = os.path.getsize(self.uri)
            bad = [k for k in self.keys[-1:] if self.idx[k] >= size]
            if bad:
                raise DataError(f"{self.idx_path}: key {bad[0]} points to byte {self.idx[bad[0]]}, past the end of "
                                f"{self.uri} ({size} bytes); the index belongs to another or truncated file")

    def _load_index(self, uri):
        with open(self.idx_path) as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                fields = line.split("\t")
                if len(fields) != 2:
                    raise DataError(f"{self.idx_path} line {lineno}: expected '<key>\\t<offset>', got {line[:60]!r}")
                try:
                    key, offset = self.key_type(fields[0]), int(fields[1])
                except ValueError:
                    raise DataError(f"{self.idx_path} line {lineno}: key or offset is not a number: {line[:60]!r}")
                if key not in self.idx:
                    self.keys.append(key)
                self.idx[key] = offset

    def close(self):
        if self.writable and self._fh is not None:
            tmp = self.idx_path + ".tmp"
            with open(tmp, "w") as f:
                for key in self.keys:
                    f.write(f"{key}\t{self.idx[key]}\n")
            os.replace(tmp, self.idx_path)
        super().close()

    def seek(self, idx):
        self.handle.seek(self.idx[idx])

    def read_idx(self, idx):
        if idx not in self.idx:
            raise DataError(f"{self.idx_path}: no record with key {idx!r}")
        return self._read_at(self.idx[idx], key=idx)

    def write_idx(self, idx, buf):
        key = self.key_type(idx)
        pos = self.tell()
        self.write(buf)
        if key not in self.idx:
            self.keys.append(key)
        self.idx[key] = pos


def read_index(idx_path):
    """(keys, offsets) of an .idx as int64 arrays in file order, without a per-line Python dict.

    For million-record files: IndexedRecordIO keeps a dict (hundreds of MB at 5M keys); the data layer
    only needs the arrays. A key listed twice keeps its last offset, as in IndexedRecordIO.
    """
    idx_path = str(idx_path)
    if not os.path.isfile(idx_path):
        raise DataError(f"index file not found: {idx_path}; rebuild it from the .rec with "
                        f"`python tools/pack_rec.py reindex <file.rec>`")
    with open(idx_path, "rb") as f:
        fields = f.read().split()
    if len(fields) % 2:
        raise DataError(f"{idx_path}: expected lines '<key>\\t<offset>', found an odd number of fields")
    try:
        table = np.array(fields, dtype=np.int64).reshape(-1, 2)
    except ValueError:
        bad = next(x for x in fields if not x.lstrip(b"-").isdigit())
        raise DataError(f"{idx_path}: key or offset is not an integer: {bad[:40]!r}") from None
    keys, offsets = table[:, 0].copy(), table[:, 1].copy()
    _, first = np.unique(keys[::-1], return_index=True)
    if first.size != keys.size:  # duplicates: keep the first occurrence in file order, with the last offset
        last = keys.size - 1 - first
        order = np.sort(np.unique(keys, return_index=True)[1])
        offset_of = dict(zip(keys[last].tolist(), offsets[last].tolist()))
        keys = keys[order]
        offsets = np.array([offset_of[k] for k in keys.tolist()], dtype=np.int64)
    return keys, offsets


def reindex(rec_path, idx_path=None):
    """Rebuild a lost .idx by scanning the .rec; keys are the record ids of the IRHeaders (mxnet's convention
    for im2rec/face2rec files), or running numbers when ids are not unique."""
    idx_path = idx_path or os.path.splitext(str(rec_path))[0] + ".idx"
    reader = RecordIO(rec_path, "r")
    entries = []
    while True:
        pos = reader.tell()
        buf = reader.read()
        if buf is None:
            break
        header, _ = unpack(buf)
        entries.append((header.id, pos))
    reader.close()
    ids = [e[0] for e in entries]
    if len(set(ids)) != len(ids):
        entries = [(i, pos) for i, (_, pos) in enumerate(entries)]
    tmp = idx_path + ".tmp"
    with open(tmp, "w") as f:
        for key, pos in entries:
            f.write(f"{key}\t{pos}\n")
    os.replace(tmp, idx_path)
    return idx_path, len(entries)
