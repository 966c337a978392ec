"""Command line: ``selfsup train | eval | embed | export | import | report | recipes ...``. Thin: parse, load config,
call the library.

A failure is one ``selfsup: error: ...`` line on stderr, never a traceback: exit code 2 for input that does not fit
(a config value, a recipe, a checkpoint, a data file, an image), 1 for a disk that refuses a read or write (full,
read-only, a path through a file), 143 after a pre-emption signal (checkpoint written), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import errno
import json
import sys

import yaml

from selfsup.config import Config, ConfigError, apply_overrides, config_from_dict, load_config
from selfsup.recipe_files import RECIPES, find_recipe
from selfsup.version import __version__

__all__ = ["RECIPES", "find_recipe", "main", "parser"]  # RECIPES and find_recipe: re-exported for scripts

def config_for_train(args: argparse.Namespace) -> Config:
    words = list(args.words)
    recipe = None
    if words and "=" not in words[0]:
        recipe = find_recipe(words.pop(0))
    elif not args.resume:
        recipe = RECIPES / "quickstart.yaml"
    if args.resume:
        from selfsup.engine.checkpoint import load_checkpoint, resolve_checkpoint

        checkpoint = resolve_checkpoint(args.resume)
        raw = load_checkpoint(checkpoint)["config"]
        raw.pop("launcher", None)  # how the run was started is no default for how it continues
        apply_overrides(raw, words)
        run_dir = checkpoint.parent
        raw["train"].update(output_dir=str(run_dir.parent), run_name=run_dir.name)
        return config_from_dict(raw)
    return load_config(recipe, words)


def cmd_train(args: argparse.Namespace) -> int:
    from selfsup.api import train

    cfg = config_for_train(args)
    args.writes_to = f"a file under {cfg.train.output_dir}"  # what a failed write that names no file was writing
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    if cfg.launcher.name != "local":
        from selfsup.launch import submit

        job = submit(cfg, resume=args.resume)
        print(f"submitted job {job.job_id} ({cfg.launcher.name}); logs in {job.paths.folder}", flush=True)
        return 0
    train(cfg, resume=args.resume)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from selfsup.eval.run import evaluate_checkpoint

    protocols = [p.strip() for p in args.protocol.split(",") if p.strip()]
    results = evaluate_checkpoint(args.checkpoint, protocols, args.words, random_init=args.random_init,
                                  device=args.device)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from selfsup.eval.embed import embed_folder

    embeddings, written = embed_folder(args.source, args.folder, args.out, args.words, batch_size=args.batch_size,
                                       workers=args.workers, device=args.device, normalize=not args.raw,
                                       skip_corrupt=args.skip_corrupt)
    rows, dim = embeddings.features.shape
    kind = "raw" if args.raw else "L2-normalised"
    print(f"{rows} images x {dim} features ({kind}) from {args.source}; wrote {', '.join(map(str, written))}")
    if embeddings.skipped:
        print(f"left out {len(embeddings.skipped)} unreadable image(s), e.g. {embeddings.skipped[0]}")
    if not any(path.suffix == ".parquet" for path in written):
        print("no .parquet written: pyarrow is not installed (pip install pyarrow)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from selfsup.export import export_run

    path, info = export_run(args.checkpoint, args.output)
    print(f"wrote {path}: {info.backbone} backbone (feature_dim {info.feature_dim}); rebuild: {info.rebuild_hint()}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from selfsup.imports import import_checkpoint

    path, info, imported = import_checkpoint(args.source, args.output, args.layout, args.encoder)
    print(f"wrote {path}: {info.backbone} backbone from the {imported.layout} layout ({imported.source}; "
          f"{len(imported.state)} tensors taken, {imported.left_out} left out); rebuild: {info.rebuild_hint()}")
    return 0


def cmd_attention(args: argparse.Namespace) -> int:
    from selfsup.eval.attention import export_attention

    paths = export_attention(args.checkpoint, args.out_dir, args.images, split=args.split, overrides=args.words,
                             device=args.device)
    print(f"wrote {len(paths)} attention maps to {args.out_dir}")
    return 0


def cmd_labels(args: argparse.Namespace) -> int:
    from selfsup.eval.clustering import pseudo_label_scores
    from selfsup.export import export_labels

    exported = export_labels(args.checkpoint, args.out, score=pseudo_label_scores)
    print(exported.path)
    if exported.scores:  # the pseudo-labels against the true classes of the training set
        names = list(exported.scores["mean"])
        print(f"{'':8s}" + "".join(f"{name:>15s}" for name in names))
        for row, scores in exported.scores.items():
            print(f"{row:8s}" + "".join(f"{scores[name]:15.2f}" for name in names))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from selfsup.eval.report import ChromiumError, build_report, render_in_chromium

    path = build_report(args.run, args.out, embedding=args.embedding, max_points=args.max_points, device=args.device,
                        overrides=args.words, retrieval_queries=args.retrieval_queries,
                        memory_images=args.memory_images, clusters=args.clusters, duplicate_pairs=args.duplicate_pairs,
                        clusters_per_side=args.clusters_per_side, images_per_cluster=args.images_per_cluster,
                        attention_images=args.attention_images)
    print(f"wrote {path}")
    if args.screenshot:
        try:
            render_in_chromium(path, screenshot=args.screenshot, window=(1280, args.screenshot_height))
        except ChromiumError as error:
            print(f"selfsup: error: no screenshot ({error}); the report itself is complete: {path}", file=sys.stderr)
            return 1
        print(f"wrote {args.screenshot} (headless Chromium)")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    for path in sorted(RECIPES.glob("*.yaml")):
        first = path.read_text().splitlines()[0].lstrip("# ").strip()
        print(f"{path.stem:40s} {first}")
    return 0


def parser() -> argparse.ArgumentParser:
    from selfsup.eval.protocols import LABEL_FREE_PROTOCOLS, LABEL_PROTOCOLS

    p = argparse.ArgumentParser(prog="selfsup", description="Self-supervised visual representation learning.")
    p.add_argument("--version", action="version", version=f"selfsup {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="pre-train a backbone (no argument: the built-in quickstart)")
    t.add_argument("words", nargs="*", metavar="RECIPE|key=value",
                   help="a recipe (YAML path or packaged name) followed by dotted overrides, e.g. train.epochs=10")
    t.add_argument("--resume", metavar="RUN_OR_CHECKPOINT",
                   help="continue a run exactly where it stopped (its saved config, plus overrides)")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("eval", help="evaluate the backbone of a run, a checkpoint or an exported backbone file")
    e.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT")
    e.add_argument("words", nargs="*", metavar="key=value", help="overrides, e.g. data.path=... eval.knn_k=200")
    e.add_argument("--protocol", default="knn,nn",
                   help=f"comma-separated, from {', '.join(LABEL_PROTOCOLS)} (these need class labels: skipped with a "
                        f"note on a data set without) and {', '.join(LABEL_FREE_PROTOCOLS)} (label-free) "
                        "(default knn,nn)")
    e.add_argument("--random-init", action="store_true", help="also score the same backbone at initialisation")
    e.add_argument("--device", default=None, help="cpu | cuda (default: the run's train.device)")
    e.add_argument("--json", action="store_true", help="also print the scores as JSON")
    e.set_defaults(func=cmd_eval)
    em = sub.add_parser("embed", help="features of every image of a folder (recursive) as OUT.npy + OUT.csv of paths "
                        "(+ OUT.parquet with pyarrow)")
    em.add_argument("source", metavar="RUN|BACKBONE_FILE")
    em.add_argument("folder", metavar="FOLDER", help="images, in sub-folders or not")
    em.add_argument("out", metavar="OUT", help="output name: OUT.npy, OUT.csv (and OUT.parquet) are written")
    em.add_argument("words", nargs="*", metavar="key=value",
                    help="overrides, e.g. data.image_size=224 for a backbone file (its eval transform's size)")
    em.add_argument("--batch-size", type=int, metavar="N", default=None,
                    help="images per batch (default eval.batch_size)")
    em.add_argument("--workers", type=int, metavar="N", default=None,
                    help="DataLoader workers (default data.num_workers)")
    em.add_argument("--device", default=None, help="cpu | cuda (default: the run's train.device)")
    em.add_argument("--raw", action="store_true", help="the backbone's features as they are (default: L2-normalised)")
    em.add_argument("--skip-corrupt", action="store_true", help="leave out unreadable images instead of stopping")
    em.set_defaults(func=cmd_embed)
    x = sub.add_parser("export", help="write a run's backbone alone (plain torchvision/timm keys)")
    x.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT")
    x.add_argument("output", metavar="OUT", help="backbone.safetensors or backbone.pt")
    x.set_defaults(func=cmd_export)
    i = sub.add_parser("import", help="convert a seed's published checkpoint into a backbone file")
    i.add_argument("source", metavar="SRC", help="e.g. moco_v2_200ep_pretrain.pth.tar, resnet50-10x3k_pp.pth")
    i.add_argument("output", metavar="OUT", help="backbone.safetensors or backbone.pt")
    i.add_argument("--layout", default="auto", help="auto | moco | umbc | sela | mugs | torchvision (default auto)")
    i.add_argument("--encoder", default=None, help="online | target (default: the one the seed evaluates)")
    i.set_defaults(func=cmd_import)
    a = sub.add_parser("attention", help="PNG maps of a ViT run's last-layer CLS self-attention, one per head")
    a.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT")
    a.add_argument("out_dir", metavar="OUT_DIR")
    a.add_argument("words", nargs="*", metavar="key=value", help="overrides, e.g. data.path=...")
    a.add_argument("--images", type=int, default=8, help="how many images of the split (default 8)")
    a.add_argument("--split", default=None, help="data split (default: data.val_split)")
    a.add_argument("--device", default=None, help="cpu | cuda (default: the run's train.device)")
    a.set_defaults(func=cmd_attention)
    lab = sub.add_parser("labels", help="write a SeLa run's pseudo-labels (index, image, label per head) and "
                         "score them against the true classes (NMI, aNMI, ARI, label accuracy)")
    lab.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT")
    lab.add_argument("out", metavar="OUT", help="a .csv file, or JSON for any other name")
    lab.set_defaults(func=cmd_labels)
    rep = sub.add_parser("report", help="one self-contained HTML page: curves, scores, t-SNE/UMAP, clusters, attention")
    rep.add_argument("run", metavar="RUN_OR_CHECKPOINT")
    rep.add_argument("words", nargs="*", metavar="key=value", help="overrides, e.g. data.path=...")
    rep.add_argument("--out", default=None, help="the HTML file (default RUN/report.html)")
    rep.add_argument("--embedding", default="tsne", choices=["tsne", "umap"],
                     help="2-D embedding of the val features (umap needs umap-learn; default tsne)")
    rep.add_argument("--max-points", type=int, default=1500, help="val images in the embedding (default 1500)")
    rep.add_argument("--device", default=None, help="cpu | cuda (default: the run's train.device)")
    rep.add_argument("--retrieval-queries", type=int, metavar="N", default=6,
                     help="validation images shown with their nearest training images (default 6)")
    rep.add_argument("--memory-images", type=int, metavar="N", default=10_000,
                     help="training images searched for neighbours and near duplicates (seeded subset; default 10000)")
    rep.add_argument("--clusters", type=int, metavar="N", default=None,
                     help="k of the k-means without labels (default 10; with labels: the number of classes)")
    rep.add_argument("--clusters-per-side", type=int, metavar="N", default=3,
                     help="clusters shown at each end of the ranking (default 3)")
    rep.add_argument("--images-per-cluster", type=int, metavar="N", default=10,
                     help="images in each cluster row (default 10)")
    rep.add_argument("--duplicate-pairs", type=int, metavar="N", default=12,
                     help="near-duplicate pairs shown (default 12)")
    rep.add_argument("--attention-images", type=int, metavar="N", default=4,
                     help="ViT runs: images with attention maps (default 4)")
    rep.add_argument("--screenshot", default=None, metavar="PNG", help="also render the page in headless Chromium")
    rep.add_argument("--screenshot-height", type=int, default=3600, help="screenshot height in pixels (default 3600)")
    rep.set_defaults(func=cmd_report)
    r = sub.add_parser("recipes", help="list the packaged recipes")
    r.set_defaults(func=cmd_recipes)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from selfsup.data.datasets import DataFormatError, ImageLoadError
    from selfsup.engine.checkpoint import CheckpointError
    from selfsup.engine.trainer import Preempted
    from selfsup.tracking import TrackerUnavailable

    try:
        return args.func(args)
    except (ConfigError, CheckpointError, FileNotFoundError, ImageLoadError, DataFormatError,
            TrackerUnavailable) as error:
        print(f"selfsup: error: {one_line(error)}", file=sys.stderr)
        return 2
    except OSError as error:  # a full or read-only disk, a permission, a path through a file
        print(f"selfsup: error: {disk_error(error, args)}", file=sys.stderr)
        return 1
    except Preempted:
        return 143  # 128 + SIGTERM: the scheduler sees an interrupted job, the checkpoint is in the run folder
    except KeyboardInterrupt:
        print("selfsup: interrupted; the last checkpoint is kept in the run folder", file=sys.stderr)
        return 130


def one_line(error: BaseException) -> str:
    """The error's message on one line (YAML and torch errors span several)."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


_DISK_HINTS = {
    errno.ENOSPC: "the disk is full: free space there or write elsewhere",
    errno.EDQUOT: "the disk quota is used up: free space there or write elsewhere",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.EACCES: "permission denied: use a folder you may write to",
    errno.EPERM: "not permitted: use a folder you may write to",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EEXIST: "a file of that name is in the way",
    errno.EISDIR: "that is a folder, not a file",
}


def disk_error(error: OSError, args: argparse.Namespace) -> str:
    """``cannot write PATH: reason (hint)``; the path from the error, or what the command was writing."""
    named = [getattr(args, name, None) for name in ("writes_to", "output", "out", "out_dir", "checkpoint", "run")]
    where = error.filename or next((name for name in named if name), "a file")
    hint = _DISK_HINTS.get(error.errno or 0, "")
    if hint and args.command == "train" and error.errno != errno.EISDIR:
        hint += " (train.output_dir sets where runs go)"
    return f"cannot use {where}: {error.strerror or type(error).__name__}" + (f"; {hint}" if hint else "")


if __name__ == "__main__":
    sys.exit(main())
