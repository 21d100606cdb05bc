#!/usr/bin/env python3
"""Hostile clients against ankisync and the official Anki sync server, side by side.

    .venv/bin/python bench/hostile.py                  # full run (2-7 min)
    .venv/bin/python bench/hostile.py --quick          # shorter holds and caps (1-2.5 min)
    .venv/bin/python bench/hostile.py --only idle-260,zstd-bomb

Each row runs against each server in turn: a fresh server process with a fresh data
folder (the server creates it, under umask 022), and a real modern Anki 26.9.3 device
(the `anki` wheel) that has logged in and fully uploaded a small 50-note collection
before the attack starts. While the attack is held, the device adds a note and does a
normal sync (capped: after the cap the sync is aborted and counted as failed), and
GET /health on a fresh connection is timed (5 s timeout; any HTTP answer counts as
alive). Each device sync starts on a fresh connection (the client is reopened, so its
kept-alive connection from the upload is gone). Every wait is capped: the longer run
times are for a server that stops answering. --quick caps a sync at 10 s instead of 30,
waits 20 s instead of 120 in idle-1000, guesses for 8 s instead of 30 and syncs for 5 s
instead of 15 after the burst. Rows (`--only` names):

  idle-260          260 TCP connections that connect and send nothing
  idle-1000         1,000 such connections, opened once; time until the device's first
                    successful sync, retrying with short timeouts
  slow-headers-300  300 connections sending a request's headers one byte every 5 s
  slow-body-300     300 `POST /sync/upload` with complete multipart headers and
                    Content-Length: 10000000, then one body byte every 5 s
  no-body-300       the same headers, and never a body byte
  zstd-bomb         a v11 upload with a wrong host key whose body is ~9 KB of zstd that
                    inflates to 290 MiB of zeros: status, bytes written under the data
                    folder (peak while it runs, sampled every 50 ms, and left after),
                    peak RSS; then 4 of them at once
  guessers-16       16 threads posting wrong passwords for the device's user (hostKey)
                    from 127.0.0.2: passwords checked (403) and throttled per second,
                    the device's sync (with its host key) and a right-password login
                    from 127.0.0.1 during it
  burst-256         256 concurrent connections doing meta + /health + meta with a valid
                    host key: server RSS before, right after, and after some seconds
                    of ordinary syncs
  file-modes        after an upload and a sync: entries under the data folder that group
                    or other may read or write (mode & 0o077)

Everything talks to 127.0.0.1 (the guessers from 127.0.0.2), every count and time is
bounded, and every socket and server is closed/killed at the end, also on Ctrl-C.
Progress goes to stderr; the Markdown table (for README, "Security") to stdout.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import contextlib
import datetime
import http.client
import json
import os
import platform
import resource
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import bench  # noqa: E402  (bench/bench.py: servers, devices, collections, raw v11 calls)

try:
    import zstandard
except ImportError:  # pragma: no cover
    raise SystemExit("hostile.py needs the test requirements (zstandard) in %s" % sys.executable)

KINDS = bench.KINDS
USER, PASSWORD = bench.USERS[0]
CLIENT = "anki,26.9.3 (hostile),lin"
MIB = 1024 * 1024
BOMB_MIB = 290
BOMB_HEADER = {"v": 11, "k": "wrongkey", "c": "x", "s": "s"}
GUESS_HEADER = {"v": 11, "k": "", "c": CLIENT, "s": ""}
GUESSER_ADDRESS = "127.0.0.2"
HEALTH_TIMEOUT = 5.0
TRICKLE_EVERY = 5.0
SETUP_CAP = 60          # login + full upload before an attack
ABORT_GRACE = 10        # seconds an aborted sync gets to return

TIMES = {
    # sync_cap: one device sync; first_cap/try_cap: idle-1000's wait and each try;
    # guess: guessers-16's length; traffic: burst-256's ordinary syncs afterwards;
    # watchdog: the whole run.
    "full": dict(sync_cap=30, first_cap=120, try_cap=10, guess=30, traffic=15,
                 settle=1.0, watchdog=1500),
    "quick": dict(sync_cap=10, first_cap=20, try_cap=5, guess=8, traffic=5,
                  settle=0.5, watchdog=600),
}

LIVE_SERVERS = []


def log(msg):
    print("[%s] %s" % (time.strftime("%H:%M:%S"), msg), file=sys.stderr, flush=True)


def human_bytes(n):
    if abs(n) >= 1e9:
        return "%.1f GB" % (n / 1e9)
    for unit, size in (("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return "%.0f %s" % (n / size, unit)
    return "%d B" % n


def seconds(secs):
    return "%.2f s" % secs if secs < 10 else "%.0f s" % secs


def short(exc):
    text = str(exc).strip().splitlines()
    return "%s: %s" % (type(exc).__name__, text[0][:100] if text else "")


# --------------------------------------------------------------------------------------
# Threads with a deadline
# --------------------------------------------------------------------------------------

class Capped(Exception):
    """No answer within the cap."""


def capped(fn, cap, abort=None):
    """fn() on a thread; its result, or Capped after `cap` seconds (abort() is called,
    and the thread gets ABORT_GRACE more seconds; Capped.hung says it did not return)."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:      # handed to the caller
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(cap)
    if thread.is_alive():
        if abort:
            abort()
        thread.join(ABORT_GRACE)
        err = Capped("no answer in %.0f s" % cap)
        err.hung = thread.is_alive()
        raise err
    if "error" in box:
        raise box["error"]
    return box["value"]


def parallel(count, fn, timeout):
    """fn(i) on `count` threads at once; their results (or exceptions, or None if a
    thread was still running after `timeout` seconds)."""
    results = [None] * count

    def run(i):
        try:
            results[i] = fn(i)
        except Exception as e:
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return results


# --------------------------------------------------------------------------------------
# HTTP probes
# --------------------------------------------------------------------------------------

def connect(port, source=None, timeout=10.0):
    return http.client.HTTPConnection("127.0.0.1", port, timeout=timeout,
                                      source_address=(source, 0) if source else None)


def http_call(conn, method, path, body=None, headers=None):
    """(status, seconds) of one request on `conn`; status is the error's name when
    there was no HTTP answer ("timeout", "ConnectionResetError"), seconds then None.
    The connection is closed after an error (http.client reopens it on next use)."""
    t0 = time.perf_counter()
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        resp.read()
        return resp.status, time.perf_counter() - t0
    except socket.timeout:
        conn.close()
        return "timeout", None
    except (OSError, http.client.HTTPException) as e:
        conn.close()
        return type(e).__name__, None


def v11_post(conn, method, body, header):
    return http_call(conn, "POST", "/sync/" + method, body,
                     {"anki-sync": json.dumps(header, separators=(",", ":")),
                      "Content-Type": "application/octet-stream"})


def health(port):
    with contextlib.closing(connect(port, timeout=HEALTH_TIMEOUT)) as conn:
        return http_call(conn, "GET", "/health")


def health_text(port):
    status, secs = health(port)
    if secs is None:
        return "/health: %s" % ("no answer in %.0f s" % HEALTH_TIMEOUT
                                if status == "timeout" else status)
    return "/health %s%.0f ms" % ("" if status == 200 else "%s in " % status, secs * 1000)


class HealthCheck(threading.Thread):
    """health_text() on a thread of its own, started at once."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.port, self.result = port, "/health: no answer"
        self.start()

    def run(self):
        self.result = health_text(self.port)

    def text(self):
        self.join(2 * HEALTH_TIMEOUT + 1)
        return self.result


_LOCAL = threading.local()


def compress(data):
    """zstd with this thread's own compressor: zstandard's objects are not thread-safe
    (bench.ZSTD is one shared object, for the main thread only)."""
    if not hasattr(_LOCAL, "zstd"):
        _LOCAL.zstd = zstandard.ZstdCompressor()
    return _LOCAL.zstd.compress(data)


def tally_text(statuses):
    counts = collections.Counter("no answer" if s is None else
                                 s if isinstance(s, (int, str)) else type(s).__name__
                                 for s in statuses)
    common = counts.most_common()
    text = ", ".join("%s" % k if n == 1 else "%s×%d" % (k, n) for k, n in common[:3])
    return text + (", …" if len(common) > 3 else "")


# --------------------------------------------------------------------------------------
# Servers and the device
# --------------------------------------------------------------------------------------

class HostileServer(bench.Server):
    """bench's server with the default payload limit (the zstd bomb is measured against
    it) and no data folder made for it: the server creates its own (file-modes)."""

    extra_env = {}

    def __init__(self, kind, root):
        super().__init__(kind, root)
        os.rmdir(self.base)

    def start(self):
        super().start()
        LIVE_SERVERS.append(self)


def kill_live_servers():
    for srv in LIVE_SERVERS:
        srv.kill()
    del LIVE_SERVERS[:]


class Phone:
    """A modern Anki device: logged in as USER, small collection fully uploaded."""

    def __init__(self, srv, folder, src):
        self.folder = folder
        self.dev = bench.Device(folder, src)
        self.hung = self.aborted = False
        self.added = 0
        self.auth = self._capped(lambda: self.dev.col.sync_login(USER, PASSWORD, srv.url),
                                 SETUP_CAP)
        self._capped(lambda: self.dev.full(self.auth, True), SETUP_CAP)

    def _capped(self, fn, cap):
        self.check()
        self.aborted = False
        try:
            return capped(fn, cap, self.dev.col.abort_sync)
        except Capped as e:
            self.aborted, self.hung = True, e.hung
            raise

    def check(self):
        if self.hung:
            raise RuntimeError("the device is still stuck in an earlier sync")

    def reopen(self):
        """Close and reopen the collection: the client's kept-alive connection from the
        last sync closes, so the next sync connects afresh, as after a pause. (Not
        after an aborted sync: its connection is gone with it, and closing the client
        so soon makes its runtime panic in a background thread.)"""
        self.check()
        if self.aborted:
            return
        self.close()
        self.dev = bench.Device(self.folder)

    def sync(self, cap, add=True):
        """Add a note (unless add=False) and do a normal sync on a fresh connection;
        its seconds."""
        self.reopen()
        if add:
            self.added += 1
            bench.add_and_edit(self.dev.col, 1, 0, "hostile%d" % self.added)
        secs, outcome = self._capped(lambda: self.dev.sync(self.auth), cap)
        if outcome != "normal_sync":
            raise RuntimeError("sync ended with %s instead of a normal sync" % outcome)
        return secs

    def sync_text(self, cap):
        try:
            return "sync " + seconds(self.sync(cap))
        except Capped as e:
            return "sync: %s%s" % (e, " (client stuck even after abort)" if e.hung else "")
        except Exception as e:
            return "sync failed (%s)" % short(e)

    def close(self):
        if not self.hung:       # a stuck backend call would block close() forever
            self.dev.close()


class Ctx:
    """What a row works with: one server, its device, the run's times."""

    def __init__(self, srv, phone, times):
        self.srv, self.phone, self.t = srv, phone, times
        self.port = srv.port

    def probe(self):
        """The device's sync and, at the same time, /health: one cell fragment."""
        check = HealthCheck(self.port)
        return "%s; %s" % (self.phone.sync_text(self.t["sync_cap"]), check.text())


# --------------------------------------------------------------------------------------
# Raw connections
# --------------------------------------------------------------------------------------

def open_connections(port, count, first=b"", deadline=20.0):
    """Up to `count` TCP connections (fewer if the server does not accept them within
    `deadline` seconds, or refuses 50), each sent `first`; non-blocking afterwards."""
    socks, failures = [], 0
    end = time.monotonic() + deadline
    try:
        while len(socks) < count and time.monotonic() < end and failures < 50:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.settimeout(max(0.1, min(3.0, end - time.monotonic())))
                s.connect(("127.0.0.1", port))
                if first:
                    s.sendall(first)
                s.setblocking(False)
            except OSError:
                s.close()
                failures += 1
                continue
            socks.append(s)
    except BaseException:
        close_all(socks)
        raise
    return socks


def close_all(socks):
    for s in socks:
        with contextlib.suppress(OSError):
            s.close()


def fates(socks):
    """What the server did to each connection so far: "closed", "reset", "answered 503"
    (an error page: its status code), or nothing ("open")."""
    seen = collections.Counter()
    for s in socks:
        try:
            head = s.recv(16, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            seen["open"] += 1
        except OSError:
            seen["reset"] += 1
        else:
            words = head.split()
            seen["answered %s" % words[1].decode("latin-1") if len(words) > 1 else
                 "answered" if head else "closed"] += 1
    return seen


def attack_text(socks, wanted):
    """'; only 900 of 1000 connected; the server closed 134 and answered 503 to 10'."""
    text = "" if len(socks) >= wanted else "; only %d of %d connected" % (len(socks), wanted)
    seen = fates(socks)
    seen.pop("open", None)
    if seen:
        text += "; of %d, the server %s" % (len(socks), ", ".join(
            ("%s to %d" if fate.startswith("answered") else "%s %d") % (fate, n)
            for fate, n in seen.most_common()))
    return text


class Trickle(threading.Thread):
    """One thread feeding every socket the next byte of `text` every TRICKLE_EVERY s."""

    def __init__(self, socks, text):
        super().__init__(daemon=True)
        self.socks, self.text, self.pos = socks, text, 0
        self.stop = threading.Event()

    def run(self):
        while self.pos < len(self.text) and not self.stop.is_set():
            byte = self.text[self.pos:self.pos + 1]
            self.pos += 1
            for s in self.socks:
                with contextlib.suppress(OSError):
                    s.send(byte)
            self.stop.wait(TRICKLE_EVERY)


@contextlib.contextmanager
def holding(socks, trickle=b""):
    feeder = Trickle(socks, trickle) if trickle else None
    if feeder:
        feeder.start()
    try:
        yield socks
    finally:
        if feeder:
            feeder.stop.set()
            feeder.join(2)
        close_all(socks)


def held_row(ctx, count, first=b"", trickle=b""):
    """Hold `count` connections (sent `first`, then fed `trickle`), then probe."""
    socks = open_connections(ctx.port, count, first)
    with holding(socks, trickle):
        time.sleep(ctx.t["settle"])
        return ctx.probe() + attack_text(socks, count)


def upload_headers(port):
    return ("POST /sync/upload HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
            "Content-Type: multipart/form-data; boundary=BB\r\n"
            "Content-Length: 10000000\r\n\r\n" % port).encode()


SLOW_HEADERS = (b"POST /sync/meta HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200)
SLOW_BODY = (b'--BB\r\nContent-Disposition: form-data; name="data"; filename="data"\r\n'
             b"Content-Type: application/octet-stream\r\n\r\n" + b"\0" * 200)


# --------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------

def row_idle_260(ctx):
    return held_row(ctx, 260)


def row_idle_1000(ctx):
    socks = open_connections(ctx.port, 1000)
    with holding(socks):
        t0 = time.monotonic()
        check = HealthCheck(ctx.port)
        result, tries = None, 0
        while result is None and time.monotonic() - t0 < ctx.t["first_cap"]:
            left = ctx.t["first_cap"] - (time.monotonic() - t0)
            tries += 1
            try:
                ctx.phone.sync(max(1.0, min(ctx.t["try_cap"], left)), add=tries == 1)
                result = time.monotonic() - t0
            except Capped:
                if ctx.phone.hung:
                    break
            except Exception as e:
                log("    try %d: %s" % (tries, short(e)))
                time.sleep(1)
        attack = attack_text(socks, 1000)
    tries_text = "%d tr%s" % (tries, "y" if tries == 1 else "ies")
    if result is None:
        cell = "no sync within %.0f s (%s)" % (ctx.t["first_cap"], tries_text)
    else:
        cell = "first sync after %s (%s)" % (seconds(result), tries_text)
    return cell + "; " + check.text() + attack


def row_slow_headers(ctx):
    return held_row(ctx, 300, trickle=SLOW_HEADERS)


def row_slow_body(ctx):
    return held_row(ctx, 300, first=upload_headers(ctx.port), trickle=SLOW_BODY)


def row_no_body(ctx):
    return held_row(ctx, 300, first=upload_headers(ctx.port))


# -- zstd bomb --------------------------------------------------------------------------

_BOMB = []


def bomb():
    """zstd of BOMB_MIB MiB of zeros, compressed 1 MiB at a time (~9 KB)."""
    if not _BOMB:
        comp = zstandard.ZstdCompressor().compressobj()
        zeros = bytes(MIB)
        parts = [comp.compress(zeros) for _ in range(BOMB_MIB)]
        _BOMB.append(b"".join(parts) + comp.flush())
    return _BOMB[0]


def folder_bytes(folder):
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


class DiskWatch(threading.Thread):
    """Sizes of the files under `folder`: before, peak (every 50 ms) and after."""

    def __init__(self, folder):
        super().__init__(daemon=True)
        self.folder = folder
        self.before = self.peak = folder_bytes(folder)
        self.after = None
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(0.05):
            self.peak = max(self.peak, folder_bytes(self.folder))

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.join(5)
        self.after = folder_bytes(self.folder)
        self.peak = max(self.peak, self.after)

    def text(self):
        peak, left = self.peak - self.before, self.after - self.before
        if peak <= 0 and left <= 0:
            return "0 B written"
        text = "%s written" % human_bytes(peak)
        return text + (", %s left" % human_bytes(left) if left > 0 else "")


def listdir(folder):
    try:
        return set(os.listdir(folder))
    except OSError:
        return set()


def bomb_round(srv, count):
    spool = os.path.join(srv.base, ".tmp")
    spool_before = listdir(spool)
    body = bomb()
    idle = srv.rss_mb()
    srv.reset_peak()
    t0 = time.perf_counter()

    def one(i):
        with contextlib.closing(connect(srv.port, timeout=120)) as conn:
            return v11_post(conn, "upload", body, BOMB_HEADER)[0]

    with DiskWatch(srv.base) as disk:
        statuses = parallel(count, one, 150)
    secs = time.perf_counter() - t0
    left = listdir(spool) - spool_before
    cell = "%s in %.1f s, %s, RSS peak %.0f MB (idle %.0f)" % (
        tally_text(statuses), secs, disk.text(), srv.peak_mb(), idle)
    if left:
        cell += ", %d new file(s) left in .tmp" % len(left)
    return cell


def row_zstd_bomb(ctx):
    log("    bomb: %s of zstd for %d MiB of zeros" % (human_bytes(len(bomb())), BOMB_MIB))
    one = bomb_round(ctx.srv, 1)
    log("    one: " + one)
    return "one: %s. Four at once: %s" % (one, bomb_round(ctx.srv, 4))


# -- password guessers ------------------------------------------------------------------

def guesser_source():
    """127.0.0.2 if this machine lets a socket bind to it (Linux loopback does)."""
    try:
        with socket.socket() as s:
            s.bind((GUESSER_ADDRESS, 0))
        return GUESSER_ADDRESS
    except OSError:
        return None


def guess_until(port, stop, source, index):
    """Wrong passwords for USER until `stop`, on one keep-alive connection: statuses."""
    seen = collections.Counter()
    conn = connect(port, source=source, timeout=10)
    try:
        n = 0
        while not stop.is_set():
            n += 1
            body = compress(json.dumps(
                {"u": USER, "p": "wrong%d-%d" % (index, n)}).encode())
            seen[v11_post(conn, "hostKey", body, GUESS_HEADER)[0]] += 1
    finally:
        conn.close()
    return seen


def right_login(port):
    body = compress(json.dumps({"u": USER, "p": PASSWORD}).encode())
    with contextlib.closing(connect(port, timeout=HEALTH_TIMEOUT)) as conn:
        return v11_post(conn, "hostKey", body, GUESS_HEADER)[0]


def row_guessers(ctx):
    source = guesser_source()
    stop = threading.Event()
    length = ctx.t["guess"]
    box = {}
    t0 = time.monotonic()

    def during():
        time.sleep(min(2.0, length / 4))
        box["probe"] = ctx.probe()
        box["login"] = right_login(ctx.port)
        stop.wait(max(0.0, length - (time.monotonic() - t0)))
        stop.set()

    watcher = threading.Thread(target=during, daemon=True)
    watcher.start()
    results = parallel(16, lambda i: guess_until(ctx.port, stop, source, i),
                       length + ctx.t["sync_cap"] + 2 * ABORT_GRACE + 20)
    stop.set()
    watcher.join(5)
    secs = time.monotonic() - t0
    seen = collections.Counter()
    for r in results:
        if isinstance(r, collections.Counter):
            seen.update(r)
    checked, throttled = seen.pop(403, 0), seen.pop(429, 0)
    cell = "%.1f wrong passwords checked/s (403), %.1f/s throttled (429)" % (
        checked / secs, throttled / secs)
    if seen:
        cell += ", other: %s" % ", ".join("%s×%d" % kv for kv in seen.most_common())
    cell += "; device %s; right-password login from 127.0.0.1: %s" % (
        box.get("probe", "not probed"), box.get("login", "not tried"))
    if source is None:
        cell += " (guessers from 127.0.0.1: could not bind 127.0.0.2)"
    return cell


# -- burst ------------------------------------------------------------------------------

def row_burst(ctx):
    srv = ctx.srv
    key = bench.raw_call(ctx.port, "hostKey", {"u": USER, "p": PASSWORD}, timeout=30)["key"]
    meta = compress(json.dumps({"v": 11, "cv": CLIENT}).encode())
    header = {"v": 11, "k": key, "c": CLIENT, "s": "hostile"}
    barrier = threading.Barrier(256)

    def one(i):
        """meta, /health, meta: each on a fresh connection; the first status not 200."""
        barrier.wait(30)
        for name in ("meta", "/health", "meta"):
            with contextlib.closing(connect(ctx.port, timeout=30)) as conn:
                if name == "meta":
                    status = v11_post(conn, "meta", meta, header)[0]
                else:
                    status = http_call(conn, "GET", name)[0]
            if status != 200:
                return "%s %s" % (name, status)
        return "ok"

    before = srv.rss_mb()
    results = parallel(256, one, 90)
    after_burst = srv.rss_mb()
    end = time.monotonic() + ctx.t["traffic"]
    syncs, failures = 0, []
    while time.monotonic() < end:
        syncs += 1
        try:
            ctx.phone.sync(ctx.t["sync_cap"])
        except Exception as e:
            failures.append(e)
        time.sleep(max(0.0, min(3.0, end - time.monotonic())))
    after = srv.rss_mb()
    ok = sum(r == "ok" for r in results)
    cell = "%.0f → %.0f → %.0f MB (%d of 256 connections ok" % (before, after_burst, after, ok)
    failed = [r for r in results if r != "ok"]
    if failed:
        cell += "; %s" % tally_text(failed)
    cell += "; then %d syncs in %.0f s" % (syncs, ctx.t["traffic"])
    if failures:
        cell += ", %d failed: %s" % (len(failures), short(failures[0]))
    return cell + ")"


# -- file modes -------------------------------------------------------------------------

def loose_entries(folder):
    """(relative name, mode) of the folder and everything in it readable or writable
    by group or other; files first."""
    paths = [folder]
    for root, dirs, files in os.walk(folder):
        paths.extend(os.path.join(root, name) for name in dirs + files)
    loose = []
    for path in paths:
        with contextlib.suppress(OSError):
            mode = os.lstat(path).st_mode
            if mode & 0o077:
                is_dir = os.path.isdir(path)
                name = os.path.relpath(path, folder) + ("/" if is_dir else "")
                loose.append((is_dir, name, mode & 0o777))
    loose.sort()
    return [(name, mode) for _, name, mode in loose]


def row_file_modes(ctx):
    ctx.phone.sync(ctx.t["sync_cap"])          # the server has written all it writes
    loose = loose_entries(ctx.srv.base)
    if not loose:
        return "0 entries open to group/other"
    kinds = {}                  # one example per file name (or per folder mode)
    for name, mode in loose:
        key = (name.endswith("/"), mode if name.endswith("/") else os.path.basename(name))
        kinds.setdefault(key, "%s %04o" % (name, mode))
    examples = list(kinds.values())
    return "%d open to group/other, e.g. %s%s" % (len(loose), ", ".join(examples[:5]),
                                                  ", …" if len(examples) > 5 else "")


ROWS = [
    ("idle-260", "260 idle connections: device sync, /health", row_idle_260),
    ("idle-1000", "1,000 idle connections: first successful sync, /health", row_idle_1000),
    ("slow-headers-300", "300 connections sending headers 1 byte / 5 s", row_slow_headers),
    ("slow-body-300", "300 uploads (Content-Length 10 MB) sending 1 body byte / 5 s",
     row_slow_body),
    ("no-body-300", "300 uploads (Content-Length 10 MB) never sending the body", row_no_body),
    ("zstd-bomb", "v11 upload, wrong key, 9 KB zstd → %d MiB zeros" % BOMB_MIB, row_zstd_bomb),
    ("guessers-16", "16 password guessers (from 127.0.0.2)", row_guessers),
    ("burst-256", "server RSS: before → after 256 concurrent clients → after syncs",
     row_burst),
    ("file-modes", "data folder entries readable/writable by group or other (umask 022)",
     row_file_modes),
]


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------

def run_cell(name, fn, kind, root, src, times, keep=False):
    folder = os.path.join(root, name, kind)
    srv = HostileServer(kind, folder)
    phone = None
    try:
        srv.start()
        phone = Phone(srv, os.path.join(folder, "device"), src)
        cell = fn(Ctx(srv, phone, times))
    except Exception as e:
        cell = "error: %s" % short(e)
    finally:
        if phone is not None:
            phone.close()
        died = srv.died()
        srv.kill()
        if srv in LIVE_SERVERS:
            LIVE_SERVERS.remove(srv)
    if died:
        cell += " — server died (exit %s)" % srv.proc.returncode
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
    return cell


def machine_line(started, elapsed, quick, nofile, source):
    cpu = "?"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    import anki.buildinfo
    version = "?"
    with contextlib.suppress(OSError):
        with open(os.path.join(REPO, "ankisync.py")) as f:
            version = next((line.split("=")[1].strip().strip("\"'") for line in f
                            if line.startswith("__version__")), version)
    return ("Machine: %s, %d cores, %s %s, Python %s; anki %s (device and official server), "
            "ankisync %s; %s; %s run took %.0f s. Both servers on 127.0.0.1 with default "
            "settings, RLIMIT_NOFILE %d and umask 022; guessers from %s."
            % (cpu, os.cpu_count() or 0, platform.system(), platform.release(),
               platform.python_version(), anki.buildinfo.version, version,
               started.strftime("%Y-%m-%d"), "quick" if quick else "full", elapsed, nofile,
               source or "127.0.0.1 (127.0.0.2 could not be bound)"))


def table(rows, cells, times):
    lines = ["| attack | ankisync | official |", "|---|---|---|"]
    for name, label, _ in rows:
        row = [cells.get((name, k), "not run").replace("|", "\\|") for k in KINDS]
        lines.append("| `%s`: %s | %s | %s |" % (name, label, row[0], row[1]))
    lines.append("")
    lines.append("Device: the real Anki client (anki wheel), a 50-note collection uploaded "
                 "before each attack, then a normal sync of one added note during it "
                 "(aborted after %d s); /health on a fresh connection, %.0f s timeout; "
                 "fresh server and data folder per cell."
                 % (times["sync_cap"], HEALTH_TIMEOUT))
    return lines


def on_sigterm(signum, frame):
    raise KeyboardInterrupt       # the same clean-up as Ctrl-C


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter holds and caps (~2 min)")
    parser.add_argument("--only", default=None,
                        help="comma-separated rows: " + ", ".join(r[0] for r in ROWS))
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (logs)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in (args.only or "").split(",") if n.strip()]
    known = [r[0] for r in ROWS]
    for n in names:
        if n not in known:
            parser.error("unknown row %r (choose from %s)" % (n, ", ".join(known)))
    rows = [r for r in ROWS if not names or r[0] in names]
    times = TIMES["quick" if args.quick else "full"]

    nofile = raise_nofile()
    os.umask(0o022)                    # inherited by both servers (file-modes)
    bench.ZSTD = bench._Zstd()         # for bench.raw_call
    root = tempfile.mkdtemp(prefix="ankisync-hostile-")
    cells = {}
    started = datetime.datetime.now()
    t0 = time.perf_counter()

    def cleanup():
        kill_live_servers()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    atexit.register(cleanup)
    signal.signal(signal.SIGTERM, on_sigterm)

    def watchdog():
        time.sleep(times["watchdog"])
        log("TIMEOUT: the run exceeded %d s; partial table follows" % times["watchdog"])
        print("\n".join(table(rows, cells, times)), flush=True)
        cleanup()
        os._exit(3)

    threading.Thread(target=watchdog, daemon=True).start()
    source = guesser_source()
    log("hostile: %s run, rows %s; temp %s; RLIMIT_NOFILE %d"
        % ("quick" if args.quick else "full", ",".join(r[0] for r in rows), root, nofile))
    try:
        with contextlib.redirect_stdout(sys.stderr):     # bench's builder prints progress
            src = bench.Builder(os.path.join(root, "cache")).get(50)
        for name, _, fn in rows:
            for kind in KINDS:
                log("%s on %s" % (name, kind))
                cell_t0 = time.perf_counter()
                cells[(name, kind)] = run_cell(name, fn, kind, root, src, times, args.keep)
                log("  %s (%.0f s): %s" % (kind, time.perf_counter() - cell_t0,
                                           cells[(name, kind)]))
    except KeyboardInterrupt:
        log("interrupted; the rows done so far:")
        print("\n".join(table(rows, cells, times)))
        return 130
    lines = table(rows, cells, times)
    lines.append(machine_line(started, time.perf_counter() - t0, args.quick, nofile, source))
    print()
    print("\n".join(lines))
    if args.keep:
        log("kept %s" % root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
