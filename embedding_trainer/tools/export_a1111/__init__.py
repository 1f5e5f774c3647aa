"""Export a diffusers-format SD1, SD2 or SDXL model as a single-file checkpoint the AUTOMATIC1111 WebUI loads.

``export_a1111(model, "models/Stable-diffusion/tiny")`` writes ``tiny.safetensors`` (ldm/sgm key names), ``tiny.yaml``
(the model config the WebUI builds it from) and, by family, ``tiny-text-encoder/`` and ``tiny.open_clip.json``.
docs/export-a1111.md says what each file holds, what is refused and why. Modules: ``export`` (the entry point),
``loading``, ``checks``, ``keys``, ``configs``, ``text_encoders``.
"""

from .checks import LDM_NORM_GROUPS, transformer_depths
from .common import ExportError, Family, ModelParts
from .configs import model_config, model_config_yaml
from .export import OPEN_CLIP_SUFFIX, TEXT_ENCODER_SUFFIX, ExportResult, OutputPaths, export_a1111, output_paths
from .keys import (
    OPEN_CLIP_LOGIT_SCALE,
    convert_clip_text,
    convert_open_clip_text,
    convert_to_ldm,
    convert_unet,
    convert_vae,
    open_clip_fillers,
    open_clip_key_names,
    unet_key_table,
    vae_key_table,
)
from .loading import load_model_parts
from .text_encoders import BUILTIN_OPEN_CLIP_ARCHS, open_clip_arch, open_clip_model_config, tokenizer_files

__all__ = [
    "BUILTIN_OPEN_CLIP_ARCHS",
    "LDM_NORM_GROUPS",
    "OPEN_CLIP_LOGIT_SCALE",
    "OPEN_CLIP_SUFFIX",
    "TEXT_ENCODER_SUFFIX",
    "ExportError",
    "ExportResult",
    "Family",
    "ModelParts",
    "OutputPaths",
    "convert_clip_text",
    "convert_open_clip_text",
    "convert_to_ldm",
    "convert_unet",
    "convert_vae",
    "export_a1111",
    "load_model_parts",
    "model_config",
    "model_config_yaml",
    "open_clip_arch",
    "open_clip_fillers",
    "open_clip_key_names",
    "open_clip_model_config",
    "output_paths",
    "tokenizer_files",
    "transformer_depths",
    "unet_key_table",
    "vae_key_table",
]
