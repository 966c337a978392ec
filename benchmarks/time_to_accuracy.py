"""Time to accuracy: train a recipe to a wall-clock budget and print k-NN / 1-NN accuracy against training time.

    python benchmarks/time_to_accuracy.py quickstart data.name=fashion-mnist data.image_size=28 --budget 6m

Prints one JSON line per point: first the baselines (raw pixels, the backbone at random initialisation), then
the trained backbone at ``--points`` evenly spaced moments of the budget. Evaluation time is excluded from the
budget. Protocol (issue 6): memory = the first ``--memory`` training images (0: the whole training split),
queries = the whole held-out split; weighted 20-NN (cosine, T 0.07), the 20-NN majority vote and 1-NN, on the
backbone's features as the recipe's evaluation reads them (``eval.pool_grid``: its last map pooled on that grid).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from selfsup.cli import find_recipe
from selfsup.config import load_config
from selfsup.data.datasets import build_dataset
from selfsup.data.loader import EvalDataset
from selfsup.data.transforms import transform_from_config
from selfsup.engine.trainer import Trainer, device_name, resolve_device
from selfsup.eval.features import extract_features, pooled_on_grid
from selfsup.eval.knn import knn_sweep


def split_sets(cfg, memory: int):
    train = build_dataset(cfg.data, cfg.data.train_split)
    queries = build_dataset(cfg.data, cfg.data.val_split)
    if memory:
        train = Subset(train, range(min(memory, len(train))))
    return train, queries


def labels_of(dataset) -> torch.Tensor:
    return torch.as_tensor([dataset[i][1] for i in range(len(dataset))])


def raw_pixels(dataset) -> torch.Tensor:
    """Native-size pixels in [0, 1], flattened and L2-normalised (grey images: the RGB copies keep cosines)."""
    rows = [np.asarray(dataset[i][0], dtype=np.float32).reshape(-1) / 255.0 for i in range(len(dataset))]
    return torch.nn.functional.normalize(torch.from_numpy(np.stack(rows)), dim=1)


def scores(memory_x, memory_y, query_x, query_y, num_classes: int, seed: int) -> dict[str, float]:
    out = knn_sweep(memory_x, memory_y, query_x, query_y, ks=(1, 20), temperatures=(0.07, None),
                    num_classes=num_classes, seed=seed)
    return {k: round(v, 2) for k, v in out.items()}


def main(argv: list[str] | None = None) -> list[dict]:
    """Print (and return) the header and one record per point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--budget", default="6m", help="training time budget, e.g. 6m, 30m")
    parser.add_argument("--points", type=int, default=4, help="evaluations spread over the budget")
    parser.add_argument("--memory", type=int, default=10_000, help="first N training images as memory (0: all)")
    args = parser.parse_args(argv)

    cfg = load_config(find_recipe(args.recipe), [*args.overrides, f"train.time_budget={args.budget}",
                                                 "eval.at_end=false", "train.progress_bar=false"])
    memory_set, query_set = split_sets(cfg, args.memory)
    num_classes = build_dataset(cfg.data, cfg.data.val_split).num_classes
    memory_y, query_y = labels_of(memory_set), labels_of(query_set)
    transform = transform_from_config(cfg.data, "eval")

    def loader(dataset) -> DataLoader:
        return DataLoader(EvalDataset(dataset, transform), batch_size=cfg.eval.batch_size,
                          num_workers=cfg.data.num_workers)

    def evaluate(backbone, device) -> dict[str, float]:
        with pooled_on_grid(backbone, cfg.eval.pool_grid):
            memory_x, _ = extract_features(backbone, loader(memory_set), device)
            query_x, _ = extract_features(backbone, loader(query_set), device)
        return scores(memory_x, memory_y, query_x, query_y, num_classes, cfg.train.seed)

    header = {"recipe": args.recipe, "overrides": args.overrides, "budget": args.budget, "memory": len(memory_set),
              "queries": len(query_set), "pool_grid": cfg.eval.pool_grid or cfg.model.pool_grid,
              "device": device_name(resolve_device(cfg.train.device)), "threads": torch.get_num_threads()}
    records: list[dict] = []

    def emit(record: dict) -> None:
        records.append(record)
        print(json.dumps(record), flush=True)

    emit(header)
    emit({"point": "raw_pixels", **scores(raw_pixels(memory_set), memory_y, raw_pixels(query_set), query_y,
                                          num_classes, cfg.train.seed)})

    trainer = Trainer(cfg)
    emit({"point": "random_init", **evaluate(trainer.method.backbone, trainer.device)})
    marks = [trainer.budget_seconds * (i + 1) / args.points for i in range(args.points - 1)]

    def checkpoint(t: Trainer) -> None:
        if marks and t.budget.elapsed() >= marks[0]:
            marks.pop(0)
            with t.budget.paused():
                emit({"point": "trained", "train_seconds": round(t.budget.elapsed(), 1), "step": t.step,
                      "epoch": round(t.step / t.steps_per_epoch, 2), **evaluate(t.method.backbone, t.device)})
                t.method.train()

    trainer.step_callbacks.append(checkpoint)
    started = time.monotonic()
    trainer.fit()
    emit({"point": "trained", "train_seconds": round(trainer.budget.elapsed(), 1), "step": trainer.step,
          "epoch": round(trainer.step / trainer.steps_per_epoch, 2),
          **evaluate(trainer.method.backbone, trainer.device), "wall_seconds": round(time.monotonic() - started, 1)})
    return records


if __name__ == "__main__":
    main()
