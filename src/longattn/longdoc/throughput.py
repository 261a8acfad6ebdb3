"""The long encoder's cost against the same weights with dense attention, on one long input.

Three models read the same ``tokens``-token document, batch 1:

- the converted MiniLM (longattn's Longformer, window 512 + global CLS);
- its dense twin in longattn: the same model with a window covering the whole input, so every query sees
  every key (``auto`` sends it to PyTorch's SDPA with the pattern's mask);
- the fair dense baseline a user would reach for: transformers' ``BertModel`` with SDPA attention and no mask
  at all (measured on CPU: the fused kernel in inference; in training, with attention dropout on, a step holds
  the full probabilities as the masked twin does), the MiniLM weights with the position table
  extended as ``convert`` extends it (the timing does not depend on the values).

For each: forward (inference) time, tokens per second and the peak of tensor memory
(``tools.measure.peak_mb``, exact on CPU), then a training step (forward + backward of a mean-square loss on
the last hidden states), the long encoder also with gradient checkpointing. The machine's matmul rates are
measured in the same run, so the numbers can be compared across machines.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from ..io import write_json
from ..models.longformer import LongformerModel
from ..tools.bench import matmul_gflops
from ..tools.measure import median_ms, peak_mb


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = torch.device("cpu")
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "fp32_gflops": matmul_gflops(torch.float32, device), "bf16_gflops": matmul_gflops(torch.bfloat16, device)}


def dense_bert(tokens: int):
    """all-MiniLM-L6-v2 as transformers' ``BertModel`` with SDPA attention and ``tokens`` positions (the
    learned 512 repeated, as ``convert.extend_positions`` does), in evaluation mode."""
    import transformers

    from .encoders import minilm_path

    model = transformers.BertModel.from_pretrained(minilm_path(), attn_implementation="sdpa")
    table = model.embeddings.position_embeddings.weight.detach()  # (512, C)
    config = model.config
    config.max_position_embeddings = tokens
    config._attn_implementation = "sdpa"  # the constructor takes no attn_implementation; the config carries it
    bert = transformers.BertModel(config, add_pooling_layer=False)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("pooler")
             and not k.endswith(("position_ids", "token_type_ids"))}
    state["embeddings.position_embeddings.weight"] = table.repeat(-(-tokens // len(table)), 1)[:tokens]
    missing, unexpected = bert.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith(("position_ids", "token_type_ids")) for k in missing), (missing, unexpected)
    assert bert.config._attn_implementation == "sdpa", bert.config._attn_implementation
    return bert.eval()


def measure_throughput(model_dir: Path | str, out: Path | str, *, tokens: int = 4096, min_run_time: float = 2.0
                       ) -> dict:
    """Time and memory of the long encoder and the two dense baselines at ``tokens`` tokens; written to
    ``out/throughput.json``."""
    from ..models.longformer import LongformerConfig

    model_dir = Path(model_dir)
    device = torch.device("cpu")
    sparse = LongformerModel.from_pretrained(model_dir)
    config = LongformerConfig.from_hf({**sparse.config.to_hf(), "attention_window": 2 * tokens})
    dense = LongformerModel(config, add_pooling_layer=sparse.pooler is not None).eval()
    dense.load_state_dict(sparse.state_dict())
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, config.vocab_size, (1, tokens), generator=gen)
    flags = torch.zeros(1, tokens, dtype=torch.long)
    flags[:, 0] = 1
    def longformer(m):
        return m(ids, global_attention_mask=flags)

    def plain(m):
        return m(input_ids=ids)

    sparse_name = "window 512 + global CLS"
    models = [(sparse_name, sparse, longformer),
              (f"longattn dense twin (window {2 * tokens}, masked SDPA)", dense, longformer),
              ("transformers BERT, SDPA without a mask", dense_bert(tokens), plain)]
    rows = []

    def measure(name: str, mode: str, fn) -> None:
        ms = median_ms(fn, device, min_run_time)
        rows.append({"attention": name, "mode": mode, "tokens": tokens, "ms": ms,
                     "tokens_per_s": tokens / (ms / 1e3), "peak_mb": peak_mb(fn, device, False)})

    for name, model, call in models:
        def forward():
            with torch.inference_mode():
                call(model)

        measure(name, "forward", forward)
    for name, model, call in [models[0], (f"{sparse_name}, checkpointed", sparse, longformer), *models[1:]]:
        model.train()
        checkpointing = name.endswith("checkpointed")
        if checkpointing:
            model.gradient_checkpointing_enable()

        def train_step():
            call(model).last_hidden_state.square().mean().backward()
            model.zero_grad(set_to_none=True)

        measure(name, "train step", train_step)
        if checkpointing:
            model.gradient_checkpointing_disable()
        model.eval()
    result = {"machine": machine(), "rows": rows}
    write_json(Path(out) / "throughput.json", result)
    return result
