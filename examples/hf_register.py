"""Switch a Hugging Face model to a longattn pattern with one call (a tiny BERT built from a config: no
download). Needs the hf extra: pip install -e ".[hf]". Run: python examples/hf_register.py
"""

import sys

import torch

try:
    import transformers
    from longattn.integrations.hf import register
except ImportError:
    print("transformers is not installed: pip install -e '.[hf]'")
    sys.exit(0)

register("local64", "sliding_window(32) | global_tokens([0])")  # a name for attn_implementation
config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                 max_position_embeddings=1024, vocab_size=100)
torch.manual_seed(0)
sparse = transformers.AutoModel.from_config(config, attn_implementation="local64").eval()

ids = torch.randint(3, 100, (2, 1000))
mask = torch.ones_like(ids)
mask[1, 600:] = 0  # a padded batch: the mask reaches longattn as (B, N), never as an N x N grid
with torch.no_grad():
    out = sparse(ids, attention_mask=mask).last_hidden_state  # (2, 1000, 64)
    # The window covers 32 keys per side: for short inputs (< 33 tokens) it is full attention, as in sdpa.
    dense = transformers.AutoModel.from_config(config, attn_implementation="sdpa").eval()
    dense.load_state_dict(sparse.state_dict())
    short = ids[:, :30]
    diff = (sparse(short).last_hidden_state - dense(short).last_hidden_state).abs().max()
print("output:", tuple(out.shape), f" short inputs vs sdpa: max abs diff {diff:.1e}")
assert diff < 1e-4
