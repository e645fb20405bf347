"""The engine's version (its own module: the lowest layers record it without importing the package)."""
__version__ = "0.1.0"
