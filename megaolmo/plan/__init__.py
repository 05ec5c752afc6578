"""Plan a layout before launch: per-GPU memory, pipeline bubble, communication, step time and MFU.

`python -m megaolmo.plan [--search] [--top N] [hydra overrides ...]` composes the
same config as megaolmo.train; see megaolmo/plan/__main__.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from megaolmo.plan.hardware import Hardware
from megaolmo.plan.layout import Layout, Placement, Workload
from megaolmo.plan.memory import RankMemory, plan_memory
from megaolmo.plan.timing import StepTime, step_time


@dataclass
class Plan:
    """Everything predicted for one layout of one workload on one cluster."""

    placement: Placement
    hardware: Hardware
    memory: list[RankMemory]  # per pipeline rank
    step: StepTime

    @property
    def layout(self) -> Layout:
        return self.placement.layout

    @property
    def worst(self) -> RankMemory:
        return max(self.memory, key=lambda rank: rank.peak.total)

    @property
    def peak_bytes(self) -> float:
        return self.worst.peak.total

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.hardware.memory_bytes


def make_plan(work: Workload, layout: Layout, hardware: Hardware) -> Plan:
    """Plan `layout`; raises ConfigError when megaolmo would refuse the layout at start-up."""
    placement = Placement(work, layout)
    return Plan(placement, hardware, plan_memory(placement), step_time(placement, hardware))


__all__ = ["Hardware", "Layout", "Placement", "Plan", "Workload", "make_plan"]
