"""Make a tiny Hugging Face causal-LM folder offline: a tokenizer trained on the standard library's
source, and a randomly initialized GPT-2 or Llama model of a few hundred thousand parameters.

    python examples/make_tiny_model.py --arch llama /tmp/tiny-llama
    bigbatch train --model /tmp/tiny-llama --data my.jsonl --seq-len 128

No pretrained causal LM can be downloaded on the machines this project is built on, so this is how
its tests and docs get a real model folder — config.json, model.safetensors, tokenizer.json and a
chat template — to load through transformers' Auto classes exactly as a downloaded one would be.
The tokenizer is a byte-level BPE (``tokenizers``) trained on a few hundred of the standard
library's ``.py`` files; the chat template marks turns with ``<|user|>`` / ``<|assistant|>``.
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% if m['role'] == "
    "'assistant' %}<|end|>{% endif %}\n{% endfor %}{% if add_generation_prompt %}"
    "<|assistant|>\n{% endif %}")
SPECIAL = ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]


def train_tokenizer(vocab: int, files: int = 300):
    """A byte-level BPE trained on ``files`` standard-library sources, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(encoding="utf-8", errors="replace")
             for p in sorted(root.glob("*.py"))[:files]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=SPECIAL, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>",
                                   eos_token="<|end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make(arch: str, out: Path, *, vocab: int = 512, layers: int = 2, width: int = 64,
         heads: int = 4, positions: int = 256, seed: int = 0) -> Path:
    """Write the folder (refusing one that exists) and return it."""
    import torch
    import transformers

    if out.exists():
        raise SystemExit(f"make_tiny_model: {out} exists; give a new folder")
    tok = train_tokenizer(vocab)
    common = {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id,
              "eos_token_id": tok.eos_token_id, "bos_token_id": tok.eos_token_id}
    if arch == "gpt2":
        config = transformers.GPT2Config(n_layer=layers, n_embd=width, n_head=heads,
                                         n_positions=positions, resid_pdrop=0.0, embd_pdrop=0.0,
                                         attn_pdrop=0.0, **common)
        model_cls = transformers.GPT2LMHeadModel
    else:
        config = transformers.LlamaConfig(num_hidden_layers=layers, hidden_size=width,
                                          num_attention_heads=heads, num_key_value_heads=heads,
                                          intermediate_size=2 * width,
                                          max_position_embeddings=positions, **common)
        model_cls = transformers.LlamaForCausalLM
    torch.manual_seed(seed)
    model = model_cls(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the folder to write (must not exist)")
    parser.add_argument("--arch", choices=("gpt2", "llama"), default="gpt2")
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--positions", type=int, default=256)
    args = parser.parse_args(argv)
    path = make(args.arch, args.out, vocab=args.vocab, layers=args.layers, width=args.width,
                positions=args.positions)
    print(f"wrote {path} ({args.arch}, vocabulary {args.vocab}, {args.layers} layers of "
          f"width {args.width}, {args.positions} positions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
