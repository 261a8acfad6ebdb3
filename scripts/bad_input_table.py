"""Run every bad input of issue 19 and print what each gives now, as a Markdown table (command or call, exit
status or exception, the message). Works in a temporary folder; nothing is left behind.

    .venv/bin/python scripts/bad_input_table.py
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

import torch

import longattn as la
from longattn.cli import main
from longattn.models import BigBirdConfig, LongformerConfig, LongformerModel, TransformerXL, XLConfig
from longattn.models.hf_checkpoint import read_weights, save_directory

CLI = [
    "bench --lengths -5", "bench --lengths 0", "bench --head-dim -1", "bench --device nope", "bench --device cuda",
    "bench --hf longformer --lengths -1", "bench --hf longformer --repeats 0", "bench --hf longformer --layers 0",
    "bench --min-run-time -1", "lra run --task listops --attention full --batch-size 0",
    "lra run --task listops --attention full --eval-every 0", "lra run --task listops --attention full --max-len 0",
    "lra run --task listops --attention full --steps -1", "lra generate --task text --data-dir D",
    "lra generate --task listops --data-dir D --set train=1000", "lm train --out R --eval-every 0",
    "lm train --out R --device nope", "lm eval R --recompute 0", "lm eval R --mem-len -1", "lm eval R --seg-len 0",
    "lm generate R --top-k 0", "lm generate R --temperature -1", "vision attention --maps -3",
    "vision latency --repeats 0", "convert --to-long 128 --out SRC SRC", "convert --to-long 128 --out FILE SRC",
    "show sliding_window(4) --seq-len 32 --plot D/pic",
]


def _cli(line: str, tmp: Path) -> tuple[str, str]:
    names = {"D": tmp / "d", "R": tmp / "run", "SRC": tmp / "src", "FILE": tmp / "file"}
    words = [str(names[w.split("/")[0]].joinpath(*w.split("/")[1:])) if w.split("/")[0] in names else w
             for w in line.split()]
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(words)
    text = (err.getvalue() or out.getvalue()).strip().replace(str(tmp), "TMP")
    return f"exit {code}", text


def _poisoned_rows(backend: str, n: int = 1300, real: int = 1200) -> int:
    """Real rows that come out non-finite when the padded keys and values hold NaN (issue 19's case)."""
    q, k, v = (torch.randn(1, 2, n, 16) for _ in range(3))
    kpm = torch.arange(n)[None] < real
    k[:, :, real:], v[:, :, real:] = float("nan"), float("nan")
    out = la.attention(q, k, v, pattern=la.patterns.sliding_window(50), key_padding_mask=kpm, backend=backend)
    return int((~out[:, :, :real].isfinite()).any(-1).any(1).sum())


def _call(fn) -> tuple[str, str]:
    try:
        result = fn()
    except (TypeError, ValueError) as err:
        return type(err).__name__, str(err)
    return "returns", str(result)


def main_table() -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        (tmp / "run").mkdir()
        (tmp / "file").write_text("x")
        LongformerModel(LongformerConfig(vocab_size=20, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=20, attention_window=4)).save_pretrained(tmp / "src")
        rows = [(f"`longattn {line}`", *_cli(line, tmp)) for line in CLI]

        def with_config(**fields):
            folder = tmp / f"cfg-{len(list(tmp.iterdir()))}"
            LongformerModel(LongformerConfig(vocab_size=20, hidden_size=16, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=20,
                                             attention_window=4)).save_pretrained(folder)
            config = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**config, **fields}))
            return lambda: LongformerModel.from_pretrained(folder)

        def index(weight_map):
            folder = tmp / f"sharded-{len(list(tmp.iterdir()))}"
            save_directory(folder, {"model_type": "x"}, {"a": torch.ones(2)})
            (folder / "model.safetensors").rename(folder / "shard-1.safetensors")
            (folder / "model.safetensors.index.json").write_text(json.dumps(weight_map))
            return lambda: read_weights(folder)

        def truncated():
            folder = tmp / "truncated"
            save_directory(folder, {"model_type": "x"}, {"w": torch.randn(64, 64)})
            data = (folder / "model.safetensors").read_bytes()
            (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
            return read_weights(folder)

        def xl_fewer_layers():
            folder = tmp / "xl"
            TransformerXL(XLConfig(dim=16, depth=2, heads=2, seg_len=8, mem_len=8)).save_pretrained(folder)
            config = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**config, "depth": 1}))
            return TransformerXL.from_pretrained(folder)

        q = torch.randn(1, 2, 130, 16)
        meta = q.to("meta")
        calls = {
            'config.json `hidden_size: "32"`': with_config(hidden_size="32"),
            "config.json `num_attention_heads: 0`": with_config(num_attention_heads=0),
            "config.json `attention_window: 16.0`": with_config(attention_window=16.0),
            'config.json `layer_norm_eps: "x"`': with_config(layer_norm_eps="x"),
            "config.json `num_hidden_layers: 1` over 2 layers": with_config(num_hidden_layers=1, attention_window=[4]),
            "`BigBirdConfig(num_hidden_layers=-1)`": lambda: BigBirdConfig(num_hidden_layers=-1),
            "TransformerXL `depth: 1` over 2 layers": xl_fewer_layers,
            "shard index without `weight_map`": index({"metadata": {}}),
            "shard index entry `../other/model.safetensors`": index({"weight_map": {"a": "../other/x.safetensors"}}),
            "truncated `model.safetensors`": truncated,
            "`attention` with head dim 0": lambda: la.attention(q[..., :0], q[..., :0], q[..., :0]),
            "`SparseSelfAttention(32, 0)`": lambda: la.modules.SparseSelfAttention(32, 0),
            "`attention` on meta tensors": lambda: tuple(la.attention(meta, meta, meta).shape),
            "`explain` on meta tensors": lambda: la.explain(meta, meta, meta),
            "`attention(backend='flex')` float64 on CPU": lambda: la.attention(q.double(), q.double(), q.double(),
                                                                               backend="flex"),
            "`attention(scale=inf)`": lambda: la.attention(q, q, q, scale=float("inf")),
            "`sliding_window(10**30)`": lambda: la.patterns.sliding_window(10**30),
            "`bigbird(block=10**6)` on 130 tokens": lambda: tuple(la.attention(
                q, q, q, pattern=la.patterns.bigbird(block=10**6), backend="blocked").shape),
            "`parse_pattern('sliding_window(-(-8))')`": lambda: la.parse_pattern("sliding_window(-(-8))"),
            "`parse_pattern` of a 3,000-term union": lambda: la.parse_pattern(" | ".join(["sliding_window(1)"] * 3000)),
        }
        rows += [(name, *_call(fn)) for name, fn in calls.items()]
        rows += [(f"NaN in padded keys/values, `sliding_window(50)`, 1,200 real rows, `{backend}`", "returns",
                  f"{_poisoned_rows(backend)} real rows non-finite") for backend in ("dense", "blocked", "flex")]
        mask = torch.zeros(1, 2, 130, 130)
        mask[..., 5, 7] = float("nan")
        rows.append(("NaN in a float `attn_mask`", *_call(lambda: la.attention(q, q, q, attn_mask=mask))))
    print("| input | now | message |\n|---|---|---|")
    for name, status, message in rows:
        message = " ".join(message.replace(str(tmp), "TMP").split()).replace("|", "\\|")
        print(f"| {name} | {status} | {message[:160] + ('...' if len(message) > 160 else '')} |")


if __name__ == "__main__":
    os.environ.setdefault("LONGATTN_NATIVE", "0")  # nothing here needs the fused step built
    main_table()
