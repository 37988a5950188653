"""What one gpu_verify stage reports: status (passed, failed, skipped), reason, key numbers."""

from __future__ import annotations

from dataclasses import dataclass, field

NO_GPU = "no GPU"


@dataclass
class Result:
    status: str
    reason: str = ""
    numbers: dict = field(default_factory=dict)


def passed(**numbers) -> Result:
    return Result("passed", "", numbers)


def failed(reason: str, **numbers) -> Result:
    return Result("failed", reason, numbers)


def skipped(reason: str, **numbers) -> Result:
    return Result("skipped", reason, numbers)
