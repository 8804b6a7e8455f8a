"""The machine a benchmark ran on: CPU model and cores, memory, GPU, versions."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def _nvidia_smi() -> list[str]:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                              check=False, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in done.stdout.splitlines() if line.strip()] if done.returncode == 0 else []


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def describe() -> dict:
    from retrain._tf import tf as _tf

    tf = _tf()
    gpus = tf.config.list_physical_devices("GPU")
    names = []
    for gpu in gpus:
        try:
            names.append(tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name))
        except Exception:  # noqa: BLE001 - the details are a nicety; the device name will do
            names.append(gpu.name)
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gb": _memory_gb(),
        "gpus": names,
        "nvidia_smi": _nvidia_smi(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": _version("keras"),
        "tf_keras": _version("tf-keras"),
        "tensorflow_hub": _version("tensorflow-hub"),
        "ai_edge_litert": _version("ai-edge-litert"),
        "tensorflow_built_with_cuda": tf.test.is_built_with_cuda(),
    }


def one_line(machine: dict) -> str:
    gpu = ", ".join(machine["gpus"]) or "no GPU"
    return (f"{machine['cpu']}, {machine['usable_cores']} cores, {machine['memory_gb']} GB, {gpu}; "
            f"TensorFlow {machine['tensorflow']}, Python {machine['python']}")
