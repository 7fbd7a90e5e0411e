"""Checkpoints: atomic, code-free, resumable.

Layout of ``RUN/checkpoints/``::

    epoch_0003/model.safetensors   weights of the trained model and its bridges (+ recipe in metadata)
    epoch_0003/state.pt            optimiser, schedule, RNG, loader position, metrics history
    best.json                      {"dir": "epoch_0002", "metric": "top1", "value": ..., "epoch": 2}
    latest.json                    {"dir": "epoch_0003"}  -- written last, by atomic rename

A checkpoint folder is written under a temporary name (``.NAME.tmp-PID``) and renamed into place, then
``best.json`` (when it is the new best) and last ``latest.json`` are replaced atomically, so a crash at any
moment leaves the previous checkpoint intact and ``best.json`` never points at an older epoch than the best
one written. ``latest.json`` is what a resume starts from; the best epoch it recorded is authoritative, and
:func:`restore_best` puts ``best.json`` back in line with it. ``state.pt`` holds only tensors and plain
Python data and is loaded with ``torch.load(weights_only=True)``; the weights are safetensors: loading a
checkpoint never executes code.

A failed write (a full disk, a quota, an I/O error) becomes a :class:`KdkitError` that says what failed,
where, how much space is free there and the fix (:func:`reported_write`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from kdkit.errors import KdkitError

WEIGHTS = "model.safetensors"
STATE = "state.pt"


#: Temporaries of interrupted atomic writes: ``.NAME.tmp-PID`` files and checkpoint folders.
LEFTOVER = ".*.tmp-*"
#: What a write that ran out of space raises besides ``OSError(ENOSPC)``: torch's stream writer
#: (``inline_container.cc: unexpected pos``, ``file write failed``), numpy (``N requested and M written``),
#: safetensors (``No space left on device``).
_SHORT_WRITE = re.compile(r"unexpected pos|file write failed|requested and \d+ written|no space left", re.IGNORECASE)
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def checkpoint_name(epoch: int, step: int | None = None) -> str:
    """Folder name of the checkpoint after ``epoch`` finished epochs (and ``step`` batches of the next)."""
    return f"epoch_{epoch:04d}" + (f"_step_{step:05d}" if step is not None else "")


def free_space(path: Path) -> str:
    """Free space on the disk holding ``path`` (or its nearest existing parent), e.g. ``"12.3 MiB"``."""
    existing = Path(path).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = float(shutil.disk_usage(existing).free)
    for unit in ("B", "KiB", "MiB"):
        if free < 1024:
            return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
        free /= 1024
    return f"{free:.1f} GiB"


def _is_write_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is the file system refusing a write (not a bug in what was written)."""
    return isinstance(exc, OSError) or bool(_SHORT_WRITE.search(str(exc))) or (
        isinstance(exc, SafetensorError) and "I/O error" in str(exc))


def _disk_full(exc: BaseException) -> bool:
    return getattr(exc, "errno", None) in _FULL_ERRNOS or bool(_SHORT_WRITE.search(str(exc)))


@contextlib.contextmanager
def reported_write(what: str, path: Path, fix: str) -> Iterator[None]:
    """Turn a failed write inside the block into a :class:`KdkitError` naming ``what`` failed, ``path``, the
    free space there and ``fix`` (torch, numpy and safetensors report a full disk each in their own words).

    Args:
        what: What was being written, e.g. ``"checkpoint"``.
        path: The file or folder being written.
        fix: What the user should do.
    """
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as exc:
        if not _is_write_failure(exc):
            raise
        cause = "the disk is full" if _disk_full(exc) else "the write failed"
        raise KdkitError(f"could not write {what} {str(path)!r}: {cause} ({type(exc).__name__}: {exc}); "
                         f"{free_space(path)} free on that disk", fix=fix) from exc


def _replace_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and an atomic rename (removing the temporary on failure)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and an atomic rename.

    Raises:
        KdkitError: The write failed (e.g. the disk is full); ``path`` keeps its previous content.
    """
    with reported_write("file", path, fix="free space on that disk (or write elsewhere) and run the command "
                        "again; a run continues from its last checkpoint with --resume"):
        _replace_text(path, text)


def save_checkpoint(ckpt_root: Path, name: str, weights: dict[str, Tensor], state: dict[str, Any],
                    metadata: dict[str, str], best: dict[str, Any] | None = None) -> Path:
    """Write ``ckpt_root/name/`` atomically, point ``best.json`` at it when ``best`` is given, then
    ``latest.json``.

    Args:
        ckpt_root: ``RUN/checkpoints``.
        name: Folder name, e.g. ``epoch_0003`` or ``epoch_0003_step_0120`` (:func:`checkpoint_name`).
        weights: Flat state dict of the trained modules.
        state: Optimiser/scheduler/RNG/progress state (tensors and plain data only).
        metadata: String metadata stored in the safetensors header (recipe JSON, architecture).
        best: When this checkpoint is the new best: what ``best.json`` records besides its folder.

    Raises:
        KdkitError: A write failed (e.g. the disk is full); the previous checkpoint and pointers are kept.
    """
    final = ckpt_root / name
    tmp = ckpt_root / f".{name}.tmp-{os.getpid()}"
    kept = pointed(ckpt_root, "latest")
    fix = ("free space on that disk (or move the run folder to a disk with room and pass output.dir=NEW), then "
           "`kdkit run RECIPE --resume` continues from the last good checkpoint, "
           + (f"{str(kept)!r}, which is kept" if kept else "none yet: the run starts over"))
    with reported_write("checkpoint", final, fix):
        ckpt_root.mkdir(parents=True, exist_ok=True)
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            # safetensors refuses shared or non-contiguous storage; clone to a private contiguous copy.
            save_file({k: v.detach().contiguous().clone() for k, v in weights.items()},
                      str(tmp / WEIGHTS), metadata=metadata)
            torch.save(state, tmp / STATE)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a partial checkpoint only takes the space a retry needs
            raise
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        # best before latest: a crash between the two leaves best.json ahead of latest.json (a resume
        # recomputes that epoch and puts it back), never pointing at older weights than the best written.
        if best is not None:
            _replace_text(ckpt_root / "best.json", json.dumps({"dir": name, **best}))
        _replace_text(ckpt_root / "latest.json", json.dumps({"dir": name}))
    return final


def mark_best(ckpt_root: Path, name: str, info: dict[str, Any]) -> None:
    """Point ``best.json`` at checkpoint ``name`` (atomic)."""
    atomic_write_text(ckpt_root / "best.json", json.dumps({"dir": name, **info}))


def restore_best(ckpt_root: Path, best: dict[str, Any]) -> None:
    """Make ``best.json`` agree with ``best``, the best epoch recorded by the checkpoint a resume starts from.

    A crash between the pointer writes leaves ``best.json`` ahead of that record (and one in a run folder
    written while ``latest.json`` came first, behind it); a teacher loaded by its run folder reads
    ``best.json``, so it is put back in line.

    Args:
        ckpt_root: ``RUN/checkpoints``.
        best: ``{"metric", "value", "epoch"}``; ``epoch`` is 1-based (``-1``: no epoch finished yet).
    """
    pointer = ckpt_root / "best.json"
    if best["epoch"] <= 0:
        pointer.unlink(missing_ok=True)  # no epoch finished: a best.json is left from a lost later epoch
        return
    name = checkpoint_name(best["epoch"])
    current = json.loads(pointer.read_text()) if pointer.is_file() else None
    if current == {"dir": name, **best}:
        return
    if not (ckpt_root / name).is_dir():
        print(f"warning: the best checkpoint {str(ckpt_root / name)!r} is missing; best.json keeps pointing at "
              f"{current and current.get('dir')}", file=sys.stderr)
        return
    mark_best(ckpt_root, name, best)


def remove_leftovers(folder: Path) -> list[Path]:
    """Delete what interrupted atomic writes left in a run folder and its ``checkpoints/`` (``.NAME.tmp-PID``).

    Only safe while holding the folder's lock (:func:`kdkit.locks.exclusive`): a running writer's temporaries
    look the same.

    Returns:
        What was deleted.
    """
    removed = [p for root in (folder, folder / "checkpoints") for p in sorted(root.glob(LEFTOVER))]
    for path in removed:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed


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


def grows_into(saved: torch.Size, built: torch.Size) -> bool:
    """Whether a saved tensor is the leading rows of a built one: same shape but fewer rows (dimension 0), as a
    classifier's weight and bias are when new classes add outputs."""
    return len(saved) == len(built) >= 1 and saved[1:] == built[1:] and saved[0] < built[0]


def state_mismatch(module: nn.Module, tensors: dict[str, torch.Tensor], grow: bool = False) -> str:
    """What keeps ``tensors`` from loading strictly into ``module`` (missing or unexpected keys, other
    shapes), or ``""`` when they fit. With ``grow``, a tensor with fewer leading rows than the module's fits
    (:func:`grows_into`)."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in tensors and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in tensors if k not in expected]
    wrong = [f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in tensors and tensors[k].shape != v.shape and not (grow and grows_into(tensors[k].shape, v.shape))]
    return "; ".join(filter(None, [
        f"missing {missing[:3]}" if missing else "",
        f"unexpected {unexpected[:3]}" if unexpected else "",
        f"shape mismatch {wrong[:3]}" if wrong else "",
    ]))


def load_model_weights(model: nn.Module, path: str | Path, prefix: str = "model.", where: str | None = None,
                       grow: bool = False) -> Path:
    """Load weights into ``model`` strictly, with a clear error on an architecture mismatch.

    Args:
        model: The freshly built model.
        path: Anything :func:`resolve_weights` accepts.
        prefix: Key prefix of the model inside kdkit checkpoints (bridges are stored beside it).
        where: Recipe location for messages.
        grow: Also load a checkpoint whose output layers have fewer rows (a class-incremental step's model
            grown from the previous step's): such a tensor fills the model's leading rows (the old classes keep
            their indices and weights); the rows past it keep the model's fresh initialisation.

    Returns:
        The weights file that was loaded.
    """
    file = resolve_weights(path)
    tensors, metadata = read_weights(file)
    if any(k.startswith(prefix) for k in tensors):
        tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    detail = state_mismatch(model, tensors, grow)
    if detail:
        saved_arch = metadata.get("arch", "unknown")
        raise KdkitError(f"checkpoint {str(file)!r} (architecture {saved_arch}) does not fit "
                         f"{type(model).__name__}: {detail}",
                         fix="set the arch the checkpoint was trained with, or point to the right checkpoint",
                         where=where)
    if any(t.is_meta for t in model.state_dict().values()):
        return file  # a model built for validation holds no data: names and shapes were all there is to check
    if grow:
        fresh = model.state_dict()
        tensors = {k: _grown(v, fresh[k]) if grows_into(v.shape, fresh[k].shape) else v for k, v in tensors.items()}
    model.load_state_dict(tensors, strict=True)
    return file


def _grown(saved: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
    """``fresh`` (the built model's initial tensor) with its leading rows replaced by ``saved``."""
    out = fresh.detach().clone()
    out[: saved.shape[0]] = saved.to(out.dtype)
    return out


def read_state(folder: Path) -> dict[str, Any]:
    """Load ``state.pt`` of a checkpoint folder (weights_only: no code runs)."""
    try:
        return torch.load(folder / STATE, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise KdkitError(f"checkpoint state {str(folder / STATE)!r} is truncated or corrupt ({exc})",
                         fix="delete that checkpoint folder to resume from the one before, or restart") from None
