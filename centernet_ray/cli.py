"""The ``centernet-ray`` command line: argument parsing and dispatch only; the work lives in modules."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("centernet_ray")


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config file (default: the built-in demo config)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. loss.alpha=2.5 data.input_size=[256,256]")


def _split_config_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """argparse puts a leading ``key=value`` into ``config``; move it back to the overrides."""
    if args.config is not None and "=" in args.config:
        return None, [args.config, *args.overrides]
    return args.config, list(args.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="centernet-ray", description="Train, tune and serve CenterNet detectors on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    config = commands.add_parser("config", help="print the resolved config as YAML")
    _add_config_args(config)

    data = commands.add_parser("data", help="dataset tools")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    synth = data_commands.add_parser("synth", help="write the synthetic shapes dataset in COCO layout")
    synth.add_argument("--out", required=True, help="output directory")
    synth.add_argument("--train-images", type=int, default=1000)
    synth.add_argument("--val-images", type=int, default=200)
    synth.add_argument("--image-size", type=int, default=128)
    synth.add_argument("--seed", type=int, default=0)
    check = data_commands.add_parser("check", help="validate a COCO instances json and report what would be dropped")
    check.add_argument("--annotations", required=True, help="instances json")
    check.add_argument("--images", help="images directory (also checks that every image file exists)")
    show = data_commands.add_parser("show", help="draw ground-truth boxes of a few images into a PNG grid")
    show.add_argument("--annotations", required=True)
    show.add_argument("--images", required=True)
    show.add_argument("--out", required=True, help="PNG file to write")
    show.add_argument("--count", type=int, default=16)

    evaluate = commands.add_parser("eval", help="score COCO-format detections with COCOeval")
    evaluate.add_argument("--annotations", required=True, help="ground-truth instances json")
    evaluate.add_argument("--detections", required=True, help="COCO results json (list of detections)")
    evaluate.add_argument("--summary-json", help="write the stats here as JSON")
    return parser


def _cmd_config(args: argparse.Namespace) -> int:
    from centernet_ray.config import load_config

    path, overrides = _split_config_and_overrides(args)
    print(load_config(path, overrides).to_yaml(), end="")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    if args.data_command == "synth":
        from centernet_ray.data.synthetic import write_shapes_dataset

        out = write_shapes_dataset(args.out, args.train_images, args.val_images, args.image_size, args.seed)
        print(f"wrote {args.train_images} train and {args.val_images} val images to {out}")
        return 0
    from centernet_ray.data.coco import load_coco

    dataset = load_coco(args.annotations, args.images)
    if args.data_command == "check":
        print(f"{args.annotations}: {dataset.num_classes} classes ({', '.join(dataset.class_names)})")
        for key, value in dataset.report.counts().items():
            print(f"  {key:>17}: {value}")
        for problem, examples in dataset.report.examples.items():
            print(f"  {problem} e.g. {', '.join(examples)}")
        return 0
    import torch

    from centernet_ray.data.images import decode_image
    from centernet_ray.drawing import draw_detections, save_png_grid

    pictures = []
    for record in dataset.images[: args.count]:
        image = decode_image(Path(args.images) / record.file_name)
        pictures.append(draw_detections(image, torch.as_tensor(record.boxes), record.labels, dataset.class_names))
    if not pictures:
        raise SystemExit("no images to draw")
    width, height = max(p.shape[-1] for p in pictures), max(p.shape[-2] for p in pictures)
    padded = [torch.nn.functional.pad(p, (0, width - p.shape[-1], 0, height - p.shape[-2])) for p in pictures]
    print(f"wrote {save_png_grid(padded, args.out)}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from centernet_ray.evaluation import coco_evaluate, format_stats

    started = time.perf_counter()
    try:
        detections = json.loads(Path(args.detections).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"cannot read detections {args.detections}: {exc}")
    if not isinstance(detections, list):
        raise SystemExit(f"{args.detections} must hold a JSON list of COCO detections")
    stats = coco_evaluate(args.annotations, detections)
    print(format_stats(stats))
    if args.summary_json:
        summary = {**stats, "wall_seconds": round(time.perf_counter() - started, 3)}
        Path(args.summary_json).write_text(json.dumps(summary, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from centernet_ray.config import ConfigError
    from centernet_ray.data.coco import CocoFormatError

    handlers = {"config": _cmd_config, "data": _cmd_data, "eval": _cmd_eval}
    try:
        return handlers[args.command](args)
    except (ConfigError, CocoFormatError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
