"""MXNet's RecordIO files (.rec data, .idx index) read and written in plain Python, byte for byte as mxnet does.

Scripts written for `mxnet.recordio` port by changing the import: the same names (RecordIO for MXRecordIO,
IndexedRecordIO for MXIndexedRecordIO, IRHeader, pack, unpack) take the same arguments.

The format, as dmlc-core and mxnet define it:

    frame     4 bytes magic 0xCED7230A, 4 bytes (kind << 29 | length), `length` bytes, zeros up to a multiple of 4
    kind      0 = a whole record; 1, 2, 3 = first, middle, last piece of a record. A writer cuts a record
              wherever the magic's 4 bytes sit at an offset divisible by 4, and leaves those 4 bytes out; a
              reader puts them back between the pieces. So no frame's content ever looks like a frame start.
    .idx      one text line per record: key, a tab, the byte offset of the record's first frame
    record    image header '<IfQQ' = (flag, label, id, id2); when flag > 0 the float label is unused and flag
              float32 labels follow; the rest is the encoded image (or nothing, for insightface's meta records)

Readers open their file lazily and again in every new process, so DataLoader workers each have their own handle
instead of sharing the parent's file offset.
"""
import numbers
import os
import struct
from typing import Any, NamedTuple

import numpy as np

from ..errors import DataError

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
FRAME = struct.Struct("<II")
KIND_SHIFT = 29
LENGTH_MASK = (1 << KIND_SHIFT) - 1
WHOLE, FIRST, MIDDLE, LAST = 0, 1, 2, 3
IMAGE_HEADER = struct.Struct("<IfQQ")

# the short names arcface/data/layout.py reads the framing with
_HEAD, _LEN_MASK, _IR_FORMAT, _IR_SIZE = FRAME, LENGTH_MASK, IMAGE_HEADER.format, IMAGE_HEADER.size


class IRHeader(NamedTuple):
    """The image header of a record: label is a float, or a float32 array when flag > 0."""
    flag: int
    label: Any
    id: int
    id2: int


def pack(header, payload):
    """One record's bytes. A numeric label is stored in the header (flag 0); a sequence of labels is stored
    after it as float32 and its length becomes the flag, whatever flag the caller gave."""
    _, label, record_id, id2 = header
    if isinstance(label, numbers.Real):
        return IMAGE_HEADER.pack(0, float(label), int(record_id), int(id2)) + bytes(payload)
    labels = np.asarray(label, dtype="<f4").ravel()
    return IMAGE_HEADER.pack(labels.size, 0.0, int(record_id), int(id2)) + labels.tobytes() + bytes(payload)


def unpack(record):
    """(IRHeader, payload) of one record's bytes; the inverse of pack."""
    if len(record) < IMAGE_HEADER.size:
        raise DataError(f"record of {len(record)} bytes is shorter than the {IMAGE_HEADER.size}-byte IRHeader")
    flag, label, record_id, id2 = IMAGE_HEADER.unpack_from(record)
    body = record[IMAGE_HEADER.size:]
    if flag > 0:
        if len(body) < 4 * flag:
            raise DataError(f"record header announces {flag} float labels but only {len(body)} bytes follow")
        label = np.frombuffer(body, dtype="<f4", count=flag).astype(np.float32)
        body = body[4 * flag:]
    return IRHeader(flag, label, record_id, id2), body


def _aligned_magic_offsets(data):
    """Offsets divisible by 4 at which the magic's bytes occur: where a writer must cut the record."""
    at = data.find(MAGIC_BYTES)
    while at >= 0:
        if at % 4:
            at = data.find(MAGIC_BYTES, at + 1)
        else:
            yield at
            at = data.find(MAGIC_BYTES, at + 4)


def _pieces(data):
    """(kind, bytes) frames for one record."""
    cuts = list(_aligned_magic_offsets(data))
    if not cuts:
        return [(WHOLE, data)]
    starts = [0] + [cut + 4 for cut in cuts]
    ends = cuts + [len(data)]
    kinds = [FIRST] + [MIDDLE] * (len(cuts) - 1) + [LAST]
    return [(kind, data[a:b]) for kind, a, b in zip(kinds, starts, ends)]


class RecordIO:
    """A .rec file read or written front to back ('r' or 'w'); read_at jumps to a known offset."""

    def __init__(self, uri, flag):
        if flag not in ("r", "w"):
            raise ValueError(f"flag must be 'r' or 'w', got {flag!r}")
        self.uri = str(uri)
        self.flag = flag
        self.writable = flag == "w"
        self._file = None
        self._owner_pid = None
        if self.writable:
            self._open()
        elif not os.path.isfile(self.uri):
            raise DataError(f"RecordIO file not found: {self.uri}")

    def _open(self):
        self._file = open(self.uri, "wb" if self.writable else "rb")
        self._owner_pid = os.getpid()

    @property
    def handle(self):
        """This process's file object (a forked reader opens its own)."""
        if self._file is None or self._owner_pid != os.getpid():
            if self.writable and self._file is not None:
                raise DataError(f"{self.uri}: a RecordIO writer cannot be used after fork")
            self._open()
        return self._file

    def __getstate__(self):  # pickled into DataLoader workers without the open file
        return {**self.__dict__, "_file": None, "_owner_pid": None}

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None

    def reset(self):
        """Back to the start (a writer starts the file again, empty)."""
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

    def tell(self):
        return self.handle.tell()

    # -- writing -------------------------------------------------------------------------------------
    def write(self, buf):
        if not self.writable:
            raise DataError(f"{self.uri} is open for reading")
        out = self.handle
        for kind, piece in _pieces(bytes(buf)):
            if len(piece) > LENGTH_MASK:
                raise DataError(f"{self.uri}: record part of {len(piece)} bytes exceeds the 2^29-1 byte limit")
            out.write(FRAME.pack(MAGIC, (kind << KIND_SHIFT) | len(piece)))
            out.write(piece)
            out.write(b"\x00" * (-len(piece) % 4))

    # -- reading -------------------------------------------------------------------------------------
    def read(self):
        """The next record's bytes, or None at the end of the file."""
        if self.writable:
            raise DataError(f"{self.uri} is open for writing")
        return self._read_record(key=None, at_end_ok=True)

    def read_at(self, offset, key=None):
        """The record whose first frame starts at byte `offset`; `key` only serves to name it in errors."""
        if self.writable:
            raise DataError(f"{self.uri} is open for writing")
        self.handle.seek(int(offset))
        return self._read_record(key=key, at_end_ok=False)

    def _read_record(self, key, at_end_ok):
        pieces = []
        while True:
            start = self.handle.tell()
            frame = self._read_frame(key, start, at_end_ok=at_end_ok and not pieces)
            if frame is None:
                return None
            kind, data = frame
            if kind == WHOLE:
                if pieces:
                    raise DataError(self._where(key, start) + ": whole record inside a split record")
                return data
            if kind == FIRST:
                pieces = [data]
                continue
            if not pieces:
                raise DataError(self._where(key, start) + f": continuation part (cflag {kind}) without a first part")
            pieces.append(data)
            if kind == LAST:
                return MAGIC_BYTES.join(pieces)

    def _read_frame(self, key, start, at_end_ok):
        """(kind, bytes) of the frame at the current position; None at a clean end of file if allowed."""
        source = self.handle
        head = source.read(FRAME.size)
        if not head and at_end_ok:
            return None
        if len(head) < FRAME.size:
            raise DataError(self._where(key, start) + ": truncated record header (file ends early)")
        magic, word = FRAME.unpack(head)
        if magic != MAGIC:
            raise DataError(self._where(key, start) + f": wrong magic 0x{magic:08X}, expected 0x{MAGIC:08X} "
                            "(corrupt file, or the .idx does not belong to this .rec)")
        length = word & LENGTH_MASK
        data = source.read(length)
        if len(data) < length:
            raise DataError(self._where(key, start) + f": truncated record, {length} bytes announced, "
                            f"{len(data)} present")
        if length % 4:
            source.seek(-length % 4, os.SEEK_CUR)
        return word >> KIND_SHIFT, data

    def _where(self, key, offset):
        named = f" key {key}" if key is not None else ""
        return f"{self.uri}{named} at byte offset {offset}"


class IndexedRecordIO(RecordIO):
    """A .rec file with its .idx: records by key. Arguments in mxnet's order (idx_path, uri, flag)."""

    def __init__(self, idx_path, uri, flag, key_type=int):
        self.idx_path = str(idx_path)
        self.key_type = key_type
        self.idx = {}   # key -> byte offset
        self.keys = []  # keys in file order, each once
        if flag == "r":
            if not os.path.isfile(self.idx_path):
                raise DataError(f"index file not found: {self.idx_path}; rebuild it from the .rec with "
                                f"`python tools/pack_rec.py reindex {uri}`")
            self._read_index_file()
        super().__init__(uri, flag)
        if flag == "r" and self.keys:
            size = os.path.getsize(self.uri)
            last = self.keys[-1]
            if self.idx[last] >= size:
                raise DataError(f"{self.idx_path}: key {last} points to byte {self.idx[last]}, past the end of "
                                f"{self.uri} ({size} bytes); the index belongs to another or truncated file")

    def _remember(self, key, offset):
        if key not in self.idx:
            self.keys.append(key)
        self.idx[key] = offset

    def _read_index_file(self):
        with open(self.idx_path) as f:
            for number, line in enumerate(f, 1):
                text = line.strip()
                if not text:
                    continue
                fields = text.split("\t")
                if len(fields) != 2:
                    raise DataError(f"{self.idx_path} line {number}: expected '<key>\\t<offset>', got {text[:60]!r}")
                try:
                    self._remember(self.key_type(fields[0]), int(fields[1]))
                except ValueError:
                    raise DataError(f"{self.idx_path} line {number}: key or offset is not a number: "
                                    f"{text[:60]!r}") from None

    def close(self):
        if self.writable and self._file is not None:
            lines = "".join(f"{key}\t{self.idx[key]}\n" for key in self.keys)
            partial = self.idx_path + ".tmp"
            with open(partial, "w") as f:
                f.write(lines)
            os.replace(partial, self.idx_path)
        super().close()

    def seek(self, idx):
        self.handle.seek(self.idx[idx])

    def read_idx(self, idx):
        if idx not in self.idx:
            raise DataError(f"{self.idx_path}: no record with key {idx!r}")
        return self.read_at(self.idx[idx], key=idx)

    def write_idx(self, idx, buf):
        offset = self.tell()
        self.write(buf)
        self._remember(self.key_type(idx), offset)


def read_index(idx_path):
    """(keys, offsets) of an .idx as int64 arrays in file order, without a per-line Python dict.

    For million-record files: IndexedRecordIO keeps a dict (hundreds of MB at 5M keys); the data layer
    only needs the arrays. A key listed twice keeps its first place and its last offset, as in IndexedRecordIO.
    A malformed line is a DataError naming the file and the line.
    """
    idx_path = str(idx_path)
    if not os.path.isfile(idx_path):
        raise DataError(f"index file not found: {idx_path}; rebuild it from the .rec with "
                        f"`python tools/pack_rec.py reindex <file.rec>`")
    with open(idx_path, "rb") as f:
        data = f.read()
    parsed = _parse_plain_index(data)
    table, lines = parsed if parsed is not None else _parse_index_lines(data, idx_path)
    negative = np.flatnonzero(table[:, 1] < 0)
    if negative.size:
        i = int(negative[0])
        raise DataError(f"{idx_path} line {int(lines[i])}: key {int(table[i, 0])} has the negative byte offset "
                        f"{int(table[i, 1])}")
    keys, offsets = table[:, 0].copy(), table[:, 1].copy()
    unique, first_place = np.unique(keys, return_index=True)
    if unique.size != keys.size:
        last_place = keys.size - 1 - np.unique(keys[::-1], return_index=True)[1]
        offset_of = dict(zip(unique.tolist(), offsets[last_place].tolist()))
        keys = keys[np.sort(first_place)]
        offsets = np.array([offset_of[k] for k in keys.tolist()], dtype=np.int64)
    return keys, offsets


_DIGITS = b"0123456789-"


def _parse_plain_index(data):
    """([n, 2] int64 table, line numbers) of an index in mxnet's exact form, or None for anything else.

    No per-line Python, so a 5M-line index costs a few bytes-level passes: only digits and '-' between the
    separators, the separators exactly tab, newline, tab, newline, ... (or tab, CRLF) and two fields per line. Then every line
    is one key and one offset and nothing can shift a field into the next line's place. Anything else goes to
    the line-by-line reader.
    """
    separators = data.translate(None, _DIGITS)
    line_end = b"\r\n" if separators.endswith(b"\r\n") else b"\n"  # an index saved on Windows reads alike
    per_line = 1 + len(line_end)
    if (not data.endswith(line_end) or len(separators) % per_line
            or separators != (b"\t" + line_end) * (len(separators) // per_line)):
        return None
    fields = data.split()
    if len(fields) != 2 * (len(separators) // per_line):
        return None
    try:
        table = np.array(fields, dtype=np.int64).reshape(-1, 2)
    except (ValueError, OverflowError):
        return None
    return table, np.arange(1, table.shape[0] + 1)


def _parse_index_lines(data, idx_path):
    """The careful reader: blank lines, spaces and CRLF are accepted; the first malformed line is named."""
    rows, lines = [], []
    for number, line in enumerate(data.split(b"\n"), 1):
        fields = line.split()
        if not fields:
            continue
        row = tuple(_index_field(f) for f in fields) if len(fields) == 2 else None
        if row is None or None in row:
            shown = line.strip().decode("utf-8", "replace")[:60]
            problem = (f"expected '<key>\\t<offset>', got {shown!r} ({len(fields)} fields)" if row is None else
                       f"key or offset is not an integer (64-bit): {shown!r}")
            raise DataError(f"{idx_path} line {number}: {problem}")
        rows.append(row)
        lines.append(number)
    return np.array(rows, dtype=np.int64).reshape(-1, 2), np.array(lines, dtype=np.int64)


def _index_field(field):
    """int of one .idx field, or None when it is not a 64-bit integer."""
    try:
        value = int(field)
    except ValueError:
        return None
    return value if -2**63 <= value < 2**63 else None


def reindex(rec_path, idx_path=None):
    """Rebuild a lost .idx by scanning the .rec; keys are the record ids of the IRHeaders (mxnet's convention
    for im2rec/face2rec files), or running numbers when ids are not unique."""
    idx_path = idx_path or os.path.splitext(str(rec_path))[0] + ".idx"
    reader = RecordIO(rec_path, "r")
    entries = []
    while True:
        offset = reader.tell()
        record = reader.read()
        if record is None:
            break
        entries.append((unpack(record)[0].id, offset))
    reader.close()
    if len({key for key, _ in entries}) != len(entries):
        entries = [(number, offset) for number, (_, offset) in enumerate(entries)]
    partial = idx_path + ".tmp"
    with open(partial, "w") as f:
        f.writelines(f"{key}\t{offset}\n" for key, offset in entries)
    os.replace(partial, idx_path)
    return idx_path, len(entries)
