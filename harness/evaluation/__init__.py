"""Evaluation: long-context perplexity, passkey retrieval, and their reports.

    from harness.evaluation import evaluate_perplexity, evaluate_passkey
    result = evaluate_perplexity(model, token_ids, 8192, protocol="longlora")
    result.ppl, result.nll_sum, result.tokens

    from harness.evaluation import ModelSpec, PplSettings, compare_models
    records = compare_models([ModelSpec(base), ModelSpec(base, adapter="runs/x/final")], "held_out.txt",
                             PplSettings(seq_lens=[4096, 8192]))

The command lines are tools/eval_ppl.py and tools/passkey.py (harness.cli.eval_ppl, harness.cli.passkey).
"""
from harness.evaluation.compare import PplSettings, compare_models
from harness.evaluation.models import ModelSpec, load_model
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
from harness.evaluation.report import PplRecord, report_ppl

__all__ = [
    "PROTOCOLS", "EvaluationError", "ModelSpec", "PasskeyPrompt", "PasskeyResult", "PasskeyTrial",
    "PerplexityResult", "PplRecord", "PplSettings", "Window", "build_prompt", "compare_models", "evaluate_passkey",
    "evaluate_perplexity", "load_model", "longlora_perplexity", "longlora_windows", "report_ppl",
    "strided_perplexity", "strided_windows",
]
