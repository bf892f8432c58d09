"""Long-context evaluation during training, and the watch that reads it.

Every train.eval_every steps (and at the end) the training loop scores the held-out split
(data.eval_path, or data.eval_fraction of the training data) with *full attention*, the way
users serve the model, whatever attention trains:

    eval_ppl          at the target length (the held-out samples as they are: seq_len tokens)
    eval_ppl_window   the same tokens read in windows of the original context
    eval_ppl_s2       at the target under S2, where S2 trains and train.eval_s2 = true

An adapter trained with S2 can hold inside its S2 group and break past it under full
attention (docs/experiments.md, "Does S2 training transfer to full attention?"): eval_ppl then rises while
the training loss falls. TransferWatch says so in one line after train.eval_rises rises in a
row, stops the run there when train.eval_stop = true, and keeps the best evaluation, which the
saved recipe records (resolved.best_eval_step, resolved.best_eval_ppl).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from harness.backends.quantization import training_layout_kept
from harness.recipe_checks import PI_S2_DOES_NOT_TRANSFER


@contextlib.contextmanager
def s2_at_inference(model: torch.nn.Module) -> Iterator[bool]:
    """S2 in model.eval() for the duration (the modules' s2_settings.at_inference); yields whether
    the model has S2 modules at all."""
    modules = [m for m in model.modules() if hasattr(m, "s2_settings")]
    saved = [m.s2_settings for m in modules]
    for module in modules:
        module.s2_settings = dataclasses.replace(module.s2_settings, at_inference=True)
    try:
        yield bool(modules)
    finally:
        for module, settings in zip(modules, saved):
            module.s2_settings = settings


def windows_of(item: dict, window: int) -> list[dict]:
    """A held-out sample cut into pieces of `window` tokens, each read on its own: positions of the
    piece that continues a document restart at 0 (a packed row's later documents already do)."""
    pieces = []
    for start in range(0, len(item["input_ids"]), window):
        piece = slice(start, start + window)
        positions = list(item["position_ids"][piece])
        first_reset = next((i for i, p in enumerate(positions) if i and p == 0), len(positions))
        positions = [p - positions[0] for p in positions[:first_reset]] + positions[first_reset:]
        if len(positions) >= 2:
            pieces.append({"input_ids": list(item["input_ids"][piece]), "labels": list(item["labels"][piece]),
                           "position_ids": positions})
    return pieces


@dataclass
class LongContextEval:
    """Mean token loss of a module (CausalLMLoss: batch -> mean loss) over held-out samples.

    `run(module, samples)` -> {"eval_loss", "eval_ppl", ["eval_ppl_window"], ["eval_ppl_s2"]}.
    The losses are token-weighted over this rank's samples, then averaged over ranks by `all_mean`."""

    collate: Callable[[list[dict]], dict]
    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager]
    all_mean: Callable[[float], float]
    window: int = 0  # the original context, when the samples are longer; 0 skips the window reading
    s2: bool = False  # also score the target under S2

    @torch.no_grad()
    def run(self, module: torch.nn.Module, samples: Sequence[dict]) -> dict[str, float]:
        """Every rank must pass as many samples (pad with zero_weight copies): under ZeRO-3 each
        forward is a collective. The module trains afterwards exactly as it would have without this."""
        was_training = module.training
        module.eval()
        try:
            with training_layout_kept(module):
                return self._readings(module, samples)
        finally:
            module.train(was_training)

    def _readings(self, module: torch.nn.Module, samples: Sequence[dict]) -> dict[str, float]:
        loss = self._loss(module, [[item] for item in samples])
        result = {"eval_loss": loss, "eval_ppl": _ppl(loss)}
        if self.window:  # decided alike on every rank: each reading is a collective
            # a 1-token sample: no window
            pieces = [windows_of(item, self.window) or [zero_weight(item)] for item in samples]
            result["eval_ppl_window"] = _ppl(self._loss(module, pieces))
        if self.s2:
            with s2_at_inference(module) as has_s2:
                if has_s2:
                    result["eval_ppl_s2"] = _ppl(self._loss(module, [[item] for item in samples]))
        return result

    def _loss(self, module, batches: list[list[dict]]) -> float:
        """Token-weighted over every rank's batches: both sums are averaged over ranks, so a rank's
        zero-weight padding joins the collectives and counts for nothing."""
        total, weight = 0.0, 0
        for items in batches:  # a batch without targets still runs: the other ranks' forwards wait for it
            batch = {k: v.to(self.device) for k, v in self.collate(items).items()}
            targets = int((batch["labels"][:, 1:] != -100).sum())
            with self.autocast():
                total += module(**batch).item() * targets
            weight += targets
        total, weight = self.all_mean(total), self.all_mean(float(weight))
        return total / weight if weight else float("nan")


def zero_weight(item: dict) -> dict:
    """A copy of a held-out sample without targets: padding that keeps ranks' forwards in step."""
    return {**item, "labels": [-100] * len(item["labels"])}


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))


# --------------------------------------------------------------------------- the watch

@dataclass
class Evaluation:
    step: int
    ppl: float  # full attention at the target
    train_loss: float  # mean training loss since the evaluation before


@dataclass
class TransferWatch:
    """Reads the evaluations as they come: the best one, and full-attention perplexity at the target
    rising `rises` evaluations in a row while the training loss falls over the same steps."""

    target: int  # the evaluation length, for messages
    rises: int = 2  # 0: never warn
    hint: str = ""  # what to try, appended to the warning
    history: list[Evaluation] = field(default_factory=list)
    warned_at: int = 0  # the step of the last warning: one line per stretch of rises

    def add(self, step: int, ppl: float, train_loss: float) -> str | None:
        """Record an evaluation; returns the warning line when this one completes a stretch of rises."""
        self.history.append(Evaluation(step, ppl, train_loss))
        if not self.diverging():
            return None
        stretch = self.history[-self.rises - 1:]
        first, last = stretch[0], stretch[-1]
        if self.warned_at >= first.step:
            return None
        self.warned_at = step
        path = " -> ".join(f"{e.ppl:.2f}" for e in stretch)
        return (f"step {step}: full-attention perplexity at {self.target} tokens rose {path} over steps "
                f"{first.step}-{last.step} while the training loss fell {first.train_loss:.3f} -> "
                f"{last.train_loss:.3f}: what the adapter learns does not hold under full attention at this "
                f"length.{self.hint}")

    def diverging(self) -> bool:
        if not self.rises or len(self.history) <= self.rises:
            return False
        stretch = self.history[-self.rises - 1:]
        rising = all(b.ppl > a.ppl for a, b in zip(stretch, stretch[1:]))
        return rising and stretch[-1].train_loss < stretch[0].train_loss

    @property
    def best(self) -> Evaluation | None:
        finite = [e for e in self.history if math.isfinite(e.ppl)]
        return min(finite, key=lambda e: e.ppl) if finite else None

    def state_dict(self) -> dict:
        return {"history": [dataclasses.asdict(e) for e in self.history], "warned_at": self.warned_at}

    def load_state_dict(self, state: dict) -> None:
        self.history = [Evaluation(**e) for e in state.get("history", [])]
        self.warned_at = state.get("warned_at", 0)


def transfer_hint(position: str, attention: str, *, at_inference: bool) -> str:
    """What to try when an S2-trained adapter breaks under full attention."""
    if attention != "s2" or at_inference:
        return ""
    if position == "linear":
        return f" {PI_S2_DOES_NOT_TRANSFER}"
    return " Try attention.name = \"full\", or serve with S2 (attention.at_inference = true)"
