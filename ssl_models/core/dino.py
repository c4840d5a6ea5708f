"""DINO self-distillation, shared by the domains that pretrain with it (tiles, volumes).

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021: a student
network matches, with a cross-entropy over `output_dim` prototypes, the sharpened and centred
output of a momentum (EMA) teacher; the teacher sees the two global crops, the student those and
several smaller local crops (multi-crop), so local views learn to predict the global context.
Optionally (`ibot_weight > 0`, ViT backbones) iBOT's masked-patch term (Zhou et al., "iBOT: Image
BERT Pre-Training with Online Tokenizer", ICLR 2022): the student sees its global crops with a
random share of the patches replaced by a mask token and predicts the teacher's output for
those patches (the head is shared between the pooled and the patch tokens, as in iBOT).

The loss, head and centre are lightly's (`DINOLoss`, `DINOProjectionHead`, `IBOTPatchLoss`'s
`Center`); the schedules are lightly's (`cosine_schedule` for the teacher momentum, DINO's 0.996
to 1, and `linear_warmup_schedule` for the teacher temperature, DINO's 0.04 to 0.07 warm-up).

What this module adds is bookkeeping per optimizer step, so that neither the world size nor
gradient accumulation changes the run:
- the teacher's EMA update, the schedules' step and the centres' update happen once per optimizer
  step, at the first forward after the optimizer moved the weights (their version counter), not once
  per forward: accumulation rounds of one step share one teacher, temperature and centre;
- the centre moves towards the mean teacher output of the whole global batch of the step: every
  forward all-reduces its teacher outputs' sum and count into a pending buffer (the same on every
  process, so DDP's buffer broadcast is harmless), folded into the centre at the next step. lightly's
  own update averages each process' batch mean, which is the global mean only for equal shares
  and per forward, not per step.
The loss itself is lightly's mean over this process' samples: the pretrain stage splits every
global batch evenly (`check_batch_splits`), so DDP's gradient average is the global batch's mean.

A domain's method subclasses `SelfDistillation` (and the domain's method base), calls
`setup_distillation` in its constructor and implements `features(network, images, mask)`.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.distributed as dist
from lightly.loss import DINOLoss, IBOTPatchLoss
from lightly.models.modules.center import Center
from torch import nn

from ssl_models.core import distributed
from ssl_models.core.config import require
from ssl_models.core.modules import PretrainMethod


@dataclass
class MultiCropOptions:
    """DINO's multi-crop (`pretrain.options.crops`): two global crops and `local_crops` smaller ones."""

    local_crops: int = 4  # the paper uses 6-10; each one is a student forward pass more
    global_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])  # area (volume) share of the input
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])  # the paper's split point: 0.4
    # side of a local crop as a share of the input's (the paper: 96 of 224 pixels); a backbone that
    # takes one input size only (the ViTs: position embeddings of one grid) gets them resampled to it
    local_size: float = 0.5

    def validate(self, where: str) -> None:
        require(self.local_crops >= 0, f"{where}.local_crops", "must be zero or more")
        for name in ("global_scale", "local_scale"):
            low_high = getattr(self, name)
            require(len(low_high) == 2 and 0 < low_high[0] <= low_high[1] <= 1, f"{where}.{name}",
                    "must be [low, high] with 0 < low <= high <= 1")
        require(0 < self.local_size <= 1, f"{where}.local_size", "must be in (0, 1]")


@dataclass
class DINOOptions:
    """A domain's `dino` options (a domain adds its own, e.g. the augmentations)."""

    output_dim: int = 1024  # prototypes K (the paper: 65536; a CPU run uses fewer)
    hidden_dim: int = 256  # the head's MLP width (the paper: 2048)
    bottleneck_dim: int = 64  # before the weight-normalised prototype layer (the paper: 256)
    head_batch_norm: bool = False  # the paper's head has none (and a CPU run must not depend on the split)
    norm_last_layer: bool = True  # the prototypes' norm fixed at 1: the paper's stable default
    student_temp: float = 0.1
    warmup_teacher_temp: float = 0.04  # sharpening: the teacher's temperature rises linearly
    teacher_temp: float = 0.07  # to this over `warmup_teacher_temp_steps` optimizer steps
    warmup_teacher_temp_steps: int = 30
    center_momentum: float = 0.9  # of the centre subtracted from the teacher's output
    momentum: float = 0.996  # of the EMA teacher, raised to `momentum_end` along a cosine
    momentum_end: float = 1.0
    momentum_steps: int | str = "auto"  # over this many optimizer steps; auto: the run's (the paper's schedule)
    ibot_weight: float = 0.0  # iBOT's masked-patch term (ViT backbones); 0: DINO alone
    ibot_mask_ratio: float = 0.3  # share of a global crop's patches the student sees masked
    crops: MultiCropOptions = field(default_factory=MultiCropOptions)

    def validate(self, where: str) -> None:
        for name in ("output_dim", "hidden_dim", "bottleneck_dim"):
            require(getattr(self, name) >= 1, f"{where}.{name}", "must be positive")
        require(self.momentum_steps == "auto" or (isinstance(self.momentum_steps, int) and self.momentum_steps >= 1),
                f"{where}.momentum_steps", "must be auto (the run's steps) or a positive number")
        for name in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            require(getattr(self, name) > 0, f"{where}.{name}", "must be positive")
        require(self.warmup_teacher_temp <= self.teacher_temp, f"{where}.warmup_teacher_temp",
                "must not exceed teacher_temp (the warm-up raises the temperature)")
        require(self.warmup_teacher_temp_steps >= 0, f"{where}.warmup_teacher_temp_steps", "must be zero or more")
        require(0 <= self.center_momentum < 1, f"{where}.center_momentum", "must be in [0, 1)")
        require(0 <= self.momentum <= self.momentum_end <= 1, f"{where}.momentum",
                "must be in [0, 1] and at most momentum_end (at most 1)")
        require(self.ibot_weight >= 0, f"{where}.ibot_weight", "must be zero or positive")
        require(0 < self.ibot_mask_ratio < 1, f"{where}.ibot_mask_ratio", "must be in (0, 1)")

    def for_steps(self, steps: int) -> DINOOptions:
        """These options for a run of `steps` optimizer steps: `momentum_steps: auto` becomes `steps`."""
        return dataclasses.replace(self, momentum_steps=steps) if self.momentum_steps == "auto" else self


class PendingMean(nn.Module):
    """Sums of teacher outputs over every process during one optimizer step, and their count."""

    def __init__(self, size: tuple[int, ...]) -> None:
        super().__init__()
        self.total: torch.Tensor
        self.count: torch.Tensor
        self.register_buffer("total", torch.zeros(size))
        self.register_buffer("count", torch.zeros(()))

    @torch.no_grad()
    def record(self, values: torch.Tensor, dim: tuple[int, ...]) -> None:
        """Add `values` summed over `dim` (kept), with every process' share: one all-reduce."""
        summed = values.detach().float().sum(dim=dim, keepdim=True).flatten()
        rows = float(values[..., 0].numel())
        local = torch.cat([summed, summed.new_tensor([rows])])
        if distributed.active():
            dist.all_reduce(local)
        self.total += local[:-1].view_as(self.total)
        self.count += local[-1]

    @torch.no_grad()
    def fold_into(self, center: torch.Tensor, momentum: float) -> None:
        """`center` <- momentum * center + (1 - momentum) * the pending mean (unchanged when none), then empty."""
        mean = self.total / self.count.clamp(min=1)
        center.copy_(torch.where(self.count > 0, center * momentum + mean * (1 - momentum), center))
        self.total.zero_()
        self.count.zero_()


class StepDINOLoss(DINOLoss):
    """lightly's DINOLoss with its centre updated once per optimizer step from the global batch
    (`record` each forward, `apply` at the next step) instead of in every call."""

    def __init__(self, output_dim: int, student_temp: float, center_momentum: float) -> None:
        super().__init__(output_dim=output_dim, student_temp=student_temp, center_momentum=center_momentum,
                         warmup_teacher_temp_epochs=0)
        self.pending = PendingMean((1, 1, output_dim))

    def update_center(self, teacher_out: torch.Tensor) -> None:
        """Not per call: see `record` and `apply`."""

    def record(self, teacher_out: torch.Tensor) -> None:
        self.pending.record(teacher_out, dim=(0, 1))  # [views, batch, dim]

    def apply(self) -> None:
        self.pending.fold_into(self.center, self.center_momentum)


class StepCenter(Center):
    """lightly's Center (iBOT's patch centre) updated once per optimizer step from the global batch."""

    def __init__(self, size: tuple[int, ...], momentum: float) -> None:
        super().__init__(size, mode="mean", momentum=momentum)
        self.pending = PendingMean(size)

    def update(self, x: torch.Tensor) -> None:
        """Not per call: see `record` and `apply`."""

    def record(self, x: torch.Tensor) -> None:
        self.pending.record(x, dim=self.dim)

    def apply(self) -> None:
        self.pending.fold_into(self.center, self.momentum)


class SelfDistillation(PretrainMethod):
    """Student (the encoder's backbone and `head`) and EMA teacher (`teacher_backbone`,
    `teacher_head`); `forward` takes the data side's `global_crops` [B, 2, ...], `local_crops`
    [B, L, ...] (absent with no local crops) and, with iBOT, `masks` [B, 2, patches] (True: masked)."""

    checkpoint_rule: ClassVar[str] = "rankme"  # joint-embedding: RankMe ranks its checkpoints
    steps_begun: torch.Tensor

    def setup_distillation(self, dim: int, options: DINOOptions) -> None:
        """The heads, the teacher (a copy of the backbone being pretrained, its features `dim` wide) and the losses."""
        from lightly.models.utils import deactivate_requires_grad

        if options.momentum_steps == "auto":
            raise ValueError("DINO options with momentum_steps: auto need the run's steps: build the method with "
                             "Domain.build_pretrain_method (options.for_steps)")
        self.head = dino_head(dim, options)
        self.teacher_backbone = copy.deepcopy(self.student_backbone())
        self.teacher_head = copy.deepcopy(self.head)
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)
        self.criterion = StepDINOLoss(options.output_dim, options.student_temp, options.center_momentum)
        if options.ibot_weight > 0:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.patch_criterion = IBOTPatchLoss(output_dim=options.output_dim, student_temp=options.student_temp,
                                                 center_momentum=options.center_momentum)
            self.patch_criterion.center = StepCenter((1, options.output_dim), options.center_momentum)
        # optimizer steps begun (the schedules' position), saved with the method so a resumed run continues
        self.register_buffer("steps_begun", torch.zeros((), dtype=torch.long))
        self._step: int | None = None  # the current step's index, read from `steps_begun` once
        self._seen_version: int | None = None  # of the watched weight when the current step began
        self.register_load_state_dict_post_hook(lambda module, _: module._forget_step())

    def _forget_step(self) -> None:
        self._step, self._seen_version = None, None

    def features(self, network: str, images: torch.Tensor,
                 mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`network` ("student" or "teacher") on `images`: pooled features [n, dim] and, with iBOT,
        patch tokens [n, patches, dim] (the student's with the `mask`ed ones replaced by `mask_token`)."""
        raise NotImplementedError

    def teacher_temperature(self) -> float:
        from lightly.utils.scheduler import linear_warmup_schedule

        o = self.options
        return linear_warmup_schedule(self._current_step(), o.warmup_teacher_temp_steps, o.warmup_teacher_temp,
                                      o.teacher_temp)

    def _current_step(self) -> int:
        return int(self.steps_begun.clamp(min=1)) - 1 if self._step is None else self._step

    @torch.compiler.disable
    @torch.no_grad()
    def _begin_step(self) -> None:
        """Once per optimizer step (the first forward after the weights moved): the EMA update the
        paper makes after the previous step, with that step's momentum, and the centres' update."""
        from lightly.models.utils import update_momentum
        from lightly.utils.scheduler import cosine_schedule

        version = next(self.head.parameters())._version  # the optimizer's in-place step bumps it
        if version == self._seen_version:
            return  # another accumulation round of the same step
        self._seen_version = version
        step = int(self.steps_begun) if self._step is None else self._step + 1
        if step > 0:
            o = self.options
            momentum = cosine_schedule(min(step - 1, o.momentum_steps), o.momentum_steps, o.momentum, o.momentum_end)
            update_momentum(self.student_backbone(), self.teacher_backbone, momentum)
            update_momentum(self.head, self.teacher_head, momentum)
            self.criterion.apply()
            if self.options.ibot_weight > 0:
                self.patch_criterion.center.apply()
        self._step = step
        self.steps_begun.fill_(step + 1)

    def student_backbone(self) -> nn.Module:
        """The student's backbone, which the teacher's is an EMA of: the encoder's."""
        return self.encoder().backbone

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        recording = self.training and torch.is_grad_enabled()  # a no-grad evaluation changes no state
        if recording:
            self._begin_step()
        global_crops = batch["global_crops"]
        n_global = global_crops.shape[1]
        masks = batch["masks"].transpose(0, 1).flatten(0, 1) if self.options.ibot_weight > 0 else None
        temperature = self.teacher_temperature()
        with torch.no_grad():
            teacher_pooled, teacher_patches = self.features("teacher", views_first(global_crops), None)
            teacher_out = self.teacher_head(teacher_pooled).chunk(n_global)
        pooled, patches = self.features("student", views_first(global_crops), masks)
        student_out = list(self.head(pooled).chunk(n_global))
        if "local_crops" in batch:
            local_crops = batch["local_crops"]
            student_out += self.head(self.features("student", views_first(local_crops), None)[0]).chunk(
                local_crops.shape[1])
        loss = self.criterion(list(teacher_out), student_out, teacher_temp=temperature)
        if recording:
            self.criterion.record(torch.stack(teacher_out))
        if masks is not None:
            with torch.no_grad():
                teacher_patch_out = self.teacher_head(teacher_patches[masks])
            patch_loss = self.patch_criterion(teacher_patch_out, self.head(patches[masks]), mask=masks.unsqueeze(-1),
                                              teacher_temp=temperature)
            if recording:
                self.patch_criterion.center.record(teacher_patch_out)
            loss = loss + self.options.ibot_weight * patch_loss
        return loss


def dino_head(dim: int, options: DINOOptions) -> nn.Module:
    """lightly's DINOProjectionHead, its prototype layer weight-normalised by torch's parametrization
    instead of the deprecated `nn.utils.weight_norm`, whose computed `weight` attribute makes the
    module fail `copy.deepcopy` after a forward pass (the teacher's copy, RankMe's copy on a GPU);
    the same values: the direction v as lightly initialises it, the norm g at 1 (fixed by default)."""
    from lightly.models.modules import DINOProjectionHead

    with warnings.catch_warnings():  # lightly's deprecated weight_norm, replaced below
        warnings.simplefilter("ignore", FutureWarning)
        head = DINOProjectionHead(dim, options.hidden_dim, options.bottleneck_dim, options.output_dim,
                                  batch_norm=options.head_batch_norm, norm_last_layer=options.norm_last_layer)
    prototypes = nn.Linear(options.bottleneck_dim, options.output_dim, bias=False)
    with torch.no_grad():
        prototypes.weight.copy_(head.last_layer.weight_v)
    nn.utils.parametrizations.weight_norm(prototypes)
    norm = prototypes.parametrizations.weight.original0
    with torch.no_grad():
        norm.fill_(1)
    norm.requires_grad_(not options.norm_last_layer)
    head.last_layer = prototypes
    return head


def views_first(crops: torch.Tensor) -> torch.Tensor:
    """[B, V, ...] -> [V * B, ...], view by view (the order `chunk(V)` undoes)."""
    return crops.transpose(0, 1).flatten(0, 1)
