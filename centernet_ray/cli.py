"""The ``centernet-ray`` command line: argument parsing and dispatch only; the work lives in modules."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from centernet_ray import versions
from centernet_ray.errors import UserInputError

log = logging.getLogger("centernet_ray")


class _PrintVersions(argparse.Action):
    """``--version``: read when asked (argparse's own action would read them for every command, and
    wrap the line)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        print(versions())
        parser.exit()

# The embedded defaults, shipped inside the package (centernet_ray/configs/): the demo and its sweep.
DEFAULT_CONFIG = "demo"
DEFAULT_SWEEP_CONFIG = "tune/demo"


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``minimum`` (argparse names the flag and exits with status 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)


def _summary_path(path: str | None) -> Path | None:
    """``--summary-json``'s file, its folder created now: found unwritable before the work, not after."""
    from centernet_ray import storage

    if not path:
        return None
    if storage.is_uri(path):
        raise UserInputError(f"--summary-json {path}: give a local file (the summary is written by this process)")
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserInputError(f"--summary-json {path}: cannot create its folder: {exc.strerror}") from None
    if target.is_dir():
        raise UserInputError(f"--summary-json {path} is a folder; give a file name")
    if not os.access(target if target.exists() else target.parent, os.W_OK):
        raise UserInputError(f"--summary-json {path}: not writable")
    return target


def _add_config_args(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("config", nargs="?", help="YAML config file, or a shipped name: demo, coco_resdcn18, ... "
                        f"(`centernet-ray config --list`; default: {default})")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. loss.alpha=2.5 data.input_size=[256,256]")


OVERRIDE = re.compile(r"[A-Za-z_]\w*\.[A-Za-z_]\w*=")


def _split_config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """argparse puts a leading ``section.key=value`` into ``config``; move it back to the overrides
    (a config path may hold a ``=`` too: a Tune trial's folder, ``s3://b/run=3/best.yaml``)."""
    config = args.config
    if config is not None and (OVERRIDE.match(config) or ("=" in config and "/" not in config
                                                          and not Path(config).exists())):
        return None, [config, *args.overrides]  # a malformed one is refused as an override, with the hint
    return config, list(args.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="centernet-ray", description="Train, tune and serve CenterNet detectors on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action=_PrintVersions, help="print the versions of this package and its stack")
    commands = parser.add_subparsers(dest="command", required=True)

    config = commands.add_parser("config", help="print the resolved config as YAML (the defaults without CONFIG)")
    _add_config_args(config, "none, every key at its default")
    config.add_argument("--list", action="store_true", help="list the configs shipped with the package")

    train = commands.add_parser("train", help="train a CenterNet with Ray Train (DDP) on Ray Data")
    _add_config_args(train, DEFAULT_CONFIG)
    train.add_argument("--summary-json", help="write the final COCO stats, checkpoint and MLflow run id here")

    sweep = commands.add_parser("tune", help="sweep loss/target hyperparameters with Ray Tune (each trial a DDP run)")
    _add_config_args(sweep, DEFAULT_SWEEP_CONFIG)
    sweep.add_argument("--search-space", help="search-space YAML (default: the config's tune.search_space)")
    sweep.add_argument("--summary-json", help="write every trial, the best trial and its stats here")

    serve = commands.add_parser("serve", help="the detection endpoint on Ray Serve (POST /detect)")
    serve.add_argument("config", nargs="?", help="YAML config whose serve section sets the defaults")
    serve.add_argument("overrides", nargs="*", metavar="serve.key=value", help="e.g. serve.max_batch_size=16")
    serve.add_argument("--checkpoint", required=True,
                       help="checkpoint file/directory/URI, or an MLflow model URI (models:/name@alias)")
    serve.add_argument("--host", help="bind address (default serve.host, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="HTTP port (default serve.port, 8000)")
    serve.add_argument("--replicas", type=_positive_int, help="model replicas (default serve.num_replicas)")
    serve.add_argument("--max-batch-size", type=_positive_int, help="requests per model batch (default serve.max_batch_size)")
    serve.add_argument("--batch-wait-timeout", type=float, help="seconds a batch waits to fill (default serve.batch_wait_timeout_s)")
    serve.add_argument("--num-gpus", type=float, help="GPUs per model replica (default serve.num_gpus)")
    serve.add_argument("--flip-test", action="store_true", help="average each image's outputs with its mirror's")
    serve.add_argument("--api-keys-file", help="require 'Authorization: Bearer <key>' with a key from this file "
                       "(one per line; default serve.api_keys_file, else $CENTERNET_RAY_API_KEYS, else open)")

    data = commands.add_parser("data", help="dataset tools")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    synth = data_commands.add_parser("synth", help="write the synthetic shapes dataset in COCO layout")
    synth.add_argument("--out", required=True, help="output directory or URI")
    synth.add_argument("--train-images", type=_positive_int, default=1000)
    synth.add_argument("--val-images", type=_positive_int, default=200)
    synth.add_argument("--image-size", type=_int_at_least(32), default=128, help="pixels a side (at least 32)")
    synth.add_argument("--seed", type=_int_at_least(0), default=0)
    check = data_commands.add_parser("check", help="validate a COCO instances json and report what would be dropped")
    check.add_argument("--annotations", required=True, help="instances json")
    check.add_argument("--images", help="images directory (also checks that every image file exists)")
    check.add_argument("--read-images", action="store_true",
                       help="with --images: also read every image and check that it decodes, as data ingest does")
    ingest = data_commands.add_parser("ingest", help="COCO images + instances json (path or URI) -> sharded Parquet")
    ingest.add_argument("--images", required=True, help="images directory or URI (s3://, gs://, file://)")
    ingest.add_argument("--annotations", required=True, help="instances json path or URI")
    ingest.add_argument("--out", required=True, help="output directory or URI for the Parquet shards")
    ingest.add_argument("--shard-size", type=_positive_int, default=1000, help="rows (images) per shard")
    ingest.add_argument("--threads", type=_positive_int, default=16, help="parallel image reads")
    ingest.add_argument("--force", action="store_true", help="rewrite even if the same input was ingested")
    ingest.add_argument("--node-pools", action="store_true",
                        help="read the images on the CPU pool's nodes only (as cluster.node_pools=true)")
    show = data_commands.add_parser("show", help="draw ground-truth boxes of a few images into a PNG grid")
    show.add_argument("--annotations", required=True)
    show.add_argument("--images", required=True)
    show.add_argument("--out", required=True, help="PNG file (or URI) to write")
    show.add_argument("--count", type=_positive_int, default=16)

    predict = commands.add_parser("predict", help="batch inference with Ray Data: detections.json (+ metrics)")
    predict.add_argument("--checkpoint", required=True,
                         help="checkpoint file/directory/URI, or an MLflow model URI (models:/name@alias, runs:/ID/model)")
    predict.add_argument("--tracking-uri", help="MLflow store of a models:/ or runs:/ checkpoint "
                         "(default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="directory or URI of images (any format Pillow reads)")
    source.add_argument("--parquet", help="ingested Parquet directory (from `data ingest`)")
    predict.add_argument("--output", required=True, help="output directory or URI")
    predict.add_argument("--annotations", help="instances json: also score with COCOeval")
    predict.add_argument("--batch-size", type=_positive_int, default=16)
    predict.add_argument("--actors", type=_positive_int, default=1, help="model replicas (one GPU each when the cluster has GPUs)")
    predict.add_argument("--max-detections", type=_positive_int, default=100)
    predict.add_argument("--score-threshold", type=float, default=0.0,
                         help="keep detections scoring above this (default 0: all top-K, the COCO protocol)")
    predict.add_argument("--flip-test", action="store_true", help="average with the mirrored image")
    predict.add_argument("overrides", nargs="*", metavar="key=value",
                         help="settings over the checkpoint's config for this run, e.g. cluster.node_pools=false "
                              "or data.preprocess_compute=tasks")

    export = commands.add_parser("export", help="the detector, decoding included, as one ONNX graph, checked against PyTorch")
    export.add_argument("--checkpoint", required=True,
                        help="checkpoint file/directory/URI, or an MLflow model URI (models:/name@alias, runs:/ID/model)")
    export.add_argument("--format", choices=["onnx"], default="onnx", help="export format (onnx)")
    export.add_argument("--output", required=True, help="output directory or URI (model.onnx, export.json)")
    export.add_argument("--max-detections", type=_positive_int, default=100, help="top-K detections per image in the graph")
    export.add_argument("--no-check", action="store_true", help="skip the parity and AP check on the validation set")
    export.add_argument("--max-images", type=_positive_int, help="check on the first N validation images only")
    export.add_argument("--images", help="validation images directory (default: the checkpoint's config)")
    export.add_argument("--annotations", help="validation instances json (default: the checkpoint's config)")
    export.add_argument("--tracking-uri", help="MLflow store to log to (default: the one the checkpoint was trained with)")
    export.add_argument("--no-mlflow", action="store_true", help="do not log the export to MLflow")

    evaluate = commands.add_parser("eval", help="score COCO-format detections with COCOeval")
    evaluate.add_argument("--annotations", required=True, help="ground-truth instances json")
    evaluate.add_argument("--detections", required=True, help="COCO results json (list of detections)")
    evaluate.add_argument("--summary-json", help="write the stats here as JSON")
    # -v after the command too (`centernet-ray train demo -v`); SUPPRESS keeps a command's default
    # from overwriting a -v given before it
    for command in [*commands.choices.values(), *data_commands.choices.values()]:
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    return parser


def _cmd_config(args: argparse.Namespace) -> int:
    from centernet_ray.config import load_config
    from centernet_ray.config.files import packaged_names, read_yaml

    if args.list:
        names = packaged_names()
        spaces = [n for n in names if all("." in key for key in read_yaml(n) or {})]  # dotted keys only
        print("\n".join(n for n in names if n not in spaces))
        print(f"search spaces (centernet-ray tune --search-space NAME): {', '.join(spaces)}")
        return 0
    path, overrides = _split_config_and_overrides(args)
    print(load_config(path, overrides).to_yaml(), end="")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    if args.data_command == "ingest":
        from centernet_ray.config import ClusterConfig
        from centernet_ray.ray_data.ingest import ingest_coco
        from centernet_ray.ray_runtime import check_node_labels, init_ray

        selector = ClusterConfig(node_pools=args.node_pools).data_selector()

        def start_ray() -> None:  # work to do: one Ray Data task per shard reads, checks and writes its images
            init_ray()
            check_node_labels(selector, "the ingest's tasks", "leave out --node-pools to run anywhere")

        result = ingest_coco(args.images, args.annotations, args.out, args.shard_size, args.threads, args.force,
                             label_selector=selector, before_writing=start_ray)
        state = "already up to date" if result.reused else f"{len(result.shards)} shard(s), {result.bytes_written:,d} image bytes"
        print(f"{result.output}: {result.rows} images, {state}")
        for key, value in result.report.items():
            print(f"  {key:>17}: {value}")
        return 0
    if args.data_command == "synth":
        from centernet_ray.data.synthetic import write_shapes_dataset_to

        out = write_shapes_dataset_to(args.out, args.train_images, args.val_images, args.image_size, args.seed)
        print(f"wrote {args.train_images} train and {args.val_images} val images to {out}")
        return 0
    from centernet_ray.data.coco import drop_unreadable_images, load_coco

    if args.data_command == "check" and args.read_images and args.images is None:
        raise UserInputError("--read-images reads the images under --images: give it")
    dataset = load_coco(args.annotations, args.images)
    if args.data_command == "check":
        if args.read_images:
            drop_unreadable_images(dataset, args.images)
        print(f"{args.annotations}: {dataset.num_classes} classes ({', '.join(dataset.class_names)})")
        not_counted = {} if args.read_images else {"unreadable_images": "not read (give --read-images)"}
        if args.images is None:
            not_counted["missing_images"] = "not looked for (give --images)"
        for key, value in dataset.report.counts().items():
            print(f"  {key:>17}: {not_counted.get(key, value)}")
        for problem, examples in dataset.report.examples.items():
            print(f"  {problem} e.g. {', '.join(examples)}")
        return 0
    from centernet_ray.drawing import save_annotations_png

    print(f"wrote {save_annotations_png(dataset, args.images, args.count, args.out)}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from centernet_ray.config import load_config
    from centernet_ray.ray_train.job import TrainingInterrupted, format_summary, run_training

    path, overrides = _split_config_and_overrides(args)
    config = load_config(path or DEFAULT_CONFIG, overrides)
    summary_path = _summary_path(args.summary_json)
    # starts Ray only when the run trains (a finished run is reported from its records)
    return _run_and_report(lambda: run_training(config, source=args.source, started_at=args.started_at),
                           TrainingInterrupted, format_summary, summary_path)


def _run_and_report(run: Callable[[], Any], interrupted: type[Exception], format_summary: Callable[[Any], str],
                    summary_path: Path | None) -> int:
    """Run a training run or a sweep and return the exit status: 0 with its summary printed (and its
    ``to_json()`` written to ``summary_path``), 1 so when its ``failure()`` says what failed, 130 on
    Ctrl+C (``interrupted``) with how to resume.
    A local Ray the command started is stopped before either is printed: the late lines Ray's log
    monitor relays from its processes then come above, not after."""
    from centernet_ray.ray_runtime import sigterm_as_ctrl_c, stop_local_ray

    try:
        with sigterm_as_ctrl_c():
            summary = run()
    except interrupted as exc:
        stop_local_ray()
        print(f"interrupted: {exc}", file=sys.stderr)
        return 130
    stop_local_ray()
    print(format_summary(summary))
    if summary_path:
        summary_path.write_text(json.dumps(summary.to_json(), indent=2, default=str))
    if failed := summary.failure():
        print(f"error: {failed}", file=sys.stderr)
    return 1 if failed else 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from centernet_ray.config import load_config
    from centernet_ray.ray_tune.report import format_summary
    from centernet_ray.ray_tune.search_space import load_search_space
    from centernet_ray.ray_tune.sweep import SweepInterrupted, check_sweep, run_sweep

    path, overrides = _split_config_and_overrides(args)
    config = load_config(path or DEFAULT_SWEEP_CONFIG, overrides)
    config.tune.search_space = args.search_space or config.tune.search_space
    space = load_search_space(config.tune.search_space, config)
    check_sweep(space.with_fixed(config), space)  # before Ray starts: a bad setting answers at once
    summary_path = _summary_path(args.summary_json)
    return _run_and_report(lambda: run_sweep(config, space, source=args.source), SweepInterrupted, format_summary,
                           summary_path)


def _serve_flag_overrides(args: argparse.Namespace) -> list[str]:
    """``serve`` flags as config overrides; text values quoted, so that YAML reads ``::`` or a path
    with ``#`` in it as the string typed."""
    flags = {"host": args.host, "port": args.port, "num_replicas": args.replicas, "max_batch_size": args.max_batch_size,
             "batch_wait_timeout_s": args.batch_wait_timeout, "num_gpus": args.num_gpus,
             "api_keys_file": args.api_keys_file}
    return [f"serve.{key}={json.dumps(value) if isinstance(value, str) else value}"
            for key, value in flags.items() if value is not None]


def _cmd_serve(args: argparse.Namespace) -> int:
    from centernet_ray.config import load_config
    from centernet_ray.ray_runtime import joins_a_cluster
    from centernet_ray.ray_serve.launch import serve_forever

    path, overrides = _split_config_and_overrides(args)
    config = load_config(path, overrides + _serve_flag_overrides(args))
    received = serve_forever(config, args.checkpoint, flip_test=args.flip_test)
    print(f"stopped on {received}: " + ("application deleted, Serve left running on the cluster" if joins_a_cluster()
                                         else "Serve shut down cleanly"))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from centernet_ray.ray_data.batch_predict import run_predict
    from centernet_ray.evaluation import format_stats

    result = run_predict(args.checkpoint, args.output, images=args.images, parquet=args.parquet,
                         annotations=args.annotations, batch_size=args.batch_size, num_actors=args.actors,
                         k=args.max_detections, score_threshold=args.score_threshold, flip_test=args.flip_test,
                         tracking_uri=args.tracking_uri, overrides=args.overrides)
    print(f"{result.images} images, {result.detections} detections -> {result.output}/detections.json "
          f"({result.wall_seconds:.1f} s)")
    if result.skipped:
        print(f"skipped: {result.skipped}")
    if result.stats is not None:
        print(format_stats(result.stats))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from centernet_ray.export.job import format_export, run_export

    if bool(args.images) != bool(args.annotations):
        raise UserInputError("--images and --annotations go together: the validation images and their instances json")
    result = run_export(args.checkpoint, args.output, k=args.max_detections, check=not args.no_check,
                        max_images=args.max_images, images=args.images, annotations=args.annotations,
                        tracking_uri=args.tracking_uri, log_to_mlflow=not args.no_mlflow)
    print(format_export(result))
    return 0 if result.check is None or result.check.passed else 1


def _cmd_eval(args: argparse.Namespace) -> int:
    from centernet_ray import storage
    from centernet_ray.data.coco import parse_coco, read_coco_json
    from centernet_ray.evaluation import check_detections, coco_evaluate, coco_from_dict, format_stats

    started = time.perf_counter()
    summary_path = _summary_path(args.summary_json)
    try:
        detections = json.loads(storage.read_bytes(args.detections))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserInputError(f"cannot read detections {args.detections}: {exc}") from exc
    if not isinstance(detections, list):
        raise UserInputError(f"{args.detections} must hold a JSON list of COCO detections")
    instances = read_coco_json(args.annotations)  # read once: it may be an object in a bucket
    ground_truth = parse_coco(instances, args.annotations)  # malformed: a CocoFormatError naming what is wrong
    check_detections(detections, {r.image_id for r in ground_truth.images}, set(ground_truth.category_ids),
                     args.detections)
    stats = coco_evaluate(coco_from_dict(instances), detections)
    print(format_stats(stats))
    if summary_path:
        summary = {**stats, "wall_seconds": round(time.perf_counter() - started, 3)}
        summary_path.write_text(json.dumps(summary, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``centernet-ray`` with ``argv`` (default: the command line, whose output is made plain text
    when it is not a terminal: no colour codes or progress-bar redraws in files and job logs)."""
    started_at = time.time()  # train.time_limit counts from here: Ray's start-up and the data are in the budget
    if argv is None:
        from centernet_ray.console import plain_output_unless_terminal

        plain_output_unless_terminal()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    from centernet_ray.tracking import command_line

    args.started_at = started_at
    args.source = command_line(["centernet-ray", *(sys.argv[1:] if argv is None else argv)])  # MLflow's run source
    if extra:  # key=value overrides after an option (`tune --search-space S k=v`): argparse leaves them over
        if not hasattr(args, "overrides") or any(item.startswith("-") or "=" not in item for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    handlers = {"config": _cmd_config, "data": _cmd_data, "eval": _cmd_eval, "predict": _cmd_predict,
                "export": _cmd_export, "serve": _cmd_serve, "train": _cmd_train, "tune": _cmd_tune}
    try:
        status = handlers[args.command](args)
        sys.stdout.flush()  # inside the try: a reader that left (`... | head`) shows up at the last write
        return status
    except (UserInputError, FileNotFoundError) as exc:
        # A mistake in what the user gave: the message says what to change. Anything else is a fault
        # of the program or its environment and keeps its traceback.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl+C (or SIGTERM: ray_runtime.sigterm_as_ctrl_c) before a run's own handling began
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stop quietly, as `cat` does; to /dev/null, Python's flush at exit cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
