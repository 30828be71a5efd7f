"""Closed-loop load on the detection endpoint: ``max_batch_size`` 1 (no batching) vs batched, one run.

    python -m benchmarks.serve_load [--clients 16] [--seconds 20] [--rounds 2] [--checkpoint CKPT]

N clients each send a request, wait for the answer and send the next (closed loop) to Serve on
127.0.0.1. The two settings are deployed in turn, alternating for ``--rounds`` rounds so that machine
noise hits both alike; requests/s and p50/p95/p99 latency are pooled per setting. Without
``--checkpoint`` the demo architecture (the shipped `demo` config) is served with random weights: the work
per request is the same as for a trained model (decode always takes the top 100 peaks).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def demo_checkpoint(directory: Path) -> str:
    import torch

    from centernet_ray.checkpoint import checkpoint_state, save_checkpoint
    from centernet_ray.config import load_config
    from centernet_ray.model import build_model

    torch.manual_seed(0)
    config = load_config("demo")
    model = build_model(config.model, 4)
    path = directory / "checkpoint.pt"
    save_checkpoint(path, checkpoint_state(model, config, ["circle", "rectangle", "triangle", "cross"], [1, 2, 3, 4], 0))
    return str(path)


def request_images(count: int = 16, size: int = 128) -> list[bytes]:
    from centernet_ray.data.synthetic import render_image

    images = []
    for index in range(count):
        image, _, _ = render_image(0, "bench", index, size)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


async def closed_loop(url: str, images: list[bytes], clients: int, seconds: float) -> tuple[int, list[float], int]:
    """(completed requests, latencies in s, failed requests) over ``seconds``."""
    import aiohttp

    latencies: list[float] = []
    failures = 0
    deadline = time.perf_counter() + seconds

    async def client(index: int, session: aiohttp.ClientSession) -> None:
        nonlocal failures
        i = index
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            async with session.post(f"{url}/detect", data=images[i % len(images)],
                                    headers={"Content-Type": "image/jpeg"}) as response:
                await response.read()
                if response.status != 200:
                    failures += 1
                    continue
            latencies.append(time.perf_counter() - start)
            i += clients

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(client(i, session) for i in range(clients)))
    return len(latencies), latencies, failures


def measure(checkpoint: str, port: int, max_batch_size: int, images: list[bytes], clients: int, seconds: float) -> dict:
    from ray import serve

    from centernet_ray.config import load_config
    from centernet_ray.ray_serve.launch import APP_NAME, start_app

    config = load_config(None, [f"serve.port={port}", f"serve.max_batch_size={max_batch_size}"])
    url = start_app(config, checkpoint)
    asyncio.run(closed_loop(url, images, clients, 3.0))  # warm-up
    done, latencies, failures = asyncio.run(closed_loop(url, images, clients, seconds))
    serve.delete(APP_NAME)
    return {"requests": done, "seconds": seconds, "latencies": latencies, "failures": failures}


def summarize(runs: list[dict]) -> dict[str, float]:
    latencies = np.array([v for run in runs for v in run["latencies"]]) * 1e3
    return {"rps": sum(r["requests"] for r in runs) / sum(r["seconds"] for r in runs),
            "p50": float(np.percentile(latencies, 50)), "p95": float(np.percentile(latencies, 95)),
            "p99": float(np.percentile(latencies, 99)), "failures": sum(r["failures"] for r in runs),
            "rps_rounds": [r["requests"] / r["seconds"] for r in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="the batched setting's max_batch_size")
    parser.add_argument("--checkpoint", help="serve this checkpoint (default: the demo architecture, random weights)")
    parser.add_argument("--port", type=int, default=8011)
    args = parser.parse_args()

    import ray

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or demo_checkpoint(Path(tmp))
        images = request_images()
        settings = {"max_batch_size=1": 1, f"max_batch_size={args.batch_size}": args.batch_size}
        runs: dict[str, list[dict]] = {name: [] for name in settings}
        for round_ in range(args.rounds):
            for name, size in settings.items():
                run = measure(checkpoint, args.port, size, images, args.clients, args.seconds)
                runs[name].append(run)
                print(f"round {round_ + 1} {name:<18} {run['requests'] / run['seconds']:7.1f} req/s", flush=True)
    results = {name: summarize(r) for name, r in runs.items()}
    base = results["max_batch_size=1"]
    print(f"\n{args.clients} closed-loop clients, {args.rounds} x {args.seconds:.0f} s per setting, 128x128 JPEGs, "
          f"{ray.cluster_resources().get('GPU', 0):.0f} GPU")
    print(f"  {'setting':<18} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'failed':>7}  vs unbatched")
    for name, r in results.items():
        print(f"  {name:<18} {r['rps']:8.1f} {r['p50']:8.1f} {r['p95']:8.1f} {r['p99']:8.1f} {r['failures']:7d}  "
              f"{r['rps'] / base['rps']:5.2f}x throughput, p99 {r['p99'] / base['p99']:5.2f}x")
    print("  per-round req/s: " + "; ".join(f"{n}: {', '.join(f'{v:.1f}' for v in r['rps_rounds'])}"
                                             for n, r in results.items()))
    ray.shutdown()


if __name__ == "__main__":
    main()
