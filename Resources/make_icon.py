"""Draw the extension icon (Icons/ALSeg.png, 128x128) from a phantom slice with its labels;
the module uses the same picture (ALSeg/Resources/Icons/ALSeg.png).

Run: .venv/bin/python Resources/make_icon.py
"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from ALSegLib import phantoms  # noqa: E402


def main() -> None:
    image, label = phantoms.make_phantom(2, "MRI", seed=0)
    img, lab = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(label)
    z = int(np.argmax((lab == phantoms.LABELS["lesion"]).sum(axis=(1, 2))))
    fig = plt.figure(figsize=(1.28, 1.28), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.imshow(img[z], cmap="gray", vmin=0, vmax=1000)
    for name, value in phantoms.LABELS.items():
        ax.contour(lab[z] == value, levels=[0.5], colors=[phantoms.COLORS[name]], linewidths=2)
    ax.axis("off")
    root = Path(__file__).resolve().parents[1]
    for out in (root / "Resources" / "Icons" / "ALSeg.png", root / "ALSeg" / "Resources" / "Icons" / "ALSeg.png"):
        fig.savefig(out, dpi=100)
        print(out)


if __name__ == "__main__":
    main()
