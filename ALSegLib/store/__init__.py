"""The project folder's stores: where each kind of file lives and how it is written and read.

The lowest layer of the engine with :mod:`ALSegLib.project`: it imports nothing above it, so
adapters (nnU-Net, SAM), domain code (selection, pseudo-labels) and orchestration all write
and read the folder through the same functions.
"""
