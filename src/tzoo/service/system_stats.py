"""What ``GET /api/gpu_stats`` reports: each GPU's memory and utilisation where there are
GPUs, and always the CPU, RAM and the loaded models; for the operator also this process
and the host (pid, hostname, data and cache folders) and models' paths. Anyone else sees
no server paths and no host details: a model loaded from a local path is "local
directory"."""

from __future__ import annotations

import os
import socket
from typing import Any

import psutil
import torch

from tzoo.runtime.devices import resolve_device
from tzoo.runtime.manager import ModelManager
from tzoo.service.model_loading import public_model_label


def system_stats(manager: ModelManager, *, operator: bool = False) -> dict[str, Any]:
    memory = psutil.virtual_memory()
    loaded = manager.loaded_names()
    stats: dict[str, Any] = {
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
        "models": {
            "loaded": loaded if operator else [public_model_label(name) for name in loaded],
            "used_bytes": manager.used_bytes,
            "budget_bytes": manager.budget_bytes,
        },
    }
    if operator:
        settings = manager.settings
        stats["process"] = {"pid": os.getpid(), "rss_bytes": psutil.Process().memory_info().rss}
        stats["host"] = {
            "hostname": socket.gethostname(),
            "data_dir": str(settings.data_dir),
            "cache_dir": str(settings.cache_dir),
        }
    return stats


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
