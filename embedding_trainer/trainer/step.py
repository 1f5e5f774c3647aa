"""The optimiser step: ``grad_accum`` micro-batches forward and backward, the data-parallel sum (with the processes'
stop and report votes), the first step's gradient check, clipping, the fp16 grad scaler, AdamW and the norm band.

Nothing here waits for the device but the first step's gradient check (and the fp16 grad scaler's overflow check
where AdamW is not fused, i.e. off CUDA): losses and vectors are checked for NaN/inf at the run log's reports.
"""

from __future__ import annotations

import copy
import inspect
import time
from collections.abc import Callable
from typing import Any

import torch

from ..config import TrainConfig
from ..distributed import Processes
from ..errors import TrainingError
from ..run_state import restore_optimizer
from ..schedules import LearningRate, learning_rate_at
from .objective import Objective


@torch.no_grad()
def copy_into(leaves: dict[str, torch.Tensor], vectors: dict[str, torch.Tensor]) -> None:
    """Overwrite the trained tensors in place (the optimiser holds them) with ``vectors``."""
    for key, leaf in leaves.items():
        leaf.copy_(vectors[key])


@torch.no_grad()
def project_norms(vectors: dict[str, torch.Tensor], word_norms: dict[str, float], band: float) -> None:
    """``norm_band``: scale each vector whose length left [median / band, median * band] back to the band's edge
    (on the device; no synchronisation)."""
    if not band:
        return
    for key, leaf in vectors.items():
        median = word_norms[key]
        norms = leaf.norm(dim=-1, keepdim=True)
        leaf.mul_(norms.clamp(median / band, median * band) / norms.clamp_min(1e-12))


def no_gradient_message(key: str) -> str:
    return (
        f"the '{key}' vectors received no gradient: the host did not connect them to the loss "
        "(for SDXL in the WebUI its text embedders must be trainable during the step). Nothing was trained."
    )


def _grad_scaler(device: torch.device) -> torch.cuda.amp.GradScaler:
    # torch >= 2.3 has the device-generic class (CUDA and CPU); 2.1 (the WebUI's pin) only the CUDA one.
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device.type)
    return torch.cuda.amp.GradScaler()


def _adamw_has_fused() -> bool:
    return "fused" in inspect.signature(torch.optim.AdamW).parameters


class Stepper:
    """The trained vectors (``leaves``, on the device), their AdamW optimiser and grad scaler, and the step."""

    def __init__(
        self,
        config: TrainConfig,
        objective: Objective,
        vectors: dict[str, torch.Tensor],
        lr_schedule: LearningRate,
        lr_factors: dict[str, float],
        word_norms: dict[str, float],
        precision: str,
        processes: Processes,
        report_interval_s: float,
        start_step: int = 0,
        resume_tensors: dict[str, torch.Tensor] | None = None,
    ):
        """``lr_factors``: each encoder's rate factor; ``word_norms``: the norm band's centres; ``resume_tensors``: a
        saved state whose AdamW moments and grad-scaler state go on."""
        self.config = config
        self.objective = objective
        self.device = device = objective.device
        self.leaves = {k: v.to(device).requires_grad_(True) for k, v in vectors.items()}
        self.lr_schedule = lr_schedule
        self.word_norms = word_norms
        self.precision = precision
        self.processes = processes
        self.report_interval_s = report_interval_s
        # On CUDA, fused AdamW is one kernel, and the fp16 grad scaler hands it the overflow flag on the device
        # (the unfused path reads that flag on the host every step: a synchronisation).
        fused = {"fused": True} if device.type == "cuda" and _adamw_has_fused() else {}
        # One group per encoder: lr_scale table gives each its own factor (SDXL's two tables differ in scale).
        groups = [{"params": [leaf], "lr_factor": lr_factors[key]} for key, leaf in self.leaves.items()]
        self.optimizer = torch.optim.AdamW(groups, lr=lr_schedule.base, weight_decay=config.weight_decay, **fused)
        self.scaler = _grad_scaler(device) if precision == "fp16" else None
        if resume_tensors is not None:
            restore_optimizer(self.optimizer, self.scaler, self.leaves, resume_tensors)
        self.gradients_checked = start_step > 0
        # Data-parallel: this process has been asked to stop; what the processes decided at the last step.
        self.stop_vote = self.stop_agreed = self.report_agreed = False
        self.last_report = 0.0  # when the last report was made (time.perf_counter)

    def detached(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.leaves.items()}

    def clone(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.leaves.items()}

    def project_norms(self) -> None:
        project_norms(self.leaves, self.word_norms, self.config.norm_band)

    # -- starts -------------------------------------------------------------------------------------------------
    def restart(self, vectors: dict[str, torch.Tensor]) -> None:
        """Start again from ``vectors`` with fresh AdamW moments (and fp16 loss scale)."""
        copy_into(self.leaves, vectors)
        self.optimizer.state.clear()
        self.scaler = _grad_scaler(self.device) if self.precision == "fp16" else None

    def snapshot(self) -> tuple[dict[str, torch.Tensor], dict[str, Any], Any]:
        return self.clone(), copy.deepcopy(self.optimizer.state_dict()), self.scaler

    def restore(self, snapshot: tuple[dict[str, torch.Tensor], dict[str, Any], Any]) -> None:
        vectors, state, self.scaler = snapshot
        copy_into(self.leaves, vectors)
        self.optimizer.load_state_dict(state)

    # -- the step -----------------------------------------------------------------------------------------------
    def take(self, step: int, seed: int | None = None) -> tuple[torch.Tensor, float]:
        """Set the schedule's rate for ``step`` (each encoder's group scaled by its factor) and take the step;
        returns its mean loss (a 0-d tensor, still on the device) and the rate."""
        c = self.config
        lr = learning_rate_at(step, self.lr_schedule, c.lr_scheduler, c.lr_warmup_steps, c.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_factor"]
        self.optimizer.zero_grad(set_to_none=True)
        if not self.processes.distributed:
            total = self._accumulate_gradients(step, seed)
        else:  # every process learns whether the step failed anywhere (see Processes.sum_checked)
            try:
                total, error = self._accumulate_gradients(step, seed), None
            except Exception as failure:  # noqa: BLE001 - raised again below, in every process
                total, error = torch.zeros((), device=self.device), failure
            total = self._sum_over_processes(step, total, error)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clipping and the gradient check see true gradients
        if not self.gradients_checked:
            self.gradients_checked = self._check_first_gradients()
        params = list(self.leaves.values())
        if c.grad_clip == "norm":
            torch.nn.utils.clip_grad_norm_(params, c.grad_clip_value)
        elif c.grad_clip == "value":
            torch.nn.utils.clip_grad_value_(params, c.grad_clip_value)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.project_norms()
        return total, lr

    def _accumulate_gradients(self, step: int, seed: int | None) -> torch.Tensor:
        """Forward and backward over the step's ``grad_accum`` micro-batches (this process's share of each);
        returns the step's mean loss (this process's share of it), a 0-d tensor on the device."""
        c = self.config
        total = torch.zeros((), device=self.device)
        for micro in range(c.grad_accum):
            loss = self.objective.loss(step * c.grad_accum + micro, self.leaves, seed)
            if not loss.requires_grad:
                raise TrainingError(no_gradient_message(", ".join(self.leaves)))
            scaled = loss / c.grad_accum
            total = total + scaled.detach().float()
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        for key, leaf in self.leaves.items():
            if leaf.grad is None:
                raise TrainingError(no_gradient_message(key))
        return total

    def _sum_over_processes(self, step: int, total: torch.Tensor, error: BaseException | None) -> torch.Tensor:
        """Data-parallel: one all-reduce per step sums every process's (still scaled) gradients and loss share, the
        stop votes, process 0's wish to report, and whether the step failed anywhere (then every process raises);
        returns the step's loss. Every process then holds the same gradients, takes the same step and makes the
        same decisions. Reading the flags waits for the step (on a GPU, one synchronisation per step)."""
        leaves = self.leaves.values()
        grads = [leaf.grad if leaf.grad is not None and error is None else None for leaf in leaves]
        parts = [
            g.reshape(-1).float() if g is not None else torch.zeros(leaf.numel(), device=self.device)
            for g, leaf in zip(grads, leaves)
        ]
        report = self.processes.writes_files and time.perf_counter() - self.last_report >= self.report_interval_s
        votes = torch.tensor([float(self.stop_vote), float(report)], device=self.device)
        buffer = torch.cat([*parts, total.float().reshape(1), votes])
        buffer = self.processes.sum_checked(buffer, error, f"step {step + 1}")
        offset = 0
        for grad in grads:
            assert grad is not None  # the step failed nowhere
            grad.copy_(buffer[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()
        stop, report = buffer[-2:].tolist()
        self.stop_agreed, self.report_agreed = stop > 0, report > 0
        return buffer[-3].clone()

    def _check_first_gradients(self) -> bool:
        """Stop with a reason if a vector got no usable gradient. Returns False to defer (fp16 overflow)."""
        for key, leaf in self.leaves.items():
            grad = leaf.grad
            if grad is None:
                raise TrainingError(no_gradient_message(key))
            if not torch.isfinite(grad).all():
                if self.scaler is not None:
                    return False  # the scaler skips this step and lowers its scale; check again next step
                raise TrainingError(f"the '{key}' vectors received a NaN/inf gradient at the first step")
            if not grad.abs().sum() > 0:
                raise TrainingError(
                    f"the '{key}' vectors received an all-zero gradient: the model's output does not depend on "
                    f"the trigger '{self.config.name}' (is it in the prompts? does the model attend to text?). "
                    "Nothing would be trained."
                )
        return True

    # -- what the processes decide together ---------------------------------------------------------------------
    def stop_asked(self, should_stop: Callable[[], bool] | None) -> bool:
        """Whether to stop before the next step. Data-parallel: this process's vote travels with the next step's
        all-reduce, and every process stops once the summed votes of a step say so: all after the same step."""
        asked = bool(should_stop and should_stop())
        if not self.processes.distributed:
            return asked
        self.stop_vote = self.stop_vote or asked
        return self.stop_agreed

    def report_due(self, now: float) -> bool:
        """Time for a report (``REPORT_INTERVAL_S``); data-parallel: when process 0's clock said so at the last step,
        so every process reports (and checks for NaN) at the same steps."""
        if self.processes.distributed:
            return self.report_agreed
        return now - self.last_report >= self.report_interval_s

    def check_agree(self, when: str) -> None:
        """Data-parallel: the vectors and AdamW's moments must be the same in every bit on every process."""
        if not self.processes.distributed:
            return
        tensors = {f"vectors.{k}": v for k, v in self.leaves.items()}
        for key, leaf in self.leaves.items():
            for name, value in self.optimizer.state.get(leaf, {}).items():
                if isinstance(value, torch.Tensor) and value.numel() > 1:
                    tensors[f"optimizer.{key}.{name}"] = value
        self.processes.check_identical(tensors, when)
