#!/usr/bin/env python3
"""Where one request's time goes inside ankisync, stage by stage.

    python bench/stages.py                     # 3,000 `meta` requests
    python bench/stages.py --method upload     # 400 `uploadChanges` of 25 files of 2 KB
    python bench/stages.py --method sanity --requests 5000

An ankisync server runs in this process on loopback, and a client sends the requests
one after another on one kept-alive connection. Each stage (a method of ankisync's) is
wrapped in a timer; the table gives the mean time per call and the calls per request.
Stages nest: `Handler.serve` holds `SyncApp.dispatch`, which holds the method. The
client shares the process, so every number is inflated a little by its turns at the
GIL; compare stages with each other, and the servers with bench.py.
Needs `zstandard` (a test requirement).
"""

import argparse
import collections
import io
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import ankisync  # noqa: E402
import zstandard  # noqa: E402

STAGES = [
    (ankisync.Server, "finish_request"), (ankisync.Handler, "setup"),
    (ankisync.Handler, "serve"), (ankisync.Handler, "finish"),
    (ankisync.Connection, "advance"), (ankisync.RequestHead, "__init__"),
    (ankisync.Envelopes, "decode"), (ankisync.Accounts, "authenticate"),
    (ankisync.SyncApp, "dispatch"), (ankisync.UserLock, "__enter__"),
    (ankisync.UserLock, "__exit__"), (ankisync.CollectionSync, "meta"),
    (ankisync.Collection, "open"), (ankisync.MediaStore, "last_usn"),
    (ankisync.MediaSync, "mediaSanity"), (ankisync.MediaSync, "uploadChanges"),
    (ankisync.MediaSync, "_unpack_upload"), (ankisync.MediaStore, "apply"),
    (ankisync.Handler, "send_reply"), (ankisync.Metrics, "request"),
]


class Timers:
    def __init__(self):
        self.seconds = collections.Counter()
        self.calls = collections.Counter()

    def wrap(self, owner, name, label=None):
        inner = getattr(owner, name)
        label = label or "%s.%s" % (owner.__name__, name)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - started
                self.calls[label] += 1

        setattr(owner, name, timed)

    def clear(self):
        self.seconds.clear()
        self.calls.clear()


def media_zip(tag):
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        meta = []
        for i in range(25):
            archive.writestr(str(i), os.urandom(2048))
            meta.append(["%s_%02d.jpg" % (tag, i), str(i)])
        archive.writestr("_meta", json.dumps(meta))
    return out.getvalue()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=("meta", "sanity", "upload"), default="meta")
    parser.add_argument("--requests", type=int, default=None,
                        help="default 3,000 (upload: 400)")
    args = parser.parse_args(argv)
    count = args.requests or (400 if args.method == "upload" else 3000)
    # The server's log format, written nowhere: its cost is one of the stages.
    logging.basicConfig(level=logging.INFO, stream=open(os.devnull, "w"),
                        format="%(asctime)s %(levelname)s %(message)s")
    logging._srcfile = None
    root = tempfile.mkdtemp(prefix="ankisync-stages-")
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    config = ankisync.Config()
    config.data, config.host, config.port = os.path.join(root, "data"), "127.0.0.1", port
    app = ankisync.SyncApp(config)
    app.users.add("bench", "bench")
    timers = Timers()
    for owner, name in STAGES:
        timers.wrap(owner, name)
    timers.wrap(ankisync.log, "info", "log.info")
    server = ankisync.Server((config.host, config.port), app, None)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    compressor, decompressor = zstandard.ZstdCompressor(), zstandard.ZstdDecompressor()
    import http.client
    conn = http.client.HTTPConnection(config.host, config.port)

    def call(method, body, key="", area="sync"):
        header = json.dumps({"v": 11, "k": key, "c": "anki,26.9.3 (stages),lin", "s": "s"})
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn.request("POST", "/%s/%s" % (area, method), body=compressor.compress(data),
                     headers={"anki-sync": header})
        answer = conn.getresponse()
        data = answer.read()
        if answer.status != 200:
            raise RuntimeError("%s: HTTP %d %r" % (method, answer.status, data[:200]))
        return decompressor.decompressobj().decompress(data)

    try:
        key = json.loads(call("hostKey", {"u": "bench", "p": "bench"}))["key"]
        if args.method == "meta":
            requests = [("meta", {"v": 11, "cv": "anki,26.9.3"}, "sync")] * count
        elif args.method == "sanity":
            requests = [("mediaSanity", {"local": 0}, "msync")] * count
        else:
            requests = [("uploadChanges", media_zip("f%05d" % i), "msync")
                        for i in range(count)]
        for method, body, area in requests[:min(200, count // 10)]:   # warm up
            call(method, body if method != "uploadChanges" else media_zip("w"), key, area)
        timers.clear()
        started = time.perf_counter()
        for method, body, area in requests:
            call(method, body, key, area)
        elapsed = time.perf_counter() - started
        print("%d %s requests: %.1f us each, client included" % (count, args.method,
                                                                 elapsed / count * 1e6))
        print("%-34s %12s %10s" % ("stage", "us per call", "per request"))
        for label, seconds in sorted(timers.seconds.items(), key=lambda kv: -kv[1]):
            print("%-34s %12.1f %10.2f" % (label, seconds / timers.calls[label] * 1e6,
                                           timers.calls[label] / count))
    finally:
        conn.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
