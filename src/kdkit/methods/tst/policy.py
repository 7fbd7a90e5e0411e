"""TST's augmentation policy: learnable probabilities and magnitudes over differentiable operations.

Shao et al., "Teaching What You Should Teach: A Data-Based Distillation Method" (IJCAI 2023). For the
``K`` operations of :mod:`kdkit.methods.tst.ops` the policy holds a probability logit ``a_k`` and, for those
with a magnitude, a magnitude logit ``b_k`` (magnitude ``m_k = sigmoid(b_k)``, a fraction of
AutoAugment's largest magnitude). For a batch it draws ``num_ops`` operations ``S`` (one draw per
batch, as the official code does) and, per sample ``i`` and operation ``k``, a relaxed Bernoulli
(Concrete) sample with temperature ``tau``:

    p_ik = sigmoid((a_k + log u_ik - log(1 - u_ik)) / tau),   u_ik ~ U(0, 1)
    x_aug_i = clamp(x_i + sum_{k in S} p_ik * (op_k(x_i, s_ik m_k) - x_i), 0, 1)

where ``s_ik`` is a random sign for operations AutoAugment applies both ways (``random_sign``). Every
operation reads the original image and the weighted differences add up (the paper's combination),
so gradients reach each ``a_k`` through ``p_ik`` and each ``b_k`` through ``op_k``.

Differences from the official code, all deliberate: the relaxed Bernoulli is drawn per sample (the
official code draws one per batch and feeds ``sigmoid(a_k)`` in as logits); magnitudes get a random
sign like AutoAugment's (the official learned magnitudes only push one way); the combination is
clamped to the image range; operations are kornia/own differentiable ones instead of small networks
pre-trained to imitate AutoAugment.

Shapes: ``x`` is ``(B, C, H, W)``, normalised with the data's ``mean``/``std`` (the policy undoes the
normalisation, augments in ``[0, 1]`` and redoes it), C = 1 or 3.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kdkit.errors import KdkitError
from kdkit.methods.tst.ops import COLOUR_ONLY, OPS, Op

EPS = 1e-6


class AugmentPolicy(nn.Module):
    """Learnable augmentation ``x -> x_aug`` (see the module docstring for the formula).

    Args:
        ops: Operation names (keys of :data:`kdkit.methods.tst.ops.OPS`), in a fixed order.
        num_ops: Operations drawn per batch.
        temperature: Relaxed Bernoulli temperature ``tau`` (0.05 in the paper).
        mean: Per-channel mean of the normalisation of the inputs (in ``[0, 1]`` units).
        std: Per-channel std of that normalisation (``mean=0, std=1``: inputs already in ``[0, 1]``).
        channels: Image channels (1 or 3); colour-only operations are refused on one channel.
        random_sign: Apply signed operations in a random direction per sample, as AutoAugment does.
        cutout_size: Side of cutout's square as a fraction of the image side.
        init_probability: Initial probability ``sigmoid(a_k)`` of every operation.
        init_magnitude: Initial magnitude ``sigmoid(b_k)`` of every operation.
    """

    def __init__(self, ops: Sequence[str], *, num_ops: int = 4, temperature: float = 0.05,
                 mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,), channels: int = 3,
                 random_sign: bool = True, cutout_size: float = 0.5, init_probability: float = 0.5,
                 init_magnitude: float = 0.5) -> None:
        super().__init__()
        unknown = [op for op in ops if op not in OPS]
        if unknown:
            raise KdkitError(f"unknown augmentation operation {unknown[0]!r}", choices=list(OPS), bad=unknown[0],
                             fix="pick operations from the list", where="tst.ops")
        if len(set(ops)) != len(ops) or not ops:
            raise KdkitError(f"tst.ops must list distinct operations, got {list(ops)}", fix="remove duplicates",
                             where="tst.ops")
        if channels == 1 and COLOUR_ONLY & set(ops):
            raise KdkitError(f"operation(s) {sorted(COLOUR_ONLY & set(ops))} change nothing on one-channel images",
                             fix="remove them from tst.ops for greyscale data", where="tst.ops")
        if not 1 <= num_ops <= len(ops):
            raise KdkitError(f"num_ops {num_ops} must be between 1 and the {len(ops)} operations",
                             fix="lower tst.num_ops or list more operations", where="tst.num_ops")
        for name, value in (("mean", mean), ("std", std)):
            if len(value) not in (1, channels):
                raise KdkitError(f"normalisation {name} has {len(value)} values for {channels}-channel images",
                                 fix="give one value per channel")
        self.names = list(ops)
        self.magnitude_names = [op for op in ops if OPS[op].magnitude]
        self.num_ops = num_ops
        self.temperature = temperature
        self.random_sign = random_sign
        self.cutout_size = cutout_size
        logit = torch.logit(torch.tensor(init_probability))
        self.probability_logits = nn.Parameter(torch.full((len(ops),), float(logit)))
        self.magnitude_logits = nn.Parameter(torch.full((len(self.magnitude_names),),
                                                        float(torch.logit(torch.tensor(init_magnitude)))))
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).reshape(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).reshape(1, -1, 1, 1),
                             persistent=False)
        self._fns: list[Op] = [functools.partial(OPS[op].fn, size=cutout_size) if op == "cutout" else OPS[op].fn
                               for op in ops]
        self._signed = [OPS[op].signed and random_sign for op in ops]
        self._magnitude_index = {op: i for i, op in enumerate(self.magnitude_names)}

    # -- readable state ----------------------------------------------------------------------------

    def probabilities(self) -> Tensor:
        """``sigmoid(a_k)`` per operation, ``(K,)``."""
        return torch.sigmoid(self.probability_logits)

    def magnitudes(self) -> Tensor:
        """``sigmoid(b_k)`` per operation with a magnitude, ``(M,)`` (order: :attr:`magnitude_names`)."""
        return torch.sigmoid(self.magnitude_logits)

    def state_summary(self) -> dict[str, dict[str, float]]:
        """Current probabilities and magnitudes by operation name (host values, for logs)."""
        p = self.probabilities().detach().cpu().tolist()
        m = self.magnitudes().detach().cpu().tolist()
        return {"probabilities": dict(zip(self.names, p, strict=True)),
                "magnitudes": dict(zip(self.magnitude_names, m, strict=True))}

    # -- forward -----------------------------------------------------------------------------------

    def draw(self, batch: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Every random choice for a batch, from ``generator`` (on the CPU): which operations, the
        uniforms of the relaxed Bernoulli, the signs, and the operations' noise (cutout centres).

        Everything is drawn for all ``K`` operations, whichever are chosen, so the stream consumed
        does not depend on the choice."""
        k = len(self.names)
        chosen = torch.randperm(k, generator=generator)[: self.num_ops].sort().values
        uniform = torch.rand(batch, k, generator=generator).clamp(EPS, 1.0 - EPS)
        signs = torch.randint(0, 2, (batch, k), generator=generator).float() * 2.0 - 1.0
        noise = torch.rand(batch, k, 2, generator=generator)
        return {"chosen": chosen, "uniform": uniform, "signs": signs, "noise": noise}

    def relaxed_probabilities(self, uniform: Tensor) -> Tensor:
        """Relaxed Bernoulli samples ``p_ik`` ``(B, K)`` for uniforms ``u_ik``."""
        logistic = torch.log(uniform) - torch.log1p(-uniform)
        return torch.sigmoid((self.probability_logits[None, :] + logistic) / self.temperature)

    def forward(self, x: Tensor, generator: torch.Generator | None = None,
                draws: dict[str, Tensor] | None = None) -> Tensor:
        """Augment a normalised batch ``(B, C, H, W)``; returns a normalised batch of the same shape.

        Args:
            x: Normalised images.
            generator: Source of the random choices (CPU); ``None``: torch's global generator.
            draws: Precomputed :meth:`draw` output (overrides ``generator``).
        """
        draws = draws if draws is not None else self.draw(x.shape[0], generator)
        dev = x.device
        mean, std = self.mean.to(dev), self.std.to(dev)
        images = (x.float() * std + mean).clamp(0.0, 1.0)
        p = self.relaxed_probabilities(draws["uniform"].to(dev))
        signs, noise = draws["signs"].to(dev), draws["noise"].to(dev)
        magnitudes = self.magnitudes()
        delta = torch.zeros_like(images)
        for k in draws["chosen"].tolist():  # a CPU tensor: no device sync
            name = self.names[k]
            if name in self._magnitude_index:
                m = magnitudes[self._magnitude_index[name]].expand(x.shape[0])
                m = m * signs[:, k] if self._signed[k] else m
            else:
                m = images.new_zeros(x.shape[0])
            out = self._fns[k](images, m, noise[:, k])
            delta = delta + p[:, k].reshape(-1, 1, 1, 1) * (out - images)
        augmented = (images + delta).clamp(0.0, 1.0)
        result = ((augmented - mean) / std).to(x.dtype)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            result = result.contiguous(memory_format=torch.channels_last)
        return result


def batch_generator(seed: int, epoch: int, batch: int, stream: int = 0) -> torch.Generator:
    """A CPU generator seeded from ``(seed, epoch, batch, stream)``: the same augmentation whether a
    run is resumed or not (``stream`` separates the policy-training draws from the training draws)."""
    value = ((seed * 1_000_003 + epoch) * 100_003 + batch) * 7 + stream
    return torch.Generator().manual_seed(value % (2**63 - 1))
