"""
The test suite: `bash run.sh --tests` (or `python -m pytest test_all.py` inside .venv).
One section per script; every test is named test_<section>_..., which is how run.sh times the sections.
Shared fixtures sit at the top. Tests use tiny models and the offline mirror in ../shared/data (or $NANOCHAT_MIRROR).
"""
import os
import sys
import json
import shutil
import subprocess

import pytest
import torch
from collections import Counter
from dataclasses import asdict
import argparse
import ast as _ast
import concurrent.futures
import contextlib
import io
import functools
import dataclasses
import http.client
import http.server
import itertools
import math
import multiprocessing
import pyarrow as pa
import pyarrow.parquet as pq
import random
import re
import regex
import signal
import socket
import tempfile
import threading
import time
import torch.nn.functional as F
import urllib.parse
import xml.etree.ElementTree as ET
import zipfile

REPO = os.path.dirname(os.path.abspath(__file__))
# every test has a time limit, so a hang fails instead of stalling CI (pytest-timeout, from requirements-test.txt; slow
# tests carry their own larger mark). Under CI=true the plugin must be there.
pytestmark = pytest.mark.timeout(300)
SLOW = pytest.mark.timeout(900)  # the tests that start several processes or train: 20-100 s each on 2 loaded cores
if os.environ.get("CI") == "true":
    import pytest_timeout  # noqa: F401
sys.path.insert(0, REPO)
MIRROR = os.environ.get("NANOCHAT_MIRROR") or os.path.join(REPO, "..", "shared", "data")
MIRROR = os.path.abspath(MIRROR) if not MIRROR.startswith("http") else MIRROR
SHARD_DIR = os.path.join(MIRROR, "huggingface.co", "datasets", "karpathy", "fineweb-edu-100b-shuffle", "resolve", "main")
TEST_VOCAB = 1024  # small trained vocabulary for the fixtures (256 bytes + 759 merges + 9 specials)

import common  # noqa: E402
common.set_mirror(MIRROR)
import data
import eval as ev


def skip_or_fail(reason):
    """A missing test dependency skips its test on a developer's machine, and fails it under CI=true (`bash run.sh
    --tests` installs requirements-test.txt; .ci/run adds the system browser)."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}: under CI=true nothing may be skipped (bash run.sh --tests installs it)")
    print(f"SKIP reason: {reason}")
    pytest.skip(reason)


def run_script(args, env=None, timeout=600, check=True, cwd=REPO, input=None):
    """Run `python <args>` in a subprocess with this interpreter; returns CompletedProcess (text)."""
    full_env = dict(os.environ, **(env or {}))
    p = subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout, input=input)
    if check and p.returncode != 0:
        raise AssertionError(f"{args} exited {p.returncode}\nSTDOUT:\n{p.stdout[-4000:]}\nSTDERR:\n{p.stderr[-4000:]}")
    return p


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory):
    """A session-wide NANOCHAT_BASE_DIR with train shards 0-1 and the validation shard copied from the mirror."""
    path = str(tmp_path_factory.mktemp("nanochat_base"))
    os.environ["NANOCHAT_BASE_DIR"] = path
    os.makedirs(os.path.join(path, "base_data"))
    for i in (0, 1, common.VAL_SHARD_INDEX):
        name = f"shard_{i:05d}.parquet"
        shutil.copy(os.path.join(SHARD_DIR, name), os.path.join(path, "base_data", name))
    return path


@pytest.fixture(scope="session")
def tokenizer(base_dir):
    """A small BPE (vocab TEST_VOCAB) trained by our trainer on the first train documents, saved under the base dir."""
    from tokenizer import Tokenizer, train_bpe, get_tokenizer
    docs = [d[:5000] for _, d in zip(range(200), common.iter_documents("train"))]
    ranks = train_bpe(docs, TEST_VOCAB)
    Tokenizer.from_ranks(ranks).save(os.path.join(base_dir, "tokenizer"))
    return get_tokenizer()


@pytest.fixture(scope="session")
def tiny_config(tokenizer):
    from model import GPTConfig
    return GPTConfig(sequence_len=128, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2, n_embd=64)


@pytest.fixture
def tiny_model(tiny_config):
    from model import GPT
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(tiny_config)
    model.to_empty(device="cpu")
    model.init_weights()
    return model


# =============================================================================
# common.py
# =============================================================================

def test_common_mirror_resolution(tmp_path, monkeypatch):
    url = "https://huggingface.co/datasets/cais/mmlu/resolve/refs%2Fconvert%2Fparquet/all/test/0000.parquet"
    monkeypatch.chdir(tmp_path)
    try:
        common.set_mirror("rel/mirror")
        assert common.resolve_url(url) == os.path.join(str(tmp_path), "rel/mirror", "huggingface.co",
                                                       "datasets/cais/mmlu/resolve/refs/convert/parquet/all/test/0000.parquet")
        monkeypatch.chdir("/")  # resolved once: a later chdir changes nothing
        assert common.resolve_url(url).startswith(str(tmp_path))
        common.set_mirror("http://127.0.0.1:9/")
        assert common.resolve_url(url) == "http://127.0.0.1:9/huggingface.co/datasets/cais/mmlu/resolve/refs%2Fconvert%2Fparquet/all/test/0000.parquet"
        common.set_mirror(None)
        assert common.resolve_url(url) == url
    finally:
        common.set_mirror(MIRROR)


def test_common_atomic_write_keeps_old_file_on_crash(tmp_path):
    path = str(tmp_path / "f.txt")
    common.atomic_write_text(path, "good")

    def crash(f):
        f.write(b"half")
        raise RuntimeError("killed")
    with pytest.raises(RuntimeError):
        common.atomic_write(path, crash)
    assert open(path).read() == "good"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_common_shards_and_report(base_dir):
    train, val = common.list_shards("train"), common.list_shards("val")
    assert [os.path.basename(p) for p in val] == ["shard_01822.parquet"]
    assert len(train) == 2 and val[0] not in train
    rank0 = {d for _, _, texts in common.iter_row_groups("train", 0, 2) for d in texts}
    rank1 = {d for _, _, texts in common.iter_row_groups("train", 1, 2) for d in texts}
    assert rank0 and rank1 and not rank0 & rank1
    common.write_report_section("reply-endings", [{"loss": 1.234567, "tokens": 123456, "name": "x"}, "free text"])
    path = os.path.join(base_dir, "report", "reply-endings.md")  # a slug of REPORT_SECTIONS: its title is written
    text = open(path).read()
    assert text.startswith("## Reply endings\ntimestamp: ") and "- loss: 1.2346" in text and "- tokens: 123,456" in text and "free text" in text
    os.remove(path)
    assert common.parquet_texts(train[0], 0) == next(common.iter_row_groups("train"))[2]
    common.append_log("teststage", {"step": 1, "train_loss": 2.0})
    assert json.loads(open(os.path.join(base_dir, "report", "teststage_log.jsonl")).read().splitlines()[-1])["step"] == 1


def _in_thread(fn, seconds):
    """Run fn in a daemon thread for at most `seconds`; -> (finished, result or exception)."""
    out = []
    t = threading.Thread(target=lambda: out.append(_call(fn)), daemon=True)
    t.start()
    t.join(seconds)
    return (not t.is_alive()), (out[0] if out else None)


def _call(fn):
    try:
        return fn()
    except BaseException as e:
        return e


def test_common_lock_takes_over_empty_and_foreign_locks(tmp_path, capsys):
    dest = str(tmp_path / "s.parquet")
    # a disk-full crash's empty lock; one naming a live but unrelated pid (init)
    for leftover in ("", f"{socket.gethostname()}:1"):
        open(dest + ".lock", "w").write(leftover)
        done, result = _in_thread(lambda: data.download_file(data.SHARD_URL.format(0), dest), 20)
        assert done and result == dest and _same_as_mirror(dest), result
        assert sorted(os.listdir(tmp_path)) == ["s.parquet"]  # the lock is gone
        err = capsys.readouterr().err
        assert f"note: taking over {dest}.lock: " in err and err.count("\n") == 1, err
        assert ("an empty lock" if not leftover else f"{leftover} held it and has ended") in err, err
        os.remove(dest)


def _lock_holder(path):
    """A process that takes the lock `path` and sleeps; its stdout says 'held' once it has it."""
    code = f"import common, time; common.take_lock({path!r}); print('held', flush=True); time.sleep(300)"
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)


def test_common_lock_names_a_live_holder_and_outlives_its_kill(tmp_path, capsys):
    path = str(tmp_path / "x.lock")
    holder = _lock_holder(path)
    try:
        assert holder.stdout.readline() == "held\n"
        who = f"pid {holder.pid} on {socket.gethostname()} since "
        with pytest.raises(common.UserError, match=f"^error: {re.escape(path)} is held by {who}[-0-9: ]+: try later$"):
            common.take_lock(path, busy="try later")
        waiter = threading.Thread(target=common.take_lock, args=(path,), daemon=True)
        waiter.start()
        waiter.join(1.5)
        assert waiter.is_alive()
        assert capsys.readouterr().err == f"waiting for {path}: held by " + open(path).read() + "\n"
        holder.kill()  # kill -9: the file stays behind, the kernel drops its flock
        waiter.join(10)
        assert not waiter.is_alive() and path in common._held and open(path).read().startswith(f"pid {os.getpid()} on ")
        assert f"note: taking over {path}: {who}" in capsys.readouterr().err
    finally:
        holder.kill()
        if path in common._held:
            common.release_lock(path)
    assert not os.path.exists(path)


def _dead_pid():
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(p.stdout)


def test_common_atomic_write_removes_temp_files_of_dead_writers(tmp_path):
    dead, path = _dead_pid(), str(tmp_path / "f.txt")
    # a killed writer's, a live process's, another file's
    for name in (f"f.txt.tmp{dead}", "f.txt.tmp1", f"g.txt.tmp{dead}"):
        open(tmp_path / name, "w").write("half")
    common.atomic_write_text(path, "good")
    assert sorted(os.listdir(tmp_path)) == ["f.txt", "f.txt.tmp1", f"g.txt.tmp{dead}"]
    common.remove_stray_temps(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["f.txt", "f.txt.tmp1"]


@SLOW
def test_common_base_dir_that_is_a_file_or_read_only(base_dir, tokenizer, tmp_path):
    commands = {"train": ["train.py", *TINY_BASE, "--num-iterations", "1"], "eval": ["eval.py", "report"],
                "chat": ["chat.py", "-p", "hi"],
                "export": ["model.py", "export", "--source", "sft", "--out", str(tmp_path / "out")]}
    (tmp_path / "file").write_text("")
    for name, args in commands.items():
        p = run_script(args, env={"NANOCHAT_BASE_DIR": str(tmp_path / "file")}, check=False)
        want = (f"error: NANOCHAT_BASE_DIR={tmp_path / 'file'} cannot be used as a folder (File exists): "
                "point NANOCHAT_BASE_DIR at a folder (created if missing)\n")
        assert p.returncode == 1 and p.stderr == want, (name, p.stderr)
    ro = tempfile.mkdtemp()  # (pytest's tmp_path is closed to other users)
    try:
        for name in ("base_data", "tokenizer"):
            shutil.copytree(os.path.join(base_dir, name), os.path.join(ro, name))
        subprocess.run(["chmod", "-R", "a+rX,a-w", ro], check=True)
        for name, folder in (("train", "base_checkpoints"), ("eval", "report")):
            p = subprocess.run([sys.executable, *commands[name]], cwd=REPO, env=dict(os.environ, NANOCHAT_BASE_DIR=ro),
                               capture_output=True, text=True, timeout=300, preexec_fn=drop_to_nobody)
            want = (f"error: {ro}/{folder} is not writable: give yourself write access to NANOCHAT_BASE_DIR={ro}, "
                    "or point NANOCHAT_BASE_DIR at a folder you can write\n")
            assert p.returncode == 1 and p.stderr == want, (name, p.stderr)
    finally:
        shutil.rmtree(ro)


# =============================================================================
# tokenizer.py
# =============================================================================

def _reference_bpe(texts, vocab_size, pattern):
    """Slow, obviously-correct BPE: recount every adjacent pair from scratch before each merge."""
    words = Counter(tuple(chunk.encode("utf-8")) for t in texts for chunk in regex.findall(pattern, t))
    token = {i: bytes([i]) for i in range(256)}
    for new in range(256, vocab_size - 9):
        pairs = Counter()
        for w, n in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))  # highest count, then the smallest pair
        merged = Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(new)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += n
        words, token[new] = merged, token[best[0]] + token[best[1]]
    return {b: i for i, b in token.items()}


def _tie_corpus():
    """Few letters (many equal counts), runs like 'aaaa' (overlapping pairs), digits, CJK, emoji, contractions."""
    rng = random.Random(0)
    parts = ["ab", "ba", "aab", "bba", "abab", "aaaa", "cab", "abc", "1234", "99", "日本", "🙂🙂", "don't", "we'll", "  ", "\n"]
    texts = ["".join(rng.choice(parts) + rng.choice(["", " "]) for _ in range(rng.randint(20, 80))) for _ in range(300)]
    # spaces after whitespace (no chunk starts there) and at the ends: the cases the trainer's split on spaces must get right
    spaces = [" lead", "  two", "trail ", "a  b", "a\t b", "a\n b", "a\xa0 b", "a\u3000 b", "ab \n cd", "x, y. z"]
    return texts + ["aaaaaaa abababab bbbb", "x" * 50, "xy" * 40] + spaces * 3


def test_tokenizer_train_matches_reference_bpe(monkeypatch):
    import tokenizer as T
    texts = _tie_corpus()
    want = _reference_bpe(texts, 700, T.SPLIT_PATTERN)
    assert len(want) > 256 + 200, "the corpus should allow a few hundred merges"
    assert T.train_bpe(texts, 700, num_workers=1) == want
    for many in (1, 10**9):  # every merge through numpy, then every merge through the plain loop
        monkeypatch.setattr(T, "NUMPY_MIN_POSITIONS", many)
        assert T.train_bpe(texts, 700, num_workers=1) == want
    monkeypatch.setattr(T, "BATCH_CHARS", 2000)  # many small batches through 2 worker processes
    assert T.train_bpe(texts, 700, num_workers=2) == want
    assert not multiprocessing.active_children()


def test_tokenizer_count_chunks_equals_plain_findall(monkeypatch):
    """count_chunks splits texts on spaces and runs the regex once per distinct piece: the counts must be exactly those
    of the regex over every whole text, in one process or several."""
    import tokenizer as T
    texts = _tie_corpus() + HARD_TEXTS + [t.replace(" ", "  ") for t in HARD_TEXTS] + ["\n ".join(HARD_TEXTS)]
    want = Counter(chunk.encode() for t in texts for chunk in regex.findall(T.SPLIT_PATTERN, t))
    monkeypatch.setattr(T, "BATCH_CHARS", 3000)
    for workers, max_pieces in ((1, 10**9), (2, 10**9), (3, 10**9), (1, 50), (2, 50)):  # 50: many folds into chunk counts
        monkeypatch.setattr(T, "MAX_PIECES", max_pieces)
        blob, counts = T.count_chunks(texts, num_workers=workers)
        assert dict(zip(blob.split(b"\xff"), counts.tolist())) == want
    # a piece of letters counts as one chunk without the regex: Python's letters must all be the regex's \p{L}
    assert not regex.search(r"\P{L}", "".join(c for c in map(chr, range(0x110000)) if c.isalpha()))


def test_tokenizer_train_bad_input():
    import tokenizer as T
    with pytest.raises(ValueError):
        T.train_bpe(["hello world"], 265)
    with pytest.raises(ValueError, match="empty"):
        T.train_bpe([], 1000)
    with pytest.raises(ValueError, match="empty"):
        T.train_bpe(["", ""], 1000)
    T.BATCH_CHARS, old = 5, T.BATCH_CHARS
    try:
        with pytest.raises(TypeError):
            T.train_bpe(["some text here"] * 10 + [None], 300, num_workers=2)
    finally:
        T.BATCH_CHARS = old
    assert not multiprocessing.active_children()  # the workers were stopped, nothing left running


def test_tokenizer_matches_rustbpe():
    try:
        import rustbpe
    except ImportError:
        skip_or_fail("rustbpe is not installed (pip install rustbpe)")
    import tokenizer as T
    small = _tie_corpus() + [d[:3000] for d in common_docs(100)]
    for texts, vocab in ((small, 2000), (common_docs(200, shards=3), 80_000)):
        # the second case runs out of pairs past id 65,535 (token ids cross the UTF-16 surrogate range on the way)
        tok = rustbpe.Tokenizer()
        tok.train_from_iterator(texts, vocab - 9, pattern=T.SPLIT_PATTERN)
        want = {bytes(k): v for k, v in tok.get_mergeable_ranks()}
        assert T.train_bpe(texts, vocab) == want
    assert 65_536 < len(want) < 80_000 - 9


def common_docs(n, shards=1):
    """The first n documents of each of the mirror's first train shards, capped at 10,000 characters."""
    import pyarrow.parquet as pq
    return [d[:10_000] for i in range(shards)
            for d in pq.read_table(os.path.join(SHARD_DIR, f"shard_{i:05d}.parquet"), columns=["text"]).column("text").to_pylist()[:n]]


HARD_TEXTS = [
    "", " ", "a", "Hello, world!", "don't won't we'll I'M You'RE they've", "1234567890 3.14159 2,000,000 ١٢٣",
    "中文测试，日本語のテキスト、한국어 문장입니다.", "emoji 🙂👍🏽👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵", "tabs\tand\n\n\nnewlines\r\n  \n",
    " " * 100 + "x" + "\n" * 30, "mixed Ελληνικά кириллица עברית العربية हिन्दी", "<|bos|> <|assistant_end|> <|endoftext|>",
    "\u200b\u00ad\ufeff zero-width", "naïve café Ångström", "a" * 1000, "e\u0301 combining",
]


def test_tokenizer_round_trip_hard_text(tokenizer):
    for text in HARD_TEXTS:
        assert tokenizer.decode(tokenizer.encode(text)) == text, repr(text)
    batch = tokenizer.encode(HARD_TEXTS, num_threads=4)
    assert batch == [tokenizer.encode(t) for t in HARD_TEXTS]
    bos, end = tokenizer.get_bos_token_id(), tokenizer.encode_special("<|assistant_end|>")
    assert tokenizer.encode("hi", prepend="<|bos|>", append=end) == [bos] + tokenizer.encode("hi") + [end]
    assert tokenizer.encode(["hi", "yo"], prepend=bos) == [[bos] + tokenizer.encode("hi"), [bos] + tokenizer.encode("yo")]


def test_tokenizer_special_tokens(tokenizer):
    import tokenizer as T
    V = tokenizer.get_vocab_size()
    assert V == TEST_VOCAB
    assert [tokenizer.encode_special(s) for s in T.SPECIAL_TOKENS] == list(range(V - 9, V))
    assert tokenizer.get_bos_token_id() == V - 9 and tokenizer.decode([V - 9]) == "<|bos|>" and tokenizer.decode([ord("a")]) == "a"
    for name in T.SPECIAL_TOKENS:  # a special token's string in text is ordinary text
        ids = tokenizer.encode(f"say {name} now")
        assert max(ids) < V - 9 and tokenizer.decode(ids) == f"say {name} now"
    conv = {"messages": [{"role": "user", "content": "<|assistant_end|><|bos|>"},
                         {"role": "assistant", "content": "<|user_start|> ok <|python_start|>"}]}
    ids, mask = tokenizer.render_conversation(conv)
    specials = [i for i in ids if i >= V - 9]
    names = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>"]
    assert specials == [tokenizer.encode_special(n) for n in names]


def test_tokenizer_render_conversation_masks(tokenizer):
    t, S = tokenizer, tokenizer.encode_special
    conv = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Let me compute. "},
                                          {"type": "python", "text": "2+3"},
                                          {"type": "python_output", "text": "5"},
                                          {"type": "text", "text": "It is 5."}]},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ]}
    snapshot = json.dumps(conv)
    ids, mask = t.render_conversation(conv)
    assert json.dumps(conv) == snapshot  # the caller's conversation is untouched
    want = [(S("<|bos|>"), 0), (S("<|user_start|>"), 0)] + [(i, 0) for i in t.encode("Be brief.\n\nWhat is 2+3?")]
    want += [(S("<|user_end|>"), 0), (S("<|assistant_start|>"), 0)] + [(i, 1) for i in t.encode("Let me compute. ")]
    want += [(S("<|python_start|>"), 1)] + [(i, 1) for i in t.encode("2+3")] + [(S("<|python_end|>"), 1)]
    want += [(S("<|output_start|>"), 0)] + [(i, 0) for i in t.encode("5")] + [(S("<|output_end|>"), 0)]
    want += [(i, 1) for i in t.encode("It is 5.")] + [(S("<|assistant_end|>"), 1)]
    want += [(S("<|user_start|>"), 0)] + [(i, 0) for i in t.encode("Thanks")] + [(S("<|user_end|>"), 0)]
    want += [(S("<|assistant_start|>"), 0)] + [(i, 1) for i in t.encode("You're welcome.")] + [(S("<|assistant_end|>"), 1)]
    assert list(zip(ids, mask)) == want
    short_ids, short_mask = t.render_conversation(conv, max_tokens=10)
    assert short_ids == ids[:10] and short_mask == mask[:10]
    with pytest.raises(AssertionError):
        t.render_conversation({"messages": [{"role": "assistant", "content": "hi"}]})
    with pytest.raises(ValueError):
        t.render_conversation({"messages": [{"role": "user", "content": "x"},
                                            {"role": "assistant", "content": [{"type": "image", "text": "x"}]}]})


def test_tokenizer_render_for_completion(tokenizer):
    conv = {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "Hi there"},
                         {"role": "assistant", "content": "Hello!"}]}
    ids = tokenizer.render_for_completion(conv)
    prefix, _ = tokenizer.render_conversation({"messages": conv["messages"][:2]})
    assert ids == prefix + [tokenizer.encode_special("<|assistant_start|>")]
    assert len(conv["messages"]) == 3
    with pytest.raises(AssertionError):
        tokenizer.render_for_completion({"messages": [{"role": "user", "content": "x"}]})


def test_tokenizer_save_load(tokenizer, base_dir, tmp_path, monkeypatch):
    import tokenizer as T
    loaded = T.Tokenizer.load(os.path.join(base_dir, "tokenizer"))
    for text in HARD_TEXTS:
        assert loaded.encode(text) == tokenizer.encode(text)
    loaded.save(str(tmp_path))
    again = T.Tokenizer.load(str(tmp_path))
    assert again.encode(HARD_TEXTS) == tokenizer.encode(HARD_TEXTS)
    tb = T.get_token_bytes()
    assert tb.dtype == torch.int32 and tb.shape == (TEST_VOCAB,)
    assert tb[:256].tolist() == [1] * 256 and tb[-9:].tolist() == [0] * 9
    assert all(tb[i] == len(tokenizer.enc.decode_single_token_bytes(i)) for i in range(256, TEST_VOCAB - 9))
    assert torch.equal(torch.load(os.path.join(str(tmp_path), "token_bytes.pt")), tb)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="python tokenizer.py train"):
        T.get_tokenizer()


@SLOW
def test_tokenizer_cli_train_eval_and_bad_input(tmp_path):
    env = {"NANOCHAT_BASE_DIR": str(tmp_path / "base")}  # never the fixture's base dir: train would overwrite its tokenizer
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": t}) for t in _tie_corpus()) + "\n")
    p = run_script(["tokenizer.py", "train", "--input", str(corpus), "--vocab-size", "400", "--doc-cap", "500"], env=env)
    assert "vocab 400" in p.stdout
    assert os.path.exists(tmp_path / "base" / "tokenizer" / "tokenizer.pkl")
    assert "## Tokenizer training" in (tmp_path / "base" / "report" / "tokenizer-training.md").read_text()
    p = run_script(["tokenizer.py", "eval"], env=env)  # no shards, maybe offline: says so, no crash
    assert "news" in p.stdout and "korean" in p.stdout and "skipping fwe-train" in p.stdout
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    bad = [(["--vocab-size", "265", "--input", str(corpus)], "vocab-size"),
           (["--input", str(tmp_path / "missing.parquet")], "not found"),
           (["--input", str(empty)], "empty"),
           (["--input", str(corpus), "--max-chars", "0"], "positive")]
    for args, words in bad:
        p = run_script(["tokenizer.py", "train", *args], env=env, check=False)
        assert p.returncode != 0 and words in p.stderr and "Traceback" not in p.stderr, (args, p.stderr)
    for size in ("10000000", "265", "-3"):  # one line with the valid range
        p = run_script(["tokenizer.py", "train", "--input", str(corpus), "--vocab-size", size], env=env, check=False)
        assert p.returncode == 1 and p.stderr == (f"error: --vocab-size must be 266..1048576 (256 bytes + 9 special tokens + at least "
                                                  f"one merge; at most 2^20), not {size}\n"), p.stderr
    p = run_script(["tokenizer.py", "eval"], env={"NANOCHAT_BASE_DIR": str(tmp_path / "none")}, check=False)
    assert p.returncode != 0 and "python tokenizer.py train" in p.stderr


@SLOW
def test_tokenizer_truncated_pickle_is_one_line_in_chat_eval_train(tokenizer, base_dir, tmp_path, monkeypatch):
    import tokenizer as T
    os.makedirs(tmp_path / "tokenizer")
    for name in ("tokenizer.pkl", "token_bytes.pt"):
        blob = open(os.path.join(base_dir, "tokenizer", name), "rb").read()
        open(tmp_path / "tokenizer" / name, "wb").write(blob[:len(blob) // 2])
    path = str(tmp_path / "tokenizer" / "tokenizer.pkl")
    env = {"NANOCHAT_BASE_DIR": str(tmp_path)}
    for args in (["chat.py", "-p", "hi"], ["eval.py", "core"], ["train.py", *TINY_BASE]):
        p = run_script(args, env=env, check=False)
        assert p.returncode == 1 and p.stderr.startswith(f"error: {path} is unreadable (") and p.stderr.count("\n") == 1, (args, p.stderr)
        assert p.stderr.endswith("): rebuild it with `python tokenizer.py train`\n"), p.stderr
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(common.UserError, match=re.escape(str(tmp_path / "tokenizer" / "token_bytes.pt")) + " is unreadable"):
        T.get_token_bytes()


def test_tokenizer_training_documents(tmp_path, base_dir):
    import tokenizer as T
    txt = tmp_path / "a.txt"
    txt.write_text("first para\nline two\n\n\nsecond para\n")
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text(json.dumps({"text": "x" * 50}) + "\n\n" + json.dumps("plain string doc") + "\n")
    stats = {"docs": 0, "chars": 0}
    docs = list(T.training_documents([str(txt), str(jsonl)], 10**9, 20, stats))
    assert docs == ["first para\nline two", "second para", "x" * 20, "plain string doc"]
    assert stats == {"docs": 4, "chars": sum(map(len, docs))}
    # the cap: stop right after the running count exceeds max_chars (overshoot < 1 doc); train-shards = train split only
    stats = {"docs": 0, "chars": 0}
    docs = list(T.training_documents(["train-shards"], 25_000, 10_000, stats))
    assert stats["chars"] > 25_000 and stats["chars"] - len(docs[-1]) <= 25_000 and max(map(len, docs)) <= 10_000
    val = set(next(common.iter_row_groups("val"))[2])
    assert not val & set(d for d in T.training_documents(["train-shards"], 2_000_000, 10**9, {"docs": 0, "chars": 0}))
    # files and train-shards mix, read in the order given
    mixed = list(T.training_documents([str(txt), "train-shards"], 1_000, 10**9, {"docs": 0, "chars": 0}))
    assert mixed[:2] == ["first para\nline two", "second para"] and mixed[2] == next(common.iter_documents("train"))
    parquet = os.path.join(SHARD_DIR, "shard_00000.parquet")
    first = next(T.read_input_file(parquet))
    assert first == next(common.iter_documents("train"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "no text field"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        list(T.read_input_file(str(bad)))


@SLOW
def test_tokenizer_train_keeps_a_tokenizer_checkpoints_use(tmp_path):
    from tokenizer import Tokenizer, train_bpe
    base, env = tmp_path / "base", {"NANOCHAT_BASE_DIR": str(tmp_path / "base")}
    old = Tokenizer.from_ranks(train_bpe(_tie_corpus(), 300))
    old.save(str(base / "tokenizer"))
    folder = base / "base_checkpoints" / "d1"
    os.makedirs(folder)
    meta = {"model_config": {"vocab_size": 300}, "tokenizer_hash": old.hash}
    (folder / "meta_000005.json").write_text(json.dumps(meta))
    before = {n: (base / "tokenizer" / n).read_bytes() for n in ("tokenizer.pkl", "token_bytes.pt")}
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": t}) for t in _tie_corpus()) + "\n")
    train = ["tokenizer.py", "train", "--input", str(corpus), "--vocab-size", "400"]
    backup = base / f"tokenizer_{old.hash}"
    p = run_script(train, env=env, check=False)
    want = (f"error: {base}/tokenizer/tokenizer.pkl is the tokenizer base_checkpoints/d1 were trained with; a new one "
            f"would orphan them: pass --force to replace it (the old one is then kept in {backup}), or use another "
            "NANOCHAT_BASE_DIR\n")
    assert p.returncode == 1 and p.stderr == want, p.stderr
    assert {n: (base / "tokenizer" / n).read_bytes() for n in before} == before and not backup.exists()
    p = run_script([*train, "--force"], env=env)
    assert f"note: the previous tokenizer, which base_checkpoints/d1 were trained with, is kept in {backup}: " \
           in p.stdout
    assert {n: (backup / n).read_bytes() for n in before} == before
    assert (base / "tokenizer" / "tokenizer.pkl").read_bytes() != before["tokenizer.pkl"]
    run_script(train, env=env)  # the checkpoint's tokenizer is no longer the current one: nothing left to orphan


def test_tokenizer_token_bytes_must_match_the_tokenizer(tmp_path, tokenizer, monkeypatch):
    """issue 27: a token_bytes.pt from another tokenizer (an IndexError deep in bpb) is a one-line error naming both files
    and a fix that works."""
    import tokenizer as T
    shutil.copytree(os.path.join(os.environ["NANOCHAT_BASE_DIR"], "tokenizer"), tmp_path / "tokenizer")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    path, good = tmp_path / "tokenizer" / "token_bytes.pt", T.get_token_bytes()
    for wrong in (good[:-5], good.flip(0), good[:, None]):  # another vocab, the same size but other lengths, another shape
        torch.save(wrong, path)
        with pytest.raises(common.UserError) as e:
            T.get_token_bytes(tokenizer=tokenizer)
        message = str(e.value)
        assert message.startswith(f"error: {path} (") and f"does not match {tmp_path / 'tokenizer' / 'tokenizer.pkl'}" in message
    run_script(["-c", re.search(r"`python -c \"(.*)\"`", message).group(1)], env={"NANOCHAT_BASE_DIR": str(tmp_path)})
    assert T.get_token_bytes().tolist() == good.tolist()


def test_tokenizer_progress_plain_lines_in_logs(monkeypatch):
    """Progress redraws one line with \\r on a terminal; into a log it prints a plain line per tenth of a stage or 30 s,
    plus each stage's first and last line, never a carriage return (run.sh's logs had one line of 255 redraws)."""
    import tokenizer as T

    class Tty(io.StringIO):
        def isatty(self):
            return True

    def run(stream, chars=10**6, merges=1000, slow_at=None):
        monkeypatch.setattr(sys, "stderr", stream)
        p = T.Progress(chars)
        for done in range(chars // 100, chars + 1, chars // 100):
            p("count", done, 0, 0)
        p("counted", 5000, 0, 0)
        for done in range(10, merges + 1, 10):
            if done == slow_at:
                p.t0 -= T.LOG_EVERY_S + 1  # as if 31 s passed since the last line
            p("merge", done, merges, 1.0)
        return stream.getvalue()

    log = run(io.StringIO()).splitlines(keepends=True)
    assert "\r" not in "".join(log) and all(l.endswith("\n") for l in log)
    counting = [l for l in log if l.startswith("counting chunks: ")]
    merging = [l for l in log if l.startswith("merges ")]
    assert [l.split()[2] for l in counting] == ["0.0M", "0.1M", "0.2M", "0.3M", "0.4M", "0.5M", "0.6M", "0.7M", "0.8M",
                                                 "0.9M", "1.0M"]  # the first (1%), then each tenth of --max-chars
    assert [l.split()[1] for l in merging] == [f"{n:,}/1,000" for n in [10] + list(range(100, 1001, 100))]
    assert len(log) == len(counting) + 1 + len(merging)  # + the "counted" line
    slow = [l.split()[1] for l in run(io.StringIO(), slow_at=150).splitlines() if l.startswith("merges ")]
    assert slow == [f"{n:,}/1,000" for n in [10, 100, 150] + list(range(200, 1001, 100))]  # + the line after 30 s
    tty = run(Tty())
    assert tty.count("\r") == 100 + 1 + 100 and tty.count("\n") == 2  # each redraw in place; a newline ends each stage


# =============================================================================
# model.py
# =============================================================================

from model import (GPT, GPTConfig, KVCache, Engine, TextStreamer, use_calculator, config_from_depth, build_model,
                   save_checkpoint, load_checkpoint, last_step, load_model)

# =============================================================================
# model.py
# =============================================================================

SPECIALS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
            "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]


class ByteTokenizer:
    """Private stand-in tokenizer: ids 0-255 are bytes, the 9 specials follow (same duck type as tokenizer.Tokenizer)."""

    def get_vocab_size(self):
        return 256 + len(SPECIALS)

    def encode_special(self, name):
        return 256 + SPECIALS.index(name)

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def small_model(n_layer=2, n_head=2, n_kv_head=2, n_embd=64, vocab=265, seq=64, seed=0, zero=False, **options):
    """A random-init model; with zero=False the zero-initialised matrices get small noise so the logits are not flat, and
    the options' gates and scalars move off their start (a closed smear gate would hide a smear bug)."""
    torch.manual_seed(seed)
    model = build_model(dict(sequence_len=seq, vocab_size=vocab, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd,
                             **options), "cpu")
    if not zero:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name == "lm_head.weight" or name.endswith("c_proj.weight"):
                    p.normal_(0, 0.1 if name == "lm_head.weight" else 0.02)
                elif "." not in name or "gate" in name:
                    p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


# nanochat 92d63d4's whole set of architecture options (its pattern SSSL shortened to the tests' 3 layers)
ALL_OPTIONS = dict(window_pattern="SSL", rope_base=100_000, qk_scale=1.2, pad_vocab_to=64, resid_lambdas=True, value_embeds=True,
                   smear=True, backout=True)


def naive_greedy(model, tokens, n):
    ids = list(tokens)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(tokens):]


def test_model_param_counts_release_sizes():
    for depth, total in ((20, 560_988_160), (26, 1_081_999_360)):
        with torch.device("meta"):
            model = GPT(config_from_depth(depth, 65536))
        assert model.param_counts()["total"] == total
        assert model.lm_head.weight.is_meta
    with torch.device("meta"):
        d20 = GPT(config_from_depth(20, 65536))
    assert d20.param_counts()["blocks"] == 393_216_000
    assert abs(d20.estimate_flops() - 3.4918e9) / 3.4918e9 < 1e-4
    names = set(dict(d20.named_parameters()))
    assert {"transformer.wte.weight", "lm_head.weight", "transformer.h.19.attn.c_q.weight", "transformer.h.0.attn.c_k.weight",
            "transformer.h.0.attn.c_v.weight", "transformer.h.0.attn.c_proj.weight", "transformer.h.0.mlp.c_fc.weight",
            "transformer.h.0.mlp.c_proj.weight"} <= names
    assert len(names) == 2 + 6 * 20 and not any("cos" in k or "sin" in k for k in d20.state_dict())


def test_model_depth_sizing_odd_depths():
    for depth in range(1, 33):
        c = config_from_depth(depth, 1000)
        hd = c.n_embd // c.n_head
        assert c.n_embd == 64 * depth and c.n_embd % c.n_head == 0 and hd % 2 == 0 and c.n_kv_head == c.n_head
        if depth % 2 == 0:
            assert hd == 128
    for depth in (3, 5):
        c = config_from_depth(depth, 300, sequence_len=32)
        model = build_model(asdict(c), "cpu")
        loss = model(torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16)))
        assert torch.isfinite(loss)


def test_model_gqa_shapes_and_cache_consistency():
    model = small_model(n_head=4, n_kv_head=2, n_embd=64)
    attn = model.transformer.h[0].attn
    assert attn.c_q.weight.shape == (64, 64) and attn.c_k.weight.shape == (32, 64) and attn.c_v.weight.shape == (32, 64)
    x = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        full = model(x)
        assert full.shape == (2, 20, 265) and full.dtype == torch.float32 and full.abs().max() <= 15.0
        # the same logits through the cache: a 12-token chunk, a 5-token chunk (prefix + causal), then single tokens
        kv = KVCache(2, 2, 4, 16, 2)
        parts = [model(x[:, :12], kv_cache=kv), model(x[:, 12:17], kv_cache=kv)] + [model(x[:, t:t + 1], kv_cache=kv) for t in range(17, 20)]
    assert kv.pos == 20
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-4, rtol=1e-4)


def test_model_first_loss_is_ln_vocab():
    model = small_model(zero=True, vocab=1000)
    x = torch.randint(0, 1000, (2, 32))
    y = x.clone()
    y[0, :5] = -1
    loss = model(x, y)
    assert abs(loss.item() - math.log(1000)) < 1e-4
    per_token = model(x, y, loss_reduction="none")
    assert per_token.shape == (2, 32) and (per_token[0, :5] == 0).all()
    loss.backward()
    assert model.lm_head.weight.grad.abs().sum() > 0


def test_model_chunked_loss_matches_full_logits(monkeypatch):
    """The chunked loss equals F.cross_entropy on the full softcapped logits (loss and every gradient), and no tensor of
    the last dimension V outside one chunk of rows is ever made or kept, in forward or backward."""
    import model as model_lib
    V, rows = 265, 20
    monkeypatch.setattr(model_lib, "LOSS_CHUNK_CPU", rows * V)  # 128 rows: 6 full chunks and a ragged one
    model = small_model(vocab=V)
    torch.manual_seed(1)
    x = torch.randint(0, 256, (2, 64))
    for masked, reduction in itertools.product((False, True), ("mean", "sum", "none")):
        y = torch.randint(0, V, (2, 64))
        if masked:
            y[0, :23], y[1, 40:] = -1, -1
        up = torch.rand(2, 64) if reduction == "none" else torch.tensor(1.0)
        model.zero_grad()
        ref = F.cross_entropy(model.head(model.trunk(x)).view(-1, V), y.view(-1), ignore_index=-1, reduction=reduction)
        (ref.view(y.shape) if reduction == "none" else ref).mul(up).sum().backward()
        ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        widest = []
        class Watch(torch.overrides.TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                widest.extend(t.numel() for t in (out if isinstance(out, tuple) else (out,)) if torch.is_tensor(t) and t.dim() and t.size(-1) == V)  # noqa: B023 (runs in this iteration)
                return out
        saved = []
        with Watch(), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):  # noqa: B023
            loss = model(x, y, loss_reduction=reduction)
            loss.mul(up).sum().backward()
        with torch.no_grad():
            assert torch.equal(model(x, y, loss_reduction=reduction), loss.detach())
        assert max(widest) == rows * V and not any(s and s[-1] == V for s in saved), (masked, reduction)
        tol = 1e-5 * (ref.abs().max().item() if reduction == "sum" else 1)  # a sum of 128 terms: compare relative
        assert (loss.detach() - ref.view(loss.shape)).abs().max() <= tol, (masked, reduction)
        assert max((p.grad - ref_grads[n]).abs().max().item() for n, p in model.named_parameters()) <= 1e-5, (masked, reduction)


def test_model_estimate_memory_parts(tmp_path, monkeypatch):
    """Parts follow the sharding rule and scale as they should: activations with the rows, optimizer state over ranks."""
    import model as model_lib
    with torch.device("meta"):
        d20 = GPT(config_from_depth(20, 65536))
    one, two, eight = (model_lib.estimate_memory(d20, r, world=w) for r, w in ((16, 1), (32, 1), (32, 8)))
    n = d20.param_counts()
    assert one["params"] == 4 * n["total"] + 2 * (n["blocks"] + n["lm_head"]) and one["grads"] == 4 * n["total"]
    assert one["optimizer"] == 4 * n["blocks"] + 8 * (n["wte"] + n["lm_head"]) and eight["optimizer"] == one["optimizer"] // 8
    assert two["activations"] == 2 * one["activations"] and one["total"] == sum(v for k, v in one.items() if k != "total")
    import train  # --dry-run: the rows whose (eager bf16) estimate fits 90% of a GPU; no tokenizer yet: vocab 65536
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with contextlib.redirect_stdout(io.StringIO()) as out:
        train.main(["--dry-run", "--depth", "20", "--max-seq-len", "2048"])
    assert out.getvalue().endswith("suggested --device-batch-size: 24 GB: 4, 40 GB: 8, 80 GB: 16\n"), out.getvalue()
    assert "memory estimate per rank at 32 rows x 2048: params 2.98, grads 2.09, optimizer 2.71, activations 76.25" in out.getvalue()
    with torch.device("meta"):  # the options: their parameters count; a CPU window keeps (rows, heads, T, T) probabilities
        d4 = GPT(config_from_depth(4, 8192, 2048, window_pattern="SSSL", value_embeds=True, resid_lambdas=True))
    cpu, gpu, n4 = model_lib.estimate_memory(d4, 8, cuda=False), model_lib.estimate_memory(d4, 8), d4.param_counts()
    assert cpu["windows"] == 4 * 8 * 2048 * 2048 * 2 * 3 and gpu["windows"] == 0 and n4["value_embeds"] == 2 * 8192 * 256
    assert cpu["optimizer"] == 4 * n4["blocks"] + 8 * (n4["total"] - n4["blocks"])


if torch.cuda.is_available():  # CUDA cases (run by `bash run.sh --gpu-check`); on a machine without a GPU they do not exist
    def test_model_cuda_chunked_loss_compiled(monkeypatch):
        """Compiled on CUDA in bf16, the loss matches the full-logits loss and the step never holds the (B*T, V) logits."""
        import model as model_lib
        monkeypatch.setattr(model_lib, "LOSS_CHUNK_CUDA", 2**23)  # 128 rows of 65,536
        torch.manual_seed(0)
        model = build_model(dict(sequence_len=1024, vocab_size=65536, n_layer=2, n_head=1, n_kv_head=1, n_embd=128), "cuda")
        with torch.no_grad():
            model.lm_head.weight.normal_(0, 0.02)
        x, y = torch.randint(0, 65536, (2, 4, 1024), device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ref = F.cross_entropy(model.head(model.trunk(x)).view(-1, 65536), y.view(-1))
        ref.backward()
        ref_grad = model.lm_head.weight.grad.clone()
        model.zero_grad(set_to_none=True)
        compiled = torch.compile(model, dynamic=False)
        compiled(x, y).backward()  # compile and warm up
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = compiled(x, y)
        loss.backward()
        full_logits = 4 * 1024 * 65536 * 4  # one fp32 (B*T, V) tensor: 1 GiB
        assert torch.cuda.max_memory_allocated() - base < full_logits / 2
        assert abs(loss.item() - ref.item()) < 2e-2 * ref.item()
        assert F.cosine_similarity(model.lm_head.weight.grad.flatten(), ref_grad.flatten(), dim=0) > 0.99


def test_model_rotary_convention():
    model = small_model(n_head=1, n_kv_head=1, n_embd=8)
    hd = 8
    assert torch.allclose(model.cos[0, 3, 0], torch.cos(3 * 10000 ** (-torch.arange(0, hd, 2) / hd)))
    from model import apply_rotary
    x = torch.arange(8.0).view(1, 1, 1, 8)
    cos, sin = torch.full((1, 1, 1, 4), 0.6), torch.full((1, 1, 1, 4), 0.8)
    y = apply_rotary(x, cos, sin)[0, 0, 0]
    x1, x2 = x[0, 0, 0, :4], x[0, 0, 0, 4:]
    torch.testing.assert_close(y, torch.cat((x1 * 0.6 + x2 * 0.8, -x1 * 0.8 + x2 * 0.6)))


def test_model_engine_greedy_matches_naive():
    model = small_model(n_layer=2, n_head=2, n_embd=64)
    engine = Engine(model, ByteTokenizer())
    prompt = [10, 20, 30, 40, 50, 60, 70]
    expected = naive_greedy(model, prompt, 20)
    cols = list(engine.generate(prompt, num_samples=1, max_tokens=20, temperature=0.0))
    assert [c[0][0] for c in cols] == expected and all(c[1] == [1] for c in cols)
    cols = list(engine.generate(prompt, num_samples=3, max_tokens=20, temperature=0.0))
    assert all(col == [t] * 3 for (col, _), t in zip(cols, expected))


def test_model_sliding_window_equals_the_band_mask():
    """A layer with a window computes full attention under the explicit band mask: query i sees key j when 0 <= i - j <= w."""
    from model import layer_windows, GPTConfig, norm, apply_rotary
    assert layer_windows(GPTConfig(sequence_len=2048, n_layer=5, window_pattern="SSSL")) == [512, 512, 512, None, None]
    assert layer_windows(GPTConfig(sequence_len=300, n_layer=3, window_pattern="sl")) == [128, None, None]
    model = small_model(n_layer=2, n_head=4, n_kv_head=2, seq=512, window_pattern="S")
    attn, T, w = model.transformer.h[0].attn, 300, 128
    assert attn.window == w and model.transformer.h[1].attn.window is None
    x, cos, sin = torch.randn(2, T, 64), model.cos[:, :T], model.sin[:, :T]
    with torch.no_grad():
        y = attn(x, cos, sin, None)
        q, k, v = (lin(x).view(2, T, -1, 16) for lin in (attn.c_q, attn.c_k, attn.c_v))
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(2, 1), v.transpose(1, 2).repeat_interleave(2, 1)
        d = torch.arange(T)[:, None] - torch.arange(T)
        scores = (q @ k.mT / 4.0).masked_fill(~((d >= 0) & (d <= w)), -math.inf)
        expected = attn.c_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, T, 64))
        assert (y - expected).abs().max() < 1e-5
        attn.window = None  # the window does cut: without it the late positions differ
        assert (attn(x, cos, sin, None) - y)[:, w + 1:].abs().max() > 1e-3


def test_model_options_cache_engine_and_chunks_equal_full_forward():
    """Every option on: the Engine's KV-cache decode (smear's previous token from the cache, windows cut past 128 keys),
    a prompt fed in two chunks, and several rows all equal a full forward of the whole sequence."""
    model = small_model(n_layer=3, n_kv_head=1, seq=256, **ALL_OPTIONS)
    assert model.transformer.wte.weight.size(0) == 320 and model.lm_head.weight.size(0) == 320  # 265 padded to 64s
    assert sorted(n for n, _ in model.named_parameters() if "." not in n or "gate" in n or "value_embeds" in n) == [
        "backout_lambda", "resid_lambdas", "smear_gate.weight", "smear_lambda", "transformer.h.0.attn.ve_gate.weight",
        "transformer.h.2.attn.ve_gate.weight", "value_embeds.0.weight", "value_embeds.2.weight", "x0_lambdas"]  # nanochat's names
    prompt = [(7 * i) % 250 + 1 for i in range(150)]
    expected = naive_greedy(model, prompt, 30)  # positions up to 180: the short layers' window (128) cuts
    assert len(set(expected)) > 3
    cols = list(Engine(model, ByteTokenizer()).generate(prompt, num_samples=2, max_tokens=30, temperature=0.0))
    assert all(col == [t] * 2 for (col, _), t in zip(cols, expected))
    ids = torch.tensor([prompt + expected])
    engine = Engine(model, ByteTokenizer())
    with torch.no_grad():
        kv = engine.cache(1, 256)
        engine.forward_last(ids[:, :100], kv)
        chunked, full = engine.forward_last(ids[:, 100:], kv), model(ids)[:, -1]
        assert (chunked - full).abs().max() < 1e-4
        for block in model.transformer.h:  # the windows matter at this length
            block.attn.window = None
        assert (model(ids)[:, -1] - full).abs().max() > 1e-3


def test_model_options_checkpoint_meta_and_release_meta(tmp_path):
    """A checkpoint with options round-trips through its meta; a release meta (no option fields) loads as the release
    architecture; an option of the wrong type is a one-line problem naming the file."""
    from model import save_checkpoint, load_checkpoint, _read_meta, GPTConfig, GPT
    model = small_model(n_layer=3, seq=256, **ALL_OPTIONS)
    save_checkpoint(str(tmp_path), 1, model.state_dict(), {"model_config": asdict(model.config)})
    meta = load_checkpoint(str(tmp_path), 1, "cpu")[2]
    assert GPTConfig(**meta["model_config"]) == model.config
    release = dict(sequence_len=64, vocab_size=265, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    (tmp_path / "meta_000002.json").write_text(json.dumps({"model_config": release}))
    assert GPTConfig(**_read_meta(str(tmp_path / "meta_000002.json"))[0]["model_config"]) == GPTConfig(**release)
    assert list(GPT(GPTConfig(**release)).state_dict()) == list(small_model().state_dict())
    (tmp_path / "meta_000003.json").write_text(json.dumps({"model_config": dict(release, qk_scale="big")}))
    assert _read_meta(str(tmp_path / "meta_000003.json"))[1].endswith("model_config's qk_scale must be of the type of GPTConfig's default")


def test_model_linear_decode_path_equals_f_linear(monkeypatch):
    """model.Linear's CPU few-row bmm path (taken: F.linear must not run) is the same product as x @ w.T, forward and backward."""
    import model as model_lib
    torch.manual_seed(0)
    for shape, out in (((1, 1, 64), 96), ((8, 1, 64), 96), ((3, 64), 64), ((2, 4, 64), 40), ((1, 1, 64), 33), ((4, 16, 64), 96)):
        x = torch.randn(*shape, requires_grad=True)
        lin = model_lib.Linear(64, out)
        w = lin.weight
        fast = out % 2 == 0 and x.numel() // 64 <= 64
        with monkeypatch.context() as m:
            if fast:
                m.setattr(model_lib.F, "linear", None)
            y = lin(x)
        xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        ref = xd @ wd.t()  # in float64, by another kernel: never F.linear compared with itself
        torch.testing.assert_close(y, ref.float(), rtol=1e-5, atol=1e-5)
        gx, gw = torch.autograd.grad(y.square().sum(), (x, w))
        rx, rw = torch.autograd.grad(ref.square().sum(), (xd, wd))
        torch.testing.assert_close(gx, rx.float(), rtol=1e-5, atol=1e-4)  # summation order differs
        torch.testing.assert_close(gw, rw.float(), rtol=1e-5, atol=1e-4)
    linears = [type(m) for m in small_model().modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * 6 + 1 and set(linears) == {model_lib.Linear}  # every matrix of the model takes this path


def test_model_engine_sampling_rows_and_seed():
    model = small_model(seed=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.01)  # near-flat distribution: rows must differ
    engine = Engine(model, ByteTokenizer())
    prompt = [1, 2, 3]
    a, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=12, temperature=1.0, seed=7)
    b, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=12, temperature=1.0, seed=7)
    c, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=12, temperature=1.0, seed=8)
    assert a == b and a != c
    assert len({tuple(r) for r in a}) == 4 and len({r[3] for r in a}) > 1  # first tokens sampled per row too
    k1, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=12, temperature=1.0, top_k=1)
    assert all(r[3:] == naive_greedy(model, prompt, 12)[:len(r) - 3] for r in k1)  # top_k=1 is greedy


def test_model_kv_cache_growth_and_prefill():
    kv = KVCache(1, 2, 4, 3, 2)
    data = torch.randn(2, 2, 1, 2, 2000, 3)  # (k/v, layer, B, H, T, hd)
    t = 0
    for n in (3, 1, 500, 1496):
        for layer in range(2):
            k, v = kv.insert(layer, data[0, layer, :, :, t:t + n], data[1, layer, :, :, t:t + n])
            assert torch.equal(k, data[0, layer, :, :, :t + n]) and torch.equal(v, data[1, layer, :, :, :t + n])
        t += n
    assert kv.pos == 2000 and kv.shape[3] >= 2000 and kv.shape[3] % 1024 == 0
    big = KVCache(5, 2, 2100, 3, 2)
    big.prefill(kv)
    assert big.pos == 2000 and big.k.shape[1] == 5
    for b in range(5):
        assert torch.equal(big.k[:, b, :, :2000], data[0, :, 0]) and torch.equal(big.v[:, b, :, :2000], data[1, :, 0])
    # an Engine decode that outgrows a too-small cache keeps matching the naive loop
    model = small_model(seq=16)
    prompt = list(range(40, 60))
    cols = list(itertools.islice(Engine(model, ByteTokenizer()).generate(prompt, num_samples=2, temperature=0.0), 30))
    assert [c[0][0] for c in cols] == naive_greedy(model, prompt, 30)


def test_model_calculator_accepts_and_rejects():
    assert use_calculator("1+2*3") == 7
    assert use_calculator("(1,000 + 24) / 2") == 512.0
    assert use_calculator("-3 * -(2 - 5)") == -9
    assert use_calculator("10/4") == 2.5 and str(use_calculator("10/2")) == "5.0"
    assert use_calculator("'strawberry'.count('r')") == 3
    assert use_calculator('"banana".count("a")') == 3
    bad = ["2**10", "9**9**9", "x+1", "abs(-1)", "().__class__", "'a'.__class__", "__import__('os')", "open('f')",
           "'a'.upper()", "'a'.count(x)", "'ab' * 3", "1 % 2", "1/0", "[1,2]", "lambda: 1", "1 if 1 else 2", "'a'.count('a', 1)",
           "1" * 10_000, "(" * 200 + "1" + ")" * 200, "1e308*10", "", "import os", "1; 2", "True + 1"]
    t0 = time.time()
    for expr in bad:
        assert use_calculator(expr) is None, expr
    assert use_calculator(None) is None and time.time() - t0 < 1.0
    results = []  # usable from any thread (no signals)
    th = threading.Thread(target=lambda: results.append(use_calculator("6*7")))
    th.start()
    th.join()
    assert results == [42]


class ScriptedModel:
    """A fake model for the Engine: python_start, "12*3", python_end, then <|assistant_end|> once it has seen <|output_end|>."""

    def __init__(self, tok):
        self.tok = tok
        self.config = GPTConfig(sequence_len=64, vocab_size=tok.get_vocab_size(), n_layer=1, n_head=1, n_kv_head=1, n_embd=2)
        self.script = [tok.encode_special("<|python_start|>"), *tok.encode("12*3"), tok.encode_special("<|python_end|>")]
        self.history = None

    def get_device(self):
        return torch.device("cpu")

    def trunk(self, ids, kv):
        rows = ids.tolist()
        if self.history is not None and len(self.history) < len(rows):
            self.history = self.history * len(rows)  # batch-1 prefill broadcast to the decode rows
        self.history = rows if self.history is None else [h + r for h, r in zip(self.history, rows)]
        z = torch.zeros(ids.size(0), 1, ids.size(1), 2)
        kv.insert(0, z, z)
        return torch.zeros(ids.size(0), ids.size(1), 2)

    def head(self, x):
        logits = torch.zeros(len(self.history), self.config.vocab_size)
        for i, h in enumerate(self.history):
            gen = h[self.prompt_len:]
            if self.tok.encode_special("<|output_end|>") in gen:
                nxt = self.tok.encode_special("<|assistant_end|>")
            elif len(gen) < len(self.script):
                nxt = self.script[len(gen)]
            else:
                nxt = ord("z")  # sampled while forced tokens are queued: must be ignored
            logits[i, nxt] = 10.0
        return logits


def test_model_tool_use_state_machine():
    tok = ByteTokenizer()
    fake = ScriptedModel(tok)
    prompt = [tok.encode_special("<|bos|>"), *tok.encode("hi")]
    fake.prompt_len = len(prompt)
    S = tok.encode_special
    tokens, masks = [], []
    for col, mcol in Engine(fake, tok).generate(prompt, num_samples=2, max_tokens=40, temperature=0.0):
        assert col[0] == col[1] and mcol[0] == mcol[1]
        tokens.append(col[0])
        masks.append(mcol[0])
    expected = [S("<|python_start|>"), *tok.encode("12*3"), S("<|python_end|>"), S("<|output_start|>"), *tok.encode("36"),
                S("<|output_end|>"), S("<|assistant_end|>")]
    assert tokens == expected
    assert masks == [1] * 6 + [0] * 4 + [1]
    fake.history = None
    rows, row_masks = Engine(fake, tok).generate_batch(prompt, num_samples=1, max_tokens=40, temperature=0.0)
    assert rows[0] == prompt + expected[:-1] and row_masks[0] == [0] * len(prompt) + masks[:-1]


def test_model_text_streamer_utf8():
    tok = ByteTokenizer()
    text = "héllo 🙂 世界!"
    streamer = TextStreamer(tok)
    pieces = [streamer.push(i) for i in tok.encode(text)]
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    assert pieces[tok.encode(text).index(0xF0)] == ""  # first byte of the emoji: nothing yet


def test_model_checkpoint_roundtrip_and_crash(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    model = small_model()
    config = dict(sequence_len=64, vocab_size=265, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    ckpt = common.checkpoint_dir("base", "d2")
    save_checkpoint(ckpt, 5, model.state_dict(), {"model_config": config}, optimizer_state={"lr": 0.1}, rank=0)
    x = torch.randint(0, 265, (1, 10))
    loaded, meta = load_model("base", "cpu", tokenizer=ByteTokenizer())
    assert meta == {"model_config": config}
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    _, opt, _ = load_checkpoint(ckpt, 5, "cpu", load_optimizer=True)
    assert opt == {"lr": 0.1}
    # a save killed before its rename: the previous checkpoint stays the latest and loads
    with open(os.path.join(ckpt, "model_000009.pt.tmp999"), "wb") as f:
        f.write(b"half a checkpoint")
    other = small_model(seed=3)
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(ckpt, 10, other.state_dict(), {"model_config": config})
    monkeypatch.undo()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    assert last_step(ckpt) == 5
    loaded, _ = load_model("base", "cpu")
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # bf16 tensors, largest d<N> tag, explicit step; clear errors
    state = {k: v.to(torch.bfloat16) for k, v in other.state_dict().items()}
    save_checkpoint(common.checkpoint_dir("base", "d12"), 3, state, {"model_config": config, "step": 3})
    loaded, meta = load_model("base", "cpu")
    assert meta["step"] == 3 and loaded.lm_head.weight.dtype == torch.float32
    with pytest.raises(common.UserError, match="vocab"):
        load_model("base", "cpu", tokenizer=type("T", (), {"get_vocab_size": lambda self: 999})())
    with pytest.raises(FileNotFoundError, match="train.py --stage=sft"):
        load_model("sft", "cpu")
    with pytest.raises(FileNotFoundError):
        load_model("base", "cpu", tag="d2", step=7)


def damage(path, how):
    """The damages of issue 16: 4 KB of zeros over the middle, cut in half, emptied."""
    blob = open(path, "rb").read()
    n = len(blob)
    open(path, "wb").write({"overwrite": blob[:n // 2] + bytes(4096) + blob[n // 2 + 4096:], "truncate": blob[:n // 2], "empty": b""}[how])


def test_model_checkpoint_falls_back_past_damaged_steps(tmp_path, monkeypatch, capsys):
    import model as model_lib
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    config = dict(sequence_len=64, vocab_size=265, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    ckpt = common.checkpoint_dir("base", "d2")
    good, newer, x = small_model(seed=1), small_model(seed=2), torch.randint(0, 265, (1, 10))
    save_checkpoint(ckpt, 5, good.state_dict(), {"model_config": config}, optimizer_state={"lr": 1})
    model_path, meta_path, optim_path = (os.path.join(ckpt, n) for n in ("model_000010.pt", "meta_000010.json", "optim_000010_rank0.pt"))
    for path, how in [(model_path, "truncate"), (model_path, "overwrite"), (model_path, "empty"), (meta_path, "truncate"),
                      (meta_path, dict(config, n_head=0)), (meta_path, dict(config, n_embd="64")), (meta_path, dict(config, n_head=3))]:
        save_checkpoint(ckpt, 10, newer.state_dict(), {"model_config": config}, optimizer_state={"lr": 2})
        damage(path, how) if isinstance(how, str) else open(path, "w").write(json.dumps({"model_config": how}))
        monkeypatch.setattr(model_lib, "_warned", set(), raising=False)
        capsys.readouterr()
        loaded, _ = load_model("base", "cpu")  # eval and chat: the newest good step, with a one-line warning
        with torch.no_grad():
            assert torch.equal(loaded(x), good(x)), (path, how)
        err = capsys.readouterr().err
        assert err.startswith(f"warning: skipping step 10: {path}") and err.count("\n") == 1, (how, err)
        assert last_step(ckpt, world=1) == 5  # train --resume
        with pytest.raises(common.UserError, match=f"^error: {re.escape(path)}"):
            load_model("base", "cpu", step=10)
        if how != "overwrite":  # torch.load reads past a damaged byte; only the CRC check above sees it
            with pytest.raises(common.UserError, match=f"^error: {re.escape(path)}"):
                load_checkpoint(ckpt, 10, "cpu")  # what train --resume calls with last_step's answer
    save_checkpoint(ckpt, 10, newer.state_dict(), {"model_config": config}, optimizer_state={"lr": 2})
    damage(optim_path, "truncate")  # only resume reads the optimizer shard
    assert last_step(ckpt) == 10 and last_step(ckpt, world=1) == 5
    with pytest.raises(common.UserError, match=f"^error: {re.escape(optim_path)} is unreadable"):
        load_checkpoint(ckpt, 10, "cpu", load_optimizer=True)
    open(meta_path, "w").write(json.dumps({"model_config": dict(config, n_embd=128, n_head=4, n_kv_head=4)}))  # sane, but not this model
    with pytest.raises(common.UserError, match=f"^error: {re.escape(model_path)} does not hold the model"):
        load_model("base", "cpu")
    damage(os.path.join(ckpt, "model_000005.pt"), "truncate")
    os.remove(meta_path)
    with pytest.raises(FileNotFoundError, match=f"no complete, readable base checkpoint in {re.escape(ckpt)}: run"):
        load_model("base", "cpu")


def test_model_checkpoint_checks_the_tokenizer(tokenizer, tmp_path, monkeypatch):
    from tokenizer import Tokenizer
    V = tokenizer.get_vocab_size()
    ranks = {tokenizer.enc.decode_single_token_bytes(i): i for i in range(V - 9)}
    a, b = tokenizer.enc.decode_single_token_bytes(300), tokenizer.enc.decode_single_token_bytes(301)
    ranks[a], ranks[b] = 301, 300  # the same vocab size, other merges
    Tokenizer.from_ranks(ranks).save(str(tmp_path / "other"))
    other = Tokenizer.load(str(tmp_path / "other"))
    assert other.hash != tokenizer.hash and other.get_vocab_size() == V
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    config = dict(sequence_len=64, vocab_size=V, n_layer=1, n_head=1, n_kv_head=1, n_embd=64)
    ckpt = common.checkpoint_dir("sft", "d1")
    save_checkpoint(ckpt, 3, build_model(config, "cpu").state_dict(), {"model_config": config, "tokenizer_hash": tokenizer.hash})
    load_model("sft", "cpu", tokenizer=tokenizer)
    meta_path = os.path.join(ckpt, "meta_000003.json")
    message = (f"error: {meta_path} was trained with tokenizer {tokenizer.hash} (vocab {V}) but {tmp_path / 'other' / 'tokenizer.pkl'} "
               f"is {other.hash} (vocab {V}): put that tokenizer back, or train from this one again")
    for load in (lambda: load_model("sft", "cpu", tokenizer=other), lambda: load_checkpoint(ckpt, 3, "cpu", tokenizer=other)):
        with pytest.raises(common.UserError) as e:
            load()
        assert e.value.code == message


def test_model_bf16_autocast_on_cpu():
    model = small_model(n_head=4, n_kv_head=2)
    x = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, atol=0.05, rtol=0.02)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, x)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    engine = Engine(model, ByteTokenizer())
    prompt = list(range(30, 45))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cols = list(engine.generate(prompt, num_samples=2, max_tokens=10, temperature=0.0))
    got, ref_tokens = [c[0][0] for c in cols], naive_greedy(model, prompt, 10)
    assert got[:3] == ref_tokens[:3] and sum(a == b for a, b in zip(got, ref_tokens)) >= 7  # bf16 may flip a near-tie late
    assert all(c[0][0] == c[0][1] for c in cols)


def test_model_engine_with_real_tokenizer(tokenizer, tiny_model):
    text = "Café 🙂 naïve 世界 ok"
    streamer = TextStreamer(tokenizer)
    pieces = [streamer.push(i) for i in tokenizer.encode(text)]
    assert "".join(pieces) + streamer.flush() == text and "\ufffd" not in "".join(pieces)
    prompt = tokenizer.encode("Hello there", prepend="<|bos|>")
    engine = Engine(tiny_model.eval(), tokenizer)
    rows, masks = engine.generate_batch(prompt, num_samples=2, max_tokens=6, temperature=0.0)
    assert rows[0] == rows[1] and rows[0][:len(prompt)] == prompt and len(rows[0]) <= len(prompt) + 6
    assert masks[0][:len(prompt)] == [0] * len(prompt) and all(m == 1 for m in masks[0][len(prompt):])
    fake = ScriptedModel(tokenizer)
    fake.prompt_len = len(prompt)
    cols = list(Engine(fake, tokenizer).generate(prompt, max_tokens=40, temperature=0.0))
    out = [c[0][0] for c in cols]
    S = tokenizer.encode_special
    i = out.index(S("<|output_start|>"))
    assert tokenizer.decode(out[i + 1:out.index(S("<|output_end|>"))]) == "36" and out[-1] == S("<|assistant_end|>")
    assert [c[1][0] for c in cols][i:out.index(S("<|output_end|>")) + 1] == [0] * (out.index(S("<|output_end|>")) - i + 1)


# -----------------------------------------------------------------------------
# export to a transformers folder (model.py export)

HF_TAG = "hf_test"  # its own tag under the session base dir


@pytest.fixture(scope="module", params=[{}, dict(rope_base=100_000, pad_vocab_to=640)], ids=["release", "rope_pad"])
def hf_export(base_dir, tokenizer, tiny_config, tmp_path_factory, request):
    """A tiny SFT checkpoint with every weight random (no zero-init head: the logits must carry signal), exported by the
    CLI and loaded once by transformers (a test dependency: absent only outside CI). The options transformers can hold
    (rotary base, padded vocabulary: cropped) export too."""
    tiny_config = dataclasses.replace(tiny_config, **request.param)
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        if os.environ.get("CI"):
            raise
        print("SKIP reason: transformers is not installed (bash run.sh --tests installs it)")
        pytest.skip("transformers not installed")
    from model import build_model, save_checkpoint
    torch.manual_seed(0)
    model = build_model(asdict(tiny_config), "cpu").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3) if not p.any() else None
    base = str(tmp_path_factory.mktemp("hf"))  # its own base dir: the model card reads the report
    shutil.copytree(os.path.join(base_dir, "tokenizer"), os.path.join(base, "tokenizer"))
    os.makedirs(os.path.join(base, "report"))
    for slug, text in [("base-model-training", "- tokens: 1,234,567"), ("chat-sft", "- tokens: 4,321"), ("chat-evaluation-sft", "- ARC-Easy: 0.3100")]:
        open(os.path.join(base, "report", f"{slug}.md"), "w").write(f"## {slug}\ntimestamp: now\n\n{text}\n")
    save_checkpoint(os.path.join(base, common.CHECKPOINT_DIRS["sft"], HF_TAG), 7, model.state_dict(), {"step": 7, "model_config": asdict(tiny_config), "val_bpb": 1.5})
    out = os.path.join(base, "export")
    p = run_script(["model.py", "export", "--source", "sft", "--tag", HF_TAG, "--out", out], env={"NANOCHAT_BASE_DIR": base})
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    return model, AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out), base


def _hf_conversation():
    return {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there, who are you?"},
                         {"role": "assistant", "content": "A small model. 🙂"}, {"role": "user", "content": "What is 12*3?\n\nThanks"},
                         {"role": "assistant", "content": [{"type": "text", "text": "Let me compute:"}, {"type": "python", "text": "12*3"},
                                                           {"type": "python_output", "text": "36"}, {"type": "text", "text": " It is 36."}]},
                         {"role": "user", "content": "  and   naïve 日本 123456? "}, {"role": "assistant", "content": "unused"}]}


def test_model_export_hf_logits_and_greedy(hf_export, tokenizer):
    model, hf_model, _, base = hf_export
    prompt = tokenizer.render_for_completion(_hf_conversation())
    torch.manual_seed(1)
    ids = torch.cat((torch.tensor([prompt]), torch.randint(0, tokenizer.get_vocab_size(), (1, 128 - len(prompt)))), dim=1)
    with torch.no_grad():
        ours, theirs = model(ids), hf_model(ids).logits
    diff = (ours - theirs).abs().max().item()
    print(f"max abs logit difference ours vs transformers (fp32, {ids.size(1)} tokens): {diff:.3g}")
    assert diff <= 1e-4 and ours.std() > 1.0  # logits that carry signal, not a zero head
    ours_gen = [col[0] for col, _ in Engine(model, tokenizer).generate(prompt, max_tokens=20, temperature=0.0)]
    theirs_gen = hf_model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0, len(prompt):].tolist()
    assert theirs_gen == ours_gen and len(set(ours_gen)) > 1
    card = open(os.path.join(base, "export", "README.md")).read()
    assert "`sft` checkpoint at step 7, validation bpb 1.5000." in card and "base (1,234,567 tokens) → sft (4,321 tokens)" in card
    assert "### chat-evaluation-sft\n- ARC-Easy: 0.3100" in card


def test_model_export_hf_tokenizer(hf_export, tokenizer):
    hf_tok = hf_export[2]
    texts = ["The quick brown fox jumps over the lazy dog. It's 'quoted', isn't it?", "def f(x):\n    return x ** 2  # square\n\n\tif a != b: pass\r\n",
             "1234567890 3.14159 1,000,000 and 2026-12-02", "naïve café Ünïcödé 日本語のテキスト Ελληνικά", "emoji 😀👍🏽👨‍👩‍👧 end",
             "a <|bos|> b <|assistant_end|>c<|user_start", "   lots   of \n\n  spaces  ", "", *itertools.islice(common.iter_documents("train"), 20)]
    hf_ids = hf_tok(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    for text, ids in zip(texts, hf_ids):
        assert ids == tokenizer.encode(text) and hf_tok.decode(ids) == text, text[:80]
    assert hf_tok("x<|bos|>")["input_ids"] == tokenizer.encode("x") + [tokenizer.get_bos_token_id()]  # HF default: specials in text are specials
    assert {s: hf_tok.convert_tokens_to_ids(s) for s in tokenizer.special} == tokenizer.special and len(tokenizer.special) == 9
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id) == (tokenizer.get_bos_token_id(), tokenizer.encode_special("<|assistant_end|>"))
    assert hf_export[1].generation_config.eos_token_id == [tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()]


def test_model_export_hf_chat_template(hf_export, tokenizer):
    conversation = _hf_conversation()
    ids = hf_export[2].apply_chat_template(conversation["messages"][:-1], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(ids) == tokenizer.render_for_completion(conversation)
    two = {"messages": conversation["messages"][1:3] + [{"role": "user", "content": "ok"}, {"role": "assistant", "content": ""}]}
    assert list(hf_export[2].apply_chat_template(two["messages"][:-1], add_generation_prompt=True, return_dict=False)) == tokenizer.render_for_completion(two)


def test_model_export_cli_bad_input(hf_export, tmp_path, monkeypatch):
    from model import export_hf
    monkeypatch.setenv("NANOCHAT_BASE_DIR", hf_export[3])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    p = run_script(["model.py", "export", "--source", "pretrain", "--out", str(tmp_path / "new")], check=False)
    assert p.returncode != 0 and p.stderr.startswith("error: unknown stage 'pretrain'") and len(p.stderr.strip().splitlines()) == 1, p.stderr
    for kwargs, message in [(dict(step=99), "no sft checkpoint at step 99"), (dict(out=str(tmp_path / "full")), "already exists and is not an empty folder")]:
        with pytest.raises((common.UserError, FileNotFoundError), match=message):  # the CLI prints these as one "error: ..." line
            export_hf(**{"source": "sft", "out": str(tmp_path / "new"), "tag": HF_TAG, **kwargs})
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # as if safetensors were not installed
    with pytest.raises(common.UserError, match="needs the safetensors package: pip install safetensors"):
        export_hf("sft", str(tmp_path / "new"), tag=HF_TAG)
    assert os.listdir(tmp_path / "full") == ["keep.txt"] and not os.path.exists(tmp_path / "new")


def test_model_export_refuses_options_transformers_cannot_hold(tokenizer, tmp_path, monkeypatch):
    from model import build_model, save_checkpoint, export_hf
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    cfg = dict(sequence_len=256, vocab_size=tokenizer.get_vocab_size(), n_layer=3, n_head=2, n_kv_head=2, n_embd=64)
    shutil.copytree(os.path.dirname(tokenizer.path), tmp_path / "tokenizer")
    for options, named in [(dict(value_embeds=True, smear=True), "value_embeds, smear"), (dict(window_pattern="SL"), "window_pattern"),
                           (ALL_OPTIONS, "window_pattern, qk_scale, resid_lambdas, value_embeds, smear, backout")]:
        model = build_model(dict(cfg, **options), "cpu")
        save_checkpoint(str(tmp_path / common.CHECKPOINT_DIRS["sft"] / "opt"), 1, model.state_dict(), {"model_config": asdict(model.config)})
        with pytest.raises(common.UserError, match=f"cannot represent this model's {named}: not exported"):
            export_hf("sft", str(tmp_path / "out"), tag="opt")
        assert not os.path.exists(tmp_path / "out")
        shutil.rmtree(tmp_path / common.CHECKPOINT_DIRS["sft"] / "opt")


def test_model_tiny_temperatures_sample_valid_ids():
    """issue 27: every temperature the API accepts gives valid probabilities; below TEMPERATURE_FLOOR (1e-40 gave NaN) it is
    greedy, from the floor on it samples."""
    from model import sample_next_token, TEMPERATURE_FLOOR
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 10
    for t in (1e-40, 1e-30, 1e-10, TEMPERATURE_FLOOR / 2):
        for k in (None, 5):
            ids = sample_next_token(logits, torch.Generator().manual_seed(0), t, k)
            assert ids.view(-1).tolist() == logits.argmax(-1).tolist(), (t, k)
    for t in (TEMPERATURE_FLOOR, 1e-3, 2.0):
        ids = sample_next_token(logits, torch.Generator().manual_seed(0), t, None)
        assert ids.shape == (3, 1) and 0 <= ids.min() and ids.max() < 50
    flat = torch.zeros(1, 50)  # at the floor it still samples: a flat row is not always id 0
    assert len({sample_next_token(flat, torch.Generator().manual_seed(i), TEMPERATURE_FLOOR).item() for i in range(20)}) > 1


def test_model_export_out_under_a_file_or_onto_a_full_disk(hf_export, tmp_path):
    """Issue 27: --out under a file, or a write that fails half way (a file-size limit as a full disk): one line, and
    nothing half-written is left (the folder is written whole beside --out, then renamed)."""
    import resource
    limit = os.path.getsize(os.path.join(hf_export[3], "export", "model.safetensors")) // 2
    (tmp_path / "file").write_text("mine")
    for out, preexec in ((str(tmp_path / "file" / "sub"), None),
                         (str(tmp_path / "new"), lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))):
        p = subprocess.run([sys.executable, "model.py", "export", "--source", "sft", "--tag", HF_TAG, "--out", out],
                           cwd=REPO, env=dict(os.environ, NANOCHAT_BASE_DIR=hf_export[3]), capture_output=True,
                           text=True, timeout=300, preexec_fn=preexec)
        assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1, p.stderr[-3000:]
        assert p.stderr.startswith(f"error: could not write --out {out} (") and "is the disk full" in p.stderr, p.stderr
    assert os.listdir(tmp_path) == ["file"] and (tmp_path / "file").read_text() == "mine"


# =============================================================================
# data.py
# =============================================================================

SHARD0_URL = data.SHARD_URL.format(0)
SHARD0_PATH = "/" + SHARD0_URL.split("://", 1)[1]


# -----------------------------------------------------------------------------
# a local HTTP mirror that misbehaves on demand

class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        srv = self.server
        path = urllib.parse.unquote(self.path)
        if path != "/SHA256SUMS":  # read once per mirror by data._mirror_sums; the log is about the files themselves
            srv.log.append((path, self.headers.get("Range")))
        modes = srv.modes.get(path)
        mode = modes.pop(0) if modes else "ok"
        if mode == "503":
            return self.send_error(503)
        if mode == "html":  # a captive portal: 200 with its login page
            page = b"<!DOCTYPE html>\n<html><body>Please sign in to use this network</body></html>\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            return self.wfile.write(page)
        file = os.path.join(srv.root, path.lstrip("/"))
        if not os.path.isfile(file):
            return self.send_error(404)
        body = open(file, "rb").read()
        if mode == "truncated":
            body = body[:len(body) // 2]
        rng = self.headers.get("Range")
        if rng and mode != "ignore_range":
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(body):
                return self.send_error(416)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            body = body[start:]
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if mode == "slow":  # 16 KiB every 0.1 s, until the client goes away
            with contextlib.suppress(OSError):
                for i in range(0, len(body), 16384):
                    self.wfile.write(body[i:i + 16384])
                    time.sleep(0.1)
            return
        if mode == "drop":  # half the body, then the connection goes away
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def http_mirror(tmp_path, monkeypatch):
    """Serves MIRROR over http://127.0.0.1:<free port>; srv.modes[path] = [mode, ...] scripts the next answers."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.root, srv.modes, srv.log = MIRROR, {}, []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(data, "BACKOFF", 0.01)
    monkeypatch.setattr(data, "CHUNK", 64 * 1024)  # small writes, so a dropped connection leaves a partial file
    common.set_mirror(f"http://127.0.0.1:{srv.server_address[1]}")
    try:
        yield srv
    finally:
        common.set_mirror(MIRROR)
        srv.shutdown()
        srv.server_close()


def _same_as_mirror(path):
    return open(path, "rb").read() == open(os.path.join(SHARD_DIR, "shard_00000.parquet"), "rb").read()


def test_data_download_resumes_after_dropped_connection(http_mirror, tmp_path):
    http_mirror.modes[SHARD0_PATH] = ["drop"]
    dest = data.download_file(SHARD0_URL, str(tmp_path / "s.parquet"))
    assert _same_as_mirror(dest)
    (p1, r1), (p2, r2) = http_mirror.log
    assert r1 is None and r2 is not None and int(r2.split("=")[1].split("-")[0]) > 0  # resumed, not restarted
    assert sorted(os.listdir(tmp_path)) == ["s.parquet"]  # no .part or .lock left


def test_data_download_200_to_range_restarts_cleanly(http_mirror, tmp_path):
    http_mirror.modes[SHARD0_PATH] = ["drop", "ignore_range"]
    dest = data.download_file(SHARD0_URL, str(tmp_path / "s.parquet"))
    assert _same_as_mirror(dest) and len(http_mirror.log) == 2 and http_mirror.log[1][1] is not None


def test_data_download_416_starts_over(http_mirror, tmp_path):
    dest = str(tmp_path / "s.parquet")
    open(dest + ".part", "wb").write(b"x" * 5_000_000)  # a stale partial file longer than the real one
    data.download_file(SHARD0_URL, dest)
    assert _same_as_mirror(dest) and len(http_mirror.log) == 2 and http_mirror.log[1][1] is None


def test_data_download_retries_503(http_mirror, tmp_path):
    http_mirror.modes[SHARD0_PATH] = ["503", "503"]
    assert _same_as_mirror(data.download_file(SHARD0_URL, str(tmp_path / "s.parquet")))
    assert len(http_mirror.log) == 3


def test_data_download_404_is_a_clear_error_without_retries(http_mirror, tmp_path):
    url = data.SHARD_URL.format(999)
    with pytest.raises(data.NotFound, match="404.*shard_00999.parquet"):
        data.download_file(url, str(tmp_path / "s.parquet"))
    assert len(http_mirror.log) == 1 and os.listdir(tmp_path) == []


def test_data_download_truncated_file_is_fetched_again(http_mirror, tmp_path):
    http_mirror.modes[SHARD0_PATH] = ["truncated"]
    assert _same_as_mirror(data.download_file(SHARD0_URL, str(tmp_path / "s.parquet")))
    assert len(http_mirror.log) == 2


@SLOW
def test_data_download_cli_with_relative_mirror_from_another_cwd(tmp_path):
    os.symlink(MIRROR, tmp_path / "mirror")
    base = tmp_path / "base"
    p = run_script([os.path.join(REPO, "data.py"), "download", "-n", "1", "--mirror", "mirror"], cwd=str(tmp_path),
                   env={"NANOCHAT_BASE_DIR": str(base), "NANOCHAT_MIRROR": ""})
    assert sorted(os.listdir(base / "base_data")) == ["shard_00000.parquet", "shard_01822.parquet"], p.stdout
    assert "MB/s" in p.stdout
    bad = run_script([os.path.join(REPO, "data.py"), "download", "-n", "1", "--mirror", "nowhere"], cwd=str(tmp_path),
                     env={"NANOCHAT_BASE_DIR": str(tmp_path / "b2"), "NANOCHAT_MIRROR": ""}, check=False)
    assert bad.returncode != 0 and "not in the mirror" in bad.stderr


def test_data_eval_bundle_once_with_concurrent_callers(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    results = []
    threads = [threading.Thread(target=lambda: results.append(data.download_eval_bundle())) for _ in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert results == [str(tmp_path / "eval_bundle")] * 3
    assert os.path.exists(tmp_path / "eval_bundle" / "core.yaml") and os.path.isdir(tmp_path / "eval_bundle" / "eval_data")
    assert sorted(os.listdir(tmp_path)) == ["eval_bundle", "eval_bundle.zip"]


# -----------------------------------------------------------------------------
# pretraining loader

def _all_batches_equal(a, b):
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


def test_data_loader_rows_start_with_bos(base_dir, tokenizer):
    loader = data.PretrainLoader(tokenizer, 4, 64, buffer_docs=50)
    bos = tokenizer.get_bos_token_id()
    for _ in range(5):
        x, y = next(loader)
        assert x.shape == y.shape == (4, 64) and x.dtype == y.dtype == torch.int64
        assert (x[:, 0] == bos).all() and torch.equal(x[:, 1:], y[:, :-1])
    loader.close()


def test_data_loader_ranks_disjoint_and_no_rowgroup_error(base_dir, tokenizer):
    l0 = data.PretrainLoader(tokenizer, 2, 32, rank=0, world_size=2, buffer_docs=8)
    l1 = data.PretrainLoader(tokenizer, 2, 32, rank=1, world_size=2, buffer_docs=8)
    assert set(l0.row_groups).isdisjoint(l1.row_groups) and len(l0.row_groups) + len(l1.row_groups) == 14
    next(l0), next(l1)
    docs0 = {(l0.row_groups[g], j) for _, g, j, _ in l0.state_dict()["buffer"]}
    docs1 = {(l1.row_groups[g], j) for _, g, j, _ in l1.state_dict()["buffer"]}
    assert docs0 and docs1 and not docs0 & docs1
    l0.close(), l1.close()
    with pytest.raises(common.UserError, match="gets no row group"):
        data.PretrainLoader(tokenizer, 2, 32, split="val", rank=9, world_size=10)


@pytest.fixture
def tiny_shards(tmp_path, monkeypatch):
    """A base dir with two small train shards and a val shard of short documents (so epochs end quickly)."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    os.makedirs(tmp_path / "base_data")
    rng = random.Random(0)
    words = "the of a cell energy light river history market water star law".split()
    for idx in (0, 1, common.VAL_SHARD_INDEX):
        docs = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 60))) + f" doc{idx}-{i}." for i in range(40)]
        pq.write_table(pa.table({"text": docs}), str(tmp_path / "base_data" / f"shard_{idx:05d}.parquet"), row_group_size=8)
    return tmp_path




def test_data_loader_resume_is_exact_across_epochs(tiny_shards, tokenizer):
    kw = dict(buffer_docs=12, threads=1)
    ref = data.PretrainLoader(tokenizer, 3, 48, **kw)
    run = [next(ref) for _ in range(80)]
    assert ref.epoch >= 2, ref.epoch  # several epochs went by
    ref.close()
    for cut in (0, 7, 45):
        a = data.PretrainLoader(tokenizer, 3, 48, **kw)
        [next(a) for _ in range(cut)]
        sd = json.loads(json.dumps(a.state_dict()))  # must survive JSON (it goes into checkpoint meta)
        a.close()
        b = data.PretrainLoader(tokenizer, 3, 48, **kw)
        b.load_state_dict(sd)
        assert _all_batches_equal([next(b) for _ in range(80 - cut)], run[cut:]), f"cut at {cut}"
        b.close()


def test_data_loader_keeps_remainders(tiny_shards, tokenizer):
    """Every token of every document reaches a batch once per epoch (cropped rests stay as BOS-prefixed pieces)."""
    loader = data.PretrainLoader(tokenizer, 2, 40, buffer_docs=4, threads=1)
    while loader.epoch == 0:
        next(loader)
    st = loader.stats
    assert st["tokens_used"] + sum(len(p[0]) - p[1] for p in loader.buffer) == st["tokens_read"]
    loader.close()


def test_data_loader_val_split(base_dir, tokenizer):
    assert data.PretrainLoader(tokenizer, 2, 64, split="val").buffer_docs == 200  # the whole shard, not 5 copies of it
    loader = data.PretrainLoader(tokenizer, 2, 64, split="val", buffer_docs=10)
    first = next(loader)
    again = data.PretrainLoader(tokenizer, 2, 64, split="val", buffer_docs=10)
    assert torch.equal(next(again)[0], first[0])  # a fresh val loader always gives the same batches
    loader.close(), again.close()


# -----------------------------------------------------------------------------
# chat loader

class ListTask:
    def __init__(self, convs):
        self.convs = convs

    def __len__(self):
        return len(self.convs)

    def __getitem__(self, i):
        return self.convs[i]


def _chat(i):
    return {"messages": [{"role": "user", "content": f"question {i} " * (i % 5 + 1)},
                         {"role": "assistant", "content": f"answer {i} " * (i % 3 + 1)}]}


def test_data_chatloader_mid_vs_sft_masks(base_dir, tokenizer):
    task = ListTask([_chat(i) for i in range(30)])
    bos = tokenizer.get_bos_token_id()
    ast = tokenizer.encode_special("<|assistant_start|>")
    aend = tokenizer.encode_special("<|assistant_end|>")
    mid = data.ChatLoader(task, tokenizer, 4, 64, completion_only=False, buffer=10)
    sft = data.ChatLoader(task, tokenizer, 4, 64, completion_only=True, buffer=10)
    (xm, ym), (xs, ys) = next(mid), next(sft)
    assert torch.equal(xm, xs) and (xm[:, 0] == bos).all() and xm.dtype == ym.dtype == torch.int64
    assert ((ym >= 0).sum(1) > 0).all() and (ys >= 0).sum() < (ym >= 0).sum()
    assert ((ys == -1) | (ym == ys)).all()  # SFT targets are a subset of mid targets
    for b in range(4):  # SFT: supervised targets lie between <|assistant_start|> and <|assistant_end|> only
        inside = False
        for t in range(64):
            if xs[b, t] == ast:
                inside = True
            if ys[b, t] >= 0:
                assert inside
            if ys[b, t] == aend:
                inside = False
        # padding at the end of a row: BOS inputs whose targets are -1 in both modes
        n_conv_tokens = int((ym[b] >= 0).sum()) + 1
        assert (ym[b, n_conv_tokens:] == -1).all()
    # mid also trains the BOS that starts the next conversation in a row (one conversation = one <|assistant_start|>)
    assert torch.equal((ym == bos).sum(1), (xm == ast).sum(1) - 1) and not (ys == bos).any()
    # every conversation is whole: as many <|assistant_end|> as <|assistant_start|>
    assert (xm == ast).sum() == ((xm == aend).sum() + (ym[:, -1] == aend).sum())


def test_data_chatloader_prompts_only_gives_no_nan(base_dir, tokenizer, tiny_model):
    task = ListTask([{"messages": [{"role": "user", "content": f"just a prompt {i}"}]} for i in range(8)])
    x, y = next(data.ChatLoader(task, tokenizer, 2, 32, completion_only=True, buffer=4))
    assert (y == -1).all()
    loss = tiny_model(x, y, loss_reduction="sum") / max(1, int((y >= 0).sum()))  # the guard ChatLoader documents
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == 0.0
    assert all(torch.isfinite(p.grad).all() and not p.grad.any() for p in tiny_model.parameters() if p.grad is not None)


def test_data_chatloader_progress_resume(base_dir, tokenizer):
    task = ListTask([_chat(i) for i in range(41)])
    loader = data.ChatLoader(task, tokenizer, 2, 48, rank=1, world_size=2, buffer=5)
    assert loader.share == 20 and loader.progress == 0.0
    steps, prog = 0, []
    while loader.progress < 1.0:
        next(loader)
        prog.append(loader.progress)
        steps += 1
    assert prog == sorted(prog) and prog[-1] == 1.0 and steps > 2
    sd = json.loads(json.dumps(loader.state_dict()))
    cont = [next(loader) for _ in range(4)]
    again = data.ChatLoader(task, tokenizer, 2, 48, rank=1, world_size=2, buffer=5)
    again.load_state_dict(sd)
    assert _all_batches_equal([next(again) for _ in range(4)], cont)
    with pytest.raises(common.UserError, match="gets no conversation"):
        data.ChatLoader(ListTask([_chat(0)]), tokenizer, 1, 16, rank=1, world_size=2)


# -----------------------------------------------------------------------------
# tasks

def _well_formed(conv, tokenizer):
    msgs = conv["messages"]
    assert len(msgs) >= 2 and len(msgs) % 2 == 0
    for i, m in enumerate(msgs):
        assert m["role"] == ("user" if i % 2 == 0 else "assistant")
        assert isinstance(m["content"], str) if m["role"] == "user" else isinstance(m["content"], (str, list))
    ids, mask = tokenizer.render_conversation(conv)
    assert sum(mask) > 0


def test_data_tasks_read_mirror_files(base_dir, tokenizer):
    tasks = {"smoltalk": data.SmolTalk("train"), "smoltalk-test": data.SmolTalk("test", size=50),
             "mmlu": data.MMLU("all", "test"), "mmlu-aux": data.MMLU("auxiliary_train", "train", size=300),
             "arc-e": data.ARC("ARC-Easy", "train"), "arc-c": data.ARC("ARC-Challenge", "test"),
             "gsm8k": data.GSM8K("train"), "humaneval": data.HumanEval(), "identity": data.Identity(),
             "spell": data.SimpleSpelling(100, "train"), "bee": data.SpellingBee(100, "test")}
    sizes = {k: len(t) for k, t in tasks.items()}
    assert sizes == {"smoltalk": 6541, "smoltalk-test": 50, "mmlu": 1531, "mmlu-aux": 300, "arc-e": 725, "arc-c": 799,
                     "gsm8k": 7473, "humaneval": 164, "identity": 500, "spell": 100, "bee": 100}
    for task in tasks.values():
        for i in (0, 1, len(task) - 1):
            conv = task[i]
            _well_formed(conv, tokenizer)
            if task.eval_type == "categorical":
                answer = conv["messages"][-1]["content"]
                assert answer in conv["letters"] and task.evaluate(conv, answer) and not task.evaluate(conv, "Z")
                assert conv["messages"][0]["content"].startswith("Multiple Choice question: ")
    assert tasks["mmlu-aux"][0]["letters"] == list("ABCD")
    g = tasks["gsm8k"][0]
    kinds = [p["type"] for p in g["messages"][1]["content"]]
    assert "python" in kinds and kinds[kinds.index("python") + 1] == "python_output"
    ref_text = "".join(p["text"] for p in g["messages"][1]["content"] if p["type"] == "text")
    assert tasks["gsm8k"].evaluate(g, ref_text) and not tasks["gsm8k"].evaluate(g, "#### 123456789")
    assert len({tasks["identity"][i]["messages"][-1]["content"] for i in range(500)}) > 10
    assert any("nanochat" in m["content"] for i in range(20) for m in tasks["identity"][i]["messages"])
    # shuffled with default_rng(42), deterministic
    assert data.MMLU("all", "test")[5] == tasks["mmlu"][5]
    for name, ctor in data.TASKS.items():
        assert len(ctor(size=3)) == 3, name


def test_data_humaneval_program_runs(base_dir):
    task = data.HumanEval(size=5)
    for i in range(3):
        conv = task[i]
        canonical = conv["messages"][1]["content"]
        for completion in (canonical, f"Here you go:\n```python\n{canonical}\n```\nDone."):
            program = data.build_program(conv, completion)
            p = subprocess.run([sys.executable, "-c", program], capture_output=True, timeout=30)
            assert p.returncode == 0, p.stderr
        assert task.evaluate(conv, canonical, execute=lambda prog: {"success": "check(" in prog})
        broken = subprocess.run([sys.executable, "-c", data.build_program(conv, "def nothing(): pass")], capture_output=True)
        assert broken.returncode != 0


def test_data_gsm8k_parts_mc_and_extraction():
    row = {"question": "q", "answer": "Rate = $<<12/60=0.2>>0.2 per minute\n#### 1,200"}
    conv = data.GSM8K.conversation(None, row)
    assert conv["messages"][1]["content"] == [
        {"type": "text", "text": "Rate = $"}, {"type": "python", "text": "12/60"},
        {"type": "python_output", "text": "0.2"}, {"type": "text", "text": "0.2 per minute\n#### 1,200"}]
    assert data.extract_answer("so #### -1,234.5 done") == "-1234.5" and data.extract_answer("no answer") is None
    assert data.render_mc("Q?", ["A", "B"], ["x", "y"]) == (
        "Multiple Choice question: Q?\n- x=A\n- y=B\n\nRespond only with the letter of the correct answer.")


def _write_hf(root, repo, subset, split, table, index=0):
    path = os.path.join(root, "huggingface.co", "datasets", repo, "resolve", "refs", "convert", "parquet", subset, split)
    os.makedirs(path, exist_ok=True)
    pq.write_table(table, os.path.join(path, f"{index:04d}.parquet"))


def test_data_arc_numeric_labels_and_multi_file_splits(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    rows = [{"id": "a", "question": "Three?", "choices": {"text": ["x", "y", "z"], "label": ["1", "2", "3"]}, "answerKey": "2"},
            {"id": "b", "question": "Five?", "choices": {"text": list("vwxyz"), "label": list("ABCDE")}, "answerKey": "E"}]
    _write_hf(str(mirror), "allenai/ai2_arc", "ARC-Easy", "train", pa.Table.from_pylist(rows[:1]), 0)
    _write_hf(str(mirror), "allenai/ai2_arc", "ARC-Easy", "train", pa.Table.from_pylist(rows[1:]), 1)
    common.set_mirror(str(mirror))
    try:
        task = data.ARC("ARC-Easy", "train")
        assert len(task) == 2
        convs = sorted((task[i] for i in range(2)), key=lambda c: len(c["letters"]))
        assert convs[0]["letters"] == ["1", "2", "3"] and convs[0]["messages"][1]["content"] == "2"
        assert "- y=2\n" in convs[0]["messages"][0]["content"]
        assert convs[1]["letters"] == list("ABCDE") and convs[1]["messages"][1]["content"] == "E"
        assert task.evaluate(convs[0], " 2\n") and not task.evaluate(convs[0], "B")
        manifest = json.load(open(tmp_path / "base" / "task_data" / "allenai__ai2_arc" / "ARC-Easy" / "train" / "manifest.json"))
        assert manifest["files"] == ["0000.parquet", "0001.parquet"]
        common.set_mirror(str(tmp_path / "empty"))  # cached: no network (mirror) needed any more
        assert len(data.ARC("ARC-Easy", "train")) == 2
        with pytest.raises(data.NotFound):
            data.ARC("ARC-Challenge", "train")
    finally:
        common.set_mirror(MIRROR)


def test_data_spelling(base_dir):
    words = data._words()
    assert len(words) == 370_099 and not any("\r" in w or w != w.strip() for w in words)
    simple = data.SimpleSpelling(20, "train")
    w = simple[3]["messages"][0]["content"].split(": ")[1]
    assert simple[3]["messages"][1]["content"] == w + ":" + ",".join(w)
    assert simple.evaluate(simple[3], f" {w}:{','.join(w)}\n") and not simple.evaluate(simple[3], w)
    bee = data.SpellingBee(200, "train")
    tests = data.SpellingBee(200, "test")
    assert bee[0] == data.SpellingBee(5, "train")[0] and bee[0] != tests[0]
    for i in range(200):
        conv = bee[i]
        parts = conv["messages"][1]["content"]
        word, letter = re.match(r"'(\w+)'\.count\('(\w)'\)", parts[2]["text"]).groups()
        assert parts[3]["text"] == str(word.count(letter)) and parts[-1]["text"].endswith(f"#### {word.count(letter)}")
        assert bee.evaluate(conv, f"so #### {word.count(letter)}") and not bee.evaluate(conv, "#### 99")
        assert "\r" not in conv["messages"][0]["content"]




def test_data_mixtures_are_deterministic(base_dir):
    a, b = data.Identity(size=30), data.SimpleSpelling(20, "train")
    mix = data.TaskMixture([a, b, a])
    assert len(mix) == 80
    again = data.TaskMixture([data.Identity(size=30), data.SimpleSpelling(20, "train"), data.Identity(size=30)])
    assert [mix[i] for i in range(80)] == [again[i] for i in range(80)]
    assert mix.index != data.TaskMixture([a, b, a], seed=1).index
    assert sorted(mix.index) == [(t, i) for t, n in enumerate((30, 20, 30)) for i in range(n)]


def test_data_task_files_over_http_stop_at_first_404(http_mirror, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    task = data.ARC("ARC-Challenge", "validation")
    assert len(task) == 49 and task[0]["letters"] == list("ABCD")
    paths = [p for p, _ in http_mirror.log]
    assert paths[0].endswith("ARC-Challenge/validation/0000.parquet") and paths[1].endswith("/0001.parquet") and len(paths) == 2
    assert "refs/convert/parquet" in paths[0]  # %2F in the upstream URL reached the server as an encoded slash


def test_data_stale_lock_is_broken(tmp_path):
    dest = str(tmp_path / "s.parquet")
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    open(dest + ".lock", "w").write(f"{socket.gethostname()}:{p.stdout.strip()}")  # its owner has exited
    assert _same_as_mirror(data.download_file(SHARD0_URL, dest)) and not os.path.exists(dest + ".lock")


def test_data_download_shards_parallel_over_http(http_mirror, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    http_mirror.modes[SHARD0_PATH] = ["503"]
    paths = data.download_shards(2, workers=2)
    assert [os.path.basename(p) for p in paths] == ["shard_00000.parquet", "shard_00001.parquet", "shard_01822.parquet"]
    assert all(pq.ParquetFile(p).metadata.num_rows > 0 for p in paths) and "3/3" in capsys.readouterr().out


@pytest.mark.parametrize("mirror", ["dir", "http", "dir without SHA256SUMS"])
def test_data_download_repairs_damaged_shards(mirror, tmp_path, monkeypatch, capsys, request):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    if mirror == "http":
        request.getfixturevalue("http_mirror")  # serves MIRROR, SHA256SUMS included
    elif mirror == "dir without SHA256SUMS":  # then the size and a read of every row group decide
        own = tmp_path / "mirror" / os.path.relpath(SHARD_DIR, MIRROR)
        os.makedirs(own)
        for i in (0, 1, common.VAL_SHARD_INDEX):
            shutil.copy(os.path.join(SHARD_DIR, f"shard_{i:05d}.parquet"), own)
        common.set_mirror(str(tmp_path / "mirror"))
        request.addfinalizer(lambda: common.set_mirror(MIRROR))
    paths = data.download_shards(2, workers=1)
    for path, how in zip(paths, ["truncate", "overwrite", "empty"]):
        damage(path, how)
    capsys.readouterr()
    assert data.download_shards(2, workers=1) == paths
    out, err = capsys.readouterr()
    for path in paths:
        assert open(path, "rb").read() == open(os.path.join(SHARD_DIR, os.path.basename(path)), "rb").read(), path
        assert f"{path}: " in err and "; fetching it again" in err
    assert "3/3 shards" in out and len(err.splitlines()) == 3
    capsys.readouterr()
    data.download_shards(2, workers=1)  # nothing to repair: nothing said
    assert capsys.readouterr().err == ""


def test_data_download_bad_shard_counts(tmp_path, monkeypatch):
    p = run_script(["data.py", "download", "-n", "-5"], env={"NANOCHAT_BASE_DIR": str(tmp_path)}, check=False)
    assert p.returncode == 1 and p.stderr == "error: -n/--num-shards must be -1 (all) or 1..1822, not -5\n", p.stderr
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    for n in (0, -2, 1823):
        with pytest.raises(common.UserError, match=f"must be -1 \\(all\\) or 1..1822, not {n}$"):
            data.download_shards(n)
    assert not os.path.exists(tmp_path / "base_data")


@SLOW
def test_data_unreadable_shard_stops_with_one_line(tokenizer, base_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    os.makedirs(tmp_path / "base_data")
    for i in (0, common.VAL_SHARD_INDEX):
        shutil.copy(os.path.join(SHARD_DIR, f"shard_{i:05d}.parquet"), tmp_path / "base_data")
    os.symlink(os.path.join(base_dir, "tokenizer"), tmp_path / "tokenizer")
    path = str(tmp_path / "base_data" / "shard_00000.parquet")
    message = f"^error: {re.escape(path)} is unreadable \\(.+\\): repair it with `python data.py download -n 1`$"
    damage(path, "overwrite")  # the footer reads: the damage shows when a row group is read (in the loader's thread)
    loader = data.PretrainLoader(tokenizer, 2, 32)
    with pytest.raises(common.UserError, match=message):
        next(loader)
    with pytest.raises(common.UserError, match=message):
        list(common.iter_row_groups("train"))
    damage(path, "truncate")
    with pytest.raises(common.UserError, match=message):
        data.PretrainLoader(tokenizer, 2, 32)
    p = run_script(["train.py", *TINY_BASE, "--num-iterations", "1"], check=False, env={"NANOCHAT_BASE_DIR": str(tmp_path)})
    assert p.returncode == 1 and re.fullmatch(message, p.stderr.strip()) and p.stderr.count("\n") == 1, p.stderr


# -----------------------------------------------------------------------------
# data.py prepare: the user's own corpus as shards

def _prepare(*argv):
    """`python data.py prepare ...` in this process (NANOCHAT_BASE_DIR as set by the test)."""
    argv0 = sys.argv
    sys.argv = ["data.py", "prepare", *argv]
    try:
        data.main()
    finally:
        sys.argv = argv0


def _prepared():
    """{'train': [docs], 'val': [docs]} of the shards in base_data/."""
    return {split: list(common.iter_documents(split)) for split in ("train", "val")}


def test_data_prepare_every_format(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    src = tmp_path / "corpus"
    (src / "deep" / "er").mkdir(parents=True)
    (src / "a.txt").write_text("a whole file\n\nis one document\n")
    (src / "deep" / "b.md").write_text("# markdown\ntoo\n")
    (src / "c.jsonl").write_text('{"text": "jsonl one"}\n\n{"text": "jsonl two", "n": 2}\n')
    import gzip
    with gzip.open(src / "deep" / "d.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "gzipped jsonl"}) + "\n")
    with pa.output_stream(str(src / "deep" / "er" / "e.txt.zst"), compression="zstd") as f:
        f.write("zstd text ünïcödé".encode())
    pq.write_table(pa.table({"text": ["parquet one", "parquet two", None], "n": [1, 2, 3]}), src / "f.parquet")
    (src / "skipped.bin").write_bytes(b"\0\1\2")  # a directory's files of other formats are left out
    _prepare("--input", str(src), "--val-docs", "2")
    want = {"a whole file\n\nis one document\n", "# markdown\ntoo\n", "jsonl one", "jsonl two", "gzipped jsonl",
            "zstd text ünïcödé", "parquet one", "parquet two"}
    got = _prepared()
    assert len(got["val"]) == 2 and sorted(got["train"] + got["val"]) == sorted(want)
    # the downloaded layout: shard_00000 + the validation shard, a `text` column, zstd
    names = sorted(os.listdir(tmp_path / "base" / "base_data"))
    assert names == [data.PREPARED, "shard_00000.parquet", f"shard_{common.VAL_SHARD_INDEX:05d}.parquet"], names
    md = pq.ParquetFile(tmp_path / "base" / "base_data" / names[1]).metadata
    assert md.schema.names == ["text"] and md.row_group(0).column(0).compression == "ZSTD"
    # paragraphs; jsonl under another field; stdin (a subprocess, so its stdin is ours to give)
    (tmp_path / "p.txt").write_text("one\nstill one\n\n\ntwo\n \nthree")
    (tmp_path / "q.jsonl").write_text(json.dumps({"body": "four"}) + "\n")
    _prepare("--input", str(tmp_path / "p.txt"), "--split-on-blank-lines", "--replace", "--val-docs", "1")
    got = _prepared()
    assert sorted(got["train"] + got["val"]) == ["one\nstill one", "three", "two"]
    _prepare("--input", str(tmp_path / "q.jsonl"), str(tmp_path / "p.txt"), "--text-field", "body", "--replace",
             "--val-docs", "1")
    assert sorted(sum(_prepared().values(), [])) == ["four", "one\nstill one\n\n\ntwo\n \nthree"]
    p = run_script(["data.py", "prepare", "--input", "-", "--split-on-blank-lines", "--replace"], input="x y\n\nz\n\nw",
                   env={"NANOCHAT_BASE_DIR": str(tmp_path / "base")})
    assert "prepared 3 documents" in p.stdout and sorted(sum(_prepared().values(), [])) == ["w", "x y", "z"]
    assert sorted(os.listdir(tmp_path / "base")) == ["base_data"]  # no stdin copy, lock or staging folder left


def test_data_prepare_validation_split_reproducible_and_disjoint(tmp_path, monkeypatch):
    docs = [f"document {i}: " + "word " * (i % 17) for i in range(3000)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    splits = []
    for run in ("a", "b"):
        monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / run))
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            _prepare("--input", str(tmp_path / "c.jsonl"), "--shard-chars", "20000")
        splits.append(_prepared())
        assert "prepared 3,000 documents" in out.getvalue()
    a, b = splits
    assert a == b  # the same corpus, the same split and order
    assert len(a["val"]) == 300 and not set(a["val"]) & set(a["train"])
    assert sorted(a["train"] + a["val"]) == sorted(docs)
    train = common.list_shards("train")
    assert len(train) > 2 and [os.path.basename(p)[6:11] for p in train] == [f"{i:05d}" for i in range(len(train))]
    groups = [pq.ParquetFile(p).metadata for p in train]
    assert all(md.row_group(g).num_rows == 2700 // 8 for md in groups[:-1] for g in range(md.num_row_groups))
    # the default for a large corpus is capped; the flags choose the size
    for flags, k in ((["--val-docs", "7"], 7), (["--val-fraction", "0.5"], 1500)):
        _prepare("--input", str(tmp_path / "c.jsonl"), "--replace", *flags)
        got = _prepared()
        assert len(got["val"]) == k and sorted(got["train"] + got["val"]) == sorted(docs)
    monkeypatch.setattr(data, "VAL_DOCS_MAX", 100)
    _prepare("--input", str(tmp_path / "c.jsonl"), "--replace")
    assert len(_prepared()["val"]) == 100


def test_data_prepare_bad_input_one_line_and_nothing_written(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(20)))
    (tmp_path / "empty").mkdir()
    cases = {  # file name -> (its bytes, extra flags, the error's pattern)
        "blank.txt": (b" \n\n", [], r"no text in 1 file\(s\) \(empty input\)"),
        "nofield.jsonl": (b'{"text": "ok"}\n{"body": "x"}\n', [], r"nofield.jsonl:2: no field 'text' \(has: body\)"),
        "notjson.jsonl": (b'{"text": "ok"}\n{"text": oops}\n', [], r"notjson.jsonl:2: not JSON"),
        "number.jsonl": (b'{"text": 3}\n', [], r"number.jsonl:1: field 'text' is int, not a string"),
        "latin1.txt": ("caf\xe9".encode("latin-1"), [], r"latin1.txt: invalid UTF-8 .*--errors replace"),
        "latin1.jsonl": (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', [], r"latin1.jsonl:2: invalid UTF-8"),
        "image.txt": (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", [], r"image.txt: a NUL byte, so this looks like a binary file"),
        "tiny.jsonl": (b'{"text": "one"}\n{"text": "two"}\n', ["--val-docs", "22"], r"has 22 documents, too few"),
        "table.parquet": (None, [], r"table.parquet: no text column 'text' \(columns: body\)"),
    }
    for name, (content, flags, pattern) in cases.items():
        if content is None:
            pq.write_table(pa.table({"body": ["x"]}), tmp_path / name)
        else:
            (tmp_path / name).write_bytes(content)
        with pytest.raises(common.UserError, match="^error: .*" + pattern):
            _prepare("--input", *([] if name == "blank.txt" else [str(good)]), str(tmp_path / name), *flags)
        assert not os.path.exists(tmp_path / "base" / "base_data"), name  # nothing written
    with pytest.raises(common.UserError, match="no .txt, .md, .jsonl or .parquet file"):
        _prepare("--input", str(tmp_path / "empty"))
    with pytest.raises(common.UserError, match="--val-fraction must be between 0 and 1"):
        _prepare("--input", str(good), "--val-fraction", "1.5")
    _prepare("--input", str(tmp_path / "latin1.txt"), str(good), "--errors", "replace")
    assert "caf\ufffd" in sum(_prepared().values(), [])
    before = _prepared()
    with pytest.raises(common.UserError, match=r"already holds 2 shards \(downloaded or prepared\): pass --replace"):
        _prepare("--input", str(good))
    with pytest.raises(common.UserError, match="notjson.jsonl:2"):  # a failed --replace keeps the old set
        _prepare("--input", str(tmp_path / "notjson.jsonl"), "--replace")
    assert _prepared() == before and sorted(os.listdir(tmp_path / "base")) == ["base_data"]
    with pytest.raises(common.UserError, match="holds a corpus of your own"):  # nor does a download mix with it
        data.download_shards(1)
    p = run_script(["data.py", "prepare", "--input", str(tmp_path / "image.txt")], check=False,
                   env={"NANOCHAT_BASE_DIR": str(tmp_path / "x")})
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "image.txt: a NUL byte" in p.stderr, p.stderr
    assert not p.stdout and not os.path.exists(tmp_path / "x" / "base_data")


@SLOW
def test_data_prepare_replace_is_atomic_under_kill_9(tmp_path, monkeypatch):
    """--replace killed (SIGKILL) at any moment leaves the old or the new set whole; so does a crash between renames."""
    base = tmp_path / "base"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    old_docs = [f"old {i}" for i in range(50)]
    new_docs = [f"new {i} " + "x" * (i % 500) for i in range(60_000)]
    (tmp_path / "old.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in old_docs))
    (tmp_path / "new.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in new_docs))
    _prepare("--input", str(tmp_path / "old.jsonl"))
    old_set, outcomes = sorted(sum(_prepared().values(), [])), []
    assert old_set == sorted(old_docs)
    cmd = [sys.executable, "data.py", "prepare", "--input", f"{tmp_path}/new.jsonl", "--replace",
           "--shard-chars", "2000000"]  # several shards
    duration = None
    for fraction in (None, 0.0, 0.2, 0.4, 0.6, 0.8, 0.9, 0.97):  # None: a whole run, timed; then kills spread over it
        p = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while p.poll() is None and time.time() < deadline:  # until this run holds the lock (a killed one's may linger)
            with contextlib.suppress(OSError):
                if open(f"{base}/base_data.lock").read().startswith(f"pid {p.pid} on {socket.gethostname()} "):
                    break
            time.sleep(0.005)
        t0 = time.time()
        if fraction is None:
            assert p.wait() == 0
            duration = time.time() - t0
        else:
            time.sleep(fraction * duration)
            p.kill()
            p.wait()
        got = sorted(sum(_prepared().values(), []))
        assert got in (old_set, sorted(new_docs)), (fraction, len(got))
        outcomes.append("new" if got != old_set else "old")
        if got != old_set:  # back to the old set for the next try
            _prepare("--input", str(tmp_path / "old.jsonl"), "--replace")
    assert outcomes[:2] == ["new", "old"], outcomes
    # a crash between the two renames (base_data -> base_data.old, base_data.new -> base_data): the old set comes back
    renames = []
    def crash_on_second(src, dst):  # of the folder renames (files are written by rename too)
        if os.path.isdir(src) and renames:
            raise KeyboardInterrupt("killed between the renames")
        renames.extend([src] if os.path.isdir(src) else [])
        os.rename(src, dst)
    monkeypatch.setattr(data.os, "replace", crash_on_second)
    (tmp_path / "small.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n')
    with pytest.raises((KeyboardInterrupt, SystemExit)):  # data.py's main turns an interrupt into exit 130
        _prepare("--input", str(tmp_path / "small.jsonl"), "--replace")
    monkeypatch.undo()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    assert not os.path.exists(base / "base_data") and os.path.isdir(f"{base}/base_data.old")
    assert sorted(sum(_prepared().values(), [])) == old_set


@SLOW
def test_data_prepare_non_english_end_to_end(tmp_path, monkeypatch):
    """A corpus in Cyrillic, CJK, Arabic and emoji: prepare -> tokenizer (exact round trips, bytes/token in
    `tokenizer.py eval`) -> base steps with falling loss -> eval.py bpb on its own validation shard."""
    import tokenizer as T
    phrases = ["Москва — столица России, зимой там идёт снег.", "Привет, как дела? Всё хорошо.", "我喜欢在周末读书和喝茶。",
               "北京是中国的首都。", "東京の桜はとても美しいです。", "اللغة العربية جميلة جدا.", "🎉🚀 ура 😀👍🏽 👨‍👩‍👧"]
    rng = random.Random(0)
    docs = [" ".join(rng.choice(phrases) for _ in range(rng.randint(3, 12))) for _ in range(400)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    base = str(tmp_path / "base")
    env = {"NANOCHAT_BASE_DIR": base}
    run_script(["data.py", "prepare", "--input", str(corpus)], env=env)
    run_script(["tokenizer.py", "train", "--vocab-size", "700"], env=env)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", base)
    tok = T.get_tokenizer()
    for text in phrases + docs[:50] + ["mixed: Ёж, 字, حرف, 🧪, e\u0301"]:
        assert tok.decode(tok.encode(text)) == text
    for phrase in phrases:  # merges learned in every script: fewer tokens than bytes
        assert len(tok.encode(phrase)) < len(phrase.encode()) / 1.5, phrase
    table = run_script(["tokenizer.py", "eval"], env=env).stdout
    rows = {line.split()[0]: line.split() for line in table.splitlines() if line.startswith(("fwe-train", "fwe-val"))}
    assert set(rows) == {"fwe-train", "fwe-val"} and all(float(r[3]) > 2.0 for r in rows.values()), table  # bytes/token
    run_script(["train.py", "--stage=base", *TINY_BASE, "--num-iterations", "30", "--eval-tokens", "0"], env=env)
    losses = [r["train_loss"] for _, r in sorted(_records(base, "base").items()) if "train_loss" in r]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses
    run_script(["eval.py", "--stage", "base", "bpb", "--device-batch-size", "2", "--eval-tokens", "256"], env=env)
    report = open(os.path.join(base, "report", "base-model-loss.md")).read()
    val_bpb = float(re.search(r"- val bpb: ([\d.]+)", report).group(1))
    assert 0 < val_bpb < 8, report


def test_data_web_page_from_the_mirror_is_an_error_and_never_cached(http_mirror, tmp_path, monkeypatch):
    words = "/" + data.WORDS_URL.split("://", 1)[1]
    task = "/huggingface.co/datasets/allenai/ai2_arc/resolve/refs/convert/parquet/ARC-Challenge/validation/0000.parquet"
    http_mirror.modes = {words: ["html"] * 9, task: ["html"] * 9}
    mirror = common.get_mirror()
    page = ("answered with a web page, not {}: check the mirror (--mirror, NANOCHAT_MIRROR) or the network "
            "(a login page?); nothing was kept")
    words_page = re.escape(f"{mirror}{words} {page.format('words_alpha.txt')}")
    with pytest.raises(common.UserError, match=f"^error: {words_page}$"):
        data.download_file(data.WORDS_URL, str(tmp_path / "words_alpha.txt"))
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    sent = mirror + task.replace("refs/convert/", "refs%2Fconvert%2F")
    with pytest.raises(common.UserError, match=f"^error: {re.escape(sent)} {re.escape(page.format('0000.parquet'))}$"):
        data.ARC("ARC-Challenge", "validation")
    assert os.listdir(tmp_path) == ["base"] and not [f for _, _, files in os.walk(tmp_path / "base") for f in files]
    assert len(http_mirror.log) == 2  # no retries
    # a web page cached by an earlier version is noticed and fetched again
    http_mirror.modes.clear()
    open(tmp_path / "words_alpha.txt", "w").write("<html><body>Please sign in</body></html>")
    path = data.download_file(data.WORDS_URL, str(tmp_path / "words_alpha.txt"))
    assert open(path, "rb").read() == open(os.path.join(MIRROR, words.lstrip("/")), "rb").read()
    # the CLI, whose downloads run in threads: one line
    shard = SHARD0_PATH
    http_mirror.modes[shard] = ["html"] * 9
    p = run_script(["data.py", "download", "-n", "1", "-w", "1", "--mirror", mirror], check=False,
                   env={"NANOCHAT_BASE_DIR": str(tmp_path / "cli")})
    assert p.returncode == 1 and p.stderr.endswith(page.format("shard_00000.parquet") + "\n"), p.stderr
    assert p.stderr.count("\n") == 1, p.stderr
    assert os.listdir(tmp_path / "cli" / "base_data") in ([], ["shard_01822.parquet"])  # the val shard may come first


def test_data_download_ctrl_c_stops_at_once_and_leaves_nothing_half_done(http_mirror, tmp_path):
    for i in (0, 1, 2, common.VAL_SHARD_INDEX):
        http_mirror.modes[SHARD0_PATH.replace("00000", f"{i:05d}")] = ["slow"]  # each shard takes ~7 s
    folder = tmp_path / "base_data"
    p = subprocess.Popen([sys.executable, "data.py", "download", "-n", "3", "-w", "2", "--mirror", common.get_mirror()],
                         cwd=REPO, env=dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path)), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not any(n.endswith(".part") and os.path.getsize(folder / n) for n in
                                                 (os.listdir(folder) if folder.is_dir() else [])):
            time.sleep(0.05)
        assert sum(n.endswith(".lock") for n in os.listdir(folder)) == 2  # two downloads under way
        t0 = time.time()
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=10)
        took = time.time() - t0
    finally:
        p.kill()
    assert took < 5 and p.returncode == 130, (took, p.returncode, err)  # (before: after every download, ~15 s)
    assert err.endswith("\ninterrupted: the files fetched so far are kept; the same command fetches the rest\n"), err
    assert "Traceback" not in err
    assert os.listdir(folder) == []  # no partial file, no lock


def test_data_null_texts_are_skipped_with_a_note(tokenizer, tmp_path, monkeypatch, capsys):
    import tokenizer as T
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    os.makedirs(tmp_path / "base_data")
    docs = [None if i % 5 == 1 else f"document {i} about a river and its history." for i in range(40)]
    for idx in (0, common.VAL_SHARD_INDEX):
        path = str(tmp_path / "base_data" / f"shard_{idx:05d}.parquet")
        pq.write_table(pa.table({"text": pa.array(docs, pa.string())}), path, row_group_size=10)
    shard = str(tmp_path / "base_data" / "shard_00000.parquet")
    kept = [d for d in docs if d is not None]
    assert list(common.iter_documents("train")) == kept and list(common.iter_documents("train")) == kept
    assert capsys.readouterr().err == (f"warning: {shard}: skipping documents whose text is null (2 in row group 0; "
                                       "later ones silently)\n")
    stats = {"docs": 0, "chars": 0}
    assert list(T.training_documents([shard], 10**9, 10**4, stats)) == kept  # tokenizer training's reader
    loader = data.PretrainLoader(tokenizer, 2, 16)  # base training's
    x, y = next(loader)
    assert x.shape == (2, 16)
    loader.close()
    p = run_script(["tokenizer.py", "train", "--input", shard, "--vocab-size", "300"],
                   env={"NANOCHAT_BASE_DIR": str(tmp_path / "t")})
    assert "skipping documents whose text is null" in p.stderr and "32 docs" in p.stdout, p.stdout + p.stderr


# =============================================================================
# train.py
# =============================================================================

TINY_BASE = ["--depth", "1", "--max-seq-len", "32", "--device-batch-size", "2", "--total-batch-size", "64", "--compile", "0",
             "--eval-every", "-1", "--eval-tokens", "256", "--core-metric-every", "-1", "--sample-every", "-1"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _records(base, stage):
    """Last record per step of report/<stage>_log.jsonl (a resumed run re-logs the steps after its checkpoint)."""
    out = {}
    with open(os.path.join(base, "report", f"{stage}_log.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            out[r["step"]] = r
    return out


def _clone_base(src, dst):
    """A fresh NANOCHAT_BASE_DIR sharing the fixture's shards and tokenizer."""
    os.makedirs(dst, exist_ok=True)
    for name in ("base_data", "tokenizer"):
        os.symlink(os.path.join(src, name), os.path.join(dst, name))
    return dst


def test_train_newton_schulz_singular_values():
    import train
    torch.manual_seed(0)
    for shape in [(64, 128), (256, 64), (96, 96)]:
        G = torch.randn(shape) * 3.0
        for dtype in (torch.bfloat16, torch.float32):
          for polar in (False, True):
            X = train.newton_schulz(G, 5, dtype, polar)
            assert X.shape == G.shape and X.dtype == dtype
            s = torch.linalg.svdvals(X.float())
            assert s.min() > (0.5 if polar else 0.3) and s.max() < (1.2 if polar else 1.6), (shape, dtype, polar, s.min().item(), s.max().item())
            # the direction is kept: X is close to the polar factor U V^T of G
            U, _, Vh = torch.linalg.svd(G, full_matrices=False)
            assert F.cosine_similarity(X.float().flatten(), (U @ Vh).flatten(), dim=0) > (0.97 if polar else 0.9)


def test_train_muon_options_do_what_they_say():
    """MuonEq equalises row norms before orthogonalising; Muon+ gives the update Frobenius norm sqrt(min(m, n)); NorMuon
    keeps each row's running mean square and returns a matrix of the input's norm whose rows have equal size on the first
    step; cautious weight decay shrinks only weights whose update has their sign; a Muon step with every option moves
    every weight by the formula computed here by hand."""
    import train
    torch.manual_seed(0)
    G = torch.randn(64, 32) * torch.linspace(0.1, 10, 64)[:, None]  # rows of very different size
    group = dict(ns_steps=5, polar_express=1, muon_eq=1, muon_plus=1)
    eq = G * (G.norm() / 8 / G.norm(dim=-1, keepdim=True))
    assert torch.equal(train.muon_update(G, group), train.muon_update(eq, dict(group, muon_eq=0)))
    assert train.muon_update(G, group).norm() == pytest.approx(32 ** 0.5, rel=1e-5)
    assert train.muon_update(G, dict(group, muon_plus=0)).norm() != pytest.approx(32 ** 0.5, rel=1e-3)
    state, X = {}, torch.randn(64, 32) * torch.linspace(0.5, 2, 64)[:, None]
    Y = train.normuon(X, state, beta2=0.9)
    assert state["second_moment"].shape == (64, 1) and torch.allclose(state["second_moment"], 0.1 * X.square().mean(-1, keepdim=True))
    assert Y.norm() == pytest.approx(X.norm().item(), rel=1e-5) and Y.norm(dim=-1).std() < 1e-4  # one step: rows equal
    assert train.normuon(torch.randn(16, 48), {}).shape == (16, 48)  # wide: one mean square per column
    W = torch.nn.Parameter(torch.randn(32, 16))
    W.grad = torch.randn(32, 16)
    W0, g = W.detach().clone(), W.grad.clone()
    opt = train.Muon([W], lr=0.1, momentum=0.9, weight_decay=0.5, polar_express=1, normuon=1, muon_eq=1, muon_plus=1)
    opt.step()
    direction = g.lerp(torch.zeros_like(g).lerp_(g, 0.1), 0.9)  # Nesterov: (1 - mu) g + mu M, M = (1 - mu) g
    X = train.normuon(train.muon_update(direction, opt.param_groups[0]), {})
    lr = 0.1 * 2 ** 0.5  # sqrt(rows / cols)
    expected = W0 - lr * 0.5 * W0 * ((X * W0) >= 0) - lr * X
    assert torch.allclose(W.detach(), expected, atol=1e-6) and ((X * W0) < 0).any()


def test_train_recipe_flags_and_schedules():
    """--recipe 2026 fills every unset flag for base; an explicit flag wins; chat stages keep their own lrs and schedule and
    take only Muon's algorithm; the 2026 schedules (warmup, final lr, momentum to 0.97 then 0.90) and step count."""
    import train
    a = train.parse_args(["--recipe", "2026", "--smear", "0"])
    assert (a.window_pattern, a.rope_base, a.qk_scale, a.pad_vocab_to, a.smear, a.value_embeds, a.normuon) == ("SSSL", 100_000, 1.2, 64, 0, 1, 1)
    assert (a.embedding_lr, a.unembedding_lr, a.warmup_steps, a.warmdown_ratio, a.target_param_data_ratio) == (0.3, 0.008, 40, 0.65, 12)
    r = train.parse_args([])
    assert (r.window_pattern, r.normuon, r.weight_decay, r.embedding_lr, r.warmdown_ratio, r.target_param_data_ratio) == ("L", 0, 0.0, 0.2, 0.2, 20)
    s = train.parse_args(["--stage=sft", "--recipe", "2026"])
    assert (s.polar_express, s.normuon, s.embedding_lr, s.warmdown_ratio, s.weight_decay, s.warmup_steps) == (1, 1, 0.2, 0.5, 0.0, 0)
    with pytest.raises(SystemExit, match="--window-pattern 'SXL' must be letters S and L"):
        train.parse_args(["--window-pattern", "SXL"])
    assert train.lr_multiplier(1.0, 0.65, 0.05) == pytest.approx(0.05) and train.lr_multiplier(0.3, 0.65, 0.05) == 1.0
    m = [train.muon_momentum(s, 1000, 0.65, "2026") for s in range(1001)]
    assert m[0] == 0.85 and m[400] == pytest.approx(0.97 - 0.07 * 50 / 650) and m[399] == pytest.approx(0.85 + 0.12 * 399 / 400)
    assert m[-1] == pytest.approx(0.90) and train.muon_momentum(150) == pytest.approx(0.90)
    with torch.device("meta"):
        model = GPT(config_from_depth(4, 8192, 512, window_pattern="SSSL", value_embeds=True))
    n = model.param_counts()
    assert train.ratio_parameters(model, "2026") == n["blocks"] + n["lm_head"] < train.ratio_parameters(model, "release") == n["total"]
    # FLOPs: 6 per matmul weight + attention over min(window, T) keys (three layers of 128, the last of 512)
    assert model.estimate_flops() == 6 * (n["blocks"] + n["lm_head"]) + 12 * 2 * 128 * (3 * 128 + 512)


def test_train_muon_lowers_toy_loss():
    import train
    torch.manual_seed(0)
    A, Y = torch.randn(16, 64), torch.randn(32, 64)
    W = torch.nn.Parameter(torch.zeros(32, 16))
    opt = train.Muon([W], lr=0.05)
    losses = []
    for _ in range(5):
        loss = ((W @ A - Y) ** 2).mean()
        losses.append(loss.item())
        loss.backward()
        opt.step()
        W.grad = None
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert "momentum_buffer" in opt.state[W]


def test_train_adamw_matches_torch_adamw():
    import train
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(8, 4)), None
    b = torch.nn.Parameter(a.detach().clone())
    ours = train.AdamW([dict(params=[a], lr=0.01)], betas=(0.8, 0.95), eps=1e-10)
    ref = torch.optim.AdamW([b], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)
    for _ in range(5):
        g = torch.randn(8, 4)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


def test_train_param_groups_and_lrs(tiny_model):
    import train
    adamw, muon = train.build_optimizers(tiny_model, train.parse_args([]))  # release: 0.2, 0.004, 0.02
    s = (tiny_model.config.n_embd / 768) ** -0.5
    lrs = {id(g["params"][0]): g["lr"] for g in adamw.param_groups}
    assert math.isclose(lrs[id(tiny_model.lm_head.weight)], 0.004 * s) and math.isclose(lrs[id(tiny_model.transformer.wte.weight)], 0.2 * s)
    muon_params = [p for g in muon.param_groups for p in g["params"]]
    assert len(muon_params) == len(list(tiny_model.transformer.h.parameters())) and all(g["lr"] == 0.02 for g in muon.param_groups)


def test_train_overfits_one_batch(tiny_model, tokenizer):
    import train
    torch.manual_seed(0)
    V = tiny_model.config.vocab_size
    x = torch.randint(0, V, (4, 32))
    y = torch.roll(x, -1, dims=1)
    opts = train.build_optimizers(tiny_model, train.parse_args([]))
    first = None
    for _ in range(80):
        loss = tiny_model(x, y)
        first = first if first is not None else loss.item()
        loss.backward()
        for o in opts:
            o.step()
        tiny_model.zero_grad(set_to_none=True)
    assert abs(first - math.log(V)) < 0.05  # zero-init lm_head: uniform at the start
    assert loss.item() < 0.5, loss.item()


def test_train_lr_schedules_never_increase_after_warmup():
    import train
    for warmdown in (0.2, 0.5, 1.0):  # base/mid, the later nanochat's SFT, linear decay (rl)
        lrms = [train.lr_multiplier(p / 1000, warmdown) for p in range(1001)]
        assert lrms[0] == 1.0 and all(b <= a for a, b in zip(lrms, lrms[1:])) and lrms[-1] == 0.0, warmdown
        assert lrms[round(1000 * (1 - warmdown))] == 1.0 and lrms[round(1000 * (1 - warmdown / 2))] == pytest.approx(0.5)
    # flat until 80%, then down (nanochat #68's mid schedule ramped up instead)
    assert [train.lr_multiplier(p / 100) for p in range(81)] == [1.0] * 81 and train.lr_multiplier(0.9) == pytest.approx(0.5)
    assert train.muon_momentum(0) == 0.85 and train.muon_momentum(150) == pytest.approx(0.90) and train.muon_momentum(1000) == 0.95


def test_train_batch_arithmetic_any_world_size(capsys):
    """Every stage's default batch, and run.sh's GPU profile, give whole micro-steps and questions on 1-8 ranks."""
    import train
    for stage in ("base", "mid", "sft"):
        args = train.parse_args(["--stage", stage])
        B, T = args.device_batch_size, args.max_seq_len or 2048
        for world in range(1, 9):
            total, accum = train.grad_accum_steps(args.total_batch_size, B, T, world)
            assert accum >= 1 and total == accum * B * T * world, (stage, world)
            assert abs(total - args.total_batch_size) <= B * T * world / 2, (stage, world)
    assert train.grad_accum_steps(524288, 32, 2048, 8) == (524288, 1) and train.grad_accum_steps(524288, 32, 2048, 1) == (524288, 8)
    assert train.grad_accum_steps(524288, 32, 2048, 3) == (589824, 3)
    assert "not a multiple" in capsys.readouterr().out
    args = train.parse_args(["--stage", "rl"])
    for world in range(1, 9):
        per_rank = train.rl_questions_per_rank(args.examples_per_step, world)
        assert per_rank >= 1 and abs(per_rank * world - args.examples_per_step) <= world / 2, world
        assert args.num_samples % args.device_batch_size == 0
    # run.sh's GPU profile: each stage's flags give whole micro-steps on every GPU count
    with open(os.path.join(REPO, "run.sh")) as f:
        gpu = f.read().split("  gpu)", 1)[1].split(";;", 1)[0]
    flags = dict(re.findall(r'(BASE|MID|SFT|RL)="([^"]*)"', gpu))
    assert sorted(flags) == ["BASE", "MID", "RL", "SFT"]
    for name, stage in (("BASE", "base"), ("MID", "mid"), ("SFT", "sft")):
        args = train.parse_args(["--stage", stage, *flags[name].split()])
        for ngpu in range(1, 9):
            total, accum = train.grad_accum_steps(args.total_batch_size, args.device_batch_size, args.max_seq_len or 2048, ngpu)
            assert accum >= 1 and total % (args.device_batch_size * (args.max_seq_len or 2048) * ngpu) == 0
    args = train.parse_args(["--stage", "rl", *flags["RL"].split()])
    assert args.num_samples % args.device_batch_size == 0 and all(train.rl_questions_per_rank(args.examples_per_step, w) for w in range(1, 9))


class _Probe(torch.nn.Module):
    """Stands in for the model: free logits, so their gradient shows which positions the loss trains."""

    def __init__(self, T, V):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.randn(1, T, V))

    def forward(self, x, y, loss_reduction="mean"):
        loss = F.cross_entropy(self.logits.view(-1, self.logits.size(-1)), y.reshape(-1), ignore_index=-1, reduction=loss_reduction)
        return loss.view(y.shape) if loss_reduction == "none" else loss


def test_train_sft_trains_only_assistant_tokens_mid_trains_user_tokens(tokenizer):
    import train
    import data
    conv = {"messages": [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."},
                         {"role": "user", "content": "And three plus three?"}, {"role": "assistant", "content": "Six."}]}
    ids, mask = tokenizer.render_conversation(conv)
    T = len(ids) - 1
    rows = {}
    for completion_only in (True, False):
        loader = data.ChatLoader([conv], tokenizer, 1, T, completion_only=completion_only, buffer=1)
        x, y = next(loader)
        assert x[0].tolist() == ids[:-1]
        probe = _Probe(T, tokenizer.get_vocab_size())
        train.lm_loss(probe, x, y).backward()
        rows[completion_only] = probe.logits.grad[0].abs().sum(-1) > 0  # positions that get gradient
    assistant = torch.tensor(mask[1:]) == 1
    assert rows[True].tolist() == assistant.tolist()  # SFT: exactly the assistant tokens (and <|assistant_end|>)
    assert rows[False].all() and (rows[False] & ~assistant).any()  # mid: user tokens are trained too
    # a micro-batch with no supervised target gives loss 0 and zero gradient, not NaN
    probe = _Probe(T, tokenizer.get_vocab_size())
    loss = train.lm_loss(probe, x, torch.full_like(y, -1))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(probe.logits.grad).all()


def test_train_rl_reward_and_advantages(tiny_model):
    import train
    import data
    conv = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": [
        {"type": "text", "text": "3 + 4 = "}, {"type": "python", "text": "3+4"}, {"type": "python_output", "text": "7"},
        {"type": "text", "text": "7 apples, 1,227 more is 1,234\n#### 1,234"}]}]}
    def reward(completion):  # the reward train_rl takes: GSM8K.evaluate (it reads no task state)
        return float(data.GSM8K.evaluate(None, conv, completion))
    assert reward("so the answer is\n#### 1234") == 1.0
    assert reward("#### 1,234") == 1.0  # commas are ignored
    assert reward("#### 1235") == 0.0
    assert reward("the answer is 1234") == 0.0  # no ####
    adv = train.group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0]))
    assert abs(adv.sum().item()) < 1e-6 and adv[0] > 0 > adv[1]
    # all-equal rewards: exactly zero gradient
    V = tiny_model.config.vocab_size
    ids = torch.randint(0, V, (4, 20))
    mask = torch.zeros(4, 20, dtype=torch.long)
    mask[:, 12:] = 1  # prompt, then sampled tokens
    for rewards in (torch.ones(4), torch.zeros(4)):
        tiny_model.zero_grad(set_to_none=True)
        train.rl_pass_loss(tiny_model, ids, mask, train.group_advantages(rewards), 1).backward()
        assert all(p.grad is None or (p.grad == 0).all() for p in tiny_model.parameters())
    tiny_model.zero_grad(set_to_none=True)
    train.rl_pass_loss(tiny_model, ids, mask, train.group_advantages(torch.tensor([1.0, 0, 0, 0])), 1).backward()
    assert any(p.grad is not None and (p.grad != 0).any() for p in tiny_model.parameters())
    # only sampled tokens are trained: no sampled token, no gradient (and no NaN)
    tiny_model.zero_grad(set_to_none=True)
    loss = train.rl_pass_loss(tiny_model, ids, torch.zeros_like(mask), torch.tensor([1.0, -1, 0.5, -0.5]), 1)
    loss.backward()
    assert loss.item() == 0.0 and all(p.grad is None or (p.grad == 0).all() for p in tiny_model.parameters())


@SLOW
def test_train_bad_input_messages(base_dir, tokenizer, tmp_path):
    import train
    for flag, value in (("--device-batch-size", "0"), ("--depth", "0"), ("--max-seq-len", "-3"), ("--warmdown-ratio", "0")):
        with pytest.raises(SystemExit) as e:
            train.parse_args([*TINY_BASE, flag, value])
        assert flag in str(e.value.code) and ("at least" in str(e.value.code) or "(0, 1]" in str(e.value.code)), e.value.code
    p = run_script(["train.py", *TINY_BASE, "--device-batch-size", "0"], check=False)
    assert p.returncode != 0 and p.stderr.strip() == "error: --device-batch-size must be at least 1 (got 0)", p.stderr
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    p = run_script(["train.py", *TINY_BASE, "--num-iterations", "1"], env={"NANOCHAT_BASE_DIR": empty}, check=False)
    assert p.returncode != 0 and "tokenizer.py train" in p.stderr and "Traceback" not in p.stderr, p.stderr
    no_shards = str(tmp_path / "noshards")
    os.makedirs(no_shards)
    os.symlink(os.path.join(base_dir, "tokenizer"), os.path.join(no_shards, "tokenizer"))
    p = run_script(["train.py", *TINY_BASE, "--num-iterations", "1"], env={"NANOCHAT_BASE_DIR": no_shards}, check=False)
    assert p.returncode != 0 and "data.py download" in p.stderr and "Traceback" not in p.stderr, p.stderr
    p = run_script(["train.py", "--stage", "sft", "--compile", "0"], env={"NANOCHAT_BASE_DIR": no_shards}, check=False)
    assert p.returncode != 0 and "--stage=mid" in p.stderr and "Traceback" not in p.stderr, p.stderr


# -----------------------------------------------------------------------------
# DDP equivalence: one fixed list of global micro-batches; rank r takes rows r::W, one process takes them all in order

DDP_HELPER = r'''
import os, sys, json, torch
sys.path.insert(0, os.environ["REPO"])
import common, train, model as M
out, V = sys.argv[1], int(sys.argv[2])
ddp, rank, _, world, device = common.init_runtime("cpu", seed=0)
torch.manual_seed(0)
m = M.build_model(dict(sequence_len=16, vocab_size=V, n_layer=3, n_head=2, n_kv_head=2, n_embd=32), "cpu")
opts = train.build_optimizers(m, train.parse_args([]))
gen = torch.Generator().manual_seed(1)
accum = 2 // world  # the single process accumulates both ranks' micro-batches
losses = []
for step in range(4):
    rows = torch.randint(0, V, (4, 17), generator=gen)
    train.set_schedule(opts, train.lr_multiplier(step / 4), train.muon_momentum(step))
    total = 0.0
    for micro in range(accum):
        part = rows[(rank if ddp else micro)::2]
        loss = m(part[:, :-1], part[:, 1:])
        (loss / accum).backward()
        total += loss.item() / accum
    for o in opts:
        o.step()
    m.zero_grad(set_to_none=True)
    losses.append(common.all_reduce([total], device)[0] / world)
adamw, muon = opts
shard = dict(muon_states=sum("momentum_buffer" in s for s in muon.state.values()),
             muon_params=sum(len(g["params"]) for g in muon.param_groups),
             adamw_rows=sorted(s["exp_avg"].shape[0] for s in adamw.state.values()))
if rank == 0:
    torch.save(dict(losses=losses, params={k: v.clone() for k, v in m.state_dict().items()}), out)
with open(f"{out}.rank{rank}.json", "w") as f:
    json.dump(shard, f)
if ddp:
    torch.distributed.barrier()
common.cleanup_runtime()
'''


def _ddp_check(tmp_path, V, launch):
    script = tmp_path / "ddp_helper.py"
    script.write_text(DDP_HELPER)
    env = dict(os.environ, REPO=REPO, OMP_NUM_THREADS="1")
    single = str(tmp_path / "single.pt")
    subprocess.run([sys.executable, str(script), single, str(V)], env=env, check=True, timeout=300, capture_output=True)
    multi = str(tmp_path / "multi.pt")
    procs = [subprocess.Popen(cmd + [str(script), multi, str(V)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd in launch]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    a, b = torch.load(single), torch.load(multi)
    assert len(a["losses"]) == 4
    torch.testing.assert_close(torch.tensor(b["losses"]), torch.tensor(a["losses"]), rtol=1e-4, atol=1e-6)
    for k in a["params"]:
        torch.testing.assert_close(b["params"][k], a["params"][k], rtol=1e-4, atol=1e-5, msg=k)
    shards = [json.load(open(f"{multi}.rank{r}.json")) for r in range(2)]
    full = json.load(open(f"{single}.rank0.json"))
    # Muon: each momentum buffer lives on exactly one rank
    assert sum(s["muon_states"] for s in shards) == full["muon_states"] == full["muon_params"]
    assert all(0 < s["muon_states"] < full["muon_params"] for s in shards)
    return shards, full


@SLOW
def test_train_ddp_equivalence_two_processes(tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    port = _free_port()
    shards, full = _ddp_check(tmp_path, 256, [[torchrun, "--nproc_per_node=2", f"--master_port={port}", "--master_addr=127.0.0.1"]])
    # AdamW: wte and lm_head (256 rows) are split by rows across the two ranks
    assert full["adamw_rows"] == [256, 256] and all(s["adamw_rows"] == [128, 128] for s in shards)


@SLOW
def test_train_ddp_equivalence_two_nodes(tmp_path):
    """Two single-process 'nodes' on loopback; an odd vocabulary (255 rows) takes the all-reduce fallback for AdamW."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    port = _free_port()
    launch = [[torchrun, "--nnodes=2", f"--node_rank={r}", "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}"]
              for r in (0, 1)]
    shards, full = _ddp_check(tmp_path, 255, launch)
    assert all(s["adamw_rows"] == [255, 255] for s in shards)  # replicated fallback


# -----------------------------------------------------------------------------
# resume, and the whole chain

CHAT_TINY = ["--device-batch-size", "2", "--max-seq-len", "128", "--total-batch-size", "256", "--compile", "0", "--eval-tokens", "256",
             "--gsm8k-size", "8", "--identity-size", "4", "--simple-spelling-size", "4", "--spelling-bee-size", "4", "--val-size", "8"]
STAGE_TINY = {  # each stage at test size; --num-iterations and --save-every are added per test
    "mid": ["--stage=mid", *CHAT_TINY, "--smoltalk-size", "16", "--mmlu-size", "8"],
    "sft": ["--stage=sft", *CHAT_TINY, "--smoltalk-size", "16", "--arc-size", "4", "--chat-eval-every", "-1"],
    "rl": ["--stage=rl", "--gsm8k-size", "8", "--examples-per-step", "1", "--num-samples", "2", "--device-batch-size", "2",
           "--max-new-tokens", "8", "--eval-examples", "2", "--eval-every", "-1"],
}
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def _launch(ranks, port, node_rank=None):
    """The command prefix: plain python for one rank, torchrun on loopback for several (or for one 'node' of two)."""
    if node_rank is not None:
        return [TORCHRUN, "--nnodes=2", f"--node_rank={node_rank}", "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}"]
    if ranks == 1:
        return [sys.executable]
    return [TORCHRUN, f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1", f"--master_port={port}"]


def _train(base, args, ranks=1, timeout=300):
    env = dict(os.environ, NANOCHAT_BASE_DIR=base, OMP_NUM_THREADS="1")
    p = subprocess.run(_launch(ranks, _free_port()) + ["train.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def _final_weights(base, stage, tag):
    import model as M
    folder = os.path.join(base, common.CHECKPOINT_DIRS[stage], tag)
    return torch.load(os.path.join(folder, f"model_{M.last_step(folder):06d}.pt"), weights_only=True)


def _kill_and_resume(base_dir, tmp_path, stage_args, stage, tag, ranks, kill_at, prepare=None):
    """An uninterrupted run and one killed (SIGKILL, the whole process group) after step kill_at, then resumed: every logged
    loss after the resume point and the final weights must be exactly equal."""
    runs = {}
    for name in ("ref", "kill"):
        base = _clone_base(base_dir, str(tmp_path / name))
        if prepare:
            prepare(base)
        runs[name] = base
    _train(runs["ref"], stage_args, ranks)
    env = dict(os.environ, NANOCHAT_BASE_DIR=runs["kill"], OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    p = subprocess.Popen(_launch(ranks, _free_port()) + ["train.py", *stage_args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen, deadline = [], time.time() + 240
    for line in p.stdout:
        seen.append(line)
        m = re.match(r"step (\d+)[/ ].*\| loss ", line)
        if (m and int(m.group(1)) >= kill_at) or time.time() > deadline:
            break
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL, "".join(seen[-20:])
    out = _train(runs["kill"], [*stage_args, "--resume"], ranks)
    assert f"resuming {stage}" in out, out[-2000:]
    a, b = _records(runs["ref"], stage), _records(runs["kill"], stage)
    assert sorted(a) == sorted(b)
    steps = [s for s in a if "loss" in a[s]]
    assert steps and all(a[s]["loss"] == b[s]["loss"] and a[s]["train_loss"] == b[s]["train_loss"] for s in steps), \
        [(s, a[s].get("loss"), b[s].get("loss")) for s in steps]
    wa, wb = _final_weights(runs["ref"], stage, tag), _final_weights(runs["kill"], stage, tag)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    return runs


@SLOW
def test_train_kill_and_resume_two_ranks_base(base_dir, tokenizer, tmp_path):
    args = ["--stage=base", *TINY_BASE, "--num-iterations", "24", "--save-every", "6"]
    runs = _kill_and_resume(base_dir, tmp_path, args, "base", "d1", ranks=2, kill_at=14)
    names = os.listdir(os.path.join(runs["kill"], "base_checkpoints", "d1"))
    assert "optim_000024_rank1.pt" in names and "model_000012.pt" in names


@SLOW
def test_train_recipe_2026_resumes_exactly_and_every_stage_runs(base_dir, tokenizer, tmp_path):
    """--recipe 2026 (every option: windows, value embeddings, smear, backout, scalars, Polar Express, NorMuon, MuonEq, Muon+,
    cautious weight decay, warmup) at depth 2 and T=256, where layer 0's 128-key window cuts: a 2-rank base run killed and
    resumed equals an uninterrupted one bit for bit; mid, SFT and RL train from it; eval.py scores it; each stage generates."""
    from model import load_model, Engine, layer_windows
    args = ["--stage=base", *TINY_BASE, "--depth", "2", "--max-seq-len", "256", "--recipe", "2026", "--warmup-steps", "4",
            "--num-iterations", "12", "--save-every", "4"]
    base = _kill_and_resume(base_dir, tmp_path, args, "base", "d2", ranks=2, kill_at=6)["kill"]
    meta = json.load(open(os.path.join(base, "base_checkpoints", "d2", "meta_000012.json")))
    assert meta["model_config"]["value_embeds"] and meta["model_config"]["window_pattern"] == "SSSL"
    for stage, n in (("mid", "2"), ("sft", "2"), ("rl", "1")):
        _train(base, [*STAGE_TINY[stage], "--num-iterations", n, "--recipe", "2026"])
    p = run_script(["eval.py", "--stage", "base", "bpb", "--device-batch-size", "2", "--eval-tokens", "1024"], env={"NANOCHAT_BASE_DIR": base})
    assert re.search(r"^val bpb: [1-9]\.\d{4}$", p.stdout, re.M), p.stdout[-1500:]
    os.environ["NANOCHAT_BASE_DIR"] = base
    try:
        prompt = tokenizer.encode("Hi", prepend="<|bos|>")
        for stage in ("base", "mid", "sft", "rl"):
            model, meta = load_model(stage, "cpu", tokenizer=tokenizer)
            assert model.config.smear and "value_embeds.1.weight" in model.state_dict(), stage
            assert layer_windows(model.config)[0] == 128 and model.transformer.h[0].attn.window == 128
            rows, _ = Engine(model, tokenizer).generate_batch(prompt, num_samples=2, max_tokens=4, temperature=0.0)
            assert len(rows[0]) > len(prompt), stage
    finally:
        os.environ["NANOCHAT_BASE_DIR"] = base_dir


@pytest.fixture(scope="module")
def tiny_chain(base_dir, tokenizer, tmp_path_factory):
    """base -> mid -> sft checkpoints of a depth-1 model under one base dir (sources for the chat stages' tests)."""
    base = _clone_base(base_dir, str(tmp_path_factory.mktemp("chain")))
    _train(base, ["--stage=base", *TINY_BASE, "--num-iterations", "3"])
    _train(base, [*STAGE_TINY["mid"], "--num-iterations", "3"])
    _train(base, [*STAGE_TINY["sft"], "--num-iterations", "2"])
    return base


@SLOW
@pytest.mark.parametrize("stage", ["mid", "sft", "rl"])
def test_train_kill_and_resume_chat_stages(stage, base_dir, tiny_chain, tmp_path):
    source = {"mid": "base", "sft": "mid", "rl": "sft"}[stage]

    def prepare(base):  # the source stage's checkpoints, copied
        folder = common.CHECKPOINT_DIRS[source]
        shutil.copytree(os.path.join(tiny_chain, folder), os.path.join(base, folder))
    iters = "10" if stage == "rl" else "12"
    _kill_and_resume(base_dir, tmp_path, [*STAGE_TINY[stage], "--num-iterations", iters, "--save-every", "4"], stage, "d1", ranks=1,
                     kill_at=5, prepare=prepare)


@SLOW
def test_train_ddp_real_script_ranks_stay_identical(base_dir, tokenizer, tiny_chain, tmp_path):
    """train.py itself under torchrun (2 ranks; and as two 1-rank 'nodes'): --check-sync compares a hash of every rank's
    weights after each optimizer step, and the losses fall as the one-process run's do."""
    losses = {}
    for ranks in (1, 2):
        base = _clone_base(base_dir, str(tmp_path / f"r{ranks}"))
        out = _train(base, ["--stage=base", *TINY_BASE, "--total-batch-size", "128", "--num-iterations", "20", "--check-sync", "1"], ranks)
        assert ("weights were identical on all 2 ranks after every step" in out) == (ranks == 2), out[-1500:]
        losses[ranks] = [r["train_loss"] for s, r in sorted(_records(base, "base").items()) if "loss" in r]
    print({r: [round(x, 3) for x in c] for r, c in losses.items()})
    for ranks, curve in losses.items():  # the smoothed loss: the same fall on one rank and on two (other documents per step)
        assert len(curve) == 20 and curve[-1] < curve[0] - 0.5, (ranks, curve)
    assert abs(losses[2][-1] - losses[1][-1]) < 0.1 * losses[1][-1], losses
    # a chat stage (SFT from the chain's mid checkpoint) on 2 ranks
    sft = _clone_base(base_dir, str(tmp_path / "sft"))
    shutil.copytree(os.path.join(tiny_chain, "mid_checkpoints"), os.path.join(sft, "mid_checkpoints"))
    out = _train(sft, [*STAGE_TINY["sft"], "--num-iterations", "4", "--check-sync", "1"], 2)
    assert "weights were identical on all 2 ranks" in out
    # two launchers, one per 'node', on loopback
    nodes = _clone_base(base_dir, str(tmp_path / "nodes"))
    port, env = _free_port(), dict(os.environ, NANOCHAT_BASE_DIR=nodes, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(_launch(2, port, node_rank=r) + ["train.py", "--stage=base", *TINY_BASE, "--num-iterations", "4",
                                                                "--check-sync", "1"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs) and "identical on all 2 ranks" in outs[0], outs[0][-2000:] + outs[1][-2000:]


@SLOW
def test_train_end_to_end_base_mid_sft_rl(base_dir, tokenizer, tiny_chain):
    from model import load_model, Engine
    out = _train(tiny_chain, [*STAGE_TINY["rl"], "--num-iterations", "2", "--eval-every", "1"])
    assert "reward" in out and "pass@1" in out
    os.environ["NANOCHAT_BASE_DIR"] = tiny_chain
    try:
        prompt = tokenizer.encode("Hi", prepend="<|bos|>")
        for stage in ("base", "mid", "sft", "rl"):
            model, meta = load_model(stage, "cpu", tokenizer=tokenizer)
            rows, _ = Engine(model, tokenizer).generate_batch(prompt, num_samples=1, max_tokens=4, temperature=0.0)
            assert len(rows[0]) > len(prompt), stage  # at least one generated token beyond the prompt
        for stage, title in (("base", "base-model-training"), ("mid", "midtraining"), ("sft", "chat-sft"), ("rl", "chat-rl")):
            assert os.path.exists(os.path.join(tiny_chain, "report", f"{title}.md"))
            assert _records(tiny_chain, stage)
        assert "val_bpb" in _records(tiny_chain, "sft")[2]  # the held-out evaluation at the end of SFT
    finally:
        os.environ["NANOCHAT_BASE_DIR"] = base_dir


NAN_HELPER = r'''
import os, sys
sys.path.insert(0, os.environ["REPO"])
import train, model as M
forward, calls = M.GPT.forward, [0]
def poisoned(self, idx, targets=None, **kw):  # training losses turn NaN from the 7th forward on
    out = forward(self, idx, targets, **kw)
    if targets is not None and self.training:
        calls[0] += 1
        if calls[0] > 6:
            out = out * float("nan")
    return out
M.GPT.forward = poisoned
train.main(sys.argv[1:])
'''


OOM_HELPER = r'''
import os, sys, torch
sys.path.insert(0, os.environ["REPO"])
import train, model as M
forward = M.GPT.forward
def tight(self, idx, targets=None, **kw):  # a device that holds 8 rows: more raise CUDA's out-of-memory error
    if targets is not None and self.training:
        with open(os.environ["FORWARDS"], "a") as f:
            f.write(f"{idx.size(0)} {hash(tuple(idx.flatten().tolist()))}\n")
        if idx.size(0) > 8:
            raise torch.OutOfMemoryError("injected")
    return forward(self, idx, targets, **kw)
M.GPT.forward = tight
train.main(sys.argv[1:])
'''


@SLOW
def test_train_auto_device_batch_halves_on_oom(base_dir, tokenizer, tmp_path):
    """--device-batch-size auto: 32 rows -> OOM -> 16 -> OOM -> 8 rows with 4x the micro-steps; the same tokens per step,
    the same batches in the same order (the loader goes back), each step logged once, losses equal to a run pinned at 8."""
    script = tmp_path / "oom_helper.py"
    script.write_text(OOM_HELPER)
    args = [*TINY_BASE, "--total-batch-size", "2048", "--num-iterations", "2", "--eval-tokens", "0"]
    runs = {}
    for name, rows in (("auto", "auto"), ("pinned", "8")):
        base, forwards = _clone_base(base_dir, str(tmp_path / name)), str(tmp_path / f"{name}.forwards")
        p = subprocess.run([sys.executable, str(script), *args, "--device-batch-size", rows], cwd=REPO, capture_output=True, text=True,
                           env=dict(os.environ, REPO=REPO, NANOCHAT_BASE_DIR=base, FORWARDS=forwards), timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        runs[name] = (p.stdout, open(forwards).read().split("\n")[:-1], _records(base, "base"))
    (out, forwards, records), (_, pinned_forwards, pinned_records) = runs["auto"], runs["pinned"]
    assert "retrying with 16 rows x 4 micro-steps" in out and "retrying with 8 rows x 8 micro-steps" in out, out
    assert "device batch size auto: 8 rows, 8 micro-steps (pin it with --device-batch-size 8)" in out, out
    assert [f.split()[0] for f in forwards] == ["32", "16"] + ["8"] * 16 and forwards[2:] == pinned_forwards
    assert sorted(records) == [0, 1] and [r["tokens"] for r in records.values()] == [2048, 4096]
    assert [r["loss"] for r in records.values()] == [r["loss"] for r in pinned_records.values()]
    assert "memory estimate per rank at 32 rows x 32" in out and "memory estimate per rank at 8 rows x 32" in out


@SLOW
def test_train_nan_loss_stops_and_keeps_last_good_checkpoint(base_dir, tokenizer, tmp_path):
    script = tmp_path / "nan_helper.py"
    script.write_text(NAN_HELPER)
    base = _clone_base(base_dir, str(tmp_path / "nan"))
    p = subprocess.run([sys.executable, str(script), *TINY_BASE, "--eval-tokens", "0", "--num-iterations", "20", "--save-every", "3"],
                       cwd=REPO, env=dict(os.environ, REPO=REPO, NANOCHAT_BASE_DIR=base), capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "loss became nan at step 6" in p.stderr and "last good checkpoint is step 6" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    ckpts = sorted(n for n in os.listdir(os.path.join(base, "base_checkpoints", "d1")) if n.startswith("model_"))
    assert ckpts == ["model_000003.pt", "model_000006.pt"]


# -----------------------------------------------------------------------------
# hardening, second round (issue 27): resume past the end, signals, a full disk, the log on resume, the GPU profile

def _run_train(base, args, timeout=300, **kw):
    env = dict(os.environ, NANOCHAT_BASE_DIR=base, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)


def _log_keys(base, stage):
    """(step, kind) of every line of report/<stage>_log.jsonl, kind 'train' or the eval metric."""
    with open(os.path.join(base, "report", f"{stage}_log.jsonl")) as f:
        return [(r["step"], "train" if "loss" in r else ",".join(sorted(r))) for r in map(json.loads, f)]


@SLOW
def test_train_resume_past_the_end_log_once_and_seq_len(base_dir, tokenizer, tmp_path):
    base = _clone_base(base_dir, str(tmp_path / "b"))
    folder = os.path.join(base, "base_checkpoints", "d1")
    args = [*TINY_BASE, "--eval-every", "2", "--save-every", "2"]
    os.makedirs(os.path.join(base, "report"))
    with open(os.path.join(base, "report", "base_log.jsonl"), "w") as f:  # logged by a run killed before its first save
        f.write('{"step": 0, "val_bpb": 9.0}\n{"step": 0, "loss": 9.0}\n')
    out = _train(base, [*args, "--num-iterations", "4", "--resume"])
    names, keys = sorted(os.listdir(folder)), _log_keys(base, "base")
    assert "no complete checkpoint" in out and len(keys) == len(set(keys)) and (4, "step,val_bpb") in keys, keys
    # a resume at or past --num-iterations finishes at once with one note (it used to train on: step 00005/00002 ...)
    p = _run_train(base, [*args, "--num-iterations", "2", "--resume"], timeout=120)
    note = "step 4 is at or past the end of this run (--num-iterations 2); nothing to train"
    assert p.returncode == 0 and note in p.stdout and not re.search(r"step 0000\d/", p.stdout), p.stdout + p.stderr
    assert sorted(os.listdir(folder)) == names and _log_keys(base, "base") == keys
    # killed after step 3 was logged (the step-4 save lost, half a line written): the resumed run logs steps 2-4 once
    for n in names:
        if "000004" in n:
            os.remove(os.path.join(folder, n))
    with open(os.path.join(base, "report", "base_log.jsonl"), "a") as f:
        f.write('{"step": 4, "val_')
    out = _train(base, [*args, "--num-iterations", "4", "--resume"])
    assert "resuming base from" in out and _log_keys(base, "base") == keys
    # a longer (or any other) T than the checkpoint's: one line, not the rotary assertion; no flag: the checkpoint's T
    p = _run_train(base, [*args, "--num-iterations", "5", "--resume", "--max-seq-len", "1024"])
    assert p.returncode == 1 and "Traceback" not in p.stderr and p.stderr.strip().splitlines()[-1] == (
        "error: --max-seq-len 1024: the checkpoint resumed from was trained at 32; resume with --max-seq-len 32 "
        "(or without the flag)"), p.stderr
    i = TINY_BASE.index("--max-seq-len")
    out = _train(base, [*TINY_BASE[:i], *TINY_BASE[i + 2:], "--num-iterations", "5", "--resume"])
    assert "T=32" in out and "step 00004/00005" in out


@SLOW
def test_train_checkpoint_without_optimizer_state(base_dir, tokenizer, tmp_path):
    import model as M
    base = _clone_base(base_dir, str(tmp_path / "b"))
    _train(base, [*TINY_BASE, "--num-iterations", "2"])
    optim = os.path.join(base, "base_checkpoints", "d1", "optim_000002_rank0.pt")
    os.remove(optim)  # a checkpoint saved without one, or the original nanochat's optim_<step>.pt
    with pytest.raises(SystemExit) as e:
        M.load_checkpoint(os.path.dirname(optim), 2, "cpu", load_optimizer=True)
    assert str(e.value.code) == f"error: {optim} is missing: the checkpoint holds no optimizer state for rank 0"
    p = _run_train(base, [*TINY_BASE, "--num-iterations", "4", "--resume"])  # not a silent start from scratch
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1] == (
        f"error: --resume: {os.path.dirname(optim)} step 2 holds no optimizer state for 1 rank(s): resume with the "
        "number of ranks that saved it, or train under a new --model-tag"), p.stderr
    out = _train(base, [*STAGE_TINY["mid"], "--num-iterations", "1", "--source-optimizer", "1"])
    assert "has no optimizer state for 1 rank(s) (optim_000002_rank0.pt is missing): starting from fresh optimizer " \
           "moments" in out, out
    assert os.path.exists(os.path.join(base, "mid_checkpoints", "d1", "model_000001.pt"))


def _wait_for_step(p, n, lines, deadline=240):
    end = time.time() + deadline
    for line in p.stdout:
        lines.append(line)
        if (re.match(r"step (\d+)/", line) and int(line[5:10]) >= n) or time.time() > end:
            return


@SLOW
def test_train_sigint_saves_the_step_and_exits_with_one_line(base_dir, tokenizer, tmp_path):
    base = _clone_base(base_dir, str(tmp_path / "b"))
    folder = os.path.join(base, "base_checkpoints", "d1")
    env = dict(os.environ, NANOCHAT_BASE_DIR=base, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "train.py", *TINY_BASE, "--num-iterations", "100000"], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    _wait_for_step(p, 3, lines)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and len(err.strip().splitlines()) == 1, (p.returncode, err[-3000:])
    m = re.fullmatch(r"SIGINT: stopped at step (\d+), saved step \1 in (\S+); continue with --resume", err.strip())
    assert m and m.group(2) == folder, err
    step = int(m.group(1))
    assert sorted(os.listdir(folder)) == [f"meta_{step:06d}.json", f"model_{step:06d}.pt", f"optim_{step:06d}_rank0.pt"]
    out = _train(base, [*TINY_BASE, "--num-iterations", str(step + 1), "--resume"])
    assert f"resuming base from {folder} step {step}" in out and f"step {step:05d}/{step + 1:05d}" in out


@SLOW
def test_train_sigterm_to_one_rank_stops_every_rank_at_the_same_step(base_dir, tokenizer, tmp_path):
    base = _clone_base(base_dir, str(tmp_path / "b"))
    folder = os.path.join(base, "base_checkpoints", "d1")
    env = dict(os.environ, NANOCHAT_BASE_DIR=base, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    p = subprocess.Popen(_launch(2, _free_port()) + ["train.py", *TINY_BASE, "--num-iterations", "100000"], cwd=REPO,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines = []
        _wait_for_step(p, 3, lines)
        with open(f"/proc/{p.pid}/task/{p.pid}/children") as f:
            workers = [int(w) for w in f.read().split()]
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGTERM)  # one rank alone: the other must not wait for it in a collective
        out, _ = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    out = "".join(lines) + out
    m = re.search(r"SIGTERM: stopped at step (\d+), saved step \1 in ", out)
    assert p.returncode != 0 and m and "KeyboardInterrupt" not in out and 'train.py", line' not in out, out[-3000:]
    step = int(m.group(1))
    shards = [f"optim_{step:06d}_rank{r}.pt" for r in (0, 1)]
    assert sorted(os.listdir(folder)) == [f"meta_{step:06d}.json", f"model_{step:06d}.pt", *shards]


def _file_size_limit(nbytes):
    import resource
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))  # Python ignores SIGXFSZ: writes fail


@SLOW
def test_train_full_disk_keeps_the_previous_checkpoint(base_dir, tokenizer, tmp_path):
    import model as M
    base = _clone_base(base_dir, str(tmp_path / "b"))
    folder = os.path.join(base, "base_checkpoints", "d1")
    _train(base, [*TINY_BASE, "--num-iterations", "2"])
    names = sorted(os.listdir(folder))
    sizes = {n.split("_")[0]: os.path.getsize(os.path.join(folder, n)) for n in names}
    assert sizes["model"] < sizes["optim"]
    # the model's write fails; then the model and meta are written and the optimizer's fails (they are removed again)
    for limit in (sizes["model"] // 2, (sizes["model"] + sizes["optim"]) // 2):
        p = _run_train(base, [*TINY_BASE, "--num-iterations", "4", "--resume"], preexec_fn=_file_size_limit(limit))
        assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1, p.stderr[-3000:]
        assert p.stderr.startswith(f"error: could not save step 4 into {folder} (") and "is the disk full?" in p.stderr
        assert sorted(os.listdir(folder)) == names and M.last_step(folder, 1) == 2
    out = _train(base, [*TINY_BASE, "--num-iterations", "4", "--resume"])
    assert f"resuming base from {folder} step 2" in out and M.last_step(folder, 1) == 4


def test_train_device_cuda_without_cuda_is_one_line(tmp_path, monkeypatch):
    import model as M
    path = str(tmp_path / "model_000001.pt")
    torch.save({"w": torch.zeros(2)}, path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for call in (lambda: common.init_runtime("cuda"), lambda: M._torch_load(path, "cuda")):
        with pytest.raises(SystemExit) as e:
            call()
        message = str(e.value.code)
        assert message.startswith("error: --device cuda: CUDA is not available here") and "use --device cpu" in message


def test_train_gpu_profile_leaves_rows_to_auto(capsys, tmp_path, monkeypatch):
    """run.sh's GPU profile must not pin the rows of base and mid (pinned, the out-of-memory fallback is off), and the
    README quotes what `train.py --depth 20 --dry-run` estimates."""
    import train
    profile = re.search(r"\n  gpu\)(.*?);;", open(os.path.join(REPO, "run.sh")).read(), re.S).group(1)
    for name in ("BASE", "MID"):
        value = re.search(rf'\b{name}="([^"]*)"', profile).group(1)
        assert "--device-batch-size" not in value, (name, value)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))  # no tokenizer: --dry-run takes the default vocab, 65536
    train.dry_run(train.parse_args(["--depth", "20", "--dry-run"]))
    out = capsys.readouterr().out
    total, rows80 = float(re.search(r"total ([\d.]+) GiB", out).group(1)), int(re.search(r"80 GB: (\d+)", out).group(1))
    readme = " ".join(open(os.path.join(REPO, "README.md")).read().split())
    assert total > 80 and rows80 < 32 and f"{total:.1f} GiB per GPU at 32 rows" in readme
    assert f"an 80 GB card trains {rows80} rows" in readme


CHAT_ROWS_HELPER = r'''
import os, sys
sys.path.insert(0, os.environ["REPO"])
import train, data
next_batch = data.ChatLoader.__next__
def recorded(self):  # every training row the SFT loader yields, decoded, one line each
    x, y = next_batch(self)
    with open(os.environ["ROWS"], "a") as f:
        f.writelines(self.tok.decode(row.tolist()) + "\n" for row in x)
    return x, y
data.ChatLoader.__next__ = recorded
train.main(sys.argv[1:])
'''


def _chat_file(path, conversations):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    return str(path)


def test_train_chat_data_lines_are_checked(tmp_path):
    import train
    u, a = (lambda text: {"role": "user", "content": text}), (lambda text: {"role": "assistant", "content": text})
    good = [[u("hi"), a("hello")], [{"role": "system", "content": "be brief"}, u("q"), a("r"), u("q2"), a("r2")]]
    task = data.ChatFile(_chat_file(tmp_path / "good.jsonl", good))
    assert len(task) == 2 and task[1]["messages"][0] == {"role": "system", "content": "be brief"}
    bad = {  # a line -> the error's end
        json.dumps({"messages": [a("hello"), u("hi")]}): "message 1 has role 'assistant' where 'user' belongs",
        json.dumps({"messages": [u("hi"), a("  ")]}): "message 2 has no text content",
        json.dumps({"messages": [u("hi"), u("again"), a("x")]}): "message 2 has role 'user' where 'assistant' belongs",
        json.dumps({"messages": [u("hi")]}): "the conversation must end with an assistant reply",
        json.dumps({"messages": [u("hi"), a("x"), {"role": "system", "content": "z"}]}): "message 3 has role 'system'",
        json.dumps({"conversation": []}): 'no "messages" list',
        '{"messages": [': "not JSON",
    }
    for line, why in bad.items():
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps({"messages": good[0]}) + "\n\n" + line + "\n")
        with pytest.raises(common.UserError, match=f"^error: {re.escape(str(path))}:3: {re.escape(why)}"):
            data.ChatFile(str(path))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(common.UserError, match="no conversations"):
        data.ChatFile(str(tmp_path / "empty.jsonl"))
    with pytest.raises(SystemExit, match="--chat-data-epochs must be at least 1"):
        train.parse_args(["--stage=sft", "--chat-data", "x.jsonl", "--chat-data-epochs", "0"])
    assert train.parse_args(["--stage=sft", "--no-identity"]).identity_size == 0


@SLOW
def test_train_chat_data_changes_what_sft_trains_on(base_dir, tiny_chain, tmp_path):
    """--chat-data: the user's conversations are in the SFT loader's rows (weighted by --chat-data-epochs, the built-in
    identity chats gone with --no-identity); a bad line stops the run before step 0 with one line."""
    script = tmp_path / "rows_helper.py"
    script.write_text(CHAT_ROWS_HELPER)
    u, a = (lambda text: {"role": "user", "content": text}), (lambda text: {"role": "assistant", "content": text})
    system = {"role": "system", "content": "You are Zorblax, a very small assistant made for tests."}
    mine = _chat_file(tmp_path / "mine.jsonl", [[u("What is your name?"), a("I am Zorblax, the tiny helper.")],
                                                [system, u("Hi"), a("Zorblax here! How can I help you today?")]])
    base = _clone_base(base_dir, str(tmp_path / "run"))
    shutil.copytree(os.path.join(tiny_chain, "mid_checkpoints"), os.path.join(base, "mid_checkpoints"))
    sft = [*STAGE_TINY["sft"], "--num-iterations", "3", "--eval-tokens", "0", "--smoltalk-size", "0", "--arc-size", "0",
           "--gsm8k-size", "0", "--simple-spelling-size", "0", "--spelling-bee-size", "0"]
    env = dict(os.environ, REPO=REPO, NANOCHAT_BASE_DIR=base, ROWS=str(tmp_path / "rows.txt"))
    run = functools.partial(subprocess.run, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    p = run([sys.executable, str(script), *sft, "--chat-data", mine, "--chat-data-epochs", "3", "--no-identity"])
    assert p.returncode == 0, p.stderr[-2000:]
    assert "sft mixture: 6 conversations (ChatFile 2, ChatFile 2, ChatFile 2)" in p.stdout, p.stdout
    rows = open(tmp_path / "rows.txt").read()
    assert "I am Zorblax, the tiny helper." in rows and "made for tests.\n\nHi<|user_end|>" in rows
    assert "nanochat" not in rows
    p = run([sys.executable, str(script), *sft, "--chat-data", mine])
    assert p.returncode == 0 and "Identity 4, ChatFile 2)" in p.stdout, p.stdout
    # a bad line: one error naming the file and line, before any step (and before the model loads)
    with open(mine, "a") as f:
        f.write(json.dumps({"messages": [u("no reply")]}) + "\n")
    os.remove(tmp_path / "rows.txt")
    p = run([sys.executable, str(script), *sft, "--chat-data", mine])
    assert p.returncode == 1 and p.stderr == f"error: {mine}:3: the conversation must end with an assistant reply\n"
    assert "step " not in p.stdout and not os.path.exists(tmp_path / "rows.txt")


@SLOW
def test_train_checkpoint_folder_is_held_by_one_run(base_dir, tokenizer, tmp_path):
    base = _clone_base(base_dir, str(tmp_path / "base"))
    folder = os.path.join(base, "base_checkpoints", "d1")
    os.makedirs(folder)
    holder = _lock_holder(folder + ".lock")
    try:
        assert holder.stdout.readline() == "held\n"
        p = run_script(["train.py", *TINY_BASE, "--num-iterations", "1"], env={"NANOCHAT_BASE_DIR": base}, check=False)
        assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
        who = f"pid {holder.pid} on {re.escape(socket.gethostname())} since [-0-9: ]+"
        assert re.fullmatch(f"error: {re.escape(folder)}.lock is held by {who}: another run trains into "
                            f"{re.escape(folder)}; wait for it, or use another --model-tag\n", p.stderr), p.stderr
    finally:
        holder.kill()  # kill -9: its lock file stays, its flock goes
        holder.wait()
    stray = os.path.join(folder, f"model_000005.pt.tmp{_dead_pid()}")  # a save cut by kill -9
    open(stray, "w").write("half")
    p = run_script(["train.py", *TINY_BASE, "--num-iterations", "1"], env={"NANOCHAT_BASE_DIR": base})
    assert f"note: taking over {folder}.lock: pid {holder.pid} on " in p.stderr, p.stderr
    assert sorted(os.listdir(folder)) == ["meta_000001.json", "model_000001.pt", "optim_000001_rank0.pt"]
    assert not os.path.exists(folder + ".lock")


# =============================================================================
# eval.py
# =============================================================================

BUNDLE_ZIP = os.path.join(MIRROR, "karpathy-public.s3.us-west-2.amazonaws.com", "eval_bundle.zip")


# ---- fakes: a byte-level tokenizer and a scripted model -------------------------------------------------------------

class ByteTok:
    """Bytes 0..255 are tokens, BOS = 256."""
    def get_bos_token_id(self):
        return 256

    def get_vocab_size(self):
        return 257

    def encode(self, text, prepend=None):
        if isinstance(text, list):
            return [self.encode(t, prepend) for t in text]
        return ([prepend] if prepend is not None else []) + list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", "replace")


class OracleModel(torch.nn.Module):
    """Predicts every next token with certainty in rows whose last block (after the final blank line) contains GOLD;
    uniform logits elsewhere. So the choice holding GOLD has the lowest loss and its LM continuation is exact."""
    def __init__(self, tok):
        super().__init__()
        self.tok = tok

    def head(self, hidden):  # the "hidden states" below are already the logits
        return hidden

    def trunk(self, idx):
        B, T = idx.shape
        logits = torch.zeros(B, T, 257)
        for b in range(B):
            text = self.tok.decode(idx[b].tolist())
            if "GOLD" in text.split("\n\n")[-1]:
                logits[b, torch.arange(T - 1), idx[b, 1:]] = 20.0
        return logits


def test_eval_core_scores_equal_full_logits():
    """score_example runs the head on the scored positions only; it must choose exactly what the full (B, T, V) logits choose."""
    import eval as ev
    model = small_model(seed=5)
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        prefix = torch.randint(0, 200, (30,), generator=g).tolist()
        seqs = [prefix + torch.randint(0, 200, (int(n),), generator=g).tolist() for n in torch.randint(1, 6, (4,), generator=g)]
        spans = [(30, len(t)) for t in seqs]
        ids = ev.right_pad(seqs, 0)
        losses = F.cross_entropy(model(ids)[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        means = [losses[i, s - 1:e - 1].mean().item() for i, (s, e) in enumerate(spans)]
        assert ev.score_example(model, seqs, spans, "multiple_choice", 0, "cpu") == means.index(min(means))
        s, e = spans[0]
        exact = bool((model(ids[:1])[0, s - 1:e - 1].argmax(-1) == ids[0, s:e]).all())
        assert ev.score_example(model, seqs[:1], spans[:1], "language_modeling", 0, "cpu") == exact
    greedy = naive_greedy(model, prefix, 3)  # an LM continuation the model predicts exactly
    assert ev.score_example(model, [prefix + greedy], [(30, 33)], "language_modeling", 0, "cpu") is True

def _write_bundle(root, tasks, rows):
    """A tiny bundle: core.yaml (in the real one's shape, escapes included), eval_meta_data.csv, eval_data/*.jsonl."""
    os.makedirs(os.path.join(root, "eval_data", "x"), exist_ok=True)
    yaml = ["icl_tasks:"]
    for label, ttype, shots, delim in tasks:
        yaml += ["-", f"  label: {label}", f"  dataset_uri: x/{label}.jsonl", f"  num_fewshot: [{shots}]", f"  icl_task_type: {ttype}"]
        if delim is not None:
            yaml.append(f'  continuation_delimiter: "{delim}"')
        with open(os.path.join(root, "eval_data", "x", f"{label}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows[label])
    open(os.path.join(root, "core.yaml"), "w").write("\n".join(yaml) + "\n")
    with open(os.path.join(root, "eval_meta_data.csv"), "w") as f:
        f.write("Eval Task,Task Category,Random baseline,Description\n")
        f.write('mc,x,25,"a, b"\nsch,x,50,y\nlm,x,0,z\n')


def test_eval_core_fake_model_each_type(tmp_path):
    mc = [{"query": f"Q{i}?", "choices": [f"a{i}", f"GOLD{i}", f"c{i}", f"d{i}"], "gold": 1 if i < 6 else 0} for i in range(8)]
    sch = [{"context_options": [f"ctx{i} GOLD", f"ctx{i} other"], "continuation": f" then {i}.", "gold": 0 if i < 3 else 1}
           for i in range(4)]
    lm = [{"context": f"  Fact {i}: GOLD is", "continuation": f" yes{i}"} for i in range(3)] + \
         [{"context": f"Fact {i}: none is", "continuation": f" no{i}"} for i in range(3, 5)]
    _write_bundle(str(tmp_path), [("mc", "multiple_choice", 2, "\\nAnswer: "), ("sch", "schema", 0, None), ("lm", "language_modeling", 10, None)],
                  {"mc": mc, "sch": sch, "lm": lm})
    tok = ByteTok()
    out = ev.evaluate_core(OracleModel(tok), tok, "cpu", bundle_dir=str(tmp_path))
    assert out["results"] == {"mc": 6 / 8, "sch": 3 / 4, "lm": 3 / 5}
    assert math.isclose(out["centered"]["mc"], (0.75 - 0.25) / 0.75)
    assert math.isclose(out["centered"]["sch"], (0.75 - 0.5) / 0.5)
    assert math.isclose(out["centered"]["lm"], 0.6)
    assert math.isclose(out["core"], (0.5 / 0.75 + 0.5 + 0.6) / 3)
    # max_per_task crops after the fixed shuffle; a 10-shot count larger than the cropped list does not crash
    out = ev.evaluate_core(OracleModel(tok), tok, "cpu", max_per_task=2, bundle_dir=str(tmp_path))
    shuffled = list(lm)
    random.Random(1337).shuffle(shuffled)
    assert out["results"]["lm"] == sum("GOLD" in r["context"] for r in shuffled[:2]) / 2
    csv_text = ev.core_csv(out)
    assert [c.strip() for c in csv_text.splitlines()[0].split(",")] == ["Task", "Accuracy", "Centered"]
    assert csv_text.splitlines()[-1].split(",")[0].strip() == "CORE" and len(csv_text.splitlines()) == 5


def test_eval_core_prompts_spans_and_fewshot():
    rows = [{"query": f"q{i}", "choices": ["x", "y"], "gold": i % 2} for i in range(5)]
    shots = ev._fewshot(rows, 2, 3)
    idx = random.Random(1234 + 2).sample([0, 1, 3, 4], 3)
    assert shots == [rows[j] for j in idx]
    assert len(ev._fewshot(rows, 0, 10)) == 4  # capped, no crash
    p = ev.build_prompts(rows[0], [rows[1]], "multiple_choice", "\nAnswer: ")
    assert p == ["q1\nAnswer: y\n\nq0\nAnswer: x", "q1\nAnswer: y\n\nq0\nAnswer: y"]
    p = ev.build_prompts({"context_options": ["A", "B"], "continuation": "c", "gold": 0},
                         [{"context_options": ["D", "E"], "continuation": "f", "gold": 1}], "schema", " ")
    assert p == ["E f\n\nA c", "E f\n\nB c"]
    p = ev.build_prompts({"context": " ctx ", "continuation": "cont"}, [{"context": "s ", "continuation": "t"}], "language_modeling", " ")
    assert p == ["s t\n\nctx", "s t\n\nctx cont"]
    # MC: common token prefix; schema: common token suffix; LM: without must prefix with
    seqs, spans = ev.scored_spans([[9, 1, 2, 3], [9, 1, 5], [9, 1, 2, 7, 8]], "multiple_choice")
    assert spans == [(2, 4), (2, 3), (2, 5)]
    seqs, spans = ev.scored_spans([[9, 1, 7, 8], [9, 2, 3, 7, 8]], "schema")
    assert spans == [(2, 4), (3, 5)]
    seqs, spans = ev.scored_spans([[9, 1, 2], [9, 1, 2, 3, 4]], "language_modeling")
    assert seqs == [[9, 1, 2, 3, 4]] and spans == [(3, 5)]
    with pytest.raises(AssertionError):
        ev.scored_spans([[9, 1, 2], [9, 1, 3, 4]], "language_modeling")
    seqs, spans = ev._crop([[1, 2, 3, 4, 5, 6]], [(4, 6)], 4)
    assert seqs == [[3, 4, 5, 6]] and spans == [(2, 4)]


def test_eval_core_yaml_of_the_bundle(tmp_path):
    with zipfile.ZipFile(BUNDLE_ZIP) as z:
        z.extractall(tmp_path, members=["eval_bundle/core.yaml", "eval_bundle/eval_meta_data.csv"])
    tasks = ev.load_core_tasks(str(tmp_path / "eval_bundle"))
    by = {t["label"]: t for t in tasks}
    assert len(tasks) == 18 and tasks[0] == dict(label="jeopardy", uri="world_knowledge/jeopardy_all.jsonl", shots=10,
                                                 type="language_modeling", delim="\nAnswer: ", baseline=0.0)
    assert by["copa"] == dict(label="copa", uri="commonsense_reasoning/copa.jsonl", shots=0, type="multiple_choice", delim=" ", baseline=50.0)
    assert by["arc_easy"]["delim"] == "\nAnswer: " and by["boolq"]["delim"] == "\nAnswer: " and by["piqa"]["delim"] == "\nAnswer: "
    assert by["agi_eval_lsat_ar"]["shots"] == 3
    assert by["winograd"]["type"] == "schema" and by["winograd"]["uri"] == "language_understanding/winograd_wsc.jsonl"
    assert by["boolq"]["baseline"] == 62 and by["bigbench_language_identification"]["baseline"] == 9.1


class TableModel(torch.nn.Module):
    """Fixed logits per position; loss_reduction='none' like the real GPT."""
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x, targets=None, loss_reduction="mean"):
        lg = self.logits[:x.size(0), :x.size(1)]
        if targets is None:
            return lg
        loss = F.cross_entropy(lg.reshape(-1, lg.size(-1)), targets.reshape(-1), ignore_index=-1, reduction=loss_reduction)
        return loss.view(targets.shape) if loss_reduction == "none" else loss


def test_eval_bpb_hand_computation():
    torch.manual_seed(0)
    V = 6  # token 5 is a special token (0 bytes)
    token_bytes = torch.tensor([1, 2, 3, 1, 4, 0], dtype=torch.int32)
    logits = torch.randn(2, 4, V)
    x = torch.zeros(2, 4, dtype=torch.long)
    y = torch.tensor([[1, 5, 2, -1], [4, 0, 5, 3]])
    model = TableModel(logits)
    got = ev.evaluate_bpb(model, iter([(x, y), (x, y)]), 2, token_bytes)
    nats, nbytes = 0.0, 0
    for b in range(2):
        for t in range(4):
            tgt = y[b, t].item()
            if tgt >= 0 and token_bytes[tgt] > 0:
                nats += -torch.log_softmax(logits[b, t], -1)[tgt].item()
                nbytes += token_bytes[tgt].item()
    assert math.isclose(got, nats / (math.log(2) * nbytes), rel_tol=1e-6)
    only_special = torch.tensor([[5, 5, -1, -1]])
    assert ev.evaluate_bpb(model, iter([(x[:1], only_special)]), 1, token_bytes) == float("inf")


def test_eval_bpb_real_model(tiny_model, tokenizer):
    from tokenizer import get_token_bytes
    token_bytes = get_token_bytes()
    bos = tokenizer.get_bos_token_id()
    ids = torch.tensor([tokenizer.encode("Hello world, this is a test.", prepend=bos) + [bos] + tokenizer.encode("More text")])
    x, y = ids[:, :-1], ids[:, 1:]
    got = ev.evaluate_bpb(tiny_model, [(x, y)], 1, token_bytes)
    loss = tiny_model(x, y, loss_reduction="none")
    keep = token_bytes[y] > 0
    assert not keep.all()  # the BOS target is excluded
    assert math.isclose(got, (loss[keep].sum() / (math.log(2) * token_bytes[y].sum())).item(), rel_tol=1e-5)


class LetterTok(ByteTok):
    def render_for_completion(self, conv):
        return self.encode(conv["messages"][0]["content"], prepend=256)


def test_eval_letter_restriction():
    tok = LetterTok()
    # the model prefers 'Z' at every position, then 'C', then 'B'; the answer must come from the allowed letters
    bias = torch.zeros(257)
    bias[ord("Z")], bias[ord("C")], bias[ord("B")] = 9.0, 5.0, 4.0

    class M(torch.nn.Module):
        def forward(self, idx):
            lg = bias.expand(idx.size(0), idx.size(1), 257).clone()
            lg[:, :, ord("D")] = 0
            # at padded positions (BOS inputs) push 'D' very high: using a padded position would answer D
            lg[idx == 256, ord("D")] = 50.0
            lg[:, 0, ord("D")] = 0.0
            return lg
    prompts = [tok.encode("short", prepend=256), tok.encode("a much longer prompt", prepend=256)]
    assert ev.predict_letters(M(), tok, prompts, [["A", "B", "C", "D"], ["A", "B"]], "cpu") == ["C", "B"]
    with pytest.raises(ValueError):
        ev.letter_ids(tok, ["AB"])

    class Task:
        eval_type = "categorical"

        def __len__(self):
            return 3

        def __getitem__(self, i):
            return {"messages": [{"role": "user", "content": "q" * (i + 1)}, {"role": "assistant", "content": "C"}], "letters": ["A", "B", "C", "D"]}

        def evaluate(self, conv, text):
            return text == conv["messages"][-1]["content"]
    assert ev.run_chat_eval("ARC-Easy", M(), tok, "cpu", batch_size=2, task=Task()) == 1.0
    assert ev.run_chat_eval("ARC-Easy", M(), tok, "cpu", max_problems=2, task=Task()) == 1.0


def test_eval_chatcore_centering():
    assert math.isclose(ev.chatcore({"ARC-Easy": 0.25}), 0.0)
    assert math.isclose(ev.chatcore({"ARC-Easy": 0.5, "GSM8K": 0.1}), ((0.5 - 0.25) / 0.75 + 0.1) / 2)
    full = {k: 1.0 for k in ev.CHAT_BASELINES}
    assert math.isclose(ev.chatcore(full), 1.0)


# ---- sandbox --------------------------------------------------------------------------------------------------------

def test_eval_sandbox_passes_and_fails():
    r = ev.execute_code("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('ok')")
    assert r["success"] and r["stdout"].strip() == "ok" and not r["timeout"] and r["error"] is None
    r = ev.execute_code("assert 1 == 2")
    assert not r["success"] and "AssertionError" in r["error"]
    for code in ("import os\nos.system('echo hi')", "import subprocess\nsubprocess.run(['echo', 'hi'])",
                 "open('x', 'w').close()\nimport os\nos.remove('x')", "import shutil\nshutil.rmtree('.')"):
        r = ev.execute_code(code)  # each runs without the guard (os.remove of a file that exists, rmtree of the temp dir)
        assert not r["success"] and "hi" not in r["stdout"], code
    for code in ("input()", "import sys\nsys.stdin.read()"):  # without the guard: EOFError and '' (stdin is /dev/null)
        assert "not allowed in the sandbox" in ev.execute_code(code)["error"], code
    r = ev.execute_code("import os\nprint(sorted(os.environ))")
    assert r["success"] and "NANOCHAT_BASE_DIR" not in r["stdout"] and "PATH" in r["stdout"]


def test_eval_sandbox_limits():
    r = ev.execute_code("x = 'a' * (2 * 1024 ** 3)\nprint(len(x))")
    assert not r["success"] and r["memory_exceeded"]
    r = ev.execute_code("with open('big.bin', 'wb') as f:\n    for _ in range(64):\n        f.write(b'0' * 1024 * 1024)\nprint('wrote')")
    assert not r["success"] and "wrote" not in r["stdout"]
    r = ev.execute_code("while True:\n    print('x' * 4096)", timeout=2.0)  # endless output is capped by the file-size limit
    assert not r["success"] and len(r["stdout"]) <= 16 * 1024 * 1024
    t0 = time.time()
    r = ev.execute_code("while True:\n    pass", timeout=1.0)
    assert r["timeout"] and not r["success"] and time.time() - t0 < 10


# the escapes of issue 16: each writes a file outside the sandbox's temp dir (in a folder anyone may write to) if it can
SANDBOX_ESCAPES = {
    "posix.system": "import posix\nposix.system('echo x > {target}')",
    "ctypes system": "import ctypes\nctypes.CDLL(None).system(b'echo x > {target}')",
    "posix_spawn": "import posix\npid = posix.posix_spawn('/bin/sh', ['sh', '-c', 'echo x > {target}'], {{}})\nposix.waitpid(pid, 0)",
    "reload(os)": "import importlib, os\nimportlib.reload(os)\nos.system('echo x > {target}')",
    "plain write": "open('{target}', 'w').write('x')",
    "setsid double fork": ("import posix, time\nprint(posix.getcwd(), flush=True)\nif posix.fork() == 0:\n    posix.setsid()\n"
                           "    if posix.fork() == 0:\n        time.sleep(1.0)\n        open('{target}', 'w').write('x')\n        posix._exit(0)\n"
                           "    posix._exit(0)\n"),
}
SANDBOX_SECRETS = {"the caller's environment": "print(open('/proc/{ppid}/environ').read())",
                   "/etc/shadow": "print(open('/etc/shadow').read())"}  # root-only; a missing file fails too


SANDBOX_PROBES = ["tcp to 127.0.0.1", *SANDBOX_ESCAPES, *SANDBOX_SECRETS]


def sandbox_probe(name, folder):
    """Run one probe through eval.execute_code -> what got out (a string), or None when the sandbox held."""
    if name in SANDBOX_SECRETS:
        r = ev.execute_code(SANDBOX_SECRETS[name].format(ppid=os.getpid()))
        return r["stdout"][:40] if r["success"] else None
    if name in SANDBOX_ESCAPES:
        target = os.path.join(folder, re.sub(r"\W", "_", name) + ".txt")
        r = ev.execute_code(SANDBOX_ESCAPES[name].format(target=target), timeout=3.0)
        if "fork" not in name:
            return "wrote the file" if os.path.exists(target) else None
        time.sleep(1.5)  # the survivor would write its file a second after execute_code returned
        tmp = r["stdout"].split()[0] if r["stdout"].strip() else "\0"  # the program's path holds its temp dir
        left = [p for p in os.listdir("/proc") if p.isdigit() and tmp in open(f"/proc/{p}/cmdline", "rb").read().decode(errors="replace")]
        return "wrote the file" if os.path.exists(target) else f"processes {left} survived" if left else None
    with socket.socket() as server:  # a TCP server on the loopback
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.5)
        r = ev.execute_code(f"import socket\nsocket.create_connection(('127.0.0.1', {server.getsockname()[1]}), timeout=2)\nprint('connected')")
        try:
            server.accept()[0].close()
            return "a connection reached the server"
        except socket.timeout:
            return "the program says it connected" if r["success"] else None


def sandbox_probes(folder):
    mounts = open("/proc/self/mountinfo").read()
    leaks = {name: sandbox_probe(name, folder) for name in SANDBOX_PROBES}
    leaks["host mounts"] = "changed" if open("/proc/self/mountinfo").read() != mounts else None
    return leaks


@pytest.fixture
def world_writable_folder():
    folder = tempfile.mkdtemp(prefix="sandbox_escape_")  # under /tmp, so anyone can reach it
    os.chmod(folder, 0o777)
    yield folder
    shutil.rmtree(folder)


@pytest.mark.parametrize("name", SANDBOX_PROBES)
def test_eval_sandbox_blocks_escape(name, world_writable_folder):
    mounts = open("/proc/self/mountinfo").read()
    assert sandbox_probe(name, world_writable_folder) is None
    assert open("/proc/self/mountinfo").read() == mounts  # the sandbox's mounts never reach the host


@SLOW
def test_eval_sandbox_blocks_escapes_when_not_root(world_writable_folder):
    """The same probes run by an unprivileged user (as root: in a child that drops to uid 65534 first)."""
    script = f"import sys, json\nsys.path.insert(0, {REPO!r})\nimport test_all\nprint(json.dumps(test_all.sandbox_probes({world_writable_folder!r})))"
    p = subprocess.run([sys.executable, "-c", script], preexec_fn=drop_to_nobody if os.getuid() == 0 else None, cwd=REPO,
                       capture_output=True, text=True, timeout=240, env=dict(os.environ))
    assert p.returncode == 0, p.stderr[-3000:]
    leaks = json.loads(p.stdout.splitlines()[-1])
    assert leaks == dict.fromkeys(leaks), leaks


def drop_to_nobody():
    """preexec_fn: become uid/gid 65534. Where the interpreter or this repo sits in a folder only root may enter (a pyenv or a
    clone under /root), a private mount namespace covers that folder with a tmpfs and binds just those two back into it."""
    import ctypes
    libc, paths = ctypes.CDLL(None, use_errno=True), [os.path.realpath(p) for p in (sys.base_prefix, REPO)]

    def mount(source, target, fstype, flags):
        if libc.mount(source and os.fsencode(source), os.fsencode(target), fstype, flags, None):
            raise OSError(ctypes.get_errno(), f"mount {target}")
    hidden = {next((f for f in (os.sep.join(p.split(os.sep)[:i]) for i in range(2, p.count(os.sep) + 2)) if not os.stat(f).st_mode & 1), None)
              for p in paths} - {None}
    if hidden:
        if libc.unshare(0x20000):  # CLONE_NEWNS: never mount anything in the host's namespace
            raise OSError(ctypes.get_errno(), "unshare")
        fds = [os.open(p, os.O_PATH) for p in paths]
        mount(None, "/", None, 16384 | (1 << 18))  # MS_REC | MS_PRIVATE
        for folder in hidden:
            mount("tmpfs", folder, b"tmpfs", 0)
        for p, fd in zip(paths, fds):
            os.makedirs(p, 0o755, exist_ok=True)
            mount(f"/proc/self/fd/{fd}", p, None, 4096 | 16384)  # MS_BIND | MS_REC
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)


def test_eval_sandbox_warns_once_about_refused_protections(monkeypatch, capsys):
    monkeypatch.setattr(ev, "NAMESPACES", {**ev.NAMESPACES, "time namespace of the test": 1})  # unshare(1): EINVAL, refused
    monkeypatch.setattr(ev, "_warned", set())
    assert all(ev.execute_code("print('ok')")["success"] for _ in range(2))
    assert capsys.readouterr().err.count("warning: the code sandbox runs without: time namespace of the test") == 1


# issue 27: the program replaces the files its output used to go through, or writes many files. Each runs execute_code
# in a child with its own TMPDIR and 1 GiB more address space than torch takes: a parent reading /dev/zero fails, not
# the host.
SANDBOX_UNLINK = """import posix
for n in ('stdout.txt', 'stderr.txt'):
    try:
        posix.unlink(n)
    except OSError:
        pass
"""
SANDBOX_COUNT = """n = 0
try:
    while n < {n}:
        open(f'f{{n}}', 'wb').write(bytes({size}))
        n += 1
finally:
    print(n)
"""
SANDBOX_OWN_FILES = {
    "symlinked output files": SANDBOX_UNLINK + "    posix.symlink(SECRET, n)\n",
    "output files to /dev/zero": SANDBOX_UNLINK + "    posix.symlink('/dev/zero', n)\n",
    "fifo as stdout.txt": SANDBOX_UNLINK + "posix.mkfifo('stdout.txt')\n",
    "many small files": SANDBOX_COUNT.format(n=20000, size=0),
    "many 1 MB files": SANDBOX_COUNT.format(n=100, size=1 << 20),
}
SANDBOX_OWN_FILES_RUNNER = """
import json, resource, sys
sys.path.insert(0, sys.argv[1])
import eval as ev
vm = int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmSize:'))) << 10
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.getrlimit(resource.RLIMIT_AS)[1]))
print(json.dumps(ev.execute_code(sys.argv[2], timeout=3.0)))
"""


@pytest.mark.parametrize("name", SANDBOX_OWN_FILES)
def test_eval_sandbox_own_files_and_their_number(name, tmp_path, world_writable_folder):
    secret = tmp_path / "secret.txt"  # only its owner may read it: root in CI, the sandbox runs as nobody
    secret.write_text("the caller's secret 27")
    secret.chmod(0o600)
    tmpdir = world_writable_folder  # under /tmp, so nobody can reach the program in it
    code = f"SECRET = {str(secret)!r}\n" + SANDBOX_OWN_FILES[name]
    p = subprocess.run([sys.executable, "-c", SANDBOX_OWN_FILES_RUNNER, REPO, code], capture_output=True, text=True,
                       timeout=60, env=dict(os.environ, TMPDIR=str(tmpdir)))
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout.splitlines()[-1])
    assert "secret 27" not in r["stdout"] + r["stderr"] and len(r["stdout"]) + len(r["stderr"]) < 1 << 20, name
    assert os.listdir(tmpdir) == [], "the temp dir is removed"
    if name.startswith("many"):  # in all at most 16 MB (the file-size limit) and SANDBOX_MAX_FILES files
        assert not r["success"] and "No space left" in r["error"], r
        assert int(r["stdout"]) <= (16 if "MB" in name else ev.SANDBOX_MAX_FILES)
    else:
        assert r["success"], r  # the program ran and did what it meant to


# ---- report ---------------------------------------------------------------------------------------------------------

def test_eval_report_assembles(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    rdir = common.report_dir()
    open(os.path.join(rdir, "stale.md"), "w").write("old")
    ev.report_reset()
    assert os.listdir(rdir) == ["header.md"]
    header = open(os.path.join(rdir, "header.md")).read()
    assert "Run started: " in header and "- Commit: " in header and "- Characters: " in header and "- PyTorch: " in header
    common.write_report_section("chat-evaluation-sft", {"ARC-Easy": 0.3, "GSM8K": 0.05, "ChatCORE": 0.1})
    common.write_report_section("base-model-evaluation", [{"CORE": 0.2}, {"arc_easy": 0.5}])
    open(os.path.join(rdir, "some-other-stage.md"), "w").write("## Some other stage\ntimestamp: 2026-01-01T00:00:00\n\n- x: 1\n")
    for step in range(5):
        common.append_log("base", {"step": step, "train_loss": 5.0 - step, **({"val_bpb": 2.0 - 0.1 * step} if step % 2 == 0 else {})})
    common.append_log("sft", {"step": 0, "train_loss": 1.5, "val_bpb": 0.9})
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    text = ev.report_generate(copy_to=str(cwd))
    assert text.index("## Base model evaluation") < text.index("## Chat evaluation sft") < text.index("## Some other stage") < text.index("## Summary")
    assert "| CORE | 0.2000 | - | - | - |" in text
    assert "| ARC-Easy | - | - | 0.3000 | - |" in text and "| ChatCORE | - | - | 0.1000 | - |" in text
    assert "| MMLU | - | - | - | - |" in text and "Total wall clock time: 0h0m" in text and "![loss curves](loss.svg)" in text
    assert open(cwd / "report.md").read() == text.replace("](loss.svg)", f"]({os.path.join(rdir, 'loss.svg')})")
    svg = ET.parse(os.path.join(rdir, "loss.svg")).getroot()
    assert svg.tag.endswith("svg") and len(svg.findall(".//{http://www.w3.org/2000/svg}polyline")) >= 2


def test_eval_report_single_task_keeps_other_rows(tmp_path, monkeypatch):
    """`eval.py --stage sft chat -a MMLU` after a full chat eval updates MMLU and ChatCORE, and keeps every other figure."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    ev.report_reset()
    scores = {"ARC-Easy": 0.5, "ARC-Challenge": 0.4, "MMLU": 0.3, "GSM8K": 0.2, "HumanEval": 0.1, "SpellingBee": 0.6}
    monkeypatch.setattr(ev, "run_chat_eval", lambda name, *a: scores[name])
    args = argparse.Namespace(stage="sft", task_name=None, max_problems=None, batch_size=8, num_samples=1, max_new_tokens=8,
                              temperature=0.0, top_k=50)
    ev.cmd_chat(args, None, {}, None, "cpu")
    scores["MMLU"] = 0.35
    ev.cmd_chat(argparse.Namespace(**{**vars(args), "task_name": "MMLU", "max_problems": 500}), None, {}, None, "cpu")
    text = ev.report_generate()
    values = {k: "%.4f" % v for k, v in scores.items()}
    for k, v in values.items():
        assert f"| {k} | - | - | {v} | - |" in text, k
    assert f"| ChatCORE | - | - | {ev.chatcore(scores):.4f} | - |" in text


@SLOW
def test_eval_report_cli(tmp_path):
    env = {"NANOCHAT_BASE_DIR": str(tmp_path)}
    run_script(["eval.py", "report", "reset"], env=env)
    run_script([os.path.join(REPO, "eval.py"), "report"], env=env, cwd=str(tmp_path))
    assert "## Summary" in open(tmp_path / "report.md").read()
    p = run_script(["eval.py", "core", "reset"], env=env, check=False)
    assert p.returncode == 2 and "'reset' only goes with the report command" in p.stderr and "Traceback" not in p.stderr


# ---- chat tasks from data.py ----------------------------------------------------------------------------------------

def test_eval_gsm8k_extraction_and_generative(base_dir):
    import data
    task = data.GSM8K("test", size=3)
    conv = task[0]
    ref = data.extract_answer(conv["messages"][-1]["content"][-1]["text"])
    assert ref is not None and task.evaluate(conv, f"some work\n#### {ref}") and not task.evaluate(conv, f"#### {ref}.0")
    assert data.extract_answer("#### -1,234.5 apples") == "-1234.5"

    class FakeEngine:  # sample 1 is wrong, sample 2 right: "pass if any sample passes"
        def generate_batch(self, tokens, num_samples=1, **kw):
            texts = ["#### 0"] + [f"#### {ref}"] * (num_samples - 1)
            return [list(tokens) + list(t.encode()) for t in texts], None

    class Tok:
        def render_for_completion(self, conv):
            return [1, 2, 3]

        def decode(self, ids):
            return bytes(ids).decode()
    assert ev.run_generative(task, FakeEngine(), Tok(), "cpu", 1, num_samples=2) == 1
    assert ev.run_generative(task, FakeEngine(), Tok(), "cpu", 1, num_samples=1) == 0


def test_eval_humaneval_program_assembly(base_dir):
    import data
    task = data.HumanEval(size=2)
    conv = task[0]
    prompt, canonical = conv["messages"][0]["content"], conv["messages"][-1]["content"]
    fenced = "Here you go:\n```python\n" + canonical + "\n```\nDone."
    program = data.build_program(conv, fenced)
    assert program.endswith(f"check({conv['entry_point']})") and "Here you go" not in program
    evaluate = ev._task_evaluator(task)
    assert evaluate(conv, fenced) and evaluate(conv, canonical)
    assert not evaluate(conv, prompt + "\n    return None\n")
    hand = {"messages": [{"role": "user", "content": "import math\nfrom typing import List\n\n\ndef f(x):\n    import os\n"}],
            "test": "def check(c):\n    assert c(4) == 2.0", "entry_point": "f"}
    p = data.build_program(hand, "```\ndef f(x):\n    return math.sqrt(x)\n```")
    assert p.startswith("import math\nfrom typing import List\n\ndef f(x):") and "import os" not in p
    assert ev.execute_code(p)["success"]


@pytest.fixture(scope="module")
def tiny_checkpoints(base_dir, tokenizer):
    """A random-init depth-2 model saved as base and sft checkpoints."""
    from model import build_model, save_checkpoint
    cfg = dict(sequence_len=128, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    torch.manual_seed(0)
    model = build_model(cfg, "cpu")
    for stage in ("base", "sft"):
        save_checkpoint(common.checkpoint_dir(stage, "d2"), 5, model.state_dict(), {"step": 5, "model_config": cfg})
    return cfg


@SLOW
def test_eval_cli_core_bpb_chat(base_dir, tiny_checkpoints):
    env = {"NANOCHAT_BASE_DIR": base_dir}
    p = run_script(["eval.py", "--stage", "base", "core", "--max-per-task", "3"], env=env)
    assert "CORE:" in p.stdout and p.stdout.count("acc ") == 18
    csvs = os.listdir(os.path.join(base_dir, "base_eval"))
    assert csvs == ["base_d2_000005.csv"]
    lines = open(os.path.join(base_dir, "base_eval", csvs[0])).read().splitlines()
    assert len(lines) == 20 and lines[-1].startswith("CORE")
    assert "- CORE: " in open(os.path.join(base_dir, "report", "base-model-evaluation.md")).read()
    p = run_script(["eval.py", "--stage", "base", "bpb", "--device-batch-size", "2", "--eval-tokens", "512"], env=env)
    text = open(os.path.join(base_dir, "report", "base-model-loss.md")).read()
    assert "- train bpb: " in text and "- val bpb: " in text and "The capital of France is" in text
    p = run_script(["eval.py", "--stage", "sft", "chat", "-a", "ARC-Easy|GSM8K", "--max-problems", "4", "--max-new-tokens", "8"], env=env)
    text = open(os.path.join(base_dir, "report", "chat-evaluation-sft.md")).read()
    assert "- ARC-Easy: " in text and "- GSM8K: " in text and "ChatCORE" not in text
    p = run_script(["eval.py", "--stage", "sft", "chat", "-a", "Nope"], env=env, check=False)
    assert p.returncode != 0 and "unknown chat task" in p.stderr


DDP_SCRIPT = r'''
import json, os, sys, torch
sys.path.insert(0, sys.argv[2])
import common, eval as ev
from test_fakes import ByteTok, OracleModel, TableModel
ddp, rank, local_rank, world, device = common.init_runtime("cpu")
tok = ByteTok()
out = ev.evaluate_core(OracleModel(tok), tok, "cpu", bundle_dir=sys.argv[1])
torch.manual_seed(0)
logits = torch.randn(4, 3, 6)
x, y = torch.zeros(4, 3, dtype=torch.long), torch.tensor([[1, 2, 3], [4, 5, 0], [1, 1, 1], [2, -1, 3]])
bpb = ev.evaluate_bpb(TableModel(logits[rank::world]), [(x[rank::world], y[rank::world])], 1, torch.tensor([1, 2, 3, 1, 4, 0]))
if rank == 0:
    print("RESULT", json.dumps(dict(out, bpb=bpb, world=world)))
common.cleanup_runtime()
'''


@SLOW
def test_eval_ddp_striding_matches_single_process(tmp_path):
    """torchrun with 2 CPU ranks (gloo): CORE and bpb all-reduced equal the single-process numbers."""
    import inspect
    rows = {"mc": [{"query": f"Q{i}?", "choices": [f"a{i}", f"GOLD{i}"], "gold": 1 if i % 3 else 0} for i in range(7)],
            "sch": [{"context_options": [f"c{i} GOLD", f"c{i} x"], "continuation": " end", "gold": i % 2} for i in range(5)],
            "lm": [{"context": f"F{i}: {'GOLD' if i % 2 else 'none'} is", "continuation": f" v{i}"} for i in range(5)]}
    _write_bundle(str(tmp_path / "b"), [("mc", "multiple_choice", 3, None), ("sch", "schema", 1, None), ("lm", "language_modeling", 2, None)], rows)
    fakes = "import torch\nimport torch.nn.functional as F\n" + "".join(inspect.getsource(c) + "\n" for c in (ByteTok, OracleModel, TableModel))
    (tmp_path / "test_fakes.py").write_text(fakes)
    (tmp_path / "ddp.py").write_text(DDP_SCRIPT)
    env = {"PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    results = []
    for n in ("1", "2"):
        p = run_script(["-m", "torch.distributed.run", "--nproc_per_node", n, "--master_port", str(29500 + random.randint(1, 999)),
                        str(tmp_path / "ddp.py"), str(tmp_path / "b"), REPO], env=env)
        results.append(json.loads(p.stdout.split("RESULT", 1)[1].strip().splitlines()[0]))
    assert results[1]["world"] == 2 and results[0]["world"] == 1
    assert results[0]["results"] == results[1]["results"] and math.isclose(results[0]["bpb"], results[1]["bpb"], rel_tol=1e-9)
    assert results[0]["results"]["mc"] == 4 / 7


def test_eval_cli_missing_checkpoint_is_a_clear_error(tmp_path, tokenizer):
    shutil.copytree(os.path.join(os.environ["NANOCHAT_BASE_DIR"], "tokenizer"), tmp_path / "tokenizer")
    p = run_script(["eval.py", "--stage", "mid", "chat"], env={"NANOCHAT_BASE_DIR": str(tmp_path)}, check=False)
    assert p.returncode != 0 and "error: no mid checkpoints" in p.stderr and "Traceback" not in p.stderr



def test_eval_report_keeps_a_foreign_report_md_and_skips_a_half_line(tmp_path, monkeypatch, capsys):
    """issue 27: `eval.py report` never overwrites a ./report.md it did not write (one line; its own report is still
    written), rewrites its own copy, and a half-written last line in base_log.jsonl is skipped with a note."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    ev.report_reset()
    common.append_log("base", {"step": 0, "train_loss": 5.0})
    with open(os.path.join(common.report_dir(), "base_log.jsonl"), "a") as f:
        f.write('{"step": 1, "train_lo')  # a run killed while writing
    mine = tmp_path / "report.md"
    mine.write_text("# my notes\n")
    with pytest.raises(common.UserError, match=f"^error: .* is written, but {re.escape(str(mine))} was not written by"):
        ev.report_generate(copy_to=str(tmp_path))
    assert mine.read_text() == "# my notes\n" and "## Summary" in open(os.path.join(common.report_dir(), "report.md")).read()
    assert "note: skipped 1 unreadable line(s) of " in capsys.readouterr().out
    mine.unlink()
    ev.report_generate(copy_to=str(tmp_path))
    common.append_log("base", {"step": 2, "train_loss": 4.0})  # a line of its own after the half line
    text = ev.report_generate(copy_to=str(tmp_path))  # its own copy: rewritten
    assert "## Summary" in mine.read_text() and text.startswith(ev.REPORT_MARKER)
    assert [r["step"] for r in ev.read_logs(common.report_dir())["base"]] == [0, 2]


@SLOW
def test_eval_cli_max_problems_below_one(base_dir, tiny_checkpoints):
    for n in ("-3", "0"):
        p = run_script(["eval.py", "chat", "-a", "ARC-Easy", "--max-problems", n], env={"NANOCHAT_BASE_DIR": base_dir}, check=False)
        assert p.returncode == 1 and p.stderr == f"error: --max-problems must be at least 1 (or left out for all), not {n}\n"

# =============================================================================
# chat.py
# =============================================================================

CHAT_TAG = "chat_test"  # its own tag, so checkpoints other sections save in the session base dir are never picked up


@pytest.fixture(scope="module")
def chat_checkpoint(tokenizer, tiny_config):
    """A tiny random-init SFT checkpoint (the tiny_model recipe; tiny_model itself is function-scoped) under the session base dir."""
    from model import GPT, save_checkpoint
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(tiny_config)
    model.to_empty(device="cpu")
    model.init_weights()
    path = common.checkpoint_dir("sft", CHAT_TAG)
    save_checkpoint(path, 0, model.state_dict(), {"model_config": dataclasses.asdict(tiny_config)})
    return path


@pytest.fixture(scope="module")
def chat_server(chat_checkpoint, tmp_path_factory):
    """`python chat.py --web --port 0` in a subprocess; yields (port, log path); stopped at the end."""
    log = str(tmp_path_factory.mktemp("chat") / "server.log")
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "chat.py", "--web", "-g", CHAT_TAG, "--port", "0", "-m", "24", "--max-queue", "8", "--batch-cap", "4"],
                                cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ))
    try:
        for _ in range(1800):
            m = re.search(r"http://127\.0\.0\.1:(\d+)/", open(log).read())
            if m or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert m, f"server did not start:\n{open(log).read()}"
        yield int(m.group(1)), log
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    print(open(log).read()[-3000:])


def http_request(port, method, path, body=None, headers=None, timeout=60):
    """-> (status, headers dict, body bytes); body may be a dict (sent as JSON), str or bytes."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    conn.request(method, path, body, {"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, dict(r.getheaders()), data


def sse_events(data):
    return [json.loads(line[6:]) if line[6:].startswith("{") else line[6:]
            for line in data.decode("utf-8").split("\n") if line.startswith("data: ")]


def test_chat_reply_streams_utf8_whole_and_brackets_tools(tokenizer):
    from chat import Reply, parse_messages
    text = "h\u00e9llo \U0001F600 \u4e16\u754c caf\u00e9 \U0001F468\u200d\U0001F469\u200d\U0001F467!"
    reply = Reply(tokenizer)
    pieces = [reply.push(t) for t in tokenizer.encode(text)]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    ids = [tokenizer.encode_special("<|python_start|>"), *tokenizer.encode("2+2"), tokenizer.encode_special("<|python_end|>"),
           tokenizer.encode_special("<|output_start|>"), *tokenizer.encode("4"), tokenizer.encode_special("<|output_end|>")]
    assert "".join(reply.push(t) for t in ids) == "[python: 2+2] [output: 4] "
    # list-of-parts content is joined; the system message stays first (the tokenizer's render_prompt merges it: the test below)
    msgs = parse_messages({"messages": [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}]})
    assert msgs == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\nthere"}]


def test_chat_prompt_tokens_are_the_tokenizers_format(tokenizer):
    """The served prompt (the tokenizer's render_prompt with any_order): its render_for_completion wherever the roles alternate
    (with or without a system message), and the same per-message format for any other order, which the API also serves (ids
    pinned before the refactor of issue 21)."""
    from tokenizer import Tokenizer
    tok = Tokenizer.from_ranks({bytes([i]): i for i in range(256)})  # ids: the bytes, then <|bos|> 256, user 257/258, assistant 259/260
    hi, yo, s = [257, 72, 105, 258], [259, 89, 111, 260], [83, 10, 10]  # "Hi" as a user message, "Yo" as an assistant one, "S\n\n"
    cases = [([("user", "Hi")], [256, *hi, 259]),
             ([("system", "S"), ("user", "Hi")], [256, 257, *s, *hi[1:], 259]),
             ([("user", "Hi"), ("assistant", "Yo"), ("user", "?")], [256, *hi, *yo, 257, 63, 258, 259]),
             ([("system", "S"), ("user", "Hi"), ("assistant", "Yo"), ("user", "?")], [256, 257, *s, *hi[1:], *yo, 257, 63, 258, 259]),
             ([("assistant", "Yo"), ("user", "Hi")], [256, *yo, *hi, 259]),  # not alternating from a user message: served all the same
             ([("user", "Hi"), ("user", "Hi")], [256, *hi, *hi, 259]),
             ([("system", "S"), ("user", "Hi"), ("assistant", "Yo")], [256, 257, *s, *hi[1:], *yo, 259])]
    for pairs, ids in cases:
        messages = [{"role": r, "content": t} for r, t in pairs]
        assert tok.render_prompt(messages, any_order=True) == ids, pairs
        roles = [r for r, _ in pairs if r != "system"]
        alternating = roles == (["user", "assistant"] * len(roles))[:len(roles)]
        if alternating and roles[-1] == "user":
            conversation = {"messages": messages + [{"role": "assistant", "content": "x"}]}
            assert tok.render_for_completion(conversation) == ids, pairs
            assert tokenizer.render_prompt(messages, any_order=True) == tokenizer.render_for_completion(conversation), pairs  # a BPE too
        elif not alternating:
            with pytest.raises(AssertionError):  # without any_order (training data) the roles must alternate
                tok.render_prompt(messages)


@pytest.mark.parametrize("options", [{}, ALL_OPTIONS], ids=["release", "all_options"])
def test_chat_batched_decoding_equals_alone(options):
    """Requests decoded together in one worker's batch (joining at different steps, prompts of different lengths, one calling
    the calculator, one sampled with its own seed and top-k, one waiting for a free row) get token for token the reply each
    gets alone from the single-request path (Reply.stream over Engine.generate). With every option on, one prompt runs
    past the 128-key window of the short layers and each row carries its own smear embedding."""
    from chat import WorkerPool, Reply
    tok, S = ByteTokenizer(), ByteTokenizer().encode_special
    seq = 256 if options else 128
    model = small_model(seq=seq, n_layer=3 if options else 2, **options)
    nudge = {ord("#"): S("<|python_start|>"), S("<|python_start|>"): ord("1"), ord("1"): ord("2"), ord("2"): ord("*"),
             ord("*"): ord("3"), ord("3"): S("<|python_end|>")}
    batch_sizes = []

    class Nudged:  # the real model, its logits pushed after the tokens above: a calculator call random weights never make
        config, get_device = model.config, model.get_device

        def trunk(self, ids, kv):
            self.last = ids[:, -1].tolist()
            batch_sizes.append(ids.size(0))
            return model.trunk(ids, kv)

        def head(self, x):
            logits = model.head(x)
            for i, t in enumerate(self.last):
                if t in nudge:
                    logits[i, nudge[t]] += 100.0
            return logits
    engine = Engine(Nudged(), tok)
    texts = ["Hello there", "A much longer prompt, so that this row's positions run well ahead of the others." * (2 if options else 1),
             "What is 12*3? #", "hi", "Tell me more."]
    params = [dict(max_tokens=40, temperature=0.0, top_k=0, seed=1) for _ in texts]
    params[3].update(temperature=1.0, top_k=20, seed=5)
    prompts = [[S("<|bos|>"), *tok.encode(t)] for t in texts]
    alone = []
    for prompt, p in zip(prompts, params):
        reply = Reply(tok)
        list(reply.stream(engine, prompt, **p))
        alone.append(reply.ids)
    call = [S("<|python_start|>"), *tok.encode("12*3"), S("<|python_end|>"), S("<|output_start|>"), *tok.encode("36"), S("<|output_end|>")]
    assert alone[2][:len(call)] == call
    batch_sizes.clear()
    pool = WorkerPool([engine], max_queue=4, cap=4, context=seq)
    jobs, deadline = [], time.time() + 120
    for prompt, p in zip(prompts, params):
        while jobs and len(jobs[-1].reply.ids) < 3 and time.time() < deadline:  # each joins a few steps after the previous one
            time.sleep(0.005)
        jobs.append(pool.start(prompt, p, Reply(tok)))  # the 5th waits until a row frees (cap 4)
    for job in jobs:
        assert list(iter(lambda job=job: job.out.get(timeout=120), None)) and job.out.empty()
    assert [job.reply.ids for job in jobs] == alone
    assert max(batch_sizes) == 4 and len(set(batch_sizes)) >= 3, sorted(Counter(batch_sizes).items())


def test_chat_sse_streams_and_ends(chat_server):
    port, log = chat_server
    status, headers, page = http_request(port, "GET", "/")
    assert status == 200 and b"<textarea" in page and b"http" not in page.replace(b"http-equiv", b"")  # self-contained page
    status, headers, data = http_request(port, "POST", "/chat/completions",
                                         {"messages": [{"role": "user", "content": "Hello \U0001F600"}], "max_tokens": 16, "temperature": 1.0})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(data)
    assert events[-1] == {"done": True}
    assert all(set(e) == {"token", "gpu"} and e["gpu"] == 0 for e in events[:-1]) and len(events) >= 2
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)  # keep-alive: several requests on one connection
    for path in ["/health", "/v1/models", "/health"]:
        conn.request("GET", path)
        r = conn.getresponse()
        assert r.status == 200 and r.version == 11 and not r.will_close
        body = json.loads(r.read())
    conn.close()
    health = body
    assert health["status"] == "ok" and health["ready"] and health["available_workers"] == 1 and health["num_gpus"] == 0
    assert health["limits"] == {"temperature": [0.0, 2.0], "top_k": [0, 200], "max_tokens": [1, 4096]}  # the page's checks
    stats = json.loads(http_request(port, "GET", "/stats")[2])
    assert stats["total_workers"] == 1 and stats["busy_workers"] == 0 and stats["workers"] == [{"gpu_id": 0, "device": "cpu"}]
    assert re.search(r"POST /chat/completions 200 .*worker=0 prompt=\d+ completion=\d+ finish=(stop|length)", open(log).read())


def test_chat_openai_client(chat_server):
    try:
        import openai
    except ImportError:
        skip_or_fail("the openai package is not installed")
    port, _ = chat_server
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    models = client.models.list().data
    assert len(models) == 1 and models[0].id == f"nanochat-sft-{CHAT_TAG}" and client.models.retrieve("gpt-4o").id == models[0].id
    r = client.chat.completions.create(model="gpt-4o", max_tokens=8, temperature=0.5, top_p=0.9, presence_penalty=0.1,
                                       messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}])
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant" and isinstance(r.choices[0].message.content, str)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens and r.usage.completion_tokens <= 8
    parts = [{"type": "text", "text": "What is"}, {"type": "text", "text": "2+2?"}]
    messages = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": parts}]
    stream = client.chat.completions.create(model="anything", max_completion_tokens=6, stream=True, stream_options={"include_usage": True},
                                            seed=5, temperature=1.0, messages=messages)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"]) and chunks[-1].usage.completion_tokens <= 6
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(model="anything", max_completion_tokens=6, seed=5, temperature=1.0, messages=messages)
    assert text == whole.choices[0].message.content and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # same seed
    same = [client.chat.completions.create(model="m", seed=7, temperature=1.0, max_tokens=12, messages=[{"role": "user", "content": "hi"}])
            .choices[0].message.content for _ in range(2)]
    assert same[0] == same[1]  # a given seed reproduces; without one every request draws its own
    with pytest.raises(openai.BadRequestError, match="n = 1"):
        client.chat.completions.create(model="x", n=2, messages=[{"role": "user", "content": "hi"}])


def test_chat_bad_inputs_get_4xx_with_reason(chat_server):
    port, log = chat_server
    user = [{"role": "user", "content": "hi"}]
    cases = [("/chat/completions", b"{not json", 400), ("/chat/completions", b"\xff\xfe", 400), ("/chat/completions", [1, 2], 400),
             ("/chat/completions", {}, 400), ("/chat/completions", {"messages": []}, 400), ("/chat/completions", {"messages": "hi"}, 400),
             ("/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 400),
             ("/chat/completions", {"messages": [*user, {"role": "system", "content": "x"}]}, 400),
             ("/chat/completions", {"messages": [{"role": "system", "content": "x"}]}, 400),
             ("/chat/completions", {"messages": [{"role": "user", "content": "  "}]}, 400),
             ("/chat/completions", {"messages": [{"role": "user", "content": None}]}, 400),
             ("/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400),
             ("/chat/completions", {"messages": ["hi"]}, 400),
             ("/chat/completions", {"messages": [{"role": "user", "content": "x" * 8001}]}, 400),
             ("/chat/completions", {"messages": [{"role": "user", "content": "x" * 8000}] * 5}, 400),
             ("/chat/completions", {"messages": user * 501}, 400),
             ("/chat/completions", {"messages": user, "temperature": 2.5}, 400), ("/chat/completions", {"messages": user, "temperature": -0.1}, 400),
             ("/chat/completions", {"messages": user, "temperature": "hot"}, 400), ("/chat/completions", {"messages": user, "top_k": 201}, 400),
             ("/chat/completions", {"messages": user, "top_k": -1}, 400), ("/chat/completions", {"messages": user, "top_k": 2.5}, 400),
             ("/chat/completions", {"messages": user, "max_tokens": 0}, 400), ("/chat/completions", {"messages": user, "max_tokens": 4097}, 400),
             ("/chat/completions", {"messages": user, "max_tokens": True}, 400),
             ("/chat/completions", {"messages": [{"role": "user", "content": "x" * 3000}] * 20}, 400),  # over the model's context
             ("/v1/chat/completions", {"messages": user, "n": 3}, 400), ("/v1/chat/completions", {"messages": user, "max_completion_tokens": 0}, 400),
             ("/chat/completions", b"x" * (2 << 20) + b"xyz", 413), ("/nope", {"messages": user}, 404),
             ("/chat/completions", b"[" * 200_000, 400), ("/chat/completions", b'{"a":' * 100_000, 400)]  # nested too deep
    for path, body, expected in cases:
        status, headers, data = http_request(port, "POST", path, body)
        reason = json.loads(data)["error"]["message"]
        assert status == expected and reason and "Traceback" not in reason, (path, str(body)[:80], status, data[:200])
    assert http_request(port, "GET", "/missing")[0] == 404
    assert http_request(port, "POST", "/chat/completions", b"{}", {"Content-Length": "abc"})[0] in (400, 411)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # two Content-Length headers
        s.sendall(b"POST /chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 20\r\n\r\n{}")
        answer = s.recv(1000)
        while b"one Content-Length" not in answer and (more := s.recv(1000)):  # the body may come after the headers
            answer += more
        assert answer.startswith(b"HTTP/1.1 400") and b"one Content-Length" in answer, answer
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # garbage instead of HTTP
        s.sendall(b"\x16\x03\x01 hello there\r\n\r\n")
        assert s.recv(1000).startswith(b"HTTP/1.1 400")
    status, _, data = http_request(port, "POST", "/chat/completions", {"messages": user, "max_tokens": 2, "top_k": 0, "temperature": 0})
    assert status == 200 and sse_events(data)[-1] == {"done": True}  # still serving, edge values accepted
    assert "Traceback" not in open(log).read()


def test_chat_long_conversation_keeps_its_latest_turns(chat_server, tokenizer):
    """A conversation past the 128-token context is answered from the system message and its latest turns (API and the
    page's SSE endpoint say so); a single message longer than the context is the only error."""
    port, _ = chat_server
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"Turn {i}: the sea is wide and the ships sail far away today."}
             for i in range(9)]
    system = {"role": "system", "content": "Be brief."}
    messages = [system, *turns]
    kept = max(k for k in range(1, 10, 2) if len(tokenizer.render_prompt([system, *turns[-k:]])) + 32 <= 128)  # a reply of 128 // 4
    assert kept < 9
    body = json.loads(http_request(port, "POST", "/v1/chat/completions", {"messages": messages, "max_tokens": 100})[2])
    n_prompt = len(tokenizer.render_prompt([system, *turns[-kept:]]))
    assert body["usage"]["prompt_tokens"] == n_prompt and body["usage"]["completion_tokens"] <= 128 - n_prompt
    assert body["choices"][0]["finish_reason"] in ("stop", "length") and f"the {9 - kept} oldest message(s) were left out" in body["note"]
    status, _, data = http_request(port, "POST", "/chat/completions", {"messages": messages, "max_tokens": 100})
    events = sse_events(data)
    assert status == 200 and events[0] == {"note": body["note"]} and events[-1] == {"done": True} and len(events) > 2
    long = [*messages[:-1], {"role": "user", "content": "word " * 200}]
    status, _, data = http_request(port, "POST", "/v1/chat/completions", {"messages": long})
    assert status == 400 and "the last message needs" in json.loads(data)["error"]["message"]


def test_chat_concurrent_requests_complete_or_503(chat_server):
    port, log = chat_server
    body = {"messages": [{"role": "user", "content": "Tell me something."}], "max_tokens": 12}

    def one(i):
        path = "/chat/completions" if i % 2 else "/v1/chat/completions"
        return http_request(port, "POST", path, body, timeout=300)
    with concurrent.futures.ThreadPoolExecutor(50) as ex:
        results = list(ex.map(one, range(50)))
    statuses = [s for s, _, _ in results]
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 12, statuses  # a batch of 4 + 8 waiting always get through
    for status, headers, payload in results:
        if status == 503:
            assert headers["Retry-After"] and "busy" in json.loads(payload)["error"]["message"]
        elif payload.startswith(b"data: "):
            assert sse_events(payload)[-1] == {"done": True}
        else:
            assert json.loads(payload)["choices"][0]["finish_reason"] in ("stop", "length")
    print(f"50 concurrent requests: {statuses.count(200)} completed, {statuses.count(503)} got 503")
    health = json.loads(http_request(port, "GET", "/health")[2])
    assert health["available_workers"] == 1


def test_chat_client_disconnect_leaves_the_batch(chat_server):
    """Clients that go away mid-stream leave the batch; a greedy stream decoded alongside them ends with the same text as alone."""
    port, log = chat_server
    body = json.dumps({"messages": [{"role": "user", "content": "Go on."}], "max_tokens": 4096, "temperature": 1.0, "top_k": 0}).encode()
    steady = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 60, "temperature": 0.0}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/chat/completions", json.dumps(steady), {"Content-Type": "application/json"})
    stream = conn.getresponse()
    lines = [stream.readline()]  # its first event: it is in the batch
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"POST /chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body) + body)
            assert s.recv(200).startswith(b"HTTP/1.1 200")
    together = sse_events(b"".join(lines) + stream.read())
    conn.close()
    stats = json.loads(http_request(port, "GET", "/stats")[2])  # the others had ~120 tokens of room: they left, not finished
    assert stats["active_requests"] == 0 and stats["waiting_requests"] == 0, stats
    for _ in range(50):
        if "client disconnected" in open(log).read():
            break
        time.sleep(0.1)
    assert re.search(r"POST /chat/completions 200 .*finish=length client disconnected", open(log).read())
    alone = sse_events(http_request(port, "POST", "/chat/completions", steady)[2])
    assert together[-1] == alone[-1] == {"done": True} and "".join(e.get("token", "") for e in together) == "".join(e.get("token", "") for e in alone)


@SLOW
def test_chat_cli_prompt_and_interactive(chat_checkpoint):
    p = run_script(["chat.py", "-g", CHAT_TAG, "-p", "Why is the sky blue?", "-m", "16", "-t", "0"])
    assert "Traceback" not in p.stderr and "User:" not in p.stdout and p.stdout.strip()  # greedy: the same non-empty reply each run
    p = run_script(["chat.py", "-g", CHAT_TAG, "-m", "8", "-t", "1.0"], input="hi\nclear\n\nwhat is 2+2?\nquit\nnever read\n")
    assert p.stdout.count("Assistant:") == 2 and "(conversation cleared)" in p.stdout and "never read" not in p.stdout
    long = "the sea is wide and the ships sail far away today, " * 3  # a few of these outgrow the 128-token context
    p = run_script(["chat.py", "-g", CHAT_TAG, "-m", "8"], input=f"{long}\n{long}\n{long}\n{'word ' * 200}\n{long}\nquit\n")
    assert p.stdout.count("Assistant:") == 4 and "oldest message(s) were left out" in p.stdout and "not sent" in p.stdout, p.stdout


def test_chat_cli_history_eof_and_bad_flags(chat_checkpoint, tokenizer, monkeypatch, capsys):
    import io
    import chat
    monkeypatch.setattr(sys, "argv", ["chat.py", "-g", CHAT_TAG, "-m", "5"])
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\nhello again\n"))  # EOF after two turns ends the chat cleanly
    seen, real_stream = [], chat.Reply.stream

    def spy(self, engine, prompt, *args):  # records every prompt the CLI sends to the engine
        seen.append(list(prompt))
        yield from real_stream(self, engine, prompt, *args)
    monkeypatch.setattr(chat.Reply, "stream", spy)
    chat.main()
    assert capsys.readouterr().out.count("Assistant:") == 2 and len(seen) == 2
    # history as tokens: turn 2's prompt = turn 1's prompt + reply (<= 5 tokens) + <|assistant_end|> + the next user turn + <|assistant_start|>
    aend, us, ast = (tokenizer.encode_special(f"<|{n}|>") for n in ("assistant_end", "user_start", "assistant_start"))
    end = seen[1].index(aend, len(seen[0]))
    assert seen[1][:len(seen[0])] == seen[0] and end - len(seen[0]) <= 5 and seen[1][end + 1] == us and seen[1][-1] == ast
    for argv, message in [(["--source", "rl", "-g", CHAT_TAG, "-p", "hi"], "train.py --stage=rl"), (["-t", "5", "-p", "hi"], "-t"), (["-k", "201"], "-k"), (["-g", CHAT_TAG, "-s", "7"], "step 7")]:
        monkeypatch.setattr(sys, "argv", ["chat.py", *argv])
        with pytest.raises(SystemExit) as e:
            common.run_main(chat.main)  # the script's entry point: a missing checkpoint is one line too
        assert e.value.code != 0 and message in (str(e.value.code) + capsys.readouterr().err)


def start_limited_server(monkeypatch, deadline, max_connections):
    """chat.py's HTTP server in this process with a stub app (the limits act before any model is used) -> (port, log, server)."""
    import chat
    monkeypatch.setattr(chat, "REQUEST_DEADLINE_S", deadline, raising=False)
    monkeypatch.setattr(chat, "MAX_CONNECTIONS", max_connections, raising=False)
    log = []
    server = chat.make_server(None, "127.0.0.1", 0, log.append)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1], log, server


def test_chat_request_deadline_cuts_slowloris(monkeypatch):
    port, log, server = start_limited_server(monkeypatch, 1.0, 8)
    try:
        head = b"POST /chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
        for quick, slow in ((b"", head + b"{" * 100), (head, b"{" * 100)):  # headers trickling in; then a body trickling in
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(quick)
                s.settimeout(0.1)
                t0 = time.time()
                for byte in slow:  # a byte every 0.1 s: every read is quick, the whole request is slow
                    try:
                        s.sendall(bytes([byte]))
                        if s.recv(100) == b"":
                            break  # the server closed the connection
                    except socket.timeout:
                        continue
                    except ConnectionError:
                        break
                assert time.time() - t0 < 3, "a request trickling in kept its connection past the 1 s deadline"
        assert sum("request not in after 1.0s" in line for line in log) == 2
        assert http_request(port, "OPTIONS", "/health")[0] == 204  # a quick request still gets through
    finally:
        server.shutdown()
        server.server_close()


def test_chat_connection_cap_answers_503(monkeypatch):
    port, log, server = start_limited_server(monkeypatch, 30.0, 2)
    try:
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]  # hold both slots
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            answer = s.recv(1000)
        assert answer.startswith(b"HTTP/1.1 503") and b"Retry-After: 2" in answer and b"too many open connections" in answer
        for s in idle:
            s.close()
        for _ in range(50):  # the slots come back once those connections end
            status = http_request(port, "OPTIONS", "/health", timeout=10)[0]
            if status == 204:
                break
            time.sleep(0.1)
        assert status == 204
    finally:
        server.shutdown()
        server.server_close()


@SLOW
def test_chat_cli_prompt_empty_or_a_command(chat_checkpoint, monkeypatch, capsys):
    for prompt in ("", "   "):
        p = run_script(["chat.py", "-g", CHAT_TAG, "-p", prompt], check=False, timeout=200)  # bounds the old endless loop
        assert p.returncode == 1 and p.stderr == "error: -p/--prompt is empty: give the text to answer, or leave -p out to chat\n", p.stderr
    import chat
    printed, replies, real_stream = [], [], chat.Reply.stream

    def counting_print(*args, **kwargs):  # a CLI that loops forever fails here instead of hanging
        printed.append(" ".join(map(str, args)))
        assert len(printed) < 100, "the CLI loops"

    def spy(self, *args):
        replies.append(1)
        yield from real_stream(self, *args)
    monkeypatch.setattr(chat, "print", counting_print, raising=False)
    monkeypatch.setattr(chat.Reply, "stream", spy)
    for prompt in ("clear", "quit", "exit"):  # -p answers its text once, whatever it says
        monkeypatch.setattr(sys, "argv", ["chat.py", "-g", CHAT_TAG, "-p", prompt, "-m", "3"])
        chat.main()
    assert len(replies) == 3 and "(conversation cleared)" not in printed


@SLOW
def test_chat_cli_falls_back_past_a_damaged_checkpoint(tokenizer, base_dir, tiny_config, tmp_path):
    from model import build_model, save_checkpoint
    shutil.copytree(os.path.join(base_dir, "tokenizer"), tmp_path / "tokenizer")
    ckpt = str(tmp_path / "chatsft_checkpoints" / "d2")
    for step in (1, 2):
        save_checkpoint(ckpt, step, build_model(dataclasses.asdict(tiny_config), "cpu").state_dict(), {"model_config": dataclasses.asdict(tiny_config)})
    damage(os.path.join(ckpt, "model_000002.pt"), "truncate")
    args, env = ["chat.py", "-p", "hi", "-m", "2"], {"NANOCHAT_BASE_DIR": str(tmp_path)}
    p = run_script(args, env=env)
    assert re.fullmatch(f"warning: skipping step 2: {re.escape(ckpt)}/model_000002.pt is unreadable \\(.+\\)\n", p.stderr), p.stderr
    damage(os.path.join(ckpt, "model_000001.pt"), "empty")
    p = run_script(args, env=env, check=False)
    assert p.returncode == 1 and p.stderr.splitlines()[-1] == (f"error: no complete, readable sft checkpoint in {ckpt}: "
                                                               "run `python train.py --stage=sft` first"), p.stderr
    assert len(p.stderr.splitlines()) == 3 and "Traceback" not in p.stderr  # two warnings, then the error


def test_chat_web_page_in_headless_browser(chat_server, tmp_path):
    try:
        from selenium import webdriver
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.support.ui import WebDriverWait
    except ImportError:
        skip_or_fail("selenium is not installed")
    if not (os.path.exists("/usr/bin/chromium") and os.path.exists("/usr/bin/chromedriver")):
        skip_or_fail("Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    port, _ = chat_server
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage", "--window-size=1000,700",
                 f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: CHAT_TAG in d.find_element(By.ID, "model").text)  # /health answered on load
        box = driver.find_element(By.ID, "input")
        box.send_keys("/help", Keys.ENTER)
        assert "/temperature" in driver.find_element(By.CSS_SELECTOR, ".console").text
        driver.execute_script("window.updates = 0; new MutationObserver(() => window.updates++)"  # counts the reply's growth
                              ".observe(document.getElementById('list'), {childList: true, subtree: true, characterData: true})")
        box.send_keys("Hello there", Keys.SHIFT, Keys.ENTER, Keys.NULL, "second line", Keys.ENTER)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant[data-done='1']"))
        assert driver.execute_script("return window.updates") > 1  # streamed: partial updates, not one final paint
        assert driver.find_element(By.CSS_SELECTOR, ".user").text == "Hello there\nsecond line"
        reply = driver.find_element(By.CSS_SELECTOR, ".assistant").text
        assert reply.strip(), "no streamed reply"
        assert not driver.find_element(By.ID, "error").is_displayed()
        driver.find_element(By.CSS_SELECTOR, ".assistant").click()  # regenerate
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant[data-done='1']"))
        assert len(driver.find_elements(By.CSS_SELECTOR, ".assistant")) == 1
        shot = os.path.join(tempfile.mkdtemp(prefix="nanochat_ui_"), "chat.png")
        assert driver.save_screenshot(shot)
        print(f"screenshot: {shot}")
        assert os.path.getsize(shot) > 1000
        driver.find_element(By.CSS_SELECTOR, ".user").click()  # edit: back into the input, the turn removed
        assert box.get_attribute("value") == "Hello there\nsecond line" and not driver.find_elements(By.CSS_SELECTOR, ".msg.user")
        driver.execute_script("arguments[0].value = arguments[1]", box, "many words " * 400)  # over the tiny model's context
        box.send_keys(Keys.ENTER)
        wait.until(lambda d: d.find_element(By.ID, "error").is_displayed())
        assert "context" in driver.find_element(By.ID, "error-text").text
        assert box.get_attribute("value").startswith("many words") and not driver.find_elements(By.CSS_SELECTOR, ".msg")  # back for editing
        driver.find_element(By.ID, "new").click()
        assert not driver.find_elements(By.CSS_SELECTOR, ".msg") and not driver.find_element(By.ID, "error").is_displayed()
    finally:
        driver.quit()


def test_chat_a_failing_row_ends_alone(monkeypatch):
    """issue 27: four concurrent streams in one worker's batch; one asks for temperature 1e-40 (greedy: the same reply as
    temperature 0, not NaN), one fails in its sampling (patched): that one alone gets an error event, the others finish."""
    import chat
    from tokenizer import Tokenizer
    tok, model = Tokenizer.from_ranks({bytes([i]): i for i in range(256)}), small_model(seq=128)  # the server renders with it
    ends, batch_sizes = [tok.encode_special(n) for n in ("<|assistant_end|>", "<|bos|>", "<|python_start|>")], []

    class Endless:  # the real model, its end and tool tokens pushed down: every reply runs to max_tokens
        config, get_device = model.config, model.get_device

        def trunk(self, ids, kv):
            batch_sizes.append(ids.size(0))
            return model.trunk(ids, kv)

        def head(self, x):
            logits = model.head(x)
            logits[:, ends] -= 100.0
            return logits
    real = chat.sample_next_token

    def sample(logits, rng, temperature, top_k):
        time.sleep(0.005)  # slow steps: the four requests meet in the batch
        if temperature == 0.5 and max(batch_sizes) == 4:
            raise RuntimeError("a bug in one row")
        return real(logits, rng, temperature, top_k)
    monkeypatch.setattr(chat, "sample_next_token", sample)
    pool = chat.WorkerPool([Engine(Endless(), tok)], max_queue=4, cap=4, context=128)
    app = chat.App(tok, pool, "test", 0, {"temperature": 0.6, "top_k": 50, "max_tokens": 40})
    server = chat.make_server(app, "127.0.0.1", 0, lambda line: None)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    asks = [("/chat/completions", 1e-40), ("/v1/chat/completions", 0.5), ("/chat/completions", 0.0), ("/v1/chat/completions", 1.0)]

    def one(ask):
        body = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 40, "temperature": ask[1], "stream": True}
        status, _, data = http_request(port, "POST", ask[0], body, timeout=120)
        return status, sse_events(data)
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            results = list(ex.map(one, asks))
    finally:
        server.shutdown()
        server.server_close()
    assert max(batch_sizes) == 4 and all(status == 200 for status, _ in results)
    (_, tiny), (_, failed), (_, greedy), (_, sampled) = results
    assert failed[-1] == {"error": "generation failed for this request (RuntimeError); other requests were not affected"}
    assert tiny[-1] == greedy[-1] == {"done": True} and sampled[-1] == "[DONE]" and sampled[-2]["choices"][0]["finish_reason"] == "length"
    assert "".join(e["token"] for e in tiny[:-1]) == "".join(e["token"] for e in greedy[:-1]) != ""


@SLOW
def test_chat_cli_tiny_temperature(tokenizer, tiny_config, tmp_path):
    """`chat.py -p hi -t 1e-40` answers (greedily) on a model whose logits are not all zero."""
    from model import save_checkpoint
    shutil.copytree(os.path.join(os.environ["NANOCHAT_BASE_DIR"], "tokenizer"), tmp_path / "tokenizer")
    model = small_model(vocab=tiny_config.vocab_size, seq=128)
    save_checkpoint(str(tmp_path / "chatsft_checkpoints" / "d2"), 0, model.state_dict(), {"model_config": asdict(model.config)})
    p = run_script(["chat.py", "-p", "hi", "-t", "1e-40", "-m", "8"], env={"NANOCHAT_BASE_DIR": str(tmp_path)}, check=False)
    assert p.returncode == 0 and "Traceback" not in p.stderr and p.stdout.strip(), p.stderr[-2000:]



def test_chat_until_stop_cuts_across_pieces():
    from chat import until_stop

    class Reply:
        finish = "length"
    for pieces, stops, text, finish in [(["Hel", "lo w", "orld"], ["o wo"], "Hell", "stop"), (["ab", "c"], ["cd"], "abc", "length"),
                                        (["x\n\nUser", ": more"], ["\n\n", "User:"], "x", "stop"), (["stop"], ["stop"], "", "stop"),
                                        (["a", "b", "c"], ["bd", "zz"], "abc", "length")]:
        reply = Reply()
        got = list(until_stop(iter(pieces), stops, reply))
        assert "".join(got) == text and reply.finish == finish and "" not in got, (pieces, stops, got)


def test_chat_api_stop_seed_and_stream_types(chat_server):
    """issue 27: `stop` is honoured (cut before it, finish 'stop'); a float `seed`, a string `stream` and a bad `stop` are
    400s naming the field."""
    port, _ = chat_server
    user = [{"role": "user", "content": "Tell me a story."}]
    stops = ["e", "a", "o", "t"]  # the random model's 24 tokens hold one of these
    for seed in range(3):
        body = json.loads(http_request(port, "POST", "/v1/chat/completions", {"messages": user, "seed": seed, "stop": stops})[2])
        text, finish = body["choices"][0]["message"]["content"], body["choices"][0]["finish_reason"]
        assert finish == "stop" and not any(s in text for s in stops), body
        status, _, data = http_request(port, "POST", "/v1/chat/completions", {"messages": user, "seed": seed, "stop": stops, "stream": True})
        events = sse_events(data)
        assert status == 200 and events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "stop"
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == text  # same seed, same cut
    for field, value in (("seed", 1.5), ("seed", "7"), ("stream", "false"), ("stream", 1), ("stop", 5), ("stop", [""]),
                         ("stop", ["a", "b", "c", "d", "e"])):
        status, _, data = http_request(port, "POST", "/v1/chat/completions", {"messages": user, field: value})
        assert status == 400 and f"'{field}' must be" in json.loads(data)["error"]["message"], (field, value, data)
    assert http_request(port, "POST", "/v1/chat/completions", {"messages": user, "seed": 7, "stop": None, "stream": False})[0] == 200


def test_chat_web_port_out_of_range(chat_checkpoint):
    p = run_script(["chat.py", "-g", CHAT_TAG, "--web", "--port", "99999"], check=False)
    assert p.returncode == 1 and p.stderr == "error: --port must be 0..65535 (0 = any free port), not 99999\n", p.stderr

# =============================================================================
# GUIDE.md
# =============================================================================

# -----------------------------------------------------------------------------
# guide: GUIDE.md / GUIDE_MATH.md must not rot. Every `file.py:SYMBOL` citation must name a real top-level symbol (or a
# Class.member), every row of the constants table must equal the code, and every derived number must be what the code
# computes. The code is read with the ast module (train.py, chat.py, eval.py are never imported for this); only the cheap
# modules model/tokenizer/common are imported, to call functions and build meta-device models.

GUIDE_FILES = ["GUIDE.md", "GUIDE_MATH.md"]
GUIDE_CITE = re.compile(r"(?<![\w/])([A-Za-z_]\w*\.py):([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)?)")
GUIDE_LINE_CITE = re.compile(r"(?<![\w/])[A-Za-z_]\w*\.py:\d")
GUIDE_IMPORTABLE = {"model.py", "tokenizer.py", "common.py"}  # cheap to import; the rest is only parsed
GUIDE_PLACEHOLDER = "file.py"  # the guides explain the syntax as `file.py:SYMBOL`; that one is not a citation
GUIDE_MIN_CITATIONS = 30
GUIDE_MIN_CONSTANTS = 25


def _guide_text(name, root=REPO):
    with open(os.path.join(root, name), encoding="utf-8") as f:
        return f.read()


def _guide_tree(file, root=REPO):
    path = os.path.join(root, file)
    st = os.stat(path)
    return _guide_parse(path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=64)
def _guide_parse(path, mtime_ns, size):  # the stat fields key the cache, so an edited file is parsed again
    with open(path, encoding="utf-8") as f:
        return _ast.parse(f.read(), filename=os.path.basename(path))


def _guide_defs(body):
    """name -> node for the functions, classes and assigned names of a module or class body."""
    out = {}
    for node in body:
        if isinstance(node, (_ast.FunctionDef, _ast.AsyncFunctionDef, _ast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, _ast.Assign):
            for t in node.targets:
                for n in (t.elts if isinstance(t, _ast.Tuple) else [t]):
                    if isinstance(n, _ast.Name):
                        out[n.id] = node
        elif isinstance(node, _ast.AnnAssign) and isinstance(node.target, _ast.Name):
            out[node.target.id] = node
    return out


def guide_find_symbol(file, symbol, root=REPO):
    """The AST node defining SYMBOL (top level) or Class.member in file, or None."""
    path = os.path.join(root, file)
    if not os.path.isfile(path):
        return None
    parts = symbol.split(".")
    node = _guide_defs(_guide_tree(file, root).body).get(parts[0])
    if len(parts) == 2:
        node = _guide_defs(node.body).get(parts[1]) if isinstance(node, _ast.ClassDef) else None
    return node


def guide_citations(text):
    return [c for c in GUIDE_CITE.findall(text) if c[0] != GUIDE_PLACEHOLDER]


def guide_citation_errors(texts, root=REPO):
    """Problems with the citations of the given guide texts ([] when all resolve)."""
    errors = [f"line-number citation {t[m.start():m.end() + 8]!r}: cite a symbol instead"
              for t in texts for m in GUIDE_LINE_CITE.finditer(t)]
    for file, symbol in sorted(set(c for t in texts for c in guide_citations(t))):
        if not os.path.isfile(os.path.join(root, file)):
            errors.append(f"{file}:{symbol}: no file {file}")
        elif guide_find_symbol(file, symbol, root) is None:
            errors.append(f"{file}:{symbol}: {symbol} is not defined at top level (or as a class member) in {file}")
    return errors


_GUIDE_BINOPS = {_ast.Add: lambda a, b: a + b, _ast.Sub: lambda a, b: a - b, _ast.Mult: lambda a, b: a * b,
                 _ast.Div: lambda a, b: a / b, _ast.FloorDiv: lambda a, b: a // b, _ast.Pow: lambda a, b: a ** b,
                 _ast.LShift: lambda a, b: a << b, _ast.Mod: lambda a, b: a % b}


def _guide_eval(node, file, root):
    """Evaluate a constant expression of the code without running it: literals, containers, dict(k=v), arithmetic,
    and names of other module-level constants of the same file."""
    ev = lambda n: _guide_eval(n, file, root)
    if isinstance(node, _ast.Constant):
        return node.value
    if isinstance(node, (_ast.Tuple, _ast.List, _ast.Set)):
        items = [ev(e) for e in node.elts]
        return {_ast.Tuple: tuple, _ast.List: list, _ast.Set: set}[type(node)](items)
    if isinstance(node, _ast.Dict):
        return {ev(k): ev(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, _ast.Call) and isinstance(node.func, _ast.Name) and node.func.id == "dict" and not node.args:
        return {kw.arg: ev(kw.value) for kw in node.keywords}
    if isinstance(node, _ast.BinOp) and type(node.op) in _GUIDE_BINOPS:
        return _GUIDE_BINOPS[type(node.op)](ev(node.left), ev(node.right))
    if isinstance(node, _ast.UnaryOp) and isinstance(node.op, (_ast.USub, _ast.UAdd)):
        return -ev(node.operand) if isinstance(node.op, _ast.USub) else ev(node.operand)
    if isinstance(node, _ast.Name):
        target = _guide_defs(_guide_tree(file, root).body).get(node.id)
        if isinstance(target, (_ast.Assign, _ast.AnnAssign)) and target.value is not None:
            return ev(target.value)
    raise ValueError(f"{file}: cannot evaluate {_ast.unparse(node)!r} statically")


def _guide_param_default(fn, name, file, root):
    a = fn.args
    positional = a.posonlyargs + a.args
    for arg, default in zip(positional[len(positional) - len(a.defaults):], a.defaults):
        if arg.arg == name:
            return _guide_eval(default, file, root)
    for arg, default in zip(a.kwonlyargs, a.kw_defaults):
        if arg.arg == name and default is not None:
            return _guide_eval(default, file, root)
    raise ValueError(f"{file}:{fn.name} has no parameter {name!r} with a default")


def _guide_flag_default(fn, flag, file, root):
    found = []
    for node in _ast.walk(fn):
        if (isinstance(node, _ast.Call) and isinstance(node.func, _ast.Attribute) and node.func.attr == "add_argument"
                and any(isinstance(x, _ast.Constant) and x.value == flag for x in node.args)):
            found += [_guide_eval(kw.value, file, root) for kw in node.keywords if kw.arg == "default"]
    if len(found) != 1:
        raise ValueError(f"{file}:{fn.name}: flag {flag} has {len(found)} defaults (need exactly one)")
    return found[0]


def guide_code_value(ref, root=REPO):
    """The value a constants-table reference names in the code (forms documented in GUIDE.md's constants table section)."""
    m = re.fullmatch(r"([A-Za-z_]\w*\.py):([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)?)(.*)", ref, re.S)
    if not m:
        raise ValueError(f"not a reference: {ref!r}")
    file, symbol, rest = m.groups()
    node = guide_find_symbol(file, symbol, root)
    if node is None:
        raise ValueError(f"{file}:{symbol} is not defined in {file}")
    if rest.startswith("(") and rest.endswith(")"):
        inner = rest[1:-1].strip()
        if not isinstance(node, (_ast.FunctionDef, _ast.AsyncFunctionDef)):
            raise ValueError(f"{file}:{symbol} is not a function")
        if inner.startswith("--"):
            return _guide_flag_default(node, inner, file, root)
        if re.fullmatch(r"[A-Za-z_]\w*", inner):
            return _guide_param_default(node, inner, file, root)
        if file not in GUIDE_IMPORTABLE or "." in symbol:
            raise ValueError(f"{ref}: calls are only checked for module functions of {sorted(GUIDE_IMPORTABLE)}")
        args = _ast.literal_eval(f"({inner},)")
        module = __import__(file[:-3])
        return getattr(module, symbol)(*args)
    if not isinstance(node, (_ast.Assign, _ast.AnnAssign)) or node.value is None:
        raise ValueError(f"{file}:{symbol} is not an assigned constant")
    value = _guide_eval(node.value, file, root)
    if rest:
        keys = []
        expr = _ast.parse("_" + rest, mode="eval").body
        while isinstance(expr, _ast.Subscript):
            keys.insert(0, _ast.literal_eval(expr.slice))
            expr = expr.value
        if not (isinstance(expr, _ast.Name) and expr.id == "_"):
            raise ValueError(f"{ref}: only [key] selectors may follow the symbol")
        for k in keys:
            value = value[k]
    return value


def guide_constant_rows(text):
    """[(reference, value text)] of the constants table (the section headed '## N. The constants table')."""
    section = re.split(r"\n## \d+\. The constants table", text, maxsplit=1)
    assert len(section) == 2, "GUIDE.md has no section '## N. The constants table'"
    rows = []
    for line in section[1].splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip().replace("\x00", "|") for c in line.replace("\\|", "\x00").strip().strip("|").split("|")]
        assert len(cells) == 2 and all(c.startswith("`") and c.endswith("`") for c in cells), f"bad table row: {line}"
        rows.append((cells[0][1:-1], cells[1][1:-1]))
    return rows


def guide_constant_errors(text, root=REPO):
    errors = []
    for ref, shown in guide_constant_rows(text):
        try:
            want = _ast.literal_eval(shown)
            got = guide_code_value(ref, root)
        except Exception as e:  # a reference that no longer resolves is a failure, never a skip
            errors.append(f"{ref}: {type(e).__name__}: {e}")
            continue
        if type(want) is bool or type(got) is bool:
            same = type(want) is type(got) and want == got
        else:
            same = want == got
        if not same:
            errors.append(f"{ref}: guide says {shown}, code has {got!r}")
    return errors


def _guide_int(s):
    return int(s.replace(",", ""))


# --- the tests ---------------------------------------------------------------------------------

def test_guide_citations_resolve():
    texts = [_guide_text(n) for n in GUIDE_FILES]
    cites = set(c for t in texts for c in guide_citations(t))
    assert len(cites) >= GUIDE_MIN_CITATIONS, f"only {len(cites)} distinct citations (need {GUIDE_MIN_CITATIONS})"
    errors = guide_citation_errors(texts)
    assert not errors, "stale citations:\n" + "\n".join(errors)


def test_guide_constants_table_matches_code():
    text = _guide_text("GUIDE.md")
    rows = guide_constant_rows(text)
    assert len(rows) >= GUIDE_MIN_CONSTANTS, f"constants table has {len(rows)} rows (need {GUIDE_MIN_CONSTANTS})"
    errors = guide_constant_errors(text)
    assert not errors, "constants that drifted from the code:\n" + "\n".join(errors)


def test_guide_checker_bites():
    """The checks above fail on a renamed symbol (in a copy of the code) and on a changed quoted constant (in a copy of
    the guide)."""
    text = _guide_text("GUIDE.md")
    assert "`model.py:SOFTCAP` | `15.0`" in text and "model.py:softcap" in text
    changed = text.replace("`model.py:SOFTCAP` | `15.0`", "`model.py:SOFTCAP` | `16.0`")
    assert any(e.startswith("model.py:SOFTCAP:") for e in guide_constant_errors(changed))
    renamed = text.replace("model.py:softcap`", "model.py:soft_cap`")
    assert any(e.startswith("model.py:soft_cap:") for e in guide_citation_errors([renamed]))
    assert any("line-number" in e for e in guide_citation_errors(["see `model.py:42`"]))
    with tempfile.TemporaryDirectory() as root:  # the code side: rename a function and change a constant in a copy
        with open(os.path.join(REPO, "model.py")) as f:
            src = f.read()
        assert "def softcap(" in src and "\nSOFTCAP = 15.0" in src
        with open(os.path.join(root, "model.py"), "w") as f:
            f.write(src.replace("def softcap(", "def soft_cap(").replace("\nSOFTCAP = 15.0", "\nSOFTCAP = 30.0"))
        model_only = "\n".join(l for l in text.splitlines() if "model.py:" in l and "model.py:use_calculator(" not in l)
        assert any(e.startswith("model.py:softcap:") for e in guide_citation_errors([model_only], root))
        rows = "\n".join(l for l in model_only.splitlines() if l.startswith("| `model.py:"))
        assert any(e.startswith("model.py:SOFTCAP:") and "30.0" in e for e in guide_constant_errors("\n## 1. The constants table\n" + rows, root))


def test_guide_model_sizes_match_code():
    import model as M
    text = _guide_text("GUIDE.md")
    vocab = guide_code_value("model.py:GPTConfig.vocab_size")
    seq = guide_code_value("model.py:GPTConfig.sequence_len")
    ratio = guide_code_value('train.py:RECIPES["release"]["target_param_data_ratio"]')
    batch = guide_code_value('train.py:STAGE_DEFAULTS["base"]["total_batch_size"]')
    header = "| depth | width d | heads | parameters | FLOPs per token | tokens (20 × params) | base steps |"
    assert header in text and f"({ratio:g} × params)" in header
    rows = []
    for line in text.split(header, 1)[1].splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append([_guide_int(c) for c in line.strip("|").split("|")])
    assert len(rows) >= 5 and 20 in [r[0] for r in rows]
    by_depth = {}
    for depth, width, heads, params, flops, tokens, steps in rows:
        config = M.config_from_depth(depth, vocab, sequence_len=seq)
        with torch.device("meta"):
            gpt = M.GPT(config)
        counts = gpt.param_counts()
        want_tokens = int(ratio * counts["total"])
        assert (config.n_embd, config.n_head) == (width, heads), f"depth {depth}"
        assert counts["total"] == params, f"depth {depth}: parameters {counts['total']:,} in the code, {params:,} in the guide"
        assert gpt.estimate_flops() == flops, f"depth {depth}: FLOPs/token {gpt.estimate_flops():,} in the code"
        assert (want_tokens, want_tokens // batch) == (tokens, steps), f"depth {depth}: tokens/steps"
        by_depth[depth] = (gpt, counts)
    # the d20 breakdown of section 4.9 and the FLOPs sum of section 5.5
    gpt, counts = by_depth[20]
    block = gpt.transformer.h[0]
    attn, mlp = sum(p.numel() for p in block.attn.parameters()), sum(p.numel() for p in block.mlp.parameters())
    want = {"embedding wte": counts["wte"], "attention c_q": attn, "MLP c_fc": mlp, "block total": attn + mlp,
            "20 blocks": counts["blocks"], "lm_head": counts["lm_head"], "total:": counts["total"]}
    breakdown = text.split("```\nembedding wte", 1)[1].split("```", 1)[0]
    for label, value in want.items():
        line = next(l for l in ("embedding wte" + breakdown).splitlines() if l.strip().startswith(label))
        assert _guide_int(re.findall(r"[\d,]+", line)[-1]) == value, f"{label}: code {value:,}; guide line {line!r}"
    c = gpt.config
    m = re.search(r"6 × ([\d,]+) \+\s*([\d,]+) = ([\d,]+) FLOPs per token", text)
    assert m, "the d20 FLOPs sum of section 5.5 is missing"
    assert [_guide_int(g) for g in m.groups()] == [counts["total"] - counts["wte"],
                                                   12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * c.sequence_len,
                                                   gpt.estimate_flops()]
    assert f"ln {vocab:,} = {math.log(vocab):.2f} nats = {math.log2(vocab):g} bits" in text
    # section 5.4 / 5.5: gradient accumulation and the Chinchilla horizon, from the same defaults
    B = guide_code_value('train.py:STAGE_DEFAULTS["base"]["device_batch_size"]')
    assert (f"{batch:,} / ({B} × {seq:,} × GPUs), i.e. {batch // (B * seq * 8)} on 8 GPUs and {batch // (B * seq)} on one GPU"
            in text and batch % (B * seq * 8) == 0)
    tokens = int(ratio * counts["total"])
    assert re.search(rf"{ratio:g} × {counts['total']:,} = {tokens:,}\s+tokens, which is {tokens:,} // {batch:,} = "
                     rf"\*\*{tokens // batch:,}\*\* steps", text)


@functools.lru_cache(maxsize=1)
def _guide_toy_tokenizer():
    """The tiny tokenizer of section 3.2, trained exactly as the guide states -> (Tokenizer, ranks)."""
    import tokenizer as T
    text = _guide_text("GUIDE.md")
    m = re.search(r"train_bpe\(docs,\s+(\d+),\s+num_workers=1\)`\s+on\s+the\s+(\d+)\s+documents\s+\(([\d,]+)\s+characters\)\s+"
                  r"of\s+the\s+first\s+row\s+group\s+of\s+`shard_00000.parquet`", text)
    assert m, "section 3.2 no longer states how its tokenizer was trained"
    vocab, n_docs, n_chars = int(m.group(1)), int(m.group(2)), _guide_int(m.group(3))
    docs = pq.ParquetFile(os.path.join(SHARD_DIR, "shard_00000.parquet")).read_row_group(0, columns=["text"]).column("text").to_pylist()
    assert (len(docs), sum(map(len, docs))) == (n_docs, n_chars)
    ranks = T.train_bpe(docs, vocab, num_workers=1)
    return T.Tokenizer.from_ranks(ranks), ranks


def test_guide_tokenizer_example_matches_code():
    """Section 3.2: the regex chunks, byte lists and ids of the worked example, from a tokenizer trained exactly as stated."""
    import tokenizer as T
    text = _guide_text("GUIDE.md")
    tok, ranks = _guide_toy_tokenizer()
    vocab = tok.get_vocab_size()
    block = text.split("```\nsentence: ", 1)[1].split("```", 1)[0]
    sentence = block.splitlines()[0]
    chunks = _ast.literal_eval(re.search(r"^chunks: (.*)$", block, re.M).group(1))
    ids = _ast.literal_eval(re.search(r"^ids: (.*)$", block, re.M).group(1))
    assert regex.findall(T.SPLIT_PATTERN, sentence) == chunks
    assert tok.encode(sentence, prepend="<|bos|>") == ids
    per_chunk = re.findall(r"^\s+('[^']*')\s+bytes (\[[\d, ]+\])\s+-> ids (\[[\d, ]+\])", block, re.M)
    assert len(per_chunk) >= 3
    for chunk, b, i in per_chunk:
        chunk = _ast.literal_eval(chunk)
        assert chunk in chunks and list(chunk.encode()) == _ast.literal_eval(b) and tok.encode(chunk) == _ast.literal_eval(i), chunk
    merges = re.findall(r"`('[^`]*')` \((?:id )?(\d+)\)", text.split("### 3.2", 1)[1].split("```", 1)[0])
    assert len(merges) >= 3
    for piece, rank in merges:
        assert ranks[_ast.literal_eval(piece).encode()] == int(rank), piece
    assert tok.encode_special("<|bos|>") == vocab - len(T.SPECIAL_TOKENS) == ids[0]
    assert f"`<|bos|>` is {ids[0]} = {vocab} − {len(T.SPECIAL_TOKENS)}" in text


def test_guide_chat_rendering_matches_code():
    """Section 3.3: every id and mask value of the rendered chat (the conversation is read back from the table) and the
    counts stated under it, from the tokenizer of section 3.2."""
    import tokenizer as T
    text = _guide_text("GUIDE.md")
    tok, _ = _guide_toy_tokenizer()
    block = text.split("```\npiece ", 1)[1].split("```", 1)[0]
    modes = {"<|user_start|>": "user", "<|assistant_start|>": "text", "<|python_start|>": "python", "<|python_end|>": "text",
             "<|output_start|>": "python_output", "<|output_end|>": "text"}
    messages, parts, mode, ids, mask = [], [], None, [], []
    for line in block.splitlines()[1:]:
        piece, writer, row_ids, row_mask = re.split(r"\s{2,}", line.strip())
        row_ids, row_mask = _ast.literal_eval(row_ids), [int(m) for m in row_mask.split()]
        assert len(row_ids) == len(row_mask) and set(row_mask) == {int(writer == "the model")}, line
        if piece in T.SPECIAL_TOKENS:
            assert row_ids == [tok.encode_special(piece)], line
            mode = modes.get(piece, mode)
            if piece == "<|assistant_end|>":
                messages.append({"role": "assistant", "content": parts})
        else:
            assert tok.encode(piece) == row_ids, line
            if mode == "user":
                messages.append({"role": "user", "content": piece})
            else:
                parts.append({"type": mode, "text": piece})
        ids, mask = ids + row_ids, mask + row_mask
    assert [m["role"] for m in messages] == ["user", "assistant"] and len(parts) >= 3
    assert tok.render_conversation({"messages": messages}) == (ids, mask)
    m = re.search(r"`([^`]+)` is cut into (\d+) chunks \(([^)]*)\) and becomes (\d+) tokens", text)
    user = messages[0]["content"]
    assert m and m.group(1) == user, "section 3.3: the chunk and token count of the user message"
    chunks = regex.findall(T.SPLIT_PATTERN, user)
    assert (int(m.group(2)), re.findall(r"`([^`]*)`", m.group(3)), int(m.group(4))) == (len(chunks), chunks, len(tok.encode(user)))
    assert [len(tok.encode(w)) for w in ("12", "60", "It")] == [1, 2, 2]  # "a token for `12` but none for `60`; `It` is two"
    m = re.search(r"the chat\s+is (\d+) tokens, (\d+) of them with mask 1", text)
    assert m and (int(m.group(1)), int(m.group(2))) == (len(ids), sum(mask))


def test_guide_cpu_profile_matches_run_sh():
    """Section 9: the CPU profile's sizes from run.sh's flags, its parameter count and first loss from model.py, the example
    log line, and the time and bpb that README's Results measured."""
    import model as M
    text = _guide_text("GUIDE.md")
    with open(os.path.join(REPO, "run.sh")) as f:
        profile = f.read().split("\n  cpu)", 1)[1].split(";;", 1)[0]
    flag = lambda name: int(re.search(rf"--{name} (\d+)", profile).group(1))
    V, depth, T, steps, batch = flag("vocab-size"), flag("depth"), flag("max-seq-len"), flag("num-iterations"), flag("total-batch-size")
    config = M.config_from_depth(depth, V, sequence_len=T)
    with torch.device("meta"):
        params = M.GPT(config).param_counts()["total"]
    m = re.search(r"a tokenizer of ([\d,]+) tokens, a depth-(\d+) model \(width (\d+), (\d+) heads, sequence length (\d+), "
                  r"([\d,]+) parameters,\s.*?([\d,]+) base steps of ([\d,]+) tokens", text, re.S)
    assert m, "section 9 no longer describes the CPU profile"
    assert [_guide_int(g) for g in m.groups()] == [V, depth, config.n_embd, config.n_head, T, params, steps, batch]
    assert f"ln {V:,} = {math.log(V):.4f} ({math.log2(V):g} bits)" in text
    line = re.search(r"^step (\d+)/(\d+) .*\| loss ([\d.]+) \| .*\| dt ([\d.]+)ms \| tok/s ([\d,]+) \|.*$", text, re.M)
    assert line and int(line.group(1)) == 0 and int(line.group(2)) == steps
    assert abs(float(line.group(3)) - math.log(V)) < 1e-5  # a fresh model's loss, up to fp32 rounding
    assert _guide_int(line.group(5)) == round(batch / (float(line.group(4)) / 1000))
    quoted = re.findall(r"`((?:step|loss|lrm|dt|tok/s|mfu) [^`|]*)`", text)  # the fields explained under the line
    assert len(quoted) >= 6 and all(q in line.group(0) for q in quoted), quoted
    readme = _guide_text("README.md")
    minutes, bpb = re.search(r"\*\*(\d+) minutes\*\* end to end", readme), re.search(r"val bpb (\d\.\d+)", readme)
    assert minutes and bpb, "README's Results no longer state the CPU profile's time and val bpb"
    assert f"it took about {minutes.group(1)} minutes end to end and reached a validation bpb of\nabout {float(bpb.group(1)):.2f}" in text


def test_guide_shift_and_newton_schulz_numbers():
    """Section 5.1's input/target picture and row sizes, 5.4's rows per batch, 5.5's H100 peak, and GUIDE_MATH's
    ln 65,536 and Newton-Schulz figures (recomputed from train.py:NS_COEFFS)."""
    text, math_text = _guide_text("GUIDE.md"), _guide_text("GUIDE_MATH.md")
    seq = guide_code_value("model.py:GPTConfig.sequence_len")
    batch = guide_code_value('train.py:STAGE_DEFAULTS["base"]["total_batch_size"]')
    block = text.split("```\nrow (T + 1 = ", 1)[1].split("```", 1)[0]
    n = int(block.split(" ", 1)[0])
    row, x, y = (re.split(r":\s{2,}", line, maxsplit=1)[1].split() for line in block.splitlines()[:3])
    assert (len(row), x, y) == (n, row[:-1], row[1:])
    assert f"a row of T + 1 = {n} tokens gives {n - 1} predictions" in text
    assert f"a row of {seq + 1:,} tokens gives {seq:,} predictions" in text
    assert f"{batch:,} tokens (2^19): {batch // seq} rows of {seq:,} predictions each" in text and batch == 2 ** 19
    assert dict(guide_code_value("train.py:PEAK_BF16_FLOPS"))["H100"] == 989e12 and "989 × 10^12 FLOPs per second for one H100" in text
    V = guide_code_value("model.py:GPTConfig.vocab_size")
    ln2 = round(math.log(2), 6)
    assert f"ln({V:,}) = ln(2¹⁶) = 16 × ln 2 = 16 × {ln2} = {math.log(V):.4f}" in math_text and V == 2 ** 16
    assert round(16 * ln2, 4) == round(math.log(V), 4)
    a, b, c = guide_code_value("train.py:NS_COEFFS")
    steps = guide_code_value("train.py:newton_schulz(steps)")
    s = torch.logspace(-6, 0, 600001, dtype=torch.float64)
    out = s.clone()
    for _ in range(steps):
        out = a * out + b * out ** 3 + c * out ** 5
    low = s[out >= 0.5].min().item()
    m = re.search(r"(\w+) rounds take every s from about ([\d.]+) up to 1 into a band from ([\d.]+) to ([\d.]+)", math_text)
    assert m and m.group(1) == {5: "Five"}.get(steps) and float(m.group(2)) == float(f"{low:.2g}")
    assert (float(m.group(3)), float(m.group(4))) == (0.5, round(out[s >= low].max().item(), 1)) and out[s >= low].min() >= 0.5
    m = re.search(r"grows at most ([\d.]+)-fold per round \(([\d.]+)⁵ ≈ (\d+)-fold", math_text)
    assert m and float(m.group(1)) == float(m.group(2)) == a and int(m.group(3)) == round(a ** steps)


def test_run_gpu_check_without_a_gpu_exits_2(tmp_path):
    """`bash run.sh --gpu-check` on a machine where torch sees no GPU says so in one line and exits 2 (a stub .venv that
    points at this interpreter, so run.sh installs nothing; CUDA_VISIBLE_DEVICES hides any GPU)."""
    import hashlib
    here = os.path.dirname(os.path.abspath(__file__))
    for name in ("run.sh", "requirements.txt"):
        shutil.copy(os.path.join(here, name), tmp_path / name)
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    os.symlink(sys.executable, tmp_path / ".venv" / "bin" / "python")
    (tmp_path / ".venv" / "bin" / "activate").write_text(f"export PATH={os.path.dirname(sys.executable)}:$PATH\n")
    (tmp_path / ".venv" / ".requirements.sha").write_text(hashlib.sha256((tmp_path / "requirements.txt").read_bytes()).hexdigest() + "\n")
    r = subprocess.run(["bash", str(tmp_path / "run.sh"), "--gpu-check"], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, CUDA_VISIBLE_DEVICES="", NANOCHAT_BASE_DIR=str(tmp_path / "base")))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["--gpu-check: torch sees no CUDA GPU here; nothing to check "
                                                                   "(run it on a GPU machine)"], (r.stdout, r.stderr)
    assert not (tmp_path / "base").exists()  # nothing was set up or downloaded


def test_guide_worked_numbers_match_code():
    """Section 4.3's attention example through PyTorch's causal attention; the softmax / cross-entropy / softcap /
    RMSNorm examples through the code's functions."""
    import model as M
    text, math_text = _guide_text("GUIDE.md"), _guide_text("GUIDE_MATH.md")
    block = text.split("```\n          query q     key k      value v", 1)[1].split("```", 1)[0]
    qkv = re.findall(r"^token \d\s+(\[[^\]]*\])\s+(\[[^\]]*\])\s+(\[[^\]]*\])$", block, re.M)
    assert len(qkv) == 3
    q, k, v = (torch.tensor([_ast.literal_eval(row[j]) for row in qkv], dtype=torch.float64) for j in range(3))
    out = F.scaled_dot_product_attention(q[None, None], k[None, None], v[None, None], is_causal=True)[0, 0]
    shown = torch.tensor(_ast.literal_eval(re.search(r"^attention outputs: (.*)$", block, re.M).group(1)), dtype=torch.float64)
    assert torch.allclose(out, shown, atol=6e-5), out
    w3 = torch.softmax(q[2] @ k.T / math.sqrt(q.size(1)), -1)
    assert re.search(r"weights = softmax\(scores\)\s+= " + re.escape(str([round(x, 4) for x in w3.tolist()])), block)
    probs = [f"{p:.4f}" for p in torch.softmax(torch.tensor([2.0, 1.0, 0.0, -1.0], dtype=torch.float64), 0).tolist()]
    for t in (text, math_text):
        assert "[" + ", ".join(probs) + "]" in t
    assert f"−ln {probs[0]} = {-math.log(float(probs[0])):.4f}" in text
    for x, y in ((1, 0.9985), (5, 4.82), (30, 14.46)):
        assert f"{x} → {y}" in text and abs(M.softcap(torch.tensor(float(x))).item() - y) < 0.006
    top2 = torch.softmax(torch.tensor([2.0, 1.0]), 0).tolist()  # section 7.1: top-k = 2 renormalises the first two
    assert f"renormalised to `[{top2[0]:.2f}, {top2[1]:.2f}]`" in text
    rms = M.norm(torch.tensor([1.0, 2.0, 3.0, 4.0])).tolist()
    assert "[" + ", ".join(f"{r:.4f}" for r in rms) + "]" in math_text


def test_run_tests_installs_test_requirements_once(tmp_path):
    """`bash run.sh --tests` installs requirements.txt and requirements-test.txt into .venv/, each again only when it
    changes; the pipeline modes install requirements.txt alone (a stub .venv python logs pip calls, runs the rest)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for name in ("run.sh", "requirements.txt", "requirements-test.txt"):
        shutil.copy(os.path.join(here, name), tmp_path / name)
    (tmp_path / "test_all.py").write_text("def test_common_one():\n    pass\n")
    venv = tmp_path / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").write_text(f'#!/bin/bash\nif [ "$1 $2" = "-m pip" ]; then echo "${{*:3}}" >> {tmp_path}/pip.log; '
                                 f'exit 0; fi\nexec {sys.executable} "$@"\n')
    (venv / "python").chmod(0o755)
    (venv / "activate").write_text(f"export PATH={venv}:$PATH\n")
    pip_calls = lambda: (tmp_path / "pip.log").read_text().splitlines() if (tmp_path / "pip.log").exists() else []
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", NANOCHAT_BASE_DIR=str(tmp_path / "b"))
    run = lambda mode: subprocess.run(["bash", str(tmp_path / "run.sh"), mode], capture_output=True, text=True,
                                      timeout=120, env=env)
    r = run("--gpu-check")  # a pipeline mode: the runtime file only (then no GPU: exit 2)
    assert r.returncode == 2 and [c.split()[-1] for c in pip_calls()] == ["requirements.txt"], (r.stdout, r.stderr)
    r = run("--tests")
    assert r.returncode == 0 and "1 passed" in r.stdout, (r.stdout, r.stderr)
    assert [c.split()[-1] for c in pip_calls()] == ["requirements.txt", "requirements-test.txt"]
    assert run("--tests").returncode == 0 and len(pip_calls()) == 2  # nothing changed: nothing installed
    with open(tmp_path / "requirements-test.txt", "a") as f:
        f.write("pytest-xdist\n")
    assert run("--tests").returncode == 0 and [c.split()[-1] for c in pip_calls()[2:]] == ["requirements-test.txt"]
    with open(os.path.join(here, "requirements-test.txt")) as f:  # the runtime pins and the test packages
        listed = {l.split("#")[0].strip() for l in f}
    assert {"-r requirements.txt", "pytest", "pytest-timeout", "openai", "selenium", "rustbpe", "transformers",
            "safetensors", "ruff"} <= listed


def test_guide_second_reading_claims_match_code(monkeypatch):
    """What a reviewer corrected against the code: forward with targets never builds the logits (chunked loss; plain
    F.cross_entropy only in eval scoring); the 1/micro-batches scaling in accumulate; 5.4's memory estimate; the head
    rule with an even head size; the SFT and mid data rows; unary plus; the compile time README measured; and the
    release's GPU figures marked as the release's."""
    import model as M
    text, math_text = _guide_text("GUIDE.md"), _guide_text("GUIDE_MATH.md")
    calls = lambda file, fn: {_ast.unparse(n.func) for n in _ast.walk(guide_find_symbol(file, fn))
                              if isinstance(n, _ast.Call)}
    forward = calls("model.py", "GPT.forward")
    assert "chunked_cross_entropy" in forward and "F.cross_entropy" not in forward
    assert "F.cross_entropy" in calls("eval.py", "score_example")
    flat_math = " ".join(math_text.split())
    assert "`model.py:GPT.forward` gets it from `model.py:chunked_cross_entropy`" in flat_math
    assert ("`F.cross_entropy`, which fuses softmax and log the same way, scores the answer tokens of CORE in "
            "`eval.py:score_example`") in flat_math
    torch.manual_seed(0)
    gpt = M.GPT(M.config_from_depth(2, 300, sequence_len=16))
    gpt.init_weights()
    x = torch.randint(0, 300, (2, 16))
    want = F.cross_entropy(gpt(x).flatten(0, 1), x.roll(-1, 1).flatten())
    monkeypatch.setattr(M.GPT, "head", lambda self, h: pytest.fail("forward with targets built the full logits"))
    assert torch.allclose(gpt(x, x.roll(-1, 1)), want, atol=1e-5)
    assert "the full (B, T, V) logits" in text and "are never built" in text
    # GUIDE_MATH 6: each micro-batch's loss is divided by the number of micro-batches in train.py:accumulate
    divs = [_ast.unparse(n) for n in _ast.walk(guide_find_symbol("train.py", "accumulate"))
            if isinstance(n, _ast.BinOp) and isinstance(n.op, _ast.Div)]
    assert "loss / accum" in divs
    assert "(`train.py:accumulate`, with the count from `train.py:grad_accum_steps`)" in math_text
    # 5.4: the estimate at the default rows, and the rows the dry run suggests for 80 GB (largest power of two in 90%)
    m = re.search(r"puts (\d+) rows at depth (\d+) at about (\d+) GiB per GPU and suggests (\d+) rows for (\d+) GB",
                  text)
    assert m, "section 5.4 no longer states the memory estimate"
    rows, depth, gib, fit, gb = map(int, m.groups())
    assert rows == guide_code_value('train.py:STAGE_DEFAULTS["base"]["device_batch_size"]')
    with torch.device("meta"):
        big = M.GPT(M.config_from_depth(depth, guide_code_value("model.py:GPTConfig.vocab_size")))
    est = lambda r: M.estimate_memory(big, r, 1, True, 2048)["total"]
    assert round(est(rows) / 2 ** 30) == gib
    assert fit == next(r for r in (128, 64, 32, 16, 8, 4, 2, 1) if est(r) <= 0.9 * gb * 2 ** 30)
    # 11: heads = d / 128 rounded up, raised until it divides d into an even head size
    assert "raised until it divides d into an even head size" in text
    for L in range(1, 131):  # depth 67 is the first where the head count that divides d leaves an odd head size
        d, h = 64 * L, math.ceil(64 * L / 128)
        while d % h or (d // h) % 2:
            h += 1
        assert M.config_from_depth(L, 1024).n_head == h, L
    # 6: the mid and SFT rows name every task of their mixtures in train.py:train_chat (and nothing else)
    lists = [a.value for a in _ast.walk(guide_find_symbol("train.py", "train_chat")) if isinstance(a, _ast.Assign)
             and _ast.unparse(a.targets[0]) == "mixture" and isinstance(a.value, _ast.List)]
    is_task = lambda n: isinstance(n, _ast.Attribute) and _ast.unparse(n.value) == "data"
    mixtures = [sorted({n.attr for n in _ast.walk(v) if is_task(n)}) for v in lists]
    table = {line.split("|")[1].strip(): line.split("|")[2].lower() for line in text.splitlines()
             if line.startswith("| **")}
    tasks = {"ARC", "GSM8K", "Identity", "MMLU", "SimpleSpelling", "SmolTalk", "SpellingBee"}
    named = lambda cell: sorted(t for t in tasks if re.search(rf"\b{t.lower()}\b", cell))
    mid, sft = table["**mid** (midtraining)"], table["**SFT** (supervised fine-tuning)"]
    assert mixtures == [named(mid), named(sft)], mixtures
    # 7.3: unary plus and minus
    assert "unary plus and minus" in text and M.use_calculator("+2 - -3") == 5
    # 9: the cold compile time is README's
    compile_s = re.search(r"a cold CPU compile costs about (\d+-\d+) s", _guide_text("README.md"))
    assert compile_s and f"compiles the\n  model, which takes about {compile_s.group(1)} s on a CPU" in text
    # the release's GPU figures (bpb 0.81, CORE 0.22) are said to be the release's wherever they appear
    for m in re.finditer(r"\b0\.(?:81|22)\b", text):
        assert "release's" in text[max(0, m.start() - 300):m.start()], text[m.start() - 120:m.end()]
