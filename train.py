"""
Training, all four stages in one file. Each stage is one function read top to bottom:

    python train.py --stage=base --depth=4 ...                  # train_base: pretraining on the parquet shards
    python train.py --stage=mid                                 # train_chat: chat format, MC, tools (from base)
    python train.py --stage=sft                                 # train_chat: assistant-only finetuning (from mid)
    python train.py --stage=rl                                  # train_rl: GSM8K REINFORCE (from sft)
    torchrun --nproc_per_node=8 train.py --stage=base --depth=20  # DDP; --nnodes/--node_rank for several machines

Optimizers: Muon for every matrix inside the transformer blocks, AdamW for wte and lm_head. The model is never wrapped
in DDP: under torch.distributed the optimizers average the gradients themselves (reduce-scatter -> the owning rank
updates and alone keeps the state -> all-gather), so optimizer state is sharded across ranks.
"""
import os
import sys
import json
import math
import time
import random
import signal
import hashlib
import argparse
import resource
from collections import namedtuple
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
POLAR_EXPRESS = [(8.156554524902461, -22.48329292557795, 15.878769915207462),  # one (a, b, c) per iteration, from
                 (4.042929935166739, -2.808917465908714, 0.5000178451051316),  # Amsel et al. 2025, "The Polar Express"
                 (3.8916678022926607, -2.772484153217685, 0.5060648178503393),  # (5 iterations, safety 2e-2, cushion 2)
                 (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                 (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)]
B_REF = 2**19  # --scale-hparams: the batch (tokens) nanochat tuned its d12 at; lrs scale with sqrt(batch / B_REF)
# --recipe: what flags left at None take. release: the October 2025 nanochat; 2026: nanochat 92d63d4's model and
# optimizer (model and init apply to a fresh base model; lrs, schedule, decay and ratio to base; Muon to all stages)
RECIPES = {
    "release": dict(window_pattern="L", rope_base=10_000, qk_scale=1.0, pad_vocab_to=1, resid_lambdas=0,
                    value_embeds=0, smear=0, backout=0, init="release", polar_express=0, normuon=0, muon_eq=0,
                    muon_plus=0, weight_decay=0.0, scale_hparams=0, embedding_lr=0.2, unembedding_lr=0.004,
                    scalar_lr=0.5, warmup_steps=0, final_lr_frac=0.0, target_param_data_ratio=20,
                    warmdown_ratio=None),  # None: the stage's
    "2026": dict(window_pattern="SSSL", rope_base=100_000, qk_scale=1.2, pad_vocab_to=64, resid_lambdas=1,
                 value_embeds=1, smear=1, backout=1, init="2026", polar_express=1, normuon=1, muon_eq=1, muon_plus=1,
                 weight_decay=0.28, scale_hparams=1, embedding_lr=0.3, unembedding_lr=0.008, scalar_lr=0.5,
                 warmup_steps=40, final_lr_frac=0.05, target_param_data_ratio=12, warmdown_ratio=0.65),
}
MUON_FLAGS = ("polar_express", "normuon", "muon_eq", "muon_plus")  # every stage takes these from --recipe
ARCH_FLAGS = [k for k in RECIPES["release"] if k in model_lib.GPTConfig.__dataclass_fields__]  # the model's flags
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12, "B200": 2.25e15,
                   "A100": 312e12, "L40S": 362e12, "4090": 165.2e12, "3090": 71e12, "A10": 125e12}  # dense, per GPU
SOURCE_STAGE = {"mid": "base", "sft": "mid", "rl": "sft"}
# flags left at None take their stage's default: the release's values, except SFT's recipe (README "SFT recipe")
STAGE_DEFAULTS = {
    "base": dict(device_batch_size=32, total_batch_size=524288, eval_every=250, eval_tokens=20 * 524288, save_every=-1,
                 init_lr_frac=1.0, warmdown_ratio=0.2, chat_eval_every=-1),
    "mid": dict(device_batch_size=32, total_batch_size=524288, eval_every=150, eval_tokens=20 * 524288, save_every=-1,
                init_lr_frac=1.0, warmdown_ratio=0.2, chat_eval_every=-1, smoltalk_size=-1, simple_spelling_size=200000,
                spelling_bee_size=80000, pack=1, source_optimizer=0),
    "sft": dict(device_batch_size=4, total_batch_size=65536, eval_every=100, eval_tokens=100 * 4 * 2048, save_every=-1,
                init_lr_frac=0.8, warmdown_ratio=0.5, chat_eval_every=200, smoltalk_size=10000,
                simple_spelling_size=300, spelling_bee_size=300, pack=1, source_optimizer=1),
    "rl": dict(device_batch_size=8, total_batch_size=-1, eval_every=60, eval_tokens=0, save_every=60, init_lr_frac=0.05,
               warmdown_ratio=1.0, chat_eval_every=-1),
}

# -----------------------------------------------------------------------------
# optimizers

def newton_schulz(G, steps=5, dtype=None, polar=False):
    """G -> about U S' V^T (S' about [0.5, 1.5]) by quintic Newton-Schulz, or Polar Express (coefficients per step)."""
    # bf16 on CUDA, as in the release; fp32 on CPU, where bf16 matmuls without native support are many times slower
    X = G.to(dtype or (torch.bfloat16 if G.is_cuda else torch.float32))
    tall = X.size(-2) > X.size(-1)
    if tall:  # iterate on the wide orientation: X X^T is the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * (1.01 if polar else 1) + (1e-6 if polar else 1e-7))  # spectral <= 1
    for a, b, c in POLAR_EXPRESS[:steps] if polar else [NS_COEFFS] * steps:
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.mT if tall else X

def muon_update(G, group):
    """Nesterov direction(s) G (..., m, n) -> orthogonalised update(s). MuonEq: rows first rescaled to the mean row norm
    (a better-conditioned input); Muon+: norm snapped to sqrt(min(m, n)), a semi-orthogonal matrix's (NS fell short)."""
    if group["muon_eq"]:
        G = G * (G.norm(dim=(-2, -1), keepdim=True) / G.size(-2) ** 0.5 / G.norm(dim=-1, keepdim=True).clamp_min(1e-6))
    X = newton_schulz(G, group["ns_steps"], polar=group["polar_express"]).float()
    if group["muon_plus"]:
        X = X * (min(X.shape[-2:]) ** 0.5 / X.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6))
    return X

def normuon(X, state, beta2=0.9):
    """NorMuon: each neuron's update (row; column if wide) over its running RMS (they differ); X's norm restored."""
    ms = X.square().mean(dim=-1 if X.size(-2) >= X.size(-1) else -2, keepdim=True)
    if "second_moment" not in state:
        state["second_moment"] = torch.zeros_like(ms)
    Y = X * state["second_moment"].lerp_(ms, 1 - beta2).clamp_min(1e-10).rsqrt()
    return Y * (X.norm() / Y.norm().clamp_min(1e-10))

# torch >= 2.13 renamed the single-tensor collectives; same arguments
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

def _reduce_scatter_sum(out, inp):
    """out <- this rank's dim-0 chunk of the sum over ranks. -> async work, or None (gloo: all-reduce, then slice)."""
    inp = inp.view(-1, *out.shape[1:])  # (W * rows, ...): the layout every backend checks
    if dist.get_backend() != "gloo":
        return _reduce_scatter(out, inp, op=dist.ReduceOp.SUM, async_op=True)
    dist.all_reduce(inp, op=dist.ReduceOp.SUM)
    out.copy_(inp.chunk(dist.get_world_size())[dist.get_rank()])

class Muon(torch.optim.Optimizer):
    """Momentum (Nesterov, via lerp) + Newton-Schulz orthogonalised update, lr scaled by sqrt(max(1, rows/cols)).
    DDP: params grouped by shape; in each block of W same-shape params, param base+r belongs to rank r, which receives
    the mean grad by reduce-scatter, alone keeps its momentum, updates it, and all-gathers the block to all ranks."""

    def __init__(self, params, lr=0.02, momentum=0.95, ns_steps=5, weight_decay=0.0, **options):
        params = list(params)
        assert all(p.ndim == 2 for p in params), "Muon takes 2-D matrices only"
        shapes = sorted({tuple(p.shape) for p in params})  # same order on every rank
        groups = [dict(params=[p for p in params if tuple(p.shape) == s]) for s in shapes]
        options = {k: options.get(k, 0) for k in MUON_FLAGS}
        defaults = dict(lr=lr, momentum=momentum, ns_steps=ns_steps, weight_decay=weight_decay, **options)
        super().__init__(groups, defaults)

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
        lr = group["lr"] * max(1.0, p.size(-2) / p.size(-1)) ** 0.5
        if group["normuon"]:
            X = normuon(X, self.state[p])
        if group["weight_decay"]:  # cautious: decay only where the update pushes the weight the same way (toward zero)
            p.sub_(lr * group["weight_decay"] * p * ((X * p) >= 0))
        p.add_(X.to(p.dtype), alpha=-lr)

    @torch.no_grad()
    def step(self):
        _, rank, _, world = common.dist_info()
        if world == 1:  # same-shape params orthogonalised together as one batched NS
            for group in self.param_groups:
                params = [p for p in group["params"] if p.grad is not None]
                if params:
                    X = muon_update(torch.stack([self._momentum(p, p.grad, group) for p in params]), group)
                    for p, x in zip(params, X):
                        self._apply(p, x, group)
            return
        pending = []
        for group in self.param_groups:  # launch every reduce-scatter first, so communication overlaps the updates
            params = group["params"]
            for base in range(0, len(params), world):
                block = params[base:base + world]
                zero = torch.zeros_like(block[0])
                grads = [p.grad if p.grad is not None else zero for p in block]
                grads = torch.stack(grads + [zero] * (world - len(block)))
                out = torch.empty_like(block[0])
                pending.append((group, block, out, _reduce_scatter_sum(out, grads)))
        gathers = []
        for group, block, out, work in pending:
            if work is not None:
                work.wait()
            if rank < len(block):  # this rank owns block[rank]; padding slots send zeros
                p = block[rank]
                self._apply(p, muon_update(self._momentum(p, out.div_(world), group), group), group)
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
        _, rank, _, world = common.dist_info()
        pending = []
        for group in self.param_groups:
            for p in group["params"]:
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                if world == 1:
                    self._update(p, grad, self.state[p], group)
                elif p.size(0) % world == 0:
                    out = torch.empty((p.size(0) // world, *p.shape[1:]), dtype=grad.dtype, device=grad.device)
                    pending.append((group, p, out, _reduce_scatter_sum(out, grad.contiguous().clone())))
                else:  # replicated: the whole gradient all-reduced, every rank updates all of p
                    out = grad.clone()
                    pending.append((group, p, out, dist.all_reduce(out, op=dist.ReduceOp.SUM, async_op=True)))
        gathers = []
        for group, p, out, work in pending:
            if work is not None:
                work.wait()
            mine = p if out.shape == p.shape else p.chunk(world)[rank]
            self._update(mine, out.div_(world), self.state[p], group)
            if mine is not p:
                gathers.append(_all_gather(p, mine.clone(), async_op=True))
        for work in gathers:
            work.wait()

def build_optimizers(model, args, lr_scale=1.0):
    """AdamW for lm_head, wte (lrs x (d/768)^-0.5) and the options' embeddings and scalars; Muon for transformer.h.
    Every lr x lr_scale (--scale-hparams) x --init-lr-frac. 2026: nanochat 92d63d4's AdamW betas and decay."""
    embedding_lr = args.embedding_lr * lr_scale
    unembedding_lr = args.unembedding_lr * lr_scale
    scalar_lr = args.scalar_lr * lr_scale
    s = (model.config.n_embd / 768) ** -0.5
    new = args.recipe == "2026"
    matrices = list(model.transformer.h.parameters())
    named = dict(model.named_parameters())
    groups = [dict(params=["lm_head.weight"], lr=unembedding_lr * s, betas=(0.8, 0.96 if new else 0.95),
                   weight_decay=0.01 * new),
              dict(params=["transformer.wte.weight"], lr=embedding_lr * s, betas=(0.8, 0.995 if new else 0.95),
                   weight_decay=0.001 * new),
              dict(params=[n for n in named if n.startswith("value_embeds.")], lr=embedding_lr * s / 2,
                   betas=(0.8, 0.995), weight_decay=0.01),
              dict(params=["resid_lambdas"], lr=scalar_lr * 0.01, betas=(0.8, 0.95), weight_decay=0.05),  # it compounds
              dict(params=["x0_lambdas"], lr=scalar_lr, betas=(0.96, 0.95)),
              dict(params=["smear_gate.weight", "smear_lambda", "backout_lambda"], lr=0.2)]
    groups = [dict(g, params=[named[n] for n in g["params"] if n in named]) for g in groups]
    groups = [g for g in groups if g["params"]]
    unassigned = len(list(model.parameters())) - len(matrices) - sum(len(g["params"]) for g in groups)
    assert unassigned == 0, "a parameter has no optimizer"
    adamw = AdamW(groups, betas=(0.8, 0.95), eps=1e-10)
    muon = Muon(matrices, lr=args.matrix_lr * lr_scale, momentum=0.95, **{k: getattr(args, k) for k in MUON_FLAGS})
    optimizers = [adamw, muon]
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] *= args.init_lr_frac
            group["initial_lr"] = group["lr"]  # schedules set lr = initial_lr * multiplier
    return optimizers

def optimizer_state(opt):
    """State keyed by parameter position (unlike torch's load_state_dict, ours keeps the fp32 state in fp32)."""
    index = {p: i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    return {"state": {index[p]: dict(s) for p, s in opt.state.items()},
            "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]}

def load_optimizer_state(opt, sd, groups=True):
    """groups=False keeps this run's learning rates and takes only the moments (SFT starting from mid's momentum)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    opt.state.clear()
    for i, s in sd["state"].items():
        p = params[int(i)]
        opt.state[p] = {k: v.to(p.device) if torch.is_tensor(v) else v for k, v in s.items()}
    for group, saved in zip(opt.param_groups, sd["groups"] if groups else []):
        group.update(saved)

def set_schedule(optimizers, lrm, momentum=None, weight_decay=0.0):
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if isinstance(opt, Muon):
                group["weight_decay"] = weight_decay
                if momentum is not None:
                    group["momentum"] = momentum

# -----------------------------------------------------------------------------
# schedules and batch arithmetic

def lr_multiplier(progress, warmdown=0.2, final=0.0):
    """1, then linear to `final` over the last `warmdown` of progress in [0, 1] (mid: not release's ramp-up, #68)."""
    f = 1.0 if progress <= 1.0 - warmdown else max(0.0, (1.0 - progress) / warmdown)
    return f + (1 - f) * final

def muon_momentum(step, num_steps=None, warmdown=0.2, recipe="release"):
    """release: 0.85 -> 0.95 over the first 300 steps. 2026: 0.85 -> 0.97 over the first 400, then down to 0.90 over
    the lr warmdown (nanochat 92d63d4 checks the first 400 steps first)."""
    if recipe == "release" or num_steps is None:
        frac = min(step / 300, 1.0)
        return (1 - frac) * 0.85 + frac * 0.95
    start = num_steps - round(warmdown * num_steps)
    if step < 400 or step < start:
        return 0.85 + 0.12 * min(step / 400, 1.0)
    return 0.97 - 0.07 * (step - start) / max(1, num_steps - start)

def grad_accum_steps(total, B, T, world):
    """-> (tokens per optimizer step, micro-steps per rank): total rounded to the nearest multiple of B*T*world (at
    least one), so any GPU count works (2^19 on 3 GPUs of 32 x 2048 rows becomes 589,824 in 3 micro-steps)."""
    per_step = B * T * world
    accum = max(1, round(total / per_step))
    if accum * per_step != total:
        print0(f"note: --total-batch-size {total:,} is not a multiple of {B} rows x {T} tokens x {world} ranks; "
               f"using {accum * per_step:,} ({accum} micro-steps; pass a multiple of {per_step:,} to choose)")
    return accum * per_step, accum

def rl_questions_per_rank(examples, world):
    """Questions per rank and step: --examples-per-step rounded to a multiple of the world size (at least one each)."""
    per_rank = max(1, round(examples / world))
    if per_rank * world != examples:
        print0(f"note: --examples-per-step {examples} is not a multiple of {world} ranks; using {per_rank * world}")
    return per_rank

# -----------------------------------------------------------------------------
# plain helpers the stages share: start-up and resume, one optimizer step, the log line, save, the closing report

Runtime = namedtuple("Runtime", "ddp rank world device cuda peak_flops tokenizer token_bytes")

def start(args):
    """Join the process group (torchrun: NCCL on GPU, gloo on CPU), pick the device, load the tokenizer. -> `run`."""
    ddp, rank, _, world, device = common.init_runtime(args.device, seed=args.seed)
    for sig in (signal.SIGINT, signal.SIGTERM):  # finish the step, save, exit (save_or_stop polls the flag)
        signal.signal(sig, on_signal)
    cuda = device.startswith("cuda")
    name = torch.cuda.get_device_name(device) if cuda else ""
    peak = next((f for key, f in PEAK_BF16_FLOPS.items() if key in name), None)  # for MFU
    return Runtime(ddp, rank, world, device, cuda, peak, tok_lib.get_tokenizer(), tok_lib.get_token_bytes(device))

STOP = dict(signal=0)  # the first SIGINT/SIGTERM received; the training loops stop at the next step boundary

def on_signal(signum, frame):
    STOP["signal"] = STOP["signal"] or signum

def save_or_stop(args, run, ckpt_dir, step, last, resumed_at, model, model_config, optimizers, loader, stats):
    """Save at --save-every steps and the last (not one resumed from); on SIGINT/SIGTERM on any rank: save, exit."""
    signum = STOP["signal"]
    if run.ddp:  # the signal if any rank had one: all ranks agree, so none waits alone in a collective
        signum = int(common.all_reduce([signum], run.device, op=dist.ReduceOp.MAX)[0])
    if step > 0 and step != resumed_at and (signum or last or due(args.save_every, step, False)):
        save(args, run, ckpt_dir, step, model, model_config, optimizers, loader, stats)
    if signum:
        saved = (f"saved step {stats['saved']} in {ckpt_dir}; continue with --resume" if stats["saved"]
                 else "nothing saved")
        print0(f"{signal.Signals(signum).name}: stopped at step {step}, {saved}", file=sys.stderr)
        common.cleanup_runtime()
        sys.exit(128 + signum)

def load_start(args, run, fresh_config=None):
    """With --resume the stage's newest complete checkpoint, else a fresh_config model (base), else the source stage's
    checkpoint, whose tag it saves under. -> (folder, model, model_config, trainer state or None, first step). Rank 0
    holds <folder>.lock for the whole run, so one run trains per folder (main's cleanup frees it)."""
    src_tag = None
    if fresh_config is None:  # the source's steps are checked once, by load_model, only when the stage starts from it
        src_tag = args.source_tag or model_lib.default_tag(common.checkpoint_dir(args.source))
        if src_tag is None:
            raise common.UserError(f"no {args.source} checkpoint in {common.checkpoint_dir(args.source)}: "
                                   f"run `python train.py --stage={args.source}` first")
    ckpt_dir = common.checkpoint_dir(args.stage, args.model_tag or src_tag or f"d{args.depth}")
    if run.rank == 0:
        common.writable(os.path.dirname(ckpt_dir))
        busy = f"another run trains into {ckpt_dir}; wait for it, or use another --model-tag"
        common.take_lock(ckpt_dir + ".lock", busy=busy)
        common.remove_stray_temps(ckpt_dir)  # half-written files of a killed run
    step = model_lib.last_step(ckpt_dir, run.world) if args.resume else None
    if args.resume and step is None and (other := model_lib.last_step(ckpt_dir)) is not None:  # no shards for us
        raise common.UserError(f"--resume: {ckpt_dir} step {other} holds no optimizer state for {run.world} rank(s): "
                               "resume with the number of ranks that saved it, or train under a new --model-tag")
    if args.resume and step is None:
        print0(f"--resume: no complete checkpoint in {ckpt_dir}; starting from the beginning")
        if run.rank == 0:
            trim_log(args.stage, 0)  # what an interrupted run logged before its first save is logged again
    if step is not None:
        state, trainer, meta = model_lib.load_checkpoint(ckpt_dir, step, run.device, load_optimizer=True,
                                                         rank=run.rank, tokenizer=run.tokenizer)
        if meta.get("world_size", run.world) != run.world:
            raise common.UserError(f"{ckpt_dir} step {step} was saved by {meta['world_size']} ranks; "
                                   "resume with the same number")
        model = model_lib.build_model(meta["model_config"], run.device)
        model.load_state_dict(state)
        print0(f"resuming {args.stage} from {ckpt_dir} step {step}")
        return ckpt_dir, model, meta["model_config"], trainer, step
    if fresh_config is not None:
        return ckpt_dir, model_lib.build_model(fresh_config, run.device, args.init), fresh_config, None, 0
    model, meta = model_lib.load_model(args.source, run.device, tag=src_tag, step=args.source_step,
                                       tokenizer=run.tokenizer)
    src_dir = common.checkpoint_dir(args.source, src_tag)
    print0(f"{args.stage}: starting from {args.source} checkpoint {src_dir} step {meta.get('step')}")
    trainer = None
    optim = os.path.join(src_dir, f"optim_{meta['step']:06d}_rank{run.rank}.pt")
    if args.source_optimizer and meta.get("world_size", 1) != run.world:  # each rank's shard of the moments is its own
        print0(f"note: the {args.source} run had {meta.get('world_size', 1)} ranks, this one {run.world}: "
               "starting from fresh optimizer moments")
    elif args.source_optimizer and common.all_reduce([not os.path.exists(optim)], run.device, op=dist.ReduceOp.MAX)[0]:
        print0(f"note: {src_dir} step {meta['step']} has no optimizer state for {run.world} rank(s) "
               f"({os.path.basename(optim)} is missing): starting from fresh optimizer moments")
    elif args.source_optimizer:  # carry the source's optimizer moments over (its own learning rates are not kept)
        _, trainer, _ = model_lib.load_checkpoint(src_dir, meta["step"], run.device, load_optimizer=True, rank=run.rank)
    model.train()
    return ckpt_dir, model, meta["model_config"], trainer, 0

def past_end(args, run, ckpt_dir, step, num_steps, stats):
    """Resumed at or past the last step: a note and True. Else False; the log drops the records it will write again."""
    if step < num_steps if num_steps else stats["progress"] < 1.0:
        if run.rank == 0:
            trim_log(args.stage, step)
        return False
    print0(f"--resume: {ckpt_dir} step {step} is at or past the end of this run "
           f"({f'--num-iterations {num_steps}' if num_steps else 'one epoch'}); nothing to train")
    return True

def trim_log(stage, step):
    """--resume from `step`: drop the log records from that step on (the resumed run logs them again) and torn lines."""
    path = os.path.join(common.report_dir(), f"{stage}_log.jsonl")
    keep = []
    for line in open(path) if os.path.exists(path) else []:
        try:
            if json.loads(line)["step"] < step:
                keep.append(line.rstrip("\n") + "\n")
        except (ValueError, KeyError, TypeError):
            pass
    common.atomic_write_text(path, "".join(keep))

def seq_len(args, model_config, resumed, default):
    """T: --max-seq-len, else the checkpoint's when resuming (it must keep it), else `default`; in the rotary span."""
    S = model_config["sequence_len"]
    T = args.max_seq_len or (S if resumed else default)
    if resumed and T != S:
        raise common.UserError(f"--max-seq-len {T}: the checkpoint resumed from was trained at {S}; "
                               f"resume with --max-seq-len {S} (or without the flag)")
    if T > model_lib.ROPE_SPAN * S:
        raise common.UserError(f"--max-seq-len {T} is past the {model_lib.ROPE_SPAN * S} positions the {args.source} "
                               "model's rotary tables cover; use at most that")
    return T

def restore(trainer, optimizers, loader):
    """-> the running figures a checkpoint carries (so a resumed run logs exactly what an uninterrupted one would);
    given a checkpoint's trainer state, continue where it stopped: optimizer state, loader position, RNG streams."""
    stats = dict(smooth_loss=0.0, total_time=0.0, timed_steps=0, tokens=0, flops=0.0, val_bpb=None, min_val_bpb=None,
                 progress=0.0, saved=None)
    if trainer is None:
        return stats
    for opt, sd in zip(optimizers, trainer["optimizers"]):
        load_optimizer_state(opt, sd)
    if loader is not None:
        loader.load_state_dict(trainer["loader"])
    stats.update(trainer["stats"])
    torch.set_rng_state(trainer["rng"]["torch"])
    random.setstate(trainer["rng"]["python"])
    np.random.set_state(trainer["rng"]["numpy"])
    if "cuda" in trainer["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(trainer["rng"]["cuda"])
    return stats

def compiled(model, args):
    """torch.compile unless --compile 0, on CPU too: faster steps after a one-time compile of a minute or more."""
    return model if args.compile == 0 else torch.compile(model, dynamic=False)

def optimizer_step(model, optimizers, lrm, momentum, check_sync=False, weight_decay=0.0):
    """Set the schedule, step both optimizers (they average gradients across ranks), clear the gradients."""
    set_schedule(optimizers, lrm, momentum, weight_decay)
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    if check_sync and dist.is_initialized():  # --check-sync: every rank must now hold bit-identical weights
        digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in model.parameters())).hexdigest()
        digests = [None] * dist.get_world_size()
        dist.all_gather_object(digests, digest)
        if len(set(digests)) != 1:
            raise common.UserError(f"the ranks' weights differ after this step (sha256 {sorted(set(digests))})")

def due(every_n, step, last):
    """Whether an every-N flag (-1: off) fires at this step: on its multiples and at the last step."""
    return every_n > 0 and (last or step % every_n == 0)

def memory_line(model, rows, T, world, cuda):
    e = model_lib.estimate_memory(model, rows, world, cuda, T)
    sizes = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in e.items())
    return f"memory estimate per rank at {rows} rows x {T}: {sizes} GiB"

def accumulate(args, run, model, train_model, loader, accum, first):
    """One step's micro-steps (gradients add up) -> (last loss, accum). --device-batch-size auto, first step: on out of
    memory on any rank, halve the rows, double the accumulation and retry from the loader position before the step."""
    state = loader.state_dict() if first and args.auto_batch else None
    while True:
        oom = 0
        try:
            for _ in range(accum):
                x, y = next(loader)
                loss = lm_loss(train_model, x, y)
                (loss / accum).backward()
        except torch.OutOfMemoryError:
            if state is None:
                raise
            oom = 1
        if state is None or not common.all_reduce([oom], run.device, op=dist.ReduceOp.MAX)[0]:
            break
        model.zero_grad(set_to_none=True)  # out of the except block: its traceback, holding the step's tensors, is gone
        torch.cuda.empty_cache()
        if loader.B == 1:
            raise common.UserError("one row per device does not fit in memory; use a smaller --depth or --max-seq-len")
        accum, loader.B = (accum * 2, loader.B // 2) if loader.B % 2 == 0 else (accum * loader.B, 1)
        print0(f"device batch size auto: out of memory; retrying with {loader.B} rows x {accum} micro-steps")
        loader.load_state_dict(state)
    if state is not None and (run.cuda or loader.B < args.device_batch_size):
        print0(f"device batch size auto: {loader.B} rows, {accum} micro-steps (pin it with --device-batch-size "
               f"{loader.B}); " + memory_line(model, loader.B, loader.T, run.world, run.cuda))
    return loss, accum

def log_eval(stage, step, metrics, stats):
    if "val_bpb" in metrics:
        stats["val_bpb"] = metrics["val_bpb"]
        stats["min_val_bpb"] = min(stats["min_val_bpb"] or math.inf, metrics["val_bpb"])
    if metrics:
        print0(f"step {step:05d} | " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        common.append_log(stage, dict(step=step, **metrics))

def log_step(args, run, step, num_steps, loss, lrm, dt, tokens, flops_per_token, stats, extra=None, wandb_run=None):
    """Average the loss over ranks, stop on a non-finite one, update the running stats, print and log the step line."""
    loss = common.all_reduce([loss], run.device)[0] / run.world
    if not math.isfinite(loss):
        where = (f"the last good checkpoint is step {stats['saved']} (continue with --resume, e.g. at a lower lr)"
                 if stats["saved"] else "no checkpoint was saved yet")
        raise common.UserError(f"the training loss became {loss} at step {step}; stopping. {where}")
    stats["smooth_loss"] = 0.9 * stats["smooth_loss"] + 0.1 * loss
    smooth = stats["smooth_loss"] / (1 - 0.9 ** (step + 1))
    if step > 10 or (num_steps or 0) <= 20:  # the first steps include compilation
        stats["total_time"] += dt
        stats["timed_steps"] += 1
    stats["tokens"] += tokens
    stats["flops"] += (flops_per_token or 0) * tokens
    peak = run.peak_flops * run.world if run.peak_flops and flops_per_token else None
    mfu = 100 * flops_per_token * tokens / dt / peak if peak else None
    avg_dt = stats["total_time"] / stats["timed_steps"] if stats["timed_steps"] else dt
    if num_steps:
        head = f"step {step:05d}/{num_steps:05d} ({100 * (step + 1) / num_steps:.2f}%)"
        eta = avg_dt * (num_steps - step - 1)
    else:
        frac = max(stats["progress"], 1e-9)
        head = f"step {step:05d} ({100 * frac:.2f}% of the epoch)"
        eta = avg_dt * (step + 1) * (1 - frac) / frac
    extra = extra or {}
    print0(f"{head} | loss {smooth:.6f} | lrm {lrm:.4f} | dt {1000 * dt:.2f}ms | tok/s {tokens / dt:,.0f} | "
           f"mfu {'n/a' if mfu is None else f'{mfu:.2f}'}" + "".join(f" | {k} {v:.4f}" for k, v in extra.items()) +
           f" | elapsed {stats['total_time'] / 60:.2f}m | eta {eta / 60:.2f}m")
    record = dict(step=step, train_loss=smooth, loss=loss, lrm=lrm, dt=dt, tok_per_sec=tokens / dt,
                  tokens=stats["tokens"], **extra)
    common.append_log(args.stage, record)
    if wandb_run is not None:
        wandb_run.log(dict(record, total_training_flops=stats["flops"], mfu=mfu or 0.0), step=step)

def save(args, run, ckpt_dir, step, model, model_config, optimizers, loader, stats):
    """Model + meta (rank 0) and every rank's optimizer shard with the loader position, RNG streams, running stats."""
    stats["saved"] = step
    rng = dict(torch=torch.get_rng_state(), python=random.getstate(), numpy=np.random.get_state())
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    loader_state = loader.state_dict() if loader is not None else {}
    meta = dict(step=step, stage=args.stage, model_config=model_config, user_config=vars(args), world_size=run.world,
                tokenizer_hash=run.tokenizer.hash, val_bpb=stats["val_bpb"], loader_state=loader_state)
    meta = json.loads(json.dumps(meta, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
    trainer = dict(optimizers=[optimizer_state(o) for o in optimizers], loader=loader_state, rng=rng, stats=dict(stats))
    model_lib.save_checkpoint(ckpt_dir, step, model.state_dict(), meta, trainer, rank=run.rank)
    if run.ddp:
        dist.barrier()

def start_wandb(args, run):
    if args.run == "dummy" or run.rank != 0:
        return None
    try:
        import wandb
        return wandb.init(project="nanochat", name=args.run, config=vars(args))
    except ImportError:
        print0("wandb is not installed: not logging to wandb")

def finish(args, run, model, model_config, stats, step, flops_per_token, wandb_run, **summary):
    """Print the closing line and write the stage's report section."""
    mem = (torch.cuda.max_memory_allocated(run.device) / 2**20 if run.cuda
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    summary = {"stage": args.stage, "parameters": model.param_counts()["total"], "depth": model_config["n_layer"],
               "sequence length": model_config["sequence_len"], "world size": run.world, "iterations": step,
               "tokens": stats["tokens"], "FLOPs per token": flops_per_token or 0,
               "total training FLOPs": f"{stats['flops']:.4e}", "training time (min)": stats["total_time"] / 60,
               "peak memory (MiB)": mem, **summary}
    min_bpb = ""
    if stats["min_val_bpb"] is not None:
        summary.update({"min val bpb": stats["min_val_bpb"], "final val bpb": stats["val_bpb"]})
        min_bpb = f", min val bpb {stats['min_val_bpb']:.4f}"
    if args.check_sync and run.ddp:
        print0(f"check-sync: the weights were identical on all {run.world} ranks after every step")
    print0(f"done: {stats['tokens']:,} tokens, {stats['flops']:.3e} FLOPs, {stats['total_time'] / 60:.2f} min of "
           f"training, peak memory {mem:.0f} MiB{min_bpb}")
    flags = {k: v for k, v in vars(args).items() if v is not None}
    common.write_report_section(common.TRAINING_SECTIONS[args.stage], [flags, summary])
    if wandb_run is not None:
        wandb_run.finish()
    if run.ddp:
        dist.barrier()  # nobody tears the group down while another rank still talks (gloo aborts otherwise)

# -----------------------------------------------------------------------------
# base: a fresh model of --depth on the pretraining shards, tokens = ratio x parameters

def train_base(args):
    run = start(args)
    # start: a fresh model (or, with --resume, this run's newest complete checkpoint)
    common.list_shards("train"), common.list_shards("val")  # fail now, with the download hint, if shards are missing
    V, T, B = run.tokenizer.get_vocab_size(), args.max_seq_len or 2048, args.device_batch_size
    fresh = asdict(model_lib.config_from_depth(args.depth, V, T, **arch_options(args)))
    ckpt_dir, model, model_config, trainer, step = load_start(args, run, fresh_config=fresh)
    T = seq_len(args, model_config, step > 0, T)
    # data and batch: documents packed BOS-aligned into rows of T+1 tokens; steps from the tokens : parameters ratio
    loader = data.PretrainLoader(run.tokenizer, B, T, split="train", device=run.device, rank=run.rank,
                                 world_size=run.world)
    total, accum = grad_accum_steps(args.total_batch_size, B, T, run.world)
    params = model.param_counts()["total"]
    flops_per_token = model.estimate_flops()
    ratio_params = ratio_parameters(model, args.recipe)
    ratio_steps = max(1, int(args.target_param_data_ratio * ratio_params) // total)
    num_steps = args.num_iterations if args.num_iterations > 0 else ratio_steps
    # --scale-hparams: nanochat's transfer from its d12 at 2^19 tokens: lr ~ sqrt(batch), decay ~ sqrt(batch) / tokens
    lr_scale = 1.0
    weight_decay = args.weight_decay
    if args.scale_hparams:
        with torch.device("meta"):
            d12 = model_lib.GPT(model_lib.config_from_depth(12, V, T, **arch_options(args)))
        lr_scale = (total / B_REF) ** 0.5
        weight_decay *= lr_scale * ratio_parameters(d12, args.recipe) / ratio_params
    optimizers = build_optimizers(model, args, lr_scale)
    stats = restore(trainer, optimizers, loader)
    train_model = compiled(model, args)
    wandb_run = start_wandb(args, run)
    print0(f"base: {params:,} parameters, T={T}, device={run.device}, world={run.world}, steps={num_steps}, "
           f"tokens/step={total:,} ({accum} micro-steps of {B} rows per rank)")
    print0(memory_line(model, B, T, run.world, run.cuda))
    val_steps = base_val_steps(run, args.eval_tokens // (B * T * run.world), B, T)
    resumed_at = step if step > 0 else None
    if resumed_at is not None and past_end(args, run, ckpt_dir, step, num_steps, stats):
        return loader.close()
    while True:  # save (before the evals: nanochat #446) -> evaluate -> stop at the end -> one optimizer step
        last = step == num_steps
        save_or_stop(args, run, ckpt_dir, step, last, resumed_at, model, model_config, optimizers, loader, stats)
        metrics = {}
        with torch.no_grad():
            if (last or due(args.eval_every, step, last)) and val_steps:
                # a fresh loader each time: identical val tokens, as eval.py reads them
                val = data.PretrainLoader(run.tokenizer, B, T, split="val", device=run.device, rank=run.rank,
                                          world_size=run.world)
                metrics["val_bpb"] = nc_eval.evaluate_bpb(model, val, val_steps, run.token_bytes)
                val.close()
            if due(args.core_metric_every, step, last) and step > 0:
                metrics["core"] = nc_eval.evaluate_core(model, run.tokenizer, run.device,
                                                        max_per_task=args.core_metric_max_per_task)["core"]
            if due(args.sample_every, step, last) and step > 0 and run.rank == 0:
                nc_eval.greedy_samples(model, run.tokenizer)
        model.train()
        log_eval("base", step, metrics, stats)
        if last:
            break
        t0 = time.time()
        loss, accum = accumulate(args, run, model, train_model, loader, accum, step == (resumed_at or 0))
        lrm = lr_multiplier(step / num_steps, args.warmdown_ratio, args.final_lr_frac)
        if step < args.warmup_steps:
            lrm = (step + 1) / args.warmup_steps
        wd = weight_decay * 0.5 * (1 + math.cos(math.pi * step / num_steps))  # cosine to 0 over the run
        momentum = muon_momentum(step, num_steps, args.warmdown_ratio, args.recipe)
        optimizer_step(model, optimizers, lrm, momentum, args.check_sync, wd)
        if run.cuda:
            torch.cuda.synchronize()
        log_step(args, run, step, num_steps, loss.item(), lrm, time.time() - t0, total, flops_per_token, stats,
                 wandb_run=wandb_run)
        step += 1
    loader.close()
    finish(args, run, model, model_config, stats, step, flops_per_token, wandb_run,
           **{"tokens : params": stats["tokens"] / params}, **metrics)

def arch_options(args):
    """The model flags as GPTConfig fields (0/1 flags become bools)."""
    return {k: type(model_lib.GPTConfig.__dataclass_fields__[k].default)(getattr(args, k)) for k in ARCH_FLAGS}

def ratio_parameters(model, recipe):
    """The parameters --target-param-data-ratio counts: release all; 2026 the matrices and lm_head (nanochat's fit)."""
    n = model.param_counts()
    return n["total"] if recipe == "release" else n["blocks"] + n["lm_head"]

def base_val_steps(run, want, B, T):
    """Val batches per evaluation, capped at what this rank's share of the val shard holds (same on all ranks)."""
    have = 0
    for _, _, texts in common.iter_row_groups("val", run.rank, run.world):
        have += sum(len(ids) + 1 for ids in run.tokenizer.encode(texts))
        if have >= want * B * T:
            break
    steps = int(common.all_reduce([min(want, have // (B * T))], run.device, op=dist.ReduceOp.MIN)[0])
    if steps < want:
        print0(f"val shard holds {steps} of the {want} requested eval batches; evaluating on {steps}")
    return steps

# -----------------------------------------------------------------------------
# mid and SFT: a checkpoint finetuned on a mixture of conversations, one epoch by default.
# mid trains on every token of the chats; SFT only on the assistant's tokens.

def task_size(n):
    return None if n < 0 else n  # -1: every row of the task

def train_chat(args):
    own = [data.ChatFile(path) for path in args.chat_data]  # --chat-data: every line checked before anything starts
    run = start(args)
    mid = args.stage == "mid"
    # start: the source checkpoint (mid from base, sft from mid), or this stage's newest with --resume
    ckpt_dir, model, model_config, trainer, step = load_start(args, run)
    T = seq_len(args, model_config, step > 0, model_config["sequence_len"])
    B = args.device_batch_size
    model_config = dict(model_config, sequence_len=T)  # the next stage's default T is the one trained here
    model_lib.set_sequence_len(model, T)  # short attention windows are a quarter of it
    # the mixture: edit the lists freely (a task listed twice is seen twice; size 0 leaves it out)
    if mid:
        mixture = [data.SmolTalk("train", size=task_size(args.smoltalk_size)),
                   data.MMLU("auxiliary_train", "train", size=task_size(args.mmlu_size)),
                   data.GSM8K("train", size=task_size(args.gsm8k_size)),
                   data.Identity(size=task_size(args.identity_size)),
                   data.Identity(size=task_size(args.identity_size)),
                   data.SimpleSpelling(size=args.simple_spelling_size, split="train"),
                   data.SpellingBee(size=args.spelling_bee_size, split="train")]
        val_task = data.TaskMixture([data.SmolTalk("test", size=task_size(args.val_size)),
                                     data.MMLU("all", "test", size=task_size(args.val_size) or 5200),
                                     data.GSM8K("test", size=task_size(args.val_size) or 420)], seed=42)
    else:
        mixture = [data.ARC("ARC-Easy", "train", size=task_size(args.arc_size)),
                   data.ARC("ARC-Challenge", "train", size=task_size(args.arc_size)),
                   data.GSM8K("train", size=task_size(args.gsm8k_size)),
                   data.SmolTalk("train", size=task_size(args.smoltalk_size)),
                   data.Identity(size=task_size(args.identity_size)),
                   data.SimpleSpelling(size=args.simple_spelling_size, split="train"),
                   data.SpellingBee(size=args.spelling_bee_size, split="train")]
        val_task = data.SmolTalk("test", size=task_size(args.val_size))
    mixture = [t for t in mixture if len(t)] + own * args.chat_data_epochs
    train_task = data.TaskMixture(mixture, seed=42)
    parts = ", ".join(f"{type(t).__name__} {len(t):,}" for t in mixture)
    print0(f"{args.stage} mixture: {len(train_task):,} conversations ({parts})")
    # batch: rows of T+1 tokens, packed best-fit with whole conversations (--pack 0: one conversation per row)
    loader = data.ChatLoader(train_task, run.tokenizer, B, T, device=run.device, rank=run.rank, world_size=run.world,
                             completion_only=not mid, pack=bool(args.pack))
    total, accum = grad_accum_steps(args.total_batch_size, B, T, run.world)
    num_steps = args.num_iterations if args.num_iterations > 0 else None  # None: one epoch
    optimizers = build_optimizers(model, args)
    stats = restore(trainer if step > 0 else None, optimizers, loader)
    if trainer is not None and step == 0:  # --source-optimizer 1: the source run's moments, this run's learning rates
        for opt, sd in zip(optimizers, trainer["optimizers"]):
            load_optimizer_state(opt, sd, groups=False)
    train_model = compiled(model, args)
    wandb_run = start_wandb(args, run)
    flops_per_token = model.estimate_flops()
    print0(f"{args.stage}: T={T}, device={run.device}, world={run.world}, steps={num_steps or 'one epoch'}, "
           f"tokens/step={total:,} ({accum} micro-steps of {B} rows per rank), lr x{args.init_lr_frac}, "
           f"warmdown {args.warmdown_ratio}")
    print0(memory_line(model, B, T, run.world, run.cuda))
    val_steps = args.eval_tokens // (B * T * run.world)
    resumed_at = step if step > 0 else None
    if resumed_at is not None and past_end(args, run, ckpt_dir, step, num_steps, stats):
        return
    while True:
        last = step == num_steps if num_steps else stats["progress"] >= 1.0
        save_or_stop(args, run, ckpt_dir, step, last, resumed_at, model, model_config, optimizers, loader, stats)
        metrics = {}
        with torch.no_grad():
            if (last or due(args.eval_every, step, last)) and val_steps:  # held-out chats, the tokens trained on
                val = repeat(lambda: data.ChatLoader(val_task, run.tokenizer, B, T, device=run.device, rank=run.rank,
                                                     world_size=run.world, completion_only=not mid))
                metrics["val_bpb"] = nc_eval.evaluate_bpb(model, val, val_steps, run.token_bytes)
            if due(args.chat_eval_every, step, last) and step > 0:
                for name in ("MMLU", "ARC-Easy"):
                    metrics[name] = nc_eval.run_chat_eval(name, model, run.tokenizer, run.device,
                                                          max_problems=args.chat_eval_problems)
        model.train()
        log_eval(args.stage, step, metrics, stats)
        if last:
            break
        progress = step / num_steps if num_steps else stats["progress"]
        lrm = lr_multiplier(progress, args.warmdown_ratio)
        t0 = time.time()
        loss, accum = accumulate(args, run, model, train_model, loader, accum, step == (resumed_at or 0))
        optimizer_step(model, optimizers, lrm, muon_momentum(step) if mid else None, args.check_sync)
        # the epoch ends for every rank when it ends for any
        stats["progress"] = common.all_reduce([loader.progress], run.device, op=dist.ReduceOp.MAX)[0]
        log_step(args, run, step, num_steps, loss.item(), lrm, time.time() - t0, total, flops_per_token, stats,
                 wandb_run=wandb_run)
        step += 1
    finish(args, run, model, model_config, stats, step, flops_per_token, wandb_run, **metrics)

def lm_loss(model, x, y):
    """Mean CE over the targets y >= 0; none gives 0, not NaN, so DDP ranks stay in step ('sum': no recompute)."""
    return model(x, y, loss_reduction="sum") / (y >= 0).sum().clamp(min=1)

def repeat(make_loader):
    """Endless batches from a loader, recreated when it runs out (small validation sets)."""
    while True:
        yield from make_loader()

# -----------------------------------------------------------------------------
# RL: on-policy REINFORCE on GSM8K train from the SFT model, group-mean baseline, token-level normalisation, no KL

def group_advantages(rewards):
    """REINFORCE with a group-mean baseline: A = r - mean(r) (no std division)."""
    return rewards - rewards.mean()

def rl_pass_loss(model, ids, mask, advantages, normaliser):
    """Policy-gradient loss of one pass: only sampled tokens (mask 1 on the target) count; token-level normalisation."""
    inputs, targets = ids[:, :-1], ids[:, 1:].masked_fill(mask[:, 1:] == 0, -1)
    logp = -model(inputs, targets, loss_reduction="none")  # (B, T-1); 0 at ignored targets
    n_valid = (targets >= 0).sum().clamp(min=1)
    return -(logp * advantages[:, None]).sum() / (n_valid * normaliser)

def sample(engine, prompt, n, seed, args):
    engine.model.eval()  # Engine.generate runs under inference_mode
    rows, masks = engine.generate_batch(prompt, num_samples=n, max_tokens=args.max_new_tokens,
                                        temperature=args.temperature, top_k=args.top_k, seed=seed)
    engine.model.train()
    return rows, masks

def train_rl(args):
    run = start(args)
    tok = run.tokenizer
    B = args.device_batch_size
    # start: the SFT checkpoint, or this stage's newest with --resume
    ckpt_dir, model, model_config, trainer, step = load_start(args, run)
    # data: GSM8K train in one fixed shuffled order; rank r takes questions r, r+W, ... of each step's share
    train_task = data.GSM8K("train", size=task_size(args.gsm8k_size))
    test_task = data.GSM8K("test")
    order = list(range(len(train_task)))
    random.Random(42).shuffle(order)
    if args.num_samples % B:
        raise common.UserError(f"--num-samples {args.num_samples} must be a multiple of --device-batch-size {B}")
    per_rank = rl_questions_per_rank(args.examples_per_step, run.world)
    passes = args.num_samples // B
    num_steps = args.num_iterations if args.num_iterations > 0 else max(1, len(train_task) // (per_rank * run.world))
    optimizers = build_optimizers(model, args)
    stats = restore(trainer if step > 0 else None, optimizers, None)  # no loader: the data order follows the step
    engine = model_lib.Engine(model, tok)
    pad = tok.encode_special("<|assistant_end|>")
    wandb_run = start_wandb(args, run)
    print0(f"rl: device={run.device}, world={run.world}, steps={num_steps}, "
           f"{per_rank * run.world} questions x {args.num_samples} samples per step")
    resumed_at = step if step > 0 else None
    if resumed_at is not None and past_end(args, run, ckpt_dir, step, num_steps, stats):
        return
    while True:
        last = step == num_steps
        save_or_stop(args, run, ckpt_dir, step, last, resumed_at, model, model_config, optimizers, None, stats)
        metrics = {}
        if (last or due(args.eval_every, step, last)) and args.eval_examples > 0:  # pass@k on GSM8K test, k = 1..8
            hits, count = [0.0] * 8, 0
            for i in range(run.rank, min(len(test_task), args.eval_examples), run.world):
                conv = test_task[i]
                prompt = tok.render_for_completion(conv)
                rows, _ = sample(engine, prompt, 8, i, args)
                ok = [test_task.evaluate(conv, tok.decode(r[len(prompt):])) for r in rows]
                hits = [h + float(any(ok[:k + 1])) for k, h in enumerate(hits)]
                count += 1
            tot = common.all_reduce(hits + [count], run.device)
            metrics = {f"pass@{k + 1}": tot[k] / max(1, tot[-1]) for k in range(8)}
        log_eval("rl", step, metrics, stats)
        if last:
            break
        t0 = time.time()
        rewards_all, lengths = [], []
        for j in range(per_rank):
            idx = order[(run.rank + run.world * (step * per_rank + j)) % len(order)]
            conv = train_task[idx]
            prompt = tok.render_for_completion(conv)
            rows, masks = [], []
            for s in range(passes):  # the group of num_samples completions, B per forward pass
                r, m = sample(engine, prompt, B, hash((step, idx, s)) & 0x7FFFFFFF, args)
                rows, masks = rows + r, masks + m
            # the reward: 1 when the completion's `#### answer` equals the reference's (GSM8K.evaluate), else 0
            rewards = torch.tensor([float(train_task.evaluate(conv, tok.decode(r[len(prompt):]))) for r in rows],
                                   device=run.device)
            adv = group_advantages(rewards)
            for s in range(passes):
                chunk = slice(s * B, (s + 1) * B)
                L = max(len(r) for r in rows[chunk])
                ids = torch.tensor([r + [pad] * (L - len(r)) for r in rows[chunk]], device=run.device)
                mask = torch.tensor([m + [0] * (L - len(m)) for m in masks[chunk]], device=run.device)
                loss = rl_pass_loss(model, ids, mask, adv[chunk], passes * per_rank)
                loss.backward()
            rewards_all += rewards.tolist()
            lengths += [len(r) - len(prompt) for r in rows]
        lrm = lr_multiplier(step / num_steps, args.warmdown_ratio)
        optimizer_step(model, optimizers, lrm, None, args.check_sync)
        reward, n, tokens = common.all_reduce([sum(rewards_all), len(rewards_all), sum(lengths)], run.device)
        log_step(args, run, step, num_steps, loss.item(), lrm, time.time() - t0, int(tokens), None, stats,
                 extra={"reward": reward / n, "seq_len": tokens / n}, wandb_run=wandb_run)
        step += 1
    finish(args, run, model, model_config, stats, step, None, wandb_run, **metrics)

# -----------------------------------------------------------------------------
# arguments

def rows_or_auto(v):
    return v if v == "auto" else int(v)

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train one stage of the nanochat pipeline. Every-N flags: -1 disables.")
    p.add_argument("--stage", choices=["base", "mid", "sft", "rl"], default="base")
    p.add_argument("--run", default="dummy", help="wandb run name; 'dummy' (default) disables wandb")
    p.add_argument("--device", default=None, help="cuda|cpu (default: autodetect)")
    p.add_argument("--model-tag", default=None, help="checkpoint folder tag (default d<depth>, or the source's tag)")
    p.add_argument("--resume", action="store_true", help="continue from this stage's latest checkpoint, if any")
    p.add_argument("--compile", type=int, choices=[0, 1], help="torch.compile the model (default: 1; rl: never)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--check-sync", type=int, choices=[0, 1], default=0, help="DDP: check ranks' weights agree per step")
    # model and batch
    p.add_argument("--depth", type=int, default=20, help="base: the single size dial (d = 64*depth)")
    p.add_argument("--max-seq-len", type=int, help="T (default: 2048 for base, the source model's for the others)")
    p.add_argument("--device-batch-size", type=rows_or_auto,
                   help="rows per rank per micro-step (rl: samples per pass); auto (default): halved on CUDA OOM")
    p.add_argument("--dry-run", action="store_true", help="base: print the memory estimate, rows fitting 24/40/80 GB")
    p.add_argument("--total-batch-size", type=int,
                   help="tokens per optimizer step, all ranks (rounded to a multiple of rows x T x ranks)")
    p.add_argument("--num-iterations", type=int, default=-1,
                   help="optimizer steps (-1: base from the ratio, mid/sft/rl one epoch)")
    p.add_argument("--target-param-data-ratio", type=float,
                   help="base: tokens = ratio * parameters (release 20 x all; 2026 12 x matrices and lm_head)")
    # the recipe: flags left unset take its values; model flags apply to a fresh base model, lrs and schedule to base
    p.add_argument("--recipe", choices=list(RECIPES), default="release",
                   help="release: nanochat of Oct 2025; 2026: nanochat 92d63d4's model, init and optimizer (README)")
    p.add_argument("--window-pattern", help="attention span per layer, tiled: L all, S a quarter of T (last layer: L)")
    p.add_argument("--rope-base", type=int, help="rotary base theta (release 10000, 2026 100000)")
    p.add_argument("--qk-scale", type=float, help="q and k times this after QK-norm (2026: 1.2)")
    p.add_argument("--pad-vocab-to", type=int, help="wte/lm_head rows rounded up to a multiple of this (2026: 64)")
    p.add_argument("--resid-lambdas", type=int, choices=[0, 1], help="learned per-layer residual and x0 scalars")
    p.add_argument("--value-embeds", type=int, choices=[0, 1], help="gated value embeddings on alternating layers")
    p.add_argument("--smear", type=int, choices=[0, 1], help="add the previous token's embedding by a learned gate")
    p.add_argument("--backout", type=int, choices=[0, 1], help="subtract a learned share of the mid-layer residual")
    p.add_argument("--init", choices=["release", "2026"], help="base: weight init (2026: uniform blocks, small head)")
    p.add_argument("--polar-express", type=int, choices=[0, 1], help="Muon: Polar Express instead of Newton-Schulz")
    p.add_argument("--normuon", type=int, choices=[0, 1], help="Muon: NorMuon per-neuron update normalisation")
    p.add_argument("--muon-eq", type=int, choices=[0, 1], help="Muon: MuonEq row equilibration before orthogonalising")
    p.add_argument("--muon-plus", type=int, choices=[0, 1], help="Muon: Muon+ norm correction after orthogonalising")
    p.add_argument("--weight-decay", type=float, help="base: Muon's cautious weight decay, cosine to 0 over the run")
    p.add_argument("--scale-hparams", type=int, choices=[0, 1],
                   help="base: lrs x sqrt(batch / 2^19), weight decay by nanochat's transfer rule from its d12")
    p.add_argument("--warmup-steps", type=int, help="base: steps of linear lr warmup")
    p.add_argument("--final-lr-frac", type=float, help="base: the lr at the warmdown's end, a fraction of the peak")
    # optimization
    p.add_argument("--embedding-lr", type=float, default=None, help="AdamW, wte (release 0.2, 2026 0.3)")
    p.add_argument("--unembedding-lr", type=float, default=None, help="AdamW, lm_head (release 0.004, 2026 0.008)")
    p.add_argument("--matrix-lr", type=float, default=0.02)
    p.add_argument("--scalar-lr", type=float, default=None, help="AdamW, the per-layer scalars (resid_lambdas: x0.01)")
    p.add_argument("--init-lr-frac", type=float, help="all lrs times this (base/mid 1.0, sft 0.8, rl 0.05)")
    p.add_argument("--warmdown-ratio", type=float, help="fraction of the run over which the lr decays linearly to 0")
    # evaluation, sampling, saving
    p.add_argument("--eval-every", type=int, help="val bpb (base/mid/sft), pass@k (rl) every N steps and at the end")
    p.add_argument("--eval-tokens", type=int, help="val tokens per evaluation (at most what the val shard holds)")
    p.add_argument("--core-metric-every", type=int, default=2000, help="base: CORE every N steps and at the end")
    p.add_argument("--core-metric-max-per-task", type=int, default=500)
    p.add_argument("--sample-every", type=int, default=2000, help="base: greedy samples every N steps and at the end")
    p.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (always at the end)")
    # mid / sft / rl
    p.add_argument("--source", choices=["base", "mid", "sft"], help="the stage to start from (default: the one before)")
    p.add_argument("--source-tag", default=None)
    p.add_argument("--source-step", type=int, default=None)
    p.add_argument("--source-optimizer", type=int, choices=[0, 1], help="mid/sft: start from the source run's moments")
    p.add_argument("--pack", type=int, choices=[0, 1], help="mid/sft: 1 packs chats into full rows, 0 one per row")
    p.add_argument("--smoltalk-size", type=int, default=None, help="SmolTalk train rows (-1: all; mid all, sft 10000)")
    p.add_argument("--mmlu-size", type=int, default=-1, help="mid: MMLU auxiliary_train rows")
    p.add_argument("--gsm8k-size", type=int, default=-1, help="GSM8K train rows (mid, sft, rl)")
    p.add_argument("--arc-size", type=int, default=-1, help="sft: rows of each of ARC-Easy and ARC-Challenge train")
    p.add_argument("--identity-size", type=int, default=-1, help="identity conversations (mid uses them twice)")
    p.add_argument("--simple-spelling-size", type=int, default=None, help="SimpleSpelling rows (mid 200000, sft 300)")
    p.add_argument("--spelling-bee-size", type=int, default=None, help="SpellingBee rows (mid 80000, sft 300)")
    p.add_argument("--chat-data", action="append", default=[], metavar="FILE.jsonl",
                   help='mid/sft: your conversations, {"messages": [{"role", "content"}, ...]} per line (repeatable)')
    p.add_argument("--chat-data-epochs", type=int, default=1, help="mid/sft: times each --chat-data chat is used")
    p.add_argument("--no-identity", action="store_true", help="mid/sft: leave out the built-in identity chats")
    p.add_argument("--val-size", type=int, default=-1,
                   help="mid/sft: rows of each validation task (-1: all SmolTalk test; mid: MMLU 5200, GSM8K 420)")
    p.add_argument("--chat-eval-every", type=int, help="mid/sft: MMLU + ARC-Easy accuracy every N steps and at the end")
    p.add_argument("--chat-eval-problems", type=int, default=1024)
    p.add_argument("--examples-per-step", type=int, default=16, help="rl: questions per optimizer step, all ranks")
    p.add_argument("--num-samples", type=int, default=16, help="rl: completions per question")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--eval-examples", type=int, default=400, help="rl: GSM8K test problems for pass@k")
    args = p.parse_args(argv)
    args.auto_batch = args.stage != "rl" and args.device_batch_size in (None, "auto")
    args.device_batch_size = None if args.device_batch_size == "auto" else args.device_batch_size
    for k, v in RECIPES["release"].items():  # chat stages: the model is the checkpoint's, lrs are the stage's
        if getattr(args, k) is None:
            setattr(args, k, RECIPES[args.recipe].get(k) if args.stage == "base" or k in MUON_FLAGS else v)
    for k, v in STAGE_DEFAULTS[args.stage].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    lows = [("depth", 1), ("max_seq_len", 1), ("device_batch_size", 1), ("examples_per_step", 1), ("num_samples", 1),
            ("max_new_tokens", 1), ("chat_data_epochs", 1), ("eval_tokens", 0)]
    for flag, low in lows + ([("total_batch_size", 1)] if args.stage != "rl" else []):
        if getattr(args, flag) is not None and getattr(args, flag) < low:
            raise common.UserError(f"--{flag.replace('_', '-')} must be at least {low} (got {getattr(args, flag)})")
    if args.no_identity:
        args.identity_size = 0
    if not 0 < args.warmdown_ratio <= 1 or args.init_lr_frac <= 0:
        raise common.UserError("--warmdown-ratio must be in (0, 1] and --init-lr-frac above 0")
    if not args.window_pattern or set(args.window_pattern.upper()) - set("SL"):
        raise common.UserError(f"--window-pattern {args.window_pattern!r} must be letters S and L (e.g. SSSL)")
    if args.stage != "base" and args.source is None:
        args.source = SOURCE_STAGE[args.stage]
    return args

def dry_run(args):
    """--dry-run: the --depth base model on the meta device, its CUDA memory estimate, and the largest power-of-two rows
    fitting 90% of a 24/40/80 GB GPU. Vocabulary: the tokenizer's, or 65536 before one is trained."""
    has_tokenizer = os.path.exists(os.path.join(tok_lib.tokenizer_dir(), "tokenizer.pkl"))
    V = tok_lib.get_tokenizer().get_vocab_size() if has_tokenizer else model_lib.GPTConfig.vocab_size
    T = args.max_seq_len or 2048
    world = common.dist_info()[3]
    with torch.device("meta"):
        model = model_lib.GPT(model_lib.config_from_depth(args.depth, V, T, **arch_options(args)))
    fit = [next((r for r in (128, 64, 32, 16, 8, 4, 2, 1)
                 if model_lib.estimate_memory(model, r, world, True, T)["total"] <= 0.9 * g * 2**30), 0)
           for g in (24, 40, 80)]
    print(memory_line(model, args.device_batch_size, T, world, cuda=True) +
          "; suggested --device-batch-size: 24 GB: {}, 40 GB: {}, 80 GB: {}".format(*fit))

def main(argv=None):
    args = parse_args(argv)
    stage = {"base": train_base, "mid": train_chat, "sft": train_chat, "rl": train_rl}[args.stage]
    try:
        (dry_run if args.dry_run else stage)(args)
    finally:
        common.cleanup_runtime()

if __name__ == "__main__":
    common.run_main(main)
