"""Soak the detection endpoint: many clients, good images mixed with every malformed kind.

    python -m benchmarks.serve_soak [--clients 64] [--requests 2000] [--bad-share 0.25]

One CPU model replica of the demo architecture (random weights: the same work per request as a
trained model). Two phases in one run: the baseline sends good images only; the soak sends the
same number of requests with ``--bad-share`` of them malformed (empty, not an image, truncated
JPEG, decompression bomb, body over the limit, wrong content type, bad query values, broken
multipart). It reports statuses by kind, 5xx count, p50/p99 of the good requests and req/s, the
soak side by side with the baseline. Pass: zero 5xx and every good request answered 200.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import random
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.serve_load import demo_checkpoint, request_images

MAX_BODY = 2_000_000


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def malformed_requests(good: bytes) -> dict[str, tuple[bytes, str, dict[str, str], int]]:
    """kind -> (body, content type, query, the status it must get)."""
    return {
        "empty body": (b"", "image/jpeg", {}, 400),
        "not an image": (b"hello" * 50, "image/jpeg", {}, 400),
        "truncated jpeg": (good[:200], "image/jpeg", {}, 400),
        "decompression bomb": (_png(8000, 8000), "image/png", {}, 413),
        "body over the limit": (b"\xff" * (MAX_BODY + 1), "image/jpeg", {}, 413),
        "wrong content type": (good, "text/plain", {}, 415),
        "threshold not a number": (good, "image/jpeg", {"score_threshold": "high"}, 422),
        "unknown parameter": (good, "image/jpeg", {"thresh": "0.1"}, 422),
        "malformed multipart": (b"--x\r\nnonsense", "multipart/form-data; boundary=x", {}, 400),
    }


async def soak(url: str, plan: list[tuple[str, bytes, str, dict, int]], clients: int) -> list[tuple[str, int, int, float]]:
    """Send ``plan`` (kind, body, content type, query, expected) from ``clients`` concurrent clients;
    returns (kind, expected, got, seconds) per request (got 0: the connection failed)."""
    import aiohttp

    queue: asyncio.Queue = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)
    results: list[tuple[str, int, int, float]] = []

    async def client(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            kind, body, content_type, query, expected = queue.get_nowait()
            start = time.perf_counter()
            try:
                async with session.post(f"{url}/detect", data=body, params=query,
                                        headers={"Content-Type": content_type}) as response:
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, asyncio.TimeoutError):  # counted as failed, the soak goes on
                status = 0
            results.append((kind, expected, status, time.perf_counter() - start))

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return results


def phase(url: str, images: list[bytes], requests: int, bad_share: float, clients: int, seed: int) -> dict:
    rng = random.Random(seed)
    bad = malformed_requests(images[0])
    plan = []
    for i in range(requests):
        if rng.random() < bad_share:
            kind = rng.choice(sorted(bad))
            body, content_type, query, expected = bad[kind]
            plan.append((kind, body, content_type, query, expected))
        else:
            plan.append(("good", images[i % len(images)], "image/jpeg", {}, 200))
    started = time.perf_counter()
    results = asyncio.run(soak(url, plan, clients))
    seconds = time.perf_counter() - started
    good = np.array([s for kind, _, _, s in results if kind == "good"]) * 1e3
    return {"results": results, "seconds": seconds, "rps": len(results) / seconds,
            "p50": float(np.percentile(good, 50)), "p99": float(np.percentile(good, 99)),
            "server_errors": sum(1 for _, _, got, _ in results if got >= 500 or got == 0),
            "good_not_200": sum(1 for kind, _, got, _ in results if kind == "good" and got != 200),
            "wrong_status": sum(1 for _, expected, got, _ in results if got != expected)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--bad-share", type=float, default=0.25, help="share of malformed requests in the soak")
    parser.add_argument("--checkpoint", help="serve this checkpoint (default: the demo architecture, random weights)")
    parser.add_argument("--port", type=int, default=8012)
    args = parser.parse_args()

    import ray
    from ray import serve

    from centernet_ray.config import load_config
    from centernet_ray.ray_serve.launch import APP_NAME, start_app

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or demo_checkpoint(Path(tmp))
        config = load_config(None, [f"serve.port={args.port}", f"serve.max_body_bytes={MAX_BODY}",
                                    "serve.num_replicas=1"])
        url = start_app(config, checkpoint)
        images = request_images()
        phase(url, images, 200, 0.0, args.clients, seed=0)  # warm-up
        baseline = phase(url, images, args.requests, 0.0, args.clients, seed=1)
        mixed = phase(url, images, args.requests, args.bad_share, args.clients, seed=2)
        serve.delete(APP_NAME)
    by_kind: dict[str, Counter] = {}
    for kind, expected, got, _ in mixed["results"]:
        by_kind.setdefault(f"{kind} (expects {expected})", Counter())[got] += 1
    print(f"\n{args.clients} concurrent clients, {args.requests} requests per phase, one CPU replica of the demo "
          "architecture, 128x128 JPEGs")
    print(f"  {'phase':<28} {'req/s':>7} {'good p50 ms':>12} {'good p99 ms':>12} {'5xx/failed':>11} "
          f"{'good !=200':>11} {'wrong status':>13}")
    for name, r in (("baseline (good only)", baseline), (f"soak ({args.bad_share:.0%} malformed)", mixed)):
        print(f"  {name:<28} {r['rps']:7.1f} {r['p50']:12.1f} {r['p99']:12.1f} {r['server_errors']:11d} "
              f"{r['good_not_200']:11d} {r['wrong_status']:13d}")
    print(f"  soak vs baseline: {mixed['rps'] / baseline['rps']:.2f}x req/s, good p99 {mixed['p99'] / baseline['p99']:.2f}x")
    print("\n  statuses by kind in the soak:")
    for kind, counts in sorted(by_kind.items()):
        print(f"    {kind:<40} " + ", ".join(f"{status}: {n}" for status, n in sorted(counts.items())))
    passed = mixed["server_errors"] == baseline["server_errors"] == 0 and mixed["good_not_200"] == 0
    print(f"\n  {'PASS' if passed else 'FAIL'}: zero 5xx and every good request 200")
    ray.shutdown()


if __name__ == "__main__":
    main()
