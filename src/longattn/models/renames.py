"""Config fields that were renamed, so that configs saved under the old names still load.

The package names widths one way outside Hugging Face-compatible configs: ``dim`` (model width), ``ffn_dim``
(feed-forward width), ``heads``, ``depth`` (layers). Longformer and BigBird keep Hugging Face's
``hidden_size``/``intermediate_size``/``num_attention_heads``/``num_hidden_layers``, which their checkpoints
must match; BoTNet keeps ResNet's ``width`` (stem width) and ``layers`` (blocks per stage, a 4-tuple).
Before that rule, ETC said ``hidden``/``intermediate``/``layers``, LRA's encoder ``mlp_dim`` and the
attention modules ``num_heads``.

``RENAMED`` is the one table of those renames. Readers of saved configs (``EtcModel.from_pretrained``,
``LRAConfig.from_dict``) pass them through ``renamed_fields``, which moves an old key to its new name; a
config that carries both names is ambiguous and raises ``ValueError`` naming the rename. Code that builds a
config by keyword gets Python's ``TypeError`` for an old name, and ``create_model`` a ``ValueError`` that
names the new one.
"""

from __future__ import annotations

from pathlib import Path

#: config class name -> {old field name: new field name}
RENAMED: dict[str, dict[str, str]] = {
    "EtcConfig": {"hidden": "dim", "layers": "depth", "intermediate": "ffn_dim"},
    "EncoderConfig": {"mlp_dim": "ffn_dim"},
    "ModelShape": {"mlp_dim": "ffn_dim"},  # longattn.lra.configs: saved in every LRA run's result and checkpoint
}


def renamed_fields(kind: str, config: dict, *, source: str | Path | None = None) -> dict:
    """``config`` (a saved ``kind`` config, e.g. ``"EtcConfig"``) with its old field names replaced by the new.

    Raises ``ValueError`` when a config holds both an old name and its new one. Other keys pass unchanged.
    """
    renames = RENAMED.get(kind, {})
    out = dict(config)
    for old, new in renames.items():
        if old not in out:
            continue
        if new in out:
            where = f"{source}: " if source is not None else ""
            raise ValueError(f"{where}the {kind} config has both {old!r} and {new!r}; {old!r} is the old name of "
                             f"{new!r} (renamed), keep only {new!r}")
        out[new] = out.pop(old)
    return out


def rename_hint(kind: str, name: str) -> str:
    """``" ('hidden' was renamed to 'dim')"`` for an old field name of ``kind``, else ``""``."""
    new = RENAMED.get(kind, {}).get(name)
    return f" ({name!r} was renamed to {new!r})" if new else ""
