"""Passkey retrieval, as in the Position Interpolation and LongLoRA papers.

A random 5-digit key is hidden at a chosen depth inside filler text, and the model must
complete "The pass key is" with it. The wording is that of LongLoRA's passkey_retrivial.py;
the parts are joined with newlines (empty filler parts are left out):

    There is an important info hidden inside a lot of irrelevant text. Find it and ...
    The grass is green. The sky is blue. ... (a fraction `depth` of the filler)
    The pass key is 12345. Remember it. 12345 is the pass key.
    The grass is green. The sky is blue. ... (the rest of the filler)
    What is the pass key? The pass key is

Filler is counted in sentences (a few tokens each), so a prompt is fitted to within one
sentence of its target token length. The model is reached only through a `generate_fn`
(prompt ids, max new tokens) -> continuation text, so scoring is testable without a model
that can actually retrieve; `greedy_generate` makes the real one, through harness.generation
(what tools/generate.py runs).
"""
from __future__ import annotations

import contextlib
import logging
import random
import re
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

from harness.evaluation.perplexity import EvaluationError, Progress
from harness.generation import Sampling, generate

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.")
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
QUESTION = "What is the pass key? The pass key is"

GenerateFn = Callable[[list[int], int], str]  # (prompt token ids, max new tokens) -> continuation text


def info_line(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def filler_text(sentences: int) -> str:
    """The first `sentences` filler sentences, cycling through FILLER."""
    return " ".join(FILLER[i % len(FILLER)] for i in range(sentences))


def prompt_text(key: str, depth: float, filler_sentences: int) -> str:
    """The prompt with round(depth * filler_sentences) filler sentences before the key."""
    before = round(depth * filler_sentences)
    parts = [TASK, filler_text(before), info_line(key), filler_text(filler_sentences - before), QUESTION]
    return "\n".join(part for part in parts if part)


@dataclass(frozen=True)
class PasskeyPrompt:
    text: str
    input_ids: list[int]  # as the model gets them (with the tokenizer's special tokens)
    key: str
    depth: float
    filler_sentences: int


def build_prompt(tokenizer, length: int, depth: float, key: str, *, guess: int | None = None) -> PasskeyPrompt:
    """The prompt with the most filler whose token count is at most `length`.

    `guess` (a filler sentence count, e.g. that of the previous prompt of this length)
    only speeds the search up.
    """
    def encode(sentences: int) -> list[int]:
        return tokenizer(prompt_text(key, depth, sentences)).input_ids

    bare = len(encode(0))
    if bare > length:
        raise EvaluationError(f"passkey length {length} is shorter than the prompt without filler ({bare} tokens)")
    if guess is None:
        per_sentence = len(tokenizer(filler_text(50), add_special_tokens=False).input_ids) / 50
        guess = int((length - bare) / per_sentence)
    sentences = _largest_fitting(lambda n: len(encode(n)) <= length, guess)
    return PasskeyPrompt(prompt_text(key, depth, sentences), encode(sentences), key, depth, sentences)


def _largest_fitting(fits: Callable[[int], bool], guess: int) -> int:
    """Largest n >= 0 with fits(n), for fits true at 0 and monotone; gallops out from guess."""
    lo, hi = 0, max(guess, 1)
    if fits(hi):  # gallop up until a count no longer fits
        lo, step = hi, 1
        while fits(lo + step):
            lo, step = lo + step, step * 2
        hi = lo + step
    else:  # gallop down until a count fits (0 always does)
        step = 1
        while hi - step > 0 and not fits(hi - step):
            hi, step = hi - step, step * 2
        lo = max(hi - step, 0)
    while hi - lo > 1:  # invariant: fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def passkeys(seed: int, trials: int) -> list[str]:
    """One random 5-digit key per trial; trial t has the same key at every length and depth."""
    rng = random.Random(seed)
    return [str(rng.randint(10000, 99999)) for _ in range(trials)]


def answer_digits(continuation: str) -> str | None:
    """The first run of digits the model produced, if any."""
    match = re.search(r"\d+", continuation)
    return match.group() if match else None


# --------------------------------------------------------------------------- evaluation

@dataclass(frozen=True)
class PasskeyTrial:
    length: int  # target token length
    depth: float
    trial: int
    key: str
    answer: str  # the model's continuation
    correct: bool
    tokens: int  # actual prompt token length


@dataclass(frozen=True)
class PasskeyResult:
    lengths: list[int]
    depths: list[float]
    trials: list[PasskeyTrial]

    def accuracy(self) -> list[list[float]]:
        """Fraction of trials retrieved, [length index][depth index]."""
        return [[self._cell_accuracy(length, depth) for depth in self.depths] for length in self.lengths]

    def _cell_accuracy(self, length: int, depth: float) -> float:
        cell = [t.correct for t in self.trials if t.length == length and t.depth == depth]
        return sum(cell) / len(cell)

    def to_dict(self) -> dict:
        return {"lengths": self.lengths, "depths": self.depths, "accuracy": self.accuracy(),
                "trials": [asdict(t) for t in self.trials]}


def evaluate_passkey(model, tokenizer, lengths: Sequence[int], depths: Sequence[float], trials: int = 5,
                     seed: int = 0, *, generate_fn: GenerateFn | None = None,
                     progress: Progress | None = None) -> PasskeyResult:
    """Passkey accuracy over lengths x depths, `trials` keys per cell.

    The model is called only through `generate_fn` (default: `greedy_generate(model,
    tokenizer)`); `progress(done, total)` counts trials.
    """
    _check_grid(lengths, depths, trials)
    generate = generate_fn or greedy_generate(model, tokenizer)
    keys = passkeys(seed, trials)
    total = len(lengths) * len(depths) * trials
    records: list[PasskeyTrial] = []
    for length in lengths:
        guess = None
        for depth in depths:
            for trial, key in enumerate(keys):
                prompt = build_prompt(tokenizer, length, depth, key, guess=guess)
                guess = prompt.filler_sentences
                answer = generate(prompt.input_ids, _answer_budget(tokenizer, key))
                records.append(PasskeyTrial(length, depth, trial, key, answer, answer_digits(answer) == key,
                                            len(prompt.input_ids)))
                if progress is not None:
                    progress(len(records), total)
    return PasskeyResult(list(lengths), list(depths), records)


def _check_grid(lengths: Sequence[int], depths: Sequence[float], trials: int) -> None:
    if not lengths or any(length <= 0 for length in lengths):
        raise EvaluationError(f"lengths must be positive token counts, got {list(lengths)}")
    if not depths or any(not 0 <= depth <= 1 for depth in depths):
        raise EvaluationError(f"depths must lie in [0, 1], got {list(depths)}")
    if trials <= 0:
        raise EvaluationError(f"trials must be a positive integer, got {trials}")


def _answer_budget(tokenizer, key: str) -> int:
    # The key's own tokens after "is", plus two for a tokenizer that splits the space off.
    return len(tokenizer(f" {key}", add_special_tokens=False).input_ids) + 2


def greedy_generate(model, tokenizer) -> GenerateFn:
    """A GenerateFn decoding greedily through harness.generation.generate, the generate command's path
    (no window check: passkey measures models past their window too)."""

    def generate_text(input_ids: list[int], max_new_tokens: int) -> str:
        with _no_window_reminder():
            return generate(model, tokenizer, input_ids, Sampling(max_new_tokens=max_new_tokens)).text

    return generate_text


@contextlib.contextmanager
def _no_window_reminder():
    """Without transformers' "friendly reminder" that generation passed max_position_embeddings:
    measuring past the window is the point, and tools/passkey.py says which lengths do so."""
    reminder = logging.getLogger("transformers.generation.stopping_criteria")
    level = reminder.level
    reminder.setLevel(logging.ERROR)
    try:
        yield
    finally:
        reminder.setLevel(level)
