"""Train a tiny classifier with a SparseSelfAttention layer: does a marker occur in the second half of the
sequence? A window of 8 keys per side cannot see that far from the CLS token in front; the CLS token is
global, so it can. Run: python examples/train_sparse_layer.py
"""

import torch
from torch import nn

import longattn as la

torch.manual_seed(0)
N, C, VOCAB, CLS, MARKER = 256, 32, 16, 14, 15
embed = nn.Embedding(VOCAB, C)
attn = la.SparseSelfAttention(C, 4, pattern=la.sliding_window(8) | la.global_tokens([0]))
head = nn.Linear(C, 2)
model = nn.ModuleList([embed, attn, head])


def classify(ids):  # (B, N) -> (B, 2) logits
    x = embed(ids)  # (B, N, C)
    return head((x + attn(x))[:, 0])  # read the CLS token


def batch(size=32):
    ids = torch.randint(0, CLS, (size, N))  # no marker yet
    ids[:, 0] = CLS
    ids[torch.arange(size // 2), torch.randint(N // 2, N, (size // 2,))] = MARKER  # half get one, far away
    return ids, (ids == MARKER).any(1).long()


optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
for step in range(1, 51):
    ids, labels = batch()
    loss = nn.functional.cross_entropy(classify(ids), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 10 == 0:
        print(f"step {step:2d}  loss {loss.item():.3f}")
ids, labels = batch(256)
print(f"accuracy {(classify(ids).argmax(1) == labels).float().mean().item():.2f} (chance 0.50)")
