"""DiLoCo against synchronous data parallelism on a byte-level transformer language model.

The data is text that ships with every Python: the standard library's own ``.py`` files (tests,
``site-packages`` and caches left out), listed and digested so that a run names exactly what it
trained on. Whole top-level modules are held out for validation (about ``--val-bytes``); the
other modules are dealt to ``--workers`` workers, each module to one worker, so every worker
holds different code (non-i.i.d. by construction: one may hold ``asyncio`` and ``email``,
another ``tkinter`` and ``xml``).

The model is a small decoder-only transformer over bytes (``--d-model 64 --layers 3``: about
0.2M parameters by default). Every method gets the same compute: ``--steps`` inner steps of
``--batch-size`` windows of ``--context`` bytes per worker, from the same stream of windows:

- synchronous data parallelism: every step, each worker's gradient of its own batch, averaged,
  and one AdamW step of the shared model (one exchange per step);
- DiLoCo with H inner steps: each worker takes H AdamW steps from the global model on its own
  data, then the pseudo-gradients are averaged and applied with outer Nesterov SGD (lr 0.7,
  momentum 0.9) by aumai-fedtrain's coordinator, through :class:`TorchTrainer` nodes in
  process (one exchange per H steps).

It reports the held-out loss in bits per byte and the bytes communicated (parameters down and
the update up, per worker and exchange, at 4 bytes per value: the float32 model), prints a
table, and writes a plot (with matplotlib) and the results as JSON. The default is the run of
``docs/experiments.md`` (k = 4, synchronous and H in {1, 10, 50, 100, 500}, seeds 0-4, two
runs at a time in their own processes, ``--processes``); flags scale it up (``--device cuda
--d-model 256 --layers 6 --steps 5000 ...``). A tiny run, for trying it out::

    python examples/lm_diloco.py --steps 20 --H 1 10 --seeds 0 --max-corpus-bytes 400000 \\
        --val-bytes 40000 --eval-every 10 --eval-windows 8 --plot none
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import sys
import sysconfig
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from aumai_fedtrain import DiLoCoCoordinator, FederatedNode, TrainingConfig
from aumai_fedtrain.providers import InProcessProvider
from aumai_fedtrain.torch import build_model, load_tensormap, model_init, trainer_factory
from diloco_vs_sync import pyplot  # beside this file

LEFT_OUT = frozenset({"site-packages", "dist-packages", "test", "tests", "__pycache__"})
BYTES_PER_VALUE = 4  # a float32 model's values on the wire


@dataclass
class Corpus:
    """The files, their digest, the held-out text and each worker's text."""

    root: str
    files: list[tuple[str, int, str]]
    """``(path relative to root, bytes, sha256)`` of every file, sorted by path."""
    digest: str
    validation_modules: list[str]
    worker_modules: list[list[str]]
    validation: torch.Tensor = field(repr=False)
    workers: list[torch.Tensor] = field(repr=False)


def module_of(relative: str) -> str:
    """The top-level module a file belongs to (``email/mime/text.py`` -> ``email``)."""
    return relative.split("/", 1)[0].removesuffix(".py")


def read_corpus(root: Path, workers: int, val_bytes: int, max_bytes: int | None) -> Corpus:
    """List, digest and split the ``.py`` files under ``root`` (by top-level module)."""
    paths = sorted(
        path
        for path in root.rglob("*.py")
        if not LEFT_OUT.intersection(path.relative_to(root).parts)
    )
    texts: dict[str, bytes] = {}
    total = 0
    for path in paths:
        if max_bytes is not None and total >= max_bytes:
            break
        texts[path.relative_to(root).as_posix()] = data = path.read_bytes()
        total += len(data)
    files = [(name, len(data), hashlib.sha256(data).hexdigest()) for name, data in texts.items()]
    digest = hashlib.sha256("".join(f"{n}\0{s}\n" for n, _, s in files).encode()).hexdigest()
    modules: dict[str, list[str]] = {}
    for name in texts:
        modules.setdefault(module_of(name), []).append(name)
    size = {module: sum(len(texts[name]) for name in names) for module, names in modules.items()}
    # Held out: modules in the order of their names' SHA-256, until val_bytes are reached.
    held_out: list[str] = []
    for module in sorted(modules, key=lambda m: hashlib.sha256(m.encode()).hexdigest()):
        if sum(size[m] for m in held_out) >= val_bytes:
            break
        held_out.append(module)
    # The rest: largest module first, to the worker holding the fewest bytes so far.
    dealt: list[list[str]] = [[] for _ in range(workers)]
    for module in sorted(set(modules) - set(held_out), key=lambda m: (-size[m], m)):
        min(dealt, key=lambda held: (sum(size[m] for m in held), dealt.index(held))).append(module)

    def text(selected: list[str]) -> torch.Tensor:
        joined = b"\n".join(texts[name] for m in sorted(selected) for name in modules[m])
        return torch.frombuffer(bytearray(joined), dtype=torch.uint8)

    return Corpus(
        str(root),
        files,
        digest,
        sorted(held_out),
        [sorted(d) for d in dealt],
        text(held_out),
        [text(d) for d in dealt],
    )


class Windows:
    """An endless stream of batches of random windows (``context + 1`` bytes) of one text."""

    def __init__(self, text: torch.Tensor, batch_size: int, context: int, seed: int) -> None:
        if len(text) <= context + 1:
            raise ValueError(f"a worker's text has {len(text)} bytes, too few for --context")
        self.text, self.batch_size, self.context = text, batch_size, context
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[torch.Tensor]:
        offsets = torch.arange(self.context + 1)
        while True:
            starts = torch.randint(
                0, len(self.text) - self.context - 1, (self.batch_size, 1), generator=self.generator
            )
            yield self.text[starts + offsets].long()


class Block(nn.Module):
    """Pre-norm causal self-attention and a GELU MLP, each with a residual connection."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(width, dim=2)
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attended = functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp(self.norm2(x))


class ByteLM(nn.Module):
    """A decoder-only transformer over the 256 byte values, learned positions."""

    def __init__(self, width: int, layers: int, heads: int, context: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, width)
        self.position = nn.Parameter(torch.randn(context, width) * 0.02)
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(layers)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 256, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(tokens) + self.position[: tokens.shape[1]]
        return self.head(self.norm(self.blocks(hidden)))


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats) of a batch of windows."""
    logits = model(batch[:, :-1])
    return functional.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))


@dataclass
class Result:
    method: str
    seed: int
    h: int | None
    exchanges: int
    bytes_sent: int
    curve: list[tuple[int, float]] = field(default_factory=list)
    """``(inner steps per worker, held-out bits per byte)``."""
    seconds: float = 0.0

    @property
    def final(self) -> float:
        return self.curve[-1][1]


class Experiment:
    """One configuration of the comparison (everything but the method and the seed)."""

    def __init__(self, args: argparse.Namespace, corpus: Corpus) -> None:
        self.args = args
        self.corpus = corpus
        self.device = torch.device(args.device)
        count = args.eval_windows
        starts = torch.linspace(0, len(corpus.validation) - args.context - 2, count).long()
        offsets = torch.arange(args.context + 1)
        self.held_out = corpus.validation[starts[:, None] + offsets].long()

    def make_model(self, config: TrainingConfig) -> nn.Module:
        args = self.args
        return ByteLM(args.d_model, args.layers, args.heads, args.context)

    def optimizer(self, model: nn.Module, config: TrainingConfig) -> torch.optim.Optimizer:
        """The inner AdamW (the same for both methods): betas (0.9, 0.95), weight decay 0.1."""
        return torch.optim.AdamW(
            model.parameters(), lr=config.learning_rate, betas=(0.9, 0.95), weight_decay=0.1
        )

    def config(self, seed: int, h: int) -> TrainingConfig:
        args = self.args
        return TrainingConfig(
            model_name="byte-lm",
            learning_rate=args.lr,
            batch_size=args.batch_size,
            local_steps=h,
            global_rounds=args.steps // h,
            num_nodes=args.workers,
            seed=seed,
            outer_learning_rate=args.outer_lr,
            outer_momentum=args.outer_momentum,
        )

    def windows(self, worker: int, seed: int) -> Windows:
        args = self.args
        return Windows(
            self.corpus.workers[worker], args.batch_size, args.context, seed * 1000 + worker
        )

    def bits_per_byte(self, model: nn.Module) -> float:
        model.eval()
        total = 0.0
        with torch.no_grad():
            for chunk in self.held_out.split(64):
                total += float(lm_loss(model, chunk.to(self.device))) * len(chunk)
        model.train()
        return total / len(self.held_out) / math.log(2)

    def due(self, step: int) -> bool:
        return step % self.args.eval_every == 0 or step == self.args.steps

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.make_model(self.config(0, 1)).parameters())

    def run_sync(self, seed: int) -> Result:
        args, started = self.args, time.perf_counter()
        config = self.config(seed, 1)
        model = build_model(self.make_model, config, self.device)
        optimizer = self.optimizer(model, config)
        streams = [iter(self.windows(w, seed)) for w in range(args.workers)]
        exchanged = 2 * self.parameter_count() * BYTES_PER_VALUE * args.workers
        result = Result(method_name(None), seed, None, args.steps, args.steps * exchanged)
        for step in range(1, args.steps + 1):
            optimizer.zero_grad(set_to_none=True)
            for stream in streams:  # the average of the workers' gradients
                (lm_loss(model, next(stream).to(self.device)) / args.workers).backward()
            optimizer.step()
            if self.due(step):
                result.curve.append((step, self.bits_per_byte(model)))
        result.seconds = time.perf_counter() - started
        return result

    def run_diloco(self, seed: int, h: int) -> Result:
        args, started = self.args, time.perf_counter()
        config = self.config(seed, h)
        nodes = [FederatedNode(node_id=f"worker-{w}") for w in range(args.workers)]
        provider = InProcessProvider(
            trainer_factory(
                self.make_model,
                lm_loss,
                lambda node_id, cfg: self.windows(int(node_id.split("-")[1]), seed),
                optimizer=self.optimizer,
                device=self.device,
            ),
            model_init=model_init(self.make_model),
        )
        provider.configure(config)
        coordinator = DiLoCoCoordinator()
        state = coordinator.initialize(config, nodes, provider.initial_parameters(config))
        model = build_model(self.make_model, config, self.device)
        exchanged = 2 * self.parameter_count() * BYTES_PER_VALUE * args.workers
        rounds = config.global_rounds
        result = Result(method_name(h), seed, h, rounds, rounds * exchanged)
        for round_id in range(1, rounds + 1):
            state = coordinator.run_round(state, provider.get_updates(round_id, state, nodes))
            if self.due(round_id * h):
                assert state.parameters is not None
                load_tensormap(model, state.parameters)
                result.curve.append((round_id * h, self.bits_per_byte(model)))
        result.seconds = time.perf_counter() - started
        return result


@dataclass
class Summary:
    method: str
    h: int | None
    final: list[float]
    vs_sync: list[float]
    exchanges: int
    bytes_sent: int
    curve: list[tuple[int, float]]
    seconds: float


def summarize(results: list[Result]) -> list[Summary]:
    sync = {r.seed: r.final for r in results if r.h is None}
    summaries = []
    for method in dict.fromkeys(r.method for r in results):
        runs = [r for r in results if r.method == method]
        steps = [step for step, _ in runs[0].curve]
        curve = [(s, float(np.mean([r.curve[i][1] for r in runs]))) for i, s in enumerate(steps)]
        summaries.append(
            Summary(
                method,
                runs[0].h,
                [r.final for r in runs],
                [r.final / sync[r.seed] - 1 for r in runs if r.seed in sync],
                runs[0].exchanges,
                runs[0].bytes_sent,
                curve,
                sum(r.seconds for r in runs),
            )
        )
    return summaries


def print_table(summaries: list[Summary]) -> None:
    sync_bytes = next((s.bytes_sent for s in summaries if s.h is None), None)
    print(
        "| method | val bits/byte (seed mean) | per seed | vs sync | exchanges | bytes sent "
        "| fewer bytes | time |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for s in summaries:
        gap = f"{np.mean(s.vs_sync):+.1%}" if s.vs_sync else "n/a"
        fewer = f"{sync_bytes / s.bytes_sent:,.0f}x" if sync_bytes else "n/a"
        seeds = ", ".join(f"{v:.4f}" for v in s.final)
        print(
            f"| {s.method} | {np.mean(s.final):.4f} | {seeds} | {gap} | {s.exchanges:,} "
            f"| {s.bytes_sent:,} | {fewer} | {s.seconds:.0f} s |"
        )


def plot(summaries: list[Summary], path: Path) -> None:
    """Held-out bits per byte against inner steps, and the final value against bytes sent."""
    plt = pyplot()
    if plt is None:
        return
    figure, (curves, costs) = plt.subplots(1, 2, figsize=(12, 4.5))
    for s in summaries:
        steps, values = zip(*s.curve, strict=True)
        curves.plot(steps, values, label=s.method, marker="." if len(steps) < 20 else None)
        costs.scatter(s.bytes_sent, np.mean(s.final), label=s.method)
    curves.set(xlabel="inner steps per worker", ylabel="held-out bits per byte (seed mean)")
    costs.set(xscale="log", xlabel="bytes communicated", ylabel="final held-out bits per byte")
    curves.legend()
    costs.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"plot written to {path}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--workers", type=int, default=4, help="k, the number of workers")
    add("--H", type=int, nargs="+", default=[1, 10, 50, 100, 500], help="DiLoCo's inner steps")
    add("--no-sync", action="store_true", help="leave out the synchronous baseline")
    add("--steps", type=int, default=1000, help="inner steps per worker (every method)")
    add("--batch-size", type=int, default=8, help="windows per batch per worker")
    add("--context", type=int, default=128, help="bytes of context")
    add("--d-model", type=int, default=64)
    add("--layers", type=int, default=3)
    add("--heads", type=int, default=4)
    add("--lr", type=float, default=3e-3, help="inner AdamW learning rate (both methods)")
    add("--outer-lr", type=float, default=0.7)
    add("--outer-momentum", type=float, default=0.9)
    add("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    add("--val-bytes", type=int, default=2_000_000, help="held-out bytes (whole modules)")
    add("--max-corpus-bytes", type=int, help="read no more files than this (tiny runs)")
    add("--corpus-root", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    add("--eval-every", type=int, default=100, help="inner steps between evaluations")
    add("--eval-windows", type=int, default=512, help="held-out windows evaluated")
    add("--device", default="cpu", help="cpu, cuda, ...")
    add("--threads", type=int, default=1, help="torch.set_num_threads (0: torch's default)")
    add("--processes", type=int, default=2, help="runs in parallel, each in its own process")
    add("--manifest", type=Path, help="write the corpus file list (path, bytes, sha256) here")
    add("--json", type=Path, help="write every run's results here")
    add("--plot", default="lm_diloco.png", help="the plot's path, or none [lm_diloco.png]")
    args = parser.parse_args()
    if args.processes < 1:
        parser.error(f"--processes must be at least 1 (got {args.processes})")
    for h in args.H:
        if h < 1 or args.steps % h:
            parser.error(f"--steps {args.steps} must be a multiple of every H (got H={h})")
    return args


_experiment: Experiment | None = None
"""The experiment of this process, which :func:`run_job` runs."""


def start_process(args: argparse.Namespace, corpus: Corpus | None = None) -> Experiment:
    """Set up this process for :func:`run_job`: torch's threads, and the experiment (on
    ``corpus``, read here when not given)."""
    global _experiment
    if args.threads:  # one thread is much faster than two that share the cores with others
        torch.set_num_threads(args.threads)
    if corpus is None:
        corpus = read_corpus(args.corpus_root, args.workers, args.val_bytes, args.max_corpus_bytes)
    _experiment = Experiment(args, corpus)
    return _experiment


def start_worker(args: argparse.Namespace, parent: int) -> None:
    """Set up a worker process of :func:`run_jobs`: Ctrl-C is the main process's to handle,
    and the worker ends as soon as the main process does, however it ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=end_with_parent, args=(parent,), daemon=True).start()
    start_process(args)


def end_with_parent(parent: int) -> None:
    """End this process once ``parent`` is no longer its parent (it ended)."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def run_job(job: tuple[int, int | None]) -> Result:
    """One run: ``(seed, H)``, ``H`` None for the synchronous baseline."""
    seed, h = job
    assert _experiment is not None, "start_process first"
    return _experiment.run_sync(seed) if h is None else _experiment.run_diloco(seed, h)


def run_jobs(args: argparse.Namespace, jobs: list[tuple[int, int | None]]) -> Iterable[Result]:
    """The results of ``jobs`` in order: here, or ``--processes`` at a time in fresh
    processes (spawned, not forked, as torch wants)."""
    if args.processes == 1:
        yield from map(run_job, jobs)
        return
    context = get_context("spawn")
    pool = ProcessPoolExecutor(
        args.processes, mp_context=context, initializer=start_worker, initargs=(args, os.getpid())
    )
    try:
        for future in [pool.submit(run_job, job) for job in jobs]:
            # Waited for in short slices: a signal (Ctrl-C, SIGTERM) is handled between them,
            # where a wait without a timeout would hold it until the run ends.
            while True:
                try:
                    yield future.result(timeout=0.5)
                    break
                except TimeoutError:
                    continue
    except BaseException:
        # Not waiting for the runs under way: their processes are ended now (Python 3.14 has
        # terminate_workers() for this).
        workers = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for worker in workers:
            worker.terminate()
        raise
    pool.shutdown()


def method_name(h: int | None) -> str:
    """The method of ``H`` (None: the synchronous baseline), as the table names it."""
    return "synchronous" if h is None else f"DiLoCo H={h}"


def stop(signum: int, frame: object) -> None:
    """SIGTERM: end as Ctrl-C does."""
    raise SystemExit(128 + signum)


def main() -> None:
    args = parse_args()
    corpus = read_corpus(args.corpus_root, args.workers, args.val_bytes, args.max_corpus_bytes)
    experiment = start_process(args, corpus)
    total = sum(size for _, size, _ in corpus.files)
    print(f"corpus: {len(corpus.files)} files, {total:,} bytes under {corpus.root}")
    print(f"corpus digest (sha256 of 'path NUL sha256' lines): {corpus.digest}")
    print(
        f"held out: {len(corpus.validation):,} bytes, modules {', '.join(corpus.validation_modules)}"
    )
    for w, modules in enumerate(corpus.worker_modules):
        print(
            f"worker {w}: {len(corpus.workers[w]):,} bytes, {len(modules)} modules "
            f"({', '.join(modules[:6])}{', ...' if len(modules) > 6 else ''})"
        )
    print(
        f"model: {experiment.parameter_count():,} parameters; {args.workers} workers x "
        f"{args.steps} steps x {args.batch_size} windows x {args.context} bytes"
    )
    if args.manifest:
        args.manifest.write_text("".join(f"{n}\t{b}\t{s}\n" for n, b, s in corpus.files))
    methods: list[int | None] = [] if args.no_sync else [None]
    jobs = [(seed, h) for seed in args.seeds for h in [*methods, *args.H]]
    started = time.perf_counter()
    results: list[Result] = []
    signal.signal(signal.SIGTERM, stop)
    try:
        for result in run_jobs(args, jobs):
            results.append(result)
            print(
                f"seed {result.seed} {result.method}: {result.final:.4f} bits/byte "
                f"({result.seconds:.0f} s)",
                flush=True,
            )
    except (KeyboardInterrupt, SystemExit) as exc:
        code = exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) else 130
        print(f"interrupted after {len(results)} of {len(jobs)} runs", file=sys.stderr)
        sys.exit(code)
    except Exception as exc:  # one line, not a worker's traceback
        seed, h = jobs[len(results)]
        hint = ""
        if isinstance(exc, BrokenProcessPool):
            hint = " (a worker process died: out of memory? try --processes 1)"
        print(
            f"error: the run of seed {seed}, {method_name(h)} failed: "
            f"{type(exc).__name__}: {exc}{hint}",
            file=sys.stderr,
        )
        sys.exit(1)
    summaries = summarize(results)
    print_table(summaries)
    minutes = (time.perf_counter() - started) / 60
    print(f"{len(jobs)} runs in {minutes:.1f} minutes with {args.processes} process(es)")
    if args.json:
        payload = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "digest": corpus.digest,
            "results": [asdict(r) for r in results],
        }
        args.json.write_text(json.dumps(payload, indent=1))
        print(f"results written to {args.json}")
    if args.plot != "none":
        plot(summaries, Path(args.plot))


if __name__ == "__main__":
    main()
