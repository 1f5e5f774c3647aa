"""Run by the WebUI at start-up (unless --skip-install). The WebUI already has everything the extension needs
(torch, numpy, Pillow, safetensors, fastapi, gradio); this only installs a package a stripped-down host lacks,
and never touches torch."""

import launch

NEEDED = {"safetensors": "safetensors>=0.4.2", "numpy": "numpy", "PIL": "pillow"}

if not getattr(getattr(launch, "args", None), "skip_install", False):
    for module, requirement in NEEDED.items():
        if not launch.is_installed(module):
            launch.run_pip(f"install {requirement}", f"{requirement} for Embedding Trainer")
