"""The distillation pieces that sit between models and the engine.

* :class:`FrozenTeacher` -- a structurally frozen teacher that returns its tapped tensors.
* :class:`Student` -- the trained model plus its bridges; returns logits and per-term tensors.
* :class:`Term` / :class:`Objective` -- CE plus weighted loss terms, every component returned.

The student and its bridges form one ``nn.Module`` so DistributedDataParallel sees every trainable
parameter in one forward; the teacher is a separate module that is never wrapped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdkit.bridges.roles import CombiningBridge, DeployingBridge, RewritingBridge
from kdkit.data.base import UNLABELLED
from kdkit.errors import KdkitError
from kdkit.fold import fold_batchnorm
from kdkit.losses.base import DistillLoss, compute_dtype, widen
from kdkit.optimizers import DISTILLATION, SUPERVISED
from kdkit.taps import LOGITS, Tap, TapRecorder, resolve_tap

TapSpec = str | tuple[str, ...]


def as_specs(spec: TapSpec) -> tuple[str, ...]:
    """The tap specs of a term side: one, or several (stages)."""
    return (spec,) if isinstance(spec, str) else tuple(spec)


def pick(captured: dict[str, Tensor], spec: TapSpec) -> Tensor | list[Tensor]:
    """The captured tensor of ``spec``, or the list of tensors of a tuple of specs."""
    return captured[spec] if isinstance(spec, str) else [captured[s] for s in spec]


class PerTap(nn.Module):
    """One bridge per tap of a multi-stage term: bridge ``i`` maps the ``i``-th student tensor."""

    def __init__(self, bridges: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(bridges)

    def forward(self, values: list[Tensor]) -> list[Tensor]:
        """Map each tensor with its own bridge."""
        return [bridge(v) for bridge, v in zip(self.parts, values, strict=True)]


class FrozenTeacher(nn.Module):
    """A teacher that stays in eval mode, never needs gradients and returns its taps.

    Args:
        model: The trained teacher network.
        taps: Tap specs (or resolved taps) to capture; ``"logits"`` is always returned.
        channels_last: Store weights and inputs in channels-last layout (faster convolutions on
            oneDNN and cuDNN; see ``shared/perf-notes.md``).
        fold_bn: Fold BatchNorm layers into the preceding convolutions (:mod:`kdkit.fold`); the
            outputs are unchanged up to float rounding.
    """

    def __init__(self, model: nn.Module, taps: Sequence[str | Tap] = (), channels_last: bool = False,
                 fold_bn: bool = False) -> None:
        super().__init__()
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.channels_last = channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.taps = [t if isinstance(t, Tap) else resolve_tap(model, t) for t in taps]
        # Fold BN into the convolutions first (before hooks are attached to the modules that remain).
        self.folded, self.fold_skipped = fold_batchnorm(self.model, self.taps) if fold_bn else (0, "disabled")
        self.recorder = TapRecorder(self.model, [t for t in self.taps if t.capture != "logits"])

    def train(self, mode: bool = True) -> FrozenTeacher:
        """Ignore ``mode``: the teacher always runs in eval mode (BN statistics frozen)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: Tensor, index: Tensor | None = None, epoch: int = 0) -> dict[str, Tensor]:
        """Tapped tensors by spec (``"logits"`` is the output).

        ``index`` and ``epoch`` are not used: they are part of the teacher call so that a
        :class:`kdkit.cache.CachedTeacher` can stand in for this one.
        """
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = self.model(x)
        out = self.recorder.pop()
        out[LOGITS] = logits
        return out


def member_taps(members: dict[str, nn.Module]) -> dict[str, str]:
    """Friendly taps of a group whose members are submodules named after them: ``NAME.logits`` is member
    ``NAME``'s output and ``NAME.stage2`` its own friendly tap (module paths ``NAME.path`` resolve as they are)."""
    taps: dict[str, str] = {}
    for name, model in members.items():
        taps[f"{name}.{LOGITS}"] = name
        for friendly, target in (getattr(model, "feature_taps", {}) or {}).items():
            taps[f"{name}.{friendly}"] = f"{name}.{target}"
    return taps


class TeacherEnsemble(nn.Module):
    """Several frozen teachers as one network, so taps, probing, BN folding and the teacher call stay unchanged.

    Each member is a submodule named after it: a tap ``NAME.stage2`` is member ``NAME``'s ``stage2`` (friendly
    names and module paths alike), ``NAME.logits`` its output, and the ensemble's own ``logits`` the mean of
    the members' logits.

    Args:
        members: Name -> network (at least one; names are Python identifiers).
    """

    def __init__(self, members: dict[str, nn.Module]) -> None:
        super().__init__()
        if not members:
            raise KdkitError("a teacher ensemble needs at least one member", fix="list teachers under `teachers:`")
        self.names = list(members)
        for name, model in members.items():
            self.add_module(name, model)
        self.feature_taps = member_taps(members)

    def forward(self, x: Tensor) -> Tensor:
        """The mean of the members' logits ``(B, K)``."""
        outputs = [getattr(self, name)(x) for name in self.names]
        return outputs[0] if len(outputs) == 1 else torch.stack(outputs).mean(0)


def labelled_cross_entropy(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy averaged over the samples whose target is not :data:`UNLABELLED`; 0, with zero gradient, for a
    batch without a labelled sample.

    With every sample labelled it is exactly ``F.cross_entropy``'s mean (same kernel, same rounding). Computed in the
    logits' precision, never below float32 (float64 stays float64). No host synchronisation.
    """
    # the mean over the labelled samples is 0/0 = NaN when there is none: that value is masked out, and the
    # backward of an all-ignored cross-entropy is zero (tests/test_unlabelled.py checks both)
    mean = F.cross_entropy(widen(logits), targets, ignore_index=UNLABELLED, label_smoothing=label_smoothing)
    return torch.where((targets != UNLABELLED).any(), mean, mean.new_zeros(()))


class SupervisedLoss(DistillLoss):
    """The task's supervised loss on a trained peer's logits (each network of a group learns from the labels)."""

    needs_teacher = False

    def __init__(self, loss: Callable[[Tensor, Tensor], Tensor]) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, student: Tensor, teacher: Tensor | None, labels: Tensor) -> Tensor:
        """``loss(peer_logits, targets)``."""
        return self.loss(student, labels)


class PeerGroup(nn.Module):
    """Several trainable networks (peers) trained together as one module, one of them deployed.

    Each member is a submodule named after it; a tap ``NAME.stage2`` is that member's, ``NAME.logits`` its
    output, and an unprefixed tap (``logits``, ``stage2``, a module path) the deployed member's, so terms of
    the short form keep reading the main network. The forward runs every member (their taps are recorded
    for the terms) and returns the deployed member's logits; :meth:`deployed_forward` runs that member only
    (what evaluation, latency and export measure).

    Args:
        members: Name -> network (names are Python identifiers).
        deploy: The member that is deployed.
    """

    def __init__(self, members: dict[str, nn.Module], deploy: str) -> None:
        super().__init__()
        if deploy not in members:
            raise KdkitError(f"deployed member {deploy!r} is not one of the peers", choices=list(members), bad=deploy,
                             fix="set `deploy:` to a member name", where="deploy")
        self.names, self.deploy = list(members), deploy
        for name, model in members.items():
            self.add_module(name, model)
        main = members[deploy]  # unprefixed taps: the deployed member's module paths and friendly names
        self.feature_taps = {path: f"{deploy}.{path}" for path, _ in main.named_modules() if path}
        self.feature_taps |= {friendly: f"{deploy}.{target}"
                              for friendly, target in (getattr(main, "feature_taps", {}) or {}).items()}
        self.feature_taps |= member_taps(members)

    def forward(self, x: Tensor) -> Tensor:
        """Run every member; return the deployed member's logits ``(B, K)``."""
        outputs = {name: getattr(self, name)(x) for name in self.names}
        return outputs[self.deploy]

    def deployed_forward(self, x: Tensor) -> Tensor:
        """The deployed member alone."""
        return getattr(self, self.deploy)(x)


class Student(nn.Module):
    """The trained model with its bridges.

    Args:
        model: The network being trained (student, or a teacher being trained from scratch).
        reads: For each term name, the student tap spec it reads (``"logits"``, ``"stage2"``, a path), or a
            tuple of specs (several stages: the term then gets a list of tensors).
        bridges: For each term name that has one, its bridge module (given the tensor, or the list). A
            :class:`~kdkit.bridges.roles.RewritingBridge` is instead hooked onto its tap's module, whose activation it
            replaces in every forward (training and :meth:`predict`); its term receives what it recorded.
    """

    def __init__(self, model: nn.Module, reads: dict[str, TapSpec] | None = None,
                 bridges: dict[str, nn.Module] | None = None, peer_targets: dict[str, TapSpec] | None = None) -> None:
        super().__init__()
        self.model = model
        self.bridges = nn.ModuleDict(bridges or {})
        self.reads = dict(reads or {})
        # terms whose teacher side is a trainable peer: the peer's tap, detached, handed over as `TERM:teacher`
        self.peer_targets = dict(peer_targets or {})
        taps = {spec: resolve_tap(model, spec, where=f"term {term!r}")
                for term, specs in (*self.reads.items(), *self.peer_targets.items()) for spec in as_specs(specs)}
        # A RewritingBridge replaces its tap's activation: it runs in a hook on the tapped module and records
        # what its loss reads, so the recorder does not need that tap.
        self.rewriting = self._rewriting_terms()
        recorded = {spec for term, specs in self.reads.items() if term not in self.rewriting
                    for spec in as_specs(specs)}
        recorded |= {spec for specs in self.peer_targets.values() for spec in as_specs(specs)}
        hooked = [t for spec, t in taps.items() if t.capture != "logits" and spec in recorded]
        # The recorder's hooks are registered first, so other terms reading a rewritten tap see the student's own map.
        self.recorder = TapRecorder(model, hooked) if hooked else None
        self._taps = taps
        self._rewrite_handles = [self._hook_rewrite(term, taps[self.reads[term]]) for term in self.rewriting]
        # A DeployingBridge is part of the deployed model: it turns the student's tap into the logits that
        # evaluation, export and latency measure.
        deployed = [term for term, bridge in self.bridges.items() if isinstance(bridge, DeployingBridge)]
        if len(deployed) > 1:
            raise KdkitError(f"terms {deployed} each have a bridge that deploys its own prediction; only one can "
                             "be the deployed head", fix="keep one deploying bridge per recipe")
        if deployed and not isinstance(self.reads[deployed[0]], str):
            raise KdkitError(f"term {deployed[0]!r}: a deployed bridge reads one student tap, got "
                             f"{list(as_specs(self.reads[deployed[0]]))}", fix="give one `student:` tap")
        self.deploy_term: str | None = deployed[0] if deployed else None

    def _rewriting_terms(self) -> list[str]:
        """Terms whose bridge rewrites its tap, checked: one tapped tensor each, never the logits, one per tap."""
        terms, seen = [], {}
        for term, bridge in self.bridges.items():
            if not isinstance(bridge, RewritingBridge):
                if any(isinstance(m, RewritingBridge) for m in bridge.modules()):
                    raise KdkitError(f"term {term!r}: a rewriting bridge reads one student tap, got "
                                     f"{list(as_specs(self.reads[term]))}", fix="give one `student:` tap per term",
                                     where=f"term {term!r}")
                continue
            spec = self.reads[term]
            if not isinstance(spec, str) or spec == LOGITS:
                raise KdkitError(f"term {term!r}: a rewriting bridge needs one intermediate student "
                                 f"tap, got {spec!r}", fix="tap a feature map, e.g. `student: stage1`",
                                 where=f"term {term!r}")
            tap = resolve_tap(self.model, spec, where=f"term {term!r}")
            key = (tap.path, tap.capture)
            if key in seen:
                raise KdkitError(f"terms {seen[key]!r} and {term!r} both rewrite {tap.path}:{tap.capture}",
                                 fix="rewrite each tap with one term", where=f"term {term!r}")
            seen[key] = term
            module = dict(self.model.named_modules())[tap.path]
            # A hook left by an earlier Student on the same model would rewrite this tap twice (and feed that
            # Student's bridge): refuse it. PyTorch has no public listing of hooks, hence the private dicts.
            for hook in (*module._forward_hooks.values(), *module._forward_pre_hooks.values()):
                if isinstance(getattr(hook, "__self__", None), RewritingBridge):
                    raise KdkitError(f"module {tap.path!r} is already rewritten by another Student's bridge",
                                     fix="call remove_hooks() on the earlier Student, or build a fresh model",
                                     where=f"term {term!r}")
            terms.append(term)
        return terms

    def _hook_rewrite(self, term: str, tap: Tap) -> Any:
        """Register the bridge of ``term`` as a hook on its tap's module; the hook returns the rewritten activation."""
        bridge = self.bridges[term]
        module = dict(self.model.named_modules())[tap.path]
        # Bound methods (not closures): copy.deepcopy of the Student re-binds the hooks to the copied bridges.
        if tap.capture == "output":
            return module.register_forward_hook(bridge.rewrite_output)
        return module.register_forward_pre_hook(bridge.rewrite_input)

    def remove_hooks(self) -> None:
        """Detach every hook this Student put on the model (tap recorder and rewriting bridges)."""
        if self.recorder is not None:
            self.recorder.remove()
        for handle in self._rewrite_handles:
            handle.remove()
        self._rewrite_handles.clear()

    def deployed_terms(self) -> list[str]:
        """The terms whose bridges the deployed network (:meth:`predict`) runs: the rewriting ones, and the
        deploying one unless it says it does not run at inference."""
        term = self.deploy_term
        deploying = [term] if term is not None and self.bridges[term].runs_at_inference else []
        return [*deploying, *self.rewriting]

    def deployment(self) -> Student:
        """A Student with only what :meth:`predict` runs, so that its ``state_dict`` holds exactly the deployed
        network's weights: :meth:`deployed_terms`' bridges and taps (training-only bridges and the taps only losses
        read are left out), and of a :class:`PeerGroup` without such bridges its deployed member alone. This
        Student's hooks are removed first (a model carries the rewriting hooks of one Student at a time); use the
        returned one from then on."""
        keep = self.deployed_terms()
        self.remove_hooks()
        model = self.model
        if isinstance(model, PeerGroup) and not keep:  # the other peers only taught it
            model = getattr(model, model.deploy)
        return Student(model, {t: self.reads[t] for t in keep}, {t: self.bridges[t] for t in keep})

    def predict(self, x: Tensor) -> Tensor:
        """The deployed model's logits ``(B, K)``: what evaluation, export and latency measure.

        With a :class:`~kdkit.bridges.roles.DeployingBridge`, the model runs only up to the bridge's tap (the
        layers after it are not part of the deployed network) and the bridge gives the logits, unless it says it
        does not run at inference (the plain model is then deployed); a
        :class:`~kdkit.bridges.roles.CombiningBridge` runs the whole model and combines its logits with the
        bridge's head. Rewriting bridges run inside the model's
        forward, through their hooks, in their inference configuration.
        """
        term = self.deploy_term
        try:
            if term is None or not self.bridges[term].runs_at_inference:
                return self.model.deployed_forward(x) if isinstance(self.model, PeerGroup) else self.model(x)
            bridge = self.bridges[term]
            if isinstance(bridge, CombiningBridge):  # the whole model, then its logits combined with the head's
                logits = self.model(x)
                captured = {**(self.recorder.pop() if self.recorder is not None else {}), LOGITS: logits}
                return bridge.combine(logits, bridge(pick(captured, self.reads[term])))
            return bridge.deploy(bridge(self._run_to(x, self._taps[self.reads[term]])), None)[0]
        finally:
            for name in self.rewriting:  # the rewriting hooks ran (their chains are part of the deployed model);
                self.bridges[name].discard()  # no loss reads their records here

    def _run_to(self, x: Tensor, tap: Tap) -> Tensor:
        """The tensor of ``tap`` for input ``x``, stopping the forward there (the rest is not computed)."""
        if tap.capture == "logits":
            return self.model(x)
        module = dict(self.model.named_modules())[tap.path]

        def stop(value: Tensor) -> None:
            raise _TapReached(value)

        handle = (module.register_forward_hook(lambda _m, _i, out: stop(out)) if tap.capture == "output"
                  else module.register_forward_pre_hook(lambda _m, inputs: stop(inputs[0])))
        try:
            self.model(x)
        except _TapReached as reached:
            return reached.value
        finally:
            handle.remove()
        raise RuntimeError(f"tap {tap.spec!r} was not reached by the forward")  # pragma: no cover

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Any]]:
        """Logits ``(B, K)`` of the deployed model and, per term, the (bridged) student tensor it compares."""
        logits = self.model(x)
        if not self.reads and not self.peer_targets:
            return logits, {}
        captured = self.recorder.pop() if self.recorder is not None else {}
        captured[LOGITS] = logits
        per_term: dict[str, Any] = {}
        for term, spec in self.reads.items():
            if term in self.rewriting:  # its hook ran the chain during the forward above
                per_term[term] = self.bridges[term].pop()
                continue
            value = pick(captured, spec)
            if term in self.bridges:
                value = self.bridges[term](value)
                if term == self.deploy_term:
                    logits, value = self.bridges[term].deploy(value, captured[LOGITS])
            per_term[term] = value
        for term, spec in self.peer_targets.items():  # a peer teaches: its tensor is a target, not trained here
            target = pick(captured, spec)
            per_term[f"{term}:teacher"] = [t.detach() for t in target] if isinstance(target, list) else target.detach()
        return logits, per_term


class _TapReached(Exception):
    """Carries a tapped tensor out of a forward that :meth:`Student.predict` stops early."""

    def __init__(self, value: Tensor) -> None:
        super().__init__()
        self.value = value


@dataclass
class Term:
    """One weighted distillation term.

    Attributes:
        name: Unique key used in logs (e.g. ``"kd"``; ``"mse@stage2"`` when a loss repeats).
        loss: The loss module.
        student_tap: Student tap spec the term reads.
        teacher_tap: Teacher tap spec the term reads (``None`` for losses that need no teacher).
        weight: Multiplier of the loss in the total.
        warmup_epochs: Linear ramp of the weight from 0 over this many epochs (DKD uses 20).
        teacher_is_peer: The teacher side is a trainable peer's tap (deep mutual learning): the Student hands it
            over, detached, as ``TERM:teacher``.
    """

    name: str
    loss: DistillLoss
    student_tap: TapSpec
    teacher_tap: TapSpec | None
    weight: float = 1.0
    warmup_epochs: float = 0.0
    teacher_is_peer: bool = False

    def scale(self, epoch: float) -> float:
        """The weight in effect at (fractional) ``epoch``."""
        if self.warmup_epochs <= 0:
            return self.weight
        return self.weight * min(epoch / self.warmup_epochs, 1.0)


class Objective(nn.Module):
    """``loss = ce_weight * S(z_s, y) + sum_i scale_i(epoch) * L_i(s_i, t_i, y)``.

    ``S`` is the task's supervised loss (cross-entropy with the labels, unlabelled samples skipped, unless
    ``supervised`` is given) and
    ``y`` the task's targets. The only place where weights are applied. Returns every component (unweighted)
    plus the total, so each term is logged; the engine checks each for NaN/inf and names the culprit.

    Args:
        terms: The distillation terms (empty for plain training).
        ce_weight: Weight of the supervised loss.
        label_smoothing: Label smoothing of the default cross-entropy.
        supervised: ``supervised(logits, targets) -> scalar``, the task's loss (e.g. BCE for multi-label).
        supervised_name: Its key in the returned components and the logs.
    """

    def __init__(self, terms: list[Term] | None = None, ce_weight: float = 1.0, label_smoothing: float = 0.0,
                 supervised: Callable[[Tensor, Tensor], Tensor] | None = None, supervised_name: str = "ce") -> None:
        super().__init__()
        self.terms = list(terms or [])
        self.losses = nn.ModuleDict({t.name: t.loss for t in self.terms})
        self.ce_weight = ce_weight
        self.label_smoothing = label_smoothing
        self.supervised = supervised
        self.supervised_name = supervised_name

    def forward(self, logits: Tensor, labels: Tensor, student: dict[str, Any], teacher: dict[str, Tensor],
                epoch: float = 0.0, index: Tensor | None = None) -> dict[str, Tensor]:
        """Compute the total and its components.

        Args:
            logits: ``(B, K)`` student logits.
            labels: ``(B,)`` class indices.
            student: Per-term student tensors (from :class:`Student`).
            teacher: Teacher tensors by tap spec (from :class:`FrozenTeacher`).
            epoch: Fractional epoch, for warm-up schedules.
            index: Dataset indices of the batch's samples (for losses with ``needs_index``).

        Returns:
            ``{"loss": total, "ce": ce, **{term.name: value}}``.
        """
        out: dict[str, Tensor] = {}
        if self.ce_weight:
            out[self.supervised_name] = self.supervised(logits, labels) if self.supervised is not None else \
                labelled_cross_entropy(logits, labels, self.label_smoothing)
        for term in self.terms:
            if term.teacher_is_peer:
                target = student[f"{term.name}:teacher"]
            else:
                target = pick(teacher, term.teacher_tap) if term.teacher_tap is not None else None
            out[term.name] = term.loss.compute(student[term.name], target, labels, index)
        total = logits.new_zeros((), dtype=compute_dtype(logits))  # float64 logits: a float64 objective
        for _, weighted in self._weighted(out, epoch):
            total = total + weighted
        out["loss"] = total
        return out

    def _weighted(self, comps: dict[str, Tensor], epoch: float) -> Iterator[tuple[str, Tensor]]:
        """Each weighted component of the total, in the order :meth:`forward` adds them, with its part of
        :data:`~kdkit.optimizers.LOSS_PARTS`; a term whose weight is 0 at ``epoch`` is left out."""
        if self.ce_weight:
            yield SUPERVISED, self.ce_weight * comps[self.supervised_name]
        for term in self.terms:
            weight = term.scale(epoch)
            if weight:
                part = SUPERVISED if isinstance(term.loss, SupervisedLoss) else DISTILLATION
                yield part, weight * widen(comps[term.name])

    @property
    def reads_teacher(self) -> bool:
        """Whether a term reads a frozen teacher's tensors (the engine runs the teacher only then: a teacher that
        only gave the trained network its starting weights, ``init: teacher``, costs nothing per step)."""
        return any(t.teacher_tap is not None and not t.teacher_is_peer for t in self.terms)

    def contributes(self) -> set[str]:
        """The parts of :data:`~kdkit.optimizers.LOSS_PARTS` that have a component in this objective: supervised
        (the supervised loss, and each trained peer's own) and distillation (every other term)."""
        parts = {SUPERVISED} if self.ce_weight or any(isinstance(t.loss, SupervisedLoss) for t in self.terms) \
            else set()
        return parts | ({DISTILLATION} if any(not isinstance(t.loss, SupervisedLoss) for t in self.terms) else set())

    def parts(self, comps: dict[str, Tensor], epoch: float = 0.0) -> dict[str, Tensor]:
        """The total of ``comps`` (this objective's :meth:`forward` at ``epoch``) split by
        :data:`~kdkit.optimizers.LOSS_PARTS`: ``{"supervised": ..., "distillation": ...}``, each the weighted sum of
        its components (the two add up to the total, up to rounding). A part without a weighted component is a
        constant zero (no gradient)."""
        zero = comps["loss"].new_zeros(())
        split = {SUPERVISED: zero, DISTILLATION: zero}
        for part, weighted in self._weighted(comps, epoch):
            split[part] = split[part] + weighted
        return split
