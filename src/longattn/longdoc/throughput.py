"""The long encoder's cost against the same weights with dense attention, on one long input.

The converted MiniLM (window 512 + global CLS) and the same model with a window covering the whole input
(every query sees every key: dense attention, which ``auto`` runs through PyTorch's SDPA) read the same
``tokens``-token document, batch 1: forward (inference) time, tokens per second and the peak of tensor memory
(``tools.measure.peak_mb``, exact on CPU), then a training step (forward + backward) with and without gradient
checkpointing. The machine's matmul rates are measured in the same run, so the numbers can be compared across
machines.
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


def measure_throughput(model_dir: Path | str, out: Path | str, *, tokens: int = 4096, min_run_time: float = 2.0
                       ) -> dict:
    """Time and memory of the long encoder and its dense twin at ``tokens`` tokens; written to
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
    rows = []
    for name, model in (("window 512 + global CLS", sparse), (f"dense (window {2 * tokens})", dense)):
        def forward():
            with torch.inference_mode():
                model(ids, global_attention_mask=flags)

        ms = median_ms(forward, device, min_run_time)
        rows.append({"attention": name, "mode": "forward", "tokens": tokens, "ms": ms,
                     "tokens_per_s": tokens / (ms / 1e3), "peak_mb": peak_mb(forward, device, False)})
    for name, model, checkpointing in (("window 512 + global CLS", sparse, False),
                                       ("window 512 + global CLS, checkpointed", sparse, True),
                                       (f"dense (window {2 * tokens})", dense, False)):
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()

        def train_step():
            model(ids, global_attention_mask=flags).last_hidden_state.square().mean().backward()
            model.zero_grad(set_to_none=True)

        ms = median_ms(train_step, device, min_run_time)
        rows.append({"attention": name, "mode": "train step", "tokens": tokens, "ms": ms,
                     "tokens_per_s": tokens / (ms / 1e3), "peak_mb": peak_mb(train_step, device, False)})
        model.gradient_checkpointing_disable()
        model.eval()
    result = {"machine": machine(), "rows": rows}
    write_json(Path(out) / "throughput.json", result)
    return result
