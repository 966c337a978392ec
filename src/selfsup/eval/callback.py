"""Evaluation during and after training, as a :class:`~selfsup.engine.trainer.Callback` (the engine imports no
evaluation code): the check of the ``eval`` options before training, the cluster-assignment scores of a method
that assigns clusters (SeLa's pseudo-labels vs the true classes), the kNN monitor every
``eval.monitor_every_epochs`` epochs, and the protocols at the end, trained beside random init, into ``eval.json``.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from selfsup.config import Config
from selfsup.engine.checkpoint import atomic_write
from selfsup.engine.trainer import Callback, Trainer
from selfsup.eval.clustering import clustering_scores
from selfsup.eval.features import check_pool_grid
from selfsup.eval.protocols import check_protocols, evaluate_backbone, format_scores

ASSIGNMENT_SCORE_SAMPLES = 50_000  # aNMI takes minutes at 1.28M images: score a fixed random subset this large
SCORE_NAMES = {"nmi": "nmi", "nmi_geometric": "nmi_geometric", "ami": "ami", "ari": "ari", "acc": "label_acc"}


def assignment_scores(assignments: np.ndarray, targets: np.ndarray, *, limit: int | None = ASSIGNMENT_SCORE_SAMPLES,
                      seed: int = 0) -> dict[str, float]:
    """NMI / geometric NMI / aNMI / ARI / Hungarian accuracy (%) of cluster ``assignments`` against ``targets``, on
    the labelled images (target ≥ 0), at most ``limit`` of them (a fixed random subset)."""
    chosen = np.flatnonzero(np.asarray(targets) >= 0)
    if limit and len(chosen) > limit:
        chosen = np.sort(np.random.default_rng(seed).choice(chosen, limit, replace=False))
    scores = clustering_scores(np.asarray(assignments)[chosen], np.asarray(targets)[chosen])
    return {name: float(scores[key]) for name, key in SCORE_NAMES.items()}


class Evaluation(Callback):
    """What ``selfsup train`` evaluates, from the ``eval`` section of ``cfg``."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.assignment_scores: dict[str, float] = {}  # of the last embedding (SeLa: head 0 after its last update)

    def on_init(self, trainer: Trainer) -> None:
        check_pool_grid(trainer.method.backbone, self.cfg.eval.pool_grid)  # now, not after a day of training
        check_protocols(self.cfg.eval.protocols)

    def on_embedding(self, trainer: Trainer, embedding: Any) -> None:
        assignments = trainer.method.cluster_assignments()
        if assignments is None or trainer.targets is None or not trainer.is_main:
            return
        self.assignment_scores = assignment_scores(assignments.cpu().numpy(), trainer.targets.cpu().numpy(),
                                                   seed=self.cfg.train.seed)
        trainer.log({"step": trainer.step, **{f"label_{k}": v for k, v in self.assignment_scores.items()}})
        shown = " ".join(f"{k}={v:.2f}" for k, v in self.assignment_scores.items())
        trainer.say(f"cluster assignments vs labels: {shown}")

    def on_epoch_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        every = self.cfg.eval.monitor_every_epochs
        if every and trainer.epoch % every == 0 and trainer.is_main:
            summary.update(self.evaluate(trainer, ["knn"], random_init=False, quiet=True)["trained"])

    def on_train_end(self, trainer: Trainer) -> dict[str, Any]:
        e = self.cfg.eval
        if not (e.at_end and e.protocols and trainer.is_main):
            return {}
        results = self.evaluate(trainer, e.protocols, random_init=e.compare_random_init)
        if trainer.signalled:
            return {}  # stopped part-way: no eval.json that would look complete
        atomic_write(trainer.run_dir / "eval.json", lambda handle: handle.write(json.dumps(results, indent=2).encode()))
        trainer.say(format_scores(results))
        trainer.say(f"run folder: {trainer.run_dir}")
        if trainer.tracker is not None:
            trainer.tracker.log_scores(results, trainer.step)
            if self.cfg.log.figures:
                self.log_curves(trainer)
        return results

    @staticmethod
    def log_curves(trainer: Trainer) -> None:
        """The report's training curves (loss, lr, monitors) as images in the tracking back ends."""
        from selfsup.eval.report import curve_figures, read_metrics, split_records

        steps, epochs = split_records(read_metrics(trainer.run_dir))
        for title, png in curve_figures(steps, epochs):
            trainer.tracker.log_image(f"curves/{title}", png, trainer.step)

    def evaluate(self, trainer: Trainer, protocols: list[str], *, random_init: bool,
                 quiet: bool = False) -> dict[str, dict]:
        """Scores of the trained backbone (and of the same backbone at its initial weights, unless a signal came)."""
        progress = not quiet and self.cfg.train.progress_bar
        results = {"trained": evaluate_backbone(trainer.method.backbone, self.cfg, trainer.device, protocols,
                                                progress=progress)}
        if random_init and not trainer.signalled:
            results["random_init"] = evaluate_backbone(trainer.initial_backbone_copy(), self.cfg, trainer.device,
                                                       protocols, progress=progress, note_skipped=False)
        return results
