"""Read + decode throughput of shards through ssl_ebm.data, per CPU core.

    python -m shards.bench --shards /tmp/cifar10 --source ../shared/data/cifar10_jpeg

builds CIFAR-10 shards from cifar10_jpeg_q75.npz first if --shards has no manifest, then times, in this
one process (no workers, one torch thread): one evaluation pass over --split, and --steps training
batches of --batch unlabelled + --batch-labelled labelled examples. Samples/s per core is examples
divided by the process's CPU time, so other load on the machine does not count against it.
"""

from __future__ import annotations

import argparse
import time

import torch

from ssl_ebm.data import eval_batches, read_manifest, train_batches


def _timed(batches, count) -> tuple[int, float, float]:
    wall, cpu, n = time.perf_counter(), time.process_time(), 0
    for batch in batches:
        n += count(batch)
    return n, time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m shards.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", required=True, help="shard directory URL")
    p.add_argument("--source", default="", help="cifar10_jpeg_q75.npz (or its folder), to build missing shards")
    p.add_argument("--split", default="unlabelled")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--batch-labelled", type=int, default=64)
    p.add_argument("--steps", type=int, default=100)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    try:
        manifest = read_manifest(a.shards)
    except ValueError:
        if not a.source:
            raise
        from shards.make import build

        t = time.perf_counter()
        manifest = build("cifar10_jpeg", a.shards, a.source)
        print(f"built {a.shards} in {time.perf_counter() - t:.1f} s")
    print(f"{manifest['dataset']}: {manifest['kind']} {manifest['x_shape']} stored as .{manifest['x_field']}")

    n, wall, cpu = _timed(eval_batches(a.shards, a.split, batch_size=a.batch), lambda b: len(b["idx"]))
    print(f"eval pass over {a.split!r}: {n} examples in {wall:.2f} s wall, {cpu:.2f} s CPU -> "
          f"{n / cpu:,.0f} samples/s per core ({n / wall:,.0f}/s wall)")

    stream = train_batches(a.shards, batch_unlabelled=a.batch, batch_labelled=a.batch_labelled, seed=0)
    next(stream)  # the labelled set is loaded into memory once, before the first batch
    steps = (next(stream) for _ in range(a.steps))
    n, wall, cpu = _timed(steps, lambda b: len(b["x_u"]) + len(b["x_l"]))
    print(f"train stream: {a.steps} batches of {a.batch} + {a.batch_labelled}, {n} examples in {wall:.2f} s wall, "
          f"{cpu:.2f} s CPU -> {n / cpu:,.0f} samples/s per core ({n / wall:,.0f}/s wall)")


if __name__ == "__main__":
    main()
