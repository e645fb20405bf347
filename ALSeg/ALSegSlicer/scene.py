"""Project files <-> MRML nodes: volumes, segmentations, label tables.

Plain functions on a ``vtkMRMLScene`` passed in (``slicer.mrmlScene`` inside
Slicer), so they run the same in the application and on ``slicer-core``
without Qt. Images are read and written by the engine (SimpleITK, LPS); the
nodes get the exact IJK-to-RAS geometry (oblique directions, anisotropic
spacing). Segments take their names, colors and label values from the
project's label table, never from Slicer's default color table, and an edited
segmentation goes back to the image grid with the project's label values,
matched by segment name (not segment order).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

from ALSegLib import volumes
from ALSegLib.errors import InputError
from ALSegLib.project import LabelTable, Project

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
CASE_ATTRIBUTE = "ALSeg.Case"  # on the volumes the review opens (and their overlays): the case they show
_VTK_TYPES = {np.dtype(np.uint8): vtk.VTK_UNSIGNED_CHAR, np.dtype(np.int8): vtk.VTK_SIGNED_CHAR,
              np.dtype(np.uint16): vtk.VTK_UNSIGNED_SHORT, np.dtype(np.int16): vtk.VTK_SHORT,
              np.dtype(np.uint32): vtk.VTK_UNSIGNED_INT, np.dtype(np.int32): vtk.VTK_INT,
              np.dtype(np.float32): vtk.VTK_FLOAT, np.dtype(np.float64): vtk.VTK_DOUBLE}


def ensure_segmentation_converters() -> None:
    """Register the binary-labelmap <-> closed-surface conversion rules.

    Slicer's Segmentations module registers them at start-up; a bare MRML core
    (``slicer-core``, a batch script) has none, and then no segment can hold a
    binary labelmap. Idempotent."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    have = {rule.GetClassName() for rule in factory.GetConverterRules()}
    for cls in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule, slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule):
        if cls.__name__ not in have:
            factory.RegisterConverterRule(cls())


# --- geometry -------------------------------------------------------------------------------


def ijk_to_ras(image: sitk.Image) -> np.ndarray:
    """4x4 IJK-to-RAS matrix of a SimpleITK (LPS) image."""
    direction = np.array(image.GetDirection(), float).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = LPS_TO_RAS @ direction @ np.diag(image.GetSpacing())
    m[:3, 3] = LPS_TO_RAS @ np.array(image.GetOrigin(), float)
    return m


def node_ijk_to_ras(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(i, j) for j in range(4)] for i in range(4)])


def _vtk_matrix(m: np.ndarray) -> vtk.vtkMatrix4x4:
    out = vtk.vtkMatrix4x4()
    for i in range(4):
        for j in range(4):
            out.SetElement(i, j, float(m[i, j]))
    return out


def _set_voxels(node, array: np.ndarray) -> None:
    """Give ``node`` a fresh image of ``array`` (k, j, i order, as SimpleITK and arrayFromVolume use)."""
    array = np.ascontiguousarray(array)
    if array.dtype not in _VTK_TYPES:
        raise TypeError(f"no VTK scalar type for {array.dtype}")
    image = vtk.vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    image.AllocateScalars(_VTK_TYPES[array.dtype], 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = array.ravel()
    node.SetAndObserveImageData(image)


def voxels(node) -> np.ndarray:
    """A copy of a scalar or labelmap volume node's voxels (k, j, i)."""
    image = node.GetImageData()
    if image is None:
        raise InputError(node.GetName(), "the volume node has no image data")
    dims = image.GetDimensions()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1]).copy()


def volume_node_from_image(scene, image: sitk.Image, name: str, *, labelmap: bool = False,
                           window_level: tuple[float, float] | None = None):
    """A new scalar (or labelmap) volume node holding ``image`` with its exact geometry."""
    return volume_node_from_array(scene, sitk.GetArrayFromImage(image), ijk_to_ras(image), name, labelmap=labelmap,
                                  window_level=window_level)


def volume_node_from_array(scene, array: np.ndarray, ijk_to_ras_matrix: np.ndarray, name: str, *,
                           labelmap: bool = False, window_level: tuple[float, float] | None = None):
    """A new volume node of ``array`` (k, j, i) with the IJK-to-RAS matrix given. A scalar volume
    gets Slicer's default display (automatic window/level from the voxels' histogram) unless
    ``window_level`` (width, level) is given, which saves that pass over the voxels."""
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode", name)
    _set_voxels(node, array)
    node.SetIJKToRASMatrix(_vtk_matrix(ijk_to_ras_matrix))
    if labelmap:
        return node
    if window_level is None:
        node.CreateDefaultDisplayNodes()
    else:
        display = scene.AddNewNodeByClass("vtkMRMLScalarVolumeDisplayNode")
        display.SetAutoWindowLevel(0)
        display.SetWindowLevel(float(window_level[0]), float(window_level[1]))
        display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
        node.SetAndObserveDisplayNodeID(display.GetID())
    return node


def slice_center_ras(node, axis: int, index: int) -> tuple[float, float, float]:
    """The RAS position of the centre of slice ``index`` along array ``axis`` (0 = k) of a volume
    node: where the views jump to open a slice unit."""
    dims = node.GetImageData().GetDimensions()  # i, j, k
    ijk = [(d - 1) / 2 for d in dims]
    ijk[2 - axis] = float(index)
    ras = node_ijk_to_ras(node) @ np.array([*ijk, 1.0])
    return float(ras[0]), float(ras[1]), float(ras[2])


def image_from_volume_node(node) -> sitk.Image:
    """The node's voxels as a SimpleITK image in LPS with the node's geometry (parent transforms ignored)."""
    return with_node_geometry(sitk.GetImageFromArray(voxels(node)), node)


def with_node_geometry(image: sitk.Image, node) -> sitk.Image:
    """``image`` (on the node's voxel grid) given the node's spacing, direction and origin, in LPS."""
    m = node_ijk_to_ras(node)
    lps = LPS_TO_RAS @ m[:3, :3]  # LPS_TO_RAS is its own inverse
    spacing = np.linalg.norm(lps, axis=0)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetDirection(tuple(float(v) for v in (lps / spacing).ravel()))
    image.SetOrigin(tuple(float(v) for v in LPS_TO_RAS @ m[:3, 3]))
    return image


# --- label tables and segmentations ---------------------------------------------------------


def color_table_node(scene, labels: LabelTable, name: str = "ALSeg labels", names: dict[int, str] | None = None):
    """A color table node with the project's names (or ``names`` by value) and colors at the
    project's label values."""
    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
    node.SetTypeToUser()
    node.SetNumberOfColors(max(labels.values) + 1)
    node.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
    for c in labels.classes:
        node.SetColor(c.value, (names or {}).get(c.value, c.name), *c.color, 1.0)
    return node


def segmentation_node_from_label(scene, label: sitk.Image | None, reference, labels: LabelTable, name: str):
    """A segmentation node on ``reference``'s geometry with one segment per class of the label
    table (segment ID and name = class name, the table's color), filled from ``label``'s values
    (classes absent from ``label``, or no label at all, give empty segments to draw in)."""
    numbered = None if label is None else segment_numbers(sitk.GetArrayFromImage(label), labels, name)
    return segmentation_node_from_numbers(scene, numbered, reference, labels, name)


def segment_numbers(values: np.ndarray, labels: LabelTable, where: str) -> np.ndarray:
    """A label's project values renumbered 1..N in the label table's order, as Slicer's import fills
    the i-th listed segment from value i (values not in the table: an error naming ``where``). Plain
    numpy: the review computes it off the GUI thread."""
    unknown = sorted(set(volumes.values_present(values).tolist()) - {0, *labels.values})
    if unknown:
        raise InputError(where, f"label values {unknown} are not in the project's label table {labels.mapping}")
    lookup = np.zeros(max(labels.values) + 1, np.uint8 if len(labels.classes) < 256 else np.uint16)
    for i, c in enumerate(labels.classes, 1):
        lookup[c.value] = i
    return lookup[values]


def segmentation_node_from_numbers(scene, numbered: np.ndarray | None, reference, labels: LabelTable, name: str):
    """:func:`segmentation_node_from_label` from :func:`segment_numbers`' array (on the reference's grid)."""
    ensure_segmentation_converters()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    segmentation = node.GetSegmentation()
    ids = vtk.vtkStringArray()
    for c in labels.classes:
        segmentation.AddEmptySegment(c.name, c.name, list(c.color))
        ids.InsertNextValue(c.name)
    if numbered is None:
        return node
    grid = reference.GetImageData().GetDimensions()[::-1]
    if tuple(numbered.shape) != tuple(grid):
        scene.RemoveNode(node)
        raise InputError(name, f"the label's grid {tuple(numbered.shape)} is not the volume's {tuple(grid)} (z, y, x)")
    temporary = volume_node_from_array(scene, numbered, node_ijk_to_ras(reference), "__alseg_import__", labelmap=True)
    try:
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(temporary, node, ids):
            raise RuntimeError(f"Slicer could not import the label into segmentation {name!r}")
    finally:
        scene.RemoveNode(temporary)
    return node


def segment_values(segmentation_node, labels: LabelTable) -> dict[str, int]:
    """Segment ID -> project label value, matched by segment name (case-insensitive).

    A segment whose name is not in the label table is an error naming it: its voxels
    would otherwise be stored under a value nobody chose."""
    by_name = {c.name.lower(): c.value for c in labels.classes}
    segmentation = segmentation_node.GetSegmentation()
    out, unknown = {}, []
    for i in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(i)
        segment_name = segmentation.GetSegment(segment_id).GetName()
        if segment_name.lower() in by_name:
            out[segment_id] = by_name[segment_name.lower()]
        else:
            unknown.append(segment_name)
    if unknown:
        raise InputError(segmentation_node.GetName(), f"segment(s) {', '.join(map(repr, unknown))} are not in the project's "
                         f"label table ({', '.join(c.name for c in labels.classes)}): rename or delete them before accepting")
    named = {}
    for segment_id, value in out.items():
        if value in named:
            raise InputError(segmentation_node.GetName(), f"two segments are named for label value {value}: "
                             f"{named[value]!r} and {segment_id!r}")
        named[value] = segment_id
    return out


def label_from_segmentation(scene, segmentation_node, reference, labels: LabelTable) -> sitk.Image:
    """The segmentation on ``reference``'s image grid with the project's label values (by segment
    name; where segments overlap, the one later in the segment list wins, as in Slicer)."""
    values = segment_values(segmentation_node, labels)
    dims = reference.GetImageData().GetDimensions()
    if not values:
        return with_node_geometry(sitk.GetImageFromArray(np.zeros(dims[::-1], np.uint16)), reference)
    ids = vtk.vtkStringArray()
    for segment_id in values:
        ids.InsertNextValue(segment_id)
    # the exporter looks segments up in the color table by exact name: give it the segments' own names
    segmentation = segmentation_node.GetSegmentation()
    names = {value: segmentation.GetSegment(segment_id).GetName() for segment_id, value in values.items()}
    colors = color_table_node(scene, labels, "__alseg_export_colors__", names)
    temporary = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__alseg_export__")
    try:
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, ids, temporary, reference, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, colors)
        if not ok:
            raise RuntimeError(f"Slicer could not export segmentation {segmentation_node.GetName()!r}")
        array = voxels(temporary)
        if not np.allclose(node_ijk_to_ras(temporary), node_ijk_to_ras(reference), atol=1e-6):
            raise RuntimeError("the exported labelmap is not on the reference volume's grid")
    finally:
        scene.RemoveNode(temporary)
        scene.RemoveNode(colors)
    # the values are checked against the label table where the label is stored (Project's validation)
    return with_node_geometry(sitk.GetImageFromArray(array.astype(np.uint16, copy=False)), reference)


# --- files ----------------------------------------------------------------------------------


def save_segmentation(segmentation_node, path: str | Path) -> Path:
    """Write a segmentation node with Slicer's own writer (``.seg.nrrd``)."""
    path = Path(path)
    storage = segmentation_node.GetScene().AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    try:
        storage.SetFileName(str(path))
        if not storage.WriteData(segmentation_node):
            raise InputError(path, "Slicer could not write the segmentation")
    finally:
        segmentation_node.GetScene().RemoveNode(storage)
    return path


def load_segmentation(scene, path: str | Path, name: str | None = None):
    """Read a ``.seg.nrrd`` with Slicer's own reader into a new segmentation node."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such segmentation file")
    ensure_segmentation_converters()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or path.name.split(".")[0])
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    try:
        storage.SetFileName(str(path))
        if not storage.ReadData(node):
            scene.RemoveNode(node)
            raise InputError(path, "Slicer could not read this segmentation file")
    finally:
        scene.RemoveNode(storage)
    return node


def case_ids_for_nodes(nodes: Sequence) -> list[str]:
    """Case ids from the nodes' names, derived as ids are from file names (``3: CT chest`` from
    DICOM becomes ``3__CT_chest``); two nodes giving one id is an error naming both."""
    from ALSegLib.store.ids import case_id_from_name

    ids, seen = [], {}
    for node in nodes:
        name = node.GetName() or ""
        case = case_id_from_name(name, where=f"volume {name!r}")
        if case in seen:
            raise InputError(f"volume {name!r}", f"gives the case id {case!r}, as volume {seen[case]!r} does: "
                             "rename one of them or give the case ids")
        seen[case] = name
        ids.append(case)
    return ids


def add_volume_nodes(project: Project, nodes: Sequence, case_ids: Sequence[str] | None = None) -> list[str]:
    """Add volumes already in the scene to the project as new cases (ids derived from the nodes'
    names unless given); returns the case ids."""
    import tempfile

    for node in nodes:
        if node.GetAttribute(CASE_ATTRIBUTE):
            raise InputError(f"volume {node.GetName()!r}", f"is case {node.GetAttribute(CASE_ATTRIBUTE)!r} of the "
                             "project, opened for review: it is a case already")
    case_ids = list(case_ids) if case_ids is not None else case_ids_for_nodes(nodes)
    if len(case_ids) != len(nodes):
        raise InputError("case ids", f"{len(case_ids)} ids for {len(nodes)} volumes")
    for node, case in zip(nodes, case_ids, strict=True):  # named by the volume, not by a temporary file
        if project.has_case(case):
            raise InputError(f"volume {node.GetName()!r}", f"gives the case id {case!r}, which project {project.name} "
                             "has already: rename the volume or give another case id")
    with tempfile.TemporaryDirectory(prefix="alseg-scene-") as tmp:
        files = []
        for i, node in enumerate(nodes):  # the temporary files' names never come from the nodes' names
            path = Path(tmp) / f"volume{i:04d}.nii"  # uncompressed: the project compresses what it stores
            sitk.WriteImage(image_from_volume_node(node), str(path), False)
            files.append(path)
        return project.add_cases(files, case_ids=case_ids)
