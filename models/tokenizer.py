"""Word-level tokenizer for the tiny models trained on the procedural dataset (engine.synthetic).

open_clip's BPE tokenizer has 49408 tokens; an embedding table that size would dominate the tiny text towers, so
the tiny configs use a 64-token vocabulary of the words the procedural captions and prompts are made of.
The end-of-text token has the largest id because open_clip's text tower pools at ``argmax(token id)``.
"""
from __future__ import annotations

import re
from typing import Any, Sequence, Union

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

# Names of the special tokens in the Hugging Face form. Each ends in a newline, which open_clip's text cleaning
# (whitespace collapsed to single spaces) never leaves in a text, so no caption can spell a special token.
HF_SPECIAL_TOKENS = {PAD: "<pad>\n", UNK: "<unk>\n", SOT: "<start_of_text>\n", EOT: "<end_of_text>\n"}


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

    def hugging_face_files(self) -> dict[str, dict[str, Any]]:
        """``{"tokenizer.json": ..., "tokenizer_config.json": ...}``: this tokenizer as a Hugging Face fast tokenizer.

        A folder holding these files loads with ``transformers.AutoTokenizer.from_pretrained(folder)``, which is
        what open_clip's ``HFTokenizer`` does for a ``local-dir:`` model whose ``text_cfg`` names an
        ``hf_tokenizer_name``. Called as open_clip calls it (``max_length=context_length``, padding to it,
        truncation), it gives the ids of ``__call__``: lower case, the ``[a-z]+`` runs as words (every other
        character separates words and is dropped), unknown words as <unk>, <sot> and <eot> around the words, the
        words truncated so that <eot> is kept, <pad> (id 0) after it. open_clip cleans a text before tokenizing it
        (``ftfy.fix_text``, HTML entities decoded): a text that this changes, with ``&amp;`` or full-width letters
        say, can give other ids than ``__call__``; the procedural captions and prompts are not changed by it.
        """
        pad, unk, sot, eot = (HF_SPECIAL_TOKENS[i] for i in (PAD, UNK, SOT, EOT))
        vocab = {pad: PAD, unk: UNK, **self.vocab, sot: SOT, eot: EOT}

        def special(content: str) -> dict[str, Any]:
            return {"id": vocab[content], "content": content, "single_word": False, "lstrip": False,
                    "rstrip": False, "normalized": False, "special": True}

        def template(*sequences: str) -> list[dict]:
            return ([{"SpecialToken": {"id": sot, "type_id": 0}}]
                    + [{"Sequence": {"id": seq, "type_id": 0}} for seq in sequences]
                    + [{"SpecialToken": {"id": eot, "type_id": 0}}])

        tokenizer = {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": [special(token) for token in (pad, unk, sot, eot)],
            "normalizer": {"type": "Lowercase"},
            # split at every run of characters outside a-z and drop those runs: the words of ``words()``
            "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[^a-z]+"}, "behavior": "Removed",
                              "invert": False},
            "post_processor": {
                "type": "TemplateProcessing",
                "single": template("A"),
                "pair": template("A", "B"),
                "special_tokens": {token: {"id": token, "ids": [vocab[token]], "tokens": [token]}
                                   for token in (sot, eot)},
            },
            "decoder": None,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": unk},
        }
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": self.context_length,
            "pad_token": pad,
            "unk_token": unk,
            "bos_token": sot,
            "eos_token": eot,
            "padding_side": "right",
            "truncation_side": "right",
            "clean_up_tokenization_spaces": False,
        }
        return {"tokenizer.json": tokenizer, "tokenizer_config.json": config}
