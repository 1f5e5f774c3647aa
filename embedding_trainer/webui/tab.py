"""The "Embedding Trainer" tab of the WebUI.

The module-level helpers are plain Python (the form is generated from ``TrainConfig`` metadata, the dataset check
and the result are summarised as text) so they are tested without gradio; ``build_tab`` is the only function that
imports gradio. A run started here goes through the WebUI's ``wrap_gradio_gpu_call`` with a task id from the page
(``embtrain_start`` in ``javascript/embtrain.js``), so the WebUI's progress bar, ETA and queue lock apply, and calls
``RunManager.start_sync`` in the request's thread.
"""

from __future__ import annotations

import html
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import NAME_PATTERN, TrainConfig, field_kind
from ..errors import EmbeddingTrainerError
from ..log import format_duration
from ..templates import builtin_template_names
from .run_options import RUN_OPTIONS, PreviewOptions

TAB_TITLE = "Embedding Trainer"
TAB_ID = "embtrain_tab"
NEW_EMBEDDING = "(new embedding)"
#: Fields with their own place on the tab (the embedding, the images); not repeated under "Advanced".
OWN_FIELDS = ("name", "images", "num_vectors", "init_mode", "init_text", "init_file")
#: Options always visible.
MAIN_FIELDS = ("max_steps", "batch_size", "learning_rate", "resolution", "template")
THUMBNAILS = 32
SMALL_SIDE = 64
EMBEDDING_EXTENSIONS = (".safetensors", ".pt", ".bin")


# -- the form, from TrainConfig metadata ---------------------------------------------------------------------
@dataclass(frozen=True)
class WidgetSpec:
    """How one ``TrainConfig`` field appears: ``kind`` is dropdown, checkbox, number or textbox."""

    name: str
    kind: str
    label: str
    info: str
    default: Any
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    precision: int | None = None

    @property
    def elem_id(self) -> str:
        return f"embtrain_{self.name}"


def field_label(name: str) -> str:
    return name.replace("_", " ").capitalize().replace("Lr ", "LR ").replace("Snr", "SNR")


def widget_spec(field: Any) -> WidgetSpec:
    """The component for one ``TrainConfig`` field: choices -> dropdown, bool -> checkbox, int/float -> number."""
    meta = field.metadata
    kind = field_kind(field)
    common = {
        "name": field.name,
        "label": field_label(field.name),
        "info": meta.get("help", ""),
        "default": field.default,
    }
    if meta.get("choices"):
        return WidgetSpec(kind="dropdown", choices=tuple(meta["choices"]), **common)
    if kind == "bool":
        return WidgetSpec(kind="checkbox", **common)
    if kind in ("int", "float"):
        low = meta.get("min", meta.get("min_exclusive"))
        return WidgetSpec(
            kind="number", minimum=low, maximum=meta.get("max"), precision=0 if kind == "int" else None, **common
        )
    return WidgetSpec(kind="textbox", **common)


def field_specs(names: tuple[str, ...] | None = None) -> list[WidgetSpec]:
    """Specs of the named fields in that order, or of every field."""
    by_name = {f.name: f for f in TrainConfig.fields()}
    return [widget_spec(by_name[n]) for n in (names if names is not None else tuple(by_name))]


def advanced_specs() -> list[WidgetSpec]:
    """Every field that is neither one of the tab's own nor a main option, in ``TrainConfig`` order."""
    skip = set(OWN_FIELDS) | set(MAIN_FIELDS)
    return [widget_spec(f) for f in TrainConfig.fields() if f.name not in skip]


def coerce_value(spec: WidgetSpec, value: Any) -> Any:
    """A component's value as the field's type (gradio numbers arrive as floats, or None when cleared)."""
    if spec.kind == "number":
        if value is None or value == "":
            return spec.default
        if spec.precision == 0:
            number = float(value)
            return int(number) if number.is_integer() else number  # a fraction fails validation with its name
        return float(value)
    if spec.kind == "checkbox":
        return bool(value)
    return "" if value is None else str(value).strip() if spec.name != "init_text" else str(value)


def form_config(
    specs: list[WidgetSpec], values: list[Any], initial: dict[str, Any], always: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The config body from the form: fields in ``always`` plus every field changed from its initial value.

    Unchanged fields are left out so the host fills them at run time (the WebUI's embeddings folder, settings).
    """
    body: dict[str, Any] = {}
    for spec, value in zip(specs, values):
        value = coerce_value(spec, value)
        if spec.name in always or value != initial.get(spec.name, spec.default):
            body[spec.name] = value
    return body


@dataclass(frozen=True)
class FamilyDefaults:
    """What the tab fills in for the loaded model when the page loads."""

    resolution: int


def family_defaults(
    family: str | None, prediction_type: str | None = None, native_resolution: int | None = None
) -> FamilyDefaults:
    """The checkpoint's own resolution (``native_resolution``, from its config; else the family's usual: 512 for
    SD1 and SD2-base, 768 for SD2-v, 1024 for SDXL). The learning rate needs no per-family default: it is measured
    in units of each text encoder's table (``lr_scale table``)."""
    if family == "sdxl":
        return FamilyDefaults(native_resolution or 1024)
    if family == "sd2" and prediction_type in ("v", "v_prediction"):
        return FamilyDefaults(native_resolution or 768)
    return FamilyDefaults(native_resolution or 512)


def run_options_body(values: Any) -> dict[str, Any]:
    """The run options (``RUN_OPTIONS`` order) from the form: gradio numbers arrive as floats, or None when cleared."""
    body: dict[str, Any] = {}
    for option, value in zip(RUN_OPTIONS, values):
        if value is None or value == "":
            continue
        if option["type"] == "int" and isinstance(value, float) and value.is_integer():
            value = int(value)
        body[option["name"]] = value.strip() if isinstance(value, str) else value
    return body


def run_option_component(gr: Any, option: dict[str, Any]) -> Any:
    common = {"label": field_label(option["name"]), "info": option["help"], "elem_id": f"embtrain_{option['name']}"}
    if option["type"] == "int":
        return gr.Number(value=option["default"], precision=0, minimum=option["min"], maximum=option["max"], **common)
    return gr.Textbox(value=option["default"], lines=1, **common)


def template_choices() -> list[str]:
    return list(builtin_template_names())


# -- checks ----------------------------------------------------------------------------------------------------
def name_warnings(name: str, existing: list[str], token_count: int | None) -> list[str]:
    """Problems with a trigger word: invalid, already an embedding file, or a word the model already knows."""
    name = (name or "").strip()
    if not name:
        return []
    if not NAME_PATTERN.match(name):
        return [f"'{name}' is not a valid trigger word: use letters, digits, '.', '_' and '-'"]
    warnings = []
    clashes = [path for path in existing if Path(path).stem.lower() == name.lower()]
    if clashes:
        warnings.append(
            f"an embedding named '{name}' already exists ({', '.join(clashes)}); pick another name or set Overwrite"
        )
    if token_count == 1:
        warnings.append(
            f"'{name}' is a single token the model already knows: the embedding will replace that word in "
            "every prompt; a made-up word (e.g. '{name}-ti') is safer".replace("{name}", name)
        )
    return warnings


def embedding_files(folder: str | os.PathLike[str] | None) -> list[str]:
    """Embedding files in the WebUI's embeddings folder, relative to it, sorted."""
    if not folder or not os.path.isdir(folder):
        return []
    root = Path(folder)
    found = [
        str(path.relative_to(root))
        for path in root.rglob("*")
        if path.suffix.lower() in EMBEDDING_EXTENSIONS and path.is_file() and not path.name.startswith(".")
    ]
    return sorted(found, key=str.lower)


@dataclass
class DatasetCheck:
    ok: bool
    items: list[tuple[str, str]]  # (image path, caption) of the first THUMBNAILS usable images
    summary: str  # markdown
    problems: list[str]


def check_dataset(
    folder: str, recursive: bool = False, template: str | None = None, limit: int = THUMBNAILS
) -> DatasetCheck:
    """Scan an images folder for the tab: thumbnails with captions, and every problem found. Missing caption files
    are a problem only when ``template`` uses ``[filewords]`` (or is not known)."""
    from ..dataset import scan_dataset
    from ..templates import AUTO_TEMPLATE, FILEWORDS_TOKEN, load_template, template_for

    folder = (folder or "").strip()
    if not folder:
        return DatasetCheck(False, [], "**Enter the folder of training images.**", [])
    try:
        scan = scan_dataset(folder, recursive=recursive)
    except EmbeddingTrainerError as error:
        return DatasetCheck(False, [], f"**Cannot use this folder:** {_md(str(error))}", [str(error)])
    problems = [f"{p.path.name}: {p.message}" for p in scan.problems]
    uses_captions = True
    if template:
        try:
            chosen = template_for(template, scan.captioned, len(scan.records))
            uses_captions = any(FILEWORDS_TOKEN in line for line in load_template(chosen))
        except EmbeddingTrainerError as error:
            problems.append(str(error))
    no_caption = []
    for record in scan.records:
        width, height = record.size
        if min(width, height) < SMALL_SIDE:
            problems.append(f"{record.path.name}: tiny image ({width} x {height}); use at least {SMALL_SIDE} px")
        if not record.has_caption_file:
            no_caption.append(record.path.name)
    shown = ", ".join(no_caption[:8]) + (f" and {len(no_caption) - 8} more" if len(no_caption) > 8 else "")
    if no_caption and uses_captions:
        problems.append(
            f"{len(no_caption)} image(s) without a caption file (the caption comes from the file name): {shown}"
        )
    elif no_caption and scan.captioned and (template or "").strip() == AUTO_TEMPLATE:
        problems.append(
            f"{len(no_caption)} image(s) without a caption file, so template auto leaves every caption out (it uses "
            f"them only when each image has one): {shown}"
        )
    items = [(str(r.path), r.caption) for r in scan.records[:limit]]
    lines = [f"**{len(scan.records)} usable image(s)** in `{_md(folder)}`"]
    if len(scan.records) > limit:
        lines[0] += f" (showing the first {limit})"
    if problems:
        lines.append(f"**{len(problems)} problem(s):**")
        lines += [f"- {_md(p)}" for p in problems]
    else:
        lines.append("No problems found.")
    return DatasetCheck(True, items, "\n".join(lines), problems)


def _md(text: str) -> str:
    return text.replace("\\", "\\\\").replace("*", "\\*").replace("_", "\\_").replace("`", "'")


# -- status and result ---------------------------------------------------------------------------------------------
def _loss(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"


def status_line(status: dict[str, Any] | None) -> str:
    if not status:
        return "Idle."
    return f"{status.get('name', '')}: {status.get('state', '?')} - {status.get('status_text', '')}"


def result_html(status: dict[str, Any] | None, error: str | None = None) -> str:
    """The result summary: steps, time, final loss and file of a finished run, or its error."""
    if error:
        return f"<div class='embtrain-error'>{html.escape(error)}</div>"
    if not status:
        return ""
    parts = []
    if status.get("error"):
        parts.append(f"<div class='embtrain-error'>Run failed: {html.escape(str(status['error']))}</div>")
    result = status.get("result")
    if result:
        rows = [
            ("State", status.get("state", "")),
            ("Steps", f"{result.get('steps')} (embedding step {result.get('embedding_step')})"),
            ("Resolution", f"{status.get('resolution')} px"),
            ("Time", format_duration(float(result.get("elapsed_s") or 0.0))),
            ("Final loss", f"{_loss(result.get('final_loss'))} (smoothed {_loss(result.get('smoothed_loss'))})"),
        ]
        if result.get("held_out_loss") is not None:
            best = result.get("vectors_step") != result.get("steps")
            rows.append(
                (
                    "File holds",
                    f"step {result.get('vectors_step')}'s vectors, held-out loss "
                    f"{_loss(result.get('held_out_loss'))}" + (" (the best score of the run)" if best else ""),
                )
            )
        if result.get("early_stopped"):
            rows.append(("Stopped early", "the held-out score had stopped improving"))
        if result.get("init_choice"):
            rows.append(("Init word", f"'{result['init_choice']}' (the lowest loss on the images)"))
        if result.get("chosen_start"):
            scores = result.get("start_scores") or []
            rows.append(
                (
                    "Start",
                    f"{result['chosen_start']} of {len(scores)}, the lowest held-out loss "
                    f"({', '.join(_loss(s) for s in scores)})",
                )
            )
        rows.append(("File", result.get("embedding_path", "")))
        body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
        parts.append(f"<table class='embtrain-result'>{body}</table>")
    for warning in status.get("warnings") or []:
        parts.append(f"<div class='embtrain-warning'>{html.escape(str(warning))}</div>")
    return "".join(parts)


# -- the host side, through the glue ---------------------------------------------------------------------------------
def _embeddings_dir(glue: Any) -> str:
    return str(getattr(glue.symbols.shared.cmd_opts, "embeddings_dir", "") or "")


def _loaded_model(glue: Any) -> Any:
    try:
        return glue.symbols.shared.sd_model
    except Exception:
        return None


def model_defaults(glue: Any) -> FamilyDefaults:
    from ..hosts.a1111 import model_family, native_resolution

    model = _loaded_model(glue)
    if glue.symbols.forge is not None:  # Forge's models carry no ldm config, so no native resolution either
        from ..hosts import forge

        try:
            return family_defaults(forge.model_family(model), forge.prediction_type(model))
        except (EmbeddingTrainerError, AttributeError):
            return family_defaults(None)
    try:
        family = model_family(model) if model is not None else None
    except EmbeddingTrainerError:
        family = None
    native = native_resolution(model, family) if family is not None else None
    return family_defaults(family, getattr(model, "parameterization", "eps"), native)


def known_token_count(glue: Any, text: str) -> int | None:
    """Tokens of ``text`` in the loaded model's (first) tokenizer; None when no model can tell."""
    from ..hosts.a1111 import A1111Host

    model = _loaded_model(glue)
    if model is None or not text:
        return None
    try:
        symbols = glue.symbols
        if symbols.forge is not None:
            from ..hosts.forge import token_count

            return token_count(model, text)
        return A1111Host(model, symbols.model_hijack.embedding_db, symbols.embedding_class).known_token_count(text)
    except Exception:
        return None


def check_name(glue: Any, name: str) -> str:
    warnings = name_warnings(name, embedding_files(_embeddings_dir(glue)), known_token_count(glue, name))
    return "".join(f"<div class='embtrain-warning'>{html.escape(w)}</div>" for w in warnings)


# -- the tab ---------------------------------------------------------------------------------------------------------
def build_tab(glue: Any) -> list[tuple[Any, str, str]]:
    """The tab for ``script_callbacks.on_ui_tabs``."""
    import gradio as gr

    main_specs = field_specs(MAIN_FIELDS)
    adv_specs = advanced_specs()
    initial = glue.config_defaults({})

    def component(spec: WidgetSpec) -> Any:
        value = initial.get(spec.name, spec.default)
        common = {"label": spec.label, "info": spec.info or None, "elem_id": spec.elem_id}
        if spec.kind == "dropdown":
            return gr.Dropdown(choices=list(spec.choices or ()), value=value, **common)
        if spec.name == "template":  # a built-in name or the path of a template file
            return gr.Dropdown(choices=template_choices(), value=value, allow_custom_value=True, **common)
        if spec.kind == "checkbox":
            return gr.Checkbox(value=bool(value), **common)
        if spec.kind == "number":
            extra = {"precision": spec.precision} if spec.precision is not None else {}
            return gr.Number(value=value, minimum=spec.minimum, maximum=spec.maximum, **common, **extra)
        return gr.Textbox(value=str(value), lines=1, **common)

    defaults = TrainConfig()
    with gr.Blocks(analytics_enabled=False) as blocks:
        with gr.Row(elem_id="embtrain_layout", equal_height=False):
            with gr.Column(scale=3, elem_id="embtrain_settings"):
                with gr.Row():
                    name = gr.Textbox(
                        label="Trigger word (name)",
                        elem_id="embtrain_name",
                        lines=1,
                        placeholder="my-cat",
                        info=TrainConfig.fields()[0].metadata["help"],
                    )
                    existing = gr.Dropdown(
                        label="Continue an existing embedding",
                        elem_id="embtrain_init_file",
                        choices=[NEW_EMBEDDING] + embedding_files(_embeddings_dir(glue)),
                        value=NEW_EMBEDDING,
                    )
                    refresh = gr.Button("\U0001f504", elem_id="embtrain_refresh", elem_classes="embtrain-tool")
                name_check = gr.HTML(elem_id="embtrain_name_check")
                with gr.Row():
                    init_mode_spec = field_specs(("init_mode",))[0]
                    init_mode = gr.Dropdown(
                        label="Initialization",
                        value=defaults.init_mode,
                        elem_id="embtrain_init_mode",
                        choices=[c for c in init_mode_spec.choices or () if c != "file"],
                        info=init_mode_spec.info,
                    )
                    init_text = gr.Textbox(
                        label="Initialization text",
                        value=defaults.init_text,
                        lines=1,
                        elem_id="embtrain_init_text",
                        info="A word close to the concept, e.g. 'cat' (new embeddings only).",
                    )
                    num_vectors = gr.Number(
                        label="Vectors per token",
                        value=defaults.num_vectors,
                        precision=0,
                        minimum=1,
                        maximum=75,
                        elem_id="embtrain_num_vectors",
                    )
                with gr.Row():
                    images = gr.Textbox(
                        label="Images folder",
                        lines=1,
                        elem_id="embtrain_images",
                        placeholder="/path/to/images",
                        info="png, jpg, webp, bmp; captions from .txt files beside them",
                    )
                    check = gr.Button("Check dataset", elem_id="embtrain_check")
                with gr.Row():
                    main_components = [component(spec) for spec in main_specs]
                with gr.Accordion("Advanced", open=False, elem_id="embtrain_advanced"):
                    adv_components = [component(spec) for spec in adv_specs]
                with gr.Accordion("Previews", open=True, elem_id="embtrain_previews_options"):
                    with gr.Row():
                        preview_components = [run_option_component(gr, option) for option in RUN_OPTIONS]
            with gr.Column(scale=2, elem_id="embtrain_output"):
                with gr.Row():
                    start = gr.Button("Start training", variant="primary", elem_id="embtrain_start")
                    stop = gr.Button("Stop", elem_id="embtrain_stop")
                gr.HTML(
                    "<div id='embtrain_progress_anchor'></div>"
                    "<div id='embtrain_live' class='embtrain-live'></div>"
                    "<canvas id='embtrain_loss_canvas' class='embtrain-chart' width='560' height='240'"
                    " data-points='0'></canvas>",
                    elem_id="embtrain_chart",
                )
                status = gr.HTML("Idle.", elem_id="embtrain_status")
                result = gr.HTML(elem_id="embtrain_result")
                # Filled by javascript/embtrain.js from the run's status as the images arrive.
                gr.HTML("<div id='embtrain_previews' class='embtrain-previews'></div>", elem_id="embtrain_preview_box")
                dataset_report = gr.Markdown(elem_id="embtrain_dataset_report")
                gallery = gr.Gallery(label="Dataset", elem_id="embtrain_gallery", columns=6, height="auto")
                task_id = gr.Textbox(visible=False, elem_id="embtrain_task_id")

        resolution = main_components[MAIN_FIELDS.index("resolution")]

        def load_model_defaults() -> int:
            # Read each time the page loads: the user may have switched checkpoints since.
            return model_defaults(glue).resolution

        blocks.load(fn=load_model_defaults, inputs=[], outputs=[resolution])

        def refresh_existing():
            return gr.update(choices=[NEW_EMBEDDING] + embedding_files(_embeddings_dir(glue)))

        refresh.click(fn=refresh_existing, inputs=[], outputs=[existing])
        name.blur(fn=lambda value: check_name(glue, value), inputs=[name], outputs=[name_check])

        recursive = adv_components[[s.name for s in adv_specs].index("recursive")]

        template = main_components[MAIN_FIELDS.index("template")]

        def do_check(folder: str, recursive_value: bool, template_value: str):
            report = check_dataset(folder, bool(recursive_value), str(template_value or "") or None)
            return report.summary, _thumbnails(report.items)

        check.click(fn=do_check, inputs=[images, recursive, template], outputs=[dataset_report, gallery])

        def do_start(task: str, *values: Any):
            name_value, existing_value, mode_value, init_value, vectors_value, images_value = values[:6]
            preview_values = values[6 : 6 + len(RUN_OPTIONS)]
            rest = values[6 + len(RUN_OPTIONS) :]
            own = {"name": str(name_value or "").strip(), "images": str(images_value or "").strip()}
            if existing_value and existing_value != NEW_EMBEDDING:
                own["init_mode"] = "file"
                own["init_file"] = os.path.join(_embeddings_dir(glue), existing_value)
            else:
                own["init_mode"] = str(mode_value or defaults.init_mode)
                own["init_text"] = str(init_value if init_value is not None else "*")
                own["num_vectors"] = coerce_value(field_specs(("num_vectors",))[0], vectors_value)
            body = dict(own)
            body.update(form_config(main_specs, list(rest[: len(main_specs)]), initial, always=MAIN_FIELDS))
            body.update(form_config(adv_specs, list(rest[len(main_specs) :]), initial))
            try:
                preview = PreviewOptions.pop_from(run_options_body(preview_values))
                final = glue.manager.start_sync(body, preview=preview, task_id=task)
            except EmbeddingTrainerError as error:
                return status_line(None), result_html(None, f"{type(error).__name__}: {error}")
            return html.escape(status_line(final)), result_html(final)

        wrapped = glue.symbols.wrap_gradio_gpu_call(do_start, extra_outputs=[""])
        start.click(
            fn=wrapped,
            _js="embtrain_start",
            inputs=[task_id, name, existing, init_mode, init_text, num_vectors, images]
            + preview_components
            + main_components
            + adv_components,
            outputs=[status, result],
        )

        def do_stop():
            from .run_manager import RunNotActiveError

            try:
                run_id = glue.manager.stop()
            except RunNotActiveError as error:
                return html.escape(str(error))
            return html.escape(f"stop requested for {run_id}: saving what has been trained")

        stop.click(fn=do_stop, inputs=[], outputs=[status])

    return [(blocks, TAB_TITLE, TAB_ID)]


def _thumbnails(items: list[tuple[str, str]], size: int = 160) -> list[tuple[Any, str]]:
    """Small PIL copies (the WebUI serves PIL results from its own temp folder; raw paths may be refused)."""
    from PIL import Image, ImageOps

    thumbs = []
    for path, caption in items:
        try:
            with Image.open(path) as im:
                im = ImageOps.exif_transpose(im)
                im.thumbnail((size, size))
                thumbs.append((im.convert("RGB"), caption))
        except Exception:
            continue
    return thumbs
