"""Embedding Trainer: textual-inversion training for SD1.x, SD2.x and SDXL.

The modules directly in this package form the *core*: they import only torch, numpy, PIL, safetensors and
the standard library. Model-specific code lives in ``hosts/`` (adapters) and ``standalone/`` (CLI, demo).
"""

__version__ = "0.1.0"
