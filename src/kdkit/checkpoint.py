"""Checkpoints: atomic, code-free, resumable.

Layout of ``RUN/checkpoints/``::

    epoch_0003/model.safetensors   weights of the trained model and its bridges (+ recipe in metadata)
    epoch_0003/state.pt            optimiser, schedule, RNG, loader position, metrics history
    latest.json                    {"dir": "epoch_0003"}  -- written last, by atomic rename
    best.json                      {"dir": "epoch_0002", "top1": ...}

A checkpoint folder is written under a temporary name and renamed into place, and the pointer files
are replaced atomically, so a crash at any moment leaves the previous checkpoint intact. ``state.pt``
holds only tensors and plain Python data and is loaded with ``torch.load(weights_only=True)``; the
weights are safetensors: loading a checkpoint never executes code.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from kdkit.errors import KdkitError

WEIGHTS = "model.safetensors"
STATE = "state.pt"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(ckpt_root: Path, name: str, weights: dict[str, Tensor], state: dict[str, Any],
                    metadata: dict[str, str]) -> Path:
    """Write ``ckpt_root/name/`` atomically and point ``latest.json`` at it.

    Args:
        ckpt_root: ``RUN/checkpoints``.
        name: Folder name, e.g. ``epoch_0003`` or ``epoch_0003_step_0120``.
        weights: Flat state dict of the trained modules.
        state: Optimiser/scheduler/RNG/progress state (tensors and plain data only).
        metadata: String metadata stored in the safetensors header (recipe JSON, architecture).
    """
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / name
    tmp = ckpt_root / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    # safetensors refuses shared or non-contiguous storage; clone to a private contiguous copy.
    save_file({k: v.detach().contiguous().clone() for k, v in weights.items()},
              str(tmp / WEIGHTS), metadata=metadata)
    torch.save(state, tmp / STATE)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(ckpt_root / "latest.json", json.dumps({"dir": name}))
    return final


def mark_best(ckpt_root: Path, name: str, info: dict[str, Any]) -> None:
    """Point ``best.json`` at checkpoint ``name`` (atomic)."""
    atomic_write_text(ckpt_root / "best.json", json.dumps({"dir": name, **info}))


def pointed(ckpt_root: Path, which: str) -> Path | None:
    """The checkpoint folder that ``latest.json``/``best.json`` points to, if any."""
    pointer = ckpt_root / f"{which}.json"
    if not pointer.is_file():
        return None
    folder = ckpt_root / json.loads(pointer.read_text())["dir"]
    return folder if folder.is_dir() else None


def prune(ckpt_root: Path, keep: int) -> None:
    """Delete old checkpoint folders, keeping the ``keep`` newest plus the ones best/latest point to."""
    protected = {p.name for p in (pointed(ckpt_root, "latest"), pointed(ckpt_root, "best")) if p is not None}
    folders = sorted(p for p in ckpt_root.glob("epoch_*") if p.is_dir())
    for folder in folders[: max(len(folders) - keep, 0)]:
        if folder.name not in protected:
            shutil.rmtree(folder, ignore_errors=True)


def resolve_weights(path: str | Path, prefer: str = "best") -> Path:
    """Find the weights file behind a run folder, checkpoint folder or file.

    Args:
        path: A run folder (``RUN``), ``RUN/checkpoints``, a checkpoint folder, a ``.safetensors``
            file or a torch state-dict file (``.pt``/``.pth``).
        prefer: Which checkpoint of a run to use: ``"best"`` or ``"latest"``.

    Raises:
        KdkitError: Nothing usable there.
    """
    p = Path(path)
    if p.is_file():
        return p
    for root in (p / "checkpoints", p):
        folder = pointed(root, prefer) or pointed(root, "latest")
        if folder is not None:
            return folder / WEIGHTS
    if (p / WEIGHTS).is_file():
        return p / WEIGHTS
    raise KdkitError(f"no checkpoint at {str(p)!r}",
                     fix="point to a kdkit run folder, a checkpoint folder, a .safetensors file or a .pt "
                         "state dict (train the model first with `kdkit run`)")


def read_weights(file: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Load a weights file without executing code; returns the tensors and the metadata.

    Raises:
        KdkitError: The file is truncated, corrupt or not a weights file.
    """
    try:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                metadata = dict(f.metadata() or {})
            return load_file(str(file)), metadata
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except (SafetensorError, Exception) as exc:
        raise KdkitError(f"checkpoint {str(file)!r} is truncated or corrupt ({type(exc).__name__}: {exc})",
                         fix="use an intact checkpoint (e.g. the run's previous epoch) or retrain") from None
    if isinstance(loaded, dict) and "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise KdkitError(f"{str(file)!r} does not hold a state dict of tensors",
                         fix="save weights with model.state_dict() or use a kdkit checkpoint")
    return loaded, {}


def load_model_weights(model: nn.Module, path: str | Path, prefix: str = "model.", where: str | None = None) -> Path:
    """Load weights into ``model`` strictly, with a clear error on an architecture mismatch.

    Args:
        model: The freshly built model.
        path: Anything :func:`resolve_weights` accepts.
        prefix: Key prefix of the model inside kdkit checkpoints (bridges are stored beside it).
        where: Recipe location for messages.

    Returns:
        The weights file that was loaded.
    """
    file = resolve_weights(path)
    tensors, metadata = read_weights(file)
    if any(k.startswith(prefix) for k in tensors):
        tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    wrong = [f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in tensors and tensors[k].shape != v.shape]
    if missing or unexpected or wrong:
        saved_arch = metadata.get("arch", "unknown")
        detail = "; ".join(filter(None, [
            f"missing {missing[:3]}" if missing else "",
            f"unexpected {unexpected[:3]}" if unexpected else "",
            f"shape mismatch {wrong[:3]}" if wrong else "",
        ]))
        raise KdkitError(f"checkpoint {str(file)!r} (architecture {saved_arch}) does not fit "
                         f"{type(model).__name__}: {detail}",
                         fix="set the arch the checkpoint was trained with, or point to the right checkpoint",
                         where=where)
    if any(t.is_meta for t in model.state_dict().values()):
        return file  # a model built for validation holds no data: names and shapes were all there is to check
    model.load_state_dict(tensors, strict=True)
    return file


def read_state(folder: Path) -> dict[str, Any]:
    """Load ``state.pt`` of a checkpoint folder (weights_only: no code runs)."""
    try:
        return torch.load(folder / STATE, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise KdkitError(f"checkpoint state {str(folder / STATE)!r} is truncated or corrupt ({exc})",
                         fix="delete that checkpoint folder to resume from the one before, or restart") from None
