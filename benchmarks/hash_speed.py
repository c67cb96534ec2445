"""How long exact fingerprints cost: sha256 throughput on this machine, cold and from the digest cache.

    python benchmarks/hash_speed.py [--gb 1.0] [--dir /tmp]

Writes a temp file of the given size, hashes it through hallu.digests.file_digest (a full hash the
first time, then a cache lookup), and prints MB/s and the time extrapolated to a 14 GB checkpoint.
"Cold" here means not in the digest cache; the file itself is likely in the OS page cache right
after writing, so the figure is the hashing speed, not the disk's (a first read from disk is bounded
by whichever is slower).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

CHECKPOINT_GB = 14


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.0, help="size of the temp file in GB (1e9 bytes)")
    ap.add_argument("--dir", default=None, help="folder for the temp file and the cache (default: system temp)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        os.environ["HALLU_CACHE_DIR"] = os.path.join(d, "cache")
        from hallu import digests

        size = int(args.gb * 1e9)
        path = os.path.join(d, "weights.bin")
        block = os.urandom(1 << 24)
        with open(path, "wb") as f:
            left = size
            while left > 0:
                f.write(block[: min(left, len(block))])
                left -= len(block)
        time.sleep(digests.RACY_WINDOW_NS / 1e9 + 0.05)  # let the file age past the racy window

        t = time.perf_counter()
        cold = digests.file_digest(path)
        cold_s = time.perf_counter() - t
        digests._MEMO.clear()  # what a second process sees: only the disk cache
        t = time.perf_counter()
        warm = digests.file_digest(path)
        warm_s = time.perf_counter() - t
        assert warm == cold

        mb_s = size / 1e6 / cold_s
        print(f"file: {size / 1e9:.2f} GB")
        print(f"cold (full sha256): {cold_s:.2f} s = {mb_s:.0f} MB/s -> a {CHECKPOINT_GB} GB checkpoint: "
              f"{CHECKPOINT_GB * 1e3 / mb_s:.0f} s")
        print(f"cached (digest cache hit, new process): {warm_s * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
