"""
Evaluation and the report card, a section each: bits per byte, CORE (base models), the code sandbox, the chat
evaluations (ChatCORE), the report card (report/report.md), then the command line.

    python eval.py --stage base bpb                   train/val bits per byte + greedy samples
    python eval.py --stage base core [--max-per-task N]
    python eval.py --stage sft chat [-a ARC-Easy|GSM8K] [--max-problems N]
    python eval.py --stage sft endings                how many sampled replies end within --max-new-tokens
    python eval.py report reset                       start a run's report (header)
    python eval.py report                             assemble report/report.md (+ loss.svg), copy report.md here

Multi-GPU: torchrun --nproc_per_node=K eval.py ...  (ranks stride over examples; results are all-reduced).
"""
import os
import re
import sys
import csv
import json
import math
import ctypes
import time
import random
import signal
import select
import argparse
import platform
import datetime
import resource
import tempfile
import itertools
import contextlib
import subprocess

import torch
import torch.nn.functional as F

import common
from common import print0
from tokenizer import get_tokenizer, get_token_bytes
from model import Engine, load_model, default_tag
import data

REPO = os.path.dirname(os.path.abspath(__file__))
SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is",
                  "If yesterday was Friday, then tomorrow will be", "The opposite of hot is",
                  "The planets of the solar system are:", "My favorite color is", "If 5*x + 3 = 13, then x is"]

# -----------------------------------------------------------------------------
# bits per byte (a loss that does not depend on the tokenizer's vocabulary) and greedy samples

@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes):
    """Nats over bytes of the targets, in bits. Special-token targets (0 bytes) and ignored targets (-1) count for
    nothing. token_bytes: (V,) int tensor on the model's device (NCCL all-reduces CUDA tensors)."""
    device = token_bytes.device
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    for x, y in itertools.islice(batches, steps):
        loss = model(x, y, loss_reduction="none").reshape(-1).double()  # nats per position
        y = y.reshape(-1).to(device)
        nb = torch.where(y < 0, torch.zeros_like(y), token_bytes[y.clamp(min=0)].to(y.dtype))
        total_nats += (loss.to(device) * (nb > 0)).sum()
        total_bytes += nb.sum()
    nats, num_bytes = common.all_reduce([total_nats.item(), total_bytes.item()], device)  # summed over ranks
    return nats / (math.log(2) * num_bytes) if num_bytes else float("inf")

def greedy_samples(model, tokenizer):
    """Greedy 16-token continuations of SAMPLE_PROMPTS, each printed: what a base model has learned, at a glance."""
    engine, samples = Engine(model, tokenizer), []
    for prompt in SAMPLE_PROMPTS:
        ids = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
        rows, _ = engine.generate_batch(ids, num_samples=1, max_tokens=16, temperature=0.0)
        samples.append(tokenizer.decode(rows[0][1:]))
        print0(samples[-1])
    return samples

# -----------------------------------------------------------------------------
# CORE: few-shot accuracy of a base model on the DCLM bundle's tasks, each centered on its random baseline

def load_core_tasks(bundle_dir):
    """[dict(label, uri, shots, type, delim, baseline)] from core.yaml ("key: value" lists) + eval_meta_data.csv."""
    items = []
    with open(os.path.join(bundle_dir, "core.yaml"), encoding="utf-8") as f:
        for line in f:
            if line.strip() == "-":
                items.append({})
            elif items and line.strip():
                key, value = (part.strip() for part in line.split(":", 1))
                items[-1][key] = json.loads(value) if value.startswith(('"', "[")) else value
    with open(os.path.join(bundle_dir, "eval_meta_data.csv"), encoding="utf-8", newline="") as f:
        baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    tasks = []
    for t in items:
        if t["label"] not in baselines:
            raise common.UserError(f"{bundle_dir}/eval_meta_data.csv has no random baseline for {t['label']} of "
                                   f"core.yaml: the bundle is incomplete; delete it and eval_bundle.zip to fetch both "
                                   f"again")
        tasks.append(dict(label=t["label"], uri=t["dataset_uri"], shots=t["num_fewshot"][0], type=t["icl_task_type"],
                          delim=t.get("continuation_delimiter", " "), baseline=baselines[t["label"]]))
    return tasks

def _fewshot(rows, idx, k):
    """k other rows of the (cropped) list, drawn with the fixed per-example seed; k is capped at what exists."""
    others = [j for j in range(len(rows)) if j != idx]
    return [rows[j] for j in random.Random(1234 + idx).sample(others, min(k, len(others)))]

def build_prompts(row, shots, task_type, delim):
    """The prompt strings of one example: one per choice (MC / schema) or [without, with] (LM)."""
    if task_type == "multiple_choice":
        prefix = "".join(f"{r['query']}{delim}{r['choices'][r['gold']]}\n\n" for r in shots)
        return [f"{prefix}{row['query']}{delim}{c}" for c in row["choices"]]
    if task_type == "schema":
        prefix = "".join(f"{r['context_options'][r['gold']]}{delim}{r['continuation']}\n\n" for r in shots)
        return [f"{prefix}{opt}{delim}{row['continuation']}" for opt in row["context_options"]]
    if task_type == "language_modeling":
        prefix = "".join(f"{r['context'].strip()}{delim}{r['continuation']}\n\n" for r in shots)
        ctx = prefix + row["context"].strip()
        return [(ctx + delim).strip(), ctx + delim + row["continuation"]]
    raise ValueError(f"unknown icl_task_type {task_type!r}")

def scored_spans(token_lists, task_type):
    """(sequences to forward, [(s, e)] spans whose tokens are scored): multiple choice scores each choice after the
    prefix all share, schema the continuation all options share, language modeling the continuation alone."""
    if task_type == "multiple_choice":
        s = len(os.path.commonprefix(token_lists))  # (commonprefix works on any lists, not only paths)
        return token_lists, [(s, len(t)) for t in token_lists]
    if task_type == "schema":
        c = len(os.path.commonprefix([t[::-1] for t in token_lists]))  # common suffix
        return token_lists, [(len(t) - c, len(t)) for t in token_lists]
    without, with_ = token_lists
    if with_[:len(without)] != without:
        raise AssertionError("LM prompt: the tokens without the continuation are not a prefix of those with it")
    return [with_], [(len(without), len(with_))]

def _crop(seqs, spans, max_len):
    """Keep the last max_len tokens of each sequence and shift its span (models with a maximum length)."""
    cuts = [max(0, len(t) - max_len) for t in seqs]
    return [t[c:] for t, c in zip(seqs, cuts)], [(max(1, s - c), e - c) for (s, e), c in zip(spans, cuts)]

def right_pad(seqs, pad_id):
    """Token lists -> (B, T) int64 tensor, right-padded (causal attention: padding never affects real positions)."""
    return torch.nn.utils.rnn.pad_sequence([torch.tensor(t, dtype=torch.long) for t in seqs], batch_first=True,
                                           padding_value=pad_id)

@torch.no_grad()
def score_example(model, seqs, spans, task_type, pad_id, device):
    """Forward the right-padded batch once; -> index of the chosen option (MC/schema) or whether the LM span is exact.
    The head runs on the scored positions only: a ~1,000-token prompt scores a few, so nearly no (B, T, V) logits."""
    ids = right_pad(seqs, pad_id).to(device)
    with common.autocast_ctx(device):
        hidden = model.trunk(ids)  # (B, T, d)
        scored = [(hidden[i, s - 1:e - 1], ids[i, s:e]) for i, (s, e) in enumerate(spans)]  # position p predicts p+1
        logits = model.head(torch.cat([h for h, _ in scored])).float()
    targets = torch.cat([t for _, t in scored])
    if task_type == "language_modeling":
        return bool((logits.argmax(-1) == targets).all().item())
    losses = F.cross_entropy(logits, targets, reduction="none").split([len(t) for _, t in scored])
    means = [l.mean().item() for l in losses]
    return min(range(len(means)), key=means.__getitem__)

def evaluate_task(model, tokenizer, rows, task, device, max_len=None):
    """Accuracy of one CORE task; ranks stride over examples, the correctness vector is summed over ranks."""
    rank, world = common.get_rank(), common.get_world_size()
    bos = tokenizer.get_bos_token_id()
    correct = [0.0] * len(rows)
    for idx in range(rank, len(rows), world):
        row = rows[idx]
        prompts = build_prompts(row, _fewshot(rows, idx, task["shots"]), task["type"], task["delim"])
        seqs, spans = scored_spans(tokenizer.encode(prompts, prepend=bos), task["type"])
        if max_len is not None and max(len(t) for t in seqs) > max_len:
            seqs, spans = _crop(seqs, spans, max_len)
        result = score_example(model, seqs, spans, task["type"], bos, device)
        correct[idx] = float(result if task["type"] == "language_modeling" else result == row["gold"])
    correct = common.all_reduce(correct, device)
    return sum(correct) / max(1, len(rows))

def _model_max_len(model):
    """Longest sequence the model's rotary tables cover (None: unknown, no cropping)."""
    cos = getattr(model, "cos", None)
    return int(cos.shape[1]) if torch.is_tensor(cos) and cos.dim() >= 2 else None

def evaluate_core(model, tokenizer, device, max_per_task=-1, bundle_dir=None):
    """CORE = mean centered accuracy over the tasks of the bundle's core.yaml. -> dict(core, results, centered)."""
    bundle_dir = bundle_dir or data.download_eval_bundle()
    results, centered = {}, {}
    max_len = _model_max_len(model)
    was_training = model.training
    model.eval()
    for task in load_core_tasks(bundle_dir):
        t0 = time.time()
        with open(os.path.join(bundle_dir, "eval_data", task["uri"]), encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        random.Random(1337).shuffle(rows)
        if max_per_task > 0:
            rows = rows[:max_per_task]
        acc = evaluate_task(model, tokenizer, rows, task, device, max_len)
        rb = 0.01 * task["baseline"]
        results[task["label"]], centered[task["label"]] = acc, (acc - rb) / (1.0 - rb)
        print0(f"{task['label']:<35} {task['shots']:>2}-shot {task['type']:<18} n={len(rows):<5} "
               f"acc {acc:.4f} centered {centered[task['label']]:+.4f} ({time.time() - t0:.1f}s)")
    model.train(was_training)
    return dict(core=sum(centered.values()) / max(1, len(centered)), results=results, centered=centered)

def core_csv(out):
    """The per-task table: fixed-width columns, header 'Task, Accuracy, Centered', last row CORE."""
    lines = [f"{'Task':<35}, {'Accuracy':<10}, {'Centered':<10}"]
    lines += [f"{k:<35}, {out['results'][k]:<10.6f}, {out['centered'][k]:<10.6f}" for k in out["results"]]
    lines.append(f"{'CORE':<35}, {'':<10}, {out['core']:<10.6f}")
    return "\n".join(lines) + "\n"

# -----------------------------------------------------------------------------
# sandboxed execution: the programs a model writes for HumanEval run here. On Linux a boundary from the standard
# library alone: the program is pid 1 of a new pid namespace (its whole tree dies with it), in new network (a down
# loopback), mount (all read-only but its temp dir, a small tmpfs; its own /proc) and ipc namespaces, with no new
# privileges, as nobody when root (else in a user namespace of its own). Its output comes back through pipes opened
# before it ran, never a file it could replace. What the kernel refuses is printed once; the guard only stops slips.

_GUARD = r'''
import builtins, faulthandler, os, shutil, subprocess, sys
faulthandler.disable()
builtins.exit = builtins.quit = builtins.help = None
os.environ["OMP_NUM_THREADS"] = "1"
for _n in ("kill system putenv remove removedirs rmdir fchdir setuid fork forkpty killpg rename renames truncate "
           "replace unlink fchmod fchown chmod chown chroot lchflags lchmod lchown getcwd chdir execv execve execvp "
           "execvpe spawnv spawnve spawnvp posix_spawn posix_spawnp popen").split():
    setattr(os, _n, None)
shutil.rmtree = shutil.move = shutil.chown = None
subprocess.Popen = None
for _n in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
    sys.modules[_n] = None
class _NoStdin:
    def _fail(self, *a, **k):
        raise IOError("reading stdin is not allowed in the sandbox")
    read = readline = readlines = __iter__ = fileno = _fail
sys.stdin = _NoStdin()
del _n
'''
NAMESPACES = {"network namespace": 0x40000000, "mount namespace": 0x20000, "pid namespace": 0x20000000,
              "ipc namespace": 0x8000000}  # unshare(2) flags
CLONE_NEWUSER = 0x10000000
NOBODY = 65534  # the uid and gid the program runs as when we are root
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18  # mount(2) flags
MS_RO_REMOUNT = MS_BIND | 32 | 2 | 1  # MS_BIND | MS_REMOUNT | MS_NOSUID | MS_RDONLY
MOUNT_OPTIONS = {"nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024, "nodiratime": 2048,
                 "relatime": 1 << 21}  # a mount's options that its read-only remount must keep
SANDBOX_MAX_FILES = 256  # inodes of the program's tmpfs: files and folders it may create
_warned = set()

def _private_folder(path):
    """The outermost folder on `path` that other users cannot enter (e.g. /root holding a pyenv), or None."""
    parts = path.split(os.sep)
    folders = (os.sep.join(parts[:i]) for i in range(2, len(parts) + 1))
    return next((f for f in folders if not os.stat(f).st_mode & 1), None)

def _mount(libc, source, target, fstype, flags, options=None):
    args = [a if a is None else os.fsencode(a) for a in (source, target, fstype, options)]
    if libc.mount(*args[:3], flags, args[3]):
        raise OSError(ctypes.get_errno(), f"mount {target}")

def _sandbox(tmp, limits, report_fd, prefix, hidden):
    """execute_code's preexec_fn: new namespaces, then a second fork, so the program is pid 1 of its pid namespace."""
    libc, uid, gid = ctypes.CDLL(None, use_errno=True), os.getuid(), os.getgid()
    if uid and libc.unshare(CLONE_NEWUSER) == 0:  # not root: a user namespace of our own grants the rights for the rest
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    made = {name for name, flag in NAMESPACES.items() if libc.unshare(flag) == 0}  # only these may be changed below
    missing = [name for name in NAMESPACES if name not in made]
    pid = os.fork()
    if pid:  # the relay, outside the pid namespace: passes on the exit status; SIGTERM kills the program's namespace
        os.closerange(3, 1 << 16)
        signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGKILL))
        os._exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) & 255)
    if "mount namespace" in made:
        _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)  # nothing done below reaches the host
        program = open(os.path.join(tmp, "program.py"), "rb").read()
        try:  # a tmpfs caps the bytes and files it writes in all; it stays writable when the rest turns read-only
            owner = f",uid={NOBODY},gid={NOBODY}" * (uid == 0)
            _mount(libc, "tmpfs", tmp, "tmpfs", MOUNT_OPTIONS["nosuid"] | MOUNT_OPTIONS["nodev"],
                   f"size={limits[2]},nr_inodes={SANDBOX_MAX_FILES},mode=0700{owner}")
            with open(os.path.join(tmp, "program.py"), "wb") as f:
                f.write(program)
        except OSError:
            missing.append("a cap on the total size and number of its files")
            _mount(libc, tmp, tmp, None, MS_BIND)
        if "pid namespace" in made:
            _mount(libc, "proc", "/proc", "proc", MOUNT_OPTIONS["nosuid"])  # shows the sandbox's processes only
        if hidden:  # cover the private folder (e.g. /root); show through it only the interpreter's prefix
            fd = os.open(prefix, os.O_PATH)
            _mount(libc, "tmpfs", hidden, "tmpfs", 0)
            os.makedirs(prefix, 0o755, exist_ok=True)
            _mount(libc, f"/proc/self/fd/{fd}", prefix, None, MS_BIND | MS_REC)
        for line in open("/proc/self/mountinfo"):
            f = line.split()
            flags = MS_RO_REMOUNT | sum(MOUNT_OPTIONS.get(o, 0) for o in f[5].split(","))
            target = f[4].encode().decode("unicode_escape").encode("latin-1")
            if target != os.fsencode(tmp) and libc.mount(None, target, None, flags, None):
                missing.append(f"read-only {f[4]}")
        os.chdir(tmp)  # the old working directory lies on the mount below the bind
    if uid == 0 and (not hidden or "mount namespace" in made):  # nobody could not reach a hidden interpreter
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: no setuid binary gives rights back
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: dies with the relay
    mem, cpu_s, fsize = limits
    for name, value in (("RLIMIT_AS", mem), ("RLIMIT_DATA", mem), ("RLIMIT_STACK", mem), ("RLIMIT_CPU", cpu_s),
                        ("RLIMIT_FSIZE", fsize), ("RLIMIT_NPROC", 0), ("RLIMIT_CORE", 0)):
        with contextlib.suppress(ValueError, OSError):  # over the hard limit the parent was given: go on without it
            resource.setrlimit(getattr(resource, name), (value, value))
    os.write(report_fd, ", ".join(missing + ["uid nobody"] * (uid == 0 and os.getuid() == 0)).encode())
    os.close(report_fd)

def _read_output(proc, deadline, cap):
    """The program's stdout and stderr -> (out, err, None | "timeout" | "output"), read until the deadline or `cap`."""
    got = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    fds, stop = list(got), None
    while fds:
        exited, left = proc.poll() is not None, deadline - time.monotonic()
        if left <= 0:
            stop = None if exited else "timeout"
            break
        ready = select.select(fds, [], [], 0 if exited else min(left, 0.5))[0]
        if exited and not ready:  # a process it left behind may hold the pipes open: what the program wrote is all here
            break
        for fd in ready:
            chunk = os.read(fd, 1 << 16)
            got[fd] += chunk
            if not chunk:
                fds.remove(fd)
        if sum(map(len, got.values())) > cap:
            stop = "output"
            break
    if not stop:  # it may have closed both pipes and run on (where no relay holds them: not Linux)
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            stop = "timeout"
    out, err = (bytes(b[:cap]).decode("utf-8", "replace") for b in got.values())
    return out, err, stop

def execute_code(code, timeout=5.0, memory_mb=256, fsize_mb=16):
    """Run `code` in a fresh isolated python in a temp dir. -> dict(success, stdout, stderr, error, timeout,
    memory_exceeded). fsize_mb caps each file it writes, all of them together, and its output."""
    result = dict(success=False, stdout="", stderr="", error=None, timeout=False, memory_exceeded=False)
    linux, root, prefix = sys.platform.startswith("linux"), os.getuid() == 0, os.path.realpath(sys.base_prefix)
    with tempfile.TemporaryDirectory(prefix="sandbox_") as tmp:
        tmp = os.path.realpath(tmp)
        path = os.path.join(tmp, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(_GUARD + "\n" + code + "\n")
        if linux and root:
            os.chown(tmp, NOBODY, NOBODY)  # the program runs as nobody: its one writable folder
        report_r, report_w = os.pipe()
        limits = (memory_mb << 20, int(math.ceil(timeout)) + 1, fsize_mb << 20)
        setup = (lambda: _sandbox(tmp, limits, report_w, prefix, root and _private_folder(prefix))) if linux else None
        env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8", "TMPDIR": tmp}
        proc = subprocess.Popen([os.path.realpath(sys.executable), "-I", "-S", path], cwd=tmp, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=setup, start_new_session=True, pass_fds=(report_w,))
        os.close(report_w)
        stop = "interrupted"
        try:
            result["stdout"], result["stderr"], stop = _read_output(proc, time.monotonic() + timeout, limits[2])
        finally:
            if stop:
                proc.terminate()  # the relay kills the program, pid 1 of its namespace, and so all it started
            with contextlib.suppress(subprocess.TimeoutExpired, ProcessLookupError, PermissionError):
                proc.wait(timeout=5)
                os.killpg(proc.pid, signal.SIGKILL)  # its process group too, where there is no pid namespace
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        missing = os.read(report_r, 1 << 16).decode()
        os.close(report_r)
    if missing and missing not in _warned:
        _warned.add(missing)
        print(f"warning: the code sandbox runs without: {missing} (refused here)", file=sys.stderr)
    rc = proc.returncode if proc.returncode < 128 else proc.returncode - 256  # the relay passes signal s on as 256 - s
    result["timeout"] = stop == "timeout" or rc == -signal.SIGXCPU  # the CPU-time limit
    result["memory_exceeded"] = "MemoryError" in result["stderr"]
    result["success"] = rc == 0 and not stop and not result["timeout"]
    if result["timeout"]:
        result["error"] = f"timed out after {timeout}s"
    elif stop == "output":
        result["error"] = f"stopped: more than {fsize_mb} MB of output"
    elif not result["success"]:
        tail = result["stderr"].strip().splitlines()
        result["error"] = tail[-1] if tail else f"exit code {rc}"
    return result

# -----------------------------------------------------------------------------
# chat evaluations: a chat model answers data.TASKS (multiple choice by the likeliest letter, the rest by generating)

CHAT_BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25,  # random guessing's accuracy
                  "GSM8K": 0.0, "HumanEval": 0.0, "SpellingBee": 0.0}

def chatcore(results):
    """Mean over tasks of (acc - baseline) / (1 - baseline)."""
    if not results:
        return float("nan")
    return sum((acc - CHAT_BASELINES[k]) / (1.0 - CHAT_BASELINES[k]) for k, acc in results.items()) / len(results)

def letter_ids(tokenizer, letters):
    ids = [tokenizer.encode(letter) for letter in letters]
    if any(len(t) != 1 for t in ids):
        raise ValueError(f"every answer letter must be a single token: {dict(zip(letters, ids))}")
    return [t[0] for t in ids]

@torch.no_grad()
def predict_letters(model, tokenizer, prompts, letter_lists, device):
    """Right-pad the prompts with BOS, forward once, argmax over the allowed letters at each last real position."""
    logits = model(right_pad(prompts, tokenizer.get_bos_token_id()).to(device))
    return [letters[int(logits[i, len(p) - 1, letter_ids(tokenizer, letters)].argmax())]
            for i, (p, letters) in enumerate(zip(prompts, letter_lists))]

def _task_evaluator(task):
    """HumanEval's programs run in this file's sandbox; the other tasks check the text themselves."""
    if isinstance(task, data.HumanEval):
        return lambda conv, text: task.evaluate(conv, text, execute=execute_code)
    return task.evaluate

def run_categorical(task, model, tokenizer, device, n, batch_size=8):
    max_len = _model_max_len(model)
    mine = list(range(common.get_rank(), n, common.get_world_size()))
    passed = 0
    for b in range(0, len(mine), batch_size):
        convs = [task[i] for i in mine[b:b + batch_size]]
        prompts = [tokenizer.render_for_completion(c)[-(max_len or 0):] for c in convs]  # over-long: keep the end
        preds = predict_letters(model, tokenizer, prompts, [c["letters"] for c in convs], device)
        passed += sum(bool(task.evaluate(c, p)) for c, p in zip(convs, preds))
    return passed

def run_generative(task, engine, tokenizer, device, n, num_samples=1, max_new_tokens=512, temperature=0.0, top_k=50):
    rank = common.get_rank()
    mine = range(rank, n, common.get_world_size())
    max_len = _model_max_len(getattr(engine, "model", None))
    evaluate = _task_evaluator(task)
    passed = 0
    for k, i in enumerate(mine):
        conv = task[i]
        prompt = tokenizer.render_for_completion(conv)
        budget = max_new_tokens if max_len is None else min(max_new_tokens, max_len - len(prompt))  # within the rotary
        if budget <= 0:
            continue  # the prompt alone is longer than the model can read: counted as failed
        seqs, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=budget, temperature=temperature,
                                        top_k=top_k)
        texts = [tokenizer.decode(s[len(prompt):]) for s in seqs]
        passed += any(evaluate(conv, t) for t in texts)
        if rank == 0 and (k + 1) % 10 == 0:
            print(f"\r  {k + 1}/{len(mine)} passed {passed}", end="", flush=True)
    return passed

def run_chat_eval(task_name, model, tokenizer, device, max_problems=None, batch_size=8, num_samples=1,
                  max_new_tokens=512, temperature=0.0, top_k=50, task=None):
    """Accuracy of one chat task (ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval, SpellingBee)."""
    if task is None:
        if task_name not in data.TASKS:
            raise ValueError(f"unknown task {task_name!r}; choose from {sorted(data.TASKS)}")
        task = data.TASKS[task_name]()
    n = len(task) if max_problems is None else min(len(task), max_problems)
    was_training = model.training
    model.eval()
    if task.eval_type == "categorical":
        passed = run_categorical(task, model, tokenizer, device, n, batch_size)
    else:
        passed = run_generative(task, Engine(model, tokenizer), tokenizer, device, n, num_samples, max_new_tokens,
                                temperature, top_k)
    model.train(was_training)
    passed = common.all_reduce([passed], device)[0]
    acc = passed / max(1, n)
    print0(f"\r{task_name}: {int(passed)}/{n} = {acc:.4f}")
    return acc

# -----------------------------------------------------------------------------
# the report card: each stage writes its section (common.write_report_section); `report` assembles them

SUMMARY_METRICS = ["CORE", *CHAT_BASELINES, "ChatCORE"]
SUMMARY_COLUMNS = {"BASE": "base-model-evaluation", "MID": "chat-evaluation-mid", "SFT": "chat-evaluation-sft",
                   "RL": "chat-evaluation-rl"}
GPU_PRICES = {"H100": 3.00, "A100": 1.79, "V100": 0.55}  # $/GPU/hour, for the header's hourly rate
REPORT_MARKER = "<!-- written by `python eval.py report`, which rewrites it -->"  # how it knows a report.md is its own

def _run(cmd):
    try:
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""

def bloat():
    """Characters, lines, files and approx tokens of the repo's py/md/sh/html files."""
    listed = _run(["git", "ls-files", "--cached", "--others", "--exclude-standard"]).splitlines()
    if not listed:  # not a git checkout: top-level files only
        listed = [n for n in os.listdir(REPO) if os.path.isfile(os.path.join(REPO, n))]
    texts = [open(os.path.join(REPO, rel), encoding="utf-8", errors="replace").read() for rel in sorted(set(listed))
             if rel.endswith((".py", ".md", ".sh", ".html")) and os.path.isfile(os.path.join(REPO, rel))]
    chars = sum(map(len, texts))
    return dict(chars=chars, lines=sum(t.count("\n") for t in texts), files=len(texts), tokens=chars // 4)

def report_header():
    now = datetime.datetime.now()
    git = dict(branch=_run(["git", "rev-parse", "--abbrev-ref", "HEAD"]) or "unknown",
               commit=_run(["git", "rev-parse", "--short", "HEAD"]) or "unknown",
               dirty="dirty" if _run(["git", "status", "--porcelain", "--untracked-files=no"]) else "clean",
               message=_run(["git", "log", "-1", "--pretty=%s"])[:80])
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024 ** 3 if hasattr(os, "sysconf") else 0.0
    gpus, vram, rate = "none", 0.0, 0.0
    if torch.cuda.is_available():
        n, name = torch.cuda.device_count(), torch.cuda.get_device_name(0)
        gpus = f"{n}x {name}"
        vram = sum(torch.cuda.get_device_properties(i).total_memory for i in range(n)) / 1024 ** 3
        rate = n * next((p for k, p in GPU_PRICES.items() if k in name), 2.00)
    b = bloat()
    lines = ["# nanochat training report", "", f"Generated: {now.isoformat(timespec='seconds')}", "",
             "## Environment", "", "### Git", f"- Branch: {git['branch']}",
             f"- Commit: {git['commit']} ({git['dirty']})", f"- Message: {git['message']}", "",
             "### Hardware", f"- Platform: {platform.platform()}", f"- CPUs: {os.cpu_count()} logical",
             f"- Memory: {mem_gb:.1f} GB", f"- GPUs: {gpus}", f"- GPU memory: {vram:.1f} GB",
             f"- CUDA: {torch.version.cuda or 'none'}", f"- Hourly rate: ${rate:.2f}/hour", "",
             "### Software", f"- Python: {platform.python_version()}", f"- PyTorch: {torch.__version__}", "",
             "### Bloat", f"- Characters: {b['chars']:,}", f"- Lines: {b['lines']:,}", f"- Files: {b['files']:,}",
             f"- Tokens (approx): {b['tokens']:,}", "", f"Run started: {now.isoformat(timespec='seconds')}", ""]
    return "\n".join(lines)

def report_reset():
    """Delete the previous run's sections, logs and report; write header.md."""
    rdir = common.report_dir()
    for name in os.listdir(rdir):
        if name.endswith((".md", "_log.jsonl", ".svg")):
            os.remove(os.path.join(rdir, name))
    common.atomic_write_text(os.path.join(rdir, "header.md"), report_header())
    print0(f"report reset: {os.path.join(rdir, 'header.md')}")

def _section_values(text):
    """'- key: value' lines of a section -> {key: value string}."""
    return {m.group(1).strip(): m.group(2).strip() for m in re.finditer(r"^- ([^:\n]+): (.*)$", text, re.M)}

def _timestamps(text):
    return [datetime.datetime.fromisoformat(t) for t in re.findall(r"^timestamp: (\S+)", text, re.M)]

def _json_or_none(line):
    try:
        return json.loads(line)
    except ValueError:
        return None

def read_logs(rdir):
    """{stage: records}; a line a killed run left half-written is skipped with a note."""
    logs = {}
    for stage in ("base", "mid", "sft", "rl"):
        path = os.path.join(rdir, f"{stage}_log.jsonl")
        if os.path.exists(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                records = [_json_or_none(line) for line in f if line.strip()]
            logs[stage] = [r for r in records if isinstance(r, dict)]
            if len(logs[stage]) < len(records):
                print0(f"note: skipped {len(records) - len(logs[stage])} unreadable line(s) of {path} (a run cut off "
                       "while writing it)")
    return logs

STAGE_COLORS = {"base": "#1f77b4", "mid": "#ff7f0e", "sft": "#2ca02c", "rl": "#d62728"}

def loss_svg(logs, width=720, panel_h=220):
    """Two panels (train loss, val bpb) with the stages side by side along x; plain SVG, no dependencies."""
    pad_l, pad_r, pad_t, gap = 60, 20, 30, 50
    height = pad_t + 2 * panel_h + gap + 40
    stages = [s for s in logs if logs[s]]
    starts = list(itertools.accumulate((len(logs[s]) for s in stages), initial=0))  # x range by record count
    offsets, total = dict(zip(stages, starts)), starts[-1]
    X = lambda i: pad_l + (width - pad_l - pad_r) * i / max(1, total - 1)  # x of record i
    y_scale = lambda y0, lo, hi: lambda v: y0 + panel_h - panel_h * (v - lo) / (hi - lo)  # panel at y0 shows lo..hi
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           f'font-family="sans-serif" font-size="11">', f'<rect width="{width}" height="{height}" fill="white"/>']
    for p, (key, title) in enumerate((("train_loss", "train loss"), ("val_bpb", "val bpb"))):
        y0 = pad_t + p * (panel_h + gap)
        pts = {s: [(offsets[s] + i, r[key]) for i, r in enumerate(logs[s])
                   if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])] for s in stages}
        vals = [v for s in stages for _, v in pts[s]]
        lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
        hi = hi if hi > lo else lo + 1.0
        Y = y_scale(y0, lo, hi)
        out.append(f'<rect x="{pad_l}" y="{y0}" width="{width - pad_l - pad_r}" height="{panel_h}" fill="none" '
                   'stroke="#888"/>')
        out.append(f'<text x="{pad_l}" y="{y0 - 8}" font-weight="bold">{title}</text>')
        for v in (lo, (lo + hi) / 2, hi):
            out.append(f'<text x="{pad_l - 6}" y="{Y(v) + 4:.1f}" text-anchor="end">{v:.3f}</text>')
        for s in stages:
            if len(pts[s]) > 1:
                line = " ".join(f"{X(i):.1f},{Y(v):.1f}" for i, v in pts[s])
                out.append(f'<polyline fill="none" stroke="{STAGE_COLORS[s]}" stroke-width="1.5" points="{line}"/>')
            if len(pts[s]) <= 40:  # sparse series (val bpb), or a lone point: mark the measured points
                r = 3 if len(pts[s]) == 1 else 2.5
                out.extend(f'<circle cx="{X(i):.1f}" cy="{Y(v):.1f}" r="{r}" fill="{STAGE_COLORS[s]}"/>'
                           for i, v in pts[s])
            out.append(f'<text x="{X(offsets[s]) + 4:.1f}" y="{y0 + 14}" fill="{STAGE_COLORS[s]}">{s}</text>')
        if not vals:
            out.append(f'<text x="{width / 2}" y="{y0 + panel_h / 2}" text-anchor="middle" fill="#888">no data</text>')
    out.append(f'<text x="{width / 2}" y="{height - 10}" text-anchor="middle">logged step (stages in order)</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"

def report_generate(copy_to=None):
    """Assemble report/report.md: header, every section in stage order, the summary table, wall clock, loss curve."""
    rdir = common.report_dir()
    texts = {n[:-3]: open(os.path.join(rdir, n), encoding="utf-8").read() for n in os.listdir(rdir)
             if n.endswith(".md") and n != "report.md"}
    order = [s for s in common.REPORT_SECTIONS if s in texts]
    extra = sorted((s for s in texts if s not in common.REPORT_SECTIONS),
                   key=lambda s: (_timestamps(texts[s]) or [datetime.datetime.max])[0])  # in the order written
    parts = [texts[s].rstrip() + "\n" for s in order + extra]
    if "header" not in texts:
        parts.insert(0, "# nanochat training report\n\n(no header: run `python eval.py report reset` at the start "
                        "of a run)\n")
    # summary table
    values = {col: _section_values(texts.get(slug, "")) for col, slug in SUMMARY_COLUMNS.items()}
    rows = ["| Metric | BASE | MID | SFT | RL |", "|---|---|---|---|---|"]
    for m in SUMMARY_METRICS:
        cells = [values[c].get(m, "-") if (m == "CORE") == (c == "BASE") else "-" for c in SUMMARY_COLUMNS]
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    header_bloat = [line for line in texts.get("header", "").splitlines()
                    if line.startswith(("- Characters", "- Lines", "- Files", "- Tokens"))]
    summary = ["## Summary", "", *header_bloat, "", *rows, ""]
    started = re.search(r"^Run started: (\S+)", texts.get("header", ""), re.M)
    stamps = [t for s in texts for t in _timestamps(texts[s])]
    if started and stamps:
        secs = (max(stamps) - datetime.datetime.fromisoformat(started.group(1))).total_seconds()
        summary.append(f"Total wall clock time: {int(secs // 3600)}h{int(secs % 3600 // 60)}m")
    else:
        summary.append("Total wall clock time: unknown")
    logs = read_logs(rdir)
    common.atomic_write_text(os.path.join(rdir, "loss.svg"), loss_svg(logs))
    summary += ["", "## Loss curves", "", "![loss curves](loss.svg)", ""]
    report = REPORT_MARKER + "\n" + "\n".join(parts) + "\n" + "\n".join(summary) + "\n"
    path = os.path.join(rdir, "report.md")
    common.atomic_write_text(path, report)
    copy = copy_to and os.path.join(copy_to, "report.md")
    if copy and os.path.exists(copy) and not open(copy, errors="replace").readline().startswith(REPORT_MARKER):
        raise common.UserError(f"{path} is written, but {copy} was not written by `eval.py report` and stays as it is: "
                               "move it away to get the copy (or run from another folder)")
    if copy:  # the copy points at the picture where it lies
        common.atomic_write_text(copy, report.replace("](loss.svg)", f"]({os.path.join(rdir, 'loss.svg')})"))
    print0(f"report written: {path}" + (f" (copied to {copy})" if copy else ""))
    return report

# -----------------------------------------------------------------------------
# command line

def cmd_core(args, model, meta, tokenizer, device):
    t0 = time.time()
    out = evaluate_core(model, tokenizer, device, max_per_task=args.max_per_task)
    print0(f"CORE: {out['core']:.4f} ({len(out['results'])} tasks, {time.time() - t0:.1f}s)")
    if common.get_rank() == 0:
        name = f"{args.stage}_{args.tag}_{int(meta.get('step') or 0):06d}.csv"
        path = os.path.join(common.get_base_dir(), "base_eval", name)
        common.atomic_write_text(path, core_csv(out))
        print0(f"per-task results: {path}")
    summary = {"Model": f"{args.stage} step {meta.get('step')}", "CORE": out["core"], "tasks": len(out["results"]),
               "max per task": args.max_per_task}
    common.write_report_section("base-model-evaluation", [summary, out["centered"]])

def cmd_bpb(args, model, meta, tokenizer, device):
    T = model.config.sequence_len
    world = common.get_world_size()
    steps = max(1, args.eval_tokens // (args.device_batch_size * T * world))
    token_bytes = get_token_bytes(device=device, tokenizer=tokenizer)
    bpb = {}
    for split in ("train", "val"):
        loader = data.PretrainLoader(tokenizer, args.device_batch_size, T, split=split, device=device,
                                     rank=common.get_rank(), world_size=world)
        bpb[split] = evaluate_bpb(model, loader, steps, token_bytes)
        loader.close()  # stop its tokenizing thread
        print0(f"{split} bpb: {bpb[split]:.4f}")
    samples = greedy_samples(model, tokenizer) if common.get_rank() == 0 else []
    tokens = steps * args.device_batch_size * T * world
    summary = {"train bpb": bpb["train"], "val bpb": bpb["val"], "tokens per split": tokens}
    common.write_report_section("base-model-loss", [summary, "", "Samples:",
                                                    *[f"- {json.dumps(s, ensure_ascii=False)}" for s in samples]])

def cmd_chat(args, model, meta, tokenizer, device):
    names = args.task_name.split("|") if args.task_name else list(CHAT_BASELINES)
    if unknown := [n for n in names if n not in CHAT_BASELINES]:
        raise common.UserError(f"-a/--task-name: unknown chat task(s) {unknown}; choose from "
                               f"{'|'.join(CHAT_BASELINES)}")
    results = {}
    for name in names:
        t0 = time.time()
        results[name] = run_chat_eval(name, model, tokenizer, device, args.max_problems, args.batch_size,
                                      args.num_samples, args.max_new_tokens, args.temperature, args.top_k)
        print0(f"{name} took {time.time() - t0:.1f}s")
    path = os.path.join(common.report_dir(), f"chat-evaluation-{args.stage}.md")  # keep the rows of tasks not run now
    kept = _section_values(open(path, encoding="utf-8").read()) if os.path.exists(path) else {}
    section = {k: results[k] if k in results else float(kept[k]) for k in CHAT_BASELINES if k in results or k in kept}
    if set(section) == set(CHAT_BASELINES):
        section["ChatCORE"] = chatcore(section)
        print0(f"ChatCORE: {section['ChatCORE']:.4f}")
    settings = {"source": args.stage, "max problems": args.max_problems or "all"}
    common.write_report_section(f"chat-evaluation-{args.stage}", [settings, section])

def cmd_endings(args, model, meta, tokenizer, device):
    """How many SmolTalk-test prompts get a reply (sampled as chat.py does) that ends within --max-new-tokens."""
    engine = Engine(model, tokenizer)
    end = tokenizer.encode_special("<|assistant_end|>")
    task = data.SmolTalk("test", size=args.num_prompts)
    finished, lengths = 0, []
    for i in range(len(task)):
        prompt = tokenizer.render_for_completion(task[i])
        length = 0
        for column, _ in engine.generate(prompt, num_samples=1, max_tokens=args.max_new_tokens,
                                         temperature=args.temperature, top_k=args.top_k, seed=i):
            length += 1
            if column[0] == end:
                finished += 1
                break
        lengths.append(length)
    print0(f"replies ending with <|assistant_end|> within {args.max_new_tokens} tokens: {finished}/{len(task)} "
           f"(mean reply length {sum(lengths) / len(lengths):.0f} tokens)")
    common.write_report_section("reply-endings", {"source": args.stage, "prompts": len(task), "finished": finished,
                                                  "max new tokens": args.max_new_tokens,
                                                  "temperature": args.temperature})

def main(argv=None):
    p = argparse.ArgumentParser(description="CORE, bits per byte, chat evaluations and the report card")
    p.add_argument("command", choices=["core", "bpb", "chat", "endings", "report"])
    p.add_argument("action", nargs="?", choices=["reset", "generate"],
                   help="report only: reset starts a run, default assembles report.md")
    p.add_argument("--stage", "-i", "--source", dest="stage", choices=list(common.CHECKPOINT_DIRS), default=None,
                   help="checkpoint stage (core/bpb: base, chat: sft)")
    p.add_argument("--tag", "-g", default=None, help="checkpoint tag (default: largest d<N>)")
    p.add_argument("--step", "-s", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--device", default=None, help="cuda|cpu (default: autodetect)")
    p.add_argument("--max-per-task", type=int, default=-1, help="core: examples per task (-1 = all)")
    p.add_argument("--device-batch-size", type=int, default=32, help="bpb: rows per forward")
    p.add_argument("--eval-tokens", type=int, default=20 * 524288, help="bpb: tokens per split")
    p.add_argument("-a", "--task-name", default=None, help="chat: tasks separated by | (default: all six)")
    p.add_argument("--max-problems", type=int, default=None, help="chat: problems per task")
    p.add_argument("--batch-size", type=int, default=8, help="chat: categorical batch size")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", "-t", type=float, default=0.0)
    p.add_argument("--top-k", "-k", type=int, default=50)
    p.add_argument("--num-prompts", type=int, default=50, help="endings: SmolTalk test prompts to answer")
    args = p.parse_args(argv)
    common.report_dir()  # a base dir we cannot write fails now, not after the evaluation
    if args.command == "report":
        report_reset() if args.action == "reset" else report_generate(copy_to=os.getcwd())
        return
    if args.action:
        p.error(f"'{args.action}' only goes with the report command")
    if args.max_problems is not None and args.max_problems < 1:
        raise common.UserError(f"--max-problems must be at least 1 (or left out for all), not {args.max_problems}")
    args.stage = args.stage or ("sft" if args.command == "chat" else "base")
    args.tag = args.tag or default_tag(common.checkpoint_dir(args.stage))  # the one load_model takes; names core's CSV
    ddp, rank, local_rank, world, device = common.init_runtime(args.device)
    try:
        tokenizer = get_tokenizer()
        model, meta = load_model(args.stage, device, tag=args.tag, step=args.step, tokenizer=tokenizer)
        command = {"core": cmd_core, "bpb": cmd_bpb, "chat": cmd_chat, "endings": cmd_endings}[args.command]
        command(args, model, meta, tokenizer, device)
    finally:
        common.cleanup_runtime()

if __name__ == "__main__":
    common.run_main(main)
