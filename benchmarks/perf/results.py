"""The JSON files of a run: one per backbone and measurement group, each with the device,
versions, commit and settings it was measured with."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .settings import FULL_BACKBONES

ROOT = Path(__file__).resolve().parents[2]
GROUPS = ("floor", "train_step", "inference", "memory", "boundary", "profile")
SUMMARY = "summary.json"


def resolve_commit(fallback: str | None) -> str:
    """``CL_SULORA_COMMIT`` when set, else ``git rev-parse HEAD`` of the checkout when git has
    it, else ``fallback``."""
    if os.environ.get("CL_SULORA_COMMIT"):
        return os.environ["CL_SULORA_COMMIT"]
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return fallback or "unknown"
    return done.stdout.strip()


def device_name(device: Any) -> str:
    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def environment(device: Any, commit: str) -> dict[str, Any]:
    """Device, versions and commit recorded in every file."""
    import timm
    import torch

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    return {"device": device_name(device), "torch": torch.__version__, "commit": commit,
            "versions": {"python": platform.python_version(), "timm": timm.__version__,
                         "peft": peft_version, "cuda": torch.version.cuda},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def group_path(directory: Path, backbone: str, group: str) -> Path:
    return directory / f"{backbone}.{group}.json"


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")


def write_group(directory: Path, backbone: str, group: str, env: dict[str, Any],
                settings: dict[str, Any], results: dict[str, Any]) -> Path:
    path = group_path(directory, backbone, group)
    write_json(path, {"group": group, "backbone": backbone, **env, "settings": settings,
                      "results": results})
    return path


def read_groups(directory: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """Every group file of ``directory``, by backbone then group."""
    found: dict[str, dict[str, dict[str, Any]]] = {}
    for path in sorted(directory.glob("*.json")):
        if path.name == SUMMARY:
            continue
        payload = json.loads(path.read_text(encoding="utf-8"))
        if payload.get("group") in GROUPS:
            found.setdefault(payload["backbone"], {})[payload["group"]] = payload
    rank = {key: i for i, key in enumerate(FULL_BACKBONES)}  # the suite's order first
    return dict(sorted(found.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))
