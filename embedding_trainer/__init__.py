"""Embedding Trainer: textual-inversion training for SD1.x, SD2.x and SDXL.

The modules directly in this package and the ``trainer/`` package form the *core*: they import only torch, numpy,
PIL, safetensors and the standard library. Model-specific code lives in ``hosts/`` (adapters), ``tools/`` (tiny
models, the CLIP vocabulary, drawing, render, the A1111 exporter), ``toyworld/`` (the toy world and its base model),
``standalone/`` (the command line: parser, run driver, job files, demo) and ``webui/`` (the WebUI glue).
"""

__version__ = "0.1.0"
