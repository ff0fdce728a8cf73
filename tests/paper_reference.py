"""An independent transcription of the GAM paper's published code (arXiv 2509.00605,
github.com/rishiraj/gam, benchmark.py): its three models, its data procedure and its training step.

Written from benchmark.py, and from mamba-ssm (github.com/state-spaces/mamba,
mamba_ssm/modules/mamba_simple.py and mamba_ssm/ops/selective_scan_interface.py) for the Mamba
block the paper imports, NOT from gam_pretrain. Module names, parameter names, initialisation
(PyTorch's defaults everywhere, xavier_uniform_ on the memory bank, mamba-ssm's dt/A/D init),
dropout sites and forward passes are the paper's, line for line; only the Config class takes
keyword overrides (for small test sizes) and the wandb/tqdm/DataLoader plumbing is left out.

tests/test_transplant.py copies these models' weights into ours and checks that both compute and
train the same, and that our prep gives the same tokenizer and chunks as `paper_tokenizer` and
`paper_chunks`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.optim.lr_scheduler import LambdaLR


# --- Configuration (the paper's Config class; attributes can be overridden per instance) ---
class Config:
    # --- Dataset Configuration ---
    MAX_TRAIN_ROWS = 50000
    MAX_VAL_ROWS = 5000

    # --- Model & Training Configuration ---
    VOCAB_SIZE = 10000
    BLOCK_SIZE = 256

    N_EMBED = 512
    N_HEAD = 8
    N_LAYER = 6
    DROPOUT = 0.1

    # GAM specific
    NUM_MEMORY_SLOTS = 512
    CONV_KERNEL_SIZE = 3  # Kernel for local context

    # Mamba specific
    D_STATE = 16
    D_CONV = 4
    EXPAND = 3

    BATCH_SIZE = 32
    LEARNING_RATE = 3e-4
    EPOCHS = 5
    DEVICE = "cpu"

    # Scheduler params
    WARMUP_STEPS = 100

    def __init__(self, **overrides):
        for key, value in overrides.items():
            if not hasattr(type(self), key):
                raise AttributeError(f"the paper's Config has no {key}")
            setattr(self, key, value)


# --- 1. Data Preparation (prepare_data, as functions) ---
def paper_tokenizer(texts_by_split: dict, vocab_size: int):
    """The paper's tokenizer: BPE trained on the text of ALL splits (get_training_corpus yields each
    non-empty split's list of rows), [UNK]/[PAD]/[SOS]/[EOS] specials, Whitespace pre-tokenizer."""
    from tokenizers import Tokenizer
    from tokenizers.models import BPE
    from tokenizers.pre_tokenizers import Whitespace
    from tokenizers.trainers import BpeTrainer

    def get_training_corpus():
        # Iterate over all available splits for tokenizer training
        return (texts_by_split[split] for split in texts_by_split if len(texts_by_split[split]) > 0)

    tokenizer = Tokenizer(BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    trainer = BpeTrainer(special_tokens=["[UNK]", "[PAD]", "[SOS]", "[EOS]"], vocab_size=vocab_size)
    tokenizer.train_from_iterator(get_training_corpus(), trainer=trainer)
    return tokenizer


def paper_chunks(tokenizer, rows: list, block_size: int) -> torch.Tensor:
    """The paper's tokenize_function + CustomDataset(token_list, BLOCK_SIZE + 1): every row encoded,
    the ids concatenated with no separator, cut into non-overlapping chunks of block_size + 1, the
    remainder dropped. Returns the (N, block_size + 1) tensor (CustomDataset.data)."""
    token_list = [t.ids for t in tokenizer.encode_batch(rows)]
    chunk = block_size + 1
    all_tokens = [token for sublist in token_list for token in sublist]
    num_blocks = len(all_tokens) // chunk
    return torch.tensor(all_tokens[:num_blocks * chunk]).view(-1, chunk)


def paper_batch(chunks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CustomDataset.__getitem__ over a batch of chunks, (chunk[:-1], chunk[1:]), collated as the
    DataLoader's default_collate does (torch.stack: contiguous tensors)."""
    return torch.stack([chunk[:-1] for chunk in chunks]), torch.stack([chunk[1:] for chunk in chunks])


# --- 2. Model Implementation ---

# A. Gated Associative Memory (GAM) Network
class GAMBlock(nn.Module):
    """ A single block of the GAM model, designed to be a parallel O(N) replacement for self-attention. """
    def __init__(self, config):
        super().__init__()
        self.causal_conv = nn.Conv1d(
            in_channels=config.N_EMBED, out_channels=config.N_EMBED,
            kernel_size=config.CONV_KERNEL_SIZE, padding=config.CONV_KERNEL_SIZE - 1,
            groups=config.N_EMBED
        )
        self.memory_bank = nn.Parameter(torch.randn(config.NUM_MEMORY_SLOTS, config.N_EMBED))
        nn.init.xavier_uniform_(self.memory_bank)
        self.gate = nn.Linear(config.N_EMBED, 2 * config.N_EMBED)
        self.ffn = nn.Sequential(
            nn.Linear(config.N_EMBED, 4 * config.N_EMBED), nn.GELU(),
            nn.Linear(4 * config.N_EMBED, config.N_EMBED), nn.Dropout(config.DROPOUT)
        )
        self.ln1 = nn.LayerNorm(config.N_EMBED)
        self.ln2 = nn.LayerNorm(config.N_EMBED)

    def forward(self, x):
        res = x
        x = self.ln1(x)
        x_permuted = x.permute(0, 2, 1)
        local_context = self.causal_conv(x_permuted)
        local_context = local_context[:, :, :x.shape[1]].permute(0, 2, 1)
        scores = x @ self.memory_bank.T
        weights = F.softmax(scores, dim=-1)
        global_context = weights @ self.memory_bank
        local_g, global_g = self.gate(x).chunk(2, dim=-1)
        fused_context = torch.sigmoid(local_g) * local_context + torch.sigmoid(global_g) * global_context
        x = res + fused_context
        x = x + self.ffn(self.ln2(x))
        return x


class GAM_Model(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.VOCAB_SIZE, config.N_EMBED)
        self.pos_embedding = nn.Embedding(config.BLOCK_SIZE, config.N_EMBED)
        self.dropout = nn.Dropout(config.DROPOUT)
        self.blocks = nn.ModuleList([GAMBlock(config) for _ in range(config.N_LAYER)])
        self.ln_f = nn.LayerNorm(config.N_EMBED)
        self.head = nn.Linear(config.N_EMBED, config.VOCAB_SIZE, bias=False)
        self.token_embedding.weight = self.head.weight

    def forward(self, idx, targets=None):
        B, T = idx.shape
        tok_emb = self.token_embedding(idx)
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device).unsqueeze(0)
        pos_emb = self.pos_embedding(pos)
        x = self.dropout(tok_emb + pos_emb)
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        logits = self.head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


# B. Transformer Model
class MultiHeadAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.N_EMBED % config.N_HEAD == 0
        self.n_head = config.N_HEAD
        self.head_dim = config.N_EMBED // config.N_HEAD
        self.c_attn = nn.Linear(config.N_EMBED, 3 * config.N_EMBED)
        self.c_proj = nn.Linear(config.N_EMBED, config.N_EMBED)
        self.attn_dropout = nn.Dropout(config.DROPOUT)
        self.resid_dropout = nn.Dropout(config.DROPOUT)
        self.register_buffer("bias", torch.tril(torch.ones(config.BLOCK_SIZE, config.BLOCK_SIZE))
                                     .view(1, 1, config.BLOCK_SIZE, config.BLOCK_SIZE))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float('-inf'))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        y = self.resid_dropout(self.c_proj(y))
        return y


class TransformerBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.N_EMBED)
        self.attn = MultiHeadAttention(config)
        self.ln_2 = nn.LayerNorm(config.N_EMBED)
        self.ffn = nn.Sequential(nn.Linear(config.N_EMBED, 4 * config.N_EMBED), nn.GELU(),
                                 nn.Linear(4 * config.N_EMBED, config.N_EMBED), nn.Dropout(config.DROPOUT))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.ffn(self.ln_2(x))
        return x


class TransformerModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.VOCAB_SIZE, config.N_EMBED)
        self.pos_embedding = nn.Embedding(config.BLOCK_SIZE, config.N_EMBED)
        self.dropout = nn.Dropout(config.DROPOUT)
        self.blocks = nn.ModuleList([TransformerBlock(config) for _ in range(config.N_LAYER)])
        self.ln_f = nn.LayerNorm(config.N_EMBED)
        self.head = nn.Linear(config.N_EMBED, config.VOCAB_SIZE, bias=False)
        self.token_embedding.weight = self.head.weight

    def forward(self, idx, targets=None):
        B, T = idx.shape
        tok_emb = self.token_embedding(idx)
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device).unsqueeze(0)
        pos_emb = self.pos_embedding(pos)
        x = self.dropout(tok_emb + pos_emb)
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        logits = self.head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


# C. Mamba: mamba-ssm's `Mamba` block (mamba_ssm/modules/mamba_simple.py), its __init__ and its
# forward without the fused kernels (use_fast_path off, causal_conv1d absent, no inference cache),
# with `selective_scan_ref` for the scan. einops' rearranges are written as permute/reshape.
def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """mamba_ssm.ops.selective_scan_interface.selective_scan_ref for real A and input-dependent
    B, C of shape (B N L) (what Mamba passes): a plain loop over time.

    u, delta, z: (B D L); A: (D N); B, C: (B N L); D, delta_bias: (D). Returns (B D L).
    """
    dtype_in = u.dtype
    u = u.float()
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, dstate = u.shape[0], A.shape[0], A.shape[1]
    B = B.float()
    C = C.float()
    x = A.new_zeros((batch, dim, dstate))
    ys = []
    deltaA = torch.exp(torch.einsum('bdl,dn->bdln', delta, A))
    deltaB_u = torch.einsum('bdl,bnl,bdl->bdln', delta, B, u)
    for i in range(u.shape[2]):
        x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
        y = torch.einsum('bdn,bn->bd', x, C[:, :, i])
        ys.append(y)
    y = torch.stack(ys, dim=2)  # (batch dim L)
    out = y if D is None else y + u * D[:, None]
    if z is not None:
        out = out * F.silu(z)
    out = out.to(dtype=dtype_in)
    return out


class Mamba(nn.Module):
    def __init__(
        self,
        d_model,
        d_state=16,
        d_conv=4,
        expand=2,
        dt_rank="auto",
        dt_min=0.001,
        dt_max=0.1,
        dt_init="random",
        dt_scale=1.0,
        dt_init_floor=1e-4,
        conv_bias=True,
        bias=False,
    ):
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(self.expand * self.d_model)
        self.dt_rank = math.ceil(self.d_model / 16) if dt_rank == "auto" else dt_rank

        self.in_proj = nn.Linear(self.d_model, self.d_inner * 2, bias=bias)

        self.conv1d = nn.Conv1d(
            in_channels=self.d_inner,
            out_channels=self.d_inner,
            bias=conv_bias,
            kernel_size=d_conv,
            groups=self.d_inner,
            padding=d_conv - 1,
        )

        self.activation = "silu"
        self.act = nn.SiLU()

        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + self.d_state * 2, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)

        # Initialize special dt projection to preserve variance at initialization
        dt_init_std = self.dt_rank**-0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, dt_init_std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        else:
            raise NotImplementedError

        # Initialize dt bias so that F.softplus(dt_bias) is between dt_min and dt_max
        dt = torch.exp(
            torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min))
            + math.log(dt_min)
        ).clamp(min=dt_init_floor)
        # Inverse of softplus: https://github.com/pytorch/pytorch/issues/72759
        inv_dt = dt + torch.log(-torch.expm1(-dt))
        with torch.no_grad():
            self.dt_proj.bias.copy_(inv_dt)
        # Our initialization would set all Linear.bias to zero, need to mark this one as _no_reinit
        self.dt_proj.bias._no_reinit = True

        # S4D real initialization
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1).contiguous()  # n -> d n
        A_log = torch.log(A)  # Keep A_log in fp32
        self.A_log = nn.Parameter(A_log)
        self.A_log._no_weight_decay = True

        # D "skip" parameter
        self.D = nn.Parameter(torch.ones(self.d_inner))  # Keep in fp32
        self.D._no_weight_decay = True

        self.out_proj = nn.Linear(self.d_inner, self.d_model, bias=bias)

    def forward(self, hidden_states):
        """
        hidden_states: (B, L, D)
        Returns: same shape as hidden_states
        """
        batch, seqlen, dim = hidden_states.shape

        # We do matmul and transpose BLH -> HBL at the same time
        # xz = rearrange(in_proj.weight @ rearrange(hidden_states, "b l d -> d (b l)"), "d (b l) -> b d l")
        xz = self.in_proj.weight @ hidden_states.reshape(batch * seqlen, dim).t()
        xz = xz.reshape(-1, batch, seqlen).permute(1, 0, 2)
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias.to(dtype=xz.dtype)[:, None]

        A = -torch.exp(self.A_log.float())  # (d_inner, d_state)
        x, z = xz.chunk(2, dim=1)
        # Compute short convolution (causal_conv1d_fn is None)
        x = self.act(self.conv1d(x)[..., :seqlen])

        # x_dbl = self.x_proj(rearrange(x, "b d l -> (b l) d"))
        x_dbl = self.x_proj(x.permute(0, 2, 1).reshape(batch * seqlen, -1))  # (bl d)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = self.dt_proj.weight @ dt.t()
        dt = dt.reshape(-1, batch, seqlen).permute(1, 0, 2)  # "d (b l) -> b d l"
        B = B.reshape(batch, seqlen, self.d_state).permute(0, 2, 1).contiguous()  # "(b l) dstate -> b dstate l"
        C = C.reshape(batch, seqlen, self.d_state).permute(0, 2, 1).contiguous()
        assert self.activation in ["silu", "swish"]
        y = selective_scan_ref(
            x,
            dt,
            A,
            B,
            C,
            self.D.float(),
            z=z,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
        )
        y = y.permute(0, 2, 1)  # "b d l -> b l d"
        out = self.out_proj(y)
        return out


class MambaModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.VOCAB_SIZE, config.N_EMBED)
        # Mamba does not typically use positional embeddings, but we add it for a fair comparison
        self.pos_embedding = nn.Embedding(config.BLOCK_SIZE, config.N_EMBED)
        self.dropout = nn.Dropout(config.DROPOUT)

        self.blocks = nn.ModuleList(
            [
                Mamba(
                    d_model=config.N_EMBED,
                    d_state=config.D_STATE,
                    d_conv=config.D_CONV,
                    expand=config.EXPAND,
                )
                for _ in range(config.N_LAYER)
            ]
        )
        self.ln_f = nn.LayerNorm(config.N_EMBED)
        self.head = nn.Linear(config.N_EMBED, config.VOCAB_SIZE, bias=False)
        self.token_embedding.weight = self.head.weight

    def forward(self, idx, targets=None):
        B, T = idx.shape
        tok_emb = self.token_embedding(idx)
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device).unsqueeze(0)
        pos_emb = self.pos_embedding(pos)
        x = self.dropout(tok_emb + pos_emb)

        for block in self.blocks:
            x = block(x)

        x = self.ln_f(x)
        logits = self.head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


# --- 3. Training and Evaluation Framework ---
def paper_optimizer(model, config):
    """run_experiment's optimizer: every parameter in one group, weight decay 0.1 on all of them."""
    return torch.optim.AdamW(model.parameters(), lr=config.LEARNING_RATE, betas=(0.9, 0.95), weight_decay=0.1)


def get_scheduler(optimizer, num_training_steps, config):
    """The paper's LambdaLR: step/warmup during warm-up (step 0 at lr 0), then cosine to 0."""
    def lr_lambda(current_step):
        if current_step < config.WARMUP_STEPS:
            return float(current_step) / float(max(1, config.WARMUP_STEPS))
        progress = float(current_step - config.WARMUP_STEPS) / float(max(1, num_training_steps - config.WARMUP_STEPS))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return LambdaLR(optimizer, lr_lambda)


def train_step(model, optimizer, scheduler, X, Y) -> float:
    """One iteration of train_one_epoch's loop (model.train() is the caller's, as the epoch's)."""
    optimizer.zero_grad(set_to_none=True)
    _, loss = model(X, Y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    return loss.item()


@torch.no_grad()
def evaluate(model, batches):
    """The paper's evaluate over an iterable of (X, Y): the mean over batches of each batch's mean loss."""
    model.eval()
    total_loss = 0
    n = 0
    for X, Y in batches:
        _, loss = model(X, Y)
        total_loss += loss.item()
        n += 1
    avg_loss = total_loss / n
    try:
        perplexity = math.exp(avg_loss)
    except OverflowError:
        perplexity = float('inf')
    return avg_loss, perplexity
