"""Word-level tokenizer for the tiny models trained on the procedural dataset (engine.synthetic).

open_clip's BPE tokenizer has 49408 tokens; an embedding table that size would dominate the tiny text towers, so
the tiny configs use a 64-token vocabulary of the words the procedural captions and prompts are made of.
The end-of-text token has the largest id because open_clip's text tower pools at ``argmax(token id)``.
"""
from __future__ import annotations

import re
from typing import Sequence, Union

import torch

# The procedural world's words (engine.synthetic draws every caption and prompt from these).
WORDS = (
    "a an the of on in at with and is photo image picture drawing rendering background "
    "small large tiny big "
    "red green blue yellow purple orange "
    "black white gray brown "
    "circle square triangle cross ring diamond "
    "top bottom left right center middle corner shape"
).split()

PAD, UNK = 0, 1
VOCAB_SIZE = 64
SOT, EOT = VOCAB_SIZE - 2, VOCAB_SIZE - 1  # EOT largest: open_clip pools text features at argmax(token id)
_FIRST_WORD_ID = 2
assert _FIRST_WORD_ID + len(WORDS) <= SOT, "vocabulary does not fit in VOCAB_SIZE"


class WordTokenizer:
    """``tokenizer(texts) -> LongTensor (len(texts), context_length)`` like open_clip's tokenizers."""

    def __init__(self, context_length: int = 16):
        if context_length < 3:
            raise ValueError(f"context_length: need room for <sot>, one word and <eot>, got {context_length}")
        self.context_length = context_length
        self.vocab = {word: _FIRST_WORD_ID + i for i, word in enumerate(WORDS)}

    def words(self, text: str) -> list[str]:
        return re.findall(r"[a-z]+", text.lower())

    def encode(self, text: str) -> list[int]:
        return [self.vocab.get(word, UNK) for word in self.words(text)]

    def __call__(self, texts: Union[str, Sequence[str]], context_length: int | None = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        out = torch.full((len(texts), length), PAD, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [SOT] + self.encode(text)[: length - 2] + [EOT]  # truncate words, always keep <eot>
            out[row, : len(ids)] = torch.tensor(ids)
        return out
