"""One call that proves (or measures) the accelerator path on a machine with an NVIDIA GPU.

    python -m benchmarks.gpu_check OUT_DIR [--dry-run] [--train-seconds 180] [--models resnet18,...]
    benchmarks/gpu_check.sh OUT_DIR          # the same, after unpacking an offline bundle if present

Within ~8 minutes on one GPU it:

(a) per model (resnet18, resdcn18, dla34, hourglass104) at 512x512, bf16 autocast + channels_last:
    training images/s (``TrainingEngine.step`` on sparse batches, targets rendered on the device),
    peak GPU memory, inference images/s (``Detector.detect``: forward + decode); decode latency at
    batch 1 and 32 on [80, 128, 128] maps; the focal loss forward + backward on [16, 80, 128, 128];
(b) runs the real job, ``python -m centernet_ray train coco_resdcn18`` with ``train.use_gpu=true`` on
    the synthetic dataset at 512 px within ``--train-seconds`` (``train.time_limit``: 180 s, of which
    ~2 minutes train), and reports its
    images/s and the share of step time spent waiting for data (from its progress lines);
(c) starts the Serve endpoint (``centernet-ray serve`` on the GPU, the checkpoint of (b)) and sends
    200 requests from 16 clients: p50/p99 and how many answered 200.

``--dry-run`` does all of it on whatever device there is (the CPU here) at toy sizes, so the script
is known to work before a GPU is lent (``tests/test_gpu_check.py`` runs it). Full logs go to OUT_DIR
(``gpu_check.log``, ``train.log``, ``serve.log``); the summary table is printed last and written
to ``OUT_DIR/summary.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import torch

MODELS = {"resnet18": ["model.backbone=resnet18"], "resdcn18": ["model.backbone=resdcn18"],
          "dla34": ["model.backbone=dla34", "model.deformable=true"],
          "hourglass104": ["model.backbone=hourglass104"]}


class Sizes:
    def __init__(self, dry_run: bool) -> None:
        self.side = 64 if dry_run else 512  # input; dry run: the shipped models at toy size
        self.batch = 2 if dry_run else 32
        self.classes = 4 if dry_run else 80
        self.steps = 2 if dry_run else 10
        self.decode_map = (4, 16, 16) if dry_run else (80, 128, 128)
        self.focal = (2, 4, 16, 16) if dry_run else (16, 80, 128, 128)
        self.train_images = 48 if dry_run else 3000
        self.requests, self.clients = 200, 16


def timed(function: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median seconds of ``function`` over ``repeats`` runs after one warm-up, synchronised."""
    function()
    samples = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        function()
        _sync(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sparse_batch(sizes: Sizes, device_generator_seed: int = 0) -> dict[str, torch.Tensor]:
    """What the train collate gives on a GPU: uint8 images and sparse boxes (1-15 per image)."""
    generator = torch.Generator().manual_seed(device_generator_seed)
    out_side, slots = sizes.side // 4, 128
    count = torch.randint(1, 16, (sizes.batch,), generator=generator)
    wh = torch.exp(torch.empty(sizes.batch, slots, 2).uniform_(0.7, float(torch.log(torch.tensor(out_side / 2.0))),
                                                                generator=generator))
    xy = torch.rand(sizes.batch, slots, 2, generator=generator) * (out_side - wh)
    return {"image": torch.randint(0, 255, (sizes.batch, 3, sizes.side, sizes.side), dtype=torch.uint8,
                                   generator=generator),
            "boxes": torch.cat([xy, xy + wh], -1), "num_boxes": count.to(torch.int32),
            "classes": torch.randint(0, sizes.classes, (sizes.batch, slots), dtype=torch.int32, generator=generator)}


def model_rows(sizes: Sizes, device: torch.device, names: list[str]) -> list[dict[str, Any]]:
    from centernet_ray.config import load_config
    from centernet_ray.training.engine import TrainingEngine

    rows = []
    batch = sparse_batch(sizes)
    for name in names:
        config = load_config(None, [*MODELS[name], f"data.input_size=[{sizes.side},{sizes.side}]", "train.amp=bf16",
                                    f"train.batch_size={sizes.batch}", "targets.max_objects=128", "train.lr=1e-4"])
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        engine = TrainingEngine(config, sizes.classes, 1000, device)
        train_s = timed(lambda: [engine.step(batch) for _ in range(sizes.steps)], device, 1) / sizes.steps
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        detector = engine.detector()
        matrix = torch.eye(2, 3).repeat(sizes.batch, 1, 1)
        original = torch.full((sizes.batch, 2), sizes.side)
        infer_s = timed(lambda: detector.detect(batch["image"], matrix, original), device, 3)
        rows.append({"model": name, "train_img_s": sizes.batch / train_s, "peak_gib": peak,
                     "infer_img_s": sizes.batch / infer_s})
        log(f"  {name}: train {rows[-1]['train_img_s']:.1f} img/s, peak {peak:.1f} GiB, "
            f"inference {rows[-1]['infer_img_s']:.1f} img/s")
        del engine, detector
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def kernel_rows(sizes: Sizes, device: torch.device) -> dict[str, float]:
    from centernet_ray.decode import decode
    from centernet_ray.losses import focal_loss

    out = {}
    for batch in (1, 32):
        heat = torch.rand(batch, *sizes.decode_map, device=device)
        size = torch.rand(batch, 2, *sizes.decode_map[1:], device=device)
        out[f"decode_b{batch}_ms"] = timed(lambda: decode(heat, size, size, 100), device, 20) * 1e3
    logits = torch.randn(*sizes.focal, device=device, requires_grad=True)
    target = torch.rand(*sizes.focal, device=device)
    target[..., ::7, ::7] = 1.0

    def focal() -> None:
        focal_loss(logits, target).backward()
    out["focal_fwd_bwd_ms"] = timed(focal, device, 20) * 1e3
    return out


def run_job(out: Path, sizes: Sizes, gpu: bool, seconds: float) -> dict[str, Any]:
    """The real training job for about ``seconds``; img/s and data wait from its progress lines."""
    summary = out / "train_summary.json"
    command = [sys.executable, "-m", "centernet_ray", "train", "coco_resdcn18" if gpu else "demo",
               "data.root=", f"data.synthetic_train_images={sizes.train_images}", "data.synthetic_val_images=32",
               f"data.synthetic_image_size={sizes.side}", f"data.input_size=[{sizes.side},{sizes.side}]",
               "model.pretrained=null", f"train.use_gpu={str(gpu).lower()}", "train.num_workers=1",
               f"train.batch_size={sizes.batch}", "train.epochs=1000", "train.eval_every=1000",
               "train.checkpoint_every=1000", f"train.time_limit={seconds}", "train.run_name=gpu-check",
               f"train.storage_path={out / 'runs'}", f"tracking.tracking_uri=sqlite:///{out / 'mlflow.db'}",
               "tracking.log_model=false", "--summary-json", str(summary)]
    env = {**os.environ, "CENTERNET_RAY_CACHE": str(out / "data")}
    with open(out / "train.log", "w") as handle:
        finished = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env, timeout=seconds + 300)
    text = (out / "train.log").read_text()
    progress = re.findall(r"(\d+) img/s\s+data (\d+)%", text)
    steady = progress[len(progress) // 2:] or progress  # the second half: past the pipeline's start
    result = {"returncode": finished.returncode, "progress_lines": len(progress),
              "img_s": statistics.median(float(p[0]) for p in steady) if steady else float("nan"),
              "data_wait_pct": statistics.median(float(p[1]) for p in steady) if steady else float("nan")}
    if summary.exists():
        result.update({k: v for k, v in json.loads(summary.read_text()).items() if k in ("epochs", "checkpoint", "AP")})
    return result


def run_serve(out: Path, checkpoint: str, sizes: Sizes, gpu: bool, port: int = 8123) -> dict[str, Any]:
    """``centernet-ray serve`` on the checkpoint; 200 requests from 16 clients; then SIGINT."""
    from benchmarks.serve_load import request_images

    command = [sys.executable, "-m", "centernet_ray", "serve", "--checkpoint", checkpoint, "--port", str(port),
               "--num-gpus", "1" if gpu else "0", "--max-batch-size", "16"]
    url = f"http://127.0.0.1:{port}"
    with open(out / "serve.log", "w") as handle:
        server = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while not _healthy(url):
                if server.poll() is not None or time.monotonic() > deadline:
                    return {"error": f"the endpoint did not come up (exit {server.poll()}); see serve.log"}
                time.sleep(1)
            images = request_images(16, sizes.side)
            latencies, statuses, lock = [], [], threading.Lock()

            def client(index: int) -> None:
                for i in range(index, sizes.requests, sizes.clients):
                    request = urllib.request.Request(f"{url}/detect", data=images[i % len(images)],
                                                     headers={"Content-Type": "image/jpeg"})
                    start = time.perf_counter()
                    try:
                        with urllib.request.urlopen(request, timeout=120) as response:
                            response.read()
                            status = response.status
                    except urllib.error.HTTPError as error:
                        status = error.code
                    with lock:
                        latencies.append(time.perf_counter() - start)
                        statuses.append(status)
            threads = [threading.Thread(target=client, args=(i,)) for i in range(sizes.clients)]
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            elapsed = time.perf_counter() - started
            latencies.sort()
            return {"requests": len(statuses), "ok": statuses.count(200), "req_s": len(statuses) / elapsed,
                    "p50_ms": latencies[len(latencies) // 2] * 1e3,
                    "p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1e3}
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


_LOG: Path | None = None


def log(message: str) -> None:
    print(message, flush=True)
    if _LOG is not None:
        with open(_LOG, "a") as handle:
            handle.write(message + "\n")


def summary_table(device: str, models: list[dict], kernels: dict, job: dict, served: dict) -> str:
    lines = [f"# GPU check on {device}", "", "| model | train img/s | peak GiB | inference img/s |", "|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['train_img_s']:.1f} | {r['peak_gib']:.1f} | {r['infer_img_s']:.1f} |" for r in models]
    lines += ["", "| kernel | ms |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in kernels.items()]
    lines += ["", "| real job (centernet-ray train) | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in job.items()]
    lines += ["", "| Serve (200 requests, 16 clients) | value |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in served.items()]
    return "\n".join(lines)


def main() -> int:
    global _LOG
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="folder for the logs and the summary")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on any device (the CPU here)")
    parser.add_argument("--train-seconds", type=float, default=None,
                        help="the job's time limit, its start-up and data generation included (default 180; dry 25: one epoch, as little as the budget allows)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, from " + ", ".join(MODELS))
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    _LOG = out / "gpu_check.log"
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    name = torch.cuda.get_device_name(device) if gpu else f"CPU ({os.cpu_count()} cores)"
    if not gpu and not args.dry_run:
        log("no CUDA device: run with --dry-run for the toy-size check on this machine")
        return 2
    sizes = Sizes(args.dry_run)
    names = ["resnet18"] if args.dry_run else args.models.split(",")
    log(f"gpu_check on {name}, torch {torch.__version__}{' (dry run, toy sizes)' if args.dry_run else ''}")
    log("(a) models")
    models = model_rows(sizes, device, names)
    kernels = kernel_rows(sizes, device)
    log(f"(a) kernels: {kernels}")
    log("(b) the real job")
    job = run_job(out, sizes, gpu, args.train_seconds or (25 if args.dry_run else 180))
    log(f"(b) {job}")
    served = {"error": "no checkpoint from (b)"}
    if job.get("checkpoint"):
        log("(c) Serve")
        served = run_serve(out, str(Path(job["checkpoint"]) / "checkpoint.pt"), sizes, gpu)
        log(f"(c) {served}")
    table = summary_table(name, models, kernels, job, served)
    (out / "summary.md").write_text(table + "\n")
    log("\n" + table)
    return 0 if job.get("returncode") == 0 and served.get("ok") == sizes.requests else 1


if __name__ == "__main__":
    sys.exit(main())
