"""The one place that imports the WebUI's own modules.

Every symbol the extension uses from A1111, or from Forge (the fork with its own ``backend`` package), is imported
here, from its real home (not re-exports such as ``webui``), so a moved or renamed symbol breaks in one place with a
message that names it and the host versions this extension supports. Nothing else in the package imports
``modules.*``, ``modules_forge.*`` or ``backend.*``.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any

from ..errors import HostError

SUPPORTED_HOSTS = "AUTOMATIC1111 WebUI v1.6 to v1.10 and Forge 2.x"


def _symbol(module: str, name: str | None = None) -> Any:
    where = f"{module}.{name}" if name else module
    try:
        loaded = importlib.import_module(module)
        return getattr(loaded, name) if name else loaded
    except (ImportError, AttributeError) as error:
        raise HostError(
            f"the WebUI has no {where} ({type(error).__name__}: {error}); Embedding Trainer supports "
            f"{SUPPORTED_HOSTS}. Update the WebUI, or report your version in the extension's issues"
        ) from None


def running_in_forge() -> bool:
    """Forge 2.x: the WebUI with Forge's ``backend`` package (Forge 1.x had ``modules_forge`` but no ``backend``)."""
    return importlib.util.find_spec("modules_forge") is not None and importlib.util.find_spec("backend") is not None


@dataclass(frozen=True)
class ForgeSymbols:
    sd_models: Any  # modules.sd_models: forge_model_reload (Forge loads the checkpoint at first use)
    memory: Any  # backend.memory_management: load_models_gpu, get_torch_device
    transformer_block: Any  # backend.nn.unet.BasicTransformerBlock (made out-of-place for a run)
    embedding_class: Any  # backend.text_processing.textual_inversion.Embedding (the engines' databases)
    extra_networks_embeddings: Any  # modules.ui_extra_networks_textual_inversion.embedding_db (the page's list)


@dataclass(frozen=True)
class WebUISymbols:
    shared: Any  # modules.shared: sd_model, opts, state, cmd_opts
    model_hijack: Any  # modules.sd_hijack.model_hijack: embedding_db, fixes
    embedding_class: Any  # modules.textual_inversion.textual_inversion.Embedding
    queue_lock: Any  # modules.call_queue.queue_lock
    wrap_gradio_gpu_call: Any  # modules.call_queue.wrap_gradio_gpu_call
    script_callbacks: Any  # modules.script_callbacks
    processing: Any  # modules.processing (StableDiffusionProcessing caches, previews)
    paths: Any  # modules.paths (data_path, models_path)
    progress: Any  # modules.progress (task ids behind /internal/progress)
    lowvram: Any  # modules.lowvram (--medvram/--lowvram module swapping)
    attention: Any  # modules.sd_hijack (cross-attention implementations: optimizers, apply_optimizations)
    forge: ForgeSymbols | None = None  # in Forge, its backend; A1111's model objects above are then stubs


def load() -> WebUISymbols:
    """Import every host symbol; raises HostError naming the first one missing."""
    return WebUISymbols(
        shared=_symbol("modules.shared"),
        model_hijack=_symbol("modules.sd_hijack", "model_hijack"),
        embedding_class=_symbol("modules.textual_inversion.textual_inversion", "Embedding"),
        queue_lock=_symbol("modules.call_queue", "queue_lock"),
        wrap_gradio_gpu_call=_symbol("modules.call_queue", "wrap_gradio_gpu_call"),
        script_callbacks=_symbol("modules.script_callbacks"),
        processing=_symbol("modules.processing"),
        paths=_symbol("modules.paths"),
        progress=_symbol("modules.progress"),
        lowvram=_symbol("modules.lowvram"),
        attention=_symbol("modules.sd_hijack"),
        forge=_forge_symbols() if running_in_forge() else None,
    )


def _forge_symbols() -> ForgeSymbols:
    return ForgeSymbols(
        sd_models=_symbol("modules.sd_models"),
        memory=_symbol("backend.memory_management"),
        transformer_block=_symbol("backend.nn.unet", "BasicTransformerBlock"),
        embedding_class=_symbol("backend.text_processing.textual_inversion", "Embedding"),
        extra_networks_embeddings=_symbol("modules.ui_extra_networks_textual_inversion", "embedding_db"),
    )
