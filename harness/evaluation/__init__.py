"""Evaluation: long-context perplexity, passkey retrieval, and their reports.

    from harness.evaluation import evaluate_perplexity, evaluate_passkey
    result = evaluate_perplexity(model, token_ids, 8192, protocol="longlora")
    result.ppl, result.nll_sum, result.tokens

The command lines are tools/eval_ppl.py and tools/passkey.py (harness.evaluation.cli).
"""
from harness.evaluation.passkey import PasskeyPrompt, PasskeyResult, PasskeyTrial, build_prompt, evaluate_passkey
from harness.evaluation.perplexity import (
    PROTOCOLS,
    EvaluationError,
    PerplexityResult,
    Window,
    evaluate_perplexity,
    longlora_perplexity,
    longlora_windows,
    strided_perplexity,
    strided_windows,
)
from harness.evaluation.report import PplRecord

__all__ = [
    "PROTOCOLS", "EvaluationError", "PasskeyPrompt", "PasskeyResult", "PasskeyTrial", "PerplexityResult",
    "PplRecord", "Window", "build_prompt", "evaluate_passkey", "evaluate_perplexity", "longlora_perplexity",
    "longlora_windows", "strided_perplexity", "strided_windows",
]
