"""
Training, all four stages in one file (SPEC 3, 4, 6, 7, 8):

    python train.py --stage=base --depth=4 ...                  # pretraining on the parquet shards
    python train.py --stage=mid                                 # chat format, MC, tools (from base)
    python train.py --stage=sft                                 # completion-only finetuning (from mid)
    python train.py --stage=rl                                  # GSM8K REINFORCE with a group-mean baseline (from sft)
    torchrun --nproc_per_node=8 train.py --stage=base --depth=20  # DDP; --nnodes/--node_rank for several machines

Optimizers: Muon for every matrix inside the transformer blocks, AdamW for wte and lm_head. The model is never wrapped in
DDP: under torch.distributed the optimizers average the gradients themselves (reduce-scatter -> the owning rank updates
and alone keeps the state -> all-gather), so optimizer state is sharded across ranks.
"""
import sys
import json
import math
import time
import random
import argparse
import resource
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist

import common
from common import print0
import tokenizer as tok_lib
import model as model_lib
import data
import eval as nc_eval

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # quintic Newton-Schulz coefficients (a, b, c) of the release
CPU_COMPILE_DEFAULT = 1                # measured: ~1.5x faster steps at depth 4/8 (seq 512) for a ~70-90 s cold compile; tests pass 0
SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then tomorrow will be",
                  "The opposite of hot is", "The planets of the solar system are:", "My favorite color is", "If 5*x + 3 = 13, then x is"]
PEAK_BF16_FLOPS = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("B200", 2.25e15),
                   ("A100", 312e12), ("L40S", 362e12), ("4090", 165.2e12), ("3090", 71e12), ("A10", 125e12)]  # dense, per GPU
REPORT_TITLES = {"base": "Base model training", "mid": "Midtraining", "sft": "Chat SFT", "rl": "Chat RL"}
SOURCE_STAGE = {"mid": "base", "sft": "mid", "rl": "sft"}
# flags left at None take their stage's default (release values: SPEC 4.1, 6.1, 7.1, 8)
STAGE_DEFAULTS = {
    "base": dict(device_batch_size=32, total_batch_size=524288, eval_every=250, eval_tokens=20 * 524288, save_every=-1, init_lr_frac=1.0),
    "mid": dict(device_batch_size=32, total_batch_size=524288, eval_every=150, eval_tokens=20 * 524288, save_every=-1, init_lr_frac=1.0,
                smoltalk_size=-1, simple_spelling_size=200000, spelling_bee_size=80000),
    "sft": dict(device_batch_size=4, total_batch_size=65536, eval_every=100, eval_tokens=100 * 4 * 2048, save_every=-1, init_lr_frac=0.02,
                smoltalk_size=10000, simple_spelling_size=300, spelling_bee_size=300),
    "rl": dict(device_batch_size=8, total_batch_size=-1, eval_every=60, eval_tokens=0, save_every=60, init_lr_frac=0.05, smoltalk_size=-1,
               simple_spelling_size=0, spelling_bee_size=0),
}

# -----------------------------------------------------------------------------
# optimizers (SPEC 3)

def newton_schulz(G, steps=5, dtype=None):
    """Approximately orthogonalise G (-> U S' V^T with S' in about [0.5, 1.5]) by the quintic Newton-Schulz iteration."""
    a, b, c = NS_COEFFS
    # bf16 on CUDA, as in the release; fp32 on CPU, where bf16 matmuls without native support ran 10-40x slower here
    X = G.to(dtype or (torch.bfloat16 if G.is_cuda else torch.float32))
    tall = X.size(-2) > X.size(-1)
    if tall:  # iterate on the wide orientation: X X^T is the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.mT if tall else X

# torch >= 2.13 renamed the single-tensor collectives; same arguments
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

class _Done:
    def wait(self):
        pass

def _reduce_scatter_sum(out, inp):
    """out <- this rank's dim-0 chunk of the sum of inp over ranks (async). gloo has no reduce-scatter: all-reduce, then slice."""
    inp = inp.view(-1, *out.shape[1:])  # (W * rows, ...): the layout every backend checks
    if dist.get_backend() != "gloo":
        return _reduce_scatter(out, inp, op=dist.ReduceOp.SUM, async_op=True)
    dist.all_reduce(inp, op=dist.ReduceOp.SUM)
    out.copy_(inp.chunk(dist.get_world_size())[dist.get_rank()])
    return _Done()

def _world():
    return (dist.get_world_size(), dist.get_rank()) if dist.is_available() and dist.is_initialized() else (1, 0)

class Muon(torch.optim.Optimizer):
    """Momentum (Nesterov, via lerp) + Newton-Schulz orthogonalised update, lr scaled by sqrt(max(1, rows/cols)).
    DDP: params grouped by shape; in each block of W same-shape params, param base+r belongs to rank r, which receives the
    averaged grad by reduce-scatter, alone keeps its momentum, updates it, and all-gathers the block back to every rank."""

    def __init__(self, params, lr=0.02, momentum=0.95, ns_steps=5, ns_dtype=None):
        params = list(params)
        assert all(p.ndim == 2 for p in params), "Muon takes 2-D matrices only"
        shapes = sorted({tuple(p.shape) for p in params})  # same order on every rank
        groups = [dict(params=[p for p in params if tuple(p.shape) == s]) for s in shapes]
        super().__init__(groups, dict(lr=lr, momentum=momentum, ns_steps=ns_steps))
        self.ns_dtype = ns_dtype

    def _momentum(self, p, grad, group):
        """M <- lerp(M, g, 1 - mu); returns the Nesterov direction (1 - mu) g + mu M."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad, dtype=torch.float32)
        buf, mu = state["momentum_buffer"], group["momentum"]
        g = grad.float()
        buf.lerp_(g, 1 - mu)
        return g.lerp(buf, mu)

    def _apply(self, p, X, group):
        p.add_(X.to(p.dtype), alpha=-group["lr"] * max(1.0, p.size(-2) / p.size(-1)) ** 0.5)

    @torch.no_grad()
    def step(self):
        world, rank = _world()
        if world == 1:  # same-shape params orthogonalised together as one batched NS
            for group in self.param_groups:
                params = [p for p in group["params"] if p.grad is not None]
                if params:
                    X = newton_schulz(torch.stack([self._momentum(p, p.grad, group) for p in params]), group["ns_steps"], self.ns_dtype)
                    for p, x in zip(params, X):
                        self._apply(p, x, group)
            return
        pending = []
        for group in self.param_groups:  # launch every reduce-scatter first, so communication overlaps the updates
            params = group["params"]
            for base in range(0, len(params), world):
                block = params[base:base + world]
                zero = torch.zeros_like(block[0])
                grads = torch.stack([p.grad if p.grad is not None else zero for p in block] + [zero] * (world - len(block)))
                out = torch.empty_like(block[0])
                pending.append((group, block, out, _reduce_scatter_sum(out, grads)))
        gathers = []
        for group, block, out, work in pending:
            work.wait()
            if rank < len(block):  # this rank owns block[rank]; padding slots send zeros
                p = block[rank]
                self._apply(p, newton_schulz(self._momentum(p, out.div_(world), group), group["ns_steps"], self.ns_dtype), group)
                out.copy_(block[rank])
            else:
                out.zero_()
            gathered = torch.empty((world * out.size(0), *out.shape[1:]), dtype=out.dtype, device=out.device)
            gathers.append((block, gathered.view(world, *out.shape), _all_gather(gathered, out, async_op=True)))
        for block, gathered, work in gathers:
            work.wait()
            for p, new in zip(block, gathered):
                p.copy_(new)

class AdamW(torch.optim.Optimizer):
    """AdamW with the textbook eps placement: p -= lr * m_hat / (sqrt(v_hat) + eps) (math and state in fp32).
    DDP (ZeRO-2 style): a param whose dim 0 divides by W is reduce-scattered along dim 0, each rank updates (and keeps
    state for) its row slice, then all-gathers; other params fall back to all-reduce and a replicated update."""

    def __init__(self, param_groups, lr=1e-3, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0):
        super().__init__(param_groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def _update(self, p, grad, state, group):
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(grad, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(grad, dtype=torch.float32)
        state["step"] += 1
        t, (b1, b2), lr = state["step"], group["betas"], group["lr"]
        g = grad.float()
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(g, 1 - b1)
        v.lerp_(g.square(), 1 - b2)
        update = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + group["eps"])
        if group["weight_decay"]:
            p.mul_(1 - lr * group["weight_decay"])
        p.add_(update.to(p.dtype), alpha=-lr)

    @torch.no_grad()
    def step(self):
        world, rank = _world()
        pending = []
        for group in self.param_groups:
            for p in group["params"]:
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                if world == 1:
                    self._update(p, grad, self.state[p], group)
                elif p.size(0) % world == 0:
                    out = torch.empty((p.size(0) // world, *p.shape[1:]), dtype=grad.dtype, device=grad.device)
                    pending.append((group, p, out, _reduce_scatter_sum(out, grad.contiguous().clone())))
                else:
                    buf = grad.clone()
                    pending.append((group, p, None, dist.all_reduce(buf, op=dist.ReduceOp.SUM, async_op=True), buf))
        gathers = []
        for item in pending:
            group, p, out, work = item[:4]
            work.wait()
            if out is None:  # replicated fallback
                self._update(p, item[4].div_(world), self.state[p], group)
                continue
            rows = out.size(0)
            mine = p[rank * rows:(rank + 1) * rows]
            self._update(mine, out.div_(world), self.state[p], group)
            gathers.append(_all_gather(p, mine.clone(), async_op=True))
        for work in gathers:
            work.wait()

def build_optimizers(model, embedding_lr, unembedding_lr, matrix_lr, init_lr_frac=1.0, ns_dtype=None):
    """SPEC 3.1 groups: AdamW lm_head 0.004*s, wte 0.2*s with s = (d/768)^-0.5; Muon 0.02 (not d-scaled) for transformer.h."""
    s = (model.config.n_embd / 768) ** -0.5
    matrices = [p for p in model.transformer.h.parameters()]
    lm_head, wte = model.lm_head.weight, model.transformer.wte.weight
    assert len(matrices) + 2 == len(list(model.parameters())), "a parameter belongs to no optimizer group"
    adamw = AdamW([dict(params=[lm_head], lr=unembedding_lr * s), dict(params=[wte], lr=embedding_lr * s)], betas=(0.8, 0.95), eps=1e-10)
    muon = Muon(matrices, lr=matrix_lr, momentum=0.95, ns_dtype=ns_dtype)
    optimizers = [adamw, muon]
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] *= init_lr_frac
            group["initial_lr"] = group["lr"]  # schedules set lr = initial_lr * multiplier
    return optimizers

def optimizer_state(opt):
    """State keyed by parameter position; unlike torch's load_state_dict, ours never casts the fp32 state to the param dtype."""
    index = {p: i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    return {"state": {index[p]: dict(s) for p, s in opt.state.items()},
            "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]}

def load_optimizer_state(opt, sd):
    params = [p for g in opt.param_groups for p in g["params"]]
    opt.state.clear()
    for i, s in sd["state"].items():
        p = params[int(i)]
        opt.state[p] = {k: v.to(p.device) if torch.is_tensor(v) else v for k, v in s.items()}
    for group, saved in zip(opt.param_groups, sd["groups"]):
        group.update(saved)

def set_schedule(optimizers, lrm, momentum=None):
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if momentum is not None and isinstance(opt, Muon):
                group["momentum"] = momentum

# -----------------------------------------------------------------------------
# schedules (SPEC 4.3, 6.1 corrected, 7.1, 8)

def lr_multiplier(stage, step, num_iterations, progress=None, warmdown=0.2):
    """base: constant, then the last 20% of steps linear to 0. mid: constant until 80% of the run, then linear to 0
    (not the release's ramp-up bug, nanochat #68). sft, rl: linear from 1 to 0. progress in [0, 1] for epoch-based runs."""
    if stage == "base":
        w = round(warmdown * num_iterations)
        return 1.0 if step <= num_iterations - w else max(0.0, (num_iterations - step) / w)
    progress = step / num_iterations if progress is None else progress
    if stage == "mid":
        return 1.0 if progress <= 1.0 - warmdown else max(0.0, (1.0 - progress) / warmdown)
    return max(0.0, 1.0 - progress)

def muon_momentum(step):
    frac = min(step / 300, 1.0)  # 0.85 -> 0.95 over the first 300 steps
    return (1 - frac) * 0.85 + frac * 0.95

# -----------------------------------------------------------------------------
# small helpers

def grad_accum_steps(total, B, T, world):
    per_step = B * T * world
    if total % per_step:
        good = [b for b in range(B, 0, -1) if total % (b * T * world) == 0]
        hint = f"--device-batch-size {good[0]}" if good else f"--total-batch-size {max(1, total // per_step) * per_step}"
        raise SystemExit(f"error: --total-batch-size {total} is not divisible by device_batch_size * max_seq_len * world_size = "
                         f"{B} * {T} * {world} = {per_step}; use e.g. {hint}")
    return total // per_step

def peak_flops(device):
    if not str(device).startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((f for key, f in PEAK_BF16_FLOPS if key in name), None)

def peak_memory_mib(device):
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB

def rng_state():
    s = dict(torch=torch.get_rng_state(), python=random.getstate(), numpy=np.random.get_state())
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s

def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])

def jsonable(x):
    return json.loads(json.dumps(x, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))

def task_size(n):
    return None if n is None or n < 0 else n

def reference_answer(conversation):
    """The text of the final assistant message (a string, or a list of parts whose texts are joined)."""
    content = conversation["messages"][-1]["content"]
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)

def rl_reward(completion, reference):
    """1.0 when the completion's `#### answer` equals the reference's (extraction rule of data.extract_answer), else 0.0."""
    pred = data.extract_answer(completion)
    return float(pred is not None and pred == data.extract_answer(reference))

def group_advantages(rewards):
    """REINFORCE with a group-mean baseline: A = r - mean(r) (no std division)."""
    return rewards - rewards.mean()

def rl_pass_loss(model, ids, mask, advantages, normaliser):
    """Policy-gradient loss of one pass: only sampled tokens (mask 1 on the target) count; token-level normalisation."""
    inputs, targets = ids[:, :-1], ids[:, 1:].masked_fill(mask[:, 1:] == 0, -1)
    logp = -model(inputs, targets, loss_reduction="none")  # (B, T-1); 0 at ignored targets
    n_valid = (targets >= 0).sum().clamp(min=1)
    return -(logp * advantages[:, None]).sum() / (n_valid * normaliser)

def lm_loss(model, x, y, masked):
    """Mean CE over the supervised targets. masked: a micro-batch with none gives 0 (not NaN), so DDP ranks stay in step."""
    if not masked:
        return model(x, y)
    return model(x, y, loss_reduction="none").sum() / (y >= 0).sum().clamp(min=1)

def repeat_batches(make_loader):
    """Endless batches from a loader, recreated if it runs out (val loaders of small chat sets)."""
    while True:
        yield from make_loader()

# -----------------------------------------------------------------------------
# arguments

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train one stage of the nanochat pipeline. Every-N flags: -1 disables.")
    p.add_argument("--stage", choices=["base", "mid", "sft", "rl"], default="base")
    p.add_argument("--run", default="dummy", help="wandb run name; 'dummy' (default) disables wandb")
    p.add_argument("--device", default=None, help="cuda|cpu (default: autodetect)")
    p.add_argument("--model-tag", default=None, help="checkpoint folder tag (default d<depth>, or the source's tag)")
    p.add_argument("--resume", action="store_true", help="continue from this stage's latest checkpoint, if any")
    p.add_argument("--compile", type=int, choices=[0, 1], default=None,
                   help=f"torch.compile the training model (default: 1 on CUDA, {CPU_COMPILE_DEFAULT} on CPU; rl is never compiled)")
    p.add_argument("--seed", type=int, default=42)
    # model and batch
    p.add_argument("--depth", type=int, default=20, help="base: the single size dial (d = 64*depth)")
    p.add_argument("--vocab-size", type=int, default=-1, help="base: must equal the tokenizer's (-1: take it from the tokenizer)")
    p.add_argument("--max-seq-len", type=int, default=None, help="T (default: 2048 for base, the source model's for the others)")
    p.add_argument("--device-batch-size", type=int, default=None, help="rows per rank per micro-step (rl: samples per forward pass)")
    p.add_argument("--total-batch-size", type=int, default=None, help="tokens per optimizer step, all ranks (grad accumulation fills it)")
    p.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: base from the ratio, mid/sft one epoch, rl one epoch)")
    p.add_argument("--target-param-data-ratio", type=float, default=20, help="base: tokens = ratio * all parameters")
    # optimization
    p.add_argument("--embedding-lr", type=float, default=0.2)
    p.add_argument("--unembedding-lr", type=float, default=0.004)
    p.add_argument("--matrix-lr", type=float, default=0.02)
    p.add_argument("--init-lr-frac", type=float, default=None, help="all lrs times this (base/mid 1.0, sft 0.02, rl 0.05)")
    # evaluation, sampling, saving
    p.add_argument("--eval-every", type=int, default=None, help="val bpb (base/mid), val loss (sft), pass@k (rl) every N steps")
    p.add_argument("--eval-tokens", type=int, default=None, help="validation tokens per evaluation (capped at what the val shard holds)")
    p.add_argument("--core-metric-every", type=int, default=2000, help="base: CORE every N steps and at the end")
    p.add_argument("--core-metric-max-per-task", type=int, default=500)
    p.add_argument("--sample-every", type=int, default=2000, help="base: greedy samples every N steps and at the end")
    p.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (always at the end)")
    # mid / sft / rl
    p.add_argument("--source", choices=["base", "mid", "sft"], default=None, help="checkpoint to start from (mid: base, sft: mid, rl: sft)")
    p.add_argument("--source-tag", default=None)
    p.add_argument("--source-step", type=int, default=None)
    p.add_argument("--smoltalk-size", type=int, default=None, help="SmolTalk train rows (-1: all; mid all, sft 10000)")
    p.add_argument("--mmlu-size", type=int, default=-1, help="mid: MMLU auxiliary_train rows")
    p.add_argument("--gsm8k-size", type=int, default=-1, help="GSM8K train rows (mid, sft, rl)")
    p.add_argument("--arc-size", type=int, default=-1, help="sft: rows of each of ARC-Easy and ARC-Challenge train")
    p.add_argument("--identity-size", type=int, default=-1, help="identity conversations (mid uses them twice)")
    p.add_argument("--simple-spelling-size", type=int, default=None, help="SimpleSpelling rows (mid 200000, sft 300)")
    p.add_argument("--spelling-bee-size", type=int, default=None, help="SpellingBee rows (mid 80000, sft 300)")
    p.add_argument("--val-size", type=int, default=-1, help="mid/sft: rows of each validation task (-1: SPEC sizes)")
    p.add_argument("--chat-eval-every", type=int, default=200, help="sft: MMLU + ARC-Easy accuracy every N steps and at the end")
    p.add_argument("--chat-eval-problems", type=int, default=1024)
    p.add_argument("--examples-per-step", type=int, default=16, help="rl: questions per optimizer step, all ranks")
    p.add_argument("--num-samples", type=int, default=16, help="rl: completions per question")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--eval-examples", type=int, default=400, help="rl: GSM8K test problems for pass@k")
    args = p.parse_args(argv)
    for k, v in STAGE_DEFAULTS[args.stage].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.stage != "base" and args.source is None:
        args.source = SOURCE_STAGE[args.stage]
    return args

# -----------------------------------------------------------------------------
# stages: each returns a namespace the shared loop drives (train_step, lrm, momentum, evaluate, loader state, ...)

class Stage:
    num_iterations = None       # None: epoch-based, ends when done() says so
    tokens_per_step = 0
    momentum = staticmethod(lambda step: None)
    done = staticmethod(lambda: False)
    progress = 0.0

    def loader_state(self):
        return self.loader.state_dict()

    def load_loader_state(self, sd):
        self.loader.load_state_dict(sd)

    def close(self):
        getattr(self.loader, "close", lambda: None)()

def setup_lm(stage, args, rt, model, train_model):
    """base, mid and sft: grad-accumulated LM steps from a loader (masked chat loss for mid/sft)."""
    S = Stage()
    tokenizer, device, rank, world = rt["tokenizer"], rt["device"], rt["rank"], rt["world"]
    B, T = args.device_batch_size, rt["T"]
    accum = grad_accum_steps(args.total_batch_size, B, T, world)
    S.tokens_per_step, S.flops_per_token = args.total_batch_size, model.estimate_flops()
    if stage == "base":
        S.loader = data.PretrainLoader(tokenizer, B, T, split="train", device=device, rank=rank, world_size=world)
        n = args.num_iterations if args.num_iterations > 0 else int(args.target_param_data_ratio * model.param_counts()["total"]) // args.total_batch_size
        S.num_iterations = max(1, n)
        S.momentum = muon_momentum
    else:
        def sized(n):
            return task_size(n) if n != 0 else 0
        if stage == "mid":
            parts = [(data.SmolTalk, ("train",), args.smoltalk_size), (data.MMLU, ("auxiliary_train", "train"), args.mmlu_size),
                     (data.GSM8K, ("train",), args.gsm8k_size), (data.Identity, (), args.identity_size), (data.Identity, (), args.identity_size)]
            S.momentum = muon_momentum
        else:
            parts = [(data.ARC, ("ARC-Easy", "train"), args.arc_size), (data.ARC, ("ARC-Challenge", "train"), args.arc_size),
                     (data.GSM8K, ("train",), args.gsm8k_size), (data.SmolTalk, ("train",), args.smoltalk_size),
                     (data.Identity, (), args.identity_size)]
        tasks = [cls(*a, size=sized(n)) for cls, a, n in parts if n != 0]
        tasks += [cls(size=n, split="train") for cls, n in ((data.SimpleSpelling, args.simple_spelling_size),
                                                             (data.SpellingBee, args.spelling_bee_size)) if n > 0]
        train_task = data.TaskMixture(tasks, seed=42)
        vs = task_size(args.val_size)
        val_task = (data.TaskMixture([data.SmolTalk("test", size=vs), data.MMLU("all", "test", size=vs or 5200),
                                      data.GSM8K("test", size=vs or 420)], seed=42) if stage == "mid" else data.SmolTalk("test", size=vs))
        S.loader = data.ChatLoader(train_task, tokenizer, B, T, device=device, rank=rank, world_size=world, completion_only=stage == "sft")
        S.num_iterations = args.num_iterations if args.num_iterations > 0 else None
        S.done_flag = False
        S.done = lambda: S.done_flag
        print0(f"{stage} mixture: {len(train_task):,} conversations ({', '.join(f'{type(t).__name__} {len(t):,}' for t in tasks)})")
    masked = stage != "base"  # chat rows carry -1 targets (padding; sft also non-assistant tokens)

    def train_step(step):
        for _ in range(accum):
            x, y = next(S.loader)
            loss = lm_loss(train_model, x, y, masked)
            (loss / accum).backward()
        if stage != "base":  # the epoch ends for everyone when it ends for any rank
            last, prog = common.all_reduce([float(S.loader.last_step), S.loader.progress], device, op=dist.ReduceOp.MAX)
            S.done_flag, S.progress = bool(last), max(S.progress, prog)
        return loss.detach(), {}
    S.train_step = train_step
    S.lrm = lambda step: lr_multiplier(stage, step, S.num_iterations, None if S.num_iterations else S.progress)

    def eval_steps():
        return max(0, args.eval_tokens // (B * T * world))

    def val_bpb_base():
        if S.val_steps is None:  # cap at what this rank's share of the val shard holds (counted once)
            want, have = eval_steps(), 0
            for _, _, texts in common.iter_row_groups("val", rank, world):
                have += sum(len(ids) + 1 for ids in tokenizer.encode(texts))
                if have >= want * B * T:
                    break
            S.val_steps = int(common.all_reduce([min(want, have // (B * T))], device, op=dist.ReduceOp.MIN)[0])
            if S.val_steps < eval_steps():
                print0(f"val shard holds {S.val_steps} of the {eval_steps()} requested eval batches; evaluating on {S.val_steps}")
        if S.val_steps == 0:
            return None
        # a fresh loader each time (identical val tokens), built as eval.py builds it, so both report the same bpb
        loader = data.PretrainLoader(tokenizer, B, T, split="val", device=device, rank=rank, world_size=world)
        try:
            return nc_eval.evaluate_bpb(model, loader, S.val_steps, rt["token_bytes"])
        finally:
            loader.close()
    S.val_steps = None

    def chat_val_batches():
        return repeat_batches(lambda: data.ChatLoader(val_task, tokenizer, B, T, device=device, rank=rank, world_size=world,
                                                      completion_only=stage == "sft"))

    def every(n, step, last):
        return n > 0 and (last or step % n == 0)

    def evaluate(step, last):
        m = {}
        with torch.no_grad():
            if stage in ("base", "mid") and (last or every(args.eval_every, step, last)) and eval_steps() > 0:
                bpb = val_bpb_base() if stage == "base" else nc_eval.evaluate_bpb(model, chat_val_batches(), eval_steps(), rt["token_bytes"])
                if bpb is not None:
                    m["val_bpb"] = bpb
            if stage == "sft" and (last or every(args.eval_every, step, last)) and eval_steps() > 0:
                batches, total = chat_val_batches(), 0.0
                for _ in range(eval_steps()):
                    x, y = next(batches)
                    total += lm_loss(model, x, y, True).item()
                m["val_loss"] = common.all_reduce([total / eval_steps()], device)[0] / world
            if stage == "sft" and every(args.chat_eval_every, step, last) and (step > 0 or last):
                for name in ("MMLU", "ARC-Easy"):
                    m[name] = nc_eval.run_chat_eval(name, model, tokenizer, device, max_problems=args.chat_eval_problems)
                model.train()
            if stage == "base" and every(args.core_metric_every, step, last) and (step > 0 or last):
                m["core"] = nc_eval.evaluate_core(model, tokenizer, device, max_per_task=args.core_metric_max_per_task)["core"]
            if stage == "base" and every(args.sample_every, step, last) and (step > 0 or last) and rank == 0:
                engine = model_lib.Engine(model, tokenizer)
                for prompt in SAMPLE_PROMPTS:
                    rows, _ = engine.generate_batch(tokenizer.encode(prompt, prepend="<|bos|>"), num_samples=1, max_tokens=16, temperature=0.0)
                    print0(tokenizer.decode(rows[0][1:]))
                model.train()
        return m
    S.evaluate = evaluate
    return S

def setup_rl(args, rt, model):
    """SPEC 8: on-policy REINFORCE on GSM8K train with a group-mean baseline, token-level normalisation, no KL."""
    S = Stage()
    tokenizer, device, rank, world = rt["tokenizer"], rt["device"], rt["rank"], rt["world"]
    B = args.device_batch_size
    if args.examples_per_step % world or args.num_samples % B:
        raise SystemExit(f"error: --examples-per-step {args.examples_per_step} must divide by the world size {world} and "
                         f"--num-samples {args.num_samples} by --device-batch-size {B}")
    per_rank, passes = args.examples_per_step // world, args.num_samples // B
    train_task, test_task = data.GSM8K("train", size=task_size(args.gsm8k_size)), data.GSM8K("test")
    order = list(range(len(train_task)))
    random.Random(42).shuffle(order)
    S.num_iterations = args.num_iterations if args.num_iterations > 0 else max(1, len(train_task) // args.examples_per_step)
    S.flops_per_token, S.loader = None, None
    S.loader_state, S.load_loader_state, S.close = (lambda: {}), (lambda sd: None), (lambda: None)  # the data order is a function of step
    engine = model_lib.Engine(model, tokenizer)
    pad = tokenizer.encode_special("<|assistant_end|>")

    def sample(prompt, n, seed):
        model.eval()
        with torch.no_grad():
            rows, masks = engine.generate_batch(prompt, num_samples=n, max_tokens=args.max_new_tokens,
                                                temperature=args.temperature, top_k=args.top_k, seed=seed)
        model.train()
        return rows, masks

    def train_step(step):
        rewards_all, lengths, loss = [], [], torch.zeros((), device=device)
        for j in range(per_rank):
            idx = order[(rank + world * (step * per_rank + j)) % len(order)]  # rank r takes examples r, r+W, ...
            conv = train_task[idx]
            prompt, ref = tokenizer.render_for_completion(conv), reference_answer(conv)
            rows, masks = [], []
            for s in range(passes):
                r, m = sample(prompt, B, hash((step, idx, s)) & 0x7FFFFFFF)
                rows += r
                masks += m
            rewards = torch.tensor([rl_reward(tokenizer.decode(r[len(prompt):]), ref) for r in rows], device=device)
            adv = group_advantages(rewards)
            for s in range(passes):
                chunk = slice(s * B, (s + 1) * B)
                L = max(len(r) for r in rows[chunk])
                ids = torch.tensor([r + [pad] * (L - len(r)) for r in rows[chunk]], device=device)
                mask = torch.tensor([m + [0] * (L - len(m)) for m in masks[chunk]], device=device)
                loss = rl_pass_loss(model, ids, mask, adv[chunk], passes * per_rank)
                loss.backward()
            rewards_all += rewards.tolist()
            lengths += [len(r) - len(prompt) for r in rows]
        tot = common.all_reduce([sum(rewards_all), len(rewards_all), sum(lengths)], device)
        S.tokens_per_step = int(tot[2])
        return loss.detach(), {"reward": tot[0] / tot[1], "seq_len": tot[2] / tot[1]}
    S.train_step = train_step
    S.lrm = lambda step: lr_multiplier("rl", step, S.num_iterations)

    def evaluate(step, last):
        if not (last or (args.eval_every > 0 and step % args.eval_every == 0)):
            return {}
        k_max, n = 8, min(len(test_task), args.eval_examples)
        hits, count = [0.0] * k_max, 0
        for i in range(rank, n, world):
            conv = test_task[i]
            prompt, ref = tokenizer.render_for_completion(conv), reference_answer(conv)
            rows, _ = sample(prompt, k_max, i)
            ok = [rl_reward(tokenizer.decode(r[len(prompt):]), ref) for r in rows]
            for k in range(k_max):
                hits[k] += float(any(ok[:k + 1]))
            count += 1
        tot = common.all_reduce(hits + [count], device)
        return {f"pass@{k + 1}": tot[k] / max(1, tot[-1]) for k in range(k_max)}
    S.evaluate = evaluate
    return S

# -----------------------------------------------------------------------------
# the shared loop (SPEC 4.4): for step in 0..N: save -> evaluate -> (last: stop) -> train one optimizer step

def run(args):
    ddp, rank, local_rank, world, device = common.init_runtime(args.device, seed=args.seed)
    cuda, stage = device.startswith("cuda"), args.stage
    use_compile = bool((1 if cuda else CPU_COMPILE_DEFAULT) if args.compile is None else args.compile) and stage != "rl"
    tokenizer = tok_lib.get_tokenizer()
    rt = dict(tokenizer=tokenizer, device=device, rank=rank, world=world, token_bytes=tok_lib.get_token_bytes(device))

    # where we start from: our own latest checkpoint (--resume), a fresh model (base), or the source stage's checkpoint
    if stage == "base":
        common.list_shards("train"), common.list_shards("val")  # fail now, with the download hint, if shards are missing
        V = tokenizer.get_vocab_size()
        if args.vocab_size not in (-1, V):
            raise SystemExit(f"error: --vocab-size {args.vocab_size} does not match the tokenizer's vocabulary ({V}); "
                             f"retrain it with `python tokenizer.py train --vocab-size {args.vocab_size}` or drop the flag")
        model_config = asdict(model_lib.config_from_depth(args.depth, V, args.max_seq_len or 2048))
        tag = args.model_tag or f"d{args.depth}"
    else:
        src_tag = args.source_tag or model_lib.default_tag(common.checkpoint_dir(args.source))
        src_dir = common.checkpoint_dir(args.source, src_tag)
        if src_tag is None or model_lib.last_step(src_dir) is None:
            raise SystemExit(f"error: no {args.source} checkpoint in {src_dir}: run `python train.py --stage={args.source}` first")
        tag = args.model_tag or src_tag
    ckpt_dir = common.checkpoint_dir(stage, tag)
    resume_step = model_lib.last_step(ckpt_dir, world) if args.resume else None
    if args.resume and resume_step is None:
        print0(f"--resume: no complete checkpoint in {ckpt_dir}; starting from the beginning")
    opt_sd = None
    if resume_step is not None:
        model_state, opt_sd, meta = model_lib.load_checkpoint(ckpt_dir, resume_step, device, load_optimizer=True, rank=rank)
        if meta.get("world_size", world) != world:
            raise SystemExit(f"error: {ckpt_dir} step {resume_step} was saved by {meta['world_size']} ranks; resume with the same number")
        model_config = meta["model_config"]
        model = model_lib.build_model(model_config, device)
        model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in model_state.items()})
        print0(f"resuming {stage} from {ckpt_dir} step {resume_step}")
    elif stage == "base":
        model = model_lib.build_model(model_config, device)
    else:
        model, src_meta = model_lib.load_model(args.source, device, tag=src_tag, step=args.source_step, tokenizer=tokenizer)
        model_config = src_meta["model_config"]
        print0(f"{stage}: starting from {args.source} checkpoint {src_dir} step {src_meta.get('step')}")
    model.train()
    rt["T"] = args.max_seq_len or model_config["sequence_len"]
    model_config = dict(model_config, sequence_len=rt["T"])  # the next stage's default T is the one trained here
    optimizers = build_optimizers(model, args.embedding_lr, args.unembedding_lr, args.matrix_lr, args.init_lr_frac)
    train_model = torch.compile(model, dynamic=False) if use_compile else model
    S = setup_rl(args, rt, model) if stage == "rl" else setup_lm(stage, args, rt, model, train_model)
    loop = dict(step=0, smooth_loss=0.0, min_val_bpb=float("inf"), total_time=0.0, timed_steps=0, tokens=0, flops=0.0,
                done=False, progress=0.0, val_bpb=None)
    if opt_sd is not None:
        for opt, sd in zip(optimizers, opt_sd["optimizers"]):
            load_optimizer_state(opt, sd)
        S.load_loader_state(opt_sd["loader"])
        loop.update(opt_sd["loop_state"])
        S.done_flag, S.progress = loop["done"], loop["progress"]
        set_rng_state(opt_sd["rng"])
    counts = model.param_counts()
    print0(f"{stage}: {counts['total']:,} parameters, T={rt['T']}, device={device}, world={world}, compile={int(use_compile)}, "
           f"steps={S.num_iterations or 'one epoch'}, tokens/step={S.tokens_per_step:,}")

    wandb_run = None
    if args.run != "dummy" and rank == 0:
        try:
            import wandb
            wandb_run = wandb.init(project="nanochat", name=args.run, config=vars(args))
        except ImportError:
            print0("wandb is not installed: not logging to wandb")

    def save(step):
        loop.update(done=bool(getattr(S, "done_flag", False)), progress=S.progress)
        meta = dict(step=step, stage=stage, model_config=model_config, user_config=vars(args), world_size=world,
                    device_batch_size=args.device_batch_size, max_seq_len=rt["T"], total_batch_size=args.total_batch_size,
                    val_bpb=loop["val_bpb"], loader_state=S.loader_state(), loop_state=dict(loop))
        shard = dict(optimizers=[optimizer_state(o) for o in optimizers], loader=S.loader_state(), rng=rng_state(), loop_state=dict(loop))
        model_lib.save_checkpoint(ckpt_dir, step, model.state_dict(), jsonable(meta), shard, rank=rank)
        if ddp:
            dist.barrier()
        loop["saved_step"] = step

    peak = peak_flops(device)
    step, t_start, metrics = loop["step"], time.time(), {}
    while True:
        last = step == S.num_iterations if S.num_iterations is not None else S.done()
        if step > 0 and step != resume_step and (last or (args.save_every > 0 and step % args.save_every == 0)):
            save(step)  # before the evaluations, so a crash in them loses no training (nanochat #446)
        metrics = S.evaluate(step, last)
        if "val_bpb" in metrics:
            loop["val_bpb"], loop["min_val_bpb"] = metrics["val_bpb"], min(loop["min_val_bpb"], metrics["val_bpb"])
        if metrics:
            print0(f"step {step:05d} | " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if last:
            if metrics:
                common.append_log(stage, dict(step=step, **metrics))
            break
        # one optimizer step
        t0 = time.time()
        lrm, mom = S.lrm(step), S.momentum(step)
        set_schedule(optimizers, lrm, mom)
        loss, extra = S.train_step(step)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        loss = common.all_reduce([loss.item()], device)[0] / world
        if cuda:
            torch.cuda.synchronize()
        dt = time.time() - t0
        if not math.isfinite(loss):
            where = (f"the last good checkpoint is step {loop['saved_step']} in {ckpt_dir} (continue with --resume, e.g. at a lower lr)"
                     if "saved_step" in loop else "no checkpoint was saved yet")
            common.cleanup_runtime()
            raise SystemExit(f"error: the training loss became {loss} at step {step}; stopping. {where}")
        loop["smooth_loss"] = 0.9 * loop["smooth_loss"] + 0.1 * loss
        smooth = loop["smooth_loss"] / (1 - 0.9 ** (step + 1))
        if step > 10 or S.num_iterations is not None and S.num_iterations <= 20:
            loop["total_time"] += dt
            loop["timed_steps"] += 1
        loop["tokens"] += S.tokens_per_step
        tok_per_sec = S.tokens_per_step / dt
        mfu = 100 * S.flops_per_token * tok_per_sec / (peak * world) if peak and S.flops_per_token else None
        loop["flops"] += (S.flops_per_token or 0) * S.tokens_per_step
        elapsed = time.time() - t_start
        avg_dt = loop["total_time"] / loop["timed_steps"] if loop["timed_steps"] else dt
        if S.num_iterations is not None:
            frac, eta = (step + 1) / S.num_iterations, avg_dt * (S.num_iterations - step - 1)
            head = f"step {step:05d}/{S.num_iterations:05d} ({100 * frac:.2f}%)"
        else:
            frac = max(S.progress, 1e-9)
            eta, head = elapsed * (1 - frac) / frac, f"step {step:05d} ({100 * frac:.2f}% of the epoch)"
        extras = "".join(f" | {k} {v:.4f}" for k, v in extra.items())
        print0(f"{head} | loss {smooth:.6f} | lrm {lrm:.4f} | dt {1000 * dt:.2f}ms | tok/s {tok_per_sec:,.0f} | "
               f"mfu {'n/a' if mfu is None else f'{mfu:.2f}'}{extras} | elapsed {elapsed / 60:.2f}m | eta {eta / 60:.2f}m")
        record = dict(step=step, train_loss=smooth, lrm=lrm, dt=dt, tok_per_sec=tok_per_sec, tokens=loop["tokens"], **extra, **metrics)
        common.append_log(stage, record)
        if wandb_run is not None:
            wandb_run.log(dict(record, total_training_flops=loop["flops"], mfu=mfu or 0.0), step=step)
        step += 1
        loop["step"] = step

    S.close()
    mem = peak_memory_mib(device)
    summary = {"stage": stage, "model tag": tag, "parameters": counts["total"], "depth": model_config["n_layer"],
               "sequence length": rt["T"], "world size": world, "iterations": step, "tokens": loop["tokens"],
               "FLOPs per token": S.flops_per_token or 0, "total training FLOPs": f"{loop['flops']:.4e}",
               "training time (min)": loop["total_time"] / 60, "peak memory (MiB)": mem}
    if stage == "base":
        summary["tokens : params"] = loop["tokens"] / counts["total"]
    if peak and S.flops_per_token and loop["timed_steps"]:
        summary["MFU %"] = 100 * S.flops_per_token * S.tokens_per_step * loop["timed_steps"] / loop["total_time"] / (peak * world)
    if loop["min_val_bpb"] < float("inf"):
        summary.update({"min val bpb": loop["min_val_bpb"], "final val bpb": loop["val_bpb"]})
    summary.update({k: v for k, v in metrics.items()})
    print0(f"done: {loop['tokens']:,} tokens, {loop['flops']:.3e} FLOPs, {loop['total_time'] / 60:.2f} min of training, "
           f"peak memory {mem:.0f} MiB" + (f", min val bpb {loop['min_val_bpb']:.4f}" if loop["min_val_bpb"] < float("inf") else ""))
    config = {k: v for k, v in vars(args).items() if v is not None}
    common.write_report_section(REPORT_TITLES[stage], [config, summary])
    if wandb_run is not None:
        wandb_run.finish()
    if ddp:
        dist.barrier()  # nobody tears the group down while another rank still talks (gloo aborts otherwise)
    common.cleanup_runtime()

def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except FileNotFoundError as e:  # missing tokenizer, shards, task data: one clear line, not a traceback
        print(f"error: {e}", file=sys.stderr)
        common.cleanup_runtime()
        sys.exit(1)

if __name__ == "__main__":
    main()
