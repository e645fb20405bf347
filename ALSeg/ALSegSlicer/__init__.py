"""Glue between 3D Slicer (MRML nodes, Qt) and the ALSeg engine; every part below the widget runs without Qt."""
