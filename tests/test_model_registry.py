"""One sweep over the model registry: every named model builds, runs forward and backward on a padded batch
(vision models: an odd-sized image batch), and survives a save/load round trip (safetensors) with identical
outputs."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from longattn.models import (BigBirdConfig, BotNet, BotNetConfig, EtcConfig, LongformerConfig, XLConfig,
                             create_model, default_config, list_models)

# Small sizes of each family (fields differ between configs): the sweep checks wiring, not scale.
TINY = {
    LongformerConfig: dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                           vocab_size=40, attention_window=8),
    BigBirdConfig: dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                        vocab_size=40, block_size=8, num_random_blocks=2),
    EtcConfig: dict(dim=24, depth=2, heads=2, ffn_dim=32, vocab_size=40, local_radius=4,
                    max_relative_distance=3),
    XLConfig: dict(dim=24, depth=2, heads=2, seg_len=16, mem_len=16),
    BotNetConfig: dict(width=8, num_classes=24, image_size=48),
}


def _run(model, ids, mask):
    if isinstance(model, BotNet):  # images (2, 3, 45, 50) made from the ids: (2, 24) logits
        return model(ids[:, :, None, None].float().expand(2, 45, 3, 50).permute(0, 2, 1, 3) / 40)[:, None, :]
    if isinstance(model.cfg if hasattr(model, "cfg") else None, XLConfig):  # a causal LM: no padding mask
        return model(ids).hidden
    if hasattr(model, "cfg"):  # ETC: three segments, padding marked by a negative segment id
        segments = (torch.arange(ids.shape[1]) * 3 // ids.shape[1]).expand_as(ids).masked_fill(mask == 0, -1)
        return model(ids, segments).long_hidden_state
    return model(ids, attention_mask=mask).last_hidden_state


@pytest.mark.parametrize("name", list_models())
def test_registry_sweep(name, tmp_path):
    torch.manual_seed(0)
    model = create_model(name, **TINY[type(default_config(name))])
    ids = torch.randint(3, 40, (2, 45))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    out = _run(model.train(), ids, mask)
    assert out.shape == ((2, 1, 24) if isinstance(model, BotNet) else (2, 45, 24)) and torch.isfinite(out).all()
    out.sum().backward()
    unused = ("pooler", "global", "out_bias")  # heads and global projections this input does not reach
    assert all(p.grad is not None for n, p in model.named_parameters() if not any(u in n for u in unused))
    model.eval().save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(_run(model, ids, mask), _run(loaded, ids, mask))


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown model 'bert'; known: bigbird-roberta-base"):
        create_model("bert")
    with pytest.raises(ValueError, match="LongformerConfig has no field 'hidden'"):
        create_model("longformer-base-4096", hidden=8)
    with pytest.raises(ValueError, match=r"EtcConfig has no field 'intermediate' \('intermediate' was renamed to "
                                         r"'ffn_dim'\)"):
        create_model("etc-base", intermediate=8)


def test_configs_saved_with_old_width_names_load(tmp_path):
    """ETC checkpoints and LRA run configs written before the width names were unified (hidden, layers,
    intermediate; mlp_dim) load under the new names; a config with both names is refused, naming the rename."""
    from longattn.lra.configs import BASE, LRAConfig
    from longattn.models import EtcModel

    torch.manual_seed(0)
    model = create_model("etc-base", **TINY[EtcConfig]).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    old = {({"dim": "hidden", "depth": "layers", "ffn_dim": "intermediate"}).get(k, k): v for k, v in config.items()}
    (tmp_path / "config.json").write_text(json.dumps(old))
    loaded = EtcModel.from_pretrained(tmp_path)
    assert loaded.cfg == model.cfg
    (tmp_path / "config.json").write_text(json.dumps({**old, "dim": 24}))
    with pytest.raises(ValueError, match="has both 'hidden' and 'dim'; 'hidden' is the old name of 'dim'"):
        EtcModel.from_pretrained(tmp_path)

    saved = BASE["listops"].to_dict()
    saved["model"]["mlp_dim"] = saved["model"].pop("ffn_dim")
    assert LRAConfig.from_dict(saved) == BASE["listops"]


def test_saved_checkpoints_honour_the_umask(tmp_path):
    """config.json and model.safetensors come out readable as any file the user writes, not 0600."""
    old = os.umask(0o022)
    try:
        create_model("transformer-xl-small", dim=16, depth=1, heads=2).save_pretrained(tmp_path)
    finally:
        os.umask(old)
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in tmp_path.iterdir()}
    assert modes == {"config.json": 0o644, "model.safetensors": 0o644}
