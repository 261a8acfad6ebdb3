"""Several backbones trained on one generated image set under one budget: the accuracy/speed table and plot."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..io import markdown_table, write_json, write_text
from ..models import default_config
from ..training.run import finished_result
from ..tools.viz import pyplot, save_figure
from .data import pathfinder_images
from ..training.setup import RESULT
from .train import VisionRunConfig, train_vision


def compare(models: list[str], cfg: VisionRunConfig, *, data_dir: Path | str, out: Path | str,
            progress: bool = True, resume: bool = True, device: str = "cpu", strategy: str = "ddp",
            log=print) -> list[dict]:
    """Train each of ``models`` with ``cfg`` (only the model differs) into ``out/<model>``, then write
    ``out/report.md``, ``out/report.json`` and ``out/accuracy.png``. Finished runs of the same config are
    reused."""
    for name in models:  # an unknown name stops the comparison before images are generated
        default_config(name)
    out = Path(out)
    data = None
    results = []
    for name in models:
        run_cfg = dataclasses.replace(cfg, model=name)
        done = finished_result(out / name / RESULT, run_cfg.to_dict())
        if done is None:
            if data is None:
                data = pathfinder_images(data_dir, resolution=cfg.resolution, preset=cfg.preset,
                                         examples=cfg.examples, difficulty=cfg.difficulty, seed=cfg.seed, log=log)
            done = train_vision(run_cfg, data_dir=data_dir, out_dir=out / name, data=data, progress=progress,
                                resume=resume, device=device, strategy=strategy)
        results.append(done)
        log(f"{name}: test accuracy {done['test_acc']:.3f}, {done['images_per_second']:.1f} images/s")
    write_json(out / "report.json", results)
    write_text(out / "report.md", table(results) + "\n")
    _plot(results, out / "accuracy.png")
    return results


def table(results: list[dict]) -> str:
    c = results[0]["config"]
    preset = c["preset"] if c["preset"] == "simple" else f"{c['preset']}, {c.get('difficulty', 'hard')}"
    lines = [f"Pathfinder ({preset}, {c['resolution']}x{c['resolution']}, {c['examples']} images), width "
             f"{c['width']}, {c['steps']} steps of {c['batch_size']}, {'bf16' if c['bf16'] else 'fp32'}"
             f"{', channels-last' if c['channels_last'] else ''}; majority class {results[0]['test_majority']:.3f}",
             ""]
    rows = [[r["model"], f"{r['params'] / 1e6:.2f}M", r["val_acc"], r["test_acc"], r["images_per_second"],
             r["train_seconds"]] for r in results]
    lines.append(markdown_table(["model", "params", "val acc", "test acc", "train images/s", "train s"], rows,
                                formats=["", "", ".3f", ".3f", ".1f", ".0f"]))
    return "\n".join(lines)


def _plot(results: list[dict], path: Path) -> None:
    try:
        plt = pyplot()
    except ImportError:  # matplotlib is the optional `viz` extra
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        ax.plot([h["step"] for h in r["history"]], [h["val_acc"] for h in r["history"]], marker="o", label=r["model"])
    ax.axhline(results[0]["test_majority"], ls=":", lw=0.8, color="grey")
    ax.set(xlabel="training step", ylabel="validation accuracy", title="same budget, generated Pathfinder images")
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=120)
