"""ALSeg engine: the active-learning loop for nnU-Net segmentation models.

Console API (no Slicer import; usable from Slicer's Python console)::

    from ALSegLib import Project, RoundSettings, simulate, ExperimentSettings
    Project("my_project").run_round(budget="5%", strategy="hybrid", mode="finetune")
"""
__version__ = "0.1.0"

from .loop import RoundSettings, run_round  # noqa: E402
from .project import LabelTable, Project  # noqa: E402
from .simulate import ExperimentSettings, simulate  # noqa: E402

__all__ = ["ExperimentSettings", "LabelTable", "Project", "RoundSettings", "__version__", "run_round", "simulate"]
