"""The `ctl` command: one entry point, one subcommand per job.

Subcommands import what they need when they run, so `ctl --help` is instant and the serving parts
never import torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from ctl import defaults

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"CTL_{name}", default)


def cmd_synth(args: argparse.Namespace) -> int:
    from ctl.progress import progress_bar
    from style_model.data.synth import config_from_args, generate

    config = config_from_args(args)
    with progress_bar(config.scenes, "synth scenes", "scene") as bar:
        counts = generate(Path(args.out), config, progress=bar.update)
    print(json.dumps({"out": str(args.out), **counts}))
    return 0


def cmd_examples(args: argparse.Namespace) -> int:
    from style_model.data.examples import build_examples, images_needed
    from style_model.data.stl import load_dataset

    dataset = load_dataset(args.data, args.domain)
    # without an images/ folder this is a plan: what would be built, and which images to fetch
    have_images = dataset.images_dir.is_dir()
    examples, report = build_examples(
        dataset, min_crop=args.min_crop, seed=args.seed, check_images=have_images
    )
    needed = images_needed(dataset, args.min_crop, args.seed)
    print(
        f"dataset {dataset.root} domain {dataset.domain}: {len(dataset.pairs)} pairs, "
        f"{len(dataset.categories)} categorised products, {len(dataset.bad_records)} malformed lines"
    )
    print(f"examples: {len(examples)}  by split: {dict(report.examples_by_split)}")
    print(f"skipped: {dict(report.skipped_by_reason) or 'none'}")
    print(f"{'category':<60} {'examples':>8}")
    for category, n in report.examples_by_category.most_common():
        print(f"{category:<60} {n:>8}")
    crops = [e.crop for e in examples]
    if crops:
        import numpy as np

        share = np.array([(c[2] - c[0]) * (c[3] - c[1]) for c in crops])
        print(
            f"crops: {len(crops)}; share of the scene kept: min {share.min():.2f} "
            f"median {np.median(share):.2f} max {share.max():.2f}"
        )
    print(
        f"images needed: {len(needed)} "
        f"({'present: ' + str(dataset.images_dir) if have_images else 'no images/ folder yet'})"
    )
    if args.report:
        report.write(Path(args.report))
        print(f"report: {args.report}")
    if args.needed:
        Path(args.needed).write_text("".join(s + "\n" for s in needed))
        print(f"list of needed image signatures: {args.needed}")
    return 0


def _train_config(args: argparse.Namespace, environ: Mapping[str, str] | None = None):
    """The TrainConfig of `ctl train`: its flags, then CTL_TRAIN_* variables (`environ`, default
    os.environ), then TrainConfig's defaults (None: the preset's). Read when the command runs; a bad value
    is a ConfigError naming the flag or the variable (exit 2)."""
    from ctl import settings
    from style_model.config import TRAIN_ENV_PREFIX, TrainConfig
    from style_model.errors import ConfigError

    return settings.from_args(TrainConfig, args, environ, TRAIN_ENV_PREFIX, ConfigError)


def cmd_train(args: argparse.Namespace) -> int:
    config = _train_config(args)  # a bad setting: exit 2 before torch is even imported
    from style_model.train import train

    summary = train(config, args.data, args.out, fresh=args.fresh)
    keys = ("status", "stopped", "best_val_fitb", "at_chance", "steps_run", "attempts", "train_seconds")
    print(json.dumps({k: summary.get(k) for k in keys}))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from style_model.evaluate import evaluate, format_table

    result = evaluate(
        args.run,
        args.data,
        split=args.split,
        domain=args.domain,
        seed_variant=args.seed_variant,
        max_examples=args.max_examples,
        baselines=not args.no_baselines,
    )
    print(format_table(result))
    print(f"written: {Path(args.run) / f'eval-{args.split}.json'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from style_model.export import export

    info = export(args.run, args.out)
    print(json.dumps(info))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ctl_app.demo import DemoConfig, run_demo

    return run_demo(
        DemoConfig(
            out=args.out,
            scenes=args.scenes,
            epochs=args.epochs,
            max_examples=args.max_examples,
            seed_variant=args.seed_variant,
            weights=args.weights,
            show_scenes=args.show_scenes,
            keep_running=args.keep_running,
        )
    )


def cmd_recommend(args: argparse.Namespace) -> int:
    import grpc

    from ctl.security import SecurityConfigError, bearer, channel, client_security
    from ctl.terminal import printable
    from ctl.v1 import ranker_pb2_grpc
    from ctl_app.ingest.catalog import CatalogError
    from ctl_app.recommend import catalog_images, format_table, request, section
    from ctl_app.report import write_report

    log = logging.getLogger("ctl_app.recommend")
    try:
        scene = args.scene.read_bytes()
    except OSError as exc:
        log.error("--scene %s: %s", args.scene, exc.strerror or exc)
        return 2
    explain = args.explain or args.html is not None
    try:
        credentials, token = client_security(args)
    except SecurityConfigError as exc:
        log.error("%s", exc)
        return 2
    # a Recommend reply may be as large as the ranker sends (64 MiB), not gRPC's default 4 MiB
    with channel(args.ranker, credentials, options=[("grpc.max_receive_message_length", 64 << 20)]) as chan:
        stub = ranker_pb2_grpc.RankerServiceStub(chan)
        try:
            reply = stub.Recommend(
                request(scene, args.category, args.limit, explain, args.mode),
                timeout=args.timeout,
                metadata=bearer(token),
            )
        except grpc.RpcError as exc:
            log.error("Recommend at %s: %s: %s", args.ranker, exc.code().name, printable(exc.details()))
            return 1
    print(format_table(reply, explain))
    if args.html is not None:
        try:
            images = (
                catalog_images(args.catalog, args.images, allow_outside=args.allow_images_outside)
                if args.catalog
                else (lambda _: None)
            )
        except CatalogError as exc:
            log.error("--catalog %s", exc)
            return 2
        page = write_report(
            args.html,
            f"Complete the look — {args.scene.name}",
            [section(args.scene.name, scene, reply, images)],
            f"ranker {args.ranker}, model {reply.model_version}",
        )
        print(f"\nreport: {printable(page.resolve())}")
    return 0


def cmd_snapshot(args: argparse.Namespace) -> int:
    """Archive an embedded store no ranker holds: 0, or 1 with the reason."""
    from ctl_app.snapshot import snapshot
    from ctl_app.snapshot_settings import SnapshotError

    try:
        manifest = snapshot(args.store, args.out)
    except SnapshotError as exc:
        logging.getLogger("ctl_app.snapshot").error("%s", exc)
        return 1
    print(f"{args.out}: {manifest['products']} products of model {manifest['model_version']}")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    """Unpack a snapshot into a new store folder, checked before it is moved into place: 0, 1 refused (one
    line: why), 2 a bad setting."""
    from ctl_app.snapshot import restore
    from ctl_app.snapshot_settings import RestoreConfigError, SnapshotError, restore_limits

    log = logging.getLogger("ctl_app.restore")
    target = restore_target(args)
    if not target.strip():
        log.error("%s is empty: give the folder to create", defaults.STORE_PATH_ENV)
        return 2
    try:
        limits = restore_limits(args)
    except RestoreConfigError as exc:
        log.error("%s", exc)
        return 2
    try:
        folder, manifest = restore(args.archive, target, limits)
    except SnapshotError as exc:
        log.error("%s", exc)
        return 1
    print(f"{folder}: {manifest['products']} products of model {manifest['model_version']} restored")
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """grpc.health.v1 Check: 0 when SERVING (container health checks, scripts), 1 otherwise."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from ctl.security import SecurityConfigError, bearer, channel, client_security
    from ctl.terminal import printable

    try:
        credentials, token = client_security(args)
    except SecurityConfigError as exc:
        print(f"{args.address}: {exc}")
        return 2
    with channel(args.address, credentials) as chan:
        try:
            reply = health_pb2_grpc.HealthStub(chan).Check(
                health_pb2.HealthCheckRequest(service=args.service),
                timeout=args.timeout,
                metadata=bearer(token),
            )
        except grpc.RpcError as exc:
            print(f"{args.address}: {exc.code().name}: {printable(exc.details())}")
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.address}{' ' + args.service if args.service else ''}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _add_data_args(p: argparse.ArgumentParser, *, domain: bool = True) -> None:
    p.add_argument(
        "--data",
        type=Path,
        default=_env("DATA"),
        required=_env("DATA") is None,
        help="dataset folder in STL layout (env CTL_DATA)",
    )
    if domain:
        p.add_argument("--domain", default=None, help="domain, when the folder has several (fashion, home)")


def restore_target(args: argparse.Namespace) -> str:
    """Where `ctl restore` unpacks: the folder given, else where `ctl serve-ranker` would open its store
    (CTL_RANKER_STORE_PATH, else its default). Read when the command runs: only this variable, so that
    another malformed CTL_RANKER_* setting does not stop a restore."""
    if args.store_path is not None:
        return args.store_path
    return os.environ.get(defaults.STORE_PATH_ENV, defaults.STORE_PATH)


def build_parser() -> argparse.ArgumentParser:
    from ctl import settings
    from style_model.config import TRAIN_ENV_PREFIX, TrainConfig

    parser = argparse.ArgumentParser(prog="ctl", description=__doc__.split("\n")[0])
    parser.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"), help="env CTL_LOG_LEVEL")
    from ctl.security import add_client_arguments

    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a synthetic outfit dataset in STL layout")
    p.add_argument("--out", type=Path, required=True)
    from style_model.data.synth import add_arguments as add_synth_arguments

    add_synth_arguments(p)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("examples", help="build Complete-The-Look examples and print what they need")
    _add_data_args(p)
    p.add_argument("--min-crop", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", type=Path, help="write the build report (skips and reasons) as JSON")
    p.add_argument("--needed", type=Path, help="write the signatures of the images the examples need")
    p.set_defaults(func=cmd_examples)

    p = sub.add_parser(
        "train",
        help="train the style embedding (resumable)",
        description="Trains (or resumes) a run. Every setting is a flag and a CTL_TRAIN_* variable; a flag "
        "wins over the variable, which wins over the default. The settings left unset take the preset's "
        "values.",
    )
    _add_data_args(p, domain=False)  # --domain is TrainConfig's
    p.add_argument("--out", type=Path, required=True, help="run folder")
    p.add_argument("--fresh", action="store_true", help="start over instead of resuming RUN")
    settings.add_arguments(p, TrainConfig, TRAIN_ENV_PREFIX)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="FITB and HR@K of a run against the baselines")
    _add_data_args(p)
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument(
        "--seed-variant",
        action="store_true",
        help="also train (if missing) and score the seed tutorial's attention variant",
    )
    p.add_argument(
        "--no-baselines",
        action="store_true",
        help="skip the baselines that need training (colour histograms, seed variant): the quick check",
    )
    p.add_argument("--max-examples", type=int)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "demo",
        help="the whole system on generated data: train, export, serve, ingest, recommend, report",
    )
    p.add_argument("--out", type=Path, default=Path(_env("DEMO_DIR", "runs/demo")), help="env CTL_DEMO_DIR")
    p.add_argument("--scenes", type=int, default=6000)
    p.add_argument("--epochs", type=int, help="default: the preset's")
    p.add_argument("--max-examples", type=int)
    p.add_argument("--seed-variant", action="store_true", help="also train and score the seed variant")
    p.add_argument(
        "--weights", help="torchvision's ImageNet ResNet-50 checkpoint FILE: trains the paper preset"
    )
    p.add_argument("--show-scenes", type=int, default=4, help="held-out scenes in the report")
    p.add_argument(
        "--keep-running",
        action="store_true",
        help=f"leave the encoder (:{defaults.ENCODER_PORT}) and the ranker (:{defaults.RANKER_PORT}) running "
        "until Ctrl-C",
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("export", help="TorchScript encoders and Triton configs")
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("triton_repo"))
    p.set_defaults(func=cmd_export)

    from ranker_service.retrieval_mode import RetrievalMode

    p = sub.add_parser("recommend", help="ask a running ranker; print a table, optionally write HTML")
    p.add_argument("--scene", type=Path, required=True, help="scene photo")
    p.add_argument("--category", action="append", required=True, help="category (repeat for several)")
    p.add_argument("--limit", type=int, default=10)
    p.add_argument("--explain", action="store_true", help="also print the global and local distances")
    p.add_argument(
        "--mode",
        default=RetrievalMode.POOLED.value,
        choices=[m.value for m in RetrievalMode],
        help="pooled: a pool of nearest candidates, reranked exactly; exhaustive: the whole category; "
        "certify: widened until the answer is provably the exact top LIMIT (default %(default)s)",
    )
    p.add_argument(
        "--ranker", default=_env("RANKER", defaults.RANKER_ADDRESS), help="host:port (env CTL_RANKER)"
    )
    p.add_argument("--timeout", type=float, default=30.0, help="deadline of the call, seconds")
    p.add_argument("--html", type=Path, help="write the scene, its attention and the products as HTML")
    p.add_argument("--catalog", type=Path, help="the ingestion catalog, to show the product images")
    p.add_argument(
        "--images", type=Path, help="folder the catalog's image paths are relative to, and must lie in"
    )
    p.add_argument(
        "--allow-images-outside",
        action="store_true",
        help="show image files outside --images too (links, ../)",
    )
    add_client_arguments(p)
    p.set_defaults(func=cmd_recommend)

    p = sub.add_parser(
        "snapshot", help="archive an embedded catalog (stop its ranker first) into a .tar.gz with a manifest"
    )
    p.add_argument("store", type=Path, help="the store folder (e.g. ctl-store/MODEL_VERSION)")
    p.add_argument("out", type=Path, help="the archive to write (.tar.gz)")
    p.set_defaults(func=cmd_snapshot)

    p = sub.add_parser("restore", help="unpack a snapshot into a new store folder, checked before use")
    p.add_argument("archive", type=Path, help="a `ctl snapshot` archive")
    p.add_argument(
        "store_path",
        nargs="?",
        default=None,
        help="the folder to create; {model_version} is replaced "
        f"(default: {defaults.STORE_PATH_ENV} or {defaults.STORE_PATH})",
    )
    from ctl_app.snapshot_settings import add_restore_arguments

    add_restore_arguments(p)
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("health", help="ask a server's gRPC health check; exit 0 when SERVING")
    p.add_argument("address", help="host:port")
    p.add_argument("--service", default="", help="a service name (default: the whole server)")
    p.add_argument("--timeout", type=float, default=3.0)
    add_client_arguments(p)
    p.set_defaults(func=cmd_health)

    from ctl_app.fetch_images import add_parser as add_fetch_images
    from ctl_app.ingest.cli import add_parser as add_ingest
    from encoder_service.cli import add_parser as add_encoder
    from ranker_service.cli import add_parser as add_ranker

    add_ingest(sub)
    add_fetch_images(sub)
    add_encoder(sub)
    add_ranker(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = args.log_level.upper()
    if level not in logging.getLevelNamesMapping():
        print(
            f"ctl: --log-level (env CTL_LOG_LEVEL) {args.log_level!r}: expected one of "
            "DEBUG, INFO, WARNING, ERROR, CRITICAL",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr)
    from style_model.errors import StyleModelError

    try:
        return args.func(args)
    except StyleModelError as exc:
        logging.getLogger("ctl").error("%s", exc)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
