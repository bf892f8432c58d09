"""Registers the data backends: "pretrain", "sft" and "tokens".

Each takes the tokenizer, the run's seed and the [data] fields it uses as keyword arguments
(the harness passes exactly those its signature names) and returns a `DataSplits`.
"""
from harness.data.pretrain import build_pretrain
from harness.data.sft import build_sft
from harness.data.tokens import build_tokens
from harness.registry import register

register("data", "pretrain", description="long documents (.txt/.jsonl/.json/.parquet/hub), truncated or packed")(
    build_pretrain)
register("data", "sft", description="conversations (Vicuna v1.1, ShareGPT, chat messages), loss on replies")(
    build_sft)
register("data", "tokens", description="a LongLoRA-style .bin token file, in max_seq_length chunks")(build_tokens)
