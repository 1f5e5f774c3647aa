"""Resumable run state: one safetensors file per save with the vectors, AdamW moments and grad-scaler state.

No RNG state is stored: the trainer derives every random draw from (seed, micro-batch index), and the seed is in
the saved config, so the step is enough to continue exactly where a run stopped. No pickle is involved.
"""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch
from safetensors import safe_open

from . import __version__
from .atomic_write import write_atomically
from .errors import ConfigError

STATE_SUFFIX = ".state.safetensors"
_ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")


def save_state(
    path: Path,
    vectors: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scaler: torch.cuda.amp.GradScaler | None,
    step: int,
    base_step: int,
    config_json: str,
) -> None:
    """Write the state after ``step`` optimiser steps; ``vectors`` are in the optimiser's parameter order."""
    tensors = {f"vectors.{k}": v.detach().cpu().contiguous() for k, v in vectors.items()}
    state = optimizer.state_dict()["state"]
    for i, key in enumerate(vectors):
        for name, value in state.get(i, {}).items():
            tensors[f"optimizer.{key}.{name}"] = torch.as_tensor(value).detach().cpu().reshape(-1).contiguous()
    if scaler is not None:
        tensors["scaler.scale"] = torch.tensor(float(scaler.get_scale()))
        tensors["scaler.growth"] = torch.tensor(int(scaler.state_dict()["_growth_tracker"]))
    meta = {"step": str(step), "base_step": str(base_step), "config": config_json, "trainer": __version__}
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = safetensors.torch.save(tensors, metadata=meta)
    write_atomically(path, lambda f: f.write(payload), overwrite=True)


def restore_optimizer(
    optimizer: torch.optim.Optimizer,
    scaler: torch.cuda.amp.GradScaler | None,
    leaves: dict[str, torch.Tensor],
    tensors: dict[str, torch.Tensor],
) -> None:
    """Put saved AdamW moments (and the grad scaler's scale) back; ``leaves`` in the optimiser's order."""
    state = optimizer.state_dict()
    for i, key in enumerate(leaves):
        entry = {}
        for name in _ADAM_STATE:
            value = tensors.get(f"optimizer.{key}.{name}")
            if value is not None:
                entry[name] = value.reshape(()) if name == "step" else value.reshape(leaves[key].shape)
        if entry:
            state["state"][i] = entry
    optimizer.load_state_dict(state)
    if scaler is not None and "scaler.scale" in tensors:
        scaler.load_state_dict(
            {"scale": float(tensors["scaler.scale"]), "_growth_tracker": int(tensors["scaler.growth"])}
        )


def run_folder_of(state_path: Path) -> Path:
    """The run folder a state file belongs to (``<run>/saves/<file>``, or the folder it lies in)."""
    return state_path.parent.parent if state_path.parent.name == "saves" else state_path.parent


def find_state(path: str | Path) -> Path:
    """A state file, or the latest one in a run folder (``<run>/saves``)."""
    path = Path(path)
    if path.is_file():
        return path
    for folder in (path / "saves", path):
        if folder.is_dir():
            states = sorted(folder.glob(f"*{STATE_SUFFIX}"))
            if states:
                return states[-1]
    raise ConfigError(
        "resume", f"{path} is neither a state file (*{STATE_SUFFIX}) nor a run folder with saves; check the path"
    )


def load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and header of a state file; a clear ConfigError for anything else."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        tensors = safetensors.torch.load_file(str(path))
    except Exception as error:  # a truncated or foreign file
        raise ConfigError("resume", f"{path} cannot be read as a saved run state ({error})") from None
    if "step" not in meta or "config" not in meta:
        raise ConfigError("resume", f"{path} is not a state file written by this trainer")
    return tensors, meta
