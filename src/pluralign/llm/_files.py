"""Reading and writing the tensor files of adapters and checkpoints, durably and strictly.

Writes go through :func:`pluralign._atomic.atomic_open` (a temporary sibling, ``fsync``, then
``os.replace``; the file gets ``0o666`` less the umask, where ``safetensors.save_file`` would
leave ``0o600`` and a serving account could not read the adapter).

Reads refuse, with a :class:`~pluralign.errors.DataValidationError` naming the file (and the
tensor), what ``safetensors`` or ``torch.load`` would otherwise raise as their own exceptions:
a missing or truncated file, a damaged header, a tensor of a non-float dtype and non-finite
values (pluralign never saves a NaN: a run whose loss becomes non-finite stops first).
``torch.load`` is only ever called with ``weights_only=True``, which unpickles tensors and
plain containers and refuses every other class, so a checkpoint cannot run code on load.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch

from pluralign._atomic import atomic_open
from pluralign.errors import DataValidationError

__all__ = ["fsync_file", "read_tensors", "read_torch", "write_bytes", "write_tensors"]


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (fsynced; ``0o666`` less the umask)."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A safetensors file of ``tensors`` (contiguous CPU copies), written as :func:`write_bytes`."""
    from safetensors.torch import save

    return write_bytes(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))


def fsync_file(path: str | Path) -> None:
    """Flush a file that another library wrote (e.g. ``adapter_config.json``) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_tensors(path: str | Path, *, finite: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a missing, damaged or non-float file (or, with
    ``finite``, one holding NaN or infinity) raises :class:`DataValidationError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise DataValidationError(
            "file not found" if not path.exists() else "is not a regular file", path=str(path)
        )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise DataValidationError(
            f"not a readable safetensors file ({str(exc)[:160]})", path=str(path)
        ) from None
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise DataValidationError(
                f"has dtype {tensor.dtype}; expected floats", field=name, path=str(path)
            )
        if finite and not bool(torch.isfinite(tensor).all()):
            raise DataValidationError("holds NaN or infinite values", field=name, path=str(path))
    return tensors


def read_torch(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` with every failure a
    :class:`DataValidationError` (a damaged file, or a pickle of anything but tensors and
    plain containers: ``weights_only`` refuses to build other objects)."""
    path = Path(path)
    if not path.is_file():
        raise DataValidationError(
            "file not found" if not path.exists() else "is not a regular file", path=str(path)
        )
    try:
        data = path.read_bytes()
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (
        pickle.UnpicklingError,
        EOFError,
        OSError,
        RuntimeError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        IndexError,
        UnicodeDecodeError,
        OverflowError,
        zipfile.BadZipFile,
        struct.error,
    ) as exc:
        raise DataValidationError(
            f"not a readable torch file ({type(exc).__name__}: {str(exc)[:160]})", path=str(path)
        ) from None
