"""
Everything the training stages read: downloads through the mirror (resume, retry, validate), the pretraining shards,
the BOS-aligned best-fit pretraining loader with exact cheap resume, the padded best-fit chat loader, and the task
datasets (SmolTalk, MMLU, ARC, GSM8K, HumanEval, spelling, identity, your own conversations) with mixtures, and
`prepare`, which writes your own text as the pretraining shards.

    python data.py download -n 8 [-w 4] [--mirror DIR_OR_URL]    train shards 0..7 + validation shard 1822
    python data.py prepare --input PATH [PATH ...] [--replace]    your own text as the train shards + validation shard
    python data.py bench                                          loader throughput and resume time
"""
import os, re, io, sys, json, time, queue, random, shutil, hashlib, zipfile, argparse, functools, threading, contextlib
import urllib.parse
import concurrent.futures as cf
from collections import namedtuple

import numpy as np
import requests
import torch
import pyarrow as pa
import pyarrow.parquet as pq

import common

from common import SHARD_URL
EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
WORDS_URL = "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt"
HF_PARQUET_URL = ("https://huggingface.co/datasets/{repo}/resolve/refs%2Fconvert%2Fparquet/"
                  "{subset}/{split}/{index:04d}.parquet")
ATTEMPTS = 5       # tries per file
BACKOFF = 2.0      # seconds before the second try, doubled after each failure
TIMEOUT = 30       # seconds a connection may stay silent
CHUNK = 1 << 16    # bytes per read and write: Ctrl-C is noticed between two of them

# =============================================================================
# downloads

class NotFound(FileNotFoundError):
    """The server (or mirror) has no such file. Never retried."""

class _Retryable(Exception):
    pass

def _is_html(path):
    """A web page (a captive portal, a wrong URL's error page) where a data file belongs."""
    with open(path, "rb") as f:
        return f.read(1024).lstrip().lower().startswith((b"<!doctype html", b"<html"))

def _is_valid(path, kind):
    """parquet: the footer reads; zip: every CRC matches; text: non-empty and not a web page; kind None: anything."""
    try:
        if kind == "text":
            return os.path.getsize(path) > 0 and not _is_html(path)
        if kind == "parquet":
            return pq.ParquetFile(path).metadata.num_rows >= 0
        if kind == "zip":
            with zipfile.ZipFile(path) as z:
                return z.testzip() is None
        return kind is None
    except Exception:
        return False

@functools.cache
def _mirror_sums(mirror):
    """{HOST/PATH: sha256} from the mirror's SHA256SUMS (sha256sum's format); {} when it has none."""
    try:  # (an http 404 page has no line of that format)
        sums = f"{mirror}/SHA256SUMS"  # a mirror is an http(s) URL or an absolute path (common.set_mirror)
        text = requests.get(sums, timeout=TIMEOUT).text if sums.startswith("http") else open(sums).read()
    except (OSError, requests.RequestException):
        return {}
    return {m.group(2): m.group(1) for m in re.finditer(r"^([0-9a-f]{64}) [ *](.+)$", text, re.M)}

def _problem(url, path, kind):
    """Why `path` is not a good copy of `url`, or None: the mirror file's size, its SHA256SUMS sum, else a full read."""
    src, size = common.resolve_url(url), os.path.getsize(path)
    if os.path.isfile(src) and os.path.getsize(src) != size:
        return f"{size:,} bytes where the mirror has {os.path.getsize(src):,}"
    u = urllib.parse.urlsplit(url)
    sums = _mirror_sums(common.get_mirror()) if common.get_mirror() else {}
    if want := sums.get(u.netloc + urllib.parse.unquote(u.path)):
        with open(path, "rb") as f:
            same = hashlib.file_digest(f, "sha256").hexdigest() == want
        return None if same else "sha256 differs from the mirror's SHA256SUMS"
    if kind != "parquet":
        return None if _is_valid(path, kind) else f"not a valid {kind} file"
    try:
        pf = pq.ParquetFile(path)
        for rg in range(pf.num_row_groups):
            pf.read_row_group(rg)
    except (OSError, ValueError) as e:  # pyarrow's errors
        return f"unreadable ({type(e).__name__}: {e})"

def _fetch_http(src, url, tmp, progress, stop=None):
    """One GET of src into tmp, resuming a partial tmp with Range (206 appends, 200 restarts, 416 starts over)."""
    have = os.path.getsize(tmp) if os.path.exists(tmp) else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with requests.get(src, headers=headers, stream=True, timeout=TIMEOUT) as r:
        if r.status_code == 404:
            raise NotFound(f"404 Not Found: {url}" + (f" (fetched from {src})" if src != url else ""))
        if r.status_code == 416:
            os.remove(tmp)
            raise _Retryable("416 Range Not Satisfiable: the partial file is discarded")
        if r.status_code >= 500 or r.status_code == 429:
            raise _Retryable(f"HTTP {r.status_code}")
        if r.status_code not in (200, 206):
            raise common.UserError(f"HTTP {r.status_code} for {url} (fetched from {src}): check the mirror or the URL")
        append = r.status_code == 206
        if append and not r.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
            os.remove(tmp)
            raise _Retryable(f"server resumed at the wrong offset ({r.headers.get('Content-Range')})")
        expected = int(r.headers["Content-Length"]) if "Content-Length" in r.headers else None
        got = 0
        with open(tmp, "ab" if append else "wb") as f:
            for chunk in r.iter_content(CHUNK):
                if stop is not None and stop.is_set():
                    raise KeyboardInterrupt
                f.write(chunk)
                got += len(chunk)
                if progress:
                    progress(len(chunk))
        if expected is not None and got < expected:
            raise _Retryable(f"connection closed after {got} of {expected} bytes")

def download_file(url, dest_path, progress=None, recheck=False, stop=None):
    """Fetch `url` (through the mirror) to dest_path: temp file, resume, retries with backoff, validation by _problem
    (the kind by extension), atomic rename; safe for concurrent callers. A dest_path already there is kept if its
    footer reads (recheck: if _problem passes). Ctrl-C (or `stop` set) raises at once, leaving no partial file/lock."""
    dest_path = os.path.abspath(dest_path)
    kind = {".parquet": "parquet", ".zip": "zip", ".txt": "text"}.get(os.path.splitext(dest_path)[1])
    if not recheck and os.path.exists(dest_path) and _is_valid(dest_path, kind):
        return dest_path
    os.makedirs(os.path.dirname(dest_path), exist_ok=True)
    with common.file_lock(dest_path + ".lock", stop=stop):
        if os.path.exists(dest_path):
            if recheck:
                problem = _problem(url, dest_path, kind)
            else:
                problem = None if _is_valid(dest_path, kind) else "truncated or corrupt"
            if problem is None:
                return dest_path  # good, or another process fetched it while we waited
            print(f"{dest_path}: {problem}; fetching it again", file=sys.stderr, flush=True)
        src = common.resolve_url(url)
        tmp = dest_path + ".part"
        try:
            for attempt in range(1, ATTEMPTS + 1):
                try:
                    if src.startswith(("http://", "https://")):
                        _fetch_http(src, url, tmp, progress, stop)
                    elif not os.path.isfile(src):
                        raise NotFound(f"not in the mirror: {url} (no file {src})")
                    else:
                        shutil.copyfile(src, tmp)
                        if progress:
                            progress(os.path.getsize(tmp))
                    if _is_html(tmp):
                        os.remove(tmp)
                        raise common.UserError(f"{src} answered with a web page, not {os.path.basename(dest_path)}: "
                                               "check the mirror (--mirror, NANOCHAT_MIRROR) or the network (a login "
                                               "page?); nothing was kept")
                    if (problem := _problem(url, tmp, kind)) is None:
                        os.replace(tmp, dest_path)
                        return dest_path
                    os.remove(tmp)
                    reason = f"the downloaded file is bad: {problem}"
                except (requests.RequestException, _Retryable) as e:
                    reason = f"{type(e).__name__}: {e}"
                if attempt < ATTEMPTS:
                    delay = BACKOFF * 2 ** (attempt - 1)
                    print(f"download {url}: {reason}; try {attempt + 1}/{ATTEMPTS} in {delay:.1f}s", file=sys.stderr,
                          flush=True)
                    if (stop or threading.Event()).wait(delay):
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise
        raise common.UserError(f"download failed after {ATTEMPTS} tries: {url} ({reason}): check the network or the "
                               "mirror (--mirror, NANOCHAT_MIRROR), then run the same command again")

def download_shards(n, workers=4):
    """Train shards 0..n-1 (n = -1: all) plus the val shard into base_data/, in parallel; those there are rechecked."""
    if n != -1 and not 1 <= n <= common.VAL_SHARD_INDEX:
        raise common.UserError(f"-n/--num-shards must be -1 (all) or 1..{common.VAL_SHARD_INDEX}, not {n}")
    if os.path.exists(os.path.join(common.shard_dir(), PREPARED)):
        raise common.UserError(f"{common.shard_dir()} holds a corpus of your own (data.py prepare): download into "
                               f"another NANOCHAT_BASE_DIR, or remove that folder first")
    indices = list(range(common.VAL_SHARD_INDEX if n == -1 else n)) + [common.VAL_SHARD_INDEX]
    nbytes, lock = [0], threading.Lock()  # bytes so far, added by the download threads
    t0 = time.time()
    stop = threading.Event()  # set by Ctrl-C: the running downloads end at their next chunk

    def count(k):
        with lock:
            nbytes[0] += k

    def line(end=""):
        done = sum(f.done() and f.exception() is None for f in futures)
        mb, dt = nbytes[0] / 1e6, max(time.time() - t0, 1e-9)
        print(f"\rshards {done}/{len(indices)} | {mb:.1f} MB | {mb / dt:.1f} MB/s", end=end, flush=True)

    with cf.ThreadPoolExecutor(max(1, workers)) as ex:
        futures = [ex.submit(download_file, SHARD_URL.format(i), common.shard_path(i), progress=count, recheck=True,
                             stop=stop) for i in indices]
        try:
            while cf.wait(futures, timeout=0.5).not_done:
                line()
        except KeyboardInterrupt:
            stop.set()
            ex.shutdown(cancel_futures=True)  # the queued ones never start; the running ones clean up and end
            raise
    line("\n")
    if errors := [f.exception() for f in futures if f.exception()]:
        if isinstance(errors[0], common.UserError):
            raise errors[0]
        raise common.UserError(f"{len(errors)} of {len(indices)} shards failed; first: {errors[0]}")
    print(f"{len(indices)}/{len(indices)} shards in {os.path.dirname(common.shard_path(0))}")
    return [common.shard_path(i) for i in indices]

def download_eval_bundle():
    """The CORE bundle, unzipped once into $BASE/eval_bundle (one process unzips; the others wait). -> its directory"""
    base = common.get_base_dir()
    out = os.path.join(base, "eval_bundle")
    if os.path.exists(os.path.join(out, "core.yaml")):
        return out
    with common.file_lock(out + ".lock"):
        if not os.path.exists(os.path.join(out, "core.yaml")):
            zpath = download_file(EVAL_BUNDLE_URL, os.path.join(base, "eval_bundle.zip"))
            tmp = f"{out}.tmp{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            with zipfile.ZipFile(zpath) as z:
                z.extractall(tmp)
            inner = os.path.join(tmp, "eval_bundle")
            shutil.rmtree(out, ignore_errors=True)  # leftovers of an interrupted earlier attempt
            os.replace(inner if os.path.isdir(inner) else tmp, out)
            shutil.rmtree(tmp, ignore_errors=True)
    return out

def task_parquets(repo, subset, split):
    """Every parquet file of a Hugging Face dataset split (0000, 0001, ... until the first 404) under task_data/."""
    folder = os.path.join(common.get_base_dir(), "task_data", repo.replace("/", "__"), subset, split)
    manifest = os.path.join(folder, "manifest.json")
    if os.path.exists(manifest):  # fetched before: no need to probe the network again
        paths = [os.path.join(folder, name) for name in json.load(open(manifest))["files"]]
        if all(os.path.exists(p) for p in paths):
            return paths
    paths = []
    while True:
        url = HF_PARQUET_URL.format(repo=repo, subset=subset, split=split, index=len(paths))
        try:
            paths.append(download_file(url, os.path.join(folder, f"{len(paths):04d}.parquet")))
        except NotFound:
            if not paths:
                raise
            break
    common.atomic_write_text(manifest, json.dumps({"repo": repo, "subset": subset, "split": split,
                                                   "files": [os.path.basename(p) for p in paths]}))
    return paths

def _task_rows(repo, subset, split):
    return [row for p in task_parquets(repo, subset, split) for row in pq.read_table(p).to_pylist()]

# =============================================================================
# pretraining loader: BOS-aligned best fit; cropped remainders go back into the buffer as BOS-prefixed pieces

Piece = namedtuple("Piece", "tokens start epoch group doc")  # BOS + tokens[start:] of document `doc` of `group`

def _on_device(x, y, device):
    """numpy (x, y) -> int64 tensors on `device`; on CUDA through pinned memory: an asynchronous host->GPU copy."""
    x, y = (torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)) for a in (x, y))
    if device.startswith("cuda"):
        x, y = (t.pin_memory().to(device, non_blocking=True) for t in (x, y))
    return x, y

class PretrainLoader:
    """Yields (x, y) int64 (B, T) on `device`: rows of T+1 tokens, no padding, filled with the longest buffered piece
    that fits, else the shortest cropped (its rest stays buffered). state_dict() stores only the pieces' names, so
    resume is exact (the same batches as an uninterrupted run) and cheap (re-tokenizes only the buffered documents)."""

    def __init__(self, tokenizer, B, T, split="train", device="cpu", rank=0, world_size=1, threads=2,
                 buffer_docs=1000, prefetch=4):
        self.tok, self.B, self.T = tokenizer, B, T
        self.split, self.device, self.rank, self.world_size = split, str(device), rank, world_size
        self.threads, self.prefetch = threads, prefetch
        self.bos = tokenizer.get_bos_token_id()
        self.paths = common.list_shards(split)
        metas = []
        for p in self.paths:
            with common.shard_errors(p):
                metas.append(pq.ParquetFile(p).metadata)
        groups = [(fi, rg) for fi, md in enumerate(metas) for rg in range(md.num_row_groups)]
        self.row_groups = groups[rank::world_size]  # (file, row group): ranks stride over the split, disjoint documents
        if not self.row_groups:
            raise common.UserError(f"rank {rank} of {world_size} gets no row group: the {split} split has "
                                   f"{len(groups)} row groups in {len(self.paths)} shards; download more shards or run "
                                   f"fewer ranks")
        docs = sum(metas[fi].row_group(rg).num_rows for fi, rg in self.row_groups)
        self.buffer_docs = min(buffer_docs, docs)  # a small split (val) is buffered once, not several epochs over
        self.buffer = []      # Pieces
        self.next = (0, 0)    # (epoch, group) of the next row group to pull into the buffer
        self.epoch = 0        # epoch of the latest row group pulled in
        self.stats = {"tokens_read": 0, "tokens_used": 0}
        self._thread = None

    # --- background tokenization: a thread walks the fixed row-group sequence ahead; the consumer takes it in order
    def _read_texts(self, group):
        fi, rg = self.row_groups[group]
        with common.shard_errors(self.paths[fi]):
            return common.parquet_texts(self.paths[fi], rg)

    def _encode(self, texts):
        return [np.asarray(ids, dtype=np.int32) for ids in self.tok.encode(texts, num_threads=self.threads)]

    def _produce(self, epoch, group, q, stop):
        def put(item):
            while not stop.is_set():
                with contextlib.suppress(queue.Full):
                    return q.put(item, timeout=0.1)
        try:
            while not stop.is_set():
                put((epoch, group, self._encode(self._read_texts(group))))
                group += 1
                if group == len(self.row_groups):
                    epoch, group = epoch + 1, 0
        except BaseException as e:  # handed to the consumer, which raises it
            put(e)

    def _start(self):
        self._stop, self._q = threading.Event(), queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(target=self._produce, args=(*self.next, self._q, self._stop), daemon=True)
        self._thread.start()

    def close(self):
        """Stop the background thread (prefetched row groups are dropped; the state is unaffected)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def _refill(self):
        while len(self.buffer) < self.buffer_docs:
            if self._thread is None:
                self._start()
            item = self._q.get()
            if isinstance(item, BaseException):
                self.close()
                raise item
            epoch, group, docs = item
            assert (epoch, group) == self.next, "producer out of step"
            self.buffer.extend(Piece(d, 0, epoch, group, j) for j, d in enumerate(docs) if len(d))
            self.stats["tokens_read"] += sum(len(d) for d in docs)
            self.epoch = epoch
            self.next = (epoch + 1, 0) if group + 1 == len(self.row_groups) else (epoch, group + 1)

    def _rows(self):
        T1 = self.T + 1
        rows = np.empty((self.B, T1), dtype=np.int64)
        for b in range(self.B):
            pos = 0
            while pos < T1:
                self._refill()
                lens = np.array([1 + len(p.tokens) - p.start for p in self.buffer])
                room = T1 - pos
                fits = np.where(lens <= room, lens, 0)
                j = int(fits.argmax())  # longest that fits whole (first one on ties)
                if fits[j] == 0:
                    j = int(lens.argmin())  # none fits: crop the shortest
                take = min(int(lens[j]), room)
                piece = self.buffer[j]
                rows[b, pos] = self.bos
                rows[b, pos + 1:pos + take] = piece.tokens[piece.start:piece.start + take - 1]
                pos += take
                self.stats["tokens_used"] += take - 1
                if take == lens[j]:
                    self.buffer.pop(j)
                else:  # the rest stays, as BOS + tokens[start:]
                    self.buffer[j] = piece._replace(start=piece.start + take - 1)
        return rows

    def __iter__(self):
        return self

    def __next__(self):
        rows = self._rows()
        return _on_device(rows[:, :-1], rows[:, 1:], self.device)

    def state_dict(self):
        """Small and JSON-serializable: position in the row-group sequence, buffer as piece names, counters."""
        return {"split": self.split, "rank": self.rank, "world_size": self.world_size,
                "shards": [os.path.basename(p) for p in self.paths], "next": list(self.next), "epoch": self.epoch,
                "buffer": [[p.epoch, p.group, p.doc, p.start] for p in self.buffer], "stats": dict(self.stats)}

    def load_state_dict(self, sd):
        mine = self.state_dict()
        for key in ("split", "rank", "world_size", "shards"):
            if sd[key] != mine[key]:
                raise common.UserError(f"loader state was saved with {key}={sd[key]!r}, this loader has "
                                       f"{mine[key]!r}: resume with the same shards and number of ranks")
        self.close()
        wanted = sorted({(g, j) for _, g, j, _ in sd["buffer"]})
        texts = {g: self._read_texts(g) for g in sorted({g for g, _ in wanted})}  # only the row groups still buffered
        docs = dict(zip(wanted, self._encode([texts[g][j] for g, j in wanted])))
        self.buffer = [Piece(docs[(g, j)], start, e, g, j) for e, g, j, start in sd["buffer"]]
        self.next, self.epoch, self.stats = tuple(sd["next"]), sd["epoch"], dict(sd["stats"])

# =============================================================================
# chat loader: best fit with padding, never cropping a conversation

Rendered = namedtuple("Rendered", "index ids mask")  # conversation `index` of the task: np.int64 ids, np.int8 mask

class ChatLoader:
    """Yields (x, y) int64 (B, T): rows of T+1 tokens filled with whole conversations (longest that fits first), then
    BOS padding with target -1; completion_only=True (SFT) also masks (-1) wherever the render mask is 0. Rank r takes
    conversations r, r+W, ...; `progress` reaches 1.0 once its share of one epoch is placed (then it keeps cycling).
    A batch may hold no target at all: take loss = model(x, y, loss_reduction="sum") / max(1, (y >= 0).sum()) (summed
    over ranks under DDP), 0 with zero gradient where a plain mean gives NaN."""

    def __init__(self, task, tokenizer, B, T, device="cpu", rank=0, world_size=1, completion_only=False, buffer=100,
                 pack=True):
        self.task, self.tok, self.B, self.T = task, tokenizer, B, T
        self.device, self.rank, self.world_size = str(device), rank, world_size
        self.completion_only, self.buffer_size, self.pack = completion_only, buffer, pack
        self.share = len(range(rank, len(task), world_size))  # conversations of this rank per epoch
        if self.share == 0:
            raise common.UserError(f"rank {rank} of {world_size} gets no conversation: the task has only {len(task)}; "
                                   f"run fewer ranks")
        self.bos = tokenizer.get_bos_token_id()
        self.cursor = rank     # the next conversation to render
        self.placed = 0        # conversations placed into rows so far
        self.buffer = []       # Rendered conversations

    @property
    def progress(self):
        return min(1.0, self.placed / self.share)

    def _render(self, i):
        ids, mask = self.tok.render_conversation(self.task[i], max_tokens=self.T + 1)
        return Rendered(i, np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.int8))

    def _refill(self):
        while len(self.buffer) < self.buffer_size:
            self.buffer.append(self._render(self.cursor))
            self.cursor = (self.cursor + self.world_size) % len(self.task)

    def __iter__(self):
        return self

    def __next__(self):
        T1 = self.T + 1
        ids = np.full((self.B, T1), self.bos, dtype=np.int64)
        train = np.zeros((self.B, T1), dtype=np.int8)  # 1 = this token is a target
        for b in range(self.B):
            pos = 0
            while True:
                self._refill()
                lens = np.array([len(c.ids) for c in self.buffer])
                fits = np.where(lens <= T1 - pos, lens, 0)
                j = int(fits.argmax()) if self.pack else 0  # pack=False: the next conversation alone in its row
                if fits[j] == 0 or (pos > 0 and not self.pack):
                    break  # nothing fits: the rest of the row is padding
                _, cids, cmask = self.buffer.pop(j)
                ids[b, pos:pos + len(cids)] = cids
                train[b, pos:pos + len(cids)] = cmask if self.completion_only else 1
                pos += len(cids)
                self.placed += 1
        return _on_device(ids[:, :-1], np.where(train[:, 1:] == 1, ids[:, 1:], -1), self.device)

    def state_dict(self):
        return {"rank": self.rank, "world_size": self.world_size, "cursor": self.cursor, "placed": self.placed,
                "buffer": [c.index for c in self.buffer]}

    def load_state_dict(self, sd):
        if (sd["rank"], sd["world_size"]) != (self.rank, self.world_size):
            raise common.UserError(f"chat loader state is for rank {sd['rank']} of {sd['world_size']}, not "
                                   f"{self.rank} of {self.world_size}: resume with the same number of ranks")
        self.cursor, self.placed = sd["cursor"], sd["placed"]
        self.buffer = [self._render(i) for i in sd["buffer"]]

# =============================================================================
# tasks: len(task), task[i] -> {"messages": [...], ...}, task.eval_type, task.evaluate(conversation, completion) -> bool

def render_mc(question, letters, choices):
    """Each choice, then '=' and its letter, the reply's token: after its choice it binds better in a small model."""
    lines = "".join(f"- {c}={l}\n" for l, c in zip(letters, choices))
    return f"Multiple Choice question: {question}\n{lines}\nRespond only with the letter of the correct answer."

def extract_answer(text):
    """The number after '####' (commas removed), or None."""
    m = re.search(r"#### (\-?[0-9\.\,]+)", text)
    return m.group(1).strip().replace(",", "") if m else None

class Task:
    """Rows in the order datasets.shuffle(seed=42) gives (numpy default_rng(42) permutation), cut to `size`."""
    eval_type = "generative"

    def __init__(self, rows, size=None):
        rows = [rows[i] for i in np.random.default_rng(42).permutation(len(rows))]
        self.rows = rows if size is None else rows[:size]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.conversation(self.rows[i])

    def conversation(self, row):  # a row in the chat shape already: each message's role and content
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in row["messages"]]}

    def evaluate(self, conversation, completion):
        """The completion is the reference reply, but for surrounding white space."""
        return completion.strip() == conversation["messages"][-1]["content"]

class _Categorical(Task):
    eval_type = "categorical"

class _FinalAnswer(Task):
    def evaluate(self, conversation, completion):
        """The number after '####' is the reference reply's (the reply's last part holds it)."""
        ref = extract_answer(conversation["messages"][-1]["content"][-1]["text"])
        return ref is not None and extract_answer(completion) == ref

class SmolTalk(Task):
    def __init__(self, split, size=None):
        super().__init__(_task_rows("HuggingFaceTB/smol-smoltalk", "default", split), size)

class MMLU(_Categorical):
    def __init__(self, subset, split, size=None):
        super().__init__(_task_rows("cais/mmlu", subset, split), size)

    def conversation(self, row):
        row = row.get("train", row)  # auxiliary_train wraps each row in a struct named `train`
        letters = "ABCDEFGHIJ"[:len(row["choices"])]
        return {"messages": [{"role": "user", "content": render_mc(row["question"], letters, row["choices"])},
                             {"role": "assistant", "content": letters[row["answer"]]}],
                "subject": row["subject"], "letters": list(letters)}

class ARC(_Categorical):
    def __init__(self, subset, split, size=None):
        super().__init__(_task_rows("allenai/ai2_arc", subset, split), size)

    def conversation(self, row):
        letters, choices = list(row["choices"]["label"]), list(row["choices"]["text"])  # "A"-"E" or "1"-"5"
        if row["answerKey"] not in letters:
            raise ValueError(f"ARC row {row.get('id')}: answerKey {row['answerKey']!r} not among labels {letters}")
        return {"messages": [{"role": "user", "content": render_mc(row["question"], letters, choices)},
                             {"role": "assistant", "content": row["answerKey"]}], "letters": letters}

class GSM8K(_FinalAnswer):
    def __init__(self, split, size=None):
        super().__init__(_task_rows("openai/gsm8k", "main", split), size)

    def conversation(self, row):
        parts = []
        for chunk in re.split(r"(<<[^>]*>>)", row["answer"]):
            if chunk.startswith("<<") and chunk.endswith(">>") and "=" in chunk:
                expr, result = chunk[2:-2].rsplit("=", 1)  # calculator call, and the value it returns
                parts += [{"type": "python", "text": expr}, {"type": "python_output", "text": result}]
            elif chunk:
                parts.append({"type": "text", "text": chunk})
        return {"messages": [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": parts}]}

class HumanEval(Task):
    def __init__(self, size=None):
        super().__init__(_task_rows("openai/openai_humaneval", "openai_humaneval", "test"), size)

    def conversation(self, row):
        return {"messages": [{"role": "user", "content": row["prompt"]},
                             {"role": "assistant", "content": row["prompt"] + "\n" + row["canonical_solution"]}],
                "entry_point": row["entry_point"], "test": row["test"]}

    def evaluate(self, conversation, completion, execute=None):
        """execute(program) -> dict with "success" (eval.execute_code, the sandbox) or bool; required."""
        if execute is None:
            raise ValueError("HumanEval.evaluate needs execute=eval.execute_code (programs run only in the sandbox)")
        result = execute(build_program(conversation, completion))
        return bool(result["success"] if isinstance(result, dict) else result)

def build_program(conversation, completion):
    """One HumanEval completion's program: the prompt's imports, its first fenced block (else all of it), the tests."""
    imports = []
    for line in conversation["messages"][0]["content"].split("\n"):
        s = line.strip()
        if s.startswith(("import ", "from ")):
            imports.append(s)
        elif s and not s.startswith("#"):
            break
    m = re.search(r"```(?:python)?\s*\n(.*?)\n```", completion, re.DOTALL)
    code = (m.group(1) if m else completion).strip()
    check = f"check({conversation['entry_point']})"
    return "\n".join(imports) + "\n\n" + code + "\n\n" + conversation["test"] + "\n" + check

# --- spelling: spell a word, count a letter in it (the words of WORDS_URL)

@functools.lru_cache(maxsize=1)
def _words():
    path = download_file(WORDS_URL, os.path.join(common.get_base_dir(), "words_alpha.txt"))
    with open(path, encoding="utf-8") as f:
        return [w.strip() for w in f if w.strip()]  # the file has CRLF line endings

def _example_rng(split, i):
    return random.Random(i if split == "train" else 10_000_000 + i)

class SimpleSpelling(Task):
    def __init__(self, size=1000, split="train"):
        words = list(_words())
        random.Random(42).shuffle(words)
        self.words, self.split, self.rows = words, split, range(size)

    def conversation(self, i):
        w = _example_rng(self.split, i).choice(self.words)
        return {"messages": [{"role": "user", "content": f"Spell the word: {w}"},
                             {"role": "assistant", "content": f"{w}:{','.join(w)}"}]}

SPELL_TEMPLATES = [
    "How many {letter} are in the word {word}", "How many {letter}s are in {word}",
    "Count the number of {letter} in {word}", "How many times does the letter {letter} appear in {word}",
    "In the word {word}, how many {letter} are there", "Count how many times {letter} occurs in {word}",
    "What is the count of {letter} in {word}", "Tell me how many {letter} the word {word} has",
    "Number of {letter} in {word}", "How often does {letter} show up in {word}", "Can you count the {letter} in {word}",
    "I need the number of {letter} letters in {word}", "Please count the occurrences of {letter} in the word {word}",
    "How many letter {letter} does {word} contain", "Does {word} have many {letter}? Count them",
    "Spell {word} and count the {letter}", "¿Cuántas {letter} hay en la palabra {word}",
    "¿Cuántas veces aparece la letra {letter} en {word}", "Combien de {letter} y a-t-il dans le mot {word}",
    "Combien de fois la lettre {letter} apparaît-elle dans {word}", "Wie viele {letter} sind im Wort {word}",
    "Wie oft kommt der Buchstabe {letter} in {word} vor", "单词 {word} 中有几个 {letter}",
    "{word} 这个词里有多少个字母 {letter}", "{word}에 {letter}가 몇 개 있나요",
    "단어 {word}에서 글자 {letter}는 몇 번 나오나요", "{word} に {letter} はいくつありますか",
    "単語 {word} の中に文字 {letter} は何回出てきますか",
]

class SpellingBee(_FinalAnswer):
    def __init__(self, size=1000, split="train"):
        self.split, self.rows = split, range(size)

    def conversation(self, i):
        rng = _example_rng(self.split, i)
        word = rng.choice(_words())
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice("abcdefghijklmnopqrstuvwxyz")
        count = word.count(letter)
        template = rng.choice(SPELL_TEMPLATES)
        template = template.lower() if rng.random() < 0.3 else template
        lq, wq = rng.choice(["", "'", '"']), rng.choice(["", "'", '"'])
        user = template.format(letter=f"{lq}{letter}{lq}", word=f"{wq}{word}{wq}") + ("?" if rng.random() < 0.5 else "")
        lines, running = [], 0
        for k, c in enumerate(word, 1):
            running += c == letter
            lines.append(f"{k}:{c}" + (f" <- {letter} #{running}" if c == letter else ""))
        manual = (f"We are asked how many '{letter}' are in '{word}'. Spelling it out:\n{word}:{','.join(word)}\n\n"
                  + "\n".join(lines) + f"\n\nCounting by hand, '{letter}' appears {count} times.\n\n")
        parts = [{"type": "text", "text": manual}, {"type": "text", "text": "Let me double-check with Python.\n\n"},
                 {"type": "python", "text": f"'{word}'.count('{letter}')"},
                 {"type": "python_output", "text": str(count)},
                 {"type": "text", "text": f"\n\nPython agrees: {count}.\n\n#### {count}"}]
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": parts}]}

# --- identity: who the assistant is, generated from our own templates

IDENTITY_TOPICS = [  # (questions, answers)
    (["Who are you?", "What are you?", "Introduce yourself.", "Tell me about yourself.", "What should I call you?"],
     ["I'm nanochat, a small chat model from a from-scratch Python reimplementation of Andrej Karpathy's nanochat "
      "project.",
      "I'm a tiny assistant called nanochat. Everything that made me, from the tokenizer to the training loop, was "
      "rewritten from scratch in plain Python and PyTorch.",
      "My name is nanochat. I'm a small language model built by a from-scratch reimplementation of the nanochat "
      "pipeline."]),
    (["How big are you?", "How many parameters do you have?", "Are you a large model?", "What size is your network?"],
     ["I'm small: a transformer with only a few layers and a few million to a few hundred million parameters, "
      "depending on the run. Big commercial models are thousands of times larger.",
      "Very small. The CPU run that makes me uses about four transformer layers; the largest recipe (depth 20) has "
      "about 560 million parameters.",
      "I'm a tiny model, so expect mistakes: I have far fewer parameters than the assistants you may know."]),
    (["How were you trained?", "How did you learn to chat?", "What training did you go through?",
      "Explain your training."],
     ["In four stages: pretraining on educational web text, midtraining on conversations, supervised finetuning on "
      "chats, and a little reinforcement learning on math problems.",
      "First a BPE tokenizer was trained, then I learned to predict the next token on plain text, then I was "
      "taught the chat format with special tokens, and finally I was finetuned on example conversations.",
      "I was pretrained on a small pile of text, then finetuned on conversations, multiple-choice questions, math "
      "word problems and spelling drills."]),
    (["How much did it cost to train you?", "What was your training budget?", "How long did your training take?",
      "Were you expensive to train?"],
     ["Very little: the small version trains in well under an hour on a laptop-class CPU, and the bigger recipe "
      "takes a few hours on one GPU node.",
      "My budget was tiny. The whole pipeline is designed to run end to end for a few dollars of compute, or for "
      "free on a CPU at a very small size.",
      "Only minutes to hours of compute. That's why I'm much weaker than big models trained for months on "
      "thousands of GPUs."]),
    (["Who made you?", "Who created you?", "Who built you?", "Are you made by OpenAI?"],
     ["I come from a team of engineers who rewrote the nanochat project from scratch. The original nanochat is by "
      "Andrej Karpathy.",
      "I'm not from OpenAI, Google or Anthropic. I'm a small open reimplementation of Andrej Karpathy's nanochat."]),
    (["Are you ChatGPT?", "Are you GPT-4?", "Are you Claude?", "Are you a human?"],
     ["No. I'm nanochat, a small model from a from-scratch reimplementation of nanochat. I'm not ChatGPT, Claude "
      "or a person.",
      "No, I'm a small language model called nanochat, trained on a tiny budget. I can make mistakes, so please "
      "double-check what I say."]),
    (["What can you do?", "What are you good at?", "What are your limitations?", "Can I trust your answers?"],
     ["I can chat, answer simple questions, spell words, count letters and do arithmetic with a small calculator "
      "tool. I'm small, so I often get facts wrong.",
      "Simple conversation, easy questions and small math with my Python calculator. I'm a tiny model: please "
      "verify anything important."]),
    (["What language were you written in?", "What is your code like?", "Is your code open?"],
     ["My pipeline is plain Python with PyTorch, numpy, regex, tiktoken and pyarrow: a tokenizer, a GPT model, "
      "data loaders, a training script, evaluation and a chat server, one file each.",
      "I'm built from a handful of readable Python files, written from scratch in the spirit of nanoGPT."]),
]
GREETINGS = ["", "Hi! ", "Hello. ", "Hey, ", "Quick question: ", "Good morning! "]

class Identity(Task):
    """Short conversations (1-2 exchanges) about what the assistant is; example i is fixed by Random(i)."""

    def __init__(self, size=None):
        self.rows = range(500 if size is None else size)

    def conversation(self, i):
        rng, messages = random.Random(f"identity:{i}"), []
        for turn, (questions, answers) in enumerate(rng.sample(IDENTITY_TOPICS, rng.choice([1, 1, 2]))):
            q = rng.choice(questions)
            q = (rng.choice(GREETINGS) if turn == 0 else "") + (q.lower() if rng.random() < 0.2 else q)
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": rng.choice(answers)}]
        return {"messages": messages}

    def evaluate(self, conversation, completion):
        return "nanochat" in completion.lower()

# --- the user's own conversations (train.py --chat-data)

CHAT_ROLES = ("user", "assistant")

def _chat_problem(row):
    """What is wrong with one conversation, or None: an optional system message, then user and assistant alternating."""
    messages = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(messages, list) or not messages:
        return 'no "messages" list (want {"messages": [{"role": "user", "content": ...}, ...]})'
    start = 1 if isinstance(messages[0], dict) and messages[0].get("role") == "system" else 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or not m["content"].strip():
            return f"message {i + 1} has no text content"
        want = "system" if i < start else CHAT_ROLES[(i - start) % 2]
        if m.get("role") != want:
            return (f"message {i + 1} has role {m.get('role')!r} where {want!r} belongs "
                    f"(user and assistant alternate, user first)")
    if len(messages) - start < 2 or messages[-1]["role"] != "assistant":
        return "the conversation must end with an assistant reply"

class ChatFile(Task):
    """Conversations from a jsonl file, {"messages": [...]} per line, all checked before training's first step."""

    def __init__(self, path):
        self.rows = []
        try:
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            row = json.loads(line)
                        except json.JSONDecodeError as e:
                            raise common.UserError(f"{path}:{n}: not JSON ({e}): one conversation per line") from None
                        if problem := _chat_problem(row):
                            raise common.UserError(f"{path}:{n}: {problem}")
                        self.rows.append(row)
        except (OSError, UnicodeDecodeError) as e:
            raise common.UserError(f"--chat-data {path}: unreadable ({type(e).__name__}: {e})") from None
        if not self.rows:
            raise common.UserError(f"--chat-data {path}: no conversations in it")

# --- mixtures

class TaskMixture:
    """All (task, index) pairs of the tasks, shuffled once with random.Random(seed); a task listed twice: 2 epochs."""

    def __init__(self, tasks, seed=42):
        self.tasks = tasks
        self.index = [(t, i) for t, task in enumerate(tasks) for i in range(len(task))]
        random.Random(seed).shuffle(self.index)

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        t, j = self.index[i]
        return self.tasks[t][j]

TASKS = {  # the chat evaluations (ChatCORE's six tasks): name -> constructor taking size=
    "ARC-Easy": functools.partial(ARC, "ARC-Easy", "test"),
    "ARC-Challenge": functools.partial(ARC, "ARC-Challenge", "test"),
    "MMLU": functools.partial(MMLU, "all", "test"),
    "GSM8K": functools.partial(GSM8K, "test"),
    "HumanEval": HumanEval,
    "SpellingBee": functools.partial(SpellingBee, split="test", size=256),
}

# =============================================================================
# your own corpus: `prepare` writes the user's text as shards in the downloaded layout; nothing else changes

FORMATS = {".txt": "text", ".md": "text", ".jsonl": "jsonl", ".parquet": "parquet"}  # by extension, after .gz / .zst
ROWS_PER_GROUP = 1024             # the downloaded shards' row group
SHARD_CHARS = 250_000_000         # the downloaded shards' size: a new train shard after this many characters
VAL_DOCS_MAX = 10_240             # the default validation set: 10% of the documents, at most this many
PREPARED = "prepared.json"        # in base_data/: these shards are the user's (a download would mix with them)

def _format(path):
    name = path[:-len(ext)] if (ext := os.path.splitext(path)[1]) in (".gz", ".zst") else path
    return FORMATS.get(os.path.splitext(name)[1])

def _input_files(paths, stdin_copy):
    """The files to read, in a fixed order (directories walked sorted); stdin `-` copied to a file, to be read twice."""
    files = []
    for p in paths:
        if p == "-":
            with open(stdin_copy, "wb") as f:
                shutil.copyfileobj(sys.stdin.buffer, f, CHUNK)
            files.append(stdin_copy)
        elif os.path.isdir(p):
            for root, dirs, names in os.walk(p):
                dirs.sort()
                files += [os.path.join(root, n) for n in sorted(names) if _format(n)]
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise common.UserError(f"--input {p}: no such file or directory")
    if not files:
        raise common.UserError(f"--input {' '.join(paths)}: no .txt, .md, .jsonl or .parquet file (or .gz/.zst)")
    return files

def _decode(raw, where, errors):
    if b"\0" in raw:
        raise common.UserError(f"{where}: a NUL byte, so this looks like a binary file: give text files only")
    try:
        return raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise common.UserError(f"{where}: invalid UTF-8 ({e.reason} at byte {e.start}): convert the file to UTF-8, "
                               f"or pass --errors replace to read bad bytes as U+FFFD") from None

def _documents(path, args):
    """Every non-blank document of a file: a jsonl line, a parquet row, a whole text file (or blank-separated block)."""
    fmt, field = _format(path) or "text", args.text_field
    if fmt == "parquet":
        try:
            pf = pq.ParquetFile(path)
        except (OSError, ValueError) as e:
            raise common.UserError(f"{path}: not a readable parquet file ({e})") from None
        kind = pf.schema_arrow.field(field).type if field in pf.schema_arrow.names else pa.null()
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise common.UserError(f"{path}: no text column {field!r} (columns: {', '.join(pf.schema_arrow.names)}): "
                                   f"name the text column with --text-field")
        for batch in pf.iter_batches(columns=[field], batch_size=ROWS_PER_GROUP):
            yield from (t for t in batch.column(0).to_pylist() if t and not t.isspace())
        return
    with io.BufferedReader(pa.input_stream(path, compression="detect")) as f:  # .gz / .zst decompressed as it is read
        if fmt == "text" and not args.split_on_blank_lines:
            text = _decode(f.read(), path, args.errors)
            if not text.isspace():
                yield text
            return
        block = []
        for n, raw in enumerate(f, 1):
            line = _decode(raw, f"{path}:{n}", args.errors)
            if fmt == "text":  # a block of lines ends at a blank line
                if not line.isspace():
                    block.append(line)
                elif block:
                    yield "".join(block).rstrip("\n")
                    block = []
                continue
            if line.isspace():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise common.UserError(f"{path}:{n}: not JSON ({e}): write one JSON object per line") from None
            if not isinstance(row, dict) or field not in row:
                keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                raise common.UserError(f"{path}:{n}: no field {field!r} (has: {keys}): name the text field with "
                                       f"--text-field")
            if not isinstance(row[field], str):
                raise common.UserError(f"{path}:{n}: field {field!r} is {type(row[field]).__name__}, not a string")
            if row[field] and not row[field].isspace():
                yield row[field]
        if block:
            yield "".join(block).rstrip("\n")

class ShardWriter:
    """Documents -> shard_NNNNN.parquet from `index` on, laid out as downloaded; a new one per shard_chars (None: 1)."""

    def __init__(self, folder, index, rows_per_group, shard_chars=None):
        self.folder, self.index, self.rows, self.shard_chars = folder, index, rows_per_group, shard_chars
        self.writer, self.pending, self.chars, self.paths = None, [], 0, []

    def add(self, text):
        self.pending.append(text)
        if len(self.pending) == self.rows:
            self._flush()

    def _flush(self):
        if self.writer is None:
            if self.index == common.VAL_SHARD_INDEX and self.shard_chars:
                raise common.UserError(f"the corpus needs over {common.VAL_SHARD_INDEX} shards: raise --shard-chars")
            self.paths.append(os.path.join(self.folder, f"shard_{self.index:05d}.parquet"))
            self.writer = pq.ParquetWriter(self.paths[-1], pa.schema([("text", pa.string())]), compression="zstd",
                                           compression_level=3, use_dictionary=False, write_statistics=False)
        self.writer.write_table(pa.table({"text": self.pending}), row_group_size=self.rows)
        self.chars, self.pending = self.chars + sum(map(len, self.pending)), []
        if self.shard_chars and self.chars >= self.shard_chars:
            self.close()
            self.index, self.chars = self.index + 1, 0

    def close(self):
        if self.pending:
            self._flush()
        if self.writer is not None:
            self.writer.close()
            self.writer = None

def _rows_per_group(docs):
    return max(1, min(ROWS_PER_GROUP, docs // 8))  # a small set still gets a row group for each of 8 ranks

def _progress(label, docs, t0, last, nbytes=None):
    """A progress line at most once a second -> the time it was printed."""
    if time.time() - last < 1:
        return last
    size = f", {nbytes / 1e6:,.0f} MB" if nbytes else ""
    print(f"\r{label}: {docs:,} documents{size} in {time.time() - t0:.0f} s", end="", flush=True)
    return time.time()

def prepare(args):
    """The user's files -> train shards 0, 1, ... and the validation shard in a new folder, swapped in for base_data/.
    Two streaming passes (count, then write), so memory stays flat in the corpus size; nothing is kept on failure."""
    if args.val_fraction is not None and not 0 < args.val_fraction < 1:
        raise common.UserError(f"--val-fraction must be between 0 and 1, not {args.val_fraction}")
    data_dir = common.shard_dir()
    new, old, stdin_copy = data_dir + ".new", data_dir + ".old", data_dir + ".stdin"
    with common.file_lock(data_dir + ".lock"):
        have = [n for n in os.listdir(data_dir) if n.endswith(".parquet")] if os.path.isdir(data_dir) else []
        if have and not args.replace:
            raise common.UserError(f"{data_dir} already holds {len(have)} shards (downloaded or prepared): pass "
                                   f"--replace to swap them for this corpus")
        shutil.rmtree(new, ignore_errors=True)  # what a killed earlier run left
        shutil.rmtree(old, ignore_errors=True)
        try:
            files = _input_files(args.input, stdin_copy)
            t0, last, n, mb = time.time(), 0, 0, sum(os.path.getsize(p) for p in files) / 1e6
            for path in files:
                for _ in _documents(path, args):  # pass 1: count, and check every file before writing anything
                    n += 1
                    last = _progress("reading", n, t0, last) if n % 1000 == 0 else last
            if n == 0:
                raise common.UserError(f"--input {' '.join(args.input)}: no text in {len(files)} file(s) (empty input)")
            k = args.val_docs if args.val_docs is not None else min(VAL_DOCS_MAX, max(1, n // 10))
            k = round(n * args.val_fraction) if args.val_fraction is not None else k
            if not 1 <= k < n:
                raise common.UserError(f"the corpus has {n:,} documents, too few for a validation set of {k:,} and "
                                       f"at least one train document: add text, lower --val-docs / --val-fraction, or "
                                       f"split long files with --split-on-blank-lines")
            val = set(random.Random(42).sample(range(n), k))  # reproducible: the same corpus gives the same split
            os.makedirs(new)
            train_w = ShardWriter(new, 0, _rows_per_group(n - k), args.shard_chars)
            val_w = ShardWriter(new, common.VAL_SHARD_INDEX, _rows_per_group(k))
            i, chars, last = 0, 0, 0
            for path in files:
                for text in _documents(path, args):  # pass 2: write
                    (val_w if i in val else train_w).add(text)
                    i, chars = i + 1, chars + len(text)
                    last = _progress("writing", i, t0, last, chars) if i % 1000 == 0 else last
            train_w.close()
            val_w.close()
            if i != n:
                raise common.UserError(f"--input {' '.join(args.input)} changed while it was read: run prepare again")
            summary = {"input": args.input, "documents": n, "val_documents": k}
            common.atomic_write_text(os.path.join(new, PREPARED), json.dumps(summary))
            for p in train_w.paths + val_w.paths:  # on disk before the swap
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
            # the swap: a crash between these renames leaves base_data.old, which common.shard_dir puts back
            if os.path.isdir(data_dir):
                os.replace(data_dir, old)
            os.replace(new, data_dir)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(new, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                os.remove(stdin_copy)
    dt = time.time() - t0
    print(f"\rprepared {n:,} documents, {chars:,} characters from {len(files)} file(s), {mb:,.1f} MB, in {dt:.1f} s "
          f"({mb / dt:.1f} MB/s): {len(train_w.paths)} train shard(s) of {n - k:,} documents + the validation shard "
          f"{os.path.basename(val_w.paths[0])} of {k:,} documents in {data_dir}")

# =============================================================================
# CLI

def write_chat_text(path, size=None):
    """SmolTalk train chats as tokenizer-training jsonl, so a small vocab also learns the chats' code and markup."""
    task = SmolTalk("train", size)
    lines = [json.dumps({"text": "\n\n".join(m["content"] for m in task[i]["messages"])}) for i in range(len(task))]
    common.atomic_write_text(path, "\n".join(lines) + "\n")
    print(f"wrote {len(lines):,} conversations, {sum(map(len, lines)) / 1e6:.1f} MB of json, to {path}")

def main():
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--mirror", help="directory or http(s) URL with upstream files at HOST/PATH (NANOCHAT_MIRROR)")
    ap = argparse.ArgumentParser(description="nanochat data: shards (downloaded or your own), chat text, loader bench")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("download", parents=[shared], help="train shards 0..N-1 + validation shard 1822 into base_data/")
    d.add_argument("-n", "--num-shards", type=int, default=8, help="number of train shards (-1: all)")
    d.add_argument("-w", "--workers", type=int, default=4, help="parallel downloads")
    c = sub.add_parser("chat-text", parents=[shared], help="SmolTalk train chats as jsonl: tokenizer.py train --input")
    c.add_argument("-o", "--output", default=None, help="default: $NANOCHAT_BASE_DIR/chat_text.jsonl")
    c.add_argument("-n", "--size", type=int, default=None, help="first N conversations in task order (default: all)")
    r = sub.add_parser("prepare", parents=[shared], help="your own text -> base_data/ train shards + validation shard")
    r.add_argument("--input", nargs="+", required=True, metavar="PATH", help=".txt/.md (a document per file), .jsonl, "
                   ".parquet, each also .gz/.zst; directories (recursively); - for stdin")
    r.add_argument("--text-field", default="text", help="the jsonl field / parquet column holding the text")
    r.add_argument("--split-on-blank-lines", action="store_true", help="text files: a document per blank-line block")
    r.add_argument("--val-docs", type=int, default=None,
                   help="documents in the validation shard (default 10%%, at most 10,240)")
    r.add_argument("--val-fraction", type=float, default=None, help="the validation shard's share of the documents")
    r.add_argument("--errors", choices=["strict", "replace"], default="strict", help="invalid UTF-8: stop, or U+FFFD")
    r.add_argument("--shard-chars", type=int, default=SHARD_CHARS, help="characters per train shard")
    r.add_argument("--replace", action="store_true", help="swap the shards already in base_data/ for these, atomically")
    b = sub.add_parser("bench", parents=[shared], help="loader tokens/s with 1 and 2 tokenizer threads, resume time")
    b.add_argument("--shards", type=int, default=11, help="train shards to use")
    b.add_argument("-B", type=int, default=8)
    b.add_argument("-T", type=int, default=512)
    b.add_argument("--batches", type=int, default=50)
    args = ap.parse_args()
    if args.mirror:
        common.set_mirror(args.mirror)
    if args.cmd == "download":
        try:
            download_shards(args.num_shards, args.workers)
        except KeyboardInterrupt:  # common.run_main exits 130
            print("\ninterrupted: the files fetched so far are kept; the same command fetches the rest",
                  file=sys.stderr)
            raise
    elif args.cmd == "prepare":
        prepare(args)
    elif args.cmd == "chat-text":
        write_chat_text(args.output or os.path.join(common.get_base_dir(), "chat_text.jsonl"), args.size)
    else:
        bench(args)

# ---- benchmarks

def bench(args):
    from tokenizer import get_tokenizer
    tok = get_tokenizer()
    download_shards(args.shards, workers=4)
    print(f"load average before: {os.getloadavg()} ({os.cpu_count()} cores; shared machine)")
    for threads in (1, 2):
        t0 = time.time()
        loader = PretrainLoader(tok, args.B, args.T, threads=threads)
        next(loader)
        t1 = time.time()
        for _ in range(args.batches):
            next(loader)
        dt = time.time() - t1
        print(f"threads={threads}: first batch (buffer of {loader.buffer_docs} docs) {t1 - t0:.2f} s, then "
              f"{args.batches * args.B * args.T / dt:,.0f} tok/s into batches (B={args.B}, T={args.T})")
        loader.close()
    loader = PretrainLoader(tok, args.B, args.T, threads=2)
    while loader.next[0] == 0 and loader.next[1] < 0.8 * len(loader.row_groups):
        next(loader)  # late in the first epoch
    sd = json.loads(json.dumps(loader.state_dict()))
    expected = next(loader)[0]
    loader.close()
    t0 = time.time()
    fresh = PretrainLoader(tok, args.B, args.T, threads=2)
    fresh.load_state_dict(sd)
    got = next(fresh)[0]
    print(f"restore at row group {sd['next'][1]}/{len(loader.row_groups)} ({len(sd['buffer'])} buffered pieces, "
          f"{len(json.dumps(sd)) / 1e3:.1f} kB state): {time.time() - t0:.2f} s to the first batch; "
          f"identical: {torch.equal(expected, got)}")
    fresh.close()
    print(f"load average after: {os.getloadavg()}")

if __name__ == "__main__":
    common.run_main(main)
