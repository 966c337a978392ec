"""Checks that need the training data, run by the trainer once the training set is built, before the first step.

The config's own rules (:func:`selfsup.config.check_config`, each field's declared range or choices) say nothing
about the data; what depends on it is checked here, so that a run that cannot finish stops before it starts,
with one :class:`ConfigError` naming the key and the fix:

- one batch must fit the training set (``train.batch_size`` at most its size);
- the end-of-training protocols and the kNN monitor need the validation split ``data.val_split``.

(Labels are not required: the evaluation skips the label-based protocols, with a note, on unlabelled data.)
"""

from __future__ import annotations

from selfsup.config import Config, ConfigError, check_config
from selfsup.data.datasets import ImageDataset, build_dataset


def preflight(cfg: Config, train_set: ImageDataset) -> None:
    """Raise one :class:`ConfigError` if ``cfg`` cannot run to its end on ``train_set`` (its training split)."""
    check_config(cfg)  # a Config built in Python has not been through load_config
    size, batch = len(train_set), cfg.train.batch_size
    where = f"{cfg.data.name}/{cfg.data.train_split}" + (f", data.subset={cfg.data.subset}" if cfg.data.subset else "")
    if batch > size:
        raise ConfigError(f"train.batch_size={batch} is larger than the training set ({size} images of {where}), "
                          f"so an epoch has no full batch; set train.batch_size to at most {size}"
                          + (" or raise data.subset" if cfg.data.subset else ""))

    users = []  # what needs the validation split, as the user configured it
    if cfg.eval.at_end and cfg.eval.protocols:
        users.append(f"eval.protocols={','.join(cfg.eval.protocols)} (run at the end of training)")
    if cfg.eval.monitor_every_epochs:
        users.append(f"eval.monitor_every_epochs={cfg.eval.monitor_every_epochs} (the kNN monitor)")
    if not users:
        return
    try:
        val_set = build_dataset(cfg.data, cfg.data.val_split)
    except (ConfigError, FileNotFoundError) as error:
        raise ConfigError(f"{' and '.join(users)} need the validation split data.val_split={cfg.data.val_split!r}, "
                          f"which cannot be used: {error}. Set data.val_split to a split the data set has, or turn "
                          "the evaluation off (eval.at_end=false, eval.monitor_every_epochs=0)") from None
    if len(val_set) == 0:
        raise ConfigError(f"{' and '.join(users)} need images in the validation split "
                          f"data.val_split={cfg.data.val_split!r}, which has none")
