"""Check a torch checkpoint (`torch.save`'s zip archive or the legacy pickle stream) before
`torch.load` reads it, so that loading stays bounded.

`torch.load(weights_only=True)` runs no code, but it still lets a small file allocate without
limit: a deflate-compressed record expands on load, `bytearray(2**31)` is on its allow-list,
a storage may claim any size, and a memoized string can be copied again and again. So the
pickle is first replayed by `scan`, an unpickler whose globals are inert stand-ins: nothing is
built but small Python containers, and

- only the names `torch.save` writes for dense tensors and plain containers may be called
  (anything else, e.g. `builtins.bytearray`, sparse or meta tensors, is refused, naming it);
- every call's arguments are charged to a budget of a few times the pickle's size;
- every storage must be a stored (uncompressed) zip record of exactly the size it claims, or
  (legacy files) all storages together must fit in the file;
- every tensor's size and stride must fit inside its storage.

The file is read into memory once; the zip layout is checked (`check_zip_layout`: no data
before the archive, no names that differ between readers), the pickle scanned, and `torch.load`
then reads those same bytes, so what was checked is what is loaded. It allocates at most the
file's size for storages plus the pickle's containers: twice the file's size in all. Written by
hand because neither torch nor pickletools offers such a bounded, non-executing replay, nor a
zip reader that reports what another reader would see differently.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import io
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch

from ..errors import CheckpointError
from ..guards import open_regular_file, short

# What the containers built from the pickle may cost, as a multiple of the pickle's size (plus
# a constant): each call is charged the length of its arguments.
BUDGET_FACTOR = 4
BUDGET_BASE = 1 << 20
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


class _Scanner(pickle._Unpickler):  # the pure-Python one: its memo is a dict, not an array
    proto: int  # set by the base class when it reads the PROTO opcode

    def __init__(self, file: BinaryIO, budget: int, storage_bytes: Callable[[str, int], None]):
        super().__init__(file)
        self.budget = budget
        self.storage_bytes = storage_bytes
        self.storages: dict[str, _Storage] = {}

    # --- charging ------------------------------------------------------------------------

    def _charge(self, args: tuple[Any, ...]) -> None:
        cost = 64
        for a in args:
            if isinstance(a, (str, bytes, bytearray, list, tuple, dict, set, frozenset)):
                cost += 8 * len(a) if isinstance(a, (list, tuple, dict, set, frozenset)) else len(a)
        self.budget -= cost
        if self.budget < 0:
            raise RefusedPickle(
                "its pickle builds far more data than it holds (an expansion attack)"
            )

    def _charged(self, func: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            self._charge(args)
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
            return self._charged(rebuild[full])
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
            raise RefusedPickle(f"a tensor has a negative or non-integer size {size[:8]}")
        if 0 not in size:
            last = offset + sum((n - 1) * s for n, s in zip(size, stride))
            if last >= storage.numel:
                raise RefusedPickle(
                    f"a tensor of size {size[:8]} runs past its storage of {storage.numel} elements"
                )
        return _Tensor(tuple(size))

    def _parameter(self, data: Any, *rest: Any) -> _Tensor:
        if not isinstance(data, _Tensor):
            raise RefusedPickle("a parameter holds no tensor")
        return data


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


def check_zip_layout(data: bytes) -> zipfile.ZipFile:
    """The archive in `data`, when every reader sees the same records in it: the file starts
    with the first record's local header, the central directory's names are those of the local
    headers, and no two names are equal or collide once cut at a NUL or case-folded (torch's
    reader matches names without case). Encrypted, compressed or overlapping records are
    refused too. RefusedPickle/DamagedPickle otherwise."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except NotImplementedError as e:  # a zip feature torch.save never uses
        raise RefusedPickle(
            f"its zip directory asks for {e}, which torch.save never writes"
        ) from None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise DamagedPickle(f"its zip directory is damaged ({e})") from None
    records = archive.infolist()
    if len(records) > MAX_RECORDS:
        raise RefusedPickle(f"it has {len(records)} zip records, more than {MAX_RECORDS}")
    if not records or min(r.header_offset for r in records) != 0:
        raise RefusedPickle("its first zip record does not start the file")
    raw_names = _central_names(data, archive.start_dir, len(records))
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
    return archive


def _central_names(data: bytes, start: int, count: int) -> list[bytes]:
    """The raw names of the central directory's `count` headers from offset `start` (zipfile
    cuts names at a NUL byte; these are uncut)."""
    names = []
    pos = start
    for _ in range(count):
        header = data[pos : pos + 46]
        if len(header) < 46 or header[:4] != b"PK\x01\x02":
            raise DamagedPickle("its zip central directory is damaged")
        n, m, k = struct.unpack("<HHH", header[28:34])
        names.append(data[pos + 46 : pos + 46 + n])
        pos += 46 + n + m + k
    return names


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

    try:
        pickle_bytes = archive.read(pickles[0])
    except NotImplementedError as e:  # a zip feature torch.save never uses
        raise RefusedPickle(
            f"its data.pkl uses a zip feature torch.save never writes ({e})"
        ) from None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise DamagedPickle(f"its data.pkl cannot be read ({e})") from None
    _run(io.BytesIO(pickle_bytes), len(pickle_bytes), storage_bytes)


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
        _run(stream, size - start, storage_bytes)


def _run(f: BinaryIO, nbytes: int, storage_bytes: Callable[[str, int], None]) -> None:
    scanner = _Scanner(f, BUDGET_BASE + BUDGET_FACTOR * nbytes, storage_bytes)
    try:
        scanner.load()
    except RefusedPickle:
        raise
    except RecursionError:
        raise RefusedPickle("its pickle nests too deeply") from None
    except MemoryError:
        raise RefusedPickle("its pickle is too large to check") from None
    except Exception as e:  # a damaged pickle fails in many ways
        reason = str(e).splitlines()[0][:100] if str(e) else type(e).__name__
        raise DamagedPickle(f"its pickle is damaged ({reason})") from None


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
