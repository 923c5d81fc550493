"""Independent references for ``bigbatch train --model PATH``: data and full-batch training written
with transformers and torch only (nothing of bigbatch but the sample order, which is not what is
checked: it decides which records form a step, not how the step is computed).

Tokenization is redone here from the records' fields (a prompt and its completion tokenized apart;
a chat as its rendered segments, each tokenized apart), labels are built here, the loss is the
model's own mean loss (``labels=``, which shifts them) over the whole global batch in ONE forward,
and the optimizer, clipping and step are torch's.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import random
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from bigbatch.app.data import global_batches

ROOT = Path(__file__).resolve().parents[2]
WORDS = ("the of and to in is was for that with as on by at from it an be this are or which "
         "def return class import self value list dict name None True False").split()


def tiny_model(arch: str, out: Path, **kw) -> Path:
    """``examples/make_tiny_model.py``'s folder (the documented way to make one)."""
    spec = importlib.util.spec_from_file_location("make_tiny_model",
                                                  ROOT / "examples" / "make_tiny_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_tiny_model"] = module
    spec.loader.exec_module(module)
    return module.make(arch, out, **kw)


def instruct_records(n: int, seed: int) -> list[dict]:
    """Prompts of 1–40 words and completions of 1–30: very uneven numbers of trained tokens."""
    rng = random.Random(seed)
    words = lambda a, b: " ".join(rng.choice(WORDS) for _ in range(rng.randint(a, b)))  # noqa: E731
    return [{"prompt": f"Q: {words(1, 40)}\nA:", "completion": " " + words(1, 30)}
            for _ in range(n)]


def chat_records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    words = lambda a, b: " ".join(rng.choice(WORDS) for _ in range(rng.randint(a, b)))  # noqa: E731
    out = []
    for i in range(n):
        messages = [{"role": "user", "content": words(1, 25)},
                    {"role": "assistant", "content": words(1, 20)}]
        if i % 3 == 0:
            messages += [{"role": "user", "content": words(1, 5)},
                         {"role": "assistant", "content": words(1, 8)}]
        out.append({"messages": messages})
    return out


def write_jsonl(path: Path, records: Sequence[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def tokenize(tok, record: dict) -> tuple[list[int], list[int]]:
    """``(input ids, labels)``: labels are the ids where trained, else -100 (unshifted: position
    t's label is token t, predicted from position t − 1)."""
    if "messages" in record:  # make_tiny_model.py's template (rendered with trim_blocks: no
        # newline between turns), segment by segment
        ids, labels = [], []
        for m in record["messages"]:
            head = tok(f"<|{m['role']}|>\n", add_special_tokens=False)["input_ids"]
            ids += head
            labels += [-100] * len(head)
            if m["role"] == "assistant":
                body = tok(m["content"] + "<|end|>", add_special_tokens=False)["input_ids"]
                ids += body
                labels += body
            else:
                body = tok(m["content"], add_special_tokens=False)["input_ids"]
                ids += body
                labels += [-100] * len(body)
        whole = tok(tok.apply_chat_template(record["messages"], tokenize=False),
                    add_special_tokens=False)["input_ids"]
        assert whole == ids, "segment-wise tokenization differs from the whole chat's"
        return ids, labels
    head = tok(record["prompt"])["input_ids"]
    tail = tok(record["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return head + tail, [-100] * len(head) + tail


def pad(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(i) for i, _ in rows)
    ids = torch.tensor([i + [pad_id] * (width - len(i)) for i, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in rows])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def mean_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean next-token cross-entropy over trained labels, shifted here. (Not the model's own
    ``labels=`` loss: transformers computes that in float32, which a float64 check cannot use.)"""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             batch["labels"][:, 1:].reshape(-1),
                                             ignore_index=-100)


def adamw(model: torch.nn.Module, lr: float, weight_decay: float = 0.1) -> torch.optim.Optimizer:
    """AdamW as ``bigbatch train`` sets it up: decay on matrices only, betas (0.9, 0.95)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [g for g in ({"params": [p for p in params if p.dim() >= 2],
                           "weight_decay": weight_decay},
                          {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0})
              if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def train_reference(model: torch.nn.Module, tok, records: Sequence[dict], *, global_batch: int,
                    steps: int, lr: float, clip: float, micro: int | None = None,
                    seed: int = 0) -> torch.nn.Module:
    """Train a copy of ``model`` for ``steps`` steps on ``records`` in ``bigbatch train``'s sample
    order: the full batch in one forward with the model's mean loss (``micro=None``), or the naive
    recipe — each micro-batch's own mean loss divided by K — as the negative twin."""
    model = copy.deepcopy(model).train()
    opt = adamw(model, lr)
    rows = [tokenize(tok, r) for r in records]
    order = global_batches(len(rows), global_batch, seed)
    for _ in range(steps):
        chosen = [rows[i] for i in next(order).tolist()]
        opt.zero_grad(set_to_none=True)
        parts = [chosen] if micro is None else [chosen[a:a + micro]
                                               for a in range(0, len(chosen), micro)]
        for part in parts:
            (mean_loss(model, pad(part, tok.pad_token_id)) / len(parts)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return model


def distance(trained: dict[str, torch.Tensor], reference: torch.nn.Module,
             start: torch.nn.Module) -> float:
    """‖θ − θ_ref‖ / ‖θ_ref − θ_0‖ over the tensors ``trained`` holds (L2, float64)."""
    ref = reference.state_dict()  # tied weights under each of their names
    ref0 = start.state_dict()
    num = den = 0.0
    for name, value in trained.items():
        key = _match(name, ref)
        num += float((value.double() - ref[key].detach().double()).pow(2).sum())
        den += float((ref[key].detach().double() - ref0[key].detach().double()).pow(2).sum())
    return (num / den) ** 0.5


def _match(name: str, ref: dict[str, torch.Tensor]) -> str:
    if name in ref:
        return name
    bare = {k.replace(".default.", "."): k for k in ref}  # peft's files drop the adapter's name
    hits = [k for b, k in bare.items() if b.endswith(name) or name.endswith(b)]
    assert len(hits) == 1, (name, hits[:3])
    return hits[0]
