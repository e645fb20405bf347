"""ALSeg engine: the active-learning loop for nnU-Net segmentation models.

Console API (no Slicer import; usable from Slicer's Python console)::

    from ALSegLib import Project, RoundSettings, run_round, simulate, ExperimentSettings
    run_round(Project("my_project"), budget="5%", strategy="hybrid", mode="finetune")
"""
from ._version import __version__  # noqa: E402
from .loop import RoundSettings, run_round  # noqa: E402
from .project import Project  # noqa: E402
from .simulate import ExperimentSettings, simulate  # noqa: E402
from .store.labels import LabelTable  # noqa: E402

__all__ = ["ExperimentSettings", "LabelTable", "Project", "RoundSettings", "__version__", "run_round", "simulate"]
