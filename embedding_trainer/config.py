"""The one validated training configuration, built once from CLI flags, an API body or UI inputs.

Each field carries its help text and allowed values, so the command line's flags, the WebUI tab's form and the
API's config schema are all generated from this single definition. ``TrainConfig.from_dict`` rejects unknown keys
and names the field, the value and what is allowed for every error.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .schedules import parse_learning_rate

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _f(default: Any, help: str, choices: tuple[Any, ...] | None = None, **limits: Any) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices, **limits})


@dataclass
class TrainConfig:
    # What to train
    name: str = _f("", "Trigger word and file name of the embedding (letters, digits, '.', '_', '-').")
    images: str = _f("", "Folder of training images (png, jpg, webp, bmp).")
    recursive: bool = _f(False, "Include images in sub-folders.")
    # 4: in the learning benchmark (benchmarks/RESULTS.md) 4 vectors learnt faster than 1 and edited as well or better.
    num_vectors: int = _f(4, "Vectors per token (each takes one of the prompt's 75 token places).", min=1, max=75)
    init_mode: str = _f(
        "text",
        "How to initialise the vectors. text: the init text's token embeddings; best-word: before training, try the "
        "init text, the captions' words and a built-in list of common words, and start from the one with the lowest "
        "loss on your images; encoder-output: the text encoder's output for the init text (CrossInit); file: an "
        "embedding to continue; random.",
        ("text", "best-word", "encoder-output", "file", "random"),
    )
    init_text: str = _f(
        "*",
        "Initialisation text (init_mode text, encoder-output; best-word tries it too): spread over the vectors.",
    )
    init_file: str = _f("", "Embedding file to continue training (init_mode=file); sets the vector count.")
    # Output
    output_dir: str = _f("embeddings", "Folder for the finished embedding file.")
    run_dir: str = _f("", "Folder for intermediate saves, the loss log and the run config (default runs/<name>).")
    overwrite: bool = _f(False, "Replace an existing embedding file and start over in an existing run folder.")
    write_pt: bool = _f(False, "Also write the WebUI's legacy .pt layout next to the .safetensors file.")
    write_card: bool = _f(
        False,
        "Also write the WebUI's picture card (the embedding inside a PNG, to share) as <name>.png in the run folder.",
    )
    card_picture: str = _f("", "Image the card shows (default: the run's first preview, else a plain tile).")
    save_every: int = _f(0, "Save an intermediate embedding and resumable state every N steps (0: off).", min=0)
    eval_every: int = _f(
        25,
        "At the start, every N steps and at the end, score the vectors: the denoising loss on fixed views of the "
        "images (fixed noise, timesteps and prompts; lower is better), in the status, the chart and the saved files "
        "(0: off).",
        min=0,
    )
    early_stop_patience: int = _f(
        0,
        "Stop when the held-out score has not improved for this many evaluations in a row (0: train all max_steps; "
        "needs eval_every).",
        min=0,
    )
    # last: on the toy model's benchmark the best-scored vectors were no better than the last (benchmarks/RESULTS.md).
    final_vectors: str = _f(
        "last",
        "What the finished file holds: the vectors with the best held-out score (needs eval_every), or the last "
        "step's.",
        ("best", "last"),
    )
    starts: int = _f(
        1,
        "Train this many starts from the same init for start_steps each, every one with its own noise, timestep and "
        "prompt draws, and carry on with the one whose held-out score is lowest (1: off). With 4 vectors a start that "
        "found the concept mostly scored lower than one that did not; the cost is (starts - 1) x start_steps extra "
        "steps.",
        min=1,
        max=16,
    )
    start_steps: int = _f(50, "Steps each of the starts trains before the best one is chosen.", min=1)
    keep_saves: int = _f(3, "How many intermediate saves to keep (0: keep all).", min=0)
    resume: str = _f("", "Resume from a run folder (its latest save) or a state file written by a previous run.")
    # Data
    template: str = _f(
        "auto",
        "Prompt template: auto (subject_filewords when every image has a caption file, else subject), a built-in "
        "name or the path of a text file with [name]/[filewords] lines.",
    )
    resolution: int = _f(0, "Training resolution in pixels, a multiple of 8 (0: the model's default).", min=0)
    crop: str = _f("center", "Where to crop after resizing the short side.", ("center", "random"))
    buckets: bool = _f(False, "Aspect-ratio buckets: train non-square images without distortion.")
    flip: bool = _f(False, "Flip images horizontally at random.")
    repeats: int = _f(1, "Times each image appears per epoch.", min=1, max=1000)
    shuffle_tags: bool = _f(False, "Shuffle the comma-separated tags of each caption.")
    tag_dropout: float = _f(0.0, "Probability of dropping each caption tag.", min=0.0, max=1.0)
    latent_sampling: str = _f(
        "deterministic",
        "Latents: the VAE mean (deterministic), one sample per image (once), or a new sample each step (random).",
        ("deterministic", "once", "random"),
    )
    use_alpha_mask: bool = _f(False, "Weight the loss by each image's alpha channel (transparent areas count less).")
    min_images: int = _f(1, "Fail if fewer readable images than this remain.", min=1)
    # Optimisation
    max_steps: int = _f(1000, "Optimiser steps in this run (not counting steps stored in an init file).", min=1)
    # Batch 4 at 0.01 (absolute) on the toy model: in a one-seed sweep (benchmarks/RESULTS.md) it learnt every held-out
    # concept within 200 steps, where batch 1 or the WebUI's 0.005 left some unlearnt at 400. In table units
    # (lr_scale) that rate is 0.007: the toy's table is 1.38x SD1's scale (level with absolute 0.01 in the ablation).
    batch_size: int = _f(4, "Images per micro-batch (out of memory? lower it, raise grad_accum).", min=1, max=256)
    grad_accum: int = _f(1, "Micro-batches accumulated per optimiser step.", min=1, max=256)
    learning_rate: str = _f(
        "0.007",
        "A rate ('0.01') or the WebUI's piecewise schedule ('0.005:100, 1e-3:1000, 1e-5').",
        accepts_number=True,
    )
    lr_scale: str = _f(
        "table",
        "Units of the learning rate. table: scaled by the text encoder's token-embedding table, so a rate moves the "
        "vectors by the same share of the vocabulary's size on SD1 (1x), SD2, SDXL and small models; absolute: the "
        "raw AdamW rate, as the WebUI's Train tab uses it.",
        ("table", "absolute"),
    )
    norm_band: float = _f(
        0.0,
        "Keep each vector's length within this factor of the vocabulary's median length after every step (1.5: "
        "between median/1.5 and median*1.5; 1: fixed length, only the direction trains; 0: off). Long vectors "
        "drown the rest of the prompt.",
        min=0.0,
    )
    lr_scheduler: str = _f("constant", "Schedule applied to a single learning rate.", ("constant", "linear", "cosine"))
    lr_warmup_steps: int = _f(0, "Linear warm-up steps at the start of the schedule.", min=0)
    weight_decay: float = _f(0.0, "AdamW weight decay on the vectors.", min=0.0, max=1.0)
    grad_clip: str = _f("none", "Gradient clipping, applied after unscaling.", ("none", "norm", "value"))
    grad_clip_value: float = _f(1.0, "Maximum gradient norm or value for grad_clip.", min_exclusive=0.0)
    # Loss
    min_snr_gamma: float = _f(0.0, "Min-SNR-gamma loss weighting (5 is typical; 0: off).", min=0.0)
    noise_offset: float = _f(0.0, "Offset noise strength (about 0.1 helps very dark or bright images).", min=0.0)
    timestep_min: int = _f(0, "Lowest training timestep.", min=0)
    timestep_max: int = _f(999, "Highest training timestep (inclusive).", min=0)
    # Hardware
    device: str = _f("auto", "Device: auto, cpu, cuda or cuda:N.")
    precision: str = _f(
        "auto",
        "Compute precision; the vectors always stay fp32. auto: bf16 or fp16 on CUDA, fp32 elsewhere.",
        ("auto", "fp32", "fp16", "bf16"),
    )
    gradient_checkpointing: bool = _f(False, "Recompute UNet activations in backward: less memory, slower.")
    vae_to_cpu: bool = _f(
        False, "Move the VAE to system RAM once every latent is cached (frees GPU memory; not with random crop)."
    )
    seed: int = _f(0, "Random seed; the same seed and data give the same run.", min=0)

    # ------------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def fields(cls) -> tuple[dataclasses.Field, ...]:
        return dataclasses.fields(cls)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build a config from a mapping, rejecting unknown keys and values of the wrong type."""
        if not isinstance(data, dict):
            raise ConfigError("config", f"expected an object of fields, got {type(data).__name__}")
        known = {f.name: f for f in cls.fields()}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(unknown[0], f"unknown field; allowed fields are: {', '.join(known)}")
        values = {key: _coerce(known[key], value) for key, value in data.items()}
        return cls(**values)

    @staticmethod
    def saved_fields(text: str) -> dict[str, Any]:
        """The fields of a config a run saved (its JSON), with options added since then set to what that run did:
        runs saved before ``lr_scale`` existed used absolute rates."""
        data = json.loads(text)
        data.setdefault("lr_scale", "absolute")
        return data

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        for f in self.fields():
            value = getattr(self, f.name)
            _coerce(f, value)  # type check
            meta = f.metadata
            if meta.get("choices") and value not in meta["choices"]:
                allowed = ", ".join(map(str, meta["choices"]))
                raise ConfigError(f.name, f"{value!r} is not allowed; choose one of: {allowed}")
            if "min" in meta and value < meta["min"]:
                raise ConfigError(f.name, f"{value!r} is below the minimum {meta['min']}")
            if "max" in meta and value > meta["max"]:
                raise ConfigError(f.name, f"{value!r} is above the maximum {meta['max']}")
            if "min_exclusive" in meta and value <= meta["min_exclusive"]:
                raise ConfigError(f.name, f"{value!r} must be greater than {meta['min_exclusive']}")
        if self.name and not NAME_PATTERN.match(self.name):
            raise ConfigError(
                "name",
                f"{self.name!r} is not a valid trigger word; use letters, digits, '.', '_' and '-' "
                "(starting with a letter or digit), for example 'my-cat'",
            )
        if self.resolution and self.resolution % 8:
            lower, upper = self.resolution // 8 * 8, self.resolution // 8 * 8 + 8
            raise ConfigError(
                "resolution",
                f"{self.resolution} is not a multiple of 8 (the VAE downsamples 8x); try {lower} or {upper}",
            )
        if self.resolution and self.resolution < 64:
            raise ConfigError("resolution", f"{self.resolution} is too small; use at least 64")
        if self.vae_to_cpu and self.crop == "random":
            raise ConfigError(
                "vae_to_cpu",
                "random crop encodes images at every step and needs the VAE; use crop 'center' or turn it off",
            )
        if self.timestep_min > self.timestep_max:
            raise ConfigError(
                "timestep_min", f"{self.timestep_min} is above timestep_max {self.timestep_max}; make it lower"
            )
        if 0.0 < self.norm_band < 1.0:
            raise ConfigError(
                "norm_band", f"{self.norm_band} is below 1; use 0 (off), 1 (fixed length) or a factor such as 1.5"
            )
        if self.init_mode == "file" and not self.init_file:
            raise ConfigError("init_file", "init_mode is 'file' but no init_file is given; name an embedding file")
        if self.init_mode in ("text", "encoder-output") and not self.init_text.strip():
            raise ConfigError(
                "init_text", "is empty; give a word close to the concept, e.g. 'cat', or use init_mode random"
            )
        schedule = parse_learning_rate(self.learning_rate, field="learning_rate")
        if schedule.is_piecewise and self.lr_scheduler != "constant":
            raise ConfigError(
                "lr_scheduler",
                f"{self.lr_scheduler!r} cannot be combined with a piecewise learning_rate; "
                "use lr_scheduler constant or a single rate",
            )

    def require_for_training(self) -> None:
        """Checks that only matter when a run starts (a config may be built incomplete, e.g. by a form)."""
        if not self.name:
            raise ConfigError("name", "is required: the trigger word, e.g. 'my-cat'")
        if not self.images:
            raise ConfigError("images", "is required: the folder of training images")

    @property
    def effective_run_dir(self) -> str:
        import os

        return self.run_dir or os.path.join("runs", self.name)


def field_kind(f: dataclasses.Field) -> str:
    """A field's type name: "str", "int", "float" or "bool" (annotations are strings under PEP 563)."""
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    """Check ``value`` against the field's declared type (ints are accepted for floats, never bools)."""
    kind = field_kind(f)
    if f.metadata.get("accepts_number") and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = repr(value)
    ok = {
        "str": isinstance(value, str),
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
    }[kind]
    if not ok:
        raise ConfigError(f.name, f"{value!r} has type {type(value).__name__}; expected {kind}")
    if kind == "float":
        return float(value)
    return value
