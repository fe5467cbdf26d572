"""What an image file may be before ITK opens it: self-contained, and no bigger than it says.

ITK follows references in some headers: a MetaImage ``ElementDataFile`` other than ``LOCAL``
(a path, a ``LIST`` of paths, a ``%d`` pattern), a detached NRRD's ``data file:`` field, an
Analyze or NIfTI header-only file (``.hdr`` beside ``.img``), a Stimulate ``.spr`` (beside
``.sdt``), a Bruker ``2dseq`` (beside its parameter files), an HDF5/MINC file (external
datasets and links). A header like that turns "read this upload" into "read that file on the
server", so :func:`check_image_file` refuses them all from the header text, before any reader
runs: training data, ``kubeseg predict`` and the service go through it (:func:`kubeseg.imageio.read_sitk`).

Header parsing here is our own and deliberately stricter than ITK's: keys are compared without
case, spaces, ``_`` or ``-`` (``element data file``, ``ElementDataFile``, ``DATAFILE``), and
anything ambiguous is refused rather than guessed.

Decompression: :func:`bounded_gzip_size` inflates a gzip stream in chunks and stops at a cap,
so a "gzip bomb" costs at most the cap in CPU and a chunk in memory.
"""

from __future__ import annotations

import gzip
import re
import zlib
from pathlib import Path

from kubeseg.errors import KubesegError

HEADER_SCAN_BYTES = 64 * 1024  # text headers longer than this are refused (ITK's are a few hundred bytes)
GZIP_CHUNK = 1 << 20
GZIP_SLACK_BYTES = 1 << 20  # a NIfTI .gz may hold this much beyond what its header declares (padding)

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_REFUSED_SUFFIXES = {
    ".hdr": "an Analyze/NIfTI header-only file (its voxels are read from a separate .img file)",
    ".img": "the data half of an Analyze/NIfTI .hdr/.img pair (read through a separate header)",
    ".spr": "a Stimulate header (its voxels are read from a separate .sdt file)",
    ".sdt": "the data half of a Stimulate .spr/.sdt pair",
    ".h5": "HDF5 (external datasets and links can point at other files)",
    ".hdf5": "HDF5 (external datasets and links can point at other files)",
    ".hdf": "HDF5 (external datasets and links can point at other files)",
    ".mnc": "MINC (HDF5: external datasets and links can point at other files)",
}
_SELF_CONTAINED = "send a single self-contained file: NIfTI (.nii/.nii.gz), NRRD with attached data, MetaImage .mha"


class UnsafeImageError(KubesegError):
    """An image file that would make a reader open other files, or expand beyond its header."""

    def __init__(self, name: str, problem: str):
        super().__init__(f"{name}: {problem}")
        self.name = name
        self.problem = problem


def _norm_key(key: str) -> str:
    return re.sub(r"[\s_\-]+", "", key).lower()


def _lines(text: bytes) -> list[str]:
    return text.decode("latin-1").replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _suffixes(name: str) -> list[str]:
    lower = name.lower()
    out = [Path(lower).suffix]
    if lower.endswith(".gz") or lower.endswith(".bz2"):
        out.append(Path(lower[: lower.rfind(".")]).suffix)
    return out


def check_image_file(path: str | Path, name: str | None = None) -> str:
    """Refuse files that reference other files; returns the recognised kind (nifti, nifti_gz,
    nrrd, metaimage, dicom, other). ``name`` is how messages call the file (default: its path).

    Raises :class:`UnsafeImageError` naming the file and the reason.
    """
    path = Path(path)
    name = name or str(path)
    if path.is_dir():
        return "folder"  # a DICOM series folder: GDCM reads only the files in it
    for suffix in _suffixes(path.name):
        if suffix in _REFUSED_SUFFIXES:
            raise UnsafeImageError(name, f"{_REFUSED_SUFFIXES[suffix]}; {_SELF_CONTAINED}")
    if path.name.lower() == "2dseq":
        raise UnsafeImageError(name, f"a Bruker 2dseq file (read together with its parameter files); {_SELF_CONTAINED}")
    with open(path, "rb") as f:
        head = f.read(HEADER_SCAN_BYTES)
    size = path.stat().st_size
    if head[:2] == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as g:
                inner = g.read(HEADER_SCAN_BYTES)
        except (OSError, EOFError, zlib.error):
            return "gzip_corrupt"  # the reader reports a corrupt file
        kind = _check_content(inner, name, None)
        return "nifti_gz" if kind == "nifti" else f"{kind}_gz"
    return _check_content(head, name, size)


def _check_content(head: bytes, name: str, size: int | None) -> str:
    nifti = _nifti_kind(head)
    if nifti == "single":
        return "nifti"
    if nifti == "pair":
        raise UnsafeImageError(name, "a NIfTI header-only file (magic ni1/ni2: its voxels are read from a separate "
                                     f".img file); {_SELF_CONTAINED}")
    if nifti == "analyze":
        raise UnsafeImageError(name, f"an Analyze 7.5 header (its voxels are read from a separate .img file); "
                                     f"{_SELF_CONTAINED}")
    if any(head[off:off + 8] == _HDF5_MAGIC for off in (0, 512, 1024, 2048, 4096, 8192, 16384, 32768)):
        raise UnsafeImageError(name, f"HDF5/MINC (external datasets and links can point at other files); "
                                     f"{_SELF_CONTAINED}")
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"NRRD"):
        _check_nrrd(head, name, size)
        return "nrrd"
    stripped = head.lstrip(b" \t\r\n\xef\xbb\xbf")
    if stripped[:8].lower().startswith(b"numdim"):
        raise UnsafeImageError(name, f"a Stimulate header (its voxels are read from a separate .sdt file); "
                                     f"{_SELF_CONTAINED}")
    if looks_like_metaimage(stripped):
        _check_metaimage(head, name, size)
        return "metaimage"
    return "other"


def _nifti_kind(head: bytes) -> str | None:
    """single (n+1/n+2), pair (ni1/ni2), analyze (a 348-byte header without NIfTI magic), or None."""
    if len(head) < 348:
        return None
    for order in ("little", "big"):
        size = int.from_bytes(head[:4], order)
        if size == 348:
            magic = head[344:348]
            if magic[:3] == b"n+1":
                return "single"
            if magic[:3] == b"ni1":
                return "pair"
            # Analyze 7.5: same header size, no magic; regular='r' at byte 38 by convention
            return "analyze"
        if size == 540 and len(head) >= 12:
            magic = head[4:8]
            if magic[:3] == b"n+2":
                return "single"
            if magic[:3] == b"ni2":
                return "pair"
    return None


_NRRD_DATA_KEYS = {"datafile"}


def _check_nrrd(head: bytes, name: str, size: int | None) -> None:
    """A NRRD header ends at the first empty line; ``data file``/``datafile`` makes it detached."""
    end = re.search(rb"\r?\n\r?\n", head)
    if end is None and (size is None or size > len(head)):
        raise UnsafeImageError(name, f"the NRRD header does not end within {HEADER_SCAN_BYTES} bytes")
    text = head[: end.start()] if end else head
    for line in _lines(text)[1:]:
        if line.lstrip().startswith("#"):
            continue
        key = line.split(":", 1)[0]
        if _norm_key(key) in _NRRD_DATA_KEYS or _norm_key(key).startswith("datafile"):
            raise UnsafeImageError(name, f"a detached NRRD header ('{line.strip()[:80]}': its voxels are read from "
                                         f"another file); {_SELF_CONTAINED}")


_META_KEYS = {"objecttype", "ndims", "dimsize", "elementtype", "elementspacing", "elementdatafile", "headersize",
              "binarydata", "binarydatabyteordermsb", "compresseddata", "compresseddatasize", "transformmatrix",
              "offset", "position", "origin", "centerofrotation", "anatomicalorientation", "elementnumberofchannels",
              "comment", "objectsubtype", "transformtype", "name", "id", "parentid", "elementsize",
              "elementbyteordermsb", "elementmin", "elementmax", "modality", "sequenceid", "orientation", "rotation"}


def looks_like_metaimage(head: bytes) -> bool:
    first = _lines(head[:512])[0]
    m = re.match(r"\s*([A-Za-z][A-Za-z0-9_ \-]*?)\s*[=:]", first)
    return bool(m) and _norm_key(m.group(1)) in _META_KEYS


def _check_metaimage(head: bytes, name: str, size: int | None) -> None:
    """MetaIO reads ``key = value`` lines up to ``ElementDataFile``; only ``LOCAL`` (data follows) is accepted."""
    offset = 0
    fields: dict[str, str] = {}
    for raw in head.split(b"\n"):
        offset += len(raw) + 1
        line = raw.decode("latin-1").strip()
        if not line:
            continue
        m = re.match(r"([^=:]*?)\s*[=:]\s*(.*)$", line)
        if not m:
            raise UnsafeImageError(name, f"the MetaImage header has a line that is not 'key = value': {line[:60]!r}")
        key, value = m.group(1), m.group(2).strip()
        norm = _norm_key(key)
        fields[norm] = value
        if norm == "elementdatafile":
            if key != "ElementDataFile":
                raise UnsafeImageError(name, f"the MetaImage header spells ElementDataFile as {key!r}; refused as "
                                             "ambiguous")
            if value.upper() != "LOCAL":
                raise UnsafeImageError(name, f"a MetaImage header whose ElementDataFile is {value[:80]!r}: its "
                                             f"voxels would be read from another file; {_SELF_CONTAINED}")
            _check_meta_compression(fields, name, size, offset)
            return
        if norm in ("elementdatafilelist", "elementdatafiles"):
            raise UnsafeImageError(name, f"a MetaImage header with {key!r}: its voxels would be read from other files")
        if offset >= len(head):
            break
    raise UnsafeImageError(name, f"the MetaImage header has no 'ElementDataFile = LOCAL' line within its first "
                                 f"{HEADER_SCAN_BYTES} bytes")


def _check_meta_compression(fields: dict[str, str], name: str, size: int | None, data_start: int) -> None:
    if fields.get("headersize", "0").strip() not in ("0", ""):
        raise UnsafeImageError(name, f"a MetaImage header with HeaderSize = {fields['headersize'][:20]} (only "
                                     "meaningful for a separate data file)")
    declared = fields.get("compresseddatasize")
    if declared is None or size is None:
        return
    try:
        n = int(declared.split()[0])
    except (ValueError, IndexError):
        raise UnsafeImageError(name, f"CompressedDataSize = {declared[:30]!r} is not a number") from None
    available = max(size - data_start, 0)
    if n < 0 or n > available:
        raise UnsafeImageError(name, f"CompressedDataSize = {n} but the file holds {available} bytes after its "
                                     "header (a lying size would make the reader allocate it)")


def bounded_gzip_size(path: str | Path, cap: int) -> int:
    """Bytes a gzip file inflates to, counted in chunks; stops (returns ``cap + 1``) as soon as it
    passes ``cap``. Raises OSError/EOFError/zlib.error for a corrupt or truncated stream."""
    total = 0
    with gzip.open(path, "rb") as g:
        while True:
            chunk = g.read(min(GZIP_CHUNK, cap + 1 - total))
            if not chunk:
                return total
            total += len(chunk)
            if total > cap:
                return total


def nifti_declared_bytes(head: bytes) -> int | None:
    """vox_offset + voxels × bytes per voxel from a NIfTI-1 header (None if it is not one or is absurd)."""
    import numpy as np

    if _nifti_kind(head) != "single" or 348 not in (int.from_bytes(head[:4], "little"),
                                                     int.from_bytes(head[:4], "big")):
        return None  # NIfTI-2 (540-byte header) is left to the readers' own length checks
    order = "<" if int.from_bytes(head[:4], "little") == 348 else ">"
    dims = np.frombuffer(head[40:56], dtype=f"{order}i2")
    bitpix = int(np.frombuffer(head[72:74], dtype=f"{order}i2")[0])
    vox_offset = float(np.frombuffer(head[108:112], dtype=f"{order}f4")[0])
    ndim = int(dims[0])
    if not 1 <= ndim <= 7 or bitpix <= 0 or not np.isfinite(vox_offset) or vox_offset < 0:
        return None
    voxels = 1
    for d in dims[1:ndim + 1]:
        if d < 0:
            return None
        voxels *= int(d)
    return int(vox_offset) + voxels * bitpix // 8


def check_gzip_nifti_expansion(path: str | Path, name: str | None = None, slack: int = GZIP_SLACK_BYTES) -> None:
    """Refuse a ``.nii.gz`` whose stream inflates to more than its header declares (+ ``slack``)."""
    name = name or str(path)
    try:
        with gzip.open(path, "rb") as g:
            head = g.read(352)
    except (OSError, EOFError, zlib.error):
        return  # corrupt: the reader says so
    expected = nifti_declared_bytes(head)
    if expected is None:
        return
    try:
        total = bounded_gzip_size(path, expected + slack)
    except (OSError, EOFError, zlib.error):
        return  # truncated or corrupt: the reader and the NIfTI integrity check say so
    if total > expected + slack:
        raise UnsafeImageError(name, f"the gzip stream inflates to more than the {expected} bytes its NIfTI header "
                                     "declares (a decompression bomb?); refused after reading "
                                     f"{expected + slack} bytes")
