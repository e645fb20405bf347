"""A training's loss and validation Dice per epoch, from the engine's JSON-lines events, as MRML
table, plot-series and plot-chart nodes (Slicer's Plots module shows them; the panel embeds a
``qMRMLPlotWidget`` on the chart's view node).

:class:`TrainingCurves` collects the ``epoch`` events of every training a job runs (each
``stage`` event of a training starts a new curve: the pretraining, then the round's own) and
:meth:`TrainingCurves.update_nodes` writes them into the nodes, created once per scene. Plain
MRML: it runs on ``slicer-core`` as it does in the application.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import vtk

COLUMNS = ("epoch", "train loss", "validation loss", "validation Dice (pseudo)")
SERIES = (("train loss", (0.85, 0.33, 0.1)), ("validation loss", (0.3, 0.45, 0.85)),
          ("validation Dice (pseudo)", (0.2, 0.65, 0.3)))
TABLE_NAME, CHART_NAME, VIEW_NAME = "ALSeg training", "ALSeg training chart", "ALSeg training view"


@dataclass
class Curve:
    model: str
    rows: list[tuple[float, float, float, float]] = field(default_factory=list)


class TrainingCurves:
    """Epoch rows per training, fed event by event."""

    def __init__(self):
        self.curves: list[Curve] = []

    def feed(self, event: dict) -> bool:
        """Take one engine event; True when the curves changed."""
        kind = event.get("event")
        if kind == "stage" and event.get("stage") == "train":
            self.curves.append(Curve(str(event.get("model") or f"training {len(self.curves) + 1}")))
            return True
        if kind != "epoch":
            return False
        if not self.curves:
            self.curves.append(Curve("training"))
        row = tuple(_number(event.get(k)) for k in ("epoch", "train_loss", "val_loss", "pseudo_dice"))
        self.curves[-1].rows.append(row)
        return True

    @property
    def current(self) -> Curve | None:
        return self.curves[-1] if self.curves else None

    def update_nodes(self, scene):
        """Write the current training's rows into the ALSeg training table (made, with its three
        series, chart and plot view, on first use; found again by name after that); returns the
        plot view node for the panel's plot widget."""
        import slicer

        table = _named(scene, "vtkMRMLTableNode", TABLE_NAME)
        chart = _named(scene, "vtkMRMLPlotChartNode", CHART_NAME)
        view = _named(scene, "vtkMRMLPlotViewNode", VIEW_NAME)
        curve = self.current
        vtk_table = table.GetTable()
        if vtk_table.GetNumberOfColumns() != len(COLUMNS):
            vtk_table.Initialize()
            for name in COLUMNS:
                column = vtk.vtkDoubleArray()
                column.SetName(name)
                vtk_table.AddColumn(column)
        rows = curve.rows if curve is not None else []
        vtk_table.SetNumberOfRows(len(rows))
        for r, row in enumerate(rows):
            for c, value in enumerate(row):
                vtk_table.SetValue(r, c, vtk.vtkVariant(value))
        vtk_table.Modified()
        table.Modified()
        if chart.GetNumberOfPlotSeriesNodes() == 0:
            for name, color in SERIES:
                series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"ALSeg {name}")
                series.SetAndObserveTableNodeID(table.GetID())
                series.SetXColumnName("epoch")
                series.SetYColumnName(name)
                series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
                series.SetColor(*color)
                chart.AddAndObservePlotSeriesNodeID(series.GetID())
            chart.SetXAxisTitle("epoch")
            chart.SetYAxisTitle("loss / Dice")
        chart.SetTitle(f"training {curve.model}" if curve is not None else "training")
        view.SetPlotChartNodeID(chart.GetID())
        return view


def _named(scene, cls: str, name: str):
    """The scene's node of class ``cls`` named ``name``, made if there is none. The collection
    ``GetNodesByClassByName`` returns is the caller's to delete (vtkMRMLScene.h: "You are
    responsible for deleting the collection"; Python's wrapper holds one more reference, so it
    is released as Slicer's util.getNodesByClass does: ``UnRegister``); kept, it would hold
    the nodes alive after the scene closes."""
    nodes = scene.GetNodesByClassByName(cls, name)
    try:
        node = nodes.GetItemAsObject(0) if nodes.GetNumberOfItems() else None
    finally:
        nodes.UnRegister(None)
    return node if node is not None else scene.AddNewNodeByClass(cls, name)


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) else float("nan")
