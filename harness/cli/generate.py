"""`tools/generate.py --adapter DIR --prompt TEXT`: text from an extended model, streamed; --chat talks.

The model is a base with an adapter or checkpoint directory (its saved recipe names the base
and the rope, so --adapter alone is enough), or a merged directory (--model DIR), loaded by
harness.evaluation.models. A prompt goes through the tokenizer's chat template when it has one
(--no-template: plain text to continue) and must fit the model's extended window. The answer
streams to stdout; the window, the prompt's size and the KV cache's memory go to stderr.
--chat reads user turns from stdin (one a line; EOF or /exit ends) and keeps the history.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from harness.cli.args import Parser, UsageError, nonnegative_float, positive_int, probability, run
from harness.cli.model_args import add_model_arguments, model_specs
from harness.generation import (Chat, GenerationError, Sampling, Window, cache_dtype, check_window, context_window,
                                encode_prompt, format_bytes, generate, kv_shape, new_token_budget)

PROG = "tools/generate.py"
EXIT = "/exit"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = Parser(prog=prog, description="Generate text with an extended model, or chat with it (--chat).")
    add_model_arguments(parser, repeatable=False, model_required=False)  # --adapter alone names the base
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="the prompt text (with --chat: the first turn)")
    prompt.add_argument("--prompt-file", type=Path, help="read the prompt from this UTF-8 text file")
    parser.add_argument("--chat", action="store_true",
                        help=f"talk: user turns from stdin, one a line, history kept (EOF or {EXIT} ends)")
    parser.add_argument("--system", help="system message (needs a chat template, or --chat)")
    parser.add_argument("--no-template", action="store_true",
                        help="ignore the tokenizer's chat template: the prompt is plain text to continue")
    parser.add_argument("--max-new-tokens", type=positive_int, default=256,
                        help="most tokens to generate per answer (default: 256; fewer where the window ends)")
    parser.add_argument("--temperature", type=nonnegative_float, default=0.0,
                        help="0: greedy decoding (default); > 0: sample at this temperature")
    parser.add_argument("--top-p", type=probability, default=1.0,
                        help="sampling: keep the smallest set of tokens with this much probability (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling (default: 0)")
    return parser


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    parser = build_parser(prog)
    return run(parser, argv, lambda args: _generate(args, parser.prog))


def _generate(args: argparse.Namespace, prog: str) -> None:
    import torch

    prompt, sampling = _prompt_text(args), _sampling(args)
    if prompt is None and not args.chat:
        raise UsageError("no prompt: give --prompt TEXT or --prompt-file FILE, or --chat to talk")
    if not args.model and not args.adapter:
        raise UsageError("no model: give --adapter DIR (a checkpoint or final/ directory) or --model M (a merged "
                         "directory, hub id or .gguf file)")
    [spec] = model_specs(args, [args.model or ""], [args.adapter or "none"], None, [args.rope_factor or 0.0],
                         [args.position])
    from harness.evaluation.models import load_model  # torch and transformers: only once the input is checked

    model, tokenizer, label = load_model(spec)
    window = context_window(model.config)
    _say(f"{label}: window {window.describe()}; {_full_window_cache(model, window)}")
    torch.manual_seed(args.seed)
    if args.chat:
        _chat(model, Chat(tokenizer, template=not args.no_template, system=args.system), sampling, prompt, prog)
    else:
        _one_prompt(model, tokenizer, prompt, sampling, window, template=not args.no_template, system=args.system)


def _prompt_text(args: argparse.Namespace) -> str | None:
    if args.prompt_file is None:
        return args.prompt
    try:
        return args.prompt_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"--prompt-file {args.prompt_file}: cannot read it ({type(error).__name__}: "
                         f"{getattr(error, 'strerror', None) or error})") from None


def _sampling(args: argparse.Namespace) -> Sampling:
    if args.top_p != 1.0 and args.temperature == 0:
        raise UsageError(f"--top-p {args.top_p:g} samples, but --temperature 0 decodes greedily: give "
                         f"--temperature > 0 too (e.g. 0.7)")
    return Sampling(args.max_new_tokens, args.temperature, args.top_p)


def _one_prompt(model, tokenizer, prompt: str, sampling: Sampling, window: Window, *, template: bool,
                system: str | None) -> None:
    ids = encode_prompt(tokenizer, prompt, template=template, system=system)
    check_window(window, len(ids))
    budget = new_token_budget(window, len(ids), sampling.max_new_tokens)
    if budget < sampling.max_new_tokens:
        _say(f"note: --max-new-tokens {sampling.max_new_tokens} capped to {budget}: the window ends there")
    result = generate(model, tokenizer, ids, replace(sampling, max_new_tokens=budget), on_text=_show)
    print(flush=True)
    _report(model, result)


def _chat(model, chat: Chat, sampling: Sampling, first: str | None, prog: str) -> None:
    if first is not None:
        print(f"> {first}", flush=True)
    user = first if first is not None else _read_turn()
    while user is not None:
        if user.strip():
            _chat_turn(model, chat, user, sampling, prog)
        user = _read_turn()


def _chat_turn(model, chat: Chat, user: str, sampling: Sampling, prog: str) -> None:
    dropped = chat.dropped_turns
    try:
        result = chat.ask(model, user, sampling, on_text=_show)
    except GenerationError as error:  # one refused turn; the conversation goes on
        print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
        return
    print(flush=True)
    if chat.dropped_turns > dropped:
        _say(f"note: dropped the oldest {chat.dropped_turns - dropped} turn(s) of the history to fit the window")
    _report(model, result)


def _read_turn() -> str | None:
    """The next user line, or None at EOF (Ctrl-D), Ctrl-C or /exit."""
    try:
        line = input("> ")
    except (EOFError, KeyboardInterrupt):
        print(flush=True)  # the shell's prompt on a line of its own
        return None
    return None if line.strip() == EXIT else line


def _show(text: str) -> None:
    print(text, end="", flush=True)


def _report(model, result) -> None:
    shape, dtype_bytes = kv_shape(model.config), cache_dtype(model).itemsize
    computed = shape.bytes(result.cache_tokens, dtype_bytes)
    _say(f"prompt {result.prompt_tokens:,} tokens + {len(result.token_ids):,} new; KV cache "
         f"{format_bytes(result.cache_bytes)} measured, {format_bytes(computed)} computed "
         f"({shape.formula(result.cache_tokens, dtype_bytes)})")


def _full_window_cache(model, window: Window) -> str:
    shape, dtype_bytes = kv_shape(model.config), cache_dtype(model).itemsize
    return (f"KV cache at the full window {format_bytes(shape.bytes(window.tokens, dtype_bytes))} "
            f"({shape.formula(window.tokens, dtype_bytes)})")


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
