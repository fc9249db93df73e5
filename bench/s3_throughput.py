"""generate pairs/s into an S3 bucket ÷ into local files, same settings (issue 15):

    python bench/s3_throughput.py                        # moto's S3 server on loopback, started here
    python bench/s3_throughput.py --teacher digits
    python bench/s3_throughput.py --steps 2 --pairs-per-shard 200000 --shards 8    # I/O-bound: 4.8 MB shards
    AWS_ENDPOINT_URL=http://minio:9000 python bench/s3_throughput.py --bucket mybucket   # an existing store

Each shard goes local temp file → one upload → size and sha256 read back → manifest PUT, by the Ray worker that
made it (stages/README.md). Runs alternate local / s3 `--repeats` times (the machine may be shared: the best of
each is compared). Reported: the whole run's wall rate, and the rate over the per-shard seconds of generate.jsonl
(sampling + writing + upload, without Ray's start-up), both as s3 ÷ local.

Feeds docs/BENCHMARKS.md, section "generate into object storage ÷ local files".
"""

import argparse
import os
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from infra import moto_server  # noqa: E402

from bench.generate_throughput import SIZES, config, pipeline  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", choices=sorted(SIZES), default="checkerboard")
    ap.add_argument("--shards", type=int, help="override the number of shards")
    ap.add_argument("--pairs-per-shard", type=int, help="override the pairs per shard")
    ap.add_argument("--steps", type=int, help="override the Heun steps (few steps: writing and uploading dominate)")
    ap.add_argument("--bucket", help="an existing bucket (default: moto's server, started here, and a new bucket)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    server = None
    if not args.bucket:
        server, env = moto_server()
        os.environ.update(env)
    import s3fs
    bucket = args.bucket or f"bench-{uuid.uuid4().hex[:8]}"
    if server:
        s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
    import tempfile
    root = Path(tempfile.mkdtemp())
    try:
        cfg = config(args.teacher, root)
        cfg = cfg.model_copy(update={k: v for k, v in (("shards", args.shards),
                                                       ("pairs_per_shard", args.pairs_per_shard)) if v})
        if args.steps:
            cfg = cfg.model_copy(update={"sampler": cfg.sampler.model_copy(update={"steps": args.steps})})
        print(f"load average {os.getloadavg()[0]:.2f}; teacher {args.teacher}: {cfg.shards} shards × "
              f"{cfg.pairs_per_shard} pairs, batch {cfg.batch}, Heun {cfg.sampler.steps} steps; defaults layout; "
              f"S3 at {os.environ.get('AWS_ENDPOINT_URL', 'the default endpoint')}")
        best = {"local": (0.0, 0.0), "s3": (0.0, 0.0)}
        for r in range(args.repeats):
            for where, out in (("local", None), ("s3", f"s3://{bucket}/bench-{uuid.uuid4().hex[:8]}")):
                rate, wall, start, _, _ = pipeline(cfg, out=out)
                print(f"  {where:5s} run {r + 1}: {rate:10,.1f} pairs/s over the shards' seconds, {wall:10,.1f} "
                      f"pairs/s wall (start-up {start:.1f} s)")
                best[where] = max(best[where][0], rate), max(best[where][1], wall)
        (lr, lw), (sr, sw) = best["local"], best["s3"]
        print(f"s3 ÷ local (best of {args.repeats}): {sr / lr:.2f} over the shards' seconds, {sw / lw:.2f} wall; "
              f"load average now {os.getloadavg()[0]:.2f}")
    finally:
        import shutil
        shutil.rmtree(root)
        if server:
            server.terminate()
