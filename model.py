"""
The one GPT (the nanochat release architecture; GUIDE sections 4 and 7), its KV cache and generation Engine with the
calculator tool, checkpoint save/load and the transformers export. Imports torch and common.py (tokenizer.py: export).

    python model.py export --source sft --out DIR   # a Hugging Face transformers folder (weights, tokenizer, template)
    python model.py bench      # prefill / decode tok/s and time to first token of random-init models
"""
import os
import re
import sys
import ast
import json
import math
import time
import argparse
import warnings
import shutil
import zipfile
from collections import deque
from dataclasses import dataclass, asdict, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

ROPE_BASE = 10_000      # rotary base theta of the release
VE_GATE_CHANNELS = 12   # value-embedding gates and the smear gate read only the first channels of their input
SMEAR_CHANNELS = 24
ROPE_SPAN = 10          # rotary tables cover ROPE_SPAN * sequence_len positions
SOFTCAP = 15.0          # logits = SOFTCAP * tanh(logits / SOFTCAP)
MAX_CALC_CHARS = 256    # calculator input-length cap: bounds work and recursion depth
LOSS_CHUNK_CPU = 2**24  # logits per chunk of the loss on CPU (smaller chunks ran slower)
LOSS_CHUNK_CUDA = 2**27  # on CUDA: fewer, larger chunks for torch.compile to trace
ACT_BYTES_FP32 = 72     # activation bytes saved per token, layer and unit of width (measured with saved_tensors_hooks)
ACT_BYTES_BF16 = 48     # the same under CUDA's bf16 autocast

# -----------------------------------------------------------------------------
# configuration

@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 65536
    n_layer: int = 20
    n_head: int = 10
    n_kv_head: int = 10
    n_embd: int = 1280
    # options from the later nanochat (commit 92d63d4); the defaults are the release architecture (train.py --help)
    window_pattern: str = "L"     # per-layer attention span, tiled over the layers: L all, S a quarter of sequence_len
    rope_base: int = ROPE_BASE
    qk_scale: float = 1.0         # q and k times this after QK-norm (1.2: sharper attention)
    pad_vocab_to: int = 1         # wte / lm_head rows rounded up to a multiple of this; logits cropped to vocab_size
    resid_lambdas: bool = False   # learned per-layer x = resid_lambdas[i] * x + x0_lambdas[i] * x0 before each block
    value_embeds: bool = False    # ResFormer value embeddings, gated per head, on alternating layers (the last always)
    smear: bool = False           # a learned, gated share of the previous token's embedding added to each token's
    backout: bool = False         # subtract a learned share of the mid-layer residual before the final norm

RELEASE_FIELDS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")  # what a release meta holds

def layer_windows(c):
    """How far back each layer's queries see (None: all; w: itself and w keys back); S rounds up to a GPU tile."""
    short, pattern = -(-c.sequence_len // 4 // 128) * 128, c.window_pattern.upper()
    return [short if pattern[i % len(pattern)] == "S" and i < c.n_layer - 1 else None for i in range(c.n_layer)]

def has_value_embed(c, layer):
    return c.value_embeds and layer % 2 == (c.n_layer - 1) % 2

def config_from_depth(depth, vocab_size, sequence_len=2048, **options):
    """The depth dial: d = 64*depth, heads of 128 dims (smaller when needed to divide d), plain multi-head attention."""
    assert depth >= 1, "depth must be >= 1"
    n_embd = 64 * depth
    n_head = max(1, math.ceil(n_embd / 128))  # the release rule; when it does not divide d (depth 5, 9, ...),
    while n_embd % n_head or (n_embd // n_head) % 2:  # take the next head count that does (even head_dim for rotary)
        n_head += 1
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head, n_kv_head=n_head,
                     n_embd=n_embd, **options)

# -----------------------------------------------------------------------------
# the model

def softcap(logits):
    return SOFTCAP * torch.tanh(logits / SOFTCAP)

class Linear(nn.Linear):
    """Bias-free. On CPU, up to 64 rows (decode) run as one bmm over w's two halves: F.linear is slower (README)."""

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        w, rows = self.weight, x.numel() // x.size(-1)
        if x.device.type != "cpu" or rows > 64 or w.size(0) % 2:
            return F.linear(x, w)
        o, i = w.shape
        y = torch.bmm(w.view(2, o // 2, i), x.reshape(rows, i).t().unsqueeze(0).expand(2, i, rows))  # (2, o/2, rows)
        return y.view(o, rows).t().reshape(*x.shape[:-1], o)

def norm(x):
    return F.rms_norm(x, (x.size(-1),))  # parameter-free RMSNorm

def visible(qpos, Tk, window):
    """Bool mask (B|1, 1, T, Tk): the query at position p sees key j when 0 <= p - j <= window (None: no limit)."""
    d = qpos[..., None] - torch.arange(Tk, device=qpos.device)
    return ((d >= 0) & (d <= (Tk if window is None else window)))[:, None]

def apply_rotary(x, cos, sin):
    """x (B, T, H, hd); half-split rotation by -angle: y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)

class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        assert config.n_embd % config.n_head == 0 and config.n_head % config.n_kv_head == 0
        self.c_q = Linear(config.n_embd, self.n_head * self.head_dim)
        self.c_k = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_v = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.window, self.qk_scale = layer_windows(config)[layer_idx], config.qk_scale
        self.ve_gate = Linear(VE_GATE_CHANNELS, self.n_kv_head) if has_value_embed(config, layer_idx) else None

    def forward(self, x, cos, sin, kv_cache, ve=None):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # value residual: the token's value embedding, through a per-head gate in (0, 3)
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS])).unsqueeze(-1)
            v = v + gate * ve.view_as(v).to(v.dtype)
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))  # QK-norm after rotary
        if self.qk_scale != 1.0:
            q, k = q * self.qk_scale, k * self.qk_scale
        q, k, v = (t.transpose(1, 2).to(v.dtype) for t in (q, k, v))  # (B, H, T, hd); one dtype for SDPA and the cache
        if kv_cache is not None:
            k, v = kv_cache.insert(self.layer_idx, k, v)
        Tk = k.size(2)
        gqa = {"enable_gqa": True} if self.n_kv_head != self.n_head else {}
        ragged = kv_cache is not None and kv_cache.lengths is not None  # rows of different lengths: each its own keys
        if ragged or T not in (1, Tk) or (self.window is not None and self.window < Tk - 1):  # an explicit mask
            qpos = kv_cache.qpos if ragged else torch.arange(Tk - T, Tk, device=q.device)[None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible(qpos, Tk, self.window), **gqa)
        else:  # no prefix: plain causal; one new token: every cached key
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T == Tk, **gqa)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))

class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())  # ReLU^2

class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = Attention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache, ve=None):
        x = x + self.attn(norm(x), cos, sin, kv_cache, ve)
        return x + self.mlp(norm(x))

class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        V, L = -(-config.vocab_size // config.pad_vocab_to) * config.pad_vocab_to, config.n_layer  # V: padded rows
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(V, config.n_embd),
                                              h=nn.ModuleList([Block(config, i) for i in range(L)])))
        self.lm_head = Linear(config.n_embd, V)  # untied from wte
        kv_dim = config.n_kv_head * (config.n_embd // config.n_head)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, kv_dim)
                                           for i in range(L) if has_value_embed(config, i)})
        if config.resid_lambdas:
            self.resid_lambdas, self.x0_lambdas = nn.Parameter(torch.ones(L)), nn.Parameter(torch.zeros(L))
        if config.smear:
            self.smear_gate, self.smear_lambda = Linear(SMEAR_CHANNELS, 1), nn.Parameter(torch.zeros(1))
        if config.backout:
            self.backout_lambda = nn.Parameter(torch.zeros(1))
        shape = (1, ROPE_SPAN * config.sequence_len, 1, config.n_embd // config.n_head // 2)  # over (B, T, H, hd/2)
        self.register_buffer("cos", torch.empty(shape), persistent=False)
        self.register_buffer("sin", torch.empty(shape), persistent=False)

    @torch.no_grad()
    def init_rotary(self):
        """cos/sin tables for ROPE_SPAN*T positions (not saved in checkpoints; recomputed after to_empty)."""
        device = self.transformer.wte.weight.device
        hd = self.config.n_embd // self.config.n_head
        inv_freq = 1.0 / (self.config.rope_base ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
        angles = torch.outer(torch.arange(self.cos.size(1), dtype=torch.float32, device=device), inv_freq)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # bf16 compute on CUDA
        self.cos, self.sin = angles.cos()[None, :, None, :].to(dtype), angles.sin()[None, :, None, :].to(dtype)

    @torch.no_grad()
    def init_weights(self, recipe="release"):
        """release: nanochat's (lm_head zero: first loss ln V); 2026 and options: 92d63d4's (uniform: no outliers)."""
        s = math.sqrt(3 / self.config.n_embd)  # U(-s, s) has std 1/sqrt(d)
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0 if recipe == "release" else 0.8)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                fan_out, fan_in = module.weight.shape
                if (name == "lm_head" and recipe == "release") or name.endswith("c_proj"):
                    nn.init.zeros_(module.weight)
                elif name == "lm_head":
                    nn.init.normal_(module.weight, mean=0.0, std=0.001)
                elif recipe == "release":
                    std = min(1.0, math.sqrt(fan_out / fan_in)) / math.sqrt(fan_in)
                    nn.init.normal_(module.weight, mean=0.0, std=std)
                else:
                    bound = s * (0.4 if name.endswith("c_fc") else 1)
                    nn.init.uniform_(module.weight, -bound, bound)
        for name, module in self.named_modules():
            if name.endswith("ve_gate") or name == "smear_gate":  # gates start slightly open
                nn.init.uniform_(module.weight, 0.0, 0.02)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s)
        L = self.config.n_layer
        if self.config.resid_lambdas:  # a stronger residual and more of the input embedding in early layers
            ramp = torch.arange(L, dtype=torch.float32, device=self.resid_lambdas.device) / max(L - 1, 1)
            self.resid_lambdas.copy_(1.15 - 0.10 * ramp)
            self.x0_lambdas.copy_(0.20 - 0.15 * ramp)
        if self.config.smear:
            nn.init.zeros_(self.smear_lambda)
        if self.config.backout:
            nn.init.constant_(self.backout_lambda, 0.2)
        self.init_rotary()

    def get_device(self):
        return self.transformer.wte.weight.device

    def param_counts(self):
        """Parameter counts: wte, lm_head, transformer blocks (matrices), value embeddings, total."""
        count = lambda module: sum(p.numel() for p in module.parameters())
        return {"wte": count(self.transformer.wte), "lm_head": count(self.lm_head), "blocks": count(self.transformer.h),
                "value_embeds": count(self.value_embeds), "total": count(self)}

    def estimate_flops(self):
        """FLOPs per token: 6 per matmul weight (lookups are free) + 12*H*hd per layer and attended key (T, window)."""
        c, T = self.config, self.config.sequence_len
        matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6 * matmul + 12 * c.n_head * (c.n_embd // c.n_head) * sum(min(w or T, T) for w in layer_windows(c))

    def trunk(self, idx, kv_cache=None):
        """Token ids (B, T) -> final normalised hidden states (B, T, d); rotary positions start at the cache length."""
        T = idx.size(1)
        t0 = kv_cache.pos if kv_cache is not None else 0
        assert t0 + T <= self.cos.size(1), f"sequence position {t0 + T} exceeds the rotary table ({self.cos.size(1)})"
        cos, sin = self.cos[:, t0:t0 + T], self.sin[:, t0:t0 + T]
        if kv_cache is not None and kv_cache.lengths is not None:  # rows of different lengths: each its own position
            pos = kv_cache.lengths[:idx.size(0), None]
            cos, sin = self.cos[0, pos], self.sin[0, pos]  # (B, 1, 1, hd/2)
        x = norm(self.transformer.wte(idx))
        if self.config.smear:
            x = self.smear(x, kv_cache)
        x0, mid = x, None
        for i, block in enumerate(self.transformer.h):
            if self.config.resid_lambdas:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, cos, sin, kv_cache, ve)
            mid = x if i == self.config.n_layer // 2 else mid
        if self.config.backout:
            x = x - self.backout_lambda * mid
        return norm(x)

    def smear(self, x, kv_cache):
        """x_t += smear_lambda * sigmoid(gate(x_t)) * x_(t-1); at a decode step x_(t-1) comes from the cache."""
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]))
        cached = kv_cache is not None and kv_cache.emb is not None
        before = kv_cache.emb[:x.size(0)] if cached else torch.zeros_like(x[:, :1])
        out = x + gate * torch.cat((before, x[:, :-1]), dim=1)
        if kv_cache is not None:
            kv_cache.keep_embedding(x[:, -1:])
        return out

    def head(self, x):
        """Hidden states -> fp32 softcapped logits (of the real vocabulary: padding rows cropped)."""
        return softcap(self.lm_head(x)[..., :self.config.vocab_size].float())  # softcap in fp32

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        """-> fp32 logits (B, T, V), or the CE loss (targets -1 ignored): scalar for 'mean'/'sum', (B, T) for 'none'."""
        with common.autocast_ctx(idx.device):  # bf16 compute on CUDA, callers do nothing
            x = self.trunk(idx, kv_cache)
            if targets is None:
                return self.head(x)
        w = self.lm_head.weight[:self.config.vocab_size]
        loss = chunked_cross_entropy(x.reshape(-1, x.size(-1)), w, targets.reshape(-1), loss_reduction)
        return loss.view(targets.shape) if loss_reduction == "none" else loss

def _chunk_loss(x, w, y, g=None, dw=None):
    """Per-row CE of softcap(x w^T) (0 at y == -1); given upstream per-row grads g, also dx and dw += by hand:
    dCE/dlogit = (softmax - onehot) * (1 - (softcap/SOFTCAP)^2), the softcap's tanh derivative."""
    dt = torch.bfloat16 if x.is_cuda else torch.float32  # the head's math: bf16 matmuls on CUDA, softcap and CE in fp32
    s = softcap(F.linear(x.to(dt), w.to(dt)).float())
    lse = torch.logsumexp(s, dim=-1)
    valid, yc = y >= 0, y.clamp(min=0)[:, None]
    loss = (lse - s.gather(1, yc).squeeze(1)) * valid
    if g is None:
        return loss, None
    p = (s - lse[:, None]).exp_()
    p.scatter_(1, yc, p.gather(1, yc) - 1)
    p = p.mul_(s.div_(SOFTCAP).square_().neg_().add_(1)).mul_((g * valid)[:, None]).to(dt)
    dw.addmm_(p.t(), x) if dw.dtype == dt else dw.add_(p.t() @ x.to(dt))  # fp32 in place: no (V, d) temporary
    return loss, p @ w.to(dt)

def loss_chunk_rows(vocab_size, cuda):  # rows of logits the chunked loss makes at once
    return max(1, (LOSS_CHUNK_CUDA if cuda else LOSS_CHUNK_CPU) // vocab_size)

def _chunked_loss(x, w, y, g=None):
    """_chunk_loss over blocks of loss_chunk_rows rows -> (loss (N,), dx or None, dw fp32 or None)."""
    rows = loss_chunk_rows(w.size(0), x.is_cuda)
    dw = None if g is None else torch.zeros_like(w, dtype=torch.float32)
    out = [_chunk_loss(x[i:i + rows], w, y[i:i + rows], None if g is None else g[i:i + rows], dw)
           for i in range(0, x.size(0), rows)]
    dx = None if g is None else torch.cat([o[1] for o in out]).to(x.dtype)
    return torch.cat([o[0] for o in out]), dx, dw

def _reduce_loss(loss, y, reduction):
    return loss.sum() / (y >= 0).sum() if reduction == "mean" else loss.sum() if reduction == "sum" else loss

class ChunkedCE(torch.autograd.Function):
    """Not torch.utils.checkpoint: 'mean'/'sum' compute their gradients in the forward pass (one lm_head matmul fewer
    than recomputing) and it traces under torch.compile; 'none' (per-row upstream grads) recomputes each chunk."""

    @staticmethod
    def forward(ctx, x, w, y, reduction):
        ctx.reduction = reduction
        if reduction == "none":
            ctx.save_for_backward(x, w, y)
            return _chunked_loss(x, w, y)[0]
        scale = 1.0 / (y >= 0).sum() if reduction == "mean" else torch.ones((), device=x.device)
        loss, dx, dw = _chunked_loss(x, w, y, scale.expand(y.shape))
        ctx.save_for_backward(dx, dw)
        return _reduce_loss(loss, y, reduction)

    @staticmethod
    def backward(ctx, g):
        if ctx.reduction == "none":
            return *_chunked_loss(*ctx.saved_tensors, g)[1:], None, None
        dx, dw = ctx.saved_tensors
        return dx * g, dw * g, None, None

def chunked_cross_entropy(x, w, y, reduction="mean"):
    """F.cross_entropy(softcap(x w^T), y, ignore_index=-1) in chunks of rows: never all N x V logits (nanochat #443)."""
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return ChunkedCE.apply(x, w, y, reduction)
    return _reduce_loss(_chunked_loss(x, w, y)[0], y, reduction)

def estimate_memory(model, rows, world=1, cuda=True, T=None):
    """Training bytes per rank by part for `rows` x T tokens (params count CUDA autocast's bf16 copies; the loss chunk
    4 temporaries of its logits, and dw). On CPU within 20% of the measured peak RSS over the process start (README)."""
    c, n = model.config, model.param_counts()
    T = T or c.sequence_len
    tokens = rows * T
    act_bytes = ACT_BYTES_BF16 if cuda else ACT_BYTES_FP32
    windowed = sum(w is not None and w < T - 1 for w in layer_windows(c))
    parts = dict(params=4 * n["total"] + (2 * (n["blocks"] + n["lm_head"]) if cuda else 0), grads=4 * n["total"],
                 optimizer=(4 * n["blocks"] + 8 * (n["total"] - n["blocks"])) // world,  # Muon: momentum; AdamW: two
                 activations=tokens * c.n_embd * (act_bytes * c.n_layer + 16),  # + embedding, final norm, loss dx
                 backward=tokens * c.n_embd * act_bytes,  # the layer being backpropagated: its grads and temporaries
                 loss_chunk=4 * (4 * min(tokens, loss_chunk_rows(c.vocab_size, cuda)) * c.vocab_size + n["lm_head"]),
                 # a windowed layer on CPU: SDPA with a mask keeps (rows, heads, T, T) probabilities for the backward
                 windows=0 if cuda else 4 * tokens * T * c.n_head * windowed)
    return dict(parts, total=sum(parts.values()))

def build_model(model_config, device, init="release"):
    """GPTConfig fields (dict) -> a GPT on device, built on meta, then init_weights(init) (None: only the rotary)."""
    with torch.device("meta"):
        model = GPT(GPTConfig(**model_config))
    model.to_empty(device=device)
    if init is None:
        model.init_rotary()
    else:
        model.init_weights(init)
    return model

def set_sequence_len(model, T):
    """A chat stage training at another T: the config says so, and the short attention windows follow."""
    model.config.sequence_len = T
    for block, window in zip(model.transformer.h, layer_windows(model.config)):
        block.attn.window = window

# -----------------------------------------------------------------------------
# inference: KV cache, sampling, Engine with the calculator tool

class KVCache:
    """Keys/values (L, B, Hkv, capacity, hd), allocated at the first insert. Ragged (continuous batching): row b holds
    lengths[b] tokens at its own positions, not left padding, so a row joining or leaving never moves the others'."""

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers, ragged=False):
        self.shape = [num_layers, batch_size, num_heads, seq_len, head_dim]
        self.k = self.v = self.emb = None  # emb: each row's last input embedding (the smear's previous token)
        self.pos = 0
        self.lengths = torch.zeros(batch_size, dtype=torch.long) if ragged else None

    def _allocate(self, like):
        # zeros, not empty: a ragged batch reads every row's slots up to the longest row; a masked NaN poisons softmax
        self.k = torch.zeros(self.shape, dtype=like.dtype, device=like.device)
        self.v = torch.zeros_like(self.k)
        self.lengths = None if self.lengths is None else self.lengths.to(like.device)

    def _grow(self, needed):
        """Allocate a larger buffer and copy the stored entries over (never an in-place resize)."""
        k, v = self.k, self.v
        self.shape[3] = (needed + 1024 + 1023) // 1024 * 1024  # room for 1024 more, in whole blocks of 1024
        self._allocate(k)
        self.k[:, :, :, :self.pos], self.v[:, :, :, :self.pos] = k[:, :, :, :self.pos], v[:, :, :, :self.pos]

    def insert(self, layer, k, v):
        """Store k, v (B, Hkv, T_new, hd) at pos (ragged: one token per row, at its length) -> all keys/values yet."""
        if self.k is None:
            self._allocate(k)
        if self.lengths is not None:
            B, pos = k.size(0), self.lengths[:k.size(0)]
            if layer == 0:  # every layer of this step: row b's new token is at position lengths[b], sees keys <= it
                self.tk, self.qpos = int(pos.max()) + 1, pos[:, None].clone()
            rows = torch.arange(B, device=k.device)
            self.k[layer, rows, :, pos], self.v[layer, rows, :, pos] = k[:, :, 0], v[:, :, 0]
            if layer == self.shape[0] - 1:
                self.lengths[:B] += 1
            return self.k[layer, :B, :, :self.tk], self.v[layer, :B, :, :self.tk]
        t0, t1 = self.pos, self.pos + k.size(2)
        if t1 > self.shape[3]:
            self._grow(t1)
        self.k[layer, :, :, t0:t1], self.v[layer, :, :, t0:t1] = k, v
        if layer == self.shape[0] - 1:
            self.pos = t1
        return self.k[layer, :, :, :t1], self.v[layer, :, :, :t1]

    def prefill(self, other, row=None):
        """Copy a batch-1 cache into every row of this empty cache, or (ragged) into row `row` only."""
        assert self.k is None or row is not None, "prefill needs an empty cache"
        (L, _, H, cap, hd), (oL, oB, oH, _, ohd) = self.shape, other.shape
        assert (L, H, hd) == (oL, oH, ohd) and oB == 1 and cap >= other.pos, "incompatible caches"
        if self.k is None:
            self._allocate(other.k)
        rows = slice(None) if row is None else slice(row, row + 1)
        n = other.pos
        self.k[:, rows, :, :n], self.v[:, rows, :, :n] = other.k[:, :, :, :n], other.v[:, :, :, :n]
        if row is None:
            self.pos = other.pos
        else:
            self.lengths[row] = other.pos
        if other.emb is not None:
            self.keep_embedding(other.emb.expand(self.shape[1] if row is None else 1, -1, -1), row or 0)

    def keep_embedding(self, e, row=0):
        if self.emb is None:
            self.emb = torch.zeros(self.shape[1], 1, e.size(-1), dtype=e.dtype, device=e.device)
        self.emb[row:row + e.size(0)] = e

    def move_row(self, src, dst):
        """Ragged: row src takes over row dst (the batch stays packed at the front when a row leaves)."""
        n = int(self.lengths[src])
        self.k[:, dst, :, :n], self.v[:, dst, :, :n] = self.k[:, src, :, :n], self.v[:, src, :, :n]
        self.lengths[dst] = n
        if self.emb is not None:
            self.emb[dst] = self.emb[src]

TEMPERATURE_FLOOR = 1e-4  # below it logits / t overflow (1e-40: NaN probabilities); sampling is all but greedy there

def sample_next_token(logits, rng, temperature=1.0, top_k=None):
    """logits (B, V) -> ids (B, 1), rows independent: argmax under TEMPERATURE_FLOOR (0 too); top_k keeps the k best."""
    assert temperature >= 0.0, "temperature must be non-negative"
    if temperature < TEMPERATURE_FLOOR:
        return torch.argmax(logits, dim=-1, keepdim=True)
    if top_k is not None and top_k > 0:
        vals, idx = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1)
        return idx.gather(1, torch.multinomial(F.softmax(vals / temperature, dim=-1), 1, generator=rng))
    return torch.multinomial(F.softmax(logits / temperature, dim=-1), 1, generator=rng)

_CALC_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
             ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}

def _number(value):
    if type(value) not in (int, float):  # bool and str excluded: no 'ab' * 3, no True + 1
        raise ValueError("arithmetic on a non-number")
    return value

def _evaluate(node):
    """Evaluate a whitelisted AST node; raise ValueError on anything else."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _CALC_OPS:
        return _CALC_OPS[type(node.op)](_number(_evaluate(node.left)), _number(_evaluate(node.right)))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _number(_evaluate(node.operand))
        return -value if isinstance(node.op, ast.USub) else value
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
            and isinstance(node.func.value, ast.Constant) and type(node.func.value.value) is str
            and len(node.args) == 1 and not node.keywords
            and isinstance(node.args[0], ast.Constant) and type(node.args[0].value) is str):
        return node.func.value.value.count(node.args[0].value)  # 'literal'.count('literal')
    raise ValueError("not allowed")

def use_calculator(expr):
    """The calculator tool: + - * / on numbers (commas dropped), parentheses, unary minus, 'text'.count('x').
    Walks the AST (never eval), input capped at MAX_CALC_CHARS, so it cannot hang or escape. Anything else -> None."""
    if not isinstance(expr, str) or len(expr) > MAX_CALC_CHARS:
        return None
    expr = expr.replace(",", "").strip()
    try:
        with warnings.catch_warnings():  # model-written junk such as "1.2.3" should not print SyntaxWarnings
            warnings.simplefilter("ignore")
            value = _evaluate(ast.parse(expr, mode="eval").body)
    except (SyntaxError, ValueError, TypeError, ArithmeticError, RecursionError, MemoryError):
        return None
    return None if isinstance(value, float) and not math.isfinite(value) else value

@dataclass
class RowState:
    """One row's tool state: forced tool output to emit, inside a python block or not, its expression, ended or not."""
    forced: deque = field(default_factory=deque)  # tokens to emit instead of samples (mask 0)
    in_python_block: bool = False
    python_expr_tokens: list = field(default_factory=list)
    completed: bool = False

class Engine:
    """Batch-1 prefill, then num_samples rows decoded together through a KV cache, with the calculator tool."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        names = ("python_start", "python_end", "output_start", "output_end", "assistant_end", "bos")
        self._special = {n: tokenizer.encode_special(f"<|{n}|>") for n in names}  # looked up once

    def specials(self):
        return self._special

    def cache(self, batch_size, seq_len, ragged=False):
        c = self.model.config
        return KVCache(batch_size, c.n_kv_head, seq_len, c.n_embd // c.n_head, c.n_layer, ragged)

    def forward_last(self, ids, kv):
        """Token ids (B, T) through the cache -> fp32 logits (B, V) of each row's last position."""
        with common.autocast_ctx(ids.device):
            return self.model.head(self.model.trunk(ids, kv)[:, -1, :])

    def prefill(self, tokens):
        """The prompt once at batch 1 -> (its cache, logits (1, V) of the first new token)."""
        kv = self.cache(1, len(tokens))
        return kv, self.forward_last(torch.tensor([tokens], dtype=torch.long, device=self.model.get_device()), kv)

    def row_step(self, row, sampled, special):
        """One row's next token (a forced tool output wins over the sample) and its mask; updates its tool state."""
        forced = bool(row.forced)
        t = row.forced.popleft() if forced else sampled
        if t in (special["assistant_end"], special["bos"]):
            row.completed = True
        if t == special["python_start"]:
            row.in_python_block, row.python_expr_tokens = True, []
        elif t == special["python_end"] and row.in_python_block:
            row.in_python_block = False
            result = use_calculator(self.tokenizer.decode(row.python_expr_tokens))
            if result is not None:
                row.forced.extend([special["output_start"], *self.tokenizer.encode(str(result)), special["output_end"]])
        elif row.in_python_block:
            row.python_expr_tokens.append(t)
        return t, 0 if forced else 1

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """Yield (token_column, mask_column): python lists of length num_samples (mask 1 sampled, 0 forced)."""
        assert isinstance(tokens, list) and tokens and all(isinstance(t, int) for t in tokens), (
            "tokens must be a non-empty list of ints")
        c, device = self.model.config, self.model.get_device()
        rng = torch.Generator(device=device).manual_seed(seed)
        kv1, logits = self.prefill(tokens)  # the prompt once at batch 1, then copied into num_samples decode rows
        room = len(tokens) + max_tokens if max_tokens is not None else max(c.sequence_len, len(tokens))
        kv = self.cache(num_samples, room)
        kv.prefill(kv1)
        del kv1
        logits = logits.expand(num_samples, -1)
        rows = [RowState() for _ in range(num_samples)]
        limit = max_tokens if max_tokens is not None else ROPE_SPAN * c.sequence_len - len(tokens)  # rotary table end
        generated = 0
        while generated < limit and not all(r.completed for r in rows):
            sampled = sample_next_token(logits, rng, temperature, top_k)
            steps = [self.row_step(row, s, self._special) for row, s in zip(rows, sampled.view(-1).tolist())]
            token_column, mask_column = map(list, zip(*steps))
            yield token_column, mask_column
            generated += 1
            if generated >= limit or all(r.completed for r in rows):
                break  # no forward for a token nobody will read
            logits = self.forward_last(torch.tensor(token_column, device=device).view(-1, 1), kv)

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """-> (rows of prompt + completion, rows of masks); a row ends before <|assistant_end|> or <|bos|>."""
        stop_ids = {self._special["assistant_end"], self._special["bos"]}
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        for token_column, mask_column in self.generate(tokens, num_samples, **kwargs):
            for i, (t, m) in enumerate(zip(token_column, mask_column)):
                done[i] = done[i] or t in stop_ids
                if not done[i]:
                    results[i].append(t)
                    masks[i].append(m)
        return results, masks

class TextStreamer:
    """Turns a stream of token ids into text, releasing it only at whole UTF-8 characters (emoji, CJK)."""

    def __init__(self, tokenizer, max_pending=8):
        self.tokenizer, self.max_pending, self.pending = tokenizer, max_pending, []

    def push(self, token_id):
        """-> the newly completed text ("" while in the middle of a character)."""
        self.pending.append(token_id)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd") and len(self.pending) < self.max_pending:
            return ""  # a character split across tokens: wait for the rest
        self.pending = []
        return text

    def flush(self):
        text = self.tokenizer.decode(self.pending) if self.pending else ""
        self.pending = []
        return text

# -----------------------------------------------------------------------------
# checkpoints: <dir>/model_NNNNNN.pt, meta_NNNNNN.json, optim_NNNNNN_rankR.pt; every write atomic

def save_checkpoint(ckpt_dir, step, model_state, meta, optimizer_state=None, rank=0):
    """Rank 0 writes the model and meta; every rank writes its own optimizer shard when given. A failed write (a full
    disk, a file-size limit) removes this step's files, so loading picks the previous checkpoint, and is one line."""
    names = f"model_{step:06d}.pt", f"meta_{step:06d}.json", f"optim_{step:06d}_rank{rank}.pt"
    paths = [os.path.join(ckpt_dir, name) for name in names]
    try:
        if rank == 0:
            common.atomic_write(paths[0], lambda f: torch.save(model_state, f))
            common.atomic_write_text(paths[1], json.dumps(meta, indent=2))
        if optimizer_state is not None:
            common.atomic_write(paths[2], lambda f: torch.save(optimizer_state, f))
    except (OSError, RuntimeError) as e:  # torch reports a short write as a RuntimeError ("unexpected pos ...")
        for path in paths if rank == 0 else paths[2:]:  # each rank its own files
            if os.path.exists(path):
                os.remove(path)
        raise common.UserError(f"could not save step {step} into {ckpt_dir} ({type(e).__name__}: {e}): is the disk "
                               "full? free some space and continue with --resume (the previous checkpoints are "
                               "intact)") from None

def _read_meta(path):
    """-> (meta, None), or (None, one line naming the file and its fault: unreadable, no model_config a GPT takes)."""
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        return None, f"{path} is unreadable ({e})"
    cfg = meta.get("model_config") if isinstance(meta, dict) else None
    fields = GPTConfig.__dataclass_fields__
    if (not isinstance(cfg, dict) or not set(RELEASE_FIELDS) <= set(cfg) <= set(fields)
            or not all(type(cfg[k]) is int and cfg[k] > 0 for k in RELEASE_FIELDS)):
        return None, f"{path}: model_config must give {', '.join(RELEASE_FIELDS)}, each a positive integer"
    if bad := [k for k in cfg if k not in RELEASE_FIELDS and not isinstance(cfg[k], type(fields[k].default))]:
        return None, f"{path}: model_config's {', '.join(bad)} must be of the type of GPTConfig's default"
    if cfg["n_embd"] % cfg["n_head"] or cfg["n_head"] % cfg["n_kv_head"] or cfg["n_embd"] // cfg["n_head"] % 2:
        return None, (f"{path}: model_config's n_embd must split into n_head heads of even size, "
                      "n_head into n_kv_head groups")
    return meta, None

def _torch_load(path, device, weights_only=True):
    try:
        return torch.load(path, map_location=device, weights_only=weights_only)
    except Exception as e:  # torch says "failed finding central directory", pickle says other things: name the file
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise common.UserError(f"--device {device}: CUDA is not available here (torch {torch.__version__}); "
                                   "use --device cpu") from None
        raise common.UserError(f"{path} is unreadable ({type(e).__name__}: {e})") from None

def load_checkpoint(ckpt_dir, step, device, load_optimizer=False, rank=0, tokenizer=None):
    """-> (model_state, optimizer_state or None, meta). An unreadable file is a UserError naming it; a tokenizer, when
    given, must be the one the meta records (its vocab size, and its hash when the meta has tokenizer_hash)."""
    meta_path = os.path.join(ckpt_dir, f"meta_{step:06d}.json")
    meta, problem = _read_meta(meta_path)
    if problem:
        raise common.UserError(problem)
    want, have = meta.get("tokenizer_hash"), getattr(tokenizer, "hash", None)
    V = meta["model_config"]["vocab_size"]
    if tokenizer is not None and (tokenizer.get_vocab_size() != V or want not in (None, have)):
        raise common.UserError(f"{meta_path} was trained with tokenizer {want or '?'} (vocab {V}) but "
                               f"{getattr(tokenizer, 'path', 'the tokenizer')} is {have} (vocab "
                               f"{tokenizer.get_vocab_size()}): put that tokenizer back, or train from this one again")
    model_state = _torch_load(os.path.join(ckpt_dir, f"model_{step:06d}.pt"), device)
    optimizer_state = None
    if load_optimizer:
        path = os.path.join(ckpt_dir, f"optim_{step:06d}_rank{rank}.pt")
        if not os.path.exists(path):
            saved_by = meta.get("world_size", rank + 1)
            raise common.UserError(f"{path} is missing: the checkpoint holds no optimizer state for rank {rank}"
                                   + (f" (it was saved by {saved_by} ranks)" if rank >= saved_by else ""))
        optimizer_state = _torch_load(path, device, weights_only=False)  # our own file
    return model_state, optimizer_state, meta

def step_problem(ckpt_dir, step, world=0):
    """Why checkpoint `step` cannot be loaded, in one line naming the file, or None: the meta, the model's zip (as
    torch.save writes it) with every CRC, then (world > 0) the zip directory at the end of each optimizer file."""
    if problem := _read_meta(os.path.join(ckpt_dir, f"meta_{step:06d}.json"))[1]:
        return problem
    for i, name in enumerate([f"model_{step:06d}.pt"] + [f"optim_{step:06d}_rank{r}.pt" for r in range(world)]):
        path = os.path.join(ckpt_dir, name)
        try:
            with zipfile.ZipFile(path) as z:
                if i == 0 and (bad := z.testzip()):
                    return f"{path} is corrupt (CRC mismatch in {bad})"
        except Exception as e:  # missing, truncated, a damaged header
            return f"{path} is unreadable ({e})"

_warned = set()  # problems already reported: last_step runs once per chat worker, and train checks the source first

def last_step(ckpt_dir, world=0):
    """The newest step that step_problem passes (a one-line warning for each newer step skipped), else None."""
    if not os.path.isdir(ckpt_dir):
        return None
    steps = {int(m[1]) for n in os.listdir(ckpt_dir) if (m := re.fullmatch(r"(?:model|meta)_(\d{6,})\.(?:pt|json)", n))}
    for step in sorted(steps, reverse=True):
        if (problem := step_problem(ckpt_dir, step, world)) is None:
            return step
        if problem not in _warned:
            _warned.add(problem)
            common.print0(f"warning: skipping step {step}: {problem}", file=sys.stderr)
    return None

def default_tag(root):
    """The largest d<N> folder under a stage's checkpoint root, else the newest folder, else None."""
    tags = [t for t in os.listdir(root) if os.path.isdir(os.path.join(root, t))] if os.path.isdir(root) else []
    depth_tags = [t for t in tags if re.fullmatch(r"d\d+", t)]
    if depth_tags:
        return max(depth_tags, key=lambda t: int(t[1:]))
    return max(tags, key=lambda t: os.path.getmtime(os.path.join(root, t)), default=None)

def load_model(stage, device, tag=None, step=None, tokenizer=None):
    """-> (model in eval mode, meta) from <stage> checkpoints: largest d<N> tag and latest step by default."""
    if stage not in common.CHECKPOINT_DIRS:
        raise common.UserError(f"unknown stage {stage!r}; expected one of {sorted(common.CHECKPOINT_DIRS)}")
    make = f"run `python train.py --stage={stage}` first"
    root = common.checkpoint_dir(stage)
    tag = tag or default_tag(root)
    if tag is None:
        raise FileNotFoundError(f"no {stage} checkpoints in {root}: {make}")
    ckpt_dir = os.path.join(root, tag)
    if step is None:
        if (step := last_step(ckpt_dir)) is None:
            raise FileNotFoundError(f"no complete, readable {stage} checkpoint in {ckpt_dir}: {make}")
    elif not os.path.exists(os.path.join(ckpt_dir, f"model_{step:06d}.pt")):
        raise FileNotFoundError(f"no {stage} checkpoint at step {step} in {ckpt_dir}: {make}")
    elif problem := step_problem(ckpt_dir, step):
        raise common.UserError(problem)
    state, _, meta = load_checkpoint(ckpt_dir, step, device, tokenizer=tokenizer)
    model = build_model(meta["model_config"], device, init=None)
    if {k: v.shape for k, v in model.state_dict().items()} != {k: v.shape for k, v in state.items()}:
        raise common.UserError(f"{ckpt_dir}/model_{step:06d}.pt does not hold the model its meta_{step:06d}.json "
                               f"describes ({model.config})")
    model.load_state_dict(state, strict=True)  # copies into the fp32 parameters (bf16 tensors are upcast)
    return model.eval(), meta

# -----------------------------------------------------------------------------
# export: a folder transformers loads as NanoChatForCausalLM + a fast tokenizer (files only; transformers not imported)

HF_LAYER_NAMES = {"attn.c_q": "self_attn.q_proj", "attn.c_k": "self_attn.k_proj", "attn.c_v": "self_attn.v_proj",
                  "attn.c_proj": "self_attn.o_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
# Jinja twin of Tokenizer.render_conversation / render_for_completion (the system message joins the first user message)
HF_CHAT_TEMPLATE = (
    "{%- set msgs = messages -%}{%- if msgs and msgs[0]['role'] == 'system' -%}"
    "{%- set msgs = [{'role': 'user', 'content': msgs[0]['content'] + '\\n\\n' + msgs[1]['content']}] + msgs[2:] -%}"
    "{%- endif -%}<|bos|>{%- for m in msgs -%}{%- if m['role'] != ['user', 'assistant'][loop.index0 % 2] -%}"
    "{{ raise_exception('user and assistant messages must alternate') }}{%- endif -%}"
    "{%- if m['role'] == 'user' -%}<|user_start|>{{ m['content'] }}<|user_end|>"
    "{%- elif m['content'] is string -%}<|assistant_start|>{{ m['content'] }}<|assistant_end|>"
    "{%- else -%}<|assistant_start|>{%- for p in m['content'] -%}"
    "{%- if p['type'] == 'python' -%}<|python_start|>{{ p['text'] }}<|python_end|>"
    "{%- elif p['type'] == 'python_output' -%}<|output_start|>{{ p['text'] }}<|output_end|>"
    "{%- else -%}{{ p['text'] }}{%- endif -%}{%- endfor -%}<|assistant_end|>{%- endif -%}"
    "{%- endfor -%}{%- if add_generation_prompt -%}<|assistant_start|>{%- endif -%}")

def hf_merges(ranks):
    """[(left, right)] in rank order: each token's two parents as tiktoken's BPE forms it from lower ranks only, so
    HF's merge-list BPE takes the same steps tiktoken takes."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            r, i = min((ranks.get(parts[i] + parts[i + 1], math.inf), i) for i in range(len(parts) - 1))
            if r >= rank:
                raise common.UserError(f"token {rank} ({token!r}) is not a merge of two lower-rank tokens: "
                                       "not a BPE vocabulary")
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges.append(tuple(parts))
    return merges

def export_hf(source, out, tag=None, step=None):
    """Write config.json, model.safetensors, tokenizer(_config).json, generation_config.json, README.md into `out`."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise common.UserError(f"--out {out} already exists and is not an empty folder: pick a new path")
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise common.UserError("export writes model.safetensors and needs the safetensors package: "
                               "pip install safetensors") from None
    import tokenizer as tokenizer_lib  # only here: model.py otherwise imports nothing but common.py
    tok = tokenizer_lib.get_tokenizer()
    model, meta = load_model(source, "cpu", tag=tag, step=step, tokenizer=tok)
    c = model.config
    options = dict(window_pattern=any(layer_windows(c)), qk_scale=c.qk_scale != 1, resid_lambdas=c.resid_lambdas,
                   value_embeds=c.value_embeds, smear=c.smear, backout=c.backout)  # rope_base and padding carry over
    if unsupported := [name for name, used in options.items() if used]:
        raise common.UserError(f"transformers' NanoChat class cannot represent this model's {', '.join(unsupported)}: "
                               "not exported (train with those options off to export; README: recipe)")
    state = {}
    for name, tensor in model.state_dict().items():
        if m := re.fullmatch(r"transformer\.h\.(\d+)\.(\w+\.\w+)\.weight", name):
            name = f"model.layers.{m[1]}.{HF_LAYER_NAMES[m[2]]}.weight"
        elif name == "transformer.wte.weight":
            name = "model.embed_tokens.weight"
        rows = c.vocab_size if "embed" in name or "lm_head" in name else None  # the padding rows cropped
        state[name] = tensor.detach().float()[:rows].contiguous()
    bos, eos = tok.special["<|bos|>"], tok.special["<|assistant_end|>"]
    config = dict(architectures=["NanoChatForCausalLM"], model_type="nanochat", vocab_size=c.vocab_size,
                  hidden_size=c.n_embd, intermediate_size=4 * c.n_embd, num_hidden_layers=c.n_layer,
                  num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head, max_position_embeddings=c.sequence_len,
                  hidden_act="relu2", rms_norm_eps=torch.finfo(torch.float32).eps,  # F.rms_norm's default eps
                  rope_parameters={"rope_type": "default", "rope_theta": float(c.rope_base)},
                  final_logit_softcapping=SOFTCAP, attention_bias=False, tie_word_embeddings=False,
                  bos_token_id=bos, eos_token_id=eos, pad_token_id=bos, dtype="float32")
    # GPT-2's byte -> printable character map, which HF's ByteLevel pre-tokenizer and decoder use
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    cmap = {b: chr(b) if b in printable else chr(256 + sum(x not in printable for x in range(b))) for b in range(256)}
    hf = lambda token: "".join(cmap[b] for b in token)
    ranks = tok.enc._mergeable_ranks
    added = [dict(id=i, content=s, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
             for s, i in sorted(tok.special.items(), key=lambda kv: kv[1])]
    split = dict(type="Split", pattern=dict(Regex=tok.enc._pat_str), behavior="Isolated", invert=False)
    byte_level = dict(type="ByteLevel", add_prefix_space=False, trim_offsets=False, use_regex=False)
    bpe = dict(type="BPE", dropout=None, unk_token=None, continuing_subword_prefix=None, end_of_word_suffix=None,
               fuse_unk=False, byte_fallback=False, ignore_merges=True,  # a chunk that is a whole token is that token
               vocab={hf(t): i for t, i in ranks.items()}, merges=[[hf(a), hf(b)] for a, b in hf_merges(ranks)])
    tokenizer_json = dict(version="1.0", truncation=None, padding=None, added_tokens=added, normalizer=None,
                          post_processor=None, pre_tokenizer=dict(type="Sequence", pretokenizers=[split, byte_level]),
                          decoder=byte_level, model=bpe)
    tokenizer_config = dict(tokenizer_class="PreTrainedTokenizerFast", bos_token="<|bos|>",
                            eos_token="<|assistant_end|>", pad_token="<|bos|>", model_max_length=c.sequence_len,
                            clean_up_tokenization_spaces=False, chat_template=HF_CHAT_TEMPLATE)
    generation_config = dict(bos_token_id=bos, eos_token_id=[eos, bos], pad_token_id=bos)  # our Engine stops at either
    report = os.path.join(common.get_base_dir(), "report")
    read = lambda slug: open(p).read().splitlines() if os.path.exists(p := os.path.join(report, f"{slug}.md")) else []
    stages = list(common.CHECKPOINT_DIRS)[:list(common.CHECKPOINT_DIRS).index(source) + 1]  # base, mid, sft, rl
    seen = [f"{s} ({line[10:]} tokens)" for s in stages for line in read(common.TRAINING_SECTIONS[s])
            if line.startswith("- tokens: ")]
    evaluations = ("base-model-evaluation", "base-model-loss", f"chat-evaluation-{source}")
    metrics = [f"#{line}" if line[0] == "#" else line for slug in evaluations for line in read(slug)
               if line.startswith(("- ", "## "))]
    bpb = f", validation bpb {meta['val_bpb']:.4f}." if meta.get("val_bpb") else "."
    card = [f"# nanochat {source} model", "",
            f"A {c.n_layer}-layer nanochat GPT ({model.param_counts()['total']:,} parameters, vocab {c.vocab_size:,}, "
            f"context {c.sequence_len}) from the `{source}` checkpoint at step {meta.get('step')}{bpb}",
            "", f"Stages and tokens seen (training report): {' → '.join(seen) or 'not recorded'}", "",
            "## Metrics (from the training report)", "", *(metrics or ["none recorded"]), "", "## Use", "", "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "model, tok = AutoModelForCausalLM.from_pretrained('DIR'), AutoTokenizer.from_pretrained('DIR')",
            "ids = tok.apply_chat_template([{'role': 'user', 'content': 'Hi!'}], add_generation_prompt=True, "
            "return_tensors='pt', return_dict=False)", "```", ""]
    tmp = f"{os.path.abspath(out)}.tmp{os.getpid()}"  # written whole, then renamed to --out: a failure leaves nothing
    try:
        os.makedirs(tmp)
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        os.chmod(os.path.join(tmp, "model.safetensors"), 0o644)  # safetensors writes it owner-only
        for name, obj in (("config.json", config), ("tokenizer.json", tokenizer_json),
                          ("tokenizer_config.json", tokenizer_config), ("generation_config.json", generation_config),
                          ("README.md", "\n".join(card))):
            text = obj if isinstance(obj, str) else json.dumps(obj, indent=2, ensure_ascii=False)
            common.atomic_write_text(os.path.join(tmp, name), text)
        os.replace(tmp, out)  # onto a missing path or an empty folder
    except Exception as e:  # a full disk, a file-size limit, --out under a file (safetensors raises its own error type)
        shutil.rmtree(tmp, ignore_errors=True)
        raise common.UserError(f"could not write --out {out} ({type(e).__name__}: {e}): is the disk full, or the path "
                               "under a file?") from None
    return out

def main():
    parser = argparse.ArgumentParser(description="nanochat model: `bench` times inference of random-init models; "
                                     "`export --source STAGE --out DIR` writes a Hugging Face transformers folder")
    parser.add_argument("command", choices=["bench", "export"])
    parser.add_argument("--source", default=None, help="export: base|mid|sft|rl")
    parser.add_argument("--tag", default=None, help="export: checkpoint tag (default: the largest d<N>)")
    parser.add_argument("--step", type=int, default=None, help="export: checkpoint step (default: the last)")
    parser.add_argument("--out", default=None, help="export: a new (or empty) folder")
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8, 12])
    parser.add_argument("--vocab-size", type=int, default=65536)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="num_samples values")
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting; the fastest is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default=None, help="cpu|cuda (default: autodetect)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.command == "export":
        if not args.source or not args.out:
            raise common.UserError("export needs --source base|mid|sft|rl and --out DIR")
        print(f"wrote {export_hf(args.source, args.out, args.tag, args.step)}")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or common.autodetect_device()
    bench(args.depths, args.vocab_size, args.prompt_len, args.new_tokens, args.batches, device, args.repeats)

# -----------------------------------------------------------------------------
# benchmarks

class BenchTokenizer:
    """The benchmark needs no text: special tokens sit at the top ids (python_* never sampled in practice)."""
    NAMES = ["bos", "user_start", "user_end", "assistant_start", "assistant_end", "python_start", "python_end",
             "output_start", "output_end"]

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def encode_special(self, name):
        return self.vocab_size - len(self.NAMES) + self.NAMES.index(name.strip("<|>"))

    def encode(self, text):
        return [ord(ch) % 256 for ch in text]

    def decode(self, ids):
        return "".join(chr(i % 256) for i in ids)

def bench(depths, vocab_size, prompt_len, new_tokens, batches, device, repeats):
    """Prefill tok/s, time to first token and decode tok/s (best of `repeats`) of random-init models, top-k 50."""
    common.print0(f"device {device}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f} "
                  "(a shared machine skews this)")
    torch.manual_seed(0)
    for depth in depths:
        model = build_model(asdict(config_from_depth(depth, vocab_size)), device).eval()
        engine = Engine(model, BenchTokenizer(vocab_size))
        prompt = torch.randint(0, vocab_size - 9, (prompt_len,)).tolist()
        for num_samples in batches:
            ttft, decode = float("inf"), 0.0
            for _ in range(repeats):
                t0 = time.perf_counter()
                gen = engine.generate(prompt, num_samples=num_samples, max_tokens=new_tokens, temperature=1.0, top_k=50)
                next(gen)
                t1 = time.perf_counter()
                n = sum(1 for _ in gen)
                ttft, decode = min(ttft, t1 - t0), max(decode, n * num_samples / (time.perf_counter() - t1))
            common.print0(f"depth {depth:2d} | params {model.param_counts()['total'] / 1e6:7.1f}M | "
                          f"num_samples {num_samples} | prefill {prompt_len / ttft:8.1f} tok/s | "
                          f"TTFT {ttft * 1000:7.1f} ms | decode {decode:7.1f} tok/s")

if __name__ == "__main__":
    common.run_main(main)
