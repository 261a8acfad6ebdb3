"""Per-task configs: LRA's published base settings, small per-attention overrides, a CPU ``--scale``.

As in LRA's own repository there is one base config per task (model shape, optimiser, schedule) and each
attention variant changes at most a few settings. Values are those of the official configs
(``lra_benchmarks/<task>/configs/base_*_config.py`` and their ``transformer_base.py``); the Text and
Retrieval lengths are the paper's 4K. ``QUICK`` holds the reduced settings of ``longattn lra suite --quick``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from ..models.renames import renamed_fields


@dataclass(frozen=True)
class ModelShape:
    dim: int  # model width (LRA: emb_dim)
    depth: int  # Transformer blocks (LRA: num_layers)
    heads: int  # attention heads (LRA: num_heads)
    ffn_dim: int  # feed-forward width, also of the classifier head (LRA: mlp_dim)
    qkv_dim: int | None = None  # None = dim
    dropout: float = 0.1
    attn_dropout: float = 0.1
    learned_positions: bool = True


@dataclass(frozen=True)
class Training:
    steps: int
    batch_size: int  # global batch, split over processes
    lr: float
    weight_decay: float
    warmup: int
    schedule: str  # "rsqrt": LRA's constant*linear_warmup*rsqrt_decay; "cosine": linear_warmup*cosine_decay
    eval_every: int
    eval_examples: int | None = None  # None: the whole validation split
    grad_clip: float | None = None
    betas: tuple[float, float] = (0.9, 0.98)  # LRA's Adam (decoupled weight decay)
    eps: float = 1e-9


@dataclass(frozen=True)
class LRAConfig:
    task: str  # a name of ``longattn.lra.tasks``
    model: ModelShape
    train: Training
    max_len: int | None = None  # input length; None = the task's own
    attention_settings: dict[str, dict] = field(default_factory=dict)  # variant -> pattern keyword overrides
    model_overrides: dict[str, dict] = field(default_factory=dict)  # variant -> ModelShape overrides
    train_fraction: float = 1.0  # use only this share of the training split (``--scale``)
    generate: dict | None = None  # generator settings when the suite generates the data
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LRAConfig":
        train = dict(d["train"])
        train["betas"] = tuple(train.get("betas", (0.9, 0.98)))
        model = renamed_fields("ModelShape", d["model"])  # runs saved before the width names were unified
        return cls(**{**d, "model": ModelShape(**model), "train": Training(**train)})


_TEXT_RSQRT = dict(lr=0.05, weight_decay=0.1, schedule="rsqrt")

BASE: dict[str, LRAConfig] = {
    "listops": LRAConfig(
        "listops", ModelShape(dim=512, depth=6, heads=8, ffn_dim=2048),
        Training(steps=5000, batch_size=32, warmup=1000, eval_every=500, **_TEXT_RSQRT), max_len=2000),
    "text": LRAConfig(
        "text", ModelShape(dim=256, depth=4, heads=4, ffn_dim=1024),
        Training(steps=20000, batch_size=32, warmup=8000, eval_every=1000, **_TEXT_RSQRT), max_len=4000),
    "retrieval": LRAConfig(
        "retrieval", ModelShape(dim=128, depth=4, heads=4, ffn_dim=512),
        Training(steps=5000, batch_size=32, warmup=8000, eval_every=500, **_TEXT_RSQRT), max_len=4000),
    # CIFAR-10: 45,000 training images, 200 epochs of batch 256, one warm-up epoch. One head in LRA; the
    # Sparse Transformer factorizations alternate over heads, so they get two.
    "image": LRAConfig(
        "image", ModelShape(dim=32, depth=1, heads=1, ffn_dim=64, dropout=0.3, attn_dropout=0.2),
        Training(steps=175 * 200, batch_size=256, lr=5e-4, weight_decay=0.0, warmup=175, schedule="cosine",
                 eval_every=175), model_overrides={"strided": {"heads": 2}, "fixed": {"heads": 2}}),
    # Pathfinder: 160,000 training images, 200 epochs of batch 512; transformer_base: 1 layer, 4 heads,
    # width 128, q/k/v width 64, MLP 128, fixed sinusoidal positions, mean pooling.
    **{name: LRAConfig(
        name, ModelShape(dim=128, depth=1, heads=4, ffn_dim=128, qkv_dim=64, dropout=0.2, learned_positions=False),
        Training(steps=312 * 200, batch_size=512, lr=1e-3, weight_decay=0.0, warmup=312, schedule="cosine",
                 eval_every=312)) for name in ("pathfinder16", "pathfinder32", "pathfinder64", "pathfinder128")},
}

# The quick suite (`make demo`): generated ListOps and Pathfinder at a reduced scale, small models, about
# half a minute of 2-core CPU training per (task, attention). Windows shrink with the input so that every
# sparse variant really is sparse at these lengths, yet still spans what the task needs to relate: on 16x16
# Pathfinder (raster order, 16 tokens per row) a window of 96 reaches 3 rows each side, BigBird's 16-token
# blocks are image rows, strided(16) pairs a row (head A) with a column (head B). MoBA and NSA choose rows of
# 16 tokens (ListOps: 3 blocks, 48 keys; Pathfinder: 6 rows, as many keys as the window); NSA's summaries
# cover 2 rows on Pathfinder.
QUICK: dict[str, LRAConfig] = {
    "listops": LRAConfig(
        "listops", ModelShape(dim=64, depth=2, heads=4, ffn_dim=128, dropout=0.0, attn_dropout=0.0),
        Training(steps=200, batch_size=32, lr=2e-3, weight_decay=0.01, warmup=20, schedule="cosine",
                 eval_every=100, eps=1e-8),
        max_len=256, attention_settings={
            "local": {"window": 32}, "longformer": {"window": 32},
            "bigbird": {"block": 16, "window_blocks": 3, "global_blocks": 1, "random_blocks": 2},
            "fixed": {"c": 4}, "moba": {"block": 16, "top_k": 3},
            "nsa": {"cmp_length": 8, "cmp_stride": 4, "select_block": 16, "select_top": 3, "window": 32}},
        generate={"min_length": 60, "max_length": 250, "num_train": 6000, "num_val": 500, "num_test": 500}),
    # Two heads of 16 and a high learning rate: with four heads of 8, full attention and BigBird sat on
    # the 0.693 plateau for the whole run (attention over 256 pixels stays near uniform for longer).
    "pathfinder16": LRAConfig(
        "pathfinder16", ModelShape(dim=32, depth=2, heads=2, ffn_dim=64, dropout=0.0, attn_dropout=0.0,
                                   learned_positions=False),
        Training(steps=500, batch_size=32, lr=5e-3, weight_decay=0.01, warmup=50, schedule="cosine",
                 eval_every=250, eps=1e-8),
        attention_settings={
            "local": {"window": 96}, "longformer": {"window": 96},
            "bigbird": {"block": 16, "window_blocks": 3, "global_blocks": 1, "random_blocks": 2},
            "fixed": {"c": 4}, "moba": {"block": 16, "top_k": 6},
            "nsa": {"cmp_length": 32, "cmp_stride": 16, "select_block": 16, "select_top": 4, "window": 64}},
        generate={"preset": "simple", "examples": 5000}),
}


def get_config(task: str, *, quick: bool = False) -> LRAConfig:
    """The base config of ``task`` (or its quick-suite config)."""
    table = QUICK if quick else BASE
    if task not in table:
        raise ValueError(f"no {'quick ' if quick else ''}config for task {task!r}; known: {', '.join(table)}")
    return table[task]


def _round_to(x: float, multiple: int) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


def scaled(cfg: LRAConfig, scale: float) -> LRAConfig:
    """Shrink a config for CPU runs: widths, depth, steps, warm-up and the training split times ``scale``.

    Widths stay multiples of the head count times 8; depth, steps and examples stay at least 1.
    """
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    if scale == 1:
        return cfg
    m, t = cfg.model, cfg.train
    unit = 8 * m.heads
    model = replace(m, dim=_round_to(m.dim * scale, unit), ffn_dim=_round_to(m.ffn_dim * scale, 8),
                    qkv_dim=None if m.qkv_dim is None else _round_to(m.qkv_dim * scale, unit),
                    depth=max(1, round(m.depth * scale)))
    train = replace(t, steps=max(1, round(t.steps * scale)), warmup=round(t.warmup * scale),
                    eval_every=max(1, round(t.eval_every * scale)))
    return replace(cfg, model=model, train=train, train_fraction=cfg.train_fraction * scale)
