"""MST-Distill as a registered method: the ``mst_distill:`` section, the masking phase (the official stage 2), the
stage switch, the masks in every checkpoint, the refusals and the routing shares in ``summary.json``."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from pydantic import Field
from torch import nn

from kdkit.distributed import DistContext, all_reduce_sum
from kdkit.engine import Engine, Hooks, Phase
from kdkit.errors import KdkitError
from kdkit.method import Method, MethodRun, register_method
from kdkit.methods.mst_distill.loss import MstDistillLoss, kd_per_sample, masked_logits
from kdkit.methods.mst_distill.modules import MaskNet
from kdkit.schema import Strict
from kdkit.taps import resolve_tap

LOSS = "mst_distill"
#: Loader "epochs" the masking phase draws its batch order from (never trained on by the student).
MASK_ORDER_OFFSET = 2_000_000


class MstDistillSpec(Strict):
    """The recipe section ``mst_distill:`` (optional; with one ``mst_distill`` term)."""

    route_epoch: int = Field(1, ge=1, description="epochs of warm-up KD from every unmasked teacher before the masks "
                             "are trained and routing starts (the official stage 1 is 1 epoch)")
    mask_epochs: float = Field(1.0, gt=0, description="passes over the training data that train the masks, student "
                               "and teachers frozen (the official --epochs_s2 1)")
    mask_lr: float = Field(1e-4, gt=0, description="Adam learning rate of each mask (the official --s2_lr)")
    mask_heads: int = Field(3, ge=1, description="attention heads of each mask (the official --mask_head_num)")
    hidden_factor: int = Field(2, ge=1, description="mask embedding width C // (factor * heads) * heads (the official "
                               "--hidden_dim_factor)")


def settings(recipe: Any) -> MstDistillSpec:
    """The ``mst_distill:`` section, or its defaults when the recipe leaves it out."""
    return recipe.mst_distill if recipe.mst_distill is not None else MstDistillSpec()


def never_routes(recipe: Any) -> str:
    """Why routing would never start (``route_epoch`` not before ``train.epochs``), or ``""``."""
    route = settings(recipe).route_epoch
    if route < recipe.train.epochs:
        return ""
    return (f"mst_distill.route_epoch {route} is not before train.epochs {recipe.train.epochs}: routing would never "
            "start; lower it or train longer")


def classifier_reading(member: nn.Module, feature_spec: str, probe: torch.Tensor, where: str) -> tuple[nn.Linear, int]:
    """The linear classifier of ``member`` that reads its ``feature_spec`` map flattened, checked on ``probe``, and
    the map's channel count.

    Raises:
        KdkitError: The member has no linear classifier on its ``penultimate`` tap, or that classifier does not give
            the member's logits from the flattened map (e.g. a pooled head).
    """
    tap = resolve_tap(member, "penultimate", where=where)
    fc = member.get_submodule(tap.path)
    feature = member.get_submodule(resolve_tap(member, feature_spec, where=where).path)
    seen: list[torch.Tensor] = []
    handle = feature.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        with torch.no_grad():
            logits = member(probe)
    finally:
        handle.remove()
    if (tap.capture != "input" or not isinstance(fc, nn.Linear) or len(seen) != 1 or seen[0].dim() != 4
            or seen[0].flatten(1).shape[1] != fc.in_features
            or not torch.allclose(fc(seen[0].flatten(1)), logits, atol=1e-5)):
        raise KdkitError(f"MST-Distill masks a teacher's feature map and re-reads it with the teacher's classifier, "
                         f"but {where}'s classifier does not read {feature_spec!r} flattened", bad=feature_spec,
                         fix="use teachers whose linear classifier reads the flattened last feature map (cnn_teacher "
                             "with head: flatten) and tap that map (stage2)", where=where)
    return fc, int(seen[0].shape[1])


class MstRun(MethodRun):
    """The stage switch, the masking phase and the masks' checkpointed state."""

    def __init__(self, loss: MstDistillLoss, masks: nn.ModuleList, feature_taps: list[str], spec: MstDistillSpec,
                 ctx: DistContext) -> None:
        self.loss, self.masks, self.feature_taps, self.spec, self.ctx = loss, masks, feature_taps, spec, ctx
        phase = Phase("mst_masks", due=lambda e: e.epoch == spec.route_epoch and e.batch == 0, run=self.train_masks)
        super().__init__(Hooks(callbacks=[self.on_event], phases=[phase], state={"mst_masks": masks}))

    def on_event(self, engine: Engine, event: str) -> None:
        """At each epoch start: warm-up before ``route_epoch``, routing over the masked teachers from it on."""
        if event == "epoch_start":
            self.loss.stage = "route" if engine.epoch >= self.spec.route_epoch else "warmup"
            self.masks.eval()

    def train_masks(self, engine: Engine) -> dict[str, Any]:
        """The official stage 2: each mask learns to make its masked teacher's softened prediction match the
        (frozen) student's, ``T^2 KL(p_s^T || p_masked^T)``, with its own Adam."""
        started = time.perf_counter()
        student, loader, classifiers = engine.student, engine.train_loader, self.loss.classifiers
        was_training = student.training
        student.eval()
        self.masks.train()
        optimizers = [torch.optim.Adam(m.parameters(), lr=self.spec.mask_lr) for m in self.masks]
        steps = max(1, math.ceil(self.spec.mask_epochs * len(loader)))
        total, count, step = 0.0, 0, 0
        try:
            for p in range(math.ceil(steps / len(loader))):
                for x, _, index in loader.epoch(MASK_ORDER_OFFSET + engine.epoch * 1000 + p):
                    if step >= steps:
                        break
                    with torch.no_grad():
                        taps = engine.teacher(x, index, engine.epoch)
                        s_logits = student.model(x).float()
                        if student.recorder is not None:
                            student.recorder.pop()  # never keep tapped activations alive
                    for mask, fc, spec, opt in zip(self.masks, classifiers, self.feature_taps, optimizers, strict=True):
                        features = taps[spec].float()
                        out = masked_logits(features, mask(features), fc)
                        # the code's distillation_loss_detached(masked teacher, student): the student is the target
                        loss = kd_per_sample(out, s_logits, self.loss.temperature).mean()
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        if self.ctx.enabled:  # every process's mask takes the same, averaged step
                            for param in mask.parameters():
                                if param.grad is not None:
                                    param.grad = all_reduce_sum(param.grad, self.ctx) / self.ctx.world_size
                        opt.step()
                        total += float(loss.detach())
                    count += 1
                    step += 1
        finally:
            student.train(was_training)
            self.masks.eval()
            for fc in classifiers:
                fc.zero_grad(set_to_none=True)
        return {"mask_kl": total / max(count * len(self.masks), 1), "steps": step,
                "seconds": round(time.perf_counter() - started, 3)}

    def summary(self, engine: Engine) -> dict[str, Any]:
        routed = self.loss.routed
        shares = (routed / routed.sum()).tolist() if routed is not None and float(routed.sum()) else None
        return {"mst_distill": {"teachers": self.feature_taps, "routed_share": shares,
                                "masks": engine.phase_stats.get("mst_masks")}}


@register_method
class MstDistillMethod(Method):
    """MST-Distill (Li et al., 2025): a mixture of specialised (masked) teachers, routed per sample by a gate."""

    name = "mst_distill"
    section = "mst_distill"
    spec = MstDistillSpec

    def active(self, recipe: Any) -> bool:
        return recipe.mst_distill is not None or any(t.loss == LOSS for t in recipe.distill)

    def check(self, recipe: Any) -> list[str]:
        problems = []
        terms = [i for i, t in enumerate(recipe.distill) if t.loss == LOSS]
        if len(terms) != 1:
            problems.append(f"MST-Distill has one routed objective: {len(terms)} `{LOSS}` terms in distill; give "
                            f"exactly one ({{loss: {LOSS}, teacher: [a.logits, b.logits, a.stage2, b.stage2]}})")
        if recipe.peers is not None:
            problems.append("MST-Distill distils frozen teachers into one student: remove `peers:`")
        if recipe.mst_distill is not None and never_routes(recipe):
            problems.append(never_routes(recipe))
        return problems

    def attach(self, built: Any, ctx: Any) -> MethodRun:
        # (the default route_epoch is checked here, before training: `check` sees only an explicit section, so that
        # a one-term recipe stays valid for the loss's own parameter checks)
        problem = never_routes(built.recipe)
        if problem:
            raise KdkitError(problem, bad=str(settings(built.recipe).route_epoch),
                             fix="set mst_distill.route_epoch below train.epochs", where="mst_distill.route_epoch")
        term = next(t for t in built.objective.terms if isinstance(t.loss, MstDistillLoss))
        spec = settings(built.recipe)
        specs = next(i for i in built.recipe.distill if i.loss == LOSS).teacher
        specs = list(specs) if isinstance(specs, list) else [specs]
        feature_taps = specs[len(specs) // 2:]
        ensemble = built.teacher.model
        shape = built.shape
        probe = torch.randn(2, shape.in_channels, shape.image_size, shape.image_size,
                            generator=torch.Generator().manual_seed(0)).to(built.device)
        masks, classifiers = [], []
        for spec_ in feature_taps:
            name, _, inner = spec_.partition(".")
            member = getattr(ensemble, name, None) if inner else None
            if member is None:
                raise KdkitError(f"MST-Distill needs each feature tap of a named teacher (NAME.stage2), got {spec_!r}",
                                 bad=spec_, fix="give `teachers:` and taps like mm.stage2", where="distill")
            fc, channels = classifier_reading(member, inner, probe, f"teachers.{name}")
            masks.append(MaskNet(channels, spec.mask_heads, spec.hidden_factor))
            classifiers.append(fc)
        modules = nn.ModuleList(masks).to(built.device)
        term.loss.bind(list(modules), classifiers)
        return MstRun(term.loss, modules, feature_taps, spec, ctx)

