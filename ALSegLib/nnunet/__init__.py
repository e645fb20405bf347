"""nnU-Net v2 inside the engine: dataset export, self-configuration, training, prediction.

Everything here drives the real ``nnunetv2`` package; ALSeg's trainers subclass
``nnUNetTrainer`` and live in :mod:`ALSegLib.nnunet.trainers`.
"""
