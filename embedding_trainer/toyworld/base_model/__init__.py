"""A small SD1-layout base model trained from scratch on the toy world, in stages that resume.

``python -m embedding_trainer.toyworld.train_base`` trains it; :func:`load_model` and :func:`sample` use a saved one.
Modules: ``plan`` (settings), ``architecture`` (the parts), ``data`` (images, captions, latents), ``vae_losses``,
``training`` (the two stages, the EMA), ``stages`` (running them, assembling the model), ``held_out`` (erasing the
held-out words), ``io`` (checkpoints, the diffusers folder), ``sampling`` (DDIM) and ``evaluation`` (the judges).
How it was designed and measured: embedding_trainer/toyworld/README.md.
"""

from .. import world
from .architecture import (
    LATENT_FACTOR,
    build_scheduler,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
    describe,
    parameter_count,
    scheduler_config,
)
from .data import (
    cached_latents,
    caption_variants,
    encode_latents,
    foreground,
    render_images,
    to_model_range,
    to_uint8,
    tokenize,
    training_captions,
    training_images,
)
from .evaluation import (
    EVAL_INDEX_OFFSET,
    JUDGED,
    PromptCase,
    accuracy,
    counterfactual_judge,
    evaluate_samples,
    evaluate_vae,
    evaluation_prompts,
    held_out_rates,
    image_grid,
    judge_images,
)
from .held_out import erase_held_out_words, held_out_token_ids, initial_text_encoder
from .io import BaseModel, folder_sizes, load_model, load_trained_vae, save_model
from .plan import FORMAT_VERSION, Architecture, BaseModelError, Plan, UnetTraining, VaeTraining
from .sampling import sample
from .stages import train, trained_model
from .training import StageResult, calibrate_scaling_factor, machine_description, train_unet, train_vae
from .vae_losses import texture_statistics_loss, vae_losses

__all__ = [
    "EVAL_INDEX_OFFSET",
    "FORMAT_VERSION",
    "JUDGED",
    "LATENT_FACTOR",
    "Architecture",
    "BaseModel",
    "BaseModelError",
    "Plan",
    "PromptCase",
    "StageResult",
    "UnetTraining",
    "VaeTraining",
    "accuracy",
    "build_scheduler",
    "build_text_encoder",
    "build_tokenizer",
    "build_unet",
    "build_vae",
    "cached_latents",
    "calibrate_scaling_factor",
    "caption_variants",
    "counterfactual_judge",
    "describe",
    "encode_latents",
    "erase_held_out_words",
    "evaluate_samples",
    "evaluate_vae",
    "evaluation_prompts",
    "folder_sizes",
    "foreground",
    "held_out_rates",
    "held_out_token_ids",
    "image_grid",
    "initial_text_encoder",
    "judge_images",
    "load_model",
    "load_trained_vae",
    "machine_description",
    "parameter_count",
    "render_images",
    "sample",
    "save_model",
    "scheduler_config",
    "texture_statistics_loss",
    "to_model_range",
    "to_uint8",
    "tokenize",
    "train",
    "train_unet",
    "train_vae",
    "trained_model",
    "training_captions",
    "training_images",
    "vae_losses",
    "world",
]
