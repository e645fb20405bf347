"""Core-set selection: uncertainty from stored probabilities x diversity on case features."""
