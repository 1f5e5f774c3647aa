"""Benchmarks, run from the repository root as modules: ``python -m benchmarks.speed`` (and ``learning``,
``memory_estimate``, ``distributed``, ``webui_speed``, ``compare``). A package, so they share ``benchmarks.archs``
and the WebUI launcher ``tests.webui`` by import rather than by editing ``sys.path``."""
