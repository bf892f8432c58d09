"""Engine backends: who owns the process group, the optimizer step and the state on disk.

    accelerate  single process, DDP (multi-GPU or MULTI_CPU over gloo), FSDP, as configured
                by `accelerate launch` or torchrun.
    deepspeed   DeepSpeed ZeRO 2/3 (CPU optimizer offload included), driven through
                deepspeed.initialize with the JSON file named by engine.deepspeed_config.

The engine classes live in harness.engines; these entries only select and build them.
"""
from __future__ import annotations

from harness.registry import register


@register("engine", "accelerate", description="accelerate: single process, DDP, FSDP (GPU or CPU/gloo)",
          requires=(("accelerate", "accelerate>=1.10"),))
def accelerate_engine():
    from harness.engines import AccelerateEngine

    return AccelerateEngine()


@register("engine", "deepspeed", description="DeepSpeed ZeRO-2/3 with optional CPU offload",
          requires=(("deepspeed", "deepspeed>=0.17"),))
def deepspeed_engine(*, deepspeed_config: str):
    from harness.engines import DeepSpeedEngine

    return DeepSpeedEngine(deepspeed_config)
