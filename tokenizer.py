"""
The tokenizer: our own byte-level BPE trainer (pure Python + numpy + regex), a tiktoken runtime built from its merges,
and the chat rendering used by every later stage.

    python tokenizer.py train [--input FILE ...] [--vocab-size 65536] [--max-chars 2000000000] [--doc-cap 10000]
    python tokenizer.py eval     # compression table vs GPT-2 / GPT-4 (when tiktoken can load them)
    python tokenizer.py bench    # trainer time and memory vs rustbpe (when installed), interleaved rounds

Imports nothing of ours but common.py.
"""
import os
import sys
import glob
import json
import shutil
import time
import heapq
import pickle
import statistics
import hashlib
import resource
import argparse
import itertools
import multiprocessing as mp
from collections import Counter

import regex
import numpy as np
import tiktoken

import common

# GPT-4's cl100k split pattern, but digit runs are chunked by 1-2 instead of 1-3, as in nanochat's release
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]"""
                 r"""|\s+(?!\S)|\s+""")
SPECIAL_TOKENS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                  "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]

# -----------------------------------------------------------------------------
# BPE training: count distinct regex chunks in worker processes, then an incremental merge loop

MAX_VOCAB = 2 ** 20      # --vocab-size cap, 16x the release's 65,536: a larger embedding table fits no recipe here
BATCH_CHARS = 1_000_000  # texts go to the workers in batches of about this many characters
MAX_PIECES = 1_000_000   # distinct pieces a process keeps (~150 MB) before it folds them into its chunk counts
LOG_TENTHS, LOG_EVERY_S = 10, 30.0  # progress in a log (not a terminal): a line per tenth of a stage or per 30 s

# A space right after a non-space character always starts a chunk of SPLIT_PATTERN (no chunk ends in that character and
# runs on into a space), and where a chunk starts the split ahead of it depends only on the text ahead. So a text cut at
# those spaces gives the same chunks piece by piece: the regex then runs once per distinct piece, not over the corpus.
SPACE_AFTER_SPACE = regex.compile(r"\s ")    # where text.split(" ") would cut at a space that is no chunk start
CHUNK_SPACE = regex.compile(r"(?<=\S) ")     # the exact cut, slower, for texts that have one


def _count_pieces(texts, pieces, firsts, counts):
    for text in texts:
        parts = CHUNK_SPACE.split(text) if SPACE_AFTER_SPACE.search(text) else text.split(" ")
        pieces.update(parts)
        firsts[parts[0]] += 1  # a text's first piece had no space before it
    if len(pieces) > MAX_PIECES:  # bound the memory: fold the pieces into the chunk counts so far
        _fold(pieces, firsts, counts)


def _fold(pieces, firsts, counts):
    """Add the chunks of the pieces of _count_pieces to counts {chunk: count}; a letters-only piece is one chunk."""
    findall, get = regex.compile(SPLIT_PATTERN).findall, counts.get
    for piece, n in firsts.items():
        pieces[piece] -= n
        for chunk in findall(piece):
            counts[chunk] = get(chunk, 0) + n
    for piece, n in pieces.items():
        if n:
            for chunk in (" " + piece,) if piece.isalpha() else findall(" " + piece):
                counts[chunk] = get(chunk, 0) + n
    pieces.clear()
    firsts.clear()
    return counts


def _packed(counts):
    """{chunk: count} -> (UTF-8 chunks joined by 0xff, a byte UTF-8 never uses; counts): cheap to pass to processes."""
    return b"\xff".join(chunk.encode("utf-8") for chunk in counts), np.fromiter(counts.values(), np.int64, len(counts))


def _merged(packs):
    """Sum the packed counts of the processes -> one pack, each distinct chunk once."""
    counts = Counter()
    for blob, n in packs:
        counts.update(dict(zip(blob.split(b"\xff"), n.tolist())) if len(n) else {})
    return b"\xff".join(counts), np.fromiter(counts.values(), np.int64, len(counts))


def _count_worker(inbox, outbox):
    """Worker process: count the pieces of every batch it receives; at the end send back its chunk counts, packed."""
    try:
        pieces, firsts, counts = Counter(), Counter(), {}
        for texts in iter(inbox.get, None):
            _count_pieces(texts, pieces, firsts, counts)
        outbox.put(_packed(_fold(pieces, firsts, counts)))
    except BaseException as e:  # hand the error to the parent instead of leaving it waiting forever
        outbox.put(RuntimeError(f"chunk counting failed in a worker: {type(e).__name__}: {e}"))


def _batches(texts):
    batch, size = [], 0
    for t in texts:
        if not isinstance(t, str):
            raise TypeError(f"texts must be strings, got {type(t).__name__}")
        batch.append(t)
        size += len(t)
        if size >= BATCH_CHARS:
            yield batch, size
            batch, size = [], 0
    if batch:
        yield batch, size


def count_chunks(texts, num_workers=None, progress=None):
    """Texts -> their distinct chunks, packed. Batches go to num_workers - 1 processes (we count one when all are busy);
    memory grows with the distinct pieces, not the corpus."""
    batches = _batches(texts)
    head = list(itertools.islice(batches, 2))
    num_workers = (num_workers or os.cpu_count() or 1) if len(head) == 2 else 1  # a small input: no processes to start
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    inbox, outbox = ctx.Queue(maxsize=2 * num_workers), ctx.Queue()  # bounded: the reader never runs far ahead
    procs = [ctx.Process(target=_count_worker, args=(inbox, outbox), daemon=True) for _ in range(num_workers - 1)]
    for p in procs:
        p.start()
    pieces, firsts, counts = Counter(), Counter(), {}
    done, ok = 0, False
    try:
        for batch, size in itertools.chain(head, batches):
            if procs and not inbox.full():
                inbox.put(batch)
            else:  # every worker has work waiting (or there is none): count this batch here
                _count_pieces(batch, pieces, firsts, counts)
            done += size
            progress and progress(done)
        for _ in procs:
            inbox.put(None)
        # fold our pieces while the workers fold theirs; read their results before join: a big one blocks its exit
        packs = [_packed(_fold(pieces, firsts, counts))] + [outbox.get() for _ in procs]
        for r in packs:
            if isinstance(r, Exception):
                raise r
        ok = True
    finally:
        for p in procs:
            if not ok:  # an error or Ctrl-C: stop the workers we started, then reap them
                inbox.cancel_join_thread()  # and do not wait at exit to flush batches nobody will read
                p.terminate()
            p.join()
    return packs[0] if len(packs) == 1 else _merged(packs)


def train_bpe(texts, vocab_size, num_workers=None, progress=None):
    """`texts` -> mergeable ranks {token bytes: id}. Ties: the smallest pair (a, b), so ranks equal rustbpe's."""
    num_merges = vocab_size - len(SPECIAL_TOKENS) - 256
    if num_merges < 1:
        raise ValueError(f"vocab_size must be larger than {256 + len(SPECIAL_TOKENS)} (256 bytes + 9 specials), "
                         f"got {vocab_size}")
    chunks, counts = count_chunks(texts, num_workers, progress and (lambda chars: progress("count", chars, 0, 0)))
    if not len(counts):
        raise ValueError("no text to train on: the corpus is empty")
    if progress:
        progress("counted", len(counts), 0, 0)
    merges = _merge_loop(chunks, counts, num_merges, progress)
    ranks = {bytes([i]): i for i in range(256)}
    token_bytes = [bytes([i]) for i in range(256)]
    for new_id, (a, b) in enumerate(merges, start=256):
        token_bytes.append(token_bytes[a] + token_bytes[b])
        ranks[token_bytes[-1]] = new_id
    return ranks


def _initial_pairs(chunks, wcounts, shift):
    """The packed chunks laid out in one array, each word after a -1: tok, the count of the word at every position, and
    the byte pairs: {key: count} and {key: positions of its first token, ascending}."""
    tok = np.frombuffer(b"\xff" + chunks + b"\xff", dtype=np.uint8).astype(np.int32)
    tok[tok == 255] = -1
    cnt = np.append(np.asarray(wcounts, dtype=np.int64), 0)[np.cumsum(tok < 0) - 1]
    pos = np.flatnonzero((tok[:-1] >= 0) & (tok[1:] >= 0)).astype(np.int32)
    codes = (tok[pos] << 8) | tok[pos + 1]
    counts = np.bincount(codes, weights=cnt[pos], minlength=1 << 16)  # exact below 2**53
    order = np.argsort(codes, kind="stable")  # radix sort on 16-bit codes; positions stay ascending inside a pair
    codes, pos = codes[order], pos[order]
    present = np.flatnonzero(counts)
    bounds = np.searchsorted(codes, present, "left").tolist() + [len(codes)]
    keys = (((present >> 8) << shift) | (present & 255)).tolist()
    pair_count = dict(zip(keys, counts[present].astype(np.int64).tolist()))
    return tok, cnt, pair_count, {k: pos[s:e] for k, s, e in zip(keys, bounds, bounds[1:])}


NUMPY_MIN_POSITIONS = 128  # a merge listing at least this many positions runs in numpy (_merge_many), fewer in Python


def _grouped(pos, keys):
    """Pairs by first-token position (duplicates dropped) -> sorted keys, their positions, where each key starts."""
    pos, first = np.unique(pos, return_index=True)
    order = np.argsort(keys[first], kind="stable")
    keys, pos = keys[first][order], pos[order]
    return keys, pos, np.flatnonzero(np.diff(keys, prepend=-1))


def _merge_many(tok, nxt, prv, cnt, ps, a, b, new, shift, pair_count):
    """The merge of (a, b) at the listed positions `ps` all at once with numpy, on the arrays of _merge_loop: subtract
    the counts of the pairs it breaks from pair_count and return the pairs it makes as (key, count, positions)."""
    ps = ps[(tok[ps] == a) & (tok[nxt[ps]] == b)]
    if a == b:  # in a run of a's, merge the 1st, 3rd, ... from the left, as the plain loop does
        first, n = np.ones(len(ps), dtype=bool), np.arange(len(ps))
        first[1:] = nxt[ps[:-1]] != ps[1:]
        ps = ps[(n - np.maximum.accumulate(np.where(first, n, 0))) % 2 == 0]
    q, left = nxt[ps], prv[ps]
    right = nxt[q]
    x, y = tok[left].astype(np.int64), tok[right].astype(np.int64)  # keys need 64 bits past 32K
    # the pairs (x, a) at `left` and (b, y) at q go
    keys, gone, starts = _grouped(np.concatenate([left[x >= 0], q[y >= 0]]),
                                  np.concatenate([(x[x >= 0] << shift) | a, (b << shift) | y[y >= 0]]))
    for k, n in zip(keys[starts].tolist(), np.add.reduceat(cnt[gone], starts).tolist()):
        pair_count[k] -= n
    tok[ps], tok[q], nxt[ps], prv[right] = new, -2, right, ps
    left = prv[ps]  # the previous occurrence itself where two were adjacent
    x, y = tok[left].astype(np.int64), tok[right].astype(np.int64)
    # the pairs (x, new) at `left` and (new, y) at the occurrence come
    keys, made, starts = _grouped(np.concatenate([left[x >= 0], ps[y >= 0]]),
                                  np.concatenate([(x[x >= 0] << shift) | new, (new << shift) | y[y >= 0]]))
    counts, starts = np.add.reduceat(cnt[made], starts).tolist(), starts.tolist()
    return zip(keys[starts].tolist(), counts, [made[s:e] for s, e in zip(starts, starts[1:] + [len(made)])])


def _merge_loop(chunks, wcounts, num_merges, progress=None):
    """Incremental BPE on the packed distinct chunks with their counts (see count_chunks) -> [(a, b), ...] in order.
    The words sit in one array `tok` linked by nxt/prv (a merge unlinks the second token; -1 parts words, -2 is a gap).
    A pair is the int key a << SHIFT | b, listed with the positions of its first token; a heap entry is the int
    -count << KEYBITS | key, so the min-heap pops the highest count, then the smallest key, i.e. the smallest (a, b).
    Each merge visits only the positions listed under its pair and updates the counts of the pairs around them."""
    SHIFT = (255 + num_merges).bit_length()  # keys stay below 2**30 (one-digit Python ints, the fast path) up to 32K
    MASK, KEYBITS = (1 << SHIFT) - 1, 2 * SHIFT
    KEYMASK = (1 << KEYBITS) - 1
    tok, cnt, pair_count, pair_pos = _initial_pairs(chunks, wcounts, SHIFT)
    nxt, prv = np.arange(1, len(tok) + 1, dtype=np.int32), np.arange(-1, len(tok) - 1, dtype=np.int32)
    arrays = tok, nxt, prv, cnt
    T, N, P, C = map(memoryview, arrays)  # the plain loop reads single items through these, faster than from numpy
    heap = [(-c << KEYBITS) | k for k, c in pair_count.items()]  # one int per entry: -count, then the key, in its bits
    heapq.heapify(heap)
    merges, t0 = [], time.time()
    heappop, heappush = heapq.heappop, heapq.heappush
    while len(merges) < num_merges and heap:
        entry = heappop(heap)
        key = entry & KEYMASK
        cur = pair_count.get(key, 0)
        if cur <= 0:
            continue
        if cur != -(entry >> KEYBITS):  # stale entry: counts of existing pairs only fall, so re-queue the current count
            heappush(heap, (-cur << KEYBITS) | key)
            continue
        a, b = key >> SHIFT, key & MASK
        new = 256 + len(merges)
        merges.append((a, b))
        ps = pair_pos.pop(key)
        ps = ps[1:] if isinstance(ps, list) else ps  # positions after the count, or an array from numpy
        if len(ps) >= NUMPY_MIN_POSITIONS:
            made = _merge_many(*arrays, np.asarray(ps, dtype=np.int32), a, b, new, SHIFT, pair_count)
        else:
            created = {}  # pair made by this merge -> [its count, positions...]
            for p in (ps if isinstance(ps, list) else ps.tolist()):  # ascending: a run of a's merges from the left
                if T[p] != a or T[N[p]] != b:
                    continue  # a listed position gone stale
                q, c, left = N[p], C[p], P[p]
                right = N[q]
                x, y = T[left], T[right]
                T[p], T[q], N[p], P[right] = new, -2, right, p
                if x == new:  # the occurrence just before this one: its (new, a), made a moment ago, goes
                    created[(new << SHIFT) | a][0] -= c
                elif x >= 0:
                    pair_count[(x << SHIFT) | a] -= c
                if y >= 0:
                    pair_count[(b << SHIFT) | y] -= c
                for k, at in (((x << SHIFT) | new, left), ((new << SHIFT) | y, p)):
                    if k >= 0:  # a key < 0: no neighbour there
                        e = created.setdefault(k, [0])
                        e[0] += c
                        e.append(at)
            made = ((k, e[0], e) for k, e in created.items())
        del pair_count[key]  # no occurrence of (a, b) is left anywhere
        for k, count, ps in made:
            pair_count[k], pair_pos[k] = count, ps
            if count > 0:
                heappush(heap, (-count << KEYBITS) | k)
        if progress and (len(merges) % 256 == 0 or len(merges) == num_merges):
            progress("merge", len(merges), num_merges, time.time() - t0)
    return merges

# -----------------------------------------------------------------------------
# the runtime: a tiktoken.Encoding built from our ranks plus the 9 special tokens at the top ids

class Tokenizer:

    def __init__(self, enc, path=None):
        self.enc, self.path = enc, path  # path: the tokenizer.pkl it came from, named in errors
        self.hash = hashlib.sha256(pickle.dumps(enc)).hexdigest()[:16]  # checkpoint metas record it as tokenizer_hash
        self.special = {name: enc.encode_single_token(name) for name in enc.special_tokens_set}
        self.bos_id = self.special.get("<|bos|>", self.special.get("<|endoftext|>"))

    @classmethod
    def from_ranks(cls, ranks, pattern=SPLIT_PATTERN):
        special = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
        return cls(tiktoken.Encoding(name="nanochat", pat_str=pattern, mergeable_ranks=ranks, special_tokens=special))

    @classmethod
    def load(cls, directory):
        path = os.path.join(directory, "tokenizer.pkl")
        with open(path, "rb") as f:
            return cls(pickle.load(f), path)

    def save(self, directory):
        import torch
        common.atomic_write(os.path.join(directory, "tokenizer.pkl"), lambda f: pickle.dump(self.enc, f))
        token_bytes = torch.tensor(self.token_byte_lengths(), dtype=torch.int32)
        common.atomic_write(os.path.join(directory, "token_bytes.pt"), lambda f: torch.save(token_bytes, f))

    def token_byte_lengths(self):
        """Raw UTF-8 byte length of every token id (what bits per byte divides by), 0 for the special tokens."""
        specials = set(self.special.values())
        return [0 if i in specials else len(self.enc.decode_single_token_bytes(i)) for i in range(self.enc.n_vocab)]

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_bos_token_id(self):
        return self.bos_id

    def encode_special(self, name):
        return self.special[name]

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """Text (or a list of texts) -> ids; special-token strings stay text. prepend/append: a special's name or id."""
        head, tail = ([] if t is None else [self.special[t] if isinstance(t, str) else t] for t in (prepend, append))
        if isinstance(text, str):
            return head + self.enc.encode_ordinary(text) + tail
        if not isinstance(text, (list, tuple)):
            raise TypeError(f"encode expects a str or a list of str, got {type(text).__name__}")
        return [head + row + tail for row in self.enc.encode_ordinary_batch(text, num_threads=num_threads)]

    def decode(self, ids):
        return self.enc.decode(ids)

    # -------------------------------------------------------------------------
    # chat rendering: the one chat format of training, evaluation, the chat server and the export's template

    def render_conversation(self, conversation, max_tokens=2048, any_order=False):
        """Conversation -> (ids, mask 1 on the assistant's text and <|assistant_end|>). A system message joins the first
        user message; roles must alternate unless any_order (a chat client's messages as they come)."""
        messages = conversation["messages"]
        if messages and messages[0]["role"] == "system":
            assert len(messages) > 1 and messages[1]["role"] == "user", "a system message must precede a user message"
            joined = messages[0]["content"] + "\n\n" + messages[1]["content"]
            messages = [{"role": "user", "content": joined}] + messages[2:]  # never change the caller's conversation
        assert messages, "a conversation needs at least one message"
        ids, mask = [], []

        def add(tokens, m):
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        S, enc = self.encode_special, self.encode  # only these two: chat.py's benchmark tokenizer renders with this too
        add([S("<|bos|>")], 0)
        for i, message in enumerate(messages):
            role, content = message["role"], message["content"]
            expected = "user" if i % 2 == 0 else "assistant"
            assert any_order or role == expected, f"message {i} has role {role!r}, expected {expected!r}"
            if role == "user":
                assert isinstance(content, str), "user content must be a string"
                add([S("<|user_start|>"), *enc(content), S("<|user_end|>")], 0)
                continue
            add([S("<|assistant_start|>")], 0)
            if isinstance(content, str):
                add(enc(content), 1)
            elif isinstance(content, list):
                for part in content:
                    kind, value = part["type"], part["text"]
                    if kind == "text":
                        add(enc(value), 1)
                    elif kind == "python":
                        add([S("<|python_start|>"), *enc(value), S("<|python_end|>")], 1)
                    elif kind == "python_output":  # tool output is supplied at run time, never learned
                        add([S("<|output_start|>"), *enc(value), S("<|output_end|>")], 0)
                    else:
                        raise ValueError(f"unknown assistant content part type {kind!r}")
            else:
                raise ValueError(f"assistant content must be a str or a list of parts, got {type(content).__name__}")
            add([S("<|assistant_end|>")], 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_prompt(self, messages, any_order=False):
        """The messages, then <|assistant_start|>: the prompt for sampling the next reply."""
        ids, _ = self.render_conversation({"messages": messages}, max_tokens=None, any_order=any_order)
        return ids + [self.encode_special("<|assistant_start|>")]

    def render_for_completion(self, conversation):
        """Everything but the final assistant message, then <|assistant_start|>: the prompt for sampling a reply."""
        messages = conversation["messages"]
        assert messages and messages[-1]["role"] == "assistant", "the last message must be the assistant's"
        return self.render_prompt(messages[:-1])

# -----------------------------------------------------------------------------
# loading the saved tokenizer

def tokenizer_dir():
    return os.path.join(common.get_base_dir(), "tokenizer")


def checkpoints_using(directory):
    """Checkpoint folders (relative to the base dir) whose meta matches `directory`'s tokenizer (vocab; hash if any)."""
    try:
        tok = Tokenizer.load(directory)
    except Exception:
        return []
    base, found = common.get_base_dir(), set()
    for d in common.CHECKPOINT_DIRS.values():
        for path in glob.glob(os.path.join(glob.escape(base), d, "*", "meta_*.json")):
            try:
                meta = json.load(open(path))
                same_vocab = meta["model_config"]["vocab_size"] == tok.get_vocab_size()
                if meta.get("tokenizer_hash", tok.hash) == tok.hash and same_vocab:
                    found.add(os.path.relpath(os.path.dirname(path), base))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue  # not a checkpoint anything loads
    return sorted(found)


def _unreadable(path, e):
    return common.UserError(f"{path} is unreadable ({type(e).__name__}: {e}): "
                            "rebuild it with `python tokenizer.py train`")


def get_tokenizer():
    path = tokenizer_dir()
    if not os.path.exists(os.path.join(path, "tokenizer.pkl")):
        raise FileNotFoundError(f"no tokenizer at {path}: run `python tokenizer.py train` first")
    try:
        return Tokenizer.load(path)
    except Exception as e:  # a truncated pickle raises any of several errors
        raise _unreadable(os.path.join(path, "tokenizer.pkl"), e) from None


def get_token_bytes(device="cpu", tokenizer=None):
    """token_bytes.pt, checked against the tokenizer it was saved with (tokenizer.pkl, or `tokenizer` when given)."""
    import torch
    path = os.path.join(tokenizer_dir(), "token_bytes.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {path}: run `python tokenizer.py train` first")
    try:
        token_bytes = torch.load(path, map_location=device)
    except Exception as e:
        raise _unreadable(path, e) from None
    have = token_bytes.tolist() if torch.is_tensor(token_bytes) and token_bytes.dim() == 1 else []
    want = (tokenizer or get_tokenizer()).token_byte_lengths()
    if have != want:
        pkl = os.path.join(tokenizer_dir(), "tokenizer.pkl")
        raise common.UserError(f"{path} ({len(have)} tokens) does not match {pkl} ({len(want)} tokens): rewrite it "
                               "with `python -c \"import tokenizer as t; t.get_tokenizer().save(t.tokenizer_dir())\"`")
    return token_bytes

# -----------------------------------------------------------------------------
# command line: train / eval / bench

def read_input_file(path):
    """Documents of one --input file: parquet ('text' column), jsonl ({"text": ...}) or text (blank-line paragraphs)."""
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise FileNotFoundError(f"input file not found or unreadable: {path}")
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        pf = pq.ParquetFile(path)
        if "text" not in pf.schema_arrow.names:
            raise ValueError(f"{path} has no 'text' column (columns: {pf.schema_arrow.names})")
        for rg in range(pf.num_row_groups):
            yield from common.parquet_texts(path, rg)
    elif path.endswith((".jsonl", ".json")):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    obj = json.loads(line)
                    text = obj.get("text") if isinstance(obj, dict) else obj
                    if not isinstance(text, str):
                        raise ValueError(f"{path}:{n}: expected a string or an object with a 'text' string")
                    yield text
    else:
        with open(path, encoding="utf-8") as f:
            for nonblank, lines in itertools.groupby(f, key=lambda line: bool(line.strip())):
                if nonblank:
                    yield "".join(lines).rstrip("\n")


def training_documents(inputs, max_chars, doc_cap, stats):
    """The --input files' documents in order, each cut to doc_cap characters, until the total passes max_chars."""
    docs = itertools.chain.from_iterable(common.iter_documents("train") if x == "train-shards" else read_input_file(x)
                                         for x in inputs)
    for doc in docs:
        doc = doc[:doc_cap]
        stats["docs"] += 1
        stats["chars"] += len(doc)
        yield doc
        if stats["chars"] > max_chars:
            return


def peak_rss_mb():
    """Peak RSS of this process plus its largest reaped child's (a worker) in MB: an upper bound on the tree's."""
    return sum(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 1024


class Progress:
    """One status line, redrawn in a terminal; a log gets a line per tenth of a stage or per 30 s, not every redraw."""
    def __init__(self, max_chars):
        self.t0, self.max_chars = time.time(), max_chars
        self.stage, self.logged = None, None  # the stage and (tenths done, time) of the last plain line

    def __call__(self, stage, done, total, elapsed):
        t = time.time() - self.t0
        if stage == "count":
            line = f"counting chunks: {done / 1e6:,.1f}M chars ({done / 1e6 / max(t, 1e-9):.1f}M chars/s)"
        elif stage == "counted":
            line = f"counted {done:,} distinct chunks in {t:.1f}s"
        else:
            rate = done / max(elapsed, 1e-9)
            line = f"merges {done:,}/{total:,} ({rate:,.0f}/s, ETA {(total - done) / max(rate, 1e-9):.0f}s)"
        last = stage == "counted" or done == total
        if sys.stderr.isatty():
            print(f"\r{line:<79}", end="\n" if last else "", file=sys.stderr, flush=True)
            return
        tenths = done * LOG_TENTHS // (total or self.max_chars)
        if stage != self.stage:  # a new stage prints its first line
            self.stage, self.logged = stage, (-1, t)
        if last or tenths > self.logged[0] or t >= self.logged[1] + LOG_EVERY_S:
            self.logged = (tenths, t)
            print(line, file=sys.stderr, flush=True)


def cmd_train(args):
    if not 256 + len(SPECIAL_TOKENS) < args.vocab_size <= MAX_VOCAB:
        raise common.UserError(f"--vocab-size must be {257 + len(SPECIAL_TOKENS)}..{MAX_VOCAB} (256 bytes + 9 special "
                               f"tokens + at least one merge; at most 2^20), not {args.vocab_size}")
    if args.max_chars <= 0 or args.doc_cap <= 0:
        raise common.UserError("--max-chars and --doc-cap must be positive")
    users = checkpoints_using(tokenizer_dir())
    backup = os.path.join(common.get_base_dir(), f"tokenizer_{Tokenizer.load(tokenizer_dir()).hash}") if users else None
    if users and not args.force:
        raise common.UserError(f"{os.path.join(tokenizer_dir(), 'tokenizer.pkl')} is the tokenizer {', '.join(users)} "
                               "were trained with; a new one would orphan them: pass --force to replace it (the old "
                               f"one is then kept in {backup}), or use another NANOCHAT_BASE_DIR")
    stats, t0 = {"docs": 0, "chars": 0}, time.time()
    docs = training_documents(args.input, args.max_chars, args.doc_cap, stats)
    try:
        ranks = train_bpe(docs, args.vocab_size, num_workers=args.workers, progress=Progress(args.max_chars))
    except ValueError as e:  # an empty corpus or a malformed --input file
        raise common.UserError(str(e)) from None
    train_time, peak_mb = time.time() - t0, peak_rss_mb()
    tok = Tokenizer.from_ranks(ranks)
    sample = "Hello world! It's 2025; 12345 apples cost $3.50.\n\n\tdon't    stop\n你好世界 👋🏽 naïve café"
    assert tok.decode(tok.encode(sample)) == sample, "round trip failed on the sanity string"
    if users:  # --force: keep the old one for those checkpoints
        shutil.copytree(tokenizer_dir(), backup, dirs_exist_ok=True)
        print(f"note: the previous tokenizer, which {', '.join(users)} were trained with, is kept in {backup}: "
              f"copy it back to {tokenizer_dir()} to use those checkpoints")
    tok.save(tokenizer_dir())
    if tok.get_vocab_size() < args.vocab_size:  # every chunk became one token before the merges ran out
        print(f"note: the corpus only supports {len(ranks) - 256:,} merges, so the vocab is {tok.get_vocab_size():,}, "
              f"not {args.vocab_size:,}; read it from the tokenizer, not from the flag")
    lengths = np.array([n for n in tok.token_byte_lengths() if n > 0])
    print(f"trained in {train_time:.1f}s on {stats['docs']:,} docs / {stats['chars']:,} chars: "
          f"vocab {tok.get_vocab_size():,} ({len(ranks) - 256:,} merges), peak RSS {peak_mb:,.0f} MB "
          f"(with the largest worker); saved to {tokenizer_dir()}")
    common.write_report_section("tokenizer-training", {
        "input": " ".join(args.input), "docs": stats["docs"], "chars": stats["chars"],
        "vocab_size": tok.get_vocab_size(), "requested_vocab_size": args.vocab_size, "merges": len(ranks) - 256,
        "train_time_s": train_time, "peak_rss_mb": peak_mb,
        "token_bytes_min": int(lengths.min()), "token_bytes_max": int(lengths.max()),
        "token_bytes_mean": float(lengths.mean()), "token_bytes_std": float(lengths.std())})


# five hand-written samples for `tokenizer.py eval`'s compression table: prose, another script, code, LaTeX, science
SAMPLES = {
    "news": ("City officials announced on Tuesday that the long-delayed harbor bridge will reopen to traffic next "
             "spring, after engineers found the corrosion in its northern span to be less severe than first feared. "
             "The repairs, budgeted at $212 million, were paid for in part by a federal infrastructure grant awarded "
             "in 2023. \"We owe commuters an apology for the delays, but we also owe them a bridge that will last "
             "another fifty years,\" the mayor told reporters at a press conference near the waterfront. Local "
             "businesses, many of which reported a drop of 30% in weekday customers since the closure, welcomed the "
             "news. Some residents remain skeptical: a petition signed by 4,800 people asks the council to publish the "
             "full inspection report before any decision on tolls is made. The council is expected to vote on the "
             "matter on March 14."),
    "korean": ("오늘 아침 서울에는 올해 들어 처음으로 눈이 내렸다. 기상청은 오후부터 기온이 크게 떨어질 것으로 "
               "예상된다며 빙판길 안전에 유의해 달라고 당부했다. 출근길 시민들은 두꺼운 외투를 입고 서둘러 "
               "지하철역으로 향했고, 일부 도로에서는 차량이 천천히 움직이며 정체가 이어졌다. 한편 강원도 산간 지역에는 "
               "최대 10센티미터의 눈이 더 올 것으로 보여 등산객들의 각별한 주의가 필요하다."),
    "code": ("import heapq\n\n\ndef dijkstra(graph, source):\n    \"\"\"Shortest distances from source; graph maps "
             "node -> [(neighbor, weight), ...].\"\"\"\n    dist = {source: 0}\n    queue = [(0, source)]\n    while "
             "queue:\n        d, node = heapq.heappop(queue)\n        if d > dist.get(node, float('inf')):\n           "
             " continue  # stale entry\n        for nbr, w in graph.get(node, []):\n            nd = d + w\n           "
             " if nd < dist.get(nbr, float('inf')):\n                dist[nbr] = nd\n                "
             "heapq.heappush(queue, (nd, nbr))\n    return dist\n\n\nif __name__ == \"__main__\":\n    g = {\"a\": "
             "[(\"b\", 4), (\"c\", 1)], \"c\": [(\"b\", 2)]}\n    print(dijkstra(g, \"a\"))  # {'a': 0, 'b': 3, 'c': "
             "1}\n"),
    "math": ("\\begin{theorem}[Cauchy--Schwarz] For all vectors $u, v$ in an inner product space $V$,\n\\[ |\\langle "
             "u, v \\rangle|^2 \\le \\langle u, u \\rangle \\cdot \\langle v, v \\rangle. \\]\n\\end{theorem}\n"
             "\\begin{proof} If $v = 0$ both sides vanish. Otherwise let $\\lambda = \\frac{\\langle u, "
             "v\\rangle}{\\langle v, v\\rangle}$ and expand\n\\begin{align*} 0 \\le \\| u - \\lambda v \\|^2 &= "
             "\\langle u, u\\rangle - 2\\,\\mathrm{Re}(\\bar{\\lambda}\\langle u, v\\rangle) + |\\lambda|^2 \\langle "
             "v, v\\rangle \\\\ &= \\|u\\|^2 - \\frac{|\\langle u, v\\rangle|^2}{\\|v\\|^2}. \\end{align*}\n"
             "Multiplying by $\\|v\\|^2 > 0$ gives the claim; equality holds iff $u = \\lambda v$. \\qedhere\n"
             "\\end{proof}\nAs a corollary, $\\sum_{i=1}^{n} x_i y_i \\le \\sqrt{\\sum_{i=1}^{n} "
             "x_i^2}\\,\\sqrt{\\sum_{i=1}^{n} y_i^2}$ for real $x_i, y_i$, and $\\int_0^1 f g \\,dx \\le \\|f\\|_2 "
             "\\|g\\|_2$."),
    "science": ("Photosynthesis converts light energy into chemical energy stored in glucose. In the light-dependent "
                "reactions, which take place in the thylakoid membranes of the chloroplast, photons excite electrons "
                "in chlorophyll; water is split to replace them, releasing O2 as a by-product. The energy captured is "
                "stored as ATP and NADPH, which then drive the Calvin cycle in the stroma, where the enzyme RuBisCO "
                "fixes CO2 into three-carbon sugars. Under high temperatures RuBisCO also reacts with oxygen, a "
                "wasteful process called photorespiration that C4 and CAM plants have evolved to reduce."),
}


def cmd_eval(args):
    ours = get_tokenizer()
    texts = dict(SAMPLES)
    for name, split in (("fwe-train", "train"), ("fwe-val", "val")):
        try:
            path = common.list_shards(split)[0]
            texts[name] = "\n".join(common.parquet_texts(path, 0))
        except FileNotFoundError as e:
            print(f"skipping {name}: {e}")
    tokenizers = {"ours": ours}
    for label, name in (("gpt2", "gpt2"), ("gpt4", "cl100k_base")):
        try:
            tokenizers[label] = Tokenizer(tiktoken.get_encoding(name))  # their BOS is <|endoftext|>
        except Exception as e:  # tiktoken downloads these on first use; offline it cannot
            print(f"{label} ({name}) not available, compared with ours only: tiktoken could not load it "
                  f"(offline or not cached: {type(e).__name__})")
    others = [label for label in tokenizers if label != "ours"]
    lines = [f"{'text':<10} {'bytes':>7}" + "".join(f" {label + ' tok':>10} {'B/tok':>5}" for label in tokenizers)
             + "".join(f" {'vs ' + label:>8}" for label in others)]
    report = {}
    for name, text in texts.items():
        nbytes, line, n = len(text.encode("utf-8")), f"{name:<10} {len(text.encode('utf-8')):>7,}", {}
        for label, tok in tokenizers.items():
            ids = tok.encode(text)
            assert tok.decode(ids) == text, f"{label} round trip failed on {name}"
            n[label] = len(ids)
            line += f" {len(ids):>10,} {nbytes / len(ids):>5.2f}"
            report[f"{name}_{label}_tokens"], report[f"{name}_{label}_ratio"] = len(ids), nbytes / len(ids)
        for label in others:  # relative diff: positive = ours needs fewer tokens
            line += f" {100 * (n[label] - n['ours']) / n[label]:>+7.1f}%"
        lines.append(line)
    print(f"vocab {ours.get_vocab_size():,}\n" + "\n".join(lines))
    common.write_report_section("tokenizer-evaluation", [report, "```\n" + "\n".join(lines) + "\n```"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train the BPE and save tokenizer/ under the base dir")
    p.add_argument("--input", nargs="+", default=["train-shards"], help="parquet ('text' column), jsonl ({'text': "
                   "...}) or text files (blank-line separated paragraphs), read in order; the word train-shards stands "
                   "for the train shards under $NANOCHAT_BASE_DIR/base_data (the default)")
    p.add_argument("--vocab-size", type=int, default=65536, help="including the 9 special tokens")
    p.add_argument("--max-chars", type=int, default=2_000_000_000, help="stop after this many characters")
    p.add_argument("--doc-cap", type=int, default=10_000, help="truncate each document to this many characters")
    p.add_argument("--workers", type=int, default=None, help="chunk-counting processes (default: all cores)")
    p.add_argument("--force", action="store_true",
                   help="replace a tokenizer that checkpoints were trained with (it is backed up)")
    sub.add_parser("eval", help="compression table vs GPT-2 / GPT-4")
    p = sub.add_parser("bench", help="trainer time and peak memory vs rustbpe when installed")
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--shards", type=int, default=11, help="train shards shard_00000.. to read from $NANOCHAT_MIRROR")
    p.add_argument("--doc-cap", type=int, default=10_000)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--rounds", type=int, default=3, help="interleaved runs of each trainer; the medians are compared")
    args = parser.parse_args()
    {"train": cmd_train, "eval": cmd_eval, "bench": cmd_bench}[args.command](args)


# -----------------------------------------------------------------------------
# benchmarks

def _tree_pss_mb(pid):
    """PSS of a process and its children in MB: forked workers share pages, which PSS splits and RSS counts twice."""
    try:
        kids = open(f"/proc/{pid}/task/{pid}/children").read().split()
        pss_kb = [int(open(f"/proc/{p}/smaps_rollup").read().split("\nPss:")[1].split()[0]) for p in [pid, *kids]]
        return sum(pss_kb) / 1024
    except (OSError, IndexError):  # a process that just ended: this sample counts nothing
        return 0


def _timed_in_child(fn):
    """fn() in a forked child (same heap every run) -> (wall s, CPU s, peak PSS of its tree above the start MB, out)."""
    def child():
        t0, c0 = time.time(), sum(os.times()[:4])
        out = fn()
        send.send((time.time() - t0, sum(os.times()[:4]) - c0, out))
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=child)
    proc.start()
    send.close()  # so that recv() fails instead of waiting forever if the child dies
    start = peak = _tree_pss_mb(proc.pid)
    while not recv.poll(0.05):
        peak = max(peak, _tree_pss_mb(proc.pid))
    wall, cpu, out = recv.recv()
    proc.join()
    return wall, cpu, peak - start, out


def cmd_bench(args):
    paths = [common.resolve_url(common.SHARD_URL.format(i)) for i in range(args.shards)]
    if missing := [p for p in paths if not os.path.isfile(p)]:
        raise common.UserError(f"benchmark shards missing: {missing[0]} ... "
                               "(set NANOCHAT_MIRROR to the mirror directory)")
    docs = [d[:args.doc_cap] for p in paths for d in common.parquet_texts(p)]
    V = args.vocab_size
    print(f"{len(docs):,} docs, {sum(map(len, docs)):,} chars from {len(paths)} shards; vocab {V:,}; "
          f"{os.cpu_count()} cores")
    trainers = {"ours": lambda: train_bpe(docs, V, num_workers=args.workers)}
    try:
        import rustbpe
        def train_rustbpe():
            tok = rustbpe.Tokenizer()
            tok.train_from_iterator(docs, V - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
            return {bytes(k): v for k, v in tok.get_mergeable_ranks()}
        trainers["rustbpe"] = train_rustbpe
    except ImportError:
        print("rustbpe not installed (pip install rustbpe): no reference run")
    runs = {name: [] for name in trainers}  # name -> [(wall s, CPU s, MB, ranks)]
    for r in range(args.rounds):  # interleaved, in turned order: a busy machine slows every trainer alike
        for name in list(trainers)[::1 if r % 2 else -1]:
            wall, cpu, mb, ranks = _timed_in_child(trainers[name])
            runs[name].append((wall, cpu, mb, ranks))
            print(f"round {r + 1} {name:<8} {wall:6.2f} s wall, {cpu:6.2f} s CPU, peak PSS +{mb:4.0f} MB")
    med = {name: [statistics.median(x[i] for x in rs) for i in range(3)] for name, rs in runs.items()}
    print(f"medians of {args.rounds}: "
          + ", ".join(f"{n} {t:.2f} s wall, {c:.2f} s CPU, +{m:.0f} MB" for n, (t, c, m) in med.items())
          + f"; load average {os.getloadavg()[0]:.1f} (the machine may be shared)")
    if "rustbpe" in runs:
        ratio = [o / r for o, r in zip(med["ours"], med["rustbpe"])]
        print(f"ours/rustbpe: wall {ratio[0]:.2f}x, CPU {ratio[1]:.2f}x, memory {ratio[2]:.2f}x; "
              f"ranks equal rustbpe's: {all(o[3] == runs['rustbpe'][0][3] for o in runs['ours'])}")


if __name__ == "__main__":
    common.run_main(main)
