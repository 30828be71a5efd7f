"""Training step throughput: one Ray Train worker vs a plain PyTorch loop; 2-worker DDP vs 1 worker;
the DDP workers fed by fixed batches vs the real Ray Data pipeline vs the pipeline from ``data.cache``.

    python -m benchmarks.train_step [--config demo] [--steps 20] [--warmup 3] [--repeats 3]
                                    [--batches 8] [--no-pipeline] [--epoch-images 2000] [--feed-only]
                                    [--diagnose] [section.key=value ...]

A fixed set of batches is preprocessed once (``Preprocessor`` + ``TargetCollate`` on the synthetic
shapes dataset, ingested to Parquet) and put in the object store. The plain loop (in this process)
and the Ray Train workers (``TorchTrainer``, CPU, torch threads = cores / workers as ``job.py``
sets them) run the same ``TrainingEngine.step`` (``centernet_ray.training.engine``, the step the training job
runs): same model (same seed), optimizer, schedule, loss, batch size - over those batches. Images/s are measured with
``perf_counter`` over ``--steps`` steps after ``--warmup`` steps, inside the loop in both cases; the
workers send theirs back through ``ray.train.report``. Plain and Ray runs alternate, ``--repeats``
times, and medians are shown. Section (c) feeds ``train.num_workers`` DDP workers from fixed batches, from
the real Ray Data pipeline and from the pipeline over ``data.cache`` (``training_datasets``, as the
training job builds them): each pipeline run trains one untimed epoch, then times the second whole,
its first batch (the start of an execution) included; "machine" cores = every process's CPU.
``--diagnose`` adds one run per suspected cause of a Ray-vs-plain gap (niceness, OMP threads, ...),
with what each process saw: nice, OMP_NUM_THREADS, torch threads, CPU cores used, context switches.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from centernet_ray.config import Config, config_from_dict, load_config
from centernet_ray.precision import autocast_dtype
from centernet_ray.training.engine import TrainingEngine

DEFAULT_CONFIG = "demo"  # the shipped demo config
ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
            "KMP_AFFINITY", "LD_PRELOAD", "MALLOC_CONF")


def build_engine(config: Config, num_classes: int, steps_per_epoch: int,
                 wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> TrainingEngine:
    """The training engine every trainer uses (``centernet_ray.training.engine``), seeded so that every side
    of a comparison starts from the same weights; ``wrap``: e.g. Ray Train's ``prepare_model`` (DDP)."""
    torch.manual_seed(config.train.seed)
    engine = TrainingEngine(config, num_classes, steps_per_epoch, "cpu")
    if wrap is not None:
        engine.wrap(wrap)
    engine.model.train()
    return engine


def _busy_jiffies() -> int:
    """All CPUs' busy time (user + nice + system + irq + softirq + steal), from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return user + nice + system + irq + softirq + steal


def _cpu_by_process() -> dict[int, tuple[str, int]]:
    """pid -> (name, user + system jiffies) of every process; Ray workers are named by their title."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        title = argv[0].decode(errors="replace") if argv and argv[0] else stat.split("(", 1)[1].split(")")[0]
        if title.startswith("ray::"):
            name = title[5:].split(" ")[0]
        else:
            words = [w.decode(errors="replace") for w in argv if w]
            script = next((w for w in words[1:] if not w.startswith("-")), "")
            name = " ".join(Path(w).name for w in (words[:1] + ([script] if script else []))).split("\n")[0][:40]
            name = name or f"[{title}]"
        out[int(pid)] = (name, int(fields[11]) + int(fields[12]))
    return out


def _top_others(before: dict[int, tuple[str, int]], seconds: float, top: int = 4) -> str:
    """The processes other than this one that used the most CPU since ``before``, in cores."""
    hz, used = os.sysconf("SC_CLK_TCK"), {}
    for pid, (name, jiffies) in _cpu_by_process().items():
        if pid != os.getpid():
            used[name] = used.get(name, 0) + jiffies - before.get(pid, (name, 0))[1]
    ranked = sorted(used.items(), key=lambda item: -item[1])[:top]
    return ", ".join(f"{name} {jiffies / hz / seconds:.2f}" for name, jiffies in ranked if jiffies > 0)


def timed_steps(engine: TrainingEngine, batches: Iterable, warmup: int, steps: int, world: int = 1) -> dict[str, float]:
    """Run ``warmup + steps`` steps; figures over the ``steps`` after the warm-up (global images/s
    for ``world`` workers in lockstep), plus CPU use of this process and of the whole machine."""
    source = iter(batches)
    hz = os.sysconf("SC_CLK_TCK")
    start = tick = time.perf_counter()
    first_batch = wait = 0.0
    stamps, images = [], 0
    for i in range(warmup + steps):
        if i == warmup:
            t0, cpu0, busy0, rusage0, procs0 = tick, time.process_time(), _busy_jiffies(), _rusage(), _cpu_by_process()
        batch = next(source)
        got = time.perf_counter()
        first_batch = first_batch or got - start
        wait += (got - tick) if i >= warmup else 0.0
        result = engine.step(batch)  # reads nothing back from the device: checked once, after the loop
        count = result.images
        images += count if i >= warmup else 0
        tick = time.perf_counter()
        stamps.append(tick)
    elapsed = tick - t0
    rusage1 = _rusage()
    if engine.nonfinite_steps:
        raise FloatingPointError(f"{engine.nonfinite_steps} non-finite step(s): the figures would count skipped steps")
    return {"images_per_s": images * world / elapsed,
            "step_ms": float(statistics.median(np.diff([t0] + stamps[warmup:]))) * 1e3,
            "whole_images_per_s": (warmup + steps) * count * world / (tick - start),
            "first_batch_s": first_batch, "data_wait": wait / elapsed,
            "own_cores": (time.process_time() - cpu0) / elapsed,
            "machine_cores": (_busy_jiffies() - busy0) / hz / elapsed,
            "invol_ctx_per_step": (rusage1[1] - rusage0[1]) / steps, "threads_in_process": rusage1[2],
            "other_processes": _top_others(procs0, elapsed)}


def _rusage() -> tuple[int, int, int]:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    threads = next((int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("Threads:")), -1)
    return usage.ru_nvcsw, usage.ru_nivcsw, threads


def process_facts(model: torch.nn.Module | None = None) -> dict[str, Any]:
    """What this process (and thread) runs with: nice, autogroup, thread settings, env."""
    autogroup = Path("/proc/self/autogroup")
    facts = {"nice": os.getpriority(os.PRIO_PROCESS, 0), "torch_threads": torch.get_num_threads(),
             "interop_threads": torch.get_num_interop_threads(), "affinity_cpus": len(os.sched_getaffinity(0)),
             "thread": threading.current_thread().name.split("(")[0],
             "autogroup": autogroup.read_text().split()[0] if autogroup.exists() else "-"}
    facts.update({var: os.environ.get(var, "-") for var in ENV_VARS})
    if model is not None:
        facts["model_wrapper"] = {"DistributedDataParallel": "DDP"}.get(type(model).__name__, type(model).__name__)
    return facts


def materialize(batches: list[dict]) -> list[dict]:
    """numpy batches (as stored in the object store) -> writable torch tensors, as the collate makes them."""
    return [{"image": torch.from_numpy(np.array(b["image"])),
             "targets": {k: torch.from_numpy(np.array(v)) for k, v in b["targets"].items()}} for b in batches]


def set_nice(value: int) -> None:
    """Nice every thread of this process (Linux nice is per thread; torch's OpenMP threads may exist
    already). Lowering it needs root / CAP_SYS_NICE."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), value)
        except ProcessLookupError:
            pass


def apply_knobs(knobs: dict[str, Any], threads: int) -> None:
    """Per-process settings of a run: niceness, then torch threads as ``train_loop_per_worker`` does."""
    if knobs.get("nice") is not None:
        set_nice(knobs["nice"])
    if knobs.get("set_threads", True):
        torch.set_num_threads(max(1, threads))
    if knobs.get("interop"):
        torch.set_num_interop_threads(knobs["interop"])


def worker_loop(cfg: dict[str, Any]) -> None:
    """The Ray Train worker: the same steps over the stored batches (or its Ray Data shard)."""
    import ray
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    apply_knobs(cfg["knobs"], cfg["threads_per_worker"])
    config = config_from_dict(cfg["config"])
    engine = build_engine(config, cfg["num_classes"], cfg["steps_per_epoch"], wrap=ray.train.torch.prepare_model)
    if cfg["source"] == "pipeline":
        from centernet_ray.ray_data.pipeline import shard_batches

        def epoch_batches(epoch: int):
            return shard_batches("train", config, cfg["num_classes"], config.train.batch_size, epoch)

        for batch in epoch_batches(0):  # epoch 1, untimed: the first execution starts the pipeline's processes
            engine.step(batch)
        ray.get(cfg["clock"].set_epoch.remote(1))  # epoch 2 draws new augmentations, as in training
        metrics = timed_steps(engine, epoch_batches(1), 0, cfg["steps_per_epoch"], world)
    else:
        batches = itertools.cycle(materialize(ray.get(cfg["batches"][0]))[rank::world])
        metrics = timed_steps(engine, batches, cfg["warmup"], cfg["steps"], world)
    metrics.update(process_facts(engine.model))
    # Ray Train V2 returns only metrics attached to a checkpoint (Result.metrics), so rank 0 attaches a
    # one-file checkpoint; every rank reports (report is collective).
    with tempfile.TemporaryDirectory() as directory:
        Path(directory, "metrics.txt").write_text(repr(metrics))
        checkpoint = ray.train.Checkpoint.from_directory(directory) if rank == 0 else None
        ray.train.report(metrics, checkpoint=checkpoint)


def task_loop(cfg: dict[str, Any]) -> dict[str, Any]:
    """The plain loop in a bare Ray worker process (a task, no Ray Train)."""
    import ray

    apply_knobs(cfg["knobs"], cfg["threads_per_worker"])
    engine = build_engine(config_from_dict(cfg["config"]), cfg["num_classes"], cfg["steps_per_epoch"])
    batches = itertools.cycle(materialize(ray.get(cfg["batches"][0])))
    return {**timed_steps(engine, batches, cfg["warmup"], cfg["steps"]), **process_facts(engine.model)}


def plain_loop(cfg: dict[str, Any], batches: list[dict]) -> dict[str, Any]:
    """The plain PyTorch loop in this (driver) process; knob ``competitor``: a busy single-threaded
    process at this loop's niceness runs meanwhile (what a preprocessing actor does to a worker)."""
    previous = os.getpriority(os.PRIO_PROCESS, 0)
    apply_knobs(cfg["knobs"], cfg["threads_per_worker"])
    competitor = None
    if cfg["knobs"].get("competitor"):
        competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # inherits the niceness
    try:
        engine = build_engine(config_from_dict(cfg["config"]), cfg["num_classes"], cfg["steps_per_epoch"])
        return {**timed_steps(engine, itertools.cycle(materialize(batches)), cfg["warmup"], cfg["steps"]),
                **process_facts(engine.model)}
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
        set_nice(previous)


def ray_train(cfg: dict[str, Any], workers: int, storage: Path, datasets: dict | None = None,
              cpus_per_worker: float | None = None) -> dict[str, Any]:
    """One ``TorchTrainer`` run of ``worker_loop``; rank 0's reported figures."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from centernet_ray.ray_data.pipeline import CenterNetDataConfig

    cfg = dict(cfg, threads_per_worker=cfg.get("threads_per_worker") or max(1, (os.cpu_count() or 1) // workers))
    extra = {"datasets": datasets, "dataset_config": CenterNetDataConfig()} if datasets else {}
    trainer = TorchTrainer(
        worker_loop, train_loop_config=cfg,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False,
                                     resources_per_worker={"CPU": cpus_per_worker} if cpus_per_worker else None),
        run_config=RunConfig(name=f"train-step-{uuid.uuid4().hex[:8]}", storage_path=str(storage)), **extra)
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return dict(result.metrics)


def prepare_data(config: Config, images: int, root: Path, keep: int) -> tuple[str, int, list[dict]]:
    """Synthetic shapes -> ingested Parquet (train, and a 1-image val split beside it: ``pq-val``);
    the first ``keep`` full batches preprocessed + collated once (numpy)."""
    import pyarrow.parquet as pq

    from centernet_ray.ray_data.ingest import ingest_coco
    from centernet_ray.data.preprocess import Preprocessor
    from centernet_ray.data.synthetic import write_shapes_dataset
    from centernet_ray.targets import TargetCollate

    data = config.data
    write_shapes_dataset(root / "shapes", num_train=images, num_val=1, image_size=data.synthetic_image_size,
                         seed=config.train.seed)
    ingested = ingest_coco(str(root / "shapes" / "images" / "train"),
                           str(root / "shapes" / "annotations" / "instances_train.json"), str(root / "pq"),
                           data.shard_size)
    ingest_coco(str(root / "shapes" / "images" / "val"), str(root / "shapes" / "annotations" / "instances_val.json"),
                str(root / "pq-val"), data.shard_size)
    table = pq.read_table(root / "pq").to_pydict()
    rows = {k: np.array(v, dtype=object) if k in ("image", "boxes", "labels") else np.array(v) for k, v in table.items()}
    preprocess = Preprocessor(data.input_size, config.targets.max_objects, train=True, augment=data.augment,
                              scale_range=data.scale_range, flip_prob=data.flip_prob, color_jitter=data.color_jitter,
                              seed=config.train.seed)
    num_classes = len(ingested.class_names)
    collate = TargetCollate(config, num_classes)
    size, batches = config.train.batch_size, []
    for start in range(0, min(len(rows["image_id"]) - size + 1, keep * size), size):
        out = collate(preprocess({k: v[start:start + size] for k, v in rows.items()}))
        batches.append({"image": out["image"].numpy(), "targets": {k: v.numpy() for k, v in out["targets"].items()}})
    return str(root / "pq"), num_classes, batches


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of the numeric figures of repeated runs; the first run's facts."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = statistics.median(r[key] for r in runs)
    out["all"] = [r["images_per_s"] for r in runs]
    return out


def row(label: str, result: dict[str, Any], base: dict[str, Any] | None, base_name: str = "") -> None:
    ratio = f"{result['images_per_s'] / base['images_per_s']:5.2f}x vs {base_name}" if base else ""
    runs = "/".join(f"{v:.1f}" for v in result["all"])
    print(f"  {label:<44} {result['images_per_s']:7.1f} img/s  {result['step_ms']:7.1f} ms/step  "
          f"cores: own {result['own_cores']:.2f} machine {result['machine_cores']:.2f}   {ratio}   [{runs}]")


FACT_COLUMNS = (("nice", "nice"), ("thread", "thread"), ("torch_threads", "torch thr"), ("interop_threads", "interop"),
                ("OMP_NUM_THREADS", "OMP env"), ("model_wrapper", "model"), ("own_cores", "own cores"),
                ("machine_cores", "all cores"), ("invol_ctx_per_step", "preempt/step"), ("data_wait", "data wait"),
                ("first_batch_s", "1st batch s"), ("whole_images_per_s", "whole img/s"))


def print_facts(results: dict[str, dict[str, Any]]) -> None:
    print("\nwhat each run saw (first run of each, medians for the figures): own/all cores = CPU time of the training "
          "process / of the whole machine per second of the timed steps; preempt/step = involuntary context switches "
          "per step; data wait = share of the timed steps spent waiting for a batch; whole img/s includes warm-up "
          "and the wait for the first batch")
    print(f"  {'':<30}" + "".join(f"{title:>13}" for _, title in FACT_COLUMNS))
    for name, result in results.items():
        cells = []
        for key, _ in FACT_COLUMNS:
            value = result.get(key, "-")
            if isinstance(value, float):
                value = int(value) if value.is_integer() else f"{value:.2f}"
            cells.append(f"{str(value)[:12]:>13}")
        print(f"  {name[:30]:<30}" + "".join(cells))
    print("  CPU taken by other processes during the timed steps (cores):")
    for name, result in results.items():
        print(f"    {name[:30]:<30} {result.get('other_processes', '-')}")
    others = {var: {r.get(var, "-") for r in results.values()} for var in ENV_VARS if var != "OMP_NUM_THREADS"}
    print("  other thread/allocator env vars: " + ", ".join(f"{var}={'/'.join(sorted(map(str, v)))}"
                                                         for var, v in others.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved plain / Ray repeats (medians shown)")
    parser.add_argument("--batches", type=int, default=8, help="distinct preprocessed batches cycled through")
    parser.add_argument("--no-pipeline", action="store_true", help="skip section (c), the workers fed by Ray Data")
    parser.add_argument("--epoch-images", type=int, default=2000, help="images in the pipelines' epochs (c)")
    parser.add_argument("--feed-only", action="store_true", help="only section (c)")
    parser.add_argument("--diagnose", action="store_true", help="also run each suspected cause of a gap in isolation")
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    import ray

    cores = os.cpu_count() or 1
    batch = config.train.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fixed_count = max(args.batches, args.warmup + args.steps) + 1
        images = max(fixed_count * batch, args.epoch_images)
        parquet, num_classes, batches = prepare_data(config, images, root, fixed_count)
        cfg = {"config": config.to_dict(), "num_classes": num_classes, "steps_per_epoch": len(batches),
               "warmup": args.warmup, "steps": args.steps, "source": "fixed", "knobs": {}}
        plain_cfg = dict(cfg, threads_per_worker=cores)
        before_ray = plain_loop(plain_cfg, batches[: args.batches]) if args.diagnose else None  # Ray not started

        ray.init(num_cpus=max(8, cores), include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        cfg["batches"] = [ray.put(batches[: args.batches])]  # in a list: passed as a reference, fetched in the worker
        storage = root / "ray_results"
        print(f"training step, {Path(args.config).name}: {config.model.backbone} width {config.model.width}, "
              f"{config.data.input_size[0]}x{config.data.input_size[1]}, batch {batch} per worker, amp={config.train.amp} "
              f"-> {autocast_dtype(config.train.amp, 'cpu') or 'fp32'}, {cores} cores, torch {torch.__version__}, "
              f"ray {ray.__version__}; {args.steps} timed steps after {args.warmup} warm-up, "
              f"median of {args.repeats} interleaved repeats")

        def measure(name: str, run) -> dict[str, Any]:
            started = time.perf_counter()
            result = run()
            print(f"  ... {name}: {result['images_per_s']:.1f} img/s ({time.perf_counter() - started:.0f} s)",
                  file=sys.stderr, flush=True)
            return result

        def pipeline(knobs: dict[str, Any] | None = None, overrides: tuple[str, ...] = (), threads: int = 0,
                     workers: int = 1) -> dict[str, Any]:
            """Workers fed by the real Ray Data pipeline (``training_datasets``, as the job builds it; the
            cache too with ``data.cache=true``): one untimed epoch, then the second timed whole."""
            from centernet_ray.ray_data.pipeline import EpochClock, training_datasets

            run_config = load_config(args.config, [*args.overrides, *overrides])
            clock = EpochClock.remote()
            dataset = training_datasets(parquet, f"{parquet}-val", run_config, clock=clock)["train"]
            steps = images // workers // run_config.train.batch_size
            return ray_train(dict(cfg, config=run_config.to_dict(), source="pipeline", knobs=knobs or {},
                                  threads_per_worker=threads, clock=clock, steps_per_epoch=steps), workers, storage,
                             datasets={"train": dataset})

        fixed = batches[: args.batches]
        plain, ray1, ray2 = [], [], []
        for _ in range(0 if args.feed_only else args.repeats):  # interleaved: noise hits every candidate alike
            plain.append(measure("plain loop", lambda: plain_loop(plain_cfg, fixed)))
            ray1.append(measure("Ray Train 1 worker", lambda: ray_train(cfg, 1, storage)))
            ray2.append(measure("Ray Train 2 workers", lambda: ray_train(cfg, 2, storage)))
        results = {} if args.feed_only else {"plain loop (driver)": summary(plain), "Ray Train 1x2": summary(ray1),
                                              "Ray Train 2x1 DDP": summary(ray2)}
        workers = config.train.num_workers
        feeds = {}
        if not args.no_pipeline:
            runs: dict[str, list] = {f"fixed batches, {workers} workers": [], "Ray Data pipeline": [],
                                     "Ray Data + data.cache": []}
            for _ in range(args.repeats):  # interleaved, as above
                runs[f"fixed batches, {workers} workers"].append(measure("fixed batches", lambda: ray_train(
                    cfg, workers, storage)))
                for name, cache in (("Ray Data pipeline", "false"), ("Ray Data + data.cache", "true")):
                    runs[name].append(measure(name, lambda: pipeline(overrides=(f"data.cache={cache}",),
                                                                     workers=workers)))
            feeds = {name: summary(found) for name, found in runs.items()}
            results.update(feeds)
        diagnostics = {}
        if args.diagnose:
            variants = {
                "plain, before ray.init": lambda: before_ray,
                "plain, nice 15": lambda: plain_loop(dict(plain_cfg, knobs={"nice": 15}), fixed),
                "plain + 1 busy process": lambda: plain_loop(dict(plain_cfg, knobs={"competitor": True}), fixed),
                "plain 1 thr + 1 busy proc": lambda: plain_loop(dict(plain_cfg, threads_per_worker=1,
                                                                     knobs={"competitor": True}), fixed),
                "Ray task (no Train)": lambda: ray.get(ray.remote(task_loop).options(num_cpus=1).remote(
                    dict(cfg, threads_per_worker=cores))),
                "Train, no set_num_threads": lambda: ray_train(dict(cfg, knobs={"set_threads": False}), 1, storage),
                "Train, worker nice 0": lambda: ray_train(dict(cfg, knobs={"nice": 0}), 1, storage),
                f"Train, CPU={cores} per worker": lambda: ray_train(cfg, 1, storage, cpus_per_worker=cores),
                "Ray Data, worker nice 0": lambda: pipeline({"nice": 0}),
                "Ray Data, worker 1 thread": lambda: pipeline(threads=1),
                "Ray Data, 1 preprocess proc": lambda: pipeline(overrides=("data.preprocess_min_actors=1",
                                                                           "data.preprocess_max_actors=1")),
            }
            diagnostics = {name: summary([measure(name, run)]) for name, run in variants.items()}
            results.update(diagnostics)

        base = results.get("plain loop (driver)")
        if base is not None:
            print("\n(a) one Ray Train worker vs a plain PyTorch loop, same batches, "
                  f"{cores} torch threads each (images/s; target >= 0.9x)")
            row("plain PyTorch loop (driver process)", base, base, "plain")
            row(f"Ray Train TorchTrainer, 1 worker x {cores} threads", results["Ray Train 1x2"], base, "plain")
            print(f"\n(b) DDP at equal total threads ({cores}), global images/s")
            one = results["Ray Train 1x2"]
            row(f"Ray Train, 1 worker x {cores} threads", one, one, "1 worker")
            row(f"Ray Train, 2 workers x {max(1, cores // 2)} thread(s), DDP gloo", results["Ray Train 2x1 DDP"],
                one, "1 worker")
        if feeds:
            fixed_name = f"fixed batches, {workers} workers"
            print(f"\n(c) feeding {workers} DDP worker(s) (this config's train.num_workers): fixed batches vs the real "
                  f"Ray Data pipeline vs the pipeline from data.cache; the pipelines' second epoch, timed whole "
                  f"({images} images); targets: cached >= 0.85x fixed, uncached keeps >= {0.9 * cores:.1f} of "
                  f"{cores} cores busy, first batch of the second epoch within 1 s")
            for name, result in feeds.items():
                row(name, result, feeds[fixed_name], "fixed")
                if name != fixed_name:
                    print(f"  {'':<44} first batch of epoch 2 after {result['first_batch_s']:.2f} s, "
                          f"waiting for data {100 * result['data_wait']:.0f}% of the epoch")
                    # each repeat's ratio to the fixed-batch run of the same repeat (minutes apart): the
                    # machine's drift between repeats cancels out of it, unlike from a ratio of two medians
                    paired = [run["images_per_s"] / fixed_run["images_per_s"]
                              for run, fixed_run in zip(runs[name], runs[fixed_name])]
                    print(f"  {'':<44} per repeat vs its fixed run: {' '.join(f'{r:.2f}x' for r in paired)} "
                          f"(median {statistics.median(paired):.2f}x)")
        if args.diagnose:
            print("\n(d) suspected causes of a Ray-vs-plain gap, one run each")
            for name, result in diagnostics.items():
                row(name, result, base, "plain")
        print_facts(results)
        ray.shutdown()


if __name__ == "__main__":
    main()
