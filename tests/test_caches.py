"""One owner for every cache: the registry in ``longattn.caches``, emptied by ``clear_caches``; caches that
stay correct when several threads call ``attention`` with different patterns at once."""

from __future__ import annotations

import threading

import pytest
import torch

import longattn as la
from longattn import caches
from longattn.backends import flex


def test_lru_cache_bounds_entries_and_bytes():
    cache = caches.LRUCache("test", 3, max_bytes=10, size_of=len)
    for key in "abc":
        cache.get_or_build(key, lambda key=key: key * 4)  # 4 bytes each
    assert list(cache._data) == ["b", "c"]  # "a" evicted: 12 bytes > 10
    assert cache.get_or_build("b", lambda: "new") == "bbbb"  # hit, and now the newest
    cache.get_or_build("big", lambda: "x" * 50)  # larger than the budget: kept alone
    assert list(cache._data) == ["big"]
    calls = []
    cache.get_or_build(None, lambda: calls.append(1))
    cache.get_or_build(None, lambda: calls.append(1))
    assert len(calls) == 2  # None keys are never cached


def test_a_cache_name_has_one_owner():
    with pytest.raises(ValueError, match="one owner"):
        caches.named_cache("block_plans", 4)


def _fill_every_cache():
    """One call per backend path, so that every registered cache holds an entry."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 130, 16, generator=g) for _ in range(3))
    la.attention(q, k, v, pattern=la.sliding_window(8), backend="dense")  # dense mask
    la.attention(q, k, v, pattern=la.sliding_window(8), backend="blocked")  # block plan + schedule
    la.attention(q, k, v, pattern=la.strided(16), backend="blocked")  # factored plan (Sparse Transformer)
    mhsa = la.BottleneckAttention2d(16, heads=2, feat_size=6, radius=1)  # its local pattern and token order
    mhsa(torch.randn(1, 16, 6, 6, generator=g))
    if flex.available():
        try:
            la.attention(q, k, v, pattern=la.sliding_window(8), backend="flex")  # FlexAttention block mask
        except Exception as err:  # pragma: no cover - a PyTorch without a working CPU compiler
            pytest.skip(f"FlexAttention cannot compile here: {err}")


def test_clear_caches_empties_every_registered_cache():
    la.clear_caches()
    _fill_every_cache()
    sizes = caches.cache_sizes()
    # Every cache the package creates is registered (a new one must join the registry to be cleared).
    assert {"block_plans", "blocked_schedules", "factored_plans", "dense_masks", "flex_block_masks"} <= set(sizes)
    assert all(n > 0 for n in sizes.values()), sizes
    la.clear_caches()
    assert all(n == 0 for n in caches.cache_sizes().values()), caches.cache_sizes()


def test_every_module_level_cache_is_registered():
    """No cache outside the registry: every LRUCache object reachable from a longattn module is in it."""
    import importlib
    import pkgutil

    for info in pkgutil.walk_packages(la.__path__, "longattn."):
        if any(part in info.name for part in (".cli", "integrations.timm")):
            continue
        try:
            module = importlib.import_module(info.name)
        except ImportError:  # optional extras (transformers, matplotlib) absent
            continue
        for name, value in vars(module).items():
            if isinstance(value, caches.LRUCache):
                assert caches._REGISTRY.get(value.name) is value, f"{info.name}.{name} is not registered"


PATTERNS = {
    "window": lambda: la.sliding_window(9),
    "bigbird": lambda: la.bigbird(16, seed=3),
    "strided": lambda: la.strided(12),
    "global": lambda: la.longformer(16, global_idx=[0, 5]),
    "causal_fixed": lambda: la.causal(la.fixed(16, 4)),
}


def test_two_threads_with_different_patterns_get_correct_results():
    """Threads share the caches (plans, schedules, masks): every result still equals its dense oracle."""
    la.clear_caches()
    n, h, d = 97, 2, 40
    errors: list[str] = []
    barrier = threading.Barrier(2)

    def worker(names: list[str], seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        barrier.wait()
        for round_ in range(3):
            for name in names:
                pattern = PATTERNS[name]()
                q, k, v = (torch.randn(1, h, n, d, generator=g, dtype=torch.float64) for _ in range(3))
                for backend in ("blocked", "dense"):
                    out = la.attention(q, k, v, pattern=pattern, backend=backend)
                    ref = torch.nn.functional.scaled_dot_product_attention(
                        q, k, v, attn_mask=pattern.dense(n, num_heads=h))
                    if not torch.allclose(out, ref, atol=1e-9):
                        errors.append(f"{name} {backend} round {round_}: max err {(out - ref).abs().max():.2e}")
            if round_ == 1:
                la.clear_caches()  # one thread empties the caches while the other reads them

    threads = [threading.Thread(target=worker, args=(["window", "bigbird", "strided"], 1)),
               threading.Thread(target=worker, args=(["global", "causal_fixed", "window"], 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
