"""Reading and writing images through SimpleITK, with checks that turn bad input into one clear error.

This module and the Slicer glue are the only places that meet file-format conventions; everything they
return is in the engine's frame (LPS mm, arrays ``(Z, Y, X)``, see :mod:`DeepRegistrationLib.core.grid`).
Readable: anything SimpleITK reads (NIfTI ``.nii/.nii.gz``, NRRD ``.nrrd/.nhdr``, MetaImage
``.mha/.mhd``, ...) and folders holding one DICOM series.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import locale
import logging
import os
import sys
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from ..core.errors import InputError
from ..core.grid import Grid
from ..core.image import Image
from .background import write_threads

logger = logging.getLogger(__name__)

WRITABLE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")



# NIfTI-1/-2 float datatypes: code -> numpy dtype (ITK's NIfTI reader silently turns NaN into 0,
# so NaN voxels are only visible in the raw file).
_NIFTI_FLOATS = {16: "f4", 64: "f8"}


def _nifti_nonfinite_count(path: Path, chunk_bytes: int = 1 << 26) -> int:
    """Number of NaN/Inf voxels in a float NIfTI file, read raw (0 for other types or formats).

    The header is read first: only a float file's voxels are read again, in chunks of ``chunk_bytes`` (an
    integer CT of 60 M voxels is not decompressed a second time, and no second copy of a large image is held).
    """
    name = path.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        return 0
    opener = gzip.open if name.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read(540)
            for endian in ("<", ">"):
                size = int(np.frombuffer(raw, endian + "i4", 1, 0)[0])
                if size == 348:  # NIfTI-1
                    code = int(np.frombuffer(raw, endian + "i2", 1, 70)[0])
                    dims = np.frombuffer(raw, endian + "i2", 8, 40).astype(np.int64)
                    offset = int(np.frombuffer(raw, endian + "f4", 1, 108)[0])
                    break
                if size == 540:  # NIfTI-2
                    code = int(np.frombuffer(raw, endian + "i2", 1, 12)[0])
                    dims = np.frombuffer(raw, endian + "i8", 8, 16)
                    offset = int(np.frombuffer(raw, endian + "i8", 1, 168)[0])
                    break
            else:
                return 0
            if code not in _NIFTI_FLOATS:
                return 0
            dtype = np.dtype(endian + _NIFTI_FLOATS[code])
            count = int(np.prod(dims[1:1 + max(1, min(int(dims[0]), 7))]))
            fh.seek(offset)
            bad, left = 0, count
            step = max(1, chunk_bytes // dtype.itemsize)
            while left > 0:
                data = np.frombuffer(fh.read(min(left, step) * dtype.itemsize), dtype)
                if data.size == 0:
                    break
                bad += int((~np.isfinite(data)).sum())
                left -= data.size
            return bad
    except (OSError, EOFError, ValueError, IndexError):
        return 0


def _read_sitk(path: str | os.PathLike, what: str) -> sitk.Image:
    """Reads a file or a DICOM series folder; raises InputError naming ``what`` on any failure."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what}: '{p}' does not exist. Check the path (relative paths start from "
                         f"'{Path.cwd()}').")
    if p.is_dir():
        with _DICOM_LOCK, _keep_locale():  # the locale is the process's: one DICOM read at a time
            return _read_dicom_series(p, what)
    try:
        return sitk.ReadImage(str(p))
    except RuntimeError as exc:
        raise InputError(f"{what}: '{p}' is not a readable image ({_first_line(exc)}). Use NIfTI, NRRD, "
                         "MetaImage or a DICOM series folder.") from None


#: Serializes DICOM series reads: GDCM may switch the process locale, and :func:`_keep_locale` restores the one it
#: saved, so two reads in parallel threads could leave the "C" locale behind (images may be read in threads).
_DICOM_LOCK = threading.Lock()


@contextlib.contextmanager
def _keep_locale():
    """Restores the process locale after a GDCM call. GDCM can switch the process to the "C" locale (its
    DICOM writer does), after which Python's default text encoding is silently ASCII for the rest of the
    process; reading must never leave that behind in a user's session (e.g. Slicer's)."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        try:
            locale.setlocale(locale.LC_ALL, saved)
        except locale.Error:  # a mixed-category locale string: restore the one that matters for text
            locale.setlocale(locale.LC_CTYPE, saved.split(";")[0].split("=")[-1])


def _read_dicom_series(p: Path, what: str) -> sitk.Image:
    """The largest DICOM series in folder ``p``."""
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(p))
    if not ids:
        raise InputError(f"{what}: folder '{p}' holds no DICOM series. Give an image file "
                         "(.nii.gz, .nrrd, .mha) or a folder of DICOM slices.")
    files_per_series = {sid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(p), sid) for sid in ids}
    sid = max(files_per_series, key=lambda s: len(files_per_series[s]))
    if len(ids) > 1:
        logger.warning("%s: folder %s holds %d DICOM series; using the largest (%s, %d files)",
                       what, p, len(ids), sid, len(files_per_series[sid]))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files_per_series[sid])
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"{what}: the DICOM series in '{p}' cannot be read ({_first_line(exc)}).") from None


def _first_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if "Exception" not in ln and "sitk::ERROR" not in ln and not ln.startswith("/"):
            return ln[:200]
    return (lines[-1] if lines else type(exc).__name__)[:200]


def _check_3d(img: sitk.Image, path, what: str) -> None:
    dim = img.GetDimension()
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{what}: '{path}' has {img.GetNumberOfComponentsPerPixel()} components per voxel "
                         "(a vector or color image). Give a scalar 3D image (extract one channel first).")
    if dim != 3:
        raise InputError(f"{what}: '{path}' is a {dim}D image of size {img.GetSize()}. DeepRegistration "
                         "registers 3D volumes: give a 3D image (for 4D data, extract one time point first).")
    if min(img.GetSize()) < 2:
        raise InputError(f"{what}: '{path}' has size {img.GetSize()}, a single slice. Give a 3D volume with at "
                         "least 2 voxels along every axis.")


def sitk_to_image(img: sitk.Image, name: str = "image", dtype=np.float32) -> Image:
    """Converts a 3D scalar SimpleITK image to an :class:`Image` (array ``(Z, Y, X)``, LPS grid)."""
    return Image(np.asarray(sitk.GetArrayFromImage(img), dtype=dtype), Grid.from_sitk(img), name)


def image_to_sitk(image: Image) -> sitk.Image:
    """Converts an :class:`Image` to SimpleITK (bool arrays become uint8)."""
    arr = image.array.astype(np.uint8) if image.array.dtype == bool else image.array
    out = sitk.GetImageFromArray(np.ascontiguousarray(arr), isVector=False)
    image.grid.apply_to_sitk(out)
    return out


#: Stored integer pixel types whose images are written back in that type (``warped.nii.gz``,
#: :func:`stored_integer_type`): 16 bits and more (CT's int16: a linear interpolation rounded to whole HU). 8-bit
#: images keep float32 (a rounding to 1/255 of their range would be visible).
WRITTEN_INTEGER_TYPES = (np.dtype(np.int16), np.dtype(np.uint16), np.dtype(np.int32), np.dtype(np.uint32))


def stored_type(path: str | os.PathLike) -> np.dtype | None:
    """The numpy type an image file stores its (scalar) voxels in, from its header only (SimpleITK's image
    information); None for DICOM folders, vector images and anything unreadable."""
    p = Path(path)
    if p.is_dir():
        return None
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(p))
        reader.ReadImageInformation()
        if reader.GetNumberOfComponents() != 1:
            return None
        return np.dtype(sitk.GetArrayViewFromImage(sitk.Image([1] * reader.GetDimension(),
                                                              reader.GetPixelID())).dtype)
    except (RuntimeError, TypeError):
        return None


def stored_integer_type(path: str | os.PathLike) -> type | None:
    """The numpy integer type an image file stores its voxels in (:func:`stored_type`), for the types of 16 bits or
    more that a warped image is written back in (:func:`written_integer_type`); else None (DICOM folders, float
    or 8-bit files, anything unreadable). Reads only the header."""
    return written_integer_type(stored_type(path))


def written_integer_type(stored: np.dtype | None) -> type | None:
    """``stored`` (a file's voxel type, :func:`stored_type`) as the numpy type a warped image of it is written in
    when it is one of :data:`WRITTEN_INTEGER_TYPES` (16 bits or more: a CT's int16 stays int16); else None (the
    warped image is float32)."""
    return stored.type if stored is not None and stored in WRITTEN_INTEGER_TYPES else None


#: Stored types :func:`read_image` keeps as they are with ``keep_integer``: the integers exact in float32 (every
#: value of 16 bits or fewer) among the types a file's warped image is written back in
#: (:func:`stored_integer_type`): a CT's int16. 8-bit files and DICOM series stay float32, as their warped image
#: (a warp that keeps its input's dtype would round a uint8 array, where the float32 copy's warp does not).
KEPT_INTEGER_TYPES = (np.dtype(np.int16), np.dtype(np.uint16))


class _SitkBuffer:
    """Holds a SimpleITK image and presents its voxel buffer (``__array_interface__``): an array made from it keeps
    the image, and so its buffer, alive for as long as the array (or any view of it) lives."""

    __slots__ = ("image", "__array_interface__")

    def __init__(self, image: sitk.Image, view: np.ndarray, writeable: bool = True):
        self.image = image
        self.__array_interface__ = {**view.__array_interface__,
                                    "data": (view.__array_interface__["data"][0], not writeable)}


def owning_view(image: sitk.Image, view: np.ndarray, writeable: bool = True) -> np.ndarray:
    """``view`` (``GetArrayViewFromImage(image)``, which does not keep ``image`` alive) as an array that does: its
    base holds ``image`` (the buffer is this image's alone, ``GetArrayViewFromImage`` made it unique). Writeable
    unless ``writeable`` is False (an image handed to a background writer while the array is still read)."""
    return np.asarray(_SitkBuffer(image, view, writeable))


def read_image(path: str | os.PathLike, name: str = "image", keep_integer: bool = False) -> Image:
    """Reads an intensity image as float32 (or, with ``keep_integer``, int16/uint16 as stored) and checks that it
    can be registered.

    The checks look at the stored voxels once: the minimum and maximum (on the stored array, before the float32
    copy; an integer type cannot hold NaN or Inf, and the stored array is counted voxel by voxel only when its
    minimum or maximum is not finite; a float NIfTI file's raw voxels are still counted as before,
    ``_nifti_nonfinite_count``). Safe to call from several threads at once (SimpleITK reads without Python's lock).

    Args:
        path: Image file or DICOM series folder.
        name: What it is ("fixed image", ...), used in error messages.
        keep_integer: Keep an int16 or uint16 file (:data:`KEPT_INTEGER_TYPES`; not a DICOM series) in its
            stored type instead of converting it to float32, as SimpleITK's own buffer (no copy; the array's base
            holds the SimpleITK image). Every such value is exact in float32, so a consumer that converts what it
            reads (:func:`~DeepRegistrationLib.registration.preprocess.prepare`, ``warp_image``) computes the same
            bits as from the float32 copy, without that copy (a 0.75 mm CT of 86.5 M voxels holds 173 MB instead
            of 346 MB). For callers whose consumers handle such arrays (the ``register`` path); a consumer that
            keeps its input's dtype (``warp_image`` without ``dtype=``) gives int16.

    Returns:
        The image (array ``(Z, Y, X)`` float32, or the stored int16/uint16 with ``keep_integer``; grid in LPS mm).

    Raises:
        InputError: missing/unreadable file, not 3D, vector image, NaN/Inf voxels, constant image.
    """
    img = _read_sitk(path, name)
    _check_3d(img, path, name)
    stored = sitk.GetArrayViewFromImage(img)  # ITK's buffer, no copy (``img`` outlives every use below)
    keep = keep_integer and stored.dtype in KEPT_INTEGER_TYPES and not Path(path).is_dir()
    with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes Inf in the copy, as it is counted
        # float32 rounding is monotonic: the float32 copy's extremes are the stored extremes, rounded
        lo, hi = np.float32(stored.min()), np.float32(stored.max())
        n_bad = 0
        if not (np.isfinite(lo) and np.isfinite(hi)):  # NaN propagates into min/max, Inf is an extreme
            # then the float32 copy holds at least one non-finite voxel: counted for the message, and it raises
            n_bad = int(stored.size - np.count_nonzero(np.isfinite(stored.astype(np.float32))))
    n_bad = n_bad or _nifti_nonfinite_count(Path(path))
    if n_bad:
        raise InputError(f"{name}: '{path}' contains {n_bad} NaN or infinite voxels. Replace them "
                         "(e.g. with 0 or the background value) before registering.")
    if float(hi) - float(lo) <= 1e-6 * max(1.0, abs(float(hi))):
        raise InputError(f"{name}: '{path}' is constant (every voxel is {float(np.float32(stored.flat[0])):g}); "
                         "there is nothing to align. Check that the right file was given.")
    # the kept integers are ITK's buffer itself, the array owning ``img`` (no copy: a copy of a 0.75 mm CT's 173 MB
    # costs 0.2-0.7 CPU s of fresh pages, and both would be held at once)
    image = Image(owning_view(img, stored) if keep else stored.astype(np.float32), Grid.from_sitk(img), name)
    logger.info("read %s %s: %s", name, path, image.grid)
    return image


def _reference_grid(reference: Grid | Callable[[], Grid] | None) -> Grid | None:
    """``reference`` itself, or what it returns when it is a callable (called when the check is reached)."""
    return reference() if callable(reference) else reference


def read_label_image(path: str | os.PathLike, name: str = "labels",
                     reference: Grid | Callable[[], Grid] | None = None) -> Image:
    """Reads a label map (integer values; 0 = background) as int32.

    Args:
        path: Label image file or DICOM folder.
        name: What it is, for messages.
        reference: When given, the label map must lie on this grid (the grid of its image); or a callable
            returning that grid, called only once the file is read and checked up to that point (a reader in
            another thread can wait there for its image).

    Raises:
        InputError: unreadable, not 3D, non-integer values, no label, or a grid other than ``reference``.
    """
    img = _read_sitk(path, name)
    _check_3d(img, path, name)
    arr = sitk.GetArrayViewFromImage(img)  # no copy: ``img`` outlives its use
    if np.issubdtype(arr.dtype, np.integer):
        labels = arr.astype(np.int32)  # what rounding first would give, without the rounded copy
    else:
        if not np.all(np.isfinite(arr)) or not np.allclose(arr, np.round(arr)):
            raise InputError(f"{name}: '{path}' holds non-integer values; a label map must hold integer "
                             "labels (0 = background). Did you pass an intensity image?")
        labels = np.round(arr).astype(np.int32)
    image = Image(labels, Grid.from_sitk(img), name)
    reference = _reference_grid(reference)
    if reference is not None and not image.grid.same_as(reference, tol=1e-3):
        raise InputError(f"{name}: '{path}' is not on the grid of its image ({image.grid} vs {reference}). "
                         "Resample the label map onto its image's grid (nearest neighbour) first.")
    if not (image.array > 0).any():
        raise InputError(f"{name}: '{path}' holds no label (all voxels are 0). Give a label map with at "
                         "least one labelled structure.")
    return image


def read_mask(path: str | os.PathLike, name: str = "mask", reference: Grid | Callable[[], Grid] | None = None) -> Image:
    """Reads a binary mask (non-zero = inside) as bool; checks emptiness and then the overlap with ``reference``
    (a grid, or a callable returning it as in :func:`read_label_image`) when given."""
    img = _read_sitk(path, name)
    _check_3d(img, path, name)
    image = Image(sitk.GetArrayViewFromImage(img) != 0, Grid.from_sitk(img), name)
    if not image.array.any():
        raise InputError(f"{name}: '{path}' is empty (no non-zero voxel). Give a mask that covers the "
                         "region to register, or leave the mask out.")
    reference = _reference_grid(reference)
    if reference is not None and image.grid.overlap_fraction(reference) <= 0:
        raise InputError(f"{name}: '{path}' does not overlap its image in physical space. Check that the "
                         "mask belongs to this image.")
    return image


def write_image(image: Image, path: str | os.PathLike, compress: bool = True, threads: int | None = None) -> Path:
    """Writes an image (NIfTI, NRRD or MetaImage by suffix). The caller decides about overwriting.

    A compressed ``.nii.gz`` is gzipped on up to ``threads`` threads (:func:`write_sitk_image`)."""
    return write_sitk_image(image_to_sitk(image), path, compress, threads)


def write_sitk_image(img: sitk.Image, path: str | os.PathLike, compress: bool = True,
                     threads: int | None = None) -> Path:
    """Writes what :func:`image_to_sitk` made (same file as :func:`write_image` of its image).

    A ``.nii.gz`` with ``compress`` is SimpleITK's uncompressed NIfTI (the same header and voxel bytes as its
    ``.nii.gz`` holds) gzipped by :func:`gzip_file` on up to ``threads`` threads (default: :func:`gzip_threads`)
    at :data:`GZIP_LEVEL`, written under a temporary name in the same folder and renamed into place (nothing
    half-written is left under ``path``). Other formats, and ``compress=False``, are SimpleITK's own writer.
    """
    p = Path(path)
    if not str(p).lower().endswith(WRITABLE_SUFFIXES):
        raise InputError(f"cannot write '{p}': use one of {', '.join(WRITABLE_SUFFIXES)}")
    if not (compress and str(p).lower().endswith(".nii.gz")):
        sitk.WriteImage(img, str(p), compress)
        return p
    token = f"{os.getpid()}-{threading.get_ident()}"
    raw = p.with_name(f".{p.name}.{token}.nii")
    part = p.with_name(f".{p.name}.{token}.part")
    try:
        try:
            sitk.WriteImage(img, str(raw), False)
        except RuntimeError as exc:  # SimpleITK's message, naming the file asked for
            raise RuntimeError(str(exc).replace(str(raw), str(p))) from None
        try:
            gzip_file(raw, part, threads=threads)
            os.replace(part, p)
        except OSError as exc:  # the error SimpleITK's writer raises for a file it cannot write
            raise RuntimeError(f"nifti library failed to write image: {p} ({exc.strerror or exc})") from exc
    finally:
        for leftover in (raw, part):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
    return p


#: zlib level of the ``.nii.gz`` files written (:func:`write_sitk_image`). Measured on a 0.75 mm CT warped into
#: int16 (173 MB raw, 1 thread): level 1 3.0 CPU s -> 72.1 MB, 2 3.2 s -> 71.2 MB, 3 3.9 s -> 69.2 MB,
#: 6 11.1 s -> 68.6 MB; ITK's own writer ~4 s -> 68.4 MB, on one thread only.
GZIP_LEVEL = 1
#: Uncompressed bytes per block compressed on its own thread (each block primed with the 32 KB before it).
GZIP_BLOCK_BYTES = 8 << 20
#: The most threads :func:`gzip_threads` gives by default.
GZIP_MAX_THREADS = 4


def gzip_threads() -> int:
    """Threads a ``.nii.gz`` is compressed on by default: torch's intra-op thread count when torch is loaded (the
    engine's ``threads`` setting), else the CPU count; at most :data:`GZIP_MAX_THREADS`."""
    torch = sys.modules.get("torch")
    n = torch.get_num_threads() if torch is not None and hasattr(torch, "get_num_threads") else os.cpu_count()
    return max(1, min(int(n or 1), GZIP_MAX_THREADS))


def gzip_file(src: str | os.PathLike, dst: str | os.PathLike, level: int | None = None, threads: int | None = None,
              block_bytes: int | None = None) -> None:
    """Gzips the file ``src`` into ``dst`` (overwritten) at zlib ``level`` (default :data:`GZIP_LEVEL`) as one
    gzip member, its blocks deflated in parallel.

    Each block of ``block_bytes`` (default :data:`GZIP_BLOCK_BYTES`) is deflated on its own (on up to
    ``threads`` threads; zlib runs without Python's lock) with the 32 KB before it as its dictionary, and ends on a
    byte boundary (a sync flush) so that the blocks join into one deflate stream, as ``pigz`` does: any gzip
    reader reads it (zlib, Python's ``gzip``, ITK, nibabel, VTK), it decompresses to exactly ``src``'s bytes, and
    its bytes do not depend on ``threads``.
    ``threads + 2`` buffers of a block are held, reused block after block (read, in flight, read ahead). On a
    background writer's thread the blocks in flight are at most
    :func:`~DeepRegistrationLib.io.background.write_threads` (1 while the caller computes, ``threads`` once it
    waits for the writes), asked again at every block.
    """
    level = GZIP_LEVEL if level is None else int(level)
    threads = gzip_threads() if threads is None else max(1, int(threads))
    block_bytes = max(1 << 16, int(GZIP_BLOCK_BYTES if block_bytes is None else block_bytes))

    def deflate(block: bytes, primer: bytes, last: bool) -> bytes:
        c = zlib.compressobj(level, zlib.DEFLATED, -15, 8, zlib.Z_DEFAULT_STRATEGY, *((primer,) if primer else ()))
        return c.compress(block) + c.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)

    xfl = 4 if level == 1 else 2 if level == 9 else 0
    crc, size = 0, 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        # the blocks are read into a ring of reused buffers (no fresh 8 MB allocation per block): a buffer is read
        # into again only after the block it held was deflated (at most ``threads`` blocks in flight, one read
        # ahead); a small file gets no more buffers than its blocks (+ 1 for the read that finds its end), each
        # no larger than the file
        length = os.fstat(fin.fileno()).st_size
        ring = [memoryview(bytearray(max(1, min(block_bytes, length))))
                for _ in range(min(threads + 2, length // block_bytes + 2))]

        def read(n: int) -> memoryview:
            buf, got = ring[n % len(ring)], 0
            while got < block_bytes and (r := fin.readinto(buf[got:])):
                got += r
            return buf[:got]

        fout.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00" + bytes([xfl, 255]))  # no name, mtime 0, OS unknown
        pool = ThreadPoolExecutor(threads, thread_name_prefix="deepregistration-gzip") if threads > 1 else None
        pending: list = []
        try:
            n, primer = 0, b""
            block = read(n)
            while True:
                following = read(n + 1)  # one block ahead: the last one is flushed as the stream's end
                last = not len(following)
                crc = zlib.crc32(block, crc)
                size += len(block)
                if pool is None:
                    fout.write(deflate(block, primer, last))
                else:
                    pending.append(pool.submit(deflate, block, primer, last))
                    while pending and (last or len(pending) >= write_threads(threads)):
                        fout.write(pending.pop(0).result())
                if last:
                    break
                primer, block, n = bytes(block[-32768:]), following, n + 1
        finally:
            if pool is not None:
                for f in pending:
                    f.cancel()
                pool.shutdown(wait=True)
        fout.write(crc.to_bytes(4, "little") + (size & 0xFFFFFFFF).to_bytes(4, "little"))


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MB chunks), for manifests and model cards."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
