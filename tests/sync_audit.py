"""A CPU stand-in for `torch.cuda.set_sync_debug_mode("error")`: every ATen op a block of code dispatches, checked
against the ops that make the host wait for a GPU, so that a launch path can be shown not to wait without a GPU.

What it flags, and why each waits on a CUDA device:
- `_local_scalar_dense` (`.item()`, `float(t)`, `int(t)`, `bool(t)`, `if t:`): reads a value back;
- `nonzero`, `masked_select`, `unique`, `repeat_interleave` without `output_size`: the output's size depends on
  the data, so the host reads it first;
- `index` / `index_put_` with a boolean or uint8 index: a `nonzero` inside;
- `index_put_` whose value is a 0-dim tensor (`t[idx] = True`): on a GPU the Python scalar becomes a CPU tensor
  that `index_put_` copies to the device with a blocking `.to(device)`;
- `_to_copy` / `copy_` between devices without `non_blocking`, and any copy to the CPU.
Run on a CPU, copies between host and device never happen and `.cpu()`, `.numpy()` or `.tolist()` never reach
the dispatcher; so the tests run the launch path on `meta` tensors, a device with no data: there a blocking
host-to-device copy is seen as one, and reading a value back fails loudly.
"""

from __future__ import annotations

import traceback
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

READS_BACK = {aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default}
DATA_SIZED = {
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.unique_dim.default,
}
INDEX_PUT = {aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}


def _bool_index(indices: Any) -> bool:
    return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices)


def sync_reason(func: Any, args: tuple, kwargs: dict) -> str | None:
    """Why `func(*args, **kwargs)` would make the host wait for a CUDA device, or None."""
    if func in READS_BACK:
        return "reads a value back to the host"
    if func in DATA_SIZED:
        return "output size depends on the data"
    if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return "repeat_interleave without output_size"
    if func is aten.index.Tensor and _bool_index(args[1]):
        return "boolean-mask indexing"
    if func in INDEX_PUT:
        if _bool_index(args[1]):
            return "boolean-mask assignment"
        if isinstance(args[2], torch.Tensor) and args[2].dim() == 0:
            return "index_put_ of a scalar (a CPU tensor copied to the device with a wait)"
    if func is aten._to_copy.default:
        to = kwargs.get("device")
        if to is not None and torch.device(to) != args[0].device:
            if torch.device(to).type == "cpu":
                return "a copy to the host"
            if not kwargs.get("non_blocking", False):
                return "a blocking copy to the device"
    if func is aten.copy_.default and args[0].device != args[1].device:
        if args[0].device.type == "cpu":
            return "a copy to the host"
        if not (len(args) > 2 and args[2]) and not kwargs.get("non_blocking", False):
            return "a blocking copy to the device"
    return None


class SyncAudit(TorchDispatchMode):
    """Records (op, reason, caller line) for every op dispatched inside the block that would wait on a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, str, str]] = []
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        self.ops.add(str(func))
        reason = sync_reason(func, args, kwargs)
        if reason is not None:
            frames = [f for f in traceback.extract_stack() if "/genrec/" in f.filename]
            where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
            self.found.append((str(func), reason, where))
        return func(*args, **kwargs)
