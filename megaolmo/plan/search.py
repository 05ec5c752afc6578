"""Every layout megaolmo can run a workload with on a cluster, planned and ranked by predicted step time."""

from __future__ import annotations

from collections.abc import Iterator

from megaolmo.config import ACTIVATION_CHECKPOINTING, ConfigError
from megaolmo.plan import Plan, make_plan
from megaolmo.plan.hardware import Hardware
from megaolmo.plan.layout import Layout, Workload

MAX_MICRO_BATCH = 16  # larger micro-batches only add activation memory once the GEMMs are large
MIN_CP_TOKENS = 1024  # context parallelism only while each rank keeps at least this many tokens of a sequence


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(work: Workload, hardware: Hardware) -> Iterator[Layout]:
    """TP within a node (powers of two), CP (powers of two, each rank keeping at least MIN_CP_TOKENS of a
    sequence, in 2 x cp equal chunks), PP and virtual stages that split the layers evenly, DP over the rest,
    power-of-two micro-batches, each recompute mode, SP on or off, ZeRO-3 or ZeRO-2."""
    world, layers = hardware.world_size, work.model.n_layers
    tps = [tp for tp in (2**i for i in range(8)) if hardware.devices_per_node % tp == 0 and world % tp == 0]
    cps = [
        cp
        for cp in (2**i for i in range(world.bit_length()))
        if world % cp == 0 and work.seq_len % (2 * cp) == 0 and (cp == 1 or work.seq_len // cp >= MIN_CP_TOKENS)
    ]
    for tp, cp in ((tp, cp) for tp in tps for cp in cps if world % (tp * cp) == 0):
        for pp in (pp for pp in _divisors(layers) if world % (tp * cp * pp) == 0):
            dp = world // (tp * cp * pp)
            if work.global_batch_size % dp:
                continue
            per_rank = work.global_batch_size // dp
            vps = _divisors(layers // pp) if pp > 1 else [1]
            micro_batches = [b for b in (2**i for i in range(MAX_MICRO_BATCH.bit_length())) if per_rank % b == 0]
            for vp in vps:
                for micro_batch_size in micro_batches:
                    for recompute in ACTIVATION_CHECKPOINTING:
                        for sp in (False, True) if tp > 1 else (False,):
                            for reshard in (True, False) if dp > 1 else (True,):
                                yield Layout(
                                    tp=tp,
                                    cp=cp,
                                    pp=pp,
                                    dp=dp,
                                    vp=vp,
                                    micro_batch_size=micro_batch_size,
                                    sequence_parallel=sp,
                                    activation_checkpointing=recompute,
                                    reshard_after_forward=reshard,
                                    pp_schedule="interleaved_1f1b" if vp > 1 else "1f1b",
                                )


def search(work: Workload, hardware: Hardware) -> list[Plan]:
    """Feasible plans (megaolmo accepts the layout and it fits in memory), fastest first; among equally fast
    ones (to 3 significant digits: the roofline does not tell them apart), the one with more memory to spare."""
    plans = []
    for layout in candidate_layouts(work, hardware):
        try:
            plan = make_plan(work, layout, hardware)
        except ConfigError:
            continue
        if plan.fits:
            plans.append(plan)
    return sorted(plans, key=lambda plan: (float(f"{plan.step.seconds:.3g}"), plan.peak_bytes))
