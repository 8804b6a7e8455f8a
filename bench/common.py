"""What the benchmark parts share: the run's context, result rows, subprocesses, memory readings."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class BenchError(Exception):
    """A part cannot run (missing data, a failed subprocess): reported in one line."""


@dataclass
class Row:
    """One line of the final table."""

    part: str
    measure: str
    value: str
    target: str = ""
    ok: bool | None = None  # None: reported, no target

    @property
    def result(self) -> str:
        return {True: "PASS", False: "MISS", None: ""}[self.ok]


@dataclass
class Context:
    """Paths and sizes of one benchmark run, and what parts hand to later parts."""

    data: Path
    module: Path
    images: Path  # the labelled folder for the retrain-train parts (cold/warm, baseline, tflite)
    extract_dir: Path  # the folder whose first images part 1 extracts
    work: Path  # scratch space outside the repository
    quick: bool
    sizes: dict
    shared: dict = field(default_factory=dict)


def python_env(**extra: str) -> dict:
    """Environment for child processes: this checkout's ``retrain`` first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.update(extra)
    return env


def last_line(text: str) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def run_python(args: list[str], what: str, env: dict | None = None, timeout: float | None = None) -> tuple[str, float, float]:
    """Run ``python ARGS`` from the repository root. Returns (stdout, wall seconds, CPU seconds of the child)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, *args], check=False, cwd=ROOT, env=env or python_env(),
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what} took more than {timeout:.0f} s") from None
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        raise BenchError(f"{what} failed (exit {done.returncode}): {last_line(done.stderr or done.stdout)}")
    return done.stdout, wall, cpu


def run_json(args: list[str], what: str, env: dict | None = None, timeout: float | None = None) -> tuple[dict, float, float]:
    stdout, wall, cpu = run_python(args, what, env, timeout)
    try:
        return json.loads(stdout), wall, cpu
    except ValueError:
        raise BenchError(f"{what} printed no JSON document: {last_line(stdout)}") from None


def retrain_train(images: Path, module: Path, output: Path, cache: Path, *extra: str) -> tuple[dict, float, float]:
    """``retrain train ... --json`` in a fresh process, as a user runs it."""
    args = ["-m", "retrain", "train", str(images), "--module", str(module), "--output", str(output),
            "--cache-dir", str(cache), "--json", *extra]
    return run_json(args, "retrain train")


def proc_status_kb(field_name: str, pid: int | str = "self") -> int | None:
    """A ``VmRSS`` / ``VmHWM`` style line of /proc/PID/status in KiB (None where there is no /proc)."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB."""
    kb = proc_status_kb("VmHWM")
    if kb is None:  # no /proc: ru_maxrss is KiB on Linux, bytes on macOS
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if sys.platform == "darwin":
            kb //= 1024
    return kb / 1024


def reset_peak_rss() -> bool:
    """Start a new peak-memory window (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class GpuUtilisation:
    """Samples ``nvidia-smi``'s GPU utilisation while a block runs (nothing where it is absent)."""

    def __init__(self, interval_ms: int = 200):
        self.interval_ms = interval_ms
        self.samples: list[float] = []
        self._process = None
        self._thread = None

    def __enter__(self):
        try:
            self._process = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", f"--loop-ms={self.interval_ms}"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            return self
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self):
        for line in self._process.stdout:
            try:
                self.samples.append(float(line.strip().split(",")[0]))
            except ValueError:
                pass

    def __exit__(self, *exc):
        if self._process is not None:
            self._process.terminate()
            self._process.wait()
            self._thread.join(timeout=2)
        return False

    def summary(self) -> dict | None:
        if not self.samples:
            return None
        return {"mean_percent": round(sum(self.samples) / len(self.samples), 1), "max_percent": max(self.samples),
                "samples": len(self.samples)}


def load_snapshot() -> dict:
    """How busy the machine is: load averages and, where the kernel reports it, CPU pressure."""
    snapshot = {"loadavg": [round(x, 2) for x in os.getloadavg()]}
    try:
        first = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        snapshot["cpu_pressure_some_avg10"] = float(first.split("avg10=")[1].split()[0])
    except (OSError, IndexError, ValueError):
        pass
    return snapshot


def fmt_rate(value: float) -> str:
    return f"{value:,.0f} img/s"


def fmt_s(value: float) -> str:
    return f"{value:.2f} s" if value < 10 else f"{value:.1f} s"
