"""Tools that measure and draw: ``longattn bench`` (``bench.py``, ``bench_hf.py`` against transformers'
encoders), timing and peak memory of one call (``measure.py``), pictures of patterns and benchmarks
(``viz.py``). They sit above the backends and models they measure; applications use ``measure`` and ``viz``."""
