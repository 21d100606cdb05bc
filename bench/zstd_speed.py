#!/usr/bin/env python3
"""Decode speed of each of ankisync's zstd backends on a real collection upload.

    python bench/zstd_speed.py            # a ~30 MB collection (built once, cached)
    python bench/zstd_speed.py --mb 10

The collection is made by the real Anki client library (notes with review history),
closed for a full sync as a modern client does, then compressed the way the client
streams its upload (zstd level 3, one frame, no declared size). Each backend available
on this machine decodes it through the same streaming call the server uses; the
output is checked and the speed printed in MB/s of decoded output.
"""

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import ankisync  # noqa: E402
from bench import Builder  # noqa: E402

NOTES_PER_MB = 1800        # a Basic note with history takes ~560 bytes in the file


def upload_body(path):
    """The bytes a modern client sends for a full upload of `path`."""
    compressor = ankisync.choose_zstd("libzstd")
    parts = []
    with open(path, "rb") as f:
        compressor.compress_stream(f.read, parts.append)
    return b"".join(parts)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=30, help="collection size (default 30)")
    parser.add_argument("--cache",
                        default=os.path.join(tempfile.gettempdir(), "ankisync-bench-cache"))
    args = parser.parse_args()
    path = Builder(args.cache).get(int(args.mb * NOTES_PER_MB))
    size = os.path.getsize(path)
    body = upload_body(path)
    with open(path, "rb") as f:
        original = f.read()
    print("collection %.1f MB (%s), upload body %.1f MB" % (size / 1e6, path, len(body) / 1e6))
    for name in ankisync.ZSTD_BACKENDS:
        try:
            backend = ankisync.choose_zstd(name)
        except ankisync.ZstdError as e:
            print("%-8s unavailable: %s" % (name, e))
            continue
        parts = []
        started = time.perf_counter()
        reader = memoryview(body)
        position = [0]

        def read(n):
            chunk = reader[position[0]:position[0] + n]
            position[0] += len(chunk)
            return bytes(chunk)
        backend.decompress_stream(read, parts.append, size + 1)
        seconds = time.perf_counter() - started
        assert b"".join(parts) == original, name
        print("%-8s %8.1f MB/s  (%.2f s)" % (name, size / seconds / 1e6, seconds))


if __name__ == "__main__":
    main()
