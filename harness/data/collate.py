"""Batch samples: pad on the right to the longest sample of the batch.

Padding has pad_token_id as input, label -100 (no loss) and attention_mask 0. Its
position_ids continue counting from the sample's last position, so the padding never looks
like the start of a new document: a batch of packed rows can be given to the model with
position_ids and *no* attention_mask (transformers then keeps the attention inside each
document, see harness.data.pretrain), while a padded batch of single documents uses the
attention_mask.
"""
from __future__ import annotations

import torch


class Collator:
    """collator(list of sample dicts) -> dict of LongTensors (batch, longest sample)."""

    def __init__(self, pad_token_id: int):
        if pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; give it one (harness.tokenizer.load_tokenizer does)")
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(item["input_ids"]) for item in items)
        shape = (len(items), length)
        batch = {
            "input_ids": torch.full(shape, self.pad_token_id, dtype=torch.long),
            "labels": torch.full(shape, -100, dtype=torch.long),
            "attention_mask": torch.zeros(shape, dtype=torch.long),
            "position_ids": torch.zeros(shape, dtype=torch.long),
        }
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            batch["input_ids"][row, :n] = torch.as_tensor(item["input_ids"])
            batch["labels"][row, :n] = torch.as_tensor(item["labels"])
            batch["attention_mask"][row, :n] = 1
            positions = torch.as_tensor(item["position_ids"])
            batch["position_ids"][row, :n] = positions
            batch["position_ids"][row, n:] = torch.arange(1, length - n + 1) + positions[-1]
        return batch
