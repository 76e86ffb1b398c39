"""Check a torch checkpoint (`torch.save`'s zip archive or the legacy pickle stream) before
`torch.load` reads it, so that loading stays bounded.

`torch.load(weights_only=True)` runs no code, but it still lets a small file allocate without
limit: a deflate-compressed record expands on load, `bytearray(2**31)` is on its allow-list,
a storage may claim any size, a tensor may repeat one element a billion times (stride 0), and a
memoized string can be copied again and again. So the pickle is first replayed by `scan`, an
unpickler whose globals are inert stand-ins: nothing is built but small Python containers, and

- only the names `torch.save` writes for dense tensors and plain containers may be called
  (anything else, e.g. `builtins.bytearray`, sparse or meta tensors, is refused, naming it);
- every opcode that creates or grows an object is charged a fixed cost per object or element
  (an upper bound of what CPython, or torch for a tensor, allocates for it), and every call its
  arguments, to a budget of `BUDGET` bytes;
- every storage must be a stored (uncompressed) zip record of exactly the size it claims, or
  (legacy files) all storages together must fit in the file;
- every tensor must be a view of its storage that never repeats an element: no stride 0 on a
  dimension longer than 1, no overlapping strides, no negative stride or offset, and its last
  element inside the storage. Its element count is then at most its storage's.

The file is read into memory once; the zip layout is checked (`check_zip_layout`: no data
before the archive, the end records where both readers look for them, no names that differ
between readers, and torch's own reader listing the very records Python's `zipfile` does), the
pickle scanned, and `torch.load` then reads those same bytes, so what was checked is what is
loaded. It allocates the file's size for storages plus the pickle's containers (at most
`BUDGET`): with the file's own bytes, twice the file's size plus 64 MiB. Written by hand
because neither torch nor pickletools offers such a bounded, non-executing replay, nor a zip
reader that reports what another reader would see differently.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import io
import os
import pickle
import struct
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch

from ..errors import CheckpointError
from ..guards import open_regular_file, short

# What the containers built from a pickle may cost, in bytes (see `_PRICES`): torch.load builds
# the same containers, so that with the file's bytes and its storages a load stays within twice
# the file's size plus 64 MiB.
BUDGET = 64 << 20
MAX_RECORDS = 1 << 16
MAX_DIMS = 64
# The largest weights file read by default: it is read into memory once, then loaded from there.
MAX_FILE_BYTES = 8 << 30
_LOCAL_MAGIC = b"PK\x03\x04"
_LEGACY_PICKLES = 5  # magic number, protocol, sys info, the objects, the storage keys


class RefusedPickle(Exception):
    """The file may not be loaded; the message says why (without the path)."""


class DamagedPickle(RefusedPickle):
    """The file is not a readable torch checkpoint (truncated or damaged)."""


@dataclass
class _Storage:
    key: str
    numel: int
    dtype: torch.dtype


@dataclass
class _Tensor:
    shape: tuple[int, ...]


_STORAGE_DTYPES: dict[str, torch.dtype] = {
    f"torch.{name}": dtype for dtype, name in torch.storage._dtype_to_storage_type_map().items()
}
_STORAGE_DTYPES["torch.storage.UntypedStorage"] = torch.uint8
_STORAGE_DTYPES["torch.UntypedStorage"] = torch.uint8
_NOT_DENSE = {
    "torch._utils._rebuild_sparse_tensor": "a sparse tensor",
    "torch._utils._rebuild_meta_tensor_no_storage": "a meta tensor (shape without data)",
    "torch._utils._rebuild_nested_tensor": "a nested tensor",
    "torch._utils._rebuild_qtensor": "a quantized tensor",
    "torch._utils._rebuild_wrapper_subclass": "a tensor subclass",
    "torch._tensor._rebuild_from_type_v2": "a tensor subclass",
    "torch.serialization._get_layout": "a tensor with a non-dense layout",
}


# What one object or element costs CPython at most (64-bit, with a container's growth slack),
# and torch for a tensor or storage (its TensorImpl or StorageImpl, sizes and strides).
_REF = 24  # a reference pushed on the stack or appended to a list
_ENTRY = 192  # an entry of a dict or set (an OrderedDict's, with its linked-list node)
_MEMO = 160  # a memo entry: its int key and its dict slot
_CALL = 256  # a call's result, or the wrapper a global is looked up as
_TENSOR = 1024  # a tensor or a storage as torch.load builds it
_LIST, _DICT, _SET, _TUPLE = 80, 88, 240, 64  # empty containers, with their stack slot

# opcode -> (fixed cost, cost per item since the last MARK, whether the object it pushes is
# charged its own size too). An opcode missing here costs _CALL.
_PRICES: dict[bytes, tuple[int, int, bool]] = {
    pickle.MARK: (_LIST, 0, False),  # a new stack list
    pickle.EMPTY_LIST: (_LIST, 0, False),
    pickle.EMPTY_DICT: (_DICT, 0, False),
    pickle.EMPTY_SET: (_SET, 0, False),
    pickle.EMPTY_TUPLE: (_REF, 0, False),
    pickle.LIST: (_LIST, _REF, False),
    pickle.DICT: (_DICT, _ENTRY // 2, False),  # keys and values: two items an entry
    pickle.FROZENSET: (_SET, _ENTRY, False),
    pickle.TUPLE: (_TUPLE, _REF, False),
    pickle.TUPLE1: (_TUPLE + _REF, 0, False),
    pickle.TUPLE2: (_TUPLE + 2 * _REF, 0, False),
    pickle.TUPLE3: (_TUPLE + 3 * _REF, 0, False),
    pickle.APPEND: (_REF, 0, False),
    pickle.APPENDS: (0, _REF, False),
    pickle.SETITEM: (_ENTRY, 0, False),
    pickle.SETITEMS: (0, _ENTRY // 2, False),
    pickle.ADDITEMS: (0, _ENTRY, False),
    pickle.OBJ: (_CALL, _REF, False),
    pickle.INST: (_CALL, _REF, False),
    pickle.POP: (0, 0, False),
    pickle.POP_MARK: (0, 0, False),
    pickle.PROTO: (0, 0, False),
    pickle.STOP: (0, 0, False),
}
for _op in (pickle.NONE, pickle.NEWTRUE, pickle.NEWFALSE, pickle.DUP, pickle.PERSID):
    _PRICES[_op] = (_REF, 0, False)
for _op in (pickle.GET, pickle.BINGET, pickle.LONG_BINGET, pickle.BINPERSID):
    _PRICES[_op] = (_REF, 0, False)
for _op in (pickle.PUT, pickle.BINPUT, pickle.LONG_BINPUT, pickle.MEMOIZE):
    _PRICES[_op] = (_MEMO, 0, False)
for _op in (
    pickle.INT,
    pickle.BININT,
    pickle.BININT1,
    pickle.BININT2,
    pickle.LONG,
    pickle.LONG1,
    pickle.LONG4,
    pickle.FLOAT,
    pickle.BINFLOAT,
    pickle.STRING,
    pickle.BINSTRING,
    pickle.SHORT_BINSTRING,
    pickle.UNICODE,
    pickle.BINUNICODE,
    pickle.SHORT_BINUNICODE,
    pickle.BINUNICODE8,
    pickle.BINBYTES,
    pickle.SHORT_BINBYTES,
    pickle.BINBYTES8,
    pickle.BYTEARRAY8,
):  # a number or string read from the pickle: charged its size once built
    _PRICES[_op] = (_REF, 0, True)


def _priced(load: Callable[[Any], None], op: bytes) -> Callable[[Any], None]:
    """`load`, the base unpickler's handler of opcode `op`, charging what it builds first."""
    fixed, per_item, sized = _PRICES.get(op, (_CALL, 0, False))

    def run(self: _Scanner) -> None:
        self.spend(fixed + per_item * len(self.stack))  # the stack holds the items since MARK
        if op == pickle.BUILD:  # the state's entries are copied into the object
            state = self.stack[-1]
            parts = state if isinstance(state, tuple) else (state,)
            self.spend(_ENTRY * sum(len(p) for p in parts if isinstance(p, dict)))
        load(self)
        if sized:
            self.spend(sys.getsizeof(self.stack[-1]))
        elif op == pickle.FRAME:  # a copy of the frame
            frame = self._unframer.current_frame
            self.spend(frame.seek(0, io.SEEK_END) if frame is not None else 0)
            if frame is not None:
                frame.seek(0)

    return run


class _Scanner(pickle._Unpickler):  # the pure-Python one: its memo is a dict, not an array
    proto: int  # set by the base class when it reads the PROTO opcode
    stack: list[Any]  # the items since the last MARK, set by the base class's load()
    memo: dict[int, Any]
    _unframer: Any
    dispatch = {
        code: _priced(load, bytes([code])) for code, load in pickle._Unpickler.dispatch.items()
    }

    def __init__(self, file: BinaryIO, budget: int, storage_bytes: Callable[[str, int], None]):
        super().__init__(file)
        self.budget = budget
        self.storage_bytes = storage_bytes
        self.storages: dict[str, _Storage] = {}

    def release(self) -> None:
        """Drop every object the replay built (in place: the unpickler's bound methods keep
        its stack lists)."""
        for stack in (*getattr(self, "metastack", ()), getattr(self, "stack", [])):
            stack.clear()
        self.memo.clear()
        self.storages.clear()

    # --- charging ------------------------------------------------------------------------

    def spend(self, cost: int) -> None:
        self.budget -= cost
        if self.budget < 0:
            raise RefusedPickle(
                "its pickle builds far more data than it holds (an expansion attack)"
            )

    def _charge(self, args: tuple[Any, ...], per_item: int, extra: int) -> None:
        cost = _CALL + extra
        for a in args:
            if isinstance(a, (str, bytes, bytearray)):
                cost += len(a)
            elif isinstance(a, (list, tuple, dict, set, frozenset)):
                cost += per_item * len(a)
        self.spend(cost)

    def _charged(
        self, func: Callable[..., Any], per_item: int = _ENTRY, extra: int = 0
    ) -> Callable[..., Any]:
        """`func`, charging each call its arguments (`per_item` per element of a container
        argument) and `extra`."""

        def call(*args: Any) -> Any:
            self._charge(args, per_item, extra)
            return func(*args)

        return call

    # --- globals -------------------------------------------------------------------------

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3:  # Python 2 names, as the standard unpickler maps them
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}"
        if full in _NOT_DENSE:
            raise RefusedPickle(
                f"it holds {_NOT_DENSE[full]} ({full}); only dense tensors are loaded"
            )
        if full in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[full]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        simple: dict[str, Callable[..., Any]] = {
            "collections.OrderedDict": OrderedDict,
            "builtins.set": set,
            "builtins.frozenset": frozenset,
            "builtins.complex": complex,
            "torch.Size": tuple,
            "torch.device": str,
            "_codecs.encode": _latin1_encode,
        }
        if full in simple:
            return self._charged(simple[full])
        rebuild: dict[str, Callable[..., Any]] = {
            "torch._utils._rebuild_tensor": self._tensor,
            "torch._utils._rebuild_tensor_v2": self._tensor,
            "torch._utils._rebuild_tensor_v3": self._tensor,
            "torch._utils._rebuild_parameter": self._parameter,
            "torch._utils._rebuild_parameter_with_state": self._parameter,
        }
        if full in rebuild:
            return self._charged(rebuild[full], per_item=_REF, extra=_TENSOR)
        raise RefusedPickle(
            f"it calls {full}, which could run code or allocate without bound "
            "(only tensors and plain containers load)"
        )

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] in ("storage", b"storage")):
            raise RefusedPickle(f"it has an unknown persistent id {str(pid)[:60]}")
        dtype, key, numel = pid[1], str(pid[2]), pid[4]
        if not isinstance(dtype, torch.dtype) or not isinstance(numel, int) or numel < 0:
            raise RefusedPickle(f"storage {key[:40]!r} is malformed")
        if len(pid) > 5 and pid[5] is not None:
            raise RefusedPickle(
                "it uses storage views (a pre-2018 format this loader does not read)"
            )
        if key not in self.storages:
            if len(self.storages) >= MAX_RECORDS:
                raise RefusedPickle(f"it has more than {MAX_RECORDS} storages")
            self.storage_bytes(key, numel * _itemsize(dtype))
            self.spend(_TENSOR + len(key))
            self.storages[key] = _Storage(key, numel, dtype)
        return self.storages[key]

    # --- tensors -------------------------------------------------------------------------

    def _tensor(self, storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> _Tensor:
        if not isinstance(storage, _Storage):
            raise RefusedPickle("a tensor has no storage")
        dims = (
            (offset, *size, *stride)
            if isinstance(size, tuple) and isinstance(stride, tuple)
            else None
        )
        if dims is None or len(size) != len(stride) or len(size) > MAX_DIMS:
            raise RefusedPickle("a tensor has a malformed size or stride")
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
            raise RefusedPickle(
                f"a tensor has a negative or non-integer size, stride or offset {size[:8]}"
            )
        if 0 not in size:
            extent = _extent(size, stride)
            if offset + extent > storage.numel:
                raise RefusedPickle(
                    f"a tensor of size {size[:8]} runs past its storage of {storage.numel} elements"
                )
        return _Tensor(tuple(size))

    def _parameter(self, data: Any, *rest: Any) -> _Tensor:
        if not isinstance(data, _Tensor):
            raise RefusedPickle("a parameter holds no tensor")
        return data


def _extent(size: tuple[int, ...], stride: tuple[int, ...]) -> int:
    """The elements a view of `size` and `stride` spans in its storage, when it never repeats
    one: RefusedPickle for a repeated dimension (stride 0, an expanded view) or overlapping
    strides, whose element count could exceed its storage's without bound."""
    extent = 1
    for n, s in sorted(((n, s) for n, s in zip(size, stride) if n > 1), key=lambda d: d[1]):
        if s == 0:
            raise RefusedPickle(
                f"a tensor of size {size[:8]} repeats its elements (stride 0, an expanded view); "
                "save it with .contiguous()"
            )
        if s < extent:
            raise RefusedPickle(
                f"a tensor of size {size[:8]} has overlapping strides {stride[:8]}; "
                "save it with .contiguous()"
            )
        extent += (n - 1) * s
    return extent


def _latin1_encode(text: Any, encoding: Any = "latin1", *rest: Any) -> bytes:
    """`_codecs.encode` as protocol-2 pickles use it for bytes; no other codec."""
    if not isinstance(text, str) or codecs.lookup(str(encoding)).name != "iso8859-1":
        raise RefusedPickle(f"it calls _codecs.encode with codec {str(encoding)[:20]!r}")
    return text.encode("latin1")


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def scan(data: bytes) -> None:
    """Refuse (RefusedPickle) the bytes of a torch checkpoint that `torch.load` could not read
    within the bound described in the module docstring, or that another zip reader could read
    differently (see `check_zip_layout`)."""
    if data[:4] == _LOCAL_MAGIC:
        _scan_zip(data)
    else:
        if _has_zip_directory(data):
            raise RefusedPickle(
                "it holds a zip archive after other data (torch.load would read the data before "
                "it, a zip reader the archive)"
            )
        _scan_legacy(data)


def _has_zip_directory(data: bytes) -> bool:
    try:
        return zipfile.is_zipfile(io.BytesIO(data))
    except (OSError, ValueError):
        return False


@dataclass(frozen=True)
class _Directory:
    """Where the end records put the central directory: `count` headers in `size` bytes from
    `offset`, ending at `end` (where the zip64 end record, or else the end record, starts)."""

    offset: int
    size: int
    count: int
    end: int


_END = struct.Struct("<4sHHHHIIH")  # signature, disks, entries (here, in all), size, offset
_LOCATOR = struct.Struct("<4sIQI")  # signature, disk of the zip64 end record, its offset, disks
_END64 = struct.Struct("<4sQHHIIQQQQ")  # signature, its size, versions, disks, entries, ...


def check_zip_layout(data: bytes) -> zipfile.ZipFile:
    """The archive in `data`, when every reader sees the same records in it: the end records
    are where both Python's `zipfile` and torch's reader (miniz) look for them and agree
    (`_end_records`), zipfile finds the central directory where they say, its headers fill
    it exactly and carry no comment or foreign extra field, the file starts with the first
    record's local header, the local headers' names are the central ones, no two names are
    equal or collide once cut at a NUL or case-folded (torch's reader matches names without
    case), and torch's own reader lists the same records at the same places. Encrypted,
    compressed or overlapping records are refused too. RefusedPickle/DamagedPickle otherwise."""
    directory = _end_records(data)
    if directory.count > MAX_RECORDS:
        raise RefusedPickle(f"it has {directory.count} zip records, more than {MAX_RECORDS}")
    raw_names = _central_names(data, directory)
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except NotImplementedError as e:  # a zip feature torch.save never uses
        raise RefusedPickle(
            f"its zip directory asks for {e}, which torch.save never writes"
        ) from None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise DamagedPickle(f"its zip directory is damaged ({e})") from None
    records = archive.infolist()
    if archive.start_dir != directory.offset or len(records) != directory.count:
        raise RefusedPickle(
            "its zip end record and its central directory disagree (readers would see "
            "different records)"
        )
    if not records or min(r.header_offset for r in records) != 0:
        raise RefusedPickle("its first zip record does not start the file")
    seen: set[str] = set()
    end = 0
    for r, raw in sorted(zip(records, raw_names), key=lambda x: x[0].header_offset):
        name = r.filename
        if b"\0" in raw:
            raise RefusedPickle(f"zip name {short(raw)} holds a NUL byte (readers cut it apart)")
        folded = name.casefold()
        if folded in seen:
            raise RefusedPickle(
                f"zip name {short(name)} appears twice (up to letter case): readers would pick "
                "different records"
            )
        seen.add(folded)
        if r.flag_bits & 0x1:
            raise RefusedPickle(f"zip record {short(name)} is encrypted")
        if r.compress_type != zipfile.ZIP_STORED:
            raise RefusedPickle(
                f"zip record {short(name)} is compressed (torch.save never compresses)"
            )
        if r.header_offset < end:
            raise RefusedPickle(f"zip record {short(name)} overlaps the one before it")
        end = _local_record_end(data, r, raw)
    if end > archive.start_dir:
        raise RefusedPickle("its zip records run into the central directory")
    _check_torch_reader(data, archive)
    return archive


def _end_records(data: bytes) -> _Directory:
    """The central directory the end records give, read as both readers read them: the end
    record (EOCD) must end the file (no archive comment, which torch.save never writes); a
    zip64 locator in the 20 bytes before it (torch.save writes one, with its zip64 end record
    just before it) must point at that very record, which must agree with the end record.
    Python's zipfile looks for the zip64 record just before the locator, torch's reader where
    the locator points: a locator pointing elsewhere (hidden, say, in the last central header's
    comment) would show each reader another directory."""
    if len(data) < _END.size or data[-_END.size : -_END.size + 4] != b"PK\x05\x06":
        raise DamagedPickle(
            "its zip end record is not at the very end of the file (truncated, or data after it)"
        )
    eocd = len(data) - _END.size
    _, disk, cd_disk, here, count, size, offset, comment = _END.unpack(data[eocd:])
    if comment:
        raise RefusedPickle(
            "its zip end record claims a comment past the end of the file (readers would "
            "find different end records)"
        )
    if disk or cd_disk or here != count:
        raise RefusedPickle("its zip end record describes a multi-disk archive")
    if eocd < _LOCATOR.size or data[eocd - _LOCATOR.size : eocd - 16] != b"PK\x06\x07":
        if count == 0xFFFF or 0xFFFFFFFF in (size, offset):
            raise RefusedPickle("its zip end record asks for a zip64 end record it lacks")
        found = _Directory(offset, size, count, eocd)
    else:
        found = _zip64_directory(data, eocd, (count, size, offset))
    if found.offset + found.size != found.end:
        raise RefusedPickle(
            "its central directory does not end where its end records begin (data hidden "
            "between them, or readers would see different records)"
        )
    return found


def _zip64_directory(data: bytes, eocd: int, end_record: tuple[int, int, int]) -> _Directory:
    """The directory of the zip64 end record just before the locator that precedes `eocd`
    (the end record, whose count, size and offset are `end_record`)."""
    _, disk, where, disks = _LOCATOR.unpack(data[eocd - _LOCATOR.size : eocd])
    start = eocd - _LOCATOR.size - _END64.size
    if disk or disks != 1 or where != start or start < 0:
        raise RefusedPickle(
            "its zip64 locator does not point at the zip64 end record just before it "
            "(readers would see different central directories)"
        )
    sig, length, _, _, disk, cd_disk, here, count, size, offset = _END64.unpack(
        data[start : start + _END64.size]
    )
    if sig != b"PK\x06\x06" or length != _END64.size - 12:
        raise RefusedPickle("its zip64 locator points at no zip64 end record torch.save writes")
    if disk or cd_disk or here != count:
        raise RefusedPickle("its zip64 end record describes a multi-disk archive")
    if end_record != (min(count, 0xFFFF), min(size, 0xFFFFFFFF), min(offset, 0xFFFFFFFF)):
        raise RefusedPickle(
            "its zip64 end record and its end record give different central directories"
        )
    return _Directory(offset, size, count, start)


def _central_names(data: bytes, directory: _Directory) -> list[bytes]:
    """The raw names of the central directory's headers (zipfile cuts names at a NUL byte;
    these are uncut), which must fill it exactly and carry no comment, and no extra field but
    the zip64 one torch.save writes for a record beyond 4 GiB."""
    names = []
    pos = directory.offset
    for _ in range(directory.count):
        header = data[pos : pos + 46]
        if len(header) < 46 or header[:4] != b"PK\x01\x02":
            raise DamagedPickle("its zip central directory is damaged")
        sizes_and_offset = struct.unpack("<II", header[20:28]) + struct.unpack("<I", header[42:46])
        n, m, k, disk = struct.unpack("<HHHH", header[28:36])
        if pos + 46 + n + m + k > directory.offset + directory.size:
            raise DamagedPickle("its zip central directory is damaged")
        name = data[pos + 46 : pos + 46 + n]
        if k:
            raise RefusedPickle(f"zip record {short(name)} has a comment (torch.save writes none)")
        if disk:
            raise RefusedPickle(f"zip record {short(name)} is on another disk")
        extra = data[pos + 46 + n : pos + 46 + n + m]
        zip64 = struct.unpack("<HH", extra[:4]) == (1, m - 4) if m >= 4 else False
        if extra and not (zip64 and 0xFFFFFFFF in sizes_and_offset):
            raise RefusedPickle(
                f"zip record {short(name)} has an extra field torch.save never writes"
            )
        names.append(name)
        pos += 46 + n + m + k
    if pos != directory.offset + directory.size:
        raise RefusedPickle(
            "its central directory headers do not fill the size its end record gives (readers "
            "would see different records)"
        )
    return names


def _check_torch_reader(data: bytes, archive: zipfile.ZipFile) -> None:
    """torch's own zip reader, the one torch.load uses, must list the records zipfile does
    (without the folder they all share, as it names them), each with the same size, local
    header and data offset: both then read the very same bytes for every record. A last check
    that both readers see one archive."""
    records = archive.infolist()
    folder = records[0].filename.partition("/")[0] + "/"  # torch's reader takes the first's
    if any(not r.filename.startswith(folder) for r in records):
        raise RefusedPickle(f"its zip records are not all in one folder ({short(folder)})")
    ours = {r.filename[len(folder) :]: _placement(data, r) for r in records}
    try:
        # its stubs lack the offset methods the binding has
        reader: Any = torch._C.PyTorchFileReader(io.BytesIO(data))
        names = reader.get_all_records()
        theirs = {
            name: (
                reader.get_record_size(name),
                reader.get_record_header_offset(name),
                reader.get_record_offset(name),
            )
            for name in names
        }
    except Exception as e:  # miniz reports a damaged archive as RuntimeError, in many ways
        reason = str(e).splitlines()[0][:100] if str(e) else type(e).__name__
        raise DamagedPickle(f"torch's zip reader cannot read it ({reason})") from None
    if len(names) != len(ours) or theirs != ours:
        raise RefusedPickle(
            "torch's zip reader sees other records than Python's zipfile (readers disagree)"
        )


def _placement(data: bytes, r: zipfile.ZipInfo) -> tuple[int, int, int]:
    """Record `r`'s size, local header offset and data offset, as zipfile reads them."""
    n, m = struct.unpack("<HH", data[r.header_offset + 26 : r.header_offset + 30])
    return r.file_size, r.header_offset, r.header_offset + 30 + n + m


def _read(archive: zipfile.ZipFile, name: str) -> bytes:
    """The bytes of record `name`, as zipfile reads them."""
    try:
        return archive.read(name)
    except NotImplementedError as e:  # a zip feature torch.save never uses
        raise RefusedPickle(
            f"its {short(name)} uses a zip feature torch.save never writes ({e})"
        ) from None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise DamagedPickle(f"its {short(name)} cannot be read ({e})") from None


def _local_record_end(data: bytes, r: zipfile.ZipInfo, central_name: bytes) -> int:
    """The end offset of record `r`'s local header and data; refuses a local header that is
    missing or whose name or sizes differ from the central directory's."""
    pos = r.header_offset
    header = data[pos : pos + 30]
    if len(header) < 30 or header[:4] != _LOCAL_MAGIC:
        raise RefusedPickle(
            f"zip record {short(r.filename)} has no local header at the offset its directory gives"
        )
    flags, size = struct.unpack("<H", header[6:8])[0], struct.unpack("<I", header[22:26])[0]
    n, m = struct.unpack("<HH", header[26:30])
    if data[pos + 30 : pos + 30 + n] != central_name:
        raise RefusedPickle(
            f"zip record {short(r.filename)}: its local name "
            f"{short(data[pos + 30 : pos + 30 + n])} differs from its directory name"
        )
    if flags & 0x1:
        raise RefusedPickle(f"zip record {short(r.filename)} is encrypted")
    if not flags & 0x8 and size not in (r.compress_size, 0xFFFFFFFF):
        raise RefusedPickle(
            f"zip record {short(r.filename)}: its local size differs from its directory size"
        )
    end = pos + 30 + n + m + r.compress_size
    if end > len(data):
        raise DamagedPickle(f"zip record {short(r.filename)} runs past the end of the file")
    return end


def _scan_zip(data: bytes) -> None:
    archive = check_zip_layout(data)
    records = archive.infolist()
    by_name = {r.filename: r for r in records}
    if sum(r.file_size for r in records) > len(data):
        raise RefusedPickle("its zip records claim more bytes than the file has")
    pickles = [
        r for r in records if r.filename.endswith("/data.pkl") and r.filename.count("/") == 1
    ]
    if len(pickles) != 1:
        raise RefusedPickle("it is a zip archive but not one torch.save wrote (no single data.pkl)")
    prefix = pickles[0].filename[: -len("data.pkl")]
    if any(not r.filename.startswith(prefix) for r in records):
        raise RefusedPickle("its zip records are not all in the folder of its data.pkl")

    def storage_bytes(key: str, nbytes: int) -> None:
        record = by_name.get(f"{prefix}data/{key}")
        if record is None:
            raise RefusedPickle(f"storage {key[:40]!r} has no data record")
        if record.file_size != nbytes:
            raise RefusedPickle(
                f"storage {key[:40]!r} claims {nbytes} bytes but its record has {record.file_size}"
            )

    pickle_bytes = _read(archive, pickles[0].filename)
    _run(io.BytesIO(pickle_bytes), storage_bytes)


def _scan_legacy(data: bytes) -> None:
    size = len(data)
    claimed = 0

    def storage_bytes(key: str, nbytes: int) -> None:
        nonlocal claimed
        claimed += nbytes
        if claimed > size:
            raise RefusedPickle("its storages claim more bytes than the file has")

    stream = io.BytesIO(data)  # a length a pickle claims is then never allocated
    for _ in range(_LEGACY_PICKLES):
        start = stream.tell()
        if start >= size:
            break
        _run(stream, storage_bytes)


def replay(data: bytes, storage_bytes: Callable[[str, int], None]) -> Any:
    """The object the pickle `data` describes, built from inert stand-ins (a tensor is its
    shape) within `BUDGET`; `storage_bytes(key, nbytes)` is called for each new storage and
    may refuse it. RefusedPickle/DamagedPickle as `scan`."""
    return _run(io.BytesIO(data), storage_bytes)


def _run(f: BinaryIO, storage_bytes: Callable[[str, int], None]) -> Any:
    scanner = _Scanner(f, BUDGET, storage_bytes)
    try:
        return scanner.load()
    except RefusedPickle:
        raise
    except RecursionError:
        raise RefusedPickle("its pickle nests too deeply") from None
    except MemoryError:
        raise RefusedPickle("its pickle is too large to check") from None
    except Exception as e:  # a damaged pickle fails in many ways
        reason = str(e).splitlines()[0][:100] if str(e) else type(e).__name__
        raise DamagedPickle(f"its pickle is damaged ({reason})") from None
    finally:  # the exception's traceback keeps the scanner: drop what it built now
        scanner.release()


def read_file(path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of the regular file `path`, read once; CheckpointError naming it when larger
    than `max_bytes` or unreadable."""
    try:
        with open_regular_file(path, "checkpoint") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise CheckpointError(
                    f"{path}: has {size} bytes, more than the {max_bytes} a checkpoint may have "
                    "here (raise max_bytes if the file is trusted)"
                )
            return f.read(size)
    except (FileNotFoundError, CheckpointError):
        raise
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None


def loads(data: bytes, path: str | os.PathLike, what: str = "torch checkpoint") -> Any:
    """`torch.load(weights_only=True)` on CPU of the very bytes `scan` approved (`data`, read
    from `path`); CheckpointError with one line naming the file otherwise (nothing in it is
    executed either way)."""
    try:
        scan(data)
    except DamagedPickle as e:
        raise CheckpointError(
            f"{path}: not a readable {what}, truncated or damaged? ({e})"
        ) from None
    except RefusedPickle as e:
        raise CheckpointError(
            f"{path}: not a readable {what}: refused to load: {e}; nothing in it was "
            "executed. If you trust its source, unpickle it yourself in a session you "
            "control and save its state dict with torch.save or safetensors."
        ) from None
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged pickle or zip archive fails in many ways
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{path}: not a readable {what}, truncated or damaged? ({reason})"
        ) from None


def load(
    path: str | os.PathLike, what: str = "torch checkpoint", max_bytes: int = MAX_FILE_BYTES
) -> Any:
    """`loads` of the file `path`, read once into memory: what is scanned is what is loaded."""
    return loads(read_file(path, max_bytes), path, what)
