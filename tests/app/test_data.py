"""Data: loading, the stdlib corpus, the split, token windows and the batch order."""

from __future__ import annotations

import itertools
import json
from pathlib import Path, PurePosixPath

import pytest
import torch

from bigbatch.app.data import (
    DataError,
    TokenWindows,
    eval_batches,
    global_batches,
    load_documents,
    split_documents,
    stdlib_root,
    vary_lengths,
)
from bigbatch.errors import BigBatchError

# --- loading user data ------------------------------------------------------------------------


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    return path


def test_data_error_is_a_value_error() -> None:
    assert issubclass(DataError, ValueError)
    assert issubclass(DataError, BigBatchError)


def test_single_text_file_is_one_document(tmp_path: Path) -> None:
    path = write(tmp_path / "notes.bin", "héllo\nworld")
    assert load_documents(path) == [("notes.bin", "héllo\nworld".encode())]
    assert load_documents(str(path)) == load_documents(path)


def test_folder_is_recursive_sorted_and_filtered(tmp_path: Path) -> None:
    write(tmp_path / "b.txt", "B")
    write(tmp_path / "a.md", "A")
    write(tmp_path / "sub" / "deeper" / "c.py", "C")
    write(tmp_path / "sub" / "a.rst", "R")
    write(tmp_path / "z.text", "Z")
    write(tmp_path / "UPPER.TXT", "U")
    write(tmp_path / "data.jsonl", '{"text": "j1"}\n\n{"text": "j2"}\n')
    write(tmp_path / "image.png", b"\x89PNG")
    write(tmp_path / "table.csv", "x,y")
    write(tmp_path / ".hidden.txt", "H")
    write(tmp_path / ".git" / "notes.txt", "G")
    write(tmp_path / "empty.txt", "")
    docs = load_documents(tmp_path)
    assert docs == [
        ("UPPER.TXT", b"U"),
        ("a.md", b"A"),
        ("b.txt", b"B"),
        ("data.jsonl:1", b"j1"),
        ("data.jsonl:3", b"j2"),
        ("sub/a.rst", b"R"),
        ("sub/deeper/c.py", b"C"),
        ("z.text", b"Z"),
    ]


def test_folder_names_do_not_depend_on_its_location(tmp_path: Path) -> None:
    for where in ("one", "two/levels"):
        write(tmp_path / where / "x" / "y.txt", "same")
    assert load_documents(tmp_path / "one") == load_documents(tmp_path / "two" / "levels")


def test_jsonl_one_document_per_line(tmp_path: Path) -> None:
    lines = [json.dumps({"text": "first", "id": 1}), "", "   ", json.dumps({"text": "ünï"})]
    path = write(tmp_path / "corpus.jsonl", "\n".join(lines) + "\n")
    assert load_documents(path) == [
        ("corpus.jsonl:1", b"first"),
        ("corpus.jsonl:4", "ünï".encode()),
    ]


def test_jsonl_lone_surrogate_is_replaced(tmp_path: Path) -> None:
    path = write(tmp_path / "s.jsonl", '{"text": "a\\ud800b"}\n')
    assert load_documents(path) == [("s.jsonl:1", b"a?b")]


def test_jsonl_bad_json_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError) as info:
        load_documents(path)
    message = str(info.value)
    assert "bad.jsonl" in message and "line 3" in message and "not valid JSON" in message
    assert "\n" not in message


@pytest.mark.parametrize("record", ['{"txt": "x"}', '{"text": 3}', '["text"]', '"text"'])
def test_jsonl_without_text_string_field(tmp_path: Path, record: str) -> None:
    path = write(tmp_path / "d.jsonl", '{"text": "fine"}\n' + record + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl: line 2 has no 'text' string field"):
        load_documents(path)


def test_jsonl_inside_folder_errors_too(tmp_path: Path) -> None:
    write(tmp_path / "ok.txt", "fine")
    write(tmp_path / "nested" / "bad.jsonl", "not json\n")
    with pytest.raises(DataError, match="line 1"):
        load_documents(tmp_path)


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "x.txt"
    with pytest.raises(DataError) as info:
        load_documents(missing)
    message = str(info.value)
    assert str(missing) in message and "no such file or folder" in message
    assert "give a text file" in message and "\n" not in message


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="holds no text"):
        load_documents(tmp_path)


def test_folder_without_text_files(tmp_path: Path) -> None:
    write(tmp_path / "a.png", b"\x00\x01")
    with pytest.raises(DataError, match="holds no text"):
        load_documents(tmp_path)


def test_empty_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="holds no text"):
        load_documents(write(tmp_path / "empty.txt", ""))


def test_folder_of_empty_files(tmp_path: Path) -> None:
    write(tmp_path / "a.txt", "")
    write(tmp_path / "b" / "c.md", "")
    with pytest.raises(DataError, match=r"holds no text \(only empty documents\)"):
        load_documents(tmp_path)


def test_jsonl_of_empty_texts(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="holds no text"):
        load_documents(write(tmp_path / "e.jsonl", '{"text": ""}\n\n'))


def test_read_failure_becomes_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "x.txt", "x")

    def refuse(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(DataError, match=r"x\.txt: cannot read \(Permission denied\)"):
        load_documents(path)


# --- the standard-library corpus --------------------------------------------------------------


@pytest.fixture(scope="module")
def stdlib_docs() -> list[tuple[str, bytes]]:
    return load_documents(None)


def test_stdlib_corpus_is_substantial(stdlib_docs: list[tuple[str, bytes]]) -> None:
    names = [name for name, _ in stdlib_docs]
    assert len(names) > 100
    assert sum(len(data) for _, data in stdlib_docs) > 1_000_000
    assert "os.py" in names
    assert (stdlib_root() / "os.py").read_bytes() == dict(stdlib_docs)["os.py"]
    assert all(data for _, data in stdlib_docs)
    assert all(name.endswith(".py") for name in names)


def test_stdlib_corpus_is_sorted_relative_posix(stdlib_docs: list[tuple[str, bytes]]) -> None:
    names = [name for name, _ in stdlib_docs]
    assert names == sorted(names)
    assert len(set(names)) == len(names)
    assert all(not PurePosixPath(n).is_absolute() and "\\" not in n for n in names)
    assert any("/" in n for n in names)  # packages such as json/ are included


def test_stdlib_corpus_excludes_tests_and_packages(stdlib_docs: list[tuple[str, bytes]]) -> None:
    banned = {"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"}
    for name, _ in stdlib_docs:
        folders = PurePosixPath(name).parts[:-1]
        assert not banned.intersection(folders), name
        assert not any(part.startswith("test_") for part in folders), name
    names = {name for name, _ in stdlib_docs}
    # The library itself stays even though its name contains "test".
    assert "unittest/case.py" in names
    assert not any(name.startswith("_sysconfigdata_") for name in names)


# --- split ------------------------------------------------------------------------------------


def docs_named(n: int) -> list[tuple[str, bytes]]:
    return [(f"doc{i:03d}.txt", f"text {i}".encode()) for i in range(n)]


def test_split_is_deterministic_disjoint_and_complete(
    stdlib_docs: list[tuple[str, bytes]],
) -> None:
    train, val = split_documents(stdlib_docs)
    assert (train, val) == split_documents(list(stdlib_docs))
    assert train and val
    train_names, val_names = {n for n, _ in train}, {n for n, _ in val}
    assert not train_names & val_names
    assert train_names | val_names == {n for n, _ in stdlib_docs}
    assert 0.01 < len(val) / len(stdlib_docs) < 0.15


def test_split_depends_on_names_not_order_or_company() -> None:
    docs = docs_named(200)
    _, val = split_documents(docs)
    _, val_reversed = split_documents(docs[::-1])
    assert {n for n, _ in val} == {n for n, _ in val_reversed}
    # Dropping training documents does not move any validation document.
    _, val_subset = split_documents(val + docs[:50])
    assert {n for n, _ in val} <= {n for n, _ in val_subset}


def test_split_keeps_input_order() -> None:
    docs = docs_named(200)
    train, val = split_documents(docs)
    assert train == [d for d in docs if d in train]
    assert val == [d for d in docs if d in val]


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("fraction", [0.001, 0.05, 0.999])
def test_split_both_sides_non_empty(n: int, fraction: float) -> None:
    train, val = split_documents(docs_named(n), val_fraction=fraction)
    assert train and val and len(train) + len(val) == n


def test_single_document_split_by_bytes() -> None:
    data = bytes(range(200))
    train, val = split_documents([("only.txt", data)], val_fraction=0.1)
    assert train == [("only.txt", data[:180])]
    assert val == [("only.txt", data[180:])]
    tiny_train, tiny_val = split_documents([("t", b"abcd")], val_fraction=0.01)
    assert tiny_train == [("t", b"ab")] and tiny_val == [("t", b"cd")]
    with pytest.raises(DataError, match="too few"):
        split_documents([("t", b"abc")])


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5, 2])
def test_split_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents(docs_named(3), val_fraction=fraction)


# --- token windows ----------------------------------------------------------------------------


def as_bytes(row: torch.Tensor) -> bytes:
    return bytes(row.tolist())


def test_windows_exact_content_and_padding() -> None:
    # seq_len 4 → chunks of 5 bytes: "abcde", "fghij", then the 2-byte tail "kl" of doc 1;
    # doc 2 gives "xyz01" and a 1-byte tail "2" that cannot form a sample and is dropped.
    ds = TokenWindows([("a", b"abcdefghijkl"), ("b", b"xyz012")], seq_len=4)
    assert len(ds) == 4
    batch = ds.batch([0, 1, 2, 3])
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.dtype == labels.dtype == torch.int64
    assert ids.shape == labels.shape == (4, 4)
    assert as_bytes(ids[0]) == b"abcd" and as_bytes(labels[0]) == b"bcde"
    assert as_bytes(ids[1]) == b"fghi" and as_bytes(labels[1]) == b"ghij"
    assert ids[2].tolist() == [ord("k"), 0, 0, 0]
    assert labels[2].tolist() == [ord("l"), -100, -100, -100]
    assert as_bytes(ids[3]) == b"xyz0" and as_bytes(labels[3]) == b"yz01"


def test_windows_short_document_and_order_of_indices() -> None:
    ds = TokenWindows([("a", b"abcdefghij"), ("b", b"pq"), ("c", b"z")], seq_len=4)
    assert len(ds) == 3  # "abcde", "fghij", "pq"; "z" is too short
    batch = ds.batch(torch.tensor([2, 0]))
    assert batch["input_ids"].tolist() == [[ord("p"), 0, 0, 0], list(b"abcd")]
    assert batch["labels"].tolist() == [[ord("q"), -100, -100, -100], list(b"bcde")]


def test_windows_padding_at_the_very_end_of_the_data() -> None:
    ds = TokenWindows([("a", b"abc")], seq_len=8)
    batch = ds.batch([0])
    assert batch["input_ids"].tolist() == [[ord("a"), ord("b")] + [0] * 6]
    assert batch["labels"].tolist() == [[ord("b"), ord("c")] + [-100] * 6]


def test_tokens_in_counts_non_ignored_labels() -> None:
    ds = TokenWindows([("a", b"abcdefghijkl"), ("b", b"xyz012")], seq_len=4)
    for indices in ([0], [2], [0, 2, 3], [2, 2], []):
        labels = ds.batch(indices)["labels"]
        assert ds.tokens_in(indices) == int((labels != -100).sum())
    assert ds.tokens_in([0, 1, 2, 3]) == 4 + 4 + 1 + 4 == ds.num_tokens


def test_windows_bytes_are_faithful(stdlib_docs: list[tuple[str, bytes]]) -> None:
    docs = stdlib_docs[:20]
    ds = TokenWindows(docs, seq_len=128)
    rebuilt = bytearray()
    batch = ds.batch(torch.arange(len(ds)))
    for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
        real = labels != -100
        rebuilt += as_bytes(ids[real][:1]) + as_bytes(labels[real])
    # Every document's bytes come back in order, minus 1-byte tails that form no sample.
    expected = b"".join(d if len(d) % 129 != 1 else d[:-1] for _, d in docs)
    assert bytes(rebuilt) == expected


def test_windows_errors() -> None:
    ds = TokenWindows([("a", b"abcdefghij")], seq_len=4)
    with pytest.raises(IndexError):
        ds.batch([2])
    with pytest.raises(IndexError):
        ds.tokens_in([-1])
    with pytest.raises(ValueError, match="seq_len"):
        TokenWindows([("a", b"abc")], seq_len=0)
    with pytest.raises(DataError, match="no sample"):
        TokenWindows([("a", b"x"), ("b", b"y")], seq_len=4)


# --- batch order ------------------------------------------------------------------------------


def take(n: int, *args: int, **kwargs: int) -> list[torch.Tensor]:
    return list(itertools.islice(global_batches(*args, **kwargs), n))


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_global_batches_shape_and_dtype() -> None:
    for batch in take(7, 10, 4, 0):
        assert batch.dtype == torch.int64 and batch.shape == (4,)
        assert ((batch >= 0) & (batch < 10)).all()


def test_global_batches_same_seed_same_sequence_other_seed_differs() -> None:
    assert same(take(20, 50, 8, 1), take(20, 50, 8, 1))
    assert not same(take(20, 50, 8, 1), take(20, 50, 8, 2))


def test_each_epoch_is_a_permutation() -> None:
    n, g = 24, 6
    batches = take(3 * n // g, n, g, 7)
    epochs = torch.cat(batches).view(3, n)
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(n))
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled each epoch


@pytest.mark.parametrize(("n", "g"), [(10, 3), (7, 7), (5, 12), (1, 4)])
def test_batches_straddle_epochs(n: int, g: int) -> None:
    stream = torch.cat(take(10, n, g, 3))
    assert len(stream) == 10 * g
    full_epochs = len(stream) // n
    for e in range(full_epochs):
        assert sorted(stream[e * n : (e + 1) * n].tolist()) == list(range(n))


@pytest.mark.parametrize(("n", "g"), [(10, 3), (12, 4), (5, 12)])
def test_start_step_equals_skipping(n: int, g: int) -> None:
    reference = take(40, n, g, 11)
    for s in (0, 1, 2, 3, 5, 13, 29):
        assert same(take(40 - s, n, g, 11, start_step=s), reference[s:]), s


def test_start_step_far_ahead_is_direct() -> None:
    # Reaching step 10**12 must not walk through the earlier ones.
    batch = next(global_batches(1000, 64, 0, start_step=10**12))
    assert batch.shape == (64,)


def test_global_batches_depend_only_on_their_arguments() -> None:
    reference = take(15, 30, 7, 5)
    torch.manual_seed(123)
    torch.rand(10)  # disturb the global generator
    interleaved = global_batches(30, 7, 5)
    other = global_batches(30, 7, 99)
    batches = []
    for _ in range(15):
        batches.append(next(interleaved))
        next(other)
    assert same(batches, reference)


@pytest.mark.parametrize(
    "args", [(0, 4, 0), (10, 0, 0), (-1, 4, 0), (10, 4.0, 0), (10, True, 0), (10, 4, "a")]
)
def test_global_batches_validation(args: tuple) -> None:
    with pytest.raises(ValueError):
        global_batches(*args)


def test_global_batches_rejects_negative_start() -> None:
    with pytest.raises(ValueError, match="start_step"):
        global_batches(10, 2, 0, start_step=-1)


@pytest.mark.parametrize(("n", "b"), [(10, 3), (9, 3), (1, 5), (0, 2)])
def test_eval_batches_cover_every_sample_once(n: int, b: int) -> None:
    batches = list(eval_batches(n, b))
    assert all(0 < len(x) <= b for x in batches)
    assert all(len(x) == b for x in batches[:-1])
    flat = torch.cat(batches).tolist() if batches else []
    assert flat == list(range(n))


def test_eval_batches_validation() -> None:
    with pytest.raises(ValueError):
        eval_batches(10, 0)
    with pytest.raises(ValueError):
        eval_batches(-1, 2)


# --- variable lengths -------------------------------------------------------------------------


def full_rows(n: int, seq: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, 256, (n, seq), generator=gen),
            "labels": torch.randint(0, 256, (n, seq), generator=gen)}


def test_vary_lengths_keeps_a_prefix_of_labels_only() -> None:
    batch = full_rows(64, 20)
    original = {k: v.clone() for k, v in batch.items()}
    out = vary_lengths(batch, seed=3, step=5)
    assert out is not batch and set(out) == set(batch)
    assert all(torch.equal(batch[k], original[k]) for k in batch)  # not mutated
    assert torch.equal(out["input_ids"], batch["input_ids"])
    kept = out["labels"] != -100
    assert torch.equal(out["labels"][kept], batch["labels"][kept])
    assert (kept.int().diff(dim=1) <= 0).all()  # kept positions are a prefix of each row
    lengths = kept.sum(1)
    assert lengths.min() >= 1 and lengths.max() <= 20
    assert len(set(lengths.tolist())) > 8  # 64 draws from 20 values: far from constant


def test_vary_lengths_keyed_on_seed_and_step_only() -> None:
    batch = full_rows(32, 24)
    ref = vary_lengths(batch, seed=3, step=5)["labels"]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    again = vary_lengths(batch, seed=3, step=5)["labels"]
    assert torch.equal(torch.get_rng_state(), state)  # the global generator was not used
    assert torch.equal(again, ref)
    assert not torch.equal(vary_lengths(batch, seed=3, step=6)["labels"], ref)
    assert not torch.equal(vary_lengths(batch, seed=4, step=5)["labels"], ref)


def test_vary_lengths_min_len_bounds() -> None:
    batch = full_rows(200, 16)
    lengths = (vary_lengths(batch, 0, 0, min_len=12)["labels"] != -100).sum(1)
    assert lengths.min() >= 12 and lengths.max() <= 16
    assert set(lengths.tolist()) == {12, 13, 14, 15, 16}  # both ends reachable
    everything = vary_lengths(batch, 0, 0, min_len=99)["labels"]  # capped at seq_len
    assert torch.equal(everything, batch["labels"])
    with pytest.raises(ValueError, match="min_len"):
        vary_lengths(batch, 0, 0, min_len=0)


def test_vary_lengths_keeps_existing_padding() -> None:
    batch = full_rows(8, 10)
    batch["labels"][:, 4:] = -100
    out = vary_lengths(batch, 1, 2)["labels"]
    assert (out[:, 4:] == -100).all()
