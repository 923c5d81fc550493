"""Records of a JSONL file (or a folder of them), checked and tokenized for a task.

One JSON object per line. Which fields a line needs depends on the task:

==============  ==========================================  =====================================
task            fields                                      trained (the loss's count)
==============  ==========================================  =====================================
``causal-lm``   ``text``                                    every token (the text is windowed)
``causal-lm``   ``prompt`` + ``completion``                 the completion's tokens only
``causal-lm``   ``messages`` (``role``/``content`` list)    the assistant turns' tokens only
``classify``    ``text`` + ``label`` (an int or a string)   one item per sample
``contrastive`` ``query`` + ``document``                    one item per pair
==============  ==========================================  =====================================

A line that does not fit — a missing or non-string field, an empty response, a sample longer than
``--seq-len`` — is a *bad sample*: with ``--on-bad-sample skip`` it is left out and counted (the
count by reason, and the first such line, are reported); with ``stop`` the run refuses to start,
naming the line. Nothing is dropped silently.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .corpus import DataError, jsonl_records
from .samples import LabeledSamples, PairSamples, SupervisedSamples
from .tokenize import Tokenizer

__all__ = ["BadSamples", "Record", "build_samples", "is_structured", "load_records"]

Record = tuple[str, Any]  # (file:line, the line's JSON value)
_HINT = "give a .jsonl file (or a folder of them) with one JSON object per line"


def load_records(path: str | os.PathLike[str]) -> list[Record]:
    """Every line of a ``.jsonl`` file, or of the ``.jsonl`` files in a folder (recursively,
    hidden ones skipped, in name order), named ``file:LINE``.

    Raises:
        DataError: no such path, not JSONL, a line that is not JSON, or no records at all.
    """
    root = Path(path)
    if root.is_dir():
        files = sorted(p for p in root.rglob("*.jsonl") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(root).parts))
        names = [(p, p.relative_to(root).as_posix()) for p in files]
    elif root.is_file() and root.suffix.lower() == ".jsonl":
        names = [(root, root.name)]
    elif root.exists():
        raise DataError(f"--data {root}: records need a .jsonl file; {_HINT}")
    else:
        raise DataError(f"--data {root}: no such file or folder; {_HINT}")
    records = [r for file, name in names for r in jsonl_records(file, name)]
    if not records:
        raise DataError(f"--data {root}: holds no records; {_HINT}")
    return records


def is_structured(records: list[Record]) -> bool:
    """Whether causal-LM records are prompt/completion or chat (else plain ``text``)."""
    return any(isinstance(r, dict) and ("messages" in r or "prompt" in r or "completion" in r)
               for _, r in records)


@dataclass
class BadSamples:
    """Records left out, by reason, and the first of each."""

    reasons: Counter[str] = field(default_factory=Counter)
    first: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, reason: str, policy: str) -> None:
        if policy == "stop":
            raise DataError(f"{name}: {reason}; fix the line, or leave such lines out with "
                            "--on-bad-sample skip")
        self.reasons[reason] += 1
        self.first.setdefault(reason, name)

    def report(self, total: int, what: str) -> str:
        """One line for the log ('' when nothing was left out)."""
        if not self.reasons:
            return ""
        parts = ", ".join(f"{n} {reason} (first: {self.first[reason]})"
                          for reason, n in self.reasons.most_common())
        return (f"{what}: left out {sum(self.reasons.values())} of {total} records "
                f"(--on-bad-sample skip): {parts}")


def _text(record: Any, key: str) -> str | None:
    value = record.get(key) if isinstance(record, dict) else None
    return value if isinstance(value, str) else None


def _causal(record: Any, tok: Tokenizer) -> tuple[list[int], list[bool]] | str:
    if isinstance(record, dict) and "messages" in record:
        messages = record["messages"]
        if not (isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in messages)):
            return "'messages' that is not a list of {role, content} strings"
        if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
            return "no assistant message to train on"
        return tok.chat(messages)
    if isinstance(record, dict) and ("prompt" in record or "completion" in record):
        prompt, completion = _text(record, "prompt"), _text(record, "completion")
        if prompt is None or completion is None:
            return "a 'prompt' without a 'completion' string (or the reverse)"
        if not completion.strip():
            return "an empty completion"
        return tok.prompt_completion(prompt, completion)
    text = _text(record, "text")
    if text is None:
        return "no 'text', 'prompt'/'completion' or 'messages' field"
    if not text.strip():
        return "an empty text"
    return tok.text(text)


def build_samples(records: list[Record], task: str, tok: Tokenizer, seq_len: int, *,
                  policy: str, labels: dict[str, int] | None = None,
                  ) -> tuple[SupervisedSamples | LabeledSamples | PairSamples, BadSamples]:
    """Tokenize ``records`` for ``task`` (``causal-lm`` with prompts or chats, ``classify``,
    ``contrastive``); bad samples skipped or refused as ``policy`` says.

    ``labels``: classify's label → class index (built from the training records, sorted, and
    passed again for the validation ones).

    Raises:
        DataError: a bad sample with ``policy="stop"``, or no sample left.
    """
    bad = BadSamples()
    too_long = f"longer than --seq-len {seq_len} tokens"
    if task == "causal-lm":
        tokens, flags = [], []
        for name, record in records:
            got = _causal(record, tok)
            if isinstance(got, str):
                bad.add(name, got, policy)
            elif len(got[0]) - 1 > seq_len:
                bad.add(name, too_long, policy)
            elif not any(got[1][1:]):
                bad.add(name, "no token to train on", policy)
            else:
                tokens.append(got[0])
                flags.append(got[1])
        samples: Any = SupervisedSamples(tokens, flags, tok.pad_id)
    elif task == "classify":
        assert labels is not None
        seqs, classes = [], []
        for name, record in records:
            text = _text(record, "text")
            label = record.get("label") if isinstance(record, dict) else None
            if text is None or isinstance(label, bool) or not isinstance(label, (int, str)):
                bad.add(name, "no 'text' string and 'label' (int or string)", policy)
            elif str(label) not in labels:
                bad.add(name, f"label {label!r} not among the training labels", policy)
            elif len(ids := tok.encode(text)) > seq_len:
                bad.add(name, too_long, policy)
            else:
                seqs.append(ids)
                classes.append(labels[str(label)])
        samples = LabeledSamples(seqs, classes, tok.pad_id)
    else:
        queries, docs = [], []
        for name, record in records:
            q, d = _text(record, "query"), _text(record, "document")
            if q is None or d is None or not q.strip() or not d.strip():
                bad.add(name, "no non-empty 'query' and 'document' strings", policy)
                continue
            qi, di = tok.encode(q), tok.encode(d)
            if max(len(qi), len(di)) > seq_len:
                bad.add(name, too_long, policy)
            else:
                queries.append(qi)
                docs.append(di)
        samples = PairSamples(queries, docs, tok.pad_id)
    if not len(samples):
        raise DataError(f"no usable record for --task {task} ({bad.report(len(records), 'data')}"
                        f"); see docs/data.md for the fields each task needs")
    return samples, bad


def class_labels(records: list[Record]) -> dict[str, int]:
    """classify's classes: the training records' labels, sorted (ints numerically), as indices."""
    seen = {r["label"] for _, r in records if isinstance(r, dict)
            and isinstance(r.get("label"), (int, str)) and not isinstance(r.get("label"), bool)}
    ordered = sorted(seen, key=lambda v: (isinstance(v, str), v))
    return {str(v): i for i, v in enumerate(ordered)}
