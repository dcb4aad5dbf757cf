"""Helpers shared by the benchmarks: machine description, percentiles, results files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()} cores, torch {torch.__version__}"


def percentiles(values: list[float]) -> dict[str, float]:
    a = np.asarray(values) * 1000
    return {f"p{q}_ms": round(float(np.percentile(a, q)), 2) for q in (50, 95, 99)}


def git_rev() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"


def save(path: str | None, payload: dict[str, Any]) -> None:
    payload = {"machine": machine(), "commit": git_rev(), **payload}
    print(json.dumps(payload, indent=2))
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2))
