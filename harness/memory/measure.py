"""What the byte model is validated against, measured: the bytes a built model holds, and torch's CPU
allocator's peak over any work.

    static_bytes(model)          # parameters + bitsandbytes quantization state
    peak_of(lambda: work())      # bytes the work adds at its peak, relative to its start

The work that validates the planner is the training loop's own (harness.loop_memory: allocator_peak
over Loop.train_step, eval_allocator_peak over its held-out evaluation); this module runs none of it,
so the planner never imports the training stack. Not counted: memory outside torch's allocator
(oneDNN scratch, Python objects), which the planner does not model either.
"""
from __future__ import annotations

from torch.profiler import ProfilerActivity, profile


def static_bytes(model) -> int:
    """Parameters and bitsandbytes quantization state of a built model, each storage once."""
    seen, total = set(), 0
    for parameter in model.parameters():
        tensors = [parameter]
        state = getattr(parameter, "quant_state", None)
        if state is not None:
            tensors += [state.absmax, state.code] + ([state.state2.absmax, state.state2.code, state.offset]
                                                     if state.nested else [])
        for tensor in tensors:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def peak_of(work) -> int:
    """torch.profiler's memory events over work() (every allocation and free) summed in time order:
    the CPU analogue of torch.cuda.max_memory_allocated, relative to the start."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        work()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak
