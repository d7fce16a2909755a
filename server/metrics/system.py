"""Machine metrics, per interval (`--metrics-interval-ms`), as Triton names them.

CPU (`--allow-cpu-metrics`): utilization of all cores since the last interval from
/proc/stat, total and used memory from /proc/meminfo (used = MemTotal - MemAvailable).
GPU (`--allow-gpu-metrics`, NVIDIA only): utilization, memory, power and energy through NVML
(the `nvidia-ml-py` package, imported as `pynvml`), labelled by GPU UUID; without NVML or
without GPUs there are none. A poller thread refreshes the values; a scrape only reads them.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from server.metrics.exposition import Family

log = logging.getLogger("nereid.metrics")


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies over all cores."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [int(v) for v in fields[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])  # guest time is already counted in user
    return total - idle, total


def _memory() -> tuple[int, int] | None:
    """(total, used) bytes."""
    info: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                key, _, rest = line.partition(":")
                info[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    if "MemTotal" not in info or "MemAvailable" not in info:
        return None
    return info["MemTotal"], info["MemTotal"] - info["MemAvailable"]


class SystemMetrics:
    def __init__(self, interval_s: float, cpu: bool = True, gpu: bool = True) -> None:
        self._interval = interval_s
        self._cpu = cpu
        self._values: dict[str, Any] = {}
        self._last_cpu = _cpu_times() if cpu else None
        self._nvml: Any = self._init_nvml() if gpu else None
        self._energy_at_start: dict[str, float] = {}  # NVML counts since the driver loaded; Triton since start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nereid-metrics-poll", daemon=True)
        self.poll()

    @staticmethod
    def _init_nvml() -> Any:
        try:
            import pynvml  # type: ignore[import-not-found]

            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
        except Exception as exc:  # no package, no driver, no GPU: no GPU metrics
            log.debug("GPU metrics off: %s", exc)
            return None
        if not count:
            return None
        log.info("GPU metrics through NVML for %d GPU(s)", count)
        return pynvml

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.poll()
            except Exception:  # one bad reading must not end the poller
                log.exception("reading machine metrics failed")

    def poll(self) -> None:
        values: dict[str, Any] = {}
        if self._cpu:
            now = _cpu_times()
            last, self._last_cpu = self._last_cpu, now
            if now and last and now[1] > last[1]:
                values["cpu_utilization"] = (now[0] - last[0]) / (now[1] - last[1])
            elif now:
                values["cpu_utilization"] = 0.0
            memory = _memory()
            if memory:
                values["cpu_memory_total"], values["cpu_memory_used"] = memory
        if self._nvml is not None:
            values["gpus"] = self._gpus()
        self._values = values

    def _gpus(self) -> list[dict[str, Any]]:
        nvml, gpus = self._nvml, []
        for index in range(nvml.nvmlDeviceGetCount()):
            gpu = _gpu_reading(nvml, nvml.nvmlDeviceGetHandleByIndex(index))
            if "energy" in gpu:
                gpu["energy"] -= self._energy_at_start.setdefault(gpu["uuid"], gpu["energy"])
            gpus.append(gpu)
        return gpus

    def families(self) -> list[Family]:
        values = self._values
        out = []
        if "cpu_utilization" in values:
            family = Family("nv_cpu_utilization", "CPU utilization rate [0.0 - 1.0]", "gauge")
            family.sample((), values["cpu_utilization"])
            out.append(family)
        if "cpu_memory_total" in values:
            total = Family("nv_cpu_memory_total_bytes", "CPU total memory (RAM), in bytes", "gauge")
            total.sample((), values["cpu_memory_total"])
            used = Family("nv_cpu_memory_used_bytes", "CPU used memory (RAM), in bytes", "gauge")
            used.sample((), values["cpu_memory_used"])
            out += [total, used]
        gpus = values.get("gpus") or []
        for key, name, text in (
            ("utilization", "nv_gpu_utilization", "GPU utilization rate [0.0 - 1.0)"),
            ("memory_total", "nv_gpu_memory_total_bytes", "GPU total memory, in bytes"),
            ("memory_used", "nv_gpu_memory_used_bytes", "GPU used memory, in bytes"),
            ("power_usage", "nv_gpu_power_usage", "GPU power usage in watts"),
            ("power_limit", "nv_gpu_power_limit", "GPU power management limit in watts"),
            ("energy", "nv_energy_consumption", "GPU energy consumption in joules since the Triton Server started"),
        ):
            family = Family(name, text, "gauge" if key != "energy" else "counter")
            for gpu in gpus:
                if key in gpu:
                    family.sample((("gpu_uuid", gpu["uuid"]),), gpu[key])
            out.append(family)
        return out


def _gpu_reading(nvml: Any, handle: Any) -> dict[str, Any]:
    """One GPU's values; a reading the GPU does not support is left out."""
    uuid = nvml.nvmlDeviceGetUUID(handle)
    gpu: dict[str, Any] = {"uuid": uuid.decode() if isinstance(uuid, bytes) else uuid}
    readings = (
        ("utilization", lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0),
        ("memory_total", lambda: nvml.nvmlDeviceGetMemoryInfo(handle).total),
        ("memory_used", lambda: nvml.nvmlDeviceGetMemoryInfo(handle).used),
        ("power_usage", lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0),
        ("power_limit", lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0),
        ("energy", lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0),
    )
    for key, read in readings:
        try:
            gpu[key] = read()
        except Exception:
            continue
    return gpu
