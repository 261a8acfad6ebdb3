"""Bridges to other libraries. Each submodule imports its library when it is imported itself (an optional
extra), so ``import longattn`` never imports them: ``from longattn.integrations import hf`` needs
``pip install 'longattn[hf]'``.
"""

__all__: list[str] = []
