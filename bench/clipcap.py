"""ClipCap's training code (rmokady/CLIP_prefix_caption, train.py), as the baseline bench/train.py runs.

Written out line for line where speed depends on it: `ClipCocoDataset` pads every caption to one
global length (mean + 10 std of the token counts, capped at the longest) with token 0 and
`ignore_index=0`; `ClipCaptionModel` / `ClipCaptionPrefix` (the frozen-GPT-2 variant freezes by
overriding `parameters()`, so GPT-2's weight gradients are still computed every step); the loop is
its `train()`: `DataLoader(shuffle=True, drop_last=True)`, AdamW (transformers' for-loop AdamW, i.e.
torch's single-tensor implementation), the linear warm-up schedule, fp32 on one device. The model
classes are also tests/test_clipcap_import.py's reference (it checks our import against them); a
published ClipCap checkpoint loads into them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnf
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import GPT2LMHeadModel, get_linear_schedule_with_warmup


class MLP(nn.Module):
    def __init__(self, sizes, bias=True, act=nn.Tanh):
        super().__init__()
        layers = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=bias))
            if i < len(sizes) - 2:
                layers.append(act())
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)


class MlpTransformer(nn.Module):
    def __init__(self, in_dim, h_dim, out_d=None, act=nnf.relu, dropout=0.0):
        super().__init__()
        out_d = out_d if out_d is not None else in_dim
        self.fc1, self.act, self.fc2, self.dropout = nn.Linear(in_dim, h_dim), act, nn.Linear(h_dim, out_d), nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.fc2(self.dropout(self.act(self.fc1(x)))))


class MultiHeadAttention(nn.Module):
    def __init__(self, dim_self, dim_ref, num_heads, bias=True, dropout=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim_self // num_heads) ** -0.5
        self.to_queries = nn.Linear(dim_self, dim_self, bias=bias)
        self.to_keys_values = nn.Linear(dim_ref, dim_self * 2, bias=bias)
        self.project = nn.Linear(dim_self, dim_self)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, y=None, mask=None):
        y = y if y is not None else x
        b, n, c = x.shape
        _, m, d = y.shape
        queries = self.to_queries(x).reshape(b, n, self.num_heads, c // self.num_heads)
        keys_values = self.to_keys_values(y).reshape(b, m, 2, self.num_heads, c // self.num_heads)
        keys, values = keys_values[:, :, 0], keys_values[:, :, 1]
        attention = torch.einsum("bnhd,bmhd->bnmh", queries, keys) * self.scale
        attention = attention.softmax(dim=2)
        out = torch.einsum("bnmh,bmhd->bnhd", attention, values).reshape(b, n, c)
        return self.project(out), attention


class TransformerLayer(nn.Module):
    def __init__(self, dim_self, dim_ref, num_heads, mlp_ratio=4.0, bias=False, dropout=0.0, act=nnf.relu):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim_self)
        self.attn = MultiHeadAttention(dim_self, dim_ref, num_heads, bias=bias, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim_self)
        self.mlp = MlpTransformer(dim_self, int(dim_self * mlp_ratio), act=act, dropout=dropout)

    def forward(self, x, y=None, mask=None):
        x = x + self.attn(self.norm1(x), y, mask)[0]
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, dim_self, num_heads, num_layers, mlp_ratio=2.0):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(dim_self, dim_self, num_heads, mlp_ratio) for _ in range(num_layers))

    def forward(self, x, y=None, mask=None):
        for layer in self.layers:
            x = layer(x, y, mask)
        return x


class TransformerMapper(nn.Module):
    def __init__(self, dim_clip, dim_embedding, prefix_length, clip_length, num_layers=8):
        super().__init__()
        self.clip_length = clip_length
        self.transformer = Transformer(dim_embedding, 8, num_layers)
        self.linear = nn.Linear(dim_clip, clip_length * dim_embedding)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, dim_embedding), requires_grad=True)

    def forward(self, x):
        x = self.linear(x).view(x.shape[0], self.clip_length, -1)
        prefix = self.prefix_const.unsqueeze(0).expand(x.shape[0], *self.prefix_const.shape)
        prefix = torch.cat((x, prefix), dim=1)
        return self.transformer(prefix)[:, self.clip_length :]


class ClipCaptionModel(nn.Module):
    def __init__(self, gpt: GPT2LMHeadModel, prefix_length, clip_length=None, prefix_size=512, num_layers=8, mapping_type="mlp"):
        super().__init__()
        self.prefix_length = prefix_length
        self.gpt = gpt  # ClipCap: GPT2LMHeadModel.from_pretrained('gpt2')
        self.gpt_embedding_size = self.gpt.transformer.wte.weight.shape[1]
        if mapping_type == "mlp":
            d, p = self.gpt_embedding_size, prefix_length
            self.clip_project = MLP((prefix_size, (d * p) // 2, d * p))
        else:
            self.clip_project = TransformerMapper(prefix_size, self.gpt_embedding_size, prefix_length, clip_length, num_layers)

    def forward(self, tokens, prefix, mask=None):
        embedding_text = self.gpt.transformer.wte(tokens)
        prefix_projections = self.clip_project(prefix).view(-1, self.prefix_length, self.gpt_embedding_size)
        embedding_cat = torch.cat((prefix_projections, embedding_text), dim=1)
        return self.gpt(inputs_embeds=embedding_cat, attention_mask=mask)


class ClipCaptionPrefix(ClipCaptionModel):
    """ClipCap's `--only_prefix`: GPT-2 "frozen" by hiding its weights from `parameters()`."""

    def parameters(self, recurse: bool = True):
        return self.clip_project.parameters()

    def train(self, mode: bool = True):
        super().train(mode)
        self.gpt.eval()
        return self


class ClipCocoDataset(Dataset):
    """ClipCap's dataset over token lists and a (N, 512) prefix table: global-maximum padding."""

    def __init__(self, captions_tokens: list[list[int]], caption2embedding: list[int], prefixes: torch.Tensor, prefix_length: int):
        self.captions_tokens = [torch.tensor(t, dtype=torch.int64) for t in captions_tokens]
        self.caption2embedding, self.prefixes, self.prefix_length = caption2embedding, prefixes, prefix_length
        all_len = torch.tensor([len(t) for t in self.captions_tokens]).float()
        self.max_seq_len = min(int(all_len.mean() + all_len.std() * 10), int(all_len.max()))

    def __len__(self) -> int:
        return len(self.captions_tokens)

    def pad_tokens(self, item: int):
        tokens = self.captions_tokens[item]
        padding = self.max_seq_len - tokens.shape[0]
        if padding > 0:
            tokens = torch.cat((tokens, torch.zeros(padding, dtype=torch.int64) - 1))
        elif padding < 0:
            tokens = tokens[: self.max_seq_len]
        mask = tokens.ge(0)  # mask is zero where we are out of sequence
        tokens[~mask] = 0
        mask = mask.float()
        mask = torch.cat((torch.ones(self.prefix_length), mask), dim=0)  # adding prefix mask
        return tokens, mask

    def __getitem__(self, item: int):
        tokens, mask = self.pad_tokens(item)
        prefix = self.prefixes[self.caption2embedding[item]]
        return tokens, mask, prefix


def loader_and_optimizer(dataset, model, batch_size: int, steps: int, lr: float = 2e-5, warmup_steps: int = 5000):
    """ClipCap's `train()` set-up: its loader, AdamW (for-loop) and linear schedule."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, foreach=False)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=warmup_steps, num_training_steps=steps)
    return loader, optimizer, scheduler


def train_step(model, batch, optimizer, scheduler, prefix_length: int, device) -> float:
    """One iteration of ClipCap's training loop."""
    tokens, mask, prefix = batch
    model.zero_grad()
    tokens, mask, prefix = tokens.to(device), mask.to(device), prefix.to(device, dtype=torch.float32)
    outputs = model(tokens, prefix, mask)
    logits = outputs.logits[:, prefix_length - 1 : -1]
    loss = nnf.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.flatten(), ignore_index=0)
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return loss.item()
