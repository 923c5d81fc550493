"""Text to token ids for the command's data: bytes for the built-in GPT, or a model's tokenizer.

A :class:`Tokenizer` turns a record into ``(ids, trained)``: the token ids of the whole sequence
and, per token, whether predicting it carries loss. Plain text trains every token; a prompt and
its completion train the completion only; a chat trains the assistant turns only. The loss's
count is then the number of trained tokens, so a sample with a long prompt and a short answer
weighs as little as its answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .corpus import DataError

__all__ = ["ByteTokenizer", "HFTokenizer", "Tokenizer"]


class Tokenizer:
    """What the data pipeline needs from a tokenizer."""

    vocab_size: int
    pad_id: int = 0
    eos_id: int | None = None

    def encode(self, text: str, *, first: bool = True) -> list[int]:
        """Token ids of ``text``; ``first``: it starts a sequence (special tokens such as BOS)."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def text(self, text: str) -> tuple[list[int], list[bool]]:
        """A plain text: every token trained (and the end-of-sequence token, if there is one)."""
        ids = self.encode(text) + ([self.eos_id] if self.eos_id is not None else [])
        return ids, [True] * len(ids)

    def prompt_completion(self, prompt: str, completion: str) -> tuple[list[int], list[bool]]:
        """A prompt and its completion, tokenized apart (no merge across the boundary); only the
        completion (and the end-of-sequence token) is trained."""
        head = self.encode(prompt)
        tail = self.encode(completion, first=False) + (
            [self.eos_id] if self.eos_id is not None else [])
        return head + tail, [False] * len(head) + [True] * len(tail)

    def chat(self, messages: list[dict[str, Any]]) -> tuple[list[int], list[bool]]:
        raise DataError("this model's tokenizer has no chat template, so 'messages' records "
                        "cannot be rendered; give prompt/completion records, or a --model whose "
                        "tokenizer has a chat template")


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as token ids (0–255): the built-in GPT's. No special tokens."""

    vocab_size = 256

    def encode(self, text: str, *, first: bool = True) -> list[int]:
        return list(text.encode("utf-8", errors="replace"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer (``AutoTokenizer`` of the model folder).

    Chat: the messages are rendered with the tokenizer's chat template; the assistant turns are
    found as the text each adds (rendering ``messages[:i]`` with the generation prompt, then
    ``messages[:i+1]``), and a token is trained when its characters lie in one of them.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.vocab_size = len(tokenizer)
        self.eos_id = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

    def encode(self, text: str, *, first: bool = True) -> list[int]:
        return list(self.tok(text, add_special_tokens=first)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def chat(self, messages: list[dict[str, Any]]) -> tuple[list[int], list[bool]]:
        if not getattr(self.tok, "chat_template", None):
            super().chat(messages)
        render = self.tok.apply_chat_template
        full = render(messages, tokenize=False)
        spans = []
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            before = render(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
            upto = render(messages[:i + 1], tokenize=False)
            if not (full.startswith(upto) and upto.startswith(before)):
                raise DataError("the tokenizer's chat template renders a conversation's turns "
                                "differently alone than together, so the assistant tokens cannot "
                                "be found; give prompt/completion records instead")
            spans.append((len(before), len(upto)))
        if not self.tok.is_fast:
            raise DataError("chat records need a fast tokenizer (with character offsets); save "
                            "the model folder with a tokenizer.json")
        enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        trained = [any(a <= s and e <= b for a, b in spans) and e > s
                   for s, e in enc["offset_mapping"]]
        return ids, trained
