"""
The small bottom layer every script may import: where artifacts live, the download mirror, distributed ranks, locks,
atomic file writes, pretraining shard iteration and the report writer. Imports nothing else of ours.
"""
import os
import re
import sys
import json
import time
import fcntl
import socket
import datetime
import contextlib
import urllib.parse

class UserError(SystemExit):
    """A bad input or broken file, in one line naming it and the fix. Uncaught, Python prints the message and exits 1
    with no traceback, so every entry point (and every torchrun rank) reports it without a handler of its own."""
    def __init__(self, message):
        super().__init__("error: " + " ".join(message.split()))  # one line, whatever a quoted library error holds

def run_main(main):
    """Every script's entry point: a missing file prints as one UserError line (no traceback); Ctrl-C exits 130."""
    try:
        main()
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    except KeyboardInterrupt:
        sys.exit(130)

# -----------------------------------------------------------------------------
# where things live

def get_base_dir():
    """$NANOCHAT_BASE_DIR, else ~/.cache/nanochat; created on demand."""
    base = os.path.abspath(os.environ.get("NANOCHAT_BASE_DIR") or os.path.expanduser("~/.cache/nanochat"))
    try:
        os.makedirs(base, exist_ok=True)
    except OSError as e:  # a file of that name, a folder we may not create
        raise UserError(f"NANOCHAT_BASE_DIR={base} cannot be used as a folder ({e.strerror}): "
                        "point NANOCHAT_BASE_DIR at a folder (created if missing)") from None
    return base

def writable(folder):
    """`folder`, created, or a UserError naming NANOCHAT_BASE_DIR. Only writers ask: readers cope with read-only."""
    try:
        os.makedirs(folder, exist_ok=True)
        ok = os.access(folder, os.W_OK | os.X_OK)
    except OSError:
        ok = False
    if not ok:
        raise UserError(f"{folder} is not writable: give yourself write access to NANOCHAT_BASE_DIR={get_base_dir()}, "
                        "or point NANOCHAT_BASE_DIR at a folder you can write")
    return folder

CHECKPOINT_DIRS = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints",
                   "rl": "chatrl_checkpoints"}  # training stage -> checkpoint folder under the base dir

def checkpoint_dir(stage, tag=None):
    root = os.path.join(get_base_dir(), CHECKPOINT_DIRS[stage])
    return root if tag is None else os.path.join(root, tag)

# -----------------------------------------------------------------------------
# the download mirror: https://HOST/PATH  ->  MIRROR/HOST/<PATH url-decoded>

_mirror = None  # resolved once; a local directory (absolute) or an http(s) base URL

def set_mirror(value):
    """Resolve a mirror (directory or http(s) base URL) once, so later chdirs do not change it."""
    global _mirror
    if not value:
        _mirror = None
    elif value.startswith(("http://", "https://")):
        _mirror = value.rstrip("/")
    else:
        _mirror = os.path.abspath(os.path.expanduser(value))
    os.environ["NANOCHAT_MIRROR"] = _mirror or ""  # child processes (torchrun workers) see the resolved value

def get_mirror():
    return _mirror

set_mirror(os.environ.get("NANOCHAT_MIRROR"))

def resolve_url(url):
    """Where to fetch `url` from: the URL itself, a local file path in a mirror directory, or the mirror's http URL."""
    if _mirror is None:
        return url
    u = urllib.parse.urlsplit(url)
    if _mirror.startswith(("http://", "https://")):
        return f"{_mirror}/{u.netloc}{u.path}"
    return os.path.join(_mirror, u.netloc, urllib.parse.unquote(u.path).lstrip("/"))

# -----------------------------------------------------------------------------
# ranks and devices

def dist_info():
    """(is_ddp, rank, local_rank, world_size) from torchrun's environment variables."""
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1

def get_rank():
    return dist_info()[1]

def get_world_size():
    return dist_info()[3]

def print0(*args, **kwargs):
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)

def autodetect_device():
    import torch  # torch is imported lazily: the tokenizer's forked workers should not carry it
    return "cuda" if torch.cuda.is_available() else "cpu"

def init_runtime(device=None, seed=42):
    """Device, torchrun's process group (NCCL on GPU, gloo on CPU), seed -> (ddp, rank, local_rank, world, device)"""
    import torch
    import torch.distributed as dist
    ddp, rank, local_rank, world = dist_info()
    device = device or autodetect_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
    if device == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if ddp and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    torch.manual_seed(seed)
    return ddp, rank, local_rank, world, device

def all_reduce(values, device, op=None):
    """A list of numbers summed (or reduced with `op`) over ranks; unchanged without a process group."""
    import torch
    import torch.distributed as dist
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()

def cleanup_runtime():
    """Leave the process group and release the locks this process still holds."""
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
    for path in list(_held):
        release_lock(path)

def autocast_ctx(device):
    """bf16 autocast on CUDA, plain fp32 elsewhere."""
    if str(device).startswith("cuda"):
        import torch
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()

# -----------------------------------------------------------------------------
# locks: an flock on <path> (the kernel drops it however its process ends) and a line in the file naming the owner

_held = {}  # lock path -> file descriptor whose flock this process holds

def take_lock(path, busy=None, stop=None):
    """Hold the lock `path` until release_lock(path). A leftover file (crash, kill -9, disk full) is taken over with a
    one-line note. A live holder: busy=None waits for it (saying once who it is; Ctrl-C or the threading.Event `stop`
    ends the wait with KeyboardInterrupt), a string raises UserError naming the holder, then that string."""
    told = False
    while True:
        try:
            fd, new = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            try:
                fd, new = os.open(path, os.O_RDWR), False
            except FileNotFoundError:
                continue  # released in between
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a process still starting"
            os.close(fd)
            if busy is not None:
                raise UserError(f"{path} is held by {owner}: {busy}") from None
            if not told:
                print(f"waiting for {path}: held by {owner}", file=sys.stderr, flush=True)
                told = True
            if stop is not None and stop.is_set():
                raise KeyboardInterrupt from None
            time.sleep(0.2)
            continue
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # its holder released (removed) it between our open and flock
            os.close(fd)
            continue
        if not new:
            owner = os.pread(fd, 200, 0).decode(errors="replace").strip()
            gone = f"{owner} held it and has ended" if owner else "an empty lock left by a crash"
            print(f"note: taking over {path}: {gone}", file=sys.stderr, flush=True)
            os.ftruncate(fd, 0)
        with contextlib.suppress(OSError):  # a full disk may refuse the line; the flock itself still holds
            me = f"pid {os.getpid()} on {socket.gethostname()} since {datetime.datetime.now():%Y-%m-%d %H:%M:%S}"
            os.pwrite(fd, me.encode(), 0)
        _held[path] = fd
        return

def release_lock(path):
    fd = _held.pop(path)
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)  # before the flock goes, so whoever gets the flock next finds a fresh file
    os.close(fd)

@contextlib.contextmanager
def file_lock(path, busy=None, stop=None):
    take_lock(path, busy, stop)
    try:
        yield
    finally:
        release_lock(path)

# -----------------------------------------------------------------------------
# atomic writes: write a temp file beside the target, flush + fsync, rename over it

def remove_stray_temps(folder, prefix=""):
    """Delete <folder>/<prefix>*.tmp<pid> files whose writer is no longer running (a kill -9 during atomic_write)."""
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        path = os.path.join(folder, name)
        if (m := re.fullmatch(re.escape(prefix) + r".*\.tmp(\d+)", name)) and os.path.isfile(path):
            try:
                os.kill(int(m.group(1)), 0)
            except (ProcessLookupError, OverflowError):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
            except OSError:
                pass  # running under another user: not ours to judge

def atomic_write(path, write_fn, mode="wb"):
    """write_fn(f) on a temp file renamed over `path`: a crash leaves the old file (a kill -9's temp goes later)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_stray_temps(folder, os.path.basename(path))
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def atomic_write_text(path, text):
    atomic_write(path, lambda f: f.write(text), mode="w")

# -----------------------------------------------------------------------------
# pretraining shards: base_data/shard_NNNNN.parquet; shard 1822 (the dataset's last) is always validation

SHARD_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_{:05d}.parquet"
VAL_SHARD_INDEX = 1822

def shard_path(index):
    return os.path.join(get_base_dir(), "base_data", f"shard_{index:05d}.parquet")

def shard_dir():
    """base_data/, put back from base_data.old if `data.py prepare --replace` was killed between its two renames."""
    path = os.path.join(get_base_dir(), "base_data")
    if not os.path.isdir(path) and os.path.isdir(path + ".old"):
        os.replace(path + ".old", path)
    return path

def list_shards(split):
    """Sorted shard paths of a split: 'val' = the fixed validation shard, 'train' = every other shard on disk."""
    data_dir = shard_dir()
    names = os.listdir(data_dir) if os.path.isdir(data_dir) else []
    names = sorted(n for n in names if n.startswith("shard_") and n.endswith(".parquet"))
    val_name = os.path.basename(shard_path(VAL_SHARD_INDEX))
    paths = [os.path.join(data_dir, n) for n in names if (n == val_name) == (split == "val")]
    if not paths:
        raise FileNotFoundError(f"no {split} shards in {data_dir}: run `python data.py download -n 8` first")
    return paths

@contextlib.contextmanager
def shard_errors(path):
    """pyarrow's error about an unreadable shard (ArrowInvalid is a ValueError) -> one line naming it and the repair."""
    try:
        yield
    except (OSError, ValueError) as e:
        n = 1 if path == shard_path(VAL_SHARD_INDEX) else int(os.path.basename(path)[6:-8]) + 1  # shard_NNNNN.parquet
        raise UserError(f"{path} is unreadable ({type(e).__name__}: {e}): "
                        f"repair it with `python data.py download -n {n}`") from None

_null_files = set()  # files whose null texts were already reported

def parquet_texts(path, row_group=None):
    """The 'text' column of one row group (None: all) of a parquet file as a list of str, nulls skipped (told once)."""
    import pyarrow.parquet as pq
    pf = pq.ParquetFile(path)
    texts = []
    for rg in range(pf.num_row_groups) if row_group is None else [row_group]:
        column = pf.read_row_group(rg, columns=["text"]).column("text")
        if column.null_count and path not in _null_files:
            _null_files.add(path)
            print(f"warning: {path}: skipping documents whose text is null ({column.null_count} in row group {rg}; "
                  "later ones silently)", file=sys.stderr, flush=True)
        texts += column.drop_null().to_pylist()
    return texts

def iter_row_groups(split, start=0, step=1):
    """Yield (file_index, row_group_index, list_of_texts) for row groups start, start+step, ... of every shard."""
    import pyarrow.parquet as pq
    for fi, path in enumerate(list_shards(split)):
        with shard_errors(path):
            for rg in range(start, pq.ParquetFile(path).num_row_groups, step):
                yield fi, rg, parquet_texts(path, rg)

def iter_documents(split, start=0, step=1):
    """Every document of a split, in order (row groups strided by start/step)."""
    for _, _, texts in iter_row_groups(split, start, step):
        yield from texts

# -----------------------------------------------------------------------------
# the report: report/<slug>.md per section, report/<stage>_log.jsonl per stage (rank 0 writes)

def report_dir():
    return writable(os.path.join(get_base_dir(), "report"))

def _format_value(v):
    if isinstance(v, float):
        return f"{v:.4f}"
    return f"{v:,}" if isinstance(v, int) and abs(v) >= 10_000 else str(v)  # bools are ints below 10,000

def slug(title):
    return title.lower().replace(" ", "-")

# slug -> title of every section, in the order report.md shows them (header.md is eval.py's, written whole)
REPORT_SECTIONS = {slug(title): title for title in ("Header", "Tokenizer training", "Tokenizer evaluation",
    "Base model training", "Base model loss", "Base model evaluation", "Midtraining", "Chat evaluation mid", "Chat SFT",
    "Chat evaluation sft", "Chat RL", "Chat evaluation rl", "Reply endings")}
TRAINING_SECTIONS = {"base": "base-model-training", "mid": "midtraining", "sft": "chat-sft", "rl": "chat-rl"}

def write_report_section(section, data):
    """report/<section>.md: '## Title', 'timestamp: ...', then '- key: value' per dict in `data`, str items as is."""
    if get_rank() != 0:
        return
    title = REPORT_SECTIONS[section]
    lines = [f"## {title}", f"timestamp: {datetime.datetime.now().isoformat(timespec='seconds')}", ""]
    for item in (data if isinstance(data, list) else [data]):
        lines += [item] if isinstance(item, str) else [f"- {k}: {_format_value(v)}" for k, v in item.items()]
    atomic_write_text(os.path.join(report_dir(), f"{section}.md"), "\n".join(lines) + "\n")

def append_log(stage, record):
    """Append one JSON line to report/<stage>_log.jsonl (the source of the loss curves)."""
    if get_rank() != 0:
        return
    with open(os.path.join(report_dir(), f"{stage}_log.jsonl"), "ab+") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 1))
        cut = f.read(1) not in (b"", b"\n")  # after a line a killed run left half-written: a line of its own
        f.write((cut * "\n" + json.dumps(record) + "\n").encode())
