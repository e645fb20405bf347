"""Lets nnU-Net's own tools find ALSeg's trainers: point ``nnUNet_extTrainer`` at this
folder (``alseg trainer-path`` prints it), then e.g. ``nnUNetv2_train 1 2d 0 -tr ALSegTrainer``.

nnU-Net imports the modules of that folder as top-level modules, so this file
only re-exports the classes with an absolute import.
"""
from ALSegLib.nnunet.filtermatch import ALSegFilterMatchTrainer
from ALSegLib.nnunet.trainers import ALSegTrainer

__all__ = ["ALSegTrainer", "ALSegFilterMatchTrainer"]
