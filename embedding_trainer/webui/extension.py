"""Wires Embedding Trainer into the WebUI: the run manager over the loaded model, the HTTP API, settings.

``register()`` is all the entry script in ``scripts/`` calls. Host objects come from ``host_symbols`` only.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from ..embedding_file import file_sha256
from ..embedding_reading import load_embedding
from ..hosts.a1111 import A1111Host
from ..hosts.forge import ForgeHost
from ..log import logger
from ..trainer import TrainResult, output_path
from . import host_symbols
from .api import basic_auth_dependency, register_routes
from .previews import PreviewRenderer
from .run_manager import RunManager
from .run_record import RunRecord
from .state_bridge import SharedStateBridge
from .tab import build_tab

SECTION = ("embtrain", "Embedding Trainer")

#: (key, default, label) of the settings this extension adds; keys carry the embtrain_ prefix.
SETTINGS = (
    ("embtrain_write_pt", False, "Also write the WebUI's legacy .pt file next to each .safetensors embedding"),
    ("embtrain_keep_saves", 3, "Intermediate saves to keep per run (0: keep all)"),
    ("embtrain_save_every", 0, "Save an intermediate embedding and resumable state every N steps (0: off)"),
    ("embtrain_runs_dir", "", "Folder for run logs and intermediate saves (empty: <webui>/embtrain-runs)"),
)


def parse_api_auth(value: str | None) -> dict[str, str]:
    """``--api-auth user:pass,user2:pass2`` -> credentials; a ':' inside a password is kept."""
    credentials = {}
    for pair in (value or "").split(","):
        user, sep, password = pair.strip().partition(":")
        if sep and user:
            credentials[user] = password
    return credentials


class WebUIGlue:
    """The extension's state inside one WebUI process."""

    def __init__(self, symbols: host_symbols.WebUISymbols):
        self.symbols = symbols
        self.host: A1111Host | ForgeHost | None = None
        # Forge lists embeddings (the API's /sdapi/v1/embeddings, the Extra Networks page) from databases of their
        # own, apart from the ones prompts use; a finished run refreshes them.
        self.embedding_listings: list[Any] = []
        if symbols.forge is not None:
            self.embedding_listings.append(symbols.forge.extra_networks_embeddings)
        bridge = SharedStateBridge(symbols.shared.state, symbols.progress)
        self.manager = RunManager(
            make_host=self.make_host,
            run_exclusively=self.run_exclusively,
            state_bridge=bridge,
            on_finished=self.on_finished,
            preview=PreviewRenderer(symbols, self.reset_conditioning_cache, bridge.show_image, self.vae_on_device),
            config_defaults=self.config_defaults,
        )

    # -- the run manager's host side ------------------------------------------------------------------------
    def make_host(self, config: Any) -> A1111Host | ForgeHost:
        symbols = self.symbols
        forge = symbols.forge
        if forge is not None:
            # Forge loads the chosen checkpoint at its first use; a run may be that use.
            sd_model, _ = forge.sd_models.forge_model_reload()
            self.host = ForgeHost(sd_model, forge.memory, forge.transformer_block, forge.embedding_class)
        else:
            db = symbols.model_hijack.embedding_db
            sd_model = symbols.shared.sd_model
            self.host = A1111Host(sd_model, db, symbols.embedding_class, symbols.lowvram, symbols.attention)
        return self.host

    def vae_on_device(self) -> contextlib.AbstractContextManager[Any]:
        # A preview decodes with the VAE, which the run may have moved to RAM (vae_to_cpu).
        return self.host.vae_on_device() if self.host is not None else contextlib.nullcontext()

    def run_exclusively(self, fn: Any) -> Any:
        # txt2img and friends wait while a run holds the GPU; the host's hijack state is global.
        with self.symbols.queue_lock:
            return fn()

    def option(self, key: str, default: Any) -> Any:
        return getattr(self.symbols.shared.opts, key, default)

    def config_defaults(self, fields: dict[str, Any]) -> dict[str, Any]:
        """The WebUI's embeddings folder for the result; run files OUTSIDE it (a file written there mid-run makes
        the next generation reload the folder and orphan the training object)."""
        shared = self.symbols.shared
        values = dict(fields)
        values.setdefault("output_dir", shared.cmd_opts.embeddings_dir)
        runs = self.option("embtrain_runs_dir", "") or os.path.join(self.symbols.paths.data_path, "embtrain-runs")
        if values.get("name"):
            values.setdefault("run_dir", os.path.join(runs, str(values["name"])))
        values.setdefault("write_pt", bool(self.option("embtrain_write_pt", False)))
        values.setdefault("keep_saves", int(self.option("embtrain_keep_saves", 3)))
        values.setdefault("save_every", int(self.option("embtrain_save_every", 0)))
        return values

    def on_finished(self, record: RunRecord, outcome: TrainResult | Exception | None) -> None:
        """Make the result live: register the final vectors with file name and hash, drop stale conditioning."""
        # Called by the run manager while the run still holds the queue lock (taking it again would deadlock).
        host = self.host
        if host is None or outcome is None:  # nothing ran, nothing changed
            return
        path = output_path(record.config)
        if isinstance(outcome, TrainResult) and path.is_file():
            data = load_embedding(path, host.encoders)
            host.publish(record.config.name, data.vectors, data.step, str(path), file_sha256(path))
        else:
            # A failed run leaves its in-memory vectors registered; the files on disk are the truth.
            host.reload_embeddings()
        for listing in self.embedding_listings:
            listing.load_textual_inversion_embeddings(force_reload=True, sync_with_sd_model=False)
        self.reset_conditioning_cache()

    def reset_conditioning_cache(self) -> None:
        # StableDiffusionProcessing caches conditioning per prompt, not per vector values (A1111 keeps 2 entries
        # per cache, Forge 3).
        processing_class = self.symbols.processing.StableDiffusionProcessing
        processing_class.cached_c = [None] * len(processing_class.cached_c)
        processing_class.cached_uc = [None] * len(processing_class.cached_uc)

    # -- WebUI callbacks --------------------------------------------------------------------------------------
    def on_app_started(self, demo: Any, app: Any) -> None:
        credentials = parse_api_auth(getattr(self.symbols.shared.cmd_opts, "api_auth", None))
        auth = basic_auth_dependency(credentials) if credentials else None
        routes = register_routes(app, self.manager, auth)
        if self.symbols.forge is not None:  # the API object's own list behind GET /sdapi/v1/embeddings
            listing = next(
                (
                    getattr(getattr(r.endpoint, "__self__", None), "embedding_db", None)
                    for r in app.routes
                    if getattr(r, "path", "") == "/sdapi/v1/embeddings"
                ),
                None,
            )
            if listing is not None:
                self.embedding_listings.append(listing)
        logger.info("Embedding Trainer API: %d routes under /embtrain/v1%s", len(routes), " (auth)" if auth else "")

    def on_ui_settings(self) -> None:
        shared = self.symbols.shared
        for key, default, label in SETTINGS:
            shared.opts.add_option(key, shared.OptionInfo(default, label, section=SECTION))

    def shutdown(self) -> None:
        """Reload UI / unload: stop a running job and wait for it to save."""
        active = self.manager.active_id
        if active:
            self.manager.stop(active)
        self.manager.close(timeout=60)


def register(symbols: host_symbols.WebUISymbols | None = None) -> WebUIGlue:
    """Called once by the entry script when the WebUI imports it."""
    symbols = symbols or host_symbols.load()
    glue = WebUIGlue(symbols)
    callbacks = symbols.script_callbacks
    callbacks.on_app_started(glue.on_app_started)
    callbacks.on_ui_settings(glue.on_ui_settings)
    callbacks.on_ui_tabs(lambda: build_tab(glue))
    callbacks.on_before_reload(glue.shutdown)
    callbacks.on_script_unloaded(glue.shutdown)
    return glue
