"""WAD's contrastive representation: a SimCLR network trained on the labelled and unlabelled images (no labels) before
the student, whose features give the pseudo-labels and weights (official ``contrast_main.py``, ``contrast/simclr.py``).

SimCLR (Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual Representations",
ICML 2020): two random views of every image of a batch (WAD's ``get_simclr_augmentation`` for CIFAR: horizontal flip,
colour jitter 0.4/0.4/0.4/0.1 with p 0.8, grey with p 0.2, random resized crop of scale ``[0.08, 1]``; on
one-channel images saturation, hue and grey are the identity and are left out), an encoder and a projection head
``Linear(d, d) - ReLU - Linear(d, 128)`` (``BaseModel.simclr_layer``), the NT-Xent loss (:func:`nt_xent`) at
temperature 0.5. The official schedule is SGD (lr 0.1, momentum 0.9, weight decay 1e-6) for 1,500 epochs with 10 of
warm-up; kdkit's default is 30 epochs with the same optimiser and a cosine decay (a CPU budget; ``wad.contrastive``
sets them).

The knowledge is then read from the projection head's output (``features: projection``, the official ``'simclr'``
layer) or the encoder's tap before it (``features: encoder``), on one un-augmented view of each image (the official
code averages random augmented views).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdkit.data.augment import normalize
from kdkit.data.loader import map_images
from kdkit.losses.base import compute_dtype
from kdkit.schema import Strict
from kdkit.taps import Tap, TapRecorder, probe_shapes, resolve_tap


def nt_xent(projections: Tensor, temperature: float = 0.5, eps: float = 1e-8) -> Tensor:
    r"""SimCLR's NT-Xent over ``2B`` projections whose rows ``i`` and ``i + B`` are two views of one image.

    With :math:`z` the L2-normalised rows, :math:`s_{ij} = z_i \cdot z_j / T` and
    :math:`D_i = \sum_{k \ne i} e^{s_{ik}}`:

    .. math:: \ell = \frac{1}{2B} \sum_{i=1}^{2B} -\log\Big(\frac{e^{s_{i,p(i)}}}{D_i + \epsilon} + \epsilon\Big)

    where :math:`p(i)` is the other view of image :math:`i`: WAD's official ``NT_xent`` (``eps`` 1e-8 inside both
    logarithms; ``eps = 0`` gives the paper's formula exactly). Computed with log-sum-exp, so a small temperature does
    not overflow: :math:`\log(e^{s}/(D + \epsilon) + \epsilon)` is
    ``logaddexp(s - logaddexp(log D, log eps), log eps)``.

    Args:
        projections: ``(2B, d)`` projections (normalised here), the first ``B`` rows one view, the last ``B`` the other.
        temperature: ``T > 0``.
        eps: ``>= 0``.

    Returns:
        Scalar in the input's precision (half precisions upcast to float32).
    """
    rows = projections.shape[0]
    if rows % 2 or rows < 4:
        raise ValueError(f"nt_xent needs two views of at least two images (2B rows, B >= 2), got {rows} rows")
    z = F.normalize(projections.to(compute_dtype(projections)), dim=1)
    sim = z @ z.T / temperature
    eye = torch.eye(rows, dtype=torch.bool, device=z.device)
    log_denominator = torch.logsumexp(sim.masked_fill(eye, -math.inf), dim=1)
    half = rows // 2
    partner = torch.cat([torch.arange(half, rows), torch.arange(half)]).to(z.device)
    positive = sim.gather(1, partner.unsqueeze(1)).squeeze(1)
    if eps == 0:
        return (log_denominator - positive).mean()
    log_eps = torch.tensor(math.log(eps), dtype=z.dtype, device=z.device)
    log_ratio = positive - torch.logaddexp(log_denominator, log_eps)
    return -torch.logaddexp(log_ratio, log_eps).mean()


class ProjectionHead(nn.Sequential):
    """SimCLR's projection ``Linear(d, d) - ReLU - Linear(d, out)`` (WAD's ``simclr_layer``)."""

    def __init__(self, width: int, out: int = 128) -> None:
        super().__init__(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, out))


def simclr_augmentation(channels: int, size: tuple[int, int], crop_scale: float) -> nn.Module:
    """WAD's SimCLR views (module docstring) as kornia modules, on ``[0, 1]`` float images ``(B, C, H, W)``."""
    import kornia.augmentation as K

    ops: list[nn.Module] = [K.RandomHorizontalFlip()]
    if channels == 3:
        ops += [K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8), K.RandomGrayscale(p=0.2)]
    else:  # saturation, hue and grey are the identity on one channel
        ops += [K.ColorJitter(0.4, 0.4, p=0.8)]
    ops.append(K.RandomResizedCrop(size, scale=(crop_scale, 1.0)))
    return nn.Sequential(*ops)


class ContrastiveSpec(Strict):
    """``wad.contrastive``: the network trained by SimCLR and how (module docstring)."""

    arch: str = Field("cnn_teacher", description="the representation network (fresh weights; its classifier is "
                      "never trained)")
    params: dict[str, Any] = Field(default_factory=dict, description="its factory parameters")
    tap: str = Field("penultimate", description="the network's tap the projection head reads")
    features: Literal["projection", "encoder"] = Field("projection", description="what the knowledge reads: the "
                                                       "projection head's output (the official code) or the tap")
    epochs: int = Field(30, ge=1, description="SimCLR epochs (the official code: 1,500)")
    batch_size: int = Field(128, ge=2, description="images per batch (two views each)")
    lr: float = Field(0.1, gt=0, description="SGD learning rate, decayed by a cosine")
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-6, ge=0)
    temperature: float = Field(0.5, gt=0, description="NT-Xent temperature")
    projection_dim: int = Field(128, ge=1)
    crop_scale: float = Field(0.08, gt=0, le=1, description="smallest area share of the random resized crop")
    seed: int = Field(0, description="seed of the representation (independent of train.seed, so every student "
                      "seed reads the same knowledge, as from one teacher)")
    cache_dir: str | None = Field(None, description="where trained representations are kept, keyed by the images "
                                  "and these settings (default $KDKIT_WAD_CACHE or ~/.cache/kdkit/wad); a run, its "
                                  "resumption and other student seeds reuse one instead of training it again")


def cache_folder(spec: ContrastiveSpec) -> Path:
    """``spec.cache_dir``, else ``$KDKIT_WAD_CACHE``, else ``~/.cache/kdkit/wad``."""
    chosen = spec.cache_dir or os.environ.get("KDKIT_WAD_CACHE")
    return Path(chosen).expanduser() if chosen else Path.home() / ".cache" / "kdkit" / "wad"


def cache_key(spec: ContrastiveSpec, images: Tensor, mean: Sequence[float], std: Sequence[float]) -> str:
    """A digest of everything the features depend on: the images, their normalisation and the settings (not where
    they are cached), and torch's version."""
    digest = hashlib.sha256()
    digest.update(images.contiguous().numpy().tobytes())
    settings = spec.model_dump(exclude={"cache_dir"})
    digest.update(json.dumps([settings, list(mean), list(std), list(images.shape), torch.__version__],
                             sort_keys=True).encode())
    return digest.hexdigest()[:24]


def cached_representation(network: Callable[[], nn.Module], tap: str, images: Tensor, mean: Sequence[float],
                          std: Sequence[float], spec: ContrastiveSpec,
                          device: torch.device) -> tuple[Representation, Path, bool]:
    """The representation of ``images`` from the cache, or trained (:func:`train_representation`) and stored
    (atomically). Returns it, its cache file and whether it was read from there."""
    from safetensors.torch import load, save

    from kdkit.data.dense import atomic_write_bytes

    path = cache_folder(spec) / f"{spec.arch.replace(':', '_')}-{cache_key(spec, images.cpu(), mean, std)}.safetensors"
    if path.is_file():
        stored = load(path.read_bytes())
        return Representation(stored["features"].to(device), float(stored["final_loss"])), path, True
    trained = train_representation(network, tap, images, mean, std, spec, device)
    atomic_write_bytes(path, save({"features": trained.features.cpu().contiguous(),
                                   "final_loss": torch.tensor(trained.final_loss, dtype=torch.float64)}))
    return trained, path, False


@dataclass(frozen=True)
class Representation:
    """A trained contrastive representation: each image's features and the last epoch's mean NT-Xent."""

    features: Tensor
    final_loss: float


class _Encoder(nn.Module):
    """The network's tap (``penultimate`` by default) followed by the projection head."""

    def __init__(self, network: nn.Module, tap: Tap, width: int, projection_dim: int) -> None:
        super().__init__()
        self.network, self.tap = network, tap
        self.head = ProjectionHead(width, projection_dim)
        self.recorder = TapRecorder(network, [tap])

    def features(self, x: Tensor) -> Tensor:
        logits = self.network(x)
        captured = logits if self.tap.capture == "logits" else self.recorder.pop()[self.tap.spec]
        return captured.flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def train_representation(network: Callable[[], nn.Module], tap: str, images: Tensor, mean: Sequence[float],
                         std: Sequence[float], settings: ContrastiveSpec, device: torch.device) -> Representation:
    """Train a network (and a projection head) by SimCLR on ``images`` and return every image's features.

    Runs under its own random state (seeded by ``settings.seed``, the network's initialisation included), so the
    caller's stream is untouched and the same settings give the same representation.

    Args:
        network: Builds the network with fresh weights (called under that random state; its classifier is never
            trained).
        tap: The tap the projection head reads (``penultimate``).
        images: ``(N, C, H, W)`` uint8 images, labelled and unlabelled alike.
        mean: Per-channel mean (the data's normalisation).
        std: Per-channel standard deviation.
        settings: Epochs, optimiser, temperature, crop scale, which features.
        device: Where to train.

    Returns:
        ``(N, d)`` float32 features on ``device`` (projections or the tap's flattened output) and the final loss.
    """
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(settings.seed)
        network = network().to(device)
        resolved = resolve_tap(network, tap, where="wad.contrastive.tap")
        shape = probe_shapes(network, [resolved], normalize(images[:2].to(device), mean, std))[resolved.spec]
        encoder = _Encoder(network, resolved, math.prod(shape), settings.projection_dim).to(device)
        augment = simclr_augmentation(images.shape[1], tuple(images.shape[-2:]), settings.crop_scale)
        optimizer = torch.optim.SGD(encoder.parameters(), lr=settings.lr, momentum=settings.momentum,
                                    weight_decay=settings.weight_decay)
        steps = settings.epochs * (len(images) // settings.batch_size)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
        mean_t = torch.as_tensor(mean, device=device).view(1, -1, 1, 1)
        std_t = torch.as_tensor(std, device=device).view(1, -1, 1, 1)
        final = math.nan
        encoder.train()
        for _ in range(settings.epochs):
            order = torch.randperm(len(images))
            total, batches = torch.zeros((), device=device), 0
            for start in range(0, len(images) - settings.batch_size + 1, settings.batch_size):  # drop_last
                x = images[order[start:start + settings.batch_size]].to(device).float() / 255
                views = augment(torch.cat([x, x]))
                loss = nt_xent(encoder((views - mean_t) / std_t), settings.temperature)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total, batches = total + loss.detach(), batches + 1  # summed on the device: no sync a step
            final = float(total) / max(batches, 1)
        encoder.eval()
        features = map_images(encoder if settings.features == "projection" else encoder.features, images, mean, std,
                              device)
        encoder.recorder.remove()
    return Representation(features, final)
