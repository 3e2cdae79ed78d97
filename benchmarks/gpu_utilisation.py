"""GPU utilisation over a stretch of load, sampled by nvidia-smi beside the benchmark.

nvidia-smi's `utilization.gpu` is the share of each sample period in which a kernel ran;
its mean over a load is how busy a server kept the GPU. Without nvidia-smi (a CPU
machine) nothing is sampled and the figure is None.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
from types import TracebackType

SAMPLE_MS = 100


def parse_samples(text: str) -> list[float]:
    """Utilisation percentages from `--format=csv,noheader,nounits` output: a line per GPU
    and sample (so the mean is over every GPU); lines that are not numbers are skipped."""
    samples = []
    for line in text.splitlines():
        try:
            samples.append(float(line))
        except ValueError:
            continue
    return samples


class GpuUtilisation:
    """`with GpuUtilisation() as gpu: ...`, then `gpu.mean_percent` (None without a GPU)."""

    def __init__(self, command: str = "nvidia-smi") -> None:
        self._command = shutil.which(command)
        self._process: subprocess.Popen[str] | None = None
        self.samples: list[float] = []

    def __enter__(self) -> GpuUtilisation:
        if self._command is not None:
            self._process = subprocess.Popen(
                [
                    self._command,
                    "--query-gpu=utilization.gpu",
                    "--format=csv,noheader,nounits",
                    f"--loop-ms={SAMPLE_MS}",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._process is None:
            return
        self._process.terminate()
        output, _ = self._process.communicate(timeout=10)
        self.samples = parse_samples(output)

    @property
    def mean_percent(self) -> float | None:
        return statistics.fmean(self.samples) if self.samples else None


def gpu_name() -> str:
    """', <first GPU's name>' to append to a machine's label; empty without a GPU."""
    import torch

    return f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
