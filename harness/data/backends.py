"""Registers the data backends: "pretrain", "sft" and "tokens", and their recipe check.

Each takes the tokenizer, the run's seed and the [data] fields it uses as keyword arguments
(the harness passes exactly those its signature names) and returns a `DataSplits`. The names
data.mode and data.format may take are their backends' (harness.data.pretrain.MODES,
harness.data.sft.FORMATS), checked at recipe load by `check_choices`.
"""
from harness.data.pretrain import MODES, build_pretrain
from harness.data.sft import FORMATS, build_sft
from harness.data.tokens import build_tokens
from harness.recipe_checks import check_choice
from harness.registry import register, register_validator

register("data", "pretrain", description="long documents (.txt/.jsonl/.json/.parquet/hub), truncated or packed")(
    build_pretrain)
register("data", "sft", description="conversations (Vicuna v1.1, ShareGPT, chat messages), loss on replies")(
    build_sft)
register("data", "tokens", description="a LongLoRA-style .bin token file, in max_seq_length chunks")(build_tokens)


@register_validator
def check_choices(recipe) -> None:
    """data.mode among the pretrain backend's modes, data.format among the sft backend's formats, at load
    (whichever data backend the recipe names), with the closest name as a suggestion."""
    where = f"{recipe.source}: " if recipe.source else ""
    check_choice(where, "data.mode", recipe.data.mode, MODES)
    check_choice(where, "data.format", recipe.data.format, FORMATS)
