"""Read, validate and write images and labels (SimpleITK), and export ``.seg.nrrd``.

Every check raises :class:`~ALSegLib.errors.InputError` naming the file and the
problem. Inputs: NIfTI (``.nii``/``.nii.gz``), NRRD, MetaImage (``.mha``/``.mhd``)
and DICOM series folders. Geometry (spacing, origin, direction) is carried in
double precision from input to the project's NRRD files.
"""
from __future__ import annotations

import gzip
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import atomic
from .errors import InputError

IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".seg.nrrd", ".nrrd", ".mha", ".mhd")
LABEL_EXPORT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha", ".seg.nrrd")  # single files only: no .mhd + .raw

# Label and image grids must agree within these tolerances (millimetres for the
# origin, relative for spacing, absolute for direction cosines). Loose enough for
# NIfTI's float32 header fields, tight enough to catch a different grid.
SPACING_RTOL = 1e-4
ORIGIN_ATOL_MM = 1e-3
DIRECTION_ATOL = 1e-4


def image_extension(path: str | Path) -> str | None:
    """The supported extension of ``path`` (``.nii.gz`` counts as one), or None."""
    name = Path(path).name.lower()
    for ext in IMAGE_EXTENSIONS:
        if name.endswith(ext) and len(name) > len(ext):
            return ext
    return None


def strip_extension(path: str | Path) -> str:
    name = Path(path).name
    ext = image_extension(name)
    return name[: len(name) - len(ext)] if ext else name


def unsupported_type(path: str | Path) -> InputError:
    return InputError(path, f"unsupported file type; expected one of {', '.join(IMAGE_EXTENSIONS)} or a DICOM folder")


def dicom_series(folder: Path) -> tuple[str, ...]:
    """DICOM series ids in ``folder`` (GDCM's "no series found" warning kept quiet)."""
    if not folder.is_dir():
        return ()
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        return tuple(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def is_dicom_folder(folder: Path) -> bool:
    return bool(dicom_series(folder))


@dataclass(frozen=True)
class Geometry:
    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, img: sitk.Image | sitk.ImageFileReader) -> Geometry:
        return cls(tuple(img.GetSize()), img.GetSpacing(), img.GetOrigin(), img.GetDirection())

    @classmethod
    def read(cls, path: str | Path) -> Geometry:
        """Geometry from a file header only (no voxel data read)."""
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            raise InputError(path, f"cannot read image header: {_itk_reason(exc)}") from None
        return cls.of(reader)

    def apply(self, img: sitk.Image) -> None:
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(self.direction)

    def differences(self, other: Geometry) -> list[str]:
        """Human-readable differences beyond the tolerances (empty if they match)."""
        out = []
        if self.size != other.size:
            out.append(f"size {other.size} != image size {self.size}")
        if not np.allclose(other.spacing, self.spacing, rtol=SPACING_RTOL, atol=0):
            out.append(f"spacing {_fmt(other.spacing)} != image spacing {_fmt(self.spacing)}")
        if not np.allclose(other.origin, self.origin, rtol=0, atol=ORIGIN_ATOL_MM):
            out.append(f"origin {_fmt(other.origin)} != image origin {_fmt(self.origin)}")
        if not np.allclose(other.direction, self.direction, rtol=0, atol=DIRECTION_ATOL):
            out.append(f"direction {_fmt(other.direction)} != image direction {_fmt(self.direction)}")
        return out


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def _check_nifti_payload(path: Path) -> None:
    """Refuse a truncated or corrupt NIfTI file, and float data with NaN/Inf.

    ITK reads a short NIfTI file without complaint (the missing voxels come back
    as zeros) and turns NaN into 0, so both are checked on the raw bytes here:
    the header's expected data size against what the file (or its gzip stream)
    holds, and float voxels for non-finite values.
    """
    compressed = path.name.lower().endswith(".gz")
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as fh:
            payload = fh.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise InputError(path, f"truncated or corrupt gzip data ({exc})") from None
    if len(payload) < 348:
        raise InputError(path, f"truncated NIfTI header ({len(payload)} bytes)")
    for endian in "<>":
        sizeof_hdr = struct.unpack(endian + "i", payload[:4])[0]
        if sizeof_hdr == 348:
            datatype, bitpix = struct.unpack(endian + "2h", payload[70:74])
            dims = struct.unpack(endian + "8h", payload[40:56])
            offset = int(struct.unpack(endian + "f", payload[108:112])[0])
            break
        if sizeof_hdr == 540 and len(payload) >= 540:
            datatype, bitpix = struct.unpack(endian + "2h", payload[12:16])
            dims = struct.unpack(endian + "8q", payload[16:80])
            offset = struct.unpack(endian + "q", payload[168:176])[0]
            break
    else:
        raise InputError(path, "corrupt NIfTI header (sizeof_hdr is neither 348 nor 540)")
    ndim = dims[0]
    if not 1 <= ndim <= 7 or any(d < 1 for d in dims[1 : ndim + 1]) or bitpix <= 0 or offset < 0:
        raise InputError(path, f"corrupt NIfTI header (dim {list(dims[: ndim + 1]) if 0 <= ndim <= 7 else ndim}, "
                               f"bitpix {bitpix})")
    count = int(np.prod(dims[1 : ndim + 1], dtype=np.int64))
    expected = offset + count * bitpix // 8
    if len(payload) < expected:
        raise InputError(path, f"truncated NIfTI file: {len(payload)} bytes of data, the header needs {expected}")
    float_types = {16: "f4", 64: "f8"}  # NIfTI datatype codes FLOAT32, FLOAT64
    if datatype in float_types:
        data = np.frombuffer(payload, dtype=endian + float_types[datatype], count=count, offset=offset)
        bad = int(count - np.count_nonzero(np.isfinite(data)))
        if bad:
            kinds = "/".join(k for k, f in (("NaN", np.isnan), ("Inf", np.isinf)) if f(data).any())
            raise InputError(path, f"image has {bad} non-finite voxels ({kinds})")


def _read_any(path: Path) -> sitk.Image:
    """Read a file or a DICOM series folder; unreadable input becomes an InputError."""
    if not path.exists():
        raise InputError(path, "file not found")
    if path.is_dir():
        series = dicom_series(path)
        if not series:
            raise InputError(path, "folder holds no DICOM series (and is not an image file)")
        if len(series) > 1:
            raise InputError(path, f"folder holds {len(series)} DICOM series; give one series per folder")
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series[0])
        _check_left_out(path, files)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        reader.MetaDataDictionaryArrayUpdateOn()
        try:
            img = reader.Execute()
        except RuntimeError as exc:
            raise InputError(path, f"unreadable DICOM series: {_itk_reason(exc)}") from None
        _check_slice_spacing(path, reader, img)
        return img
    if image_extension(path) is None:
        raise unsupported_type(path)
    if path.stat().st_size == 0:
        raise InputError(path, "empty file (0 bytes)")
    if image_extension(path) in (".nii", ".nii.gz"):
        _check_nifti_payload(path)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(path, f"cannot read image (corrupt or truncated file?): {_itk_reason(exc)}") from None


def _check_left_out(folder: Path, files: Sequence[str]) -> None:
    """GDCM leaves out of a series, silently, a DICOM file it cannot parse (a truncated
    copy): that would be a missing slice. Any such file is refused by name."""
    used = {Path(f).resolve() for f in files}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.name.upper() == "DICOMDIR" or p.resolve() in used:
            continue
        with open(p, "rb") as fh:
            head = fh.read(132)
        if p.suffix.lower() in (".dcm", ".ima") or head[128:132] == b"DICM":
            raise InputError(p, "unreadable DICOM file (truncated or corrupt?): the series would be missing this slice")


def _check_slice_spacing(folder: Path, reader: sitk.ImageSeriesReader, img: sitk.Image) -> None:
    """Slices must be evenly spaced along the slice normal: a gap is a missing slice."""
    n = img.GetDepth()
    if n < 3:
        return
    normal = np.array(img.GetDirection()).reshape(3, 3)[:, 2]
    positions = []
    for i in range(n):
        if not reader.HasMetaDataKey(i, "0020|0032"):
            return  # no positions to check (secondary captures): ITK's own spacing stands
        try:
            positions.append(float(np.dot([float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")], normal)))
        except ValueError:
            raise InputError(folder, f"slice {i + 1} has an unreadable Image Position (Patient)") from None
    gaps = np.abs(np.diff(positions))
    if gaps.min() <= 1e-6 or gaps.max() - gaps.min() > max(0.01, 0.01 * float(np.median(gaps))):
        raise InputError(folder, f"slices are not evenly spaced (gaps {gaps.min():.3g} to {gaps.max():.3g} mm): "
                                 "a slice is missing or duplicated")


def _itk_reason(exc: RuntimeError) -> str:
    """The useful last line of an ITK exception message."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.lower().startswith("description:"):
            return ln.split(":", 1)[1].strip()
    return lines[-1] if lines else exc.__class__.__name__


def _require_3d(img: sitk.Image, path: Path) -> None:
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(path, f"image has {img.GetNumberOfComponentsPerPixel()} components per voxel; a scalar volume is needed")
    dim = img.GetDimension()
    if dim == 4 and img.GetSize()[3] == 1:
        return  # a 3D volume stored with a trailing singleton axis; squeezed by the caller
    if dim != 3:
        raise InputError(path, f"image is {dim}D {img.GetSize()}; a 3D volume is needed")
    if min(img.GetSize()) < 2:
        raise InputError(path, f"image size {img.GetSize()} has a singleton axis: a 2D image, a 3D volume is needed")


def _squeeze_4d(img: sitk.Image) -> sitk.Image:
    if img.GetDimension() == 4:
        size = list(img.GetSize())
        size[3] = 0
        return sitk.Extract(img, size, [0, 0, 0, 0])
    return img


def read_image(path: str | Path) -> sitk.Image:
    """Read and validate a 3D scalar image: 3D only, finite values. Returns float32 or its integer type."""
    path = Path(path)
    img = _read_any(path)
    _require_3d(img, path)
    img = _squeeze_4d(img)
    arr = sitk.GetArrayViewFromImage(img)
    if np.issubdtype(arr.dtype, np.floating):
        bad = ~np.isfinite(arr)
        if bad.any():
            kinds = sorted({"NaN" if np.isnan(v) else "Inf" for v in arr[bad][:1000]})
            raise InputError(path, f"image has {int(bad.sum())} non-finite voxels ({'/'.join(kinds)})")
        if arr.dtype == np.float64:
            img = sitk.Cast(img, sitk.sitkFloat32)
    return img


def read_label(
    path: str | Path,
    *,
    label_values: Sequence[int],
    geometry: Geometry | None = None,
) -> sitk.Image:
    """Read and validate a label map: 3D, integer values from the label table (0 is
    background), and, with ``geometry`` (its image's), the same grid as that image.

    Returns a UInt8 (or UInt16) image carrying the image's exact geometry.
    """
    path = Path(path)
    img = _read_any(path)
    _require_3d(img, path)
    img = _squeeze_4d(img)
    return validate_label(img, path, label_values=label_values, geometry=geometry)


def values_present(arr: np.ndarray) -> np.ndarray:
    """The distinct values of an array, sorted: a counting pass for small non-negative integers (a
    CT-sized label in tens of milliseconds, where sorting it takes a second), else ``np.unique``."""
    arr = np.asarray(arr)
    if not arr.size or arr.dtype.kind not in "uib":
        return np.unique(arr)
    low, top = int(arr.min()), int(arr.max())
    if low >= 0 and top <= 32:  # a label: one comparison per possible value beats any counting pass
        return np.array([v for v in range(low, top + 1) if v in (low, top) or np.count_nonzero(arr == v)], arr.dtype)
    if low >= 0 and top < 1 << 16:
        return np.flatnonzero(np.bincount(arr.ravel(), minlength=top + 1)).astype(arr.dtype)
    return np.unique(arr)


def validate_label(
    img: sitk.Image, where: str | Path, *, label_values: Sequence[int], geometry: Geometry | None = None
) -> sitk.Image:
    """Checks of :func:`read_label` on an image already in memory (e.g. from Slicer)."""
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(where, f"label must be a 3D scalar volume, got {img.GetDimension()}D "
                                f"with {img.GetNumberOfComponentsPerPixel()} components")
    if geometry is not None:
        diffs = geometry.differences(Geometry.of(img))
        if diffs:
            raise InputError(where, "label geometry does not match its image: " + "; ".join(diffs))
    arr = sitk.GetArrayFromImage(img)
    if np.issubdtype(arr.dtype, np.floating):
        finite = np.isfinite(arr)
        if not finite.all():
            raise InputError(where, f"label has {int((~finite).sum())} non-finite values (NaN/Inf)")
        frac = arr != np.round(arr)
        if frac.any():
            offending = np.unique(arr[frac])[:8]
            raise InputError(where, f"label values must be integers; found {', '.join(f'{v:g}' for v in offending)}")
    values = values_present(arr)
    allowed = set(int(v) for v in label_values) | {0}
    unknown = [int(v) for v in values if int(v) not in allowed]
    if unknown:
        raise InputError(
            where,
            f"label values {unknown} are not in the label table (allowed: 0=background, "
            f"{', '.join(str(v) for v in sorted(allowed - {0}))})",
        )
    out_type = np.uint8 if max(allowed) <= 255 else np.uint16
    out = sitk.GetImageFromArray(arr.astype(out_type, copy=False))
    (geometry or Geometry.of(img)).apply(out)
    return out


def write_image(img: sitk.Image, path: str | Path, *, exclusive: bool = False) -> None:
    """Write atomically with compression; geometry is written in full double precision
    for NRRD and MetaImage (NIfTI stores it as float32)."""
    path = Path(path)
    if path.name.lower().endswith(".seg.nrrd"):
        raise ValueError("use write_seg_nrrd for .seg.nrrd")
    if path.name.lower().endswith(".mhd"):
        raise InputError(path, "write .mha instead of .mhd (a .mhd header points at a separate data file)")
    atomic.write_with(path, lambda tmp: sitk.WriteImage(img, str(tmp), True), exclusive=exclusive)


# --- .seg.nrrd (Slicer segmentation) -------------------------------------------------


@dataclass(frozen=True)
class Segment:
    name: str
    value: int
    color: tuple[float, float, float]


def write_seg_nrrd(label: sitk.Image, path: str | Path, segments: Sequence[Segment]) -> None:
    """Write a label map as a Slicer segmentation (one shared labelmap layer).

    Every segment of the label table is listed, with its name, label value and
    color, so Slicer shows them even when a segment is empty in this case.
    """
    path = Path(path)
    arr = sitk.GetArrayFromImage(label)  # z, y, x
    data = np.ascontiguousarray(arr.transpose(2, 1, 0))  # x, y, z for index_order="F"
    spacing = np.array(label.GetSpacing())
    direction = np.array(label.GetDirection()).reshape(3, 3)
    extent = " ".join(f"0 {n - 1}" for n in data.shape)
    header: dict = {
        "type": "unsigned char" if data.dtype == np.uint8 else "unsigned short",
        "dimension": 3,
        "space": "left-posterior-superior",  # ITK and NRRD share LPS
        "space directions": (direction * spacing).T,  # one row per axis
        "space origin": np.array(label.GetOrigin()),
        "kinds": ["domain", "domain", "domain"],
        "encoding": "gzip",
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
    }
    for i, seg in enumerate(segments):
        r, g, b = seg.color
        header.update(
            {
                f"Segment{i}_ID": f"Segment_{seg.value}",
                f"Segment{i}_Name": seg.name,
                f"Segment{i}_NameAutoGenerated": "0",
                f"Segment{i}_Color": f"{r:.6g} {g:.6g} {b:.6g}",
                f"Segment{i}_ColorAutoGenerated": "0",
                f"Segment{i}_LabelValue": str(int(seg.value)),
                f"Segment{i}_Layer": "0",
                f"Segment{i}_Extent": extent,
                f"Segment{i}_Tags": "|",
            }
        )
    import nrrd  # here: the engine imports in a bare Slicer Python (pynrrd comes with the engine's packages)

    atomic.write_with(path, lambda tmp: nrrd.write(str(tmp), data, header, index_order="F"))


def write_label_file(label: sitk.Image, path: str | Path, segments: Sequence[Segment]) -> None:
    """Export a label by extension: ``.seg.nrrd`` as a Slicer segmentation, else a label map."""
    name = Path(path).name.lower()
    if not any(name.endswith(ext) for ext in LABEL_EXPORT_EXTENSIONS):
        raise InputError(path, f"unsupported export type; use one of {', '.join(LABEL_EXPORT_EXTENSIONS)}")
    if name.endswith(".seg.nrrd"):
        write_seg_nrrd(label, path, segments)
    else:
        write_image(label, path)
