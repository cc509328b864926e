"""What ``GET /api/gpu_stats`` reports: each GPU's memory and utilisation where there are
GPUs, and always the CPU, RAM, this process and the loaded models."""

from __future__ import annotations

from typing import Any

import psutil
import torch

from tzoo.runtime.devices import resolve_device
from tzoo.runtime.manager import ModelManager


def system_stats(manager: ModelManager) -> dict[str, Any]:
    memory = psutil.virtual_memory()
    return {
        "device": resolve_device(manager.settings.device),
        "gpus": _gpus(),
        "cpu": {
            "count": psutil.cpu_count(),
            # Since the previous call (the first call of a process answers 0.0).
            "percent": psutil.cpu_percent(interval=None),
            "load_average": list(psutil.getloadavg()),
        },
        "memory": {
            "total_bytes": memory.total,
            "available_bytes": memory.available,
            "used_percent": memory.percent,
        },
        "process": {"rss_bytes": psutil.Process().memory_info().rss},
        "models": {
            "loaded": manager.loaded_names(),
            "used_bytes": manager.used_bytes,
            "budget_bytes": manager.budget_bytes,
        },
    }


def _gpus() -> list[dict[str, Any]]:
    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        try:
            utilisation: int | None = int(torch.cuda.utilization(index))
        except Exception:  # needs pynvml / amdsmi; memory figures come from torch itself
            utilisation = None
        gpus.append(
            {
                "index": index,
                "name": torch.cuda.get_device_name(index),
                "memory_total_bytes": total,
                "memory_free_bytes": free,
                "memory_allocated_bytes": torch.cuda.memory_allocated(index),
                "memory_reserved_bytes": torch.cuda.memory_reserved(index),
                "utilization_percent": utilisation,
            }
        )
    return gpus
