"""The nnU-Net network's bottleneck, pooled per case during prediction: the feature
vector selection's diversity reads (stored through :mod:`ALSegLib.store.features`)."""
from __future__ import annotations

import numpy as np


class BottleneckPool:
    """Forward hook on the last convolution of an nnU-Net network's last encoder stage
    (before its normalisation) that accumulates the spatial mean of its output over
    every call (tiles, mirrored copies) of one case."""

    def __init__(self, network):
        import torch

        module = network._orig_mod if hasattr(network, "_orig_mod") else network
        stages = getattr(getattr(module, "encoder", None), "stages", None)
        if stages is None or len(stages) == 0:
            raise ValueError(f"{type(module).__name__} has no encoder stages to take features from")
        convs = [m for m in stages[-1].modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
        if not convs:
            raise ValueError(f"the last encoder stage of {type(module).__name__} has no convolution")
        self._handle = convs[-1].register_forward_hook(self._hook)
        self.reset()

    def _hook(self, _module, _inputs, output) -> None:
        out = output.detach().float()
        self._sum = out.mean(dim=tuple(range(2, out.ndim))).sum(dim=0) + (0 if self._sum is None else self._sum)
        self._calls += out.shape[0]

    def reset(self) -> None:
        self._sum, self._calls = None, 0

    def vector(self) -> np.ndarray:
        """The pooled vector of the case seen since the last :meth:`reset`."""
        if self._sum is None:
            raise RuntimeError("the network has not run since the last reset")
        return (self._sum / self._calls).cpu().numpy().astype(np.float32)

    def close(self) -> None:
        self._handle.remove()
