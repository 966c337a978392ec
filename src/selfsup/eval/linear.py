"""Linear probes on a frozen backbone (methods.md §1 ``main_lincls``, §4 UMBC protocol, §5 10-crop).

Two modes:

* **fast** — eval-transform features are extracted once and kept in memory; a multinomial logistic
  regression (full-batch L-BFGS, L2 penalty) is fitted on them on the device in seconds. The penalty
  is chosen from a grid on a stratified hold-out of the *training* split, refitted on the whole
  training split, and only then is the val split scored, once. :func:`fit_fast_probe` never receives
  val data.
* **standard** — the papers' protocol: backbone frozen in eval mode (BN statistics fixed), a Linear
  layer trained by SGD on augmented images (RandomResizedCrop + flip) with a step schedule. Recipes
  ``moco`` (fc ~ N(0, 0.01), lr 30, wd 0, 100 epochs, ×0.1 at 60/80) and ``umbc`` (L2-normalise →
  standardise with fixed train mean/var → Linear; lr 0.01, wd 1e-4, 40 epochs, ×0.1 at 15/30).
  The final-epoch classifier is scored (the UMBC scripts report the best val epoch, which selects on
  val; we do not).

UMBC pre-processing (both modes, optional in fast mode): x ← x/‖x‖, then (x − μ)/√(σ² + 1e-5) with μ,
σ² (unbiased, as ``torch.var_mean``) of the L2-normalised training features — never of val.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms as T

from selfsup.config import Config, ConfigError, check_choice
from selfsup.data.datasets import build_dataset
from selfsup.data.loader import EvalDataset
from selfsup.data.transforms import build_transform, transform_from_config
from selfsup.eval.features import _eval_on, extract_features

LINEAR_MODES = ("fast", "standard")
DEFAULT_WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)


@dataclass
class LinearResult:
    top1: float  # percent, on the val split
    top5: float
    info: dict[str, Any] = field(default_factory=dict)  # chosen hyper-parameters, hold-out scores, schedule

    def scores(self) -> dict[str, float]:
        return {"linear_top1": self.top1, "linear_top5": self.top5}


class Standardize(nn.Module):
    """UMBC pre-processing: L2-normalise, then (x − μ)/√(σ² + eps) with fixed (buffer) statistics."""

    def __init__(self, mean: torch.Tensor, var: torch.Tensor, eps: float = 1e-5):
        super().__init__()
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("inv_std", torch.rsqrt(var.detach() + eps))

    @classmethod
    def fit(cls, train_features: torch.Tensor, eps: float = 1e-5) -> Standardize:
        """Statistics of the L2-normalised training features (unbiased variance, as the UMBC code)."""
        var, mean = torch.var_mean(F.normalize(train_features.float(), dim=1), dim=0)
        return cls(mean, var, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.normalize(x, dim=1) - self.mean) * self.inv_std


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[float]:
    """Percent of rows whose label is among the k largest logits, for each k (capped at the class count)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels.to(top.device).view(-1, 1)
    return [100.0 * hits[:, :k].any(dim=1).float().mean().item() for k in ks]


# ------------------------------------------------------------------------------------------------ fast


def stratified_holdout(labels: torch.Tensor, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fit, held)`` indices: ``fraction`` of every class (at least one where it has two or more) held out."""
    if not 0 < fraction < 1:
        raise ConfigError(f"eval.linear_holdout must be in (0, 1), got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    fit, held = [], []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n = min(max(round(fraction * len(idx)), 1), len(idx) - 1)
        held.append(idx[:n])
        fit.append(idx[n:])
    return torch.cat(fit).sort().values, torch.cat(held).sort().values


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, *,
                 max_iter: int = 500, chunk_size: int = 65536) -> nn.Linear:
    """Multinomial logistic regression: min mean CE(Wx + b, y) + wd/2·‖W‖², full-batch L-BFGS from zeros.

    Convex, so the result does not depend on a seed. The loss is summed over row chunks (bounded memory
    on large feature sets); everything stays on ``x``'s device.
    """
    linear = nn.Linear(x.shape[1], num_classes).to(x.device)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")
    n = x.shape[0]

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        total = torch.zeros((), device=x.device)
        for start in range(0, n, chunk_size):
            loss = F.cross_entropy(linear(x[start:start + chunk_size]), y[start:start + chunk_size],
                                   reduction="sum") / n
            loss.backward()
            total += loss.detach()
        penalty = 0.5 * weight_decay * linear.weight.pow(2).sum()
        penalty.backward()
        return total + penalty.detach()

    optimizer.step(closure)
    return linear


@dataclass
class FastProbe:
    classifier: nn.Module  # pre-processing + Linear, maps raw features to logits
    weight_decay: float
    holdout_top1: dict[float, float]  # weight decay -> top-1 on the train hold-out


def fit_fast_probe(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, *, standardize: bool = True,
                   weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS, holdout: float = 0.2, seed: int = 0,
                   max_iter: int = 500) -> FastProbe:
    """Choose the weight decay on a stratified hold-out of the training features, refit on all of them.

    Sees only training data. Ties go to the larger weight decay. Pre-processing statistics come from the
    rows being fitted (the fit part during selection, the whole train split for the final classifier).
    """
    if not weight_decays:
        raise ConfigError("eval.linear_weight_decays must hold at least one value")
    train_x, train_y = train_x.float(), train_y.to(train_x.device)

    def prepare(x: torch.Tensor) -> nn.Module:
        return Standardize.fit(x).to(x.device) if standardize else nn.Identity()

    scores: dict[float, float] = {}
    grid = sorted(weight_decays, reverse=True)
    if len(grid) > 1:
        fit_idx, held_idx = (i.to(train_x.device) for i in stratified_holdout(train_y.cpu(), holdout, seed))
        pre = prepare(train_x[fit_idx])
        x_fit, x_held = pre(train_x[fit_idx]), pre(train_x[held_idx])
        for wd in grid:
            linear = fit_logistic(x_fit, train_y[fit_idx], num_classes, wd, max_iter=max_iter)
            with torch.no_grad():
                scores[wd] = topk_accuracy(linear(x_held), train_y[held_idx], ks=(1,))[0]
    best = max(grid, key=lambda wd: scores.get(wd, 0.0))  # first maximum of the descending grid
    pre = prepare(train_x)
    linear = fit_logistic(pre(train_x), train_y, num_classes, best, max_iter=max_iter)
    return FastProbe(nn.Sequential(pre, linear).eval(), best, scores)


def linear_probe_fast(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                      num_classes: int, *, device: torch.device | str | None = None, **options: Any) -> LinearResult:
    """Fit on the training features (:func:`fit_fast_probe`, ``options`` go there), then score val once."""
    device = torch.device(device) if device is not None else train_x.device
    probe = fit_fast_probe(train_x.to(device), train_y.to(device), num_classes, **options)
    with torch.no_grad():
        logits = probe.classifier(val_x.to(device).float())
    top1, top5 = topk_accuracy(logits, val_y)
    return LinearResult(top1, top5, {"mode": "fast", "weight_decay": probe.weight_decay,
                                     "holdout_top1": probe.holdout_top1})


# -------------------------------------------------------------------------------------------- standard


@dataclass(frozen=True)
class LinearRecipe:
    lr: float
    weight_decay: float
    epochs: int
    milestones: tuple[int, ...]  # lr ×0.1 from each of these epochs on (0-indexed)
    standardize: bool  # UMBC: L2-normalise + standardise with train statistics before the Linear layer
    init_std: float | None  # N(0, std) weights and zero bias; None keeps PyTorch's default Linear init
    momentum: float = 0.9
    batch_size: int = 256
    crop_scale: tuple[float, float] = (0.08, 1.0)  # torchvision's RandomResizedCrop default, as both scripts


RECIPES = {
    "moco": LinearRecipe(lr=30.0, weight_decay=0.0, epochs=100, milestones=(60, 80), standardize=False,
                         init_std=0.01),
    "umbc": LinearRecipe(lr=0.01, weight_decay=1e-4, epochs=40, milestones=(15, 30), standardize=True,
                         init_std=None),
}


class _StackCrops:
    def __init__(self, finish: T.Compose):
        self.finish = finish

    def __call__(self, crops: Sequence) -> torch.Tensor:
        return torch.stack([self.finish(c) for c in crops])


def ten_crop_transform(image_size: int, crop_ratio: float, mean: Sequence[float],
                       std: Sequence[float]) -> T.Compose:
    """Resize(size / ratio) → TenCrop(size) → (10, C, H, W), each crop normalised (SeLa's val protocol)."""
    finish = T.Compose([T.ToTensor(), T.Normalize(mean=list(mean), std=list(std))])
    return T.Compose([T.Resize(round(image_size / crop_ratio)), T.TenCrop(image_size), _StackCrops(finish)])


def _features(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return backbone(images).flatten(1).float()


@dataclass(frozen=True)
class _StandardPlan:
    recipe: LinearRecipe
    lr: float
    epochs: int
    milestones: list[int]  # the recipe's, scaled to ``epochs``
    batch_size: int


def _standard_plan(recipe: str, epochs: int | None, lr: float | None, batch_size: int | None) -> _StandardPlan:
    check_choice("eval.linear_recipe", recipe, RECIPES)
    r = RECIPES[recipe]
    epochs = r.epochs if epochs is None else epochs
    if epochs < 1:
        raise ConfigError(f"eval.linear_epochs must be at least 1, got {epochs}")
    milestones = [round(m * epochs / r.epochs) for m in r.milestones]
    return _StandardPlan(r, r.lr if lr is None else lr, epochs, milestones, batch_size or r.batch_size)


def _standard_head(backbone: nn.Module, plan: _StandardPlan, train_set: Any, eval_tf: Any, num_classes: int,
                   workers: int, device: torch.device) -> nn.Module:
    """The Linear layer on the backbone's feature size (the recipe's init), behind UMBC standardisation (statistics
    of the eval-transform training features) when the recipe asks for it; on ``device``."""
    dim = _features(backbone, eval_tf(train_set[0][0]).unsqueeze(0).to(device)).shape[1]
    linear = nn.Linear(dim, num_classes)
    if plan.recipe.init_std is not None:
        nn.init.normal_(linear.weight, std=plan.recipe.init_std)
        nn.init.zeros_(linear.bias)
    head: nn.Module = linear
    if plan.recipe.standardize:
        stats_loader = DataLoader(EvalDataset(train_set, eval_tf), batch_size=plan.batch_size, num_workers=workers)
        train_x, _ = extract_features(backbone, stats_loader, device, keep_on_device=True)
        head = nn.Sequential(Standardize.fit(train_x), linear)
    return head.to(device)


def _train_head(head: nn.Module, backbone: nn.Module, loader: DataLoader, plan: _StandardPlan, device: torch.device,
                progress: str | None) -> float:
    """SGD on the head through the frozen backbone with the step schedule; returns the last epoch's mean loss.
    ``progress``: a tqdm description, or None for no bar."""
    r = plan.recipe
    optimizer = torch.optim.SGD(head.parameters(), lr=plan.lr, momentum=r.momentum, weight_decay=r.weight_decay)
    epoch_iter: Any = range(plan.epochs)
    if progress:
        from tqdm import tqdm

        epoch_iter = tqdm(epoch_iter, desc=progress, leave=False)
    loss_sum, steps = torch.zeros((), device=device), 0
    for epoch in epoch_iter:
        for group in optimizer.param_groups:
            group["lr"] = plan.lr * 0.1 ** sum(epoch >= m for m in plan.milestones)
        head.train()
        loss_sum, steps = torch.zeros((), device=device), 0  # summed on the device: no sync per step
        for images, labels in loader:
            loss = F.cross_entropy(head(_features(backbone, images.to(device))), labels.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum, steps = loss_sum + loss.detach(), steps + 1
    return loss_sum.item() / max(steps, 1)


def _score_head(head: nn.Module, backbone: nn.Module, loader: DataLoader, ten_crop: bool, num_classes: int,
                device: torch.device) -> list[float]:
    """Top-1 / top-5 (%) of the head on ``loader``; 10-crop batches (B, 10, C, H, W) score the mean of the logits."""
    head.eval()
    logits, labels_all = [], []
    for images, labels in loader:
        crops = images.shape[1] if ten_crop else 1
        with torch.no_grad():
            out = head(_features(backbone, images.to(device).flatten(0, 1) if ten_crop else images.to(device)))
        logits.append(out.view(-1, crops, num_classes).mean(1).cpu())
        labels_all.append(labels)
    return topk_accuracy(torch.cat(logits), torch.cat(labels_all))


def linear_probe_standard(backbone: nn.Module, cfg: Config, device: torch.device | str, *, recipe: str = "moco",
                          epochs: int | None = None, ten_crop: bool = False, batch_size: int | None = None,
                          lr: float | None = None, progress: bool = False) -> LinearResult:
    """Train a linear classifier on augmented images through the frozen backbone (eval mode), score val.

    ``epochs`` overrides the recipe's length (its lr milestones scale along); ``lr`` and ``batch_size`` its
    values. Data, image size and normalisation come from ``cfg.data``; randomness from ``cfg.train.seed``
    (the caller's RNG is left as it was).
    """
    plan = _standard_plan(recipe, epochs, lr, batch_size)
    device = torch.device(device)
    data, workers = cfg.data, cfg.data.num_workers
    train_set, val_set = build_dataset(data, data.train_split), build_dataset(data, data.val_split)
    augment = build_transform("weak", data.image_size, mean=data.mean, std=data.std, scale=plan.recipe.crop_scale,
                              flip=data.flip)  # RandomResizedCrop (+ flip) → tensor
    eval_tf = transform_from_config(data, "eval")
    val_tf = ten_crop_transform(data.image_size, data.eval_crop_ratio, data.mean, data.std) if ten_crop else eval_tf
    with torch.random.fork_rng(devices=[]), _eval_on(backbone, device):
        torch.manual_seed(cfg.train.seed)
        head = _standard_head(backbone, plan, train_set, eval_tf, train_set.num_classes, workers, device)
        loader = DataLoader(EvalDataset(train_set, augment), batch_size=plan.batch_size, shuffle=True,
                            num_workers=workers, generator=torch.Generator().manual_seed(cfg.train.seed))
        final_loss = _train_head(head, backbone, loader, plan, device, f"linear ({recipe})" if progress else None)
        val_loader = DataLoader(EvalDataset(val_set, val_tf), batch_size=plan.batch_size, num_workers=workers)
        top1, top5 = _score_head(head, backbone, val_loader, ten_crop, train_set.num_classes, device)
    return LinearResult(top1, top5, {"mode": "standard", "recipe": recipe, "epochs": plan.epochs, "lr": plan.lr,
                                     "milestones": plan.milestones, "ten_crop": ten_crop,
                                     "final_train_loss": final_loss})
