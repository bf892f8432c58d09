"""What the planner returns: a plan's parts, each live in some phases of a training step (PHASES) or of the
held-out evaluation between steps (EVAL_PHASES), and the peak they sum to (harness.memory.byte_model
fills them).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .shapes import ModelShape

PHASES = ("attention", "mlp", "loss", "step")
EVAL_PHASES = ("eval attention", "eval mlp", "eval loss")


@dataclass(frozen=True)
class Part:
    """One line of the breakdown: bytes on the device, the phases it is live in, host RAM."""

    name: str
    bytes: int
    phases: tuple[str, ...] = PHASES
    cpu_bytes: int = 0
    note: str = ""
    dynamic: bool = False  # allocated by the work planned (the training step, or the evaluation), not before it


class _Phased:
    """Parts that peak together in `peak_phase` (a plan's or its evaluation's)."""

    parts: list[Part]
    peak_phase: str

    def at_peak(self, part: Part) -> int:
        return part.bytes if self.peak_phase in part.phases else 0

    @property
    def peak_bytes(self) -> int:
        """Predicted peak device memory, CUDA overhead included."""
        return sum(self.at_peak(part) for part in self.parts)

    @property
    def dynamic_bytes(self) -> int:
        """What the work adds at its peak to what was there before it (what the CPU validation measures):
        a step's activations, loss, gradients, optimizer states and temporaries; an evaluation's forward."""
        return sum(self.at_peak(part) for part in self.parts if part.dynamic)

    def breakdown(self) -> list[dict]:
        return [{"name": p.name, "bytes": p.bytes, "at_peak": self.at_peak(p), "phases": list(p.phases),
                 "cpu_bytes": p.cpu_bytes, "note": p.note} for p in self.parts]


@dataclass
class EvalPlan(_Phased):
    """The held-out evaluation between two steps: what persists of training, one no-grad forward of a
    1 x L sample with full attention at L (seq_len; the target under PoSE), and whether that fits the card
    (None: no card)."""

    seq_len: int
    parts: list[Part]
    peak_phase: str
    fits: bool | None = None

    def to_dict(self) -> dict:
        return {"seq_len": self.seq_len, "peak_phase": self.peak_phase, "peak_bytes": self.peak_bytes,
                "dynamic_bytes": self.dynamic_bytes, "fits": self.fits, "breakdown": self.breakdown()}


@dataclass(frozen=True)
class Reach:
    """The longest target (tokens, a multiple of 1024; 0: none) one card reaches, trained at the target against
    trained with PoSE at a `window`-token window. Either way the no-grad full-attention forward at the target
    (the evaluation's, beside what training keeps) must fit too; under PoSE it is the limit, training's memory
    being the window's (`window_peak`)."""

    contiguous: int  # training at the target and the forward at the target fit
    pose: int  # training at the window and the forward at the target fit
    window: int
    window_source: str  # why this window: the recipe's own, the original context, a quarter of the length
    window_peak: int  # bytes: the training step's peak at the window

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class MemoryPlan(_Phased):
    recipe: str
    device: str
    card: str | None
    capacity_bytes: int | None
    shape: ModelShape
    batch: int
    seq_len: int
    trainable_params: int
    parts: list[Part]
    peak_phase: str
    fits: bool | None = None
    max_seq_len: int | None = None
    suggestions: list[str] = field(default_factory=list)
    cards: int = 1
    sequence_parallel: int = 1
    tiled_mlp: bool = False
    evaluation: EvalPlan | None = None  # None: the recipe holds nothing out, no evaluation runs
    reach: Reach | None = None  # with a card: the longest target with and without PoSE

    @property
    def allocated_bytes(self) -> int:
        """The peak as torch.cuda.max_memory_allocated would see it: without the CUDA
        overhead and without paged (unified-memory) optimizer states."""
        hidden = ("CUDA context + allocator", "optimizer states (paged)")
        return sum(self.at_peak(part) for part in self.parts if part.name not in hidden)

    @property
    def cpu_bytes(self) -> int:
        return sum(part.cpu_bytes for part in self.parts)

    def part_bytes(self, name: str) -> int:
        return sum(p.bytes for p in self.parts if p.name == name)

    def to_dict(self) -> dict:
        return {
            "recipe": self.recipe, "device": self.device, "card": self.card, "capacity_bytes": self.capacity_bytes,
            "model": dataclasses.asdict(self.shape), "micro_batch": self.batch, "seq_len": self.seq_len,
            "trainable_params": self.trainable_params,
            "peak_phase": self.peak_phase, "peak_bytes": self.peak_bytes, "allocated_bytes": self.allocated_bytes,
            "dynamic_bytes": self.dynamic_bytes, "cpu_bytes": self.cpu_bytes, "fits": self.fits,
            "max_seq_len": self.max_seq_len, "suggestions": self.suggestions, "cards": self.cards,
            "sequence_parallel_size": self.sequence_parallel, "tiled_mlp": self.tiled_mlp,
            "breakdown": self.breakdown(),
            "evaluation": self.evaluation.to_dict() if self.evaluation else None,
            "reach": self.reach.to_dict() if self.reach else None,
        }
