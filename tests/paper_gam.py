"""A direct transcription of the paper's GAM code (arXiv 2509.00605), written the plain way a
paper's code is, independently of gam_pretrain/models/gam.py.

The tests' yardstick: our GAM must compute the same function, dropout included (the same
nn.Dropout calls in the same order, so the same masks for the same seed). Parameter names match
gam_pretrain.models.gam.GAM, so a state dict moves between the two.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gam_pretrain.models import ModelConfig


class PaperGAMBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, k = cfg.d_model, cfg.conv_kernel
        self.ln1 = nn.LayerNorm(C)
        self.conv = nn.Conv1d(C, C, k, padding=k - 1, groups=C)  # pad both sides, trim the right
        self.memory = nn.Parameter(torch.randn(cfg.memory_slots, C) * 0.02)
        self.gate = nn.Linear(C, 2 * C)
        self.ln2 = nn.LayerNorm(C)
        self.ffn = nn.Sequential(nn.Linear(C, 4 * C), nn.GELU(), nn.Linear(4 * C, C), nn.Dropout(cfg.dropout))
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        T = x.size(1)
        h = self.ln1(x)
        local = self.conv(h.transpose(1, 2))[:, :, :T].transpose(1, 2)
        scores = torch.matmul(h, self.memory.t())
        weights = F.softmax(scores, dim=-1)
        global_ = torch.matmul(weights, self.memory)
        gates = self.gate(h)
        g_local, g_global = gates.chunk(2, dim=-1)
        mixed = torch.sigmoid(g_local) * local + torch.sigmoid(g_global) * global_
        x = x + self.dropout(mixed)
        x = x + self.ffn(self.ln2(x))
        return x


class PaperGAM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model)
        self.emb_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(PaperGAMBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight

    def forward(self, idx, targets=None):
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)
        x = self.emb_dropout(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.final_norm(x))
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
