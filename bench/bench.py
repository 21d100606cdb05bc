#!/usr/bin/env python3
"""Benchmark ankisync against the official Anki sync server, both driven by the real
modern client (the `anki` wheel, sync protocol v11).

    python bench/bench.py                 # full run, 3 rounds (~75 s on 2 cores)
    python bench/bench.py --quick         # smoke run: small sizes, 1 round (~10 s)
    python bench/bench.py --only media    # one scenario (comma-separated list allowed)
    python bench/bench.py --rounds 5

Run it with a Python that has `anki==26.9.3` installed. Both servers run at the same
time on 127.0.0.1 with fresh temporary data folders; every measurement alternates the
servers (ankisync, official, ankisync, official, ...). The result is a Markdown table
of medians plus the machine it ran on, ready to paste into README.

Scenarios (`--only` names):
  full     full upload and full download of a 20,000- and a 100,000-note collection
           with review history (client-side close/reopen included: what a user waits for)
  normal   normal sync up (device A sends 2,000 added + 4,000 edited notes) and down
           (device B receives them)
  media    media sync up and down of 300 files of 30 KB
  users8   8 users with small collections doing a normal sync at the same moment
           (wall time for all 8, one thread per user)
  meta     latency of raw `meta` requests of one user while another user full-uploads
           a ~100 MB collection (median and max), plus that upload's time
Peak RSS of each server is reported per scenario and overall (VmHWM, reset between
scenarios through /proc/PID/clear_refs).

    python bench/bench.py --scale         # the scale curves (~7 min on 2 cores, once built)

The scale curves run the same work at growing sizes, both servers side by side, and
print how time and peak memory grow with the size, per unit of work:
  scale-full   full upload and download of 20k, 100k and 500k notes
  scale-media  media sync up and down of 300, 5,000 and 20,000 files of 2 KB
  scale-users  1, 8 and 32 users at once, each a normal sync of 100 added + 200 edited
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import datetime
import http.client
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

try:
    from anki.collection import AddNoteRequest, Collection
    from test_ankisync import SyncServer      # the test suite's way of running a server
except ImportError:  # pragma: no cover
    raise SystemExit("bench.py needs the test requirements (pip install pytest anki==26.9.3 "
                     "zstandard backports.zstd) in %s" % sys.executable)

USERS = [("user%d" % i, "pass%d" % i) for i in range(1, 33)]
KINDS = ("ankisync", "official")
SCENARIOS = ("full", "normal", "media", "users8", "meta")
CURVES = ("scale-full", "scale-media", "scale-users")
CURVE_SIZES = {"scale-full": (20000, 100000, 500000), "scale-media": (300, 5000, 20000),
               "scale-users": (1, 8, 32)}
QUICK_CURVE_SIZES = {"scale-full": (2000, 10000), "scale-media": (30, 300),
                     "scale-users": (1, 4)}
CURVE_MEDIA_KB = 2
USERS_FIRST = 8             # the scenarios before the curves use the first 8 users

SIZES = {
    # name: (full sync sizes, normal base, added, edited, media files, media size,
    #        users8 base notes, users8 added, users8 edited, meta collection MB)
    "full": dict(full=(20000, 100000), normal_base=20000, added=2000, edited=4000,
                 media_files=300, media_size=30 * 1024, u8_base=1000, u8_added=100,
                 u8_edited=200, meta_mb=100),
    "quick": dict(full=(2000, 10000), normal_base=2000, added=200, edited=400,
                  media_files=30, media_size=30 * 1024, u8_base=200, u8_added=20,
                  u8_edited=40, meta_mb=10),
}


def say(msg):
    print("[%s] %s" % (time.strftime("%H:%M:%S"), msg), flush=True)


# --------------------------------------------------------------------------------------
# zstd for the raw meta requests: the `zstandard` module if installed, else ankisync's
# own backend (libzstd through ctypes, or Python 3.14's compression.zstd).
# --------------------------------------------------------------------------------------

class _Zstd:
    def __init__(self):
        try:
            import zstandard
            self._c = zstandard.ZstdCompressor()
            self._d = zstandard.ZstdDecompressor()
            self.compress = self._c.compress
            self.decompress = lambda data: self._d.decompressobj().decompress(data)
            self.name = "zstandard"
        except ImportError:
            sys.path.insert(0, REPO)
            try:
                import ankisync
            finally:
                sys.path.pop(0)
            backend = ankisync.choose_zstd()
            self.compress = backend.compress
            self.decompress = lambda data: backend.decompress(data, 1 << 28)
            self.name = "ankisync:" + backend.name


# --------------------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------------------

class ServerDied(RuntimeError):
    pass


class Server(SyncServer):
    """The test suite's server process, plus what the bench measures of it."""

    def __init__(self, kind, root):
        base = os.path.join(root, "server-" + kind, "data")
        super().__init__(base, kind=kind, users=USERS,
                         env={"MAX_SYNC_PAYLOAD_MEGS": "1000"})    # room for a 111 MB upload
        self.peak_overall = 0

    def start(self):
        try:
            super().start()
        except RuntimeError as e:
            raise ServerDied("%s: %s" % (self.kind, e))

    def check(self):
        if self.died():
            raise ServerDied("%s server died (exit %s); log tail:\n%s"
                             % (self.kind, self.proc.returncode, self.log_tail()))

    def _status(self, field):
        """kB value of `field` (VmHWM, VmRSS) summed over the process group."""
        total = 0
        for pid in self._group_pids():
            try:
                with open("/proc/%d/status" % pid) as f:
                    for line in f:
                        if line.startswith(field + ":"):
                            total += int(line.split()[1])
            except OSError:
                pass
        return total

    def _group_pids(self):
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.getpgid(int(entry)) == self.proc.pid:
                        pids.append(int(entry))
                except OSError:
                    pass
        return pids or [self.proc.pid]

    def reset_peak(self):
        for pid in self._group_pids():
            with contextlib.suppress(OSError):
                with open("/proc/%d/clear_refs" % pid, "w") as f:
                    f.write("5")

    def peak_mb(self):
        mb = self._status("VmHWM") / 1024.0
        self.peak_overall = max(self.peak_overall, mb)
        return mb

    def rss_mb(self):
        return self._status("VmRSS") / 1024.0

    def zstd_backend(self):
        if self.kind != "ankisync":
            return "zstd crate"
        with contextlib.suppress(OSError):
            with open(self.log_path, errors="replace") as f:
                for line in f:
                    if "zstd backend:" in line:
                        return line.rsplit("zstd backend:", 1)[1].strip()
        return "?"


# --------------------------------------------------------------------------------------
# Building collections (once per size, cached, then copied per device)
# --------------------------------------------------------------------------------------

WORDS = ("the of and to in is was for on are with as his they be at one have this from "
         "or had by hot word but what some we can out other were all there when up use "
         "your how said an each she which do their time if will way about many then them "
         "write would like so these her long make thing see him two has look more day "
         "could go come did number sound no most people my over know water than call "
         "first who may down side been now find Haus Baum Straße Mädchen gehen sehen 猫 "
         "犬 日本語 lernen machen").split()


def _text(rng, n_words):
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


class Builder:
    def __init__(self, cache):
        self.cache = cache
        os.makedirs(cache, exist_ok=True)

    def get(self, notes, back_bytes=0, history=True):
        """Path of a cached collection with `notes` Basic notes (front: a few words,
        back: words, or `back_bytes` of base64 noise for the big upload), 70% of the
        cards reviewed 1-8 times (revlog rows + review card states)."""
        name = "col-%d-%d-%d.anki2" % (notes, back_bytes, int(history))
        path = os.path.join(self.cache, name)
        if os.path.exists(path):
            return path
        t0 = time.perf_counter()
        folder = tempfile.mkdtemp(dir=self.cache)
        tmp = os.path.join(folder, "collection.anki2")
        rng = random.Random(notes * 7919 + back_bytes)
        col = Collection(tmp)
        try:
            col.set_v3_scheduler(True)
            model = col.models.by_name("Basic")
            did = col.decks.id("Bench")
            batch = []
            for i in range(notes):
                note = col.new_note(model)
                note.fields[0] = "%d %s" % (i, _text(rng, 4))
                if back_bytes:
                    note.fields[1] = base64.b64encode(rng.randbytes(back_bytes * 3 // 4)).decode()
                else:
                    note.fields[1] = _text(rng, 12)
                if i % 5 == 0:
                    note.tags = ["tag%d" % (i % 40), "bench"]
                batch.append(AddNoteRequest(note=note, deck_id=did))
                if len(batch) == 20000:
                    col.add_notes(batch)
                    batch = []
            if batch:
                col.add_notes(batch)
            today = col.sched.today
        finally:
            col.close()
        if history:
            # Plain sqlite3 on the closed file: 50x faster than col.db for ~300k rows.
            # cards and revlog have no `unicase` columns, so no collation is needed.
            import sqlite3
            db = sqlite3.connect(tmp)
            try:
                with db:
                    self._history(db, rng, today)
            finally:
                db.close()
        col = Collection(tmp)     # reopen: the client itself checks what was written
        try:
            ok = col.db.scalar("pragma integrity_check")
            if ok != "ok":
                raise RuntimeError("built collection fails integrity_check: %s" % ok)
            count = col.note_count()
            if count != notes:
                raise RuntimeError("built %d notes instead of %d" % (count, notes))
        finally:
            col.close()
        os.replace(tmp, path)
        shutil.rmtree(folder, ignore_errors=True)
        say("  built %s (%.1f MB) in %.1f s" % (name, os.path.getsize(path) / 1e6,
                                               time.perf_counter() - t0))
        return path

    @staticmethod
    def _history(db, rng, today):
        now = int(time.time())
        cids = [row[0] for row in db.execute("select id from cards order by id")]
        rid = (now - 600 * 86400) * 1000
        cards, revlog = [], []
        for cid in cids:
            if rng.random() > 0.7:
                continue
            reps = rng.randint(1, 8)
            ivl, lapses, factor = 0, 0, 2500
            for k in range(reps):
                rid += rng.randint(500, 60000)
                last = ivl
                ease = 3 if k == 0 else rng.choice((1, 3, 3, 3, 4))
                if ease == 1:
                    lapses += 1
                    ivl = 1
                    factor = max(1300, factor - 200)
                else:
                    ivl = max(1, int(max(ivl, 1) * (2.5 if ease == 3 else 3.2)))
                revlog.append((rid, cid, -1, ease, ivl, last, factor if k else 0,
                               rng.randint(1500, 25000), 0 if k == 0 else 1))
            cards.append((today + rng.randint(-5, ivl), ivl, factor, reps, lapses, now,
                          '{"lrt":%d}' % (rid // 1000), cid))
        # data.lrt (last review time) is what Check Database would otherwise add.
        db.executemany(
            "update cards set type=2, queue=2, due=?, ivl=?, factor=?, reps=?, lapses=?,"
            " left=0, mod=?, usn=-1, data=? where id=?", cards)
        db.executemany("insert into revlog (id, cid, usn, ease, ivl, lastIvl, factor,"
                           " time, type) values (?,?,?,?,?,?,?,?,?)", revlog)


# --------------------------------------------------------------------------------------
# Client-side helpers (the real anki 26.x client)
# --------------------------------------------------------------------------------------

class Device:
    def __init__(self, folder, src=None):
        os.makedirs(folder, exist_ok=True)
        self.folder = folder
        path = os.path.join(folder, "collection.anki2")
        if src:
            shutil.copyfile(src, path)
        self.col = Collection(path)

    def close(self):
        if self.col is not None and self.col.db:
            self.col.close()
        self.col = None

    def full(self, auth, upload):
        col = self.col
        t0 = time.perf_counter()
        col.close_for_full_sync()
        try:
            col.full_upload_or_download(auth=auth, server_usn=None, upload=upload)
        finally:
            col.reopen(after_full_sync=True)
        return time.perf_counter() - t0

    def sync(self, auth):
        """A normal sync; returns (seconds, outcome)."""
        col = self.col
        last = col.db.scalar("select ls from col")
        t0 = time.perf_counter()
        out = col.sync_collection(auth, False)
        dt = time.perf_counter() - t0
        outcome = out.ChangesRequired.Name(out.required).lower()
        if outcome == "no_changes" and col.db.scalar("select ls from col") != last:
            outcome = "normal_sync"
        return dt, outcome

    def sync_media(self, auth, timeout):
        col = self.col
        t0 = time.perf_counter()
        col.sync_media(auth)
        deadline = time.time() + timeout
        while col.media_sync_status().active:      # raises if the media sync failed
            if time.time() > deadline:
                col.abort_media_sync()
                raise TimeoutError("media sync still running after %s s" % timeout)
            time.sleep(0.01)
        return time.perf_counter() - t0


def add_and_edit(col, added, edited, tag):
    """`added` new notes, `edited` existing notes changed (bulk client API)."""
    model = col.models.by_name("Basic")
    did = col.decks.id("Bench")
    reqs = []
    for i in range(added):
        note = col.new_note(model)
        note.fields[0] = "new %s %d" % (tag, i)
        note.fields[1] = "added by the bench %s" % tag
        reqs.append(AddNoteRequest(note=note, deck_id=did))
    col.add_notes(reqs)
    nids = col.db.list("select id from notes order by id limit ?", edited)
    notes = []
    for nid in nids:
        note = col.get_note(nid)
        note.fields[1] = note.fields[1] + " edited " + tag
        notes.append(note)
    col.update_notes(notes)
    return nids


def login(server, user_index, root):
    """The host key of USERS[user_index] on `server`, from a throwaway device."""
    name, password = USERS[user_index]
    folder = os.path.join(root, "login-%s-%d-%d" % (server.kind, server.port, user_index))
    dev = Device(folder)
    try:
        return dev.col.sync_login(name, password, server.url)
    finally:
        dev.close()
        shutil.rmtree(folder, ignore_errors=True)


def sync_at_once(devices, auths, timeout):
    """Each device makes a normal sync, all at the same moment (one thread each);
    returns the wall time for all of them."""
    barrier = threading.Barrier(len(devices))
    results = [None] * len(devices)

    def work(i):
        try:
            barrier.wait()
            results[i] = devices[i].sync(auths[i])
        except Exception as e:         # reported below
            results[i] = e

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(devices))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    wall = time.perf_counter() - t0
    for i, res in enumerate(results):
        if isinstance(res, Exception) or res is None:
            raise RuntimeError("user %d: %r" % (i + 1, res))
        if res[1] != "normal_sync":
            raise RuntimeError("user %d: %s instead of a normal sync" % (i + 1, res[1]))
    return wall


# --------------------------------------------------------------------------------------
# Raw v11 requests (meta latency)
# --------------------------------------------------------------------------------------

ZSTD = None


def raw_call(port, method, payload, key="", timeout=120):
    header = json.dumps({"v": 11, "k": key, "c": "anki,26.9.3 (bench),lin", "s": "bench"})
    body = ZSTD.compress(json.dumps(payload).encode())
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/sync/" + method, body=body,
                     headers={"anki-sync": header, "Content-Type": "application/octet-stream"})
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    if resp.status != 200:
        raise RuntimeError("%s -> HTTP %d: %r" % (method, resp.status, data[:200]))
    try:
        return json.loads(ZSTD.decompress(data))
    except Exception:
        return json.loads(data)


# --------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args, root, cache):
        self.args = args
        self.sz = dict(SIZES["quick" if args.quick else "full"])
        if args.media_files:
            self.sz["media_files"] = args.media_files
        if args.media_kb:
            self.sz["media_size"] = args.media_kb * 1024
        self.root = root
        self.builder = Builder(cache)
        self.servers = {}
        self.auths = {}
        self.results = {}          # metric -> kind -> [values]
        self.order = []            # metric order for the table
        self.units = {}
        self.peaks = {}            # scenario -> kind -> MB
        self.curves = {}           # curve -> [(size, unit, time metrics, memory metric)]
        self.failures = []
        self.load_at_start = os.getloadavg()[0]

    # -- plumbing --------------------------------------------------------------------

    def start_servers(self):
        for kind in KINDS:
            srv = Server(kind, self.root)
            self.servers[kind] = srv
            t0 = time.perf_counter()
            srv.start()
            say("%s server up on port %d (pid %d) in %.1f s"
                % (kind, srv.port, srv.proc.pid, time.perf_counter() - t0))

    def kill_servers(self):
        for srv in self.servers.values():
            srv.kill()

    def record(self, metric, kind, value, unit="s"):
        if metric not in self.results:
            self.results[metric] = {k: [] for k in KINDS}
            self.order.append(metric)
            self.units[metric] = unit
        self.results[metric][kind].append(value)
        shown = {"ms": "%.1f ms" % (value * 1000), "MB": "%.0f MB" % value}.get(
            unit, "%.2f s" % value)
        say("    %-9s %-44s %s" % (kind, metric, shown))

    def auth(self, kind, user_index):
        key = (kind, user_index)
        if key not in self.auths:
            self.auths[key] = login(self.servers[kind], user_index, self.root)
        return self.auths[key]

    def workdir(self, *parts):
        path = os.path.join(self.root, "work", *[str(p) for p in parts])
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        return path

    def run(self, names):
        for name in names:
            for srv in self.servers.values():
                srv.reset_peak()
            say("scenario %s" % name)
            getattr(self, "prepare_" + name)()
            spy = self.start_spy(name)
            state = {}
            for rnd in range(self.args.rounds):
                for kind in KINDS:               # A B A B ...
                    srv = self.servers[kind]
                    try:
                        srv.check()
                        getattr(self, "scenario_" + name)(kind, rnd, state)
                        srv.check()
                    except Exception as e:
                        self.fail(name, kind, rnd, e)
            self.stop_spy(spy)
            self.peaks[name] = {k: s.peak_mb() for k, s in self.servers.items()}
            shutil.rmtree(os.path.join(self.root, "work"), ignore_errors=True)

    def start_spy(self, name):
        """--spy DIR: py-spy samples the ankisync server during the scenario and writes
        DIR/<scenario>.svg (flame graph) and DIR/<scenario>.txt (collapsed stacks)."""
        if not self.args.spy:
            return None
        os.makedirs(self.args.spy, exist_ok=True)
        pyspy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
        procs = []
        for fmt, ext in (("flamegraph", "svg"), ("raw", "txt")):
            out = os.path.join(self.args.spy, "%s.%s" % (name, ext))
            procs.append(subprocess.Popen(
                [pyspy, "record", "--pid", str(self.servers["ankisync"].proc.pid),
                 "--rate", "250", "--format", fmt, "--output", out],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        time.sleep(1.0)
        return procs

    @staticmethod
    def stop_spy(procs):
        for proc in procs or ():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
        for proc in procs or ():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    def fail(self, name, kind, rnd, exc):
        srv = self.servers[kind]
        died = srv.proc.poll() is not None
        msg = "%s failed on %s (round %d): %s: %s" % (name, kind, rnd + 1,
                                                      type(exc).__name__, exc)
        self.failures.append(msg)
        say("  FAILED: " + msg)
        if not isinstance(exc, ServerDied):
            traceback.print_exc()
            say("  %s log tail:\n%s" % (kind, srv.log_tail(25)))
        if died:
            say("  restarting %s (it died)" % kind)
            srv.start()
            self.auths = {k: v for k, v in self.auths.items() if k[0] != kind}

    # -- 1. full sync ------------------------------------------------------------------

    def prepare_full(self):
        for n in self.sz["full"]:
            self.builder.get(n)

    def scenario_full(self, kind, rnd, state):
        auth = self.auth(kind, 0)
        for n in self.sz["full"]:
            src = self.builder.get(n)
            base = self.workdir(kind, "full", n)
            a = Device(os.path.join(base, "A"), src)
            try:
                self.record("full upload, %dk notes" % (n // 1000), kind, a.full(auth, True))
            finally:
                a.close()
            b = Device(os.path.join(base, "B"))
            try:
                self.record("full download, %dk notes" % (n // 1000), kind,
                            b.full(auth, False))
                got = b.col.note_count()
                if got != n:
                    raise RuntimeError("downloaded %d notes, expected %d" % (got, n))
            finally:
                b.close()
            shutil.rmtree(base, ignore_errors=True)

    # -- 2. normal sync ----------------------------------------------------------------

    def prepare_normal(self):
        self.builder.get(self.sz["normal_base"])

    def scenario_normal(self, kind, rnd, state):
        sz = self.sz
        auth = self.auth(kind, 1)
        src = self.builder.get(sz["normal_base"])
        base = self.workdir(kind, "normal")
        a = Device(os.path.join(base, "A"), src)
        b = Device(os.path.join(base, "B"))
        try:
            a.full(auth, True)
            b.full(auth, False)
            tag = "r%d" % rnd
            nids = add_and_edit(a.col, sz["added"], sz["edited"], tag)
            dt, outcome = a.sync(auth)
            if outcome != "normal_sync":
                raise RuntimeError("device A: %s instead of a normal sync" % outcome)
            self.record("normal sync up (%d added + %d edited)" % (sz["added"], sz["edited"]),
                        kind, dt)
            dt, outcome = b.sync(auth)
            if outcome != "normal_sync":
                raise RuntimeError("device B: %s instead of a normal sync" % outcome)
            self.record("normal sync down (%d added + %d edited)"
                        % (sz["added"], sz["edited"]), kind, dt)
            want = sz["normal_base"] + sz["added"]
            if b.col.note_count() != want:
                raise RuntimeError("device B has %d notes, expected %d"
                                   % (b.col.note_count(), want))
            if not b.col.get_note(nids[-1]).fields[1].endswith(" edited " + tag):
                raise RuntimeError("device B did not receive an edit")
        finally:
            a.close()
            b.close()
        shutil.rmtree(base, ignore_errors=True)

    # -- 3. media ----------------------------------------------------------------------

    def prepare_media(self):
        pass

    def scenario_media(self, kind, rnd, state):
        count, size = self.sz["media_files"], self.sz["media_size"]
        up, down = self.media_round(kind, 2, state, "r%d" % rnd, count, size)
        kb = size // 1024
        self.record("media up (%d files x %d KB)" % (count, kb), kind, up)
        self.record("media down (%d files x %d KB)" % (count, kb), kind, down)
        if rnd == self.args.rounds - 1:
            for device in state.pop(kind):
                device.close()

    def media_round(self, kind, user_index, state, tag, count, size):
        """Device A adds `count` new files and syncs them up, B syncs them down: the same
        two devices across rounds (state[kind]). Returns (up, down) seconds."""
        auth = self.auth(kind, user_index)
        if kind not in state:
            base = os.path.join(self.root, "media-devices", kind, str(user_index))
            state[kind] = (Device(os.path.join(base, "A")), Device(os.path.join(base, "B")))
        a, b = state[kind]
        rng = random.Random(hash((tag, kind)) & 0xFFFFFFFF)
        prefix = "bench_%s_" % tag
        for i in range(count):
            a.col.media.write_data("%s%05d.jpg" % (prefix, i), rng.randbytes(size))
        up = a.sync_media(auth, self.args.op_timeout)
        down = b.sync_media(auth, self.args.op_timeout)
        have = len([f for f in os.listdir(b.col.media.dir()) if f.startswith(prefix)])
        if have != count:
            raise RuntimeError("device B has %d of the %d new media files" % (have, count))
        return up, down

    # -- 4. eight users at once --------------------------------------------------------

    def prepare_users8(self):
        self.builder.get(self.sz["u8_base"])

    def scenario_users8(self, kind, rnd, state):
        sz = self.sz
        self.record("8 users sync at once (%d added + %d edited each)"
                    % (sz["u8_added"], sz["u8_edited"]), kind,
                    self.users_at_once(kind, rnd, USERS_FIRST))

    def users_at_once(self, kind, rnd, count):
        """`count` users, each with its own device, do a normal sync at the same moment
        (one thread per user); returns the wall time for all of them."""
        sz = self.sz
        src = self.builder.get(sz["u8_base"])
        base = self.workdir(kind, "users", count)
        auths = [self.auth(kind, i) for i in range(count)]
        devices = []
        try:
            for i in range(count):
                dev = Device(os.path.join(base, "u%d" % i), src)
                devices.append(dev)
                dev.full(auths[i], True)
                add_and_edit(dev.col, sz["u8_added"], sz["u8_edited"], "u%dr%d" % (i, rnd))
            wall = sync_at_once(devices, auths, self.args.op_timeout)
        finally:
            for dev in devices:
                dev.close()
        shutil.rmtree(base, ignore_errors=True)
        return wall

    # -- 5. meta latency during a big upload -------------------------------------------

    def _meta_notes(self):
        # ~4 KB back field per note: base64 noise, so the file is ~meta_mb MB and
        # compresses only ~25%, like a media-heavy or long-text collection.
        return self.sz["meta_mb"] * 1000 * 1000 // 4300

    def prepare_meta(self):
        path = self.builder.get(self._meta_notes(), back_bytes=4000, history=False)
        say("  meta upload collection: %.1f MB" % (os.path.getsize(path) / 1e6))

    def scenario_meta(self, kind, rnd, state):
        srv = self.servers[kind]
        key = raw_call(srv.port, "hostKey", {"u": USERS[6][0], "p": USERS[6][1]})["key"]
        meta = {"v": 11, "cv": "anki,26.9.3 (bench),lin"}

        def one_meta():
            t0 = time.perf_counter()
            out = raw_call(srv.port, "meta", meta, key)
            if "usn" not in out and "mod" not in out:
                raise RuntimeError("unexpected meta answer %r" % out)
            return time.perf_counter() - t0

        idle = [one_meta() for _ in range(20)]
        self.record("meta latency, idle (median)", kind, statistics.median(idle), "ms")
        src = self.builder.get(self._meta_notes(), back_bytes=4000, history=False)
        auth = self.auth(kind, 7)
        base = self.workdir(kind, "meta")
        dev = Device(os.path.join(base, "A"), src)
        box = {}

        def upload():
            try:
                box["time"] = dev.full(auth, True)
            except Exception as e:
                box["error"] = e

        try:
            thread = threading.Thread(target=upload)
            thread.start()
            samples = []
            deadline = time.time() + self.args.op_timeout
            while thread.is_alive() and time.time() < deadline:
                samples.append(one_meta())
                time.sleep(0.02)
            thread.join(max(1, deadline - time.time()))
            if thread.is_alive():
                raise TimeoutError("upload still running after %s s" % self.args.op_timeout)
            if "error" in box:
                raise box["error"]
            if not samples:
                raise RuntimeError("no meta sample taken during the upload")
            mb = os.path.getsize(src) / 1e6
            self.record("full upload, %d MB (while meta polled)" % round(mb), kind, box["time"])
            self.record("meta latency during %d MB upload (median)" % round(mb), kind,
                        statistics.median(samples), "ms")
            self.record("meta latency during %d MB upload (max)" % round(mb), kind,
                        max(samples), "ms")
            state.setdefault(kind, []).append(len(samples))
        finally:
            dev.close()
        shutil.rmtree(base, ignore_errors=True)

    # -- 6. scale curves ---------------------------------------------------------------

    def run_curves(self, names):
        sizes = QUICK_CURVE_SIZES if self.args.quick else CURVE_SIZES
        for name in names:
            say("curve %s" % name)
            step = getattr(self, "step_" + name.replace("-", "_"))
            state = {}
            for size in sizes[name]:
                for rnd in range(self.args.rounds):
                    for kind in KINDS:
                        srv = self.servers[kind]
                        try:
                            srv.check()
                            srv.reset_peak()
                            times = step(kind, rnd, size, state)
                            label = self.curve_label(name, size)
                            metrics = []
                            for what, seconds in times:
                                metrics.append("%s, %s" % (what, label))
                                self.record(metrics[-1], kind, seconds)
                            memory = "peak RSS, %s %s" % (name, label)
                            self.record(memory, kind, srv.peak_mb(), "MB")
                            rows = self.curves.setdefault(name, [])
                            if not any(row[0] == size for row in rows):
                                rows.append((size, metrics, memory))
                            srv.check()
                        except Exception as e:
                            self.fail(name, kind, rnd, e)
            for devices in state.values():
                for device in devices:
                    device.close()
            shutil.rmtree(os.path.join(self.root, "work"), ignore_errors=True)

    @staticmethod
    def curve_label(name, size):
        if name == "scale-full":
            return "%dk notes" % (size // 1000)
        if name == "scale-media":
            return "%d files" % size
        return "%d user%s" % (size, "" if size == 1 else "s")

    def step_scale_full(self, kind, rnd, notes, state):
        auth = self.auth(kind, USERS_FIRST)         # an account of its own
        src = self.builder.get(notes)
        base = self.workdir(kind, "scale-full", notes)
        a = Device(os.path.join(base, "A"), src)
        try:
            up = a.full(auth, True)
        finally:
            a.close()
        b = Device(os.path.join(base, "B"))
        try:
            down = b.full(auth, False)
            if b.col.note_count() != notes:
                raise RuntimeError("downloaded %d notes, expected %d"
                                   % (b.col.note_count(), notes))
        finally:
            b.close()
        shutil.rmtree(base, ignore_errors=True)
        return [("full upload", up), ("full download", down)]

    def step_scale_media(self, kind, rnd, files, state):
        up, down = self.media_round(kind, USERS_FIRST + 1, state, "s%d_r%d" % (files, rnd),
                                    files, CURVE_MEDIA_KB * 1024)
        return [("media up (%d KB files)" % CURVE_MEDIA_KB, up),
                ("media down (%d KB files)" % CURVE_MEDIA_KB, down)]

    def step_scale_users(self, kind, rnd, users, state):
        return [("users at once (%d added + %d edited each)"
                 % (self.sz["u8_added"], self.sz["u8_edited"]),
                 self.users_at_once(kind, rnd, users))]

    def curve_table(self):
        """Each curve's steps by size: medians, time per unit of work, and peak memory;
        a cost that grows linearly keeps its time per unit flat."""
        lines = ["| curve step | ankisync | official | ratio | ankisync per unit | "
                 "official per unit | ankisync peak | official peak |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|"]
        units = {"scale-full": (1000, "1k notes"), "scale-media": (1000, "1k files"),
                 "scale-users": (1, "user")}
        for name, rows in self.curves.items():
            per, unit = units[name]
            for size, metrics, memory in rows:
                peak = {k: statistics.median(v) if v else 0
                        for k, v in self.results[memory].items()}
                for metric in metrics:
                    med = {k: statistics.median(v) if v else None
                           for k, v in self.results[metric].items()}
                    a, o = med["ankisync"], med["official"]
                    cells = ["%.2f s" % v if v is not None else "—" for v in (a, o)]
                    cells.append("%.2f" % (a / o) if a is not None and o else "—")
                    cells += ["%.1f ms / %s" % (v * 1000 * per / size, unit)
                              if v is not None else "—" for v in (a, o)]
                    cells += ["%.0f MB" % peak["ankisync"], "%.0f MB" % peak["official"]]
                    lines.append("| %s | %s |" % (metric, " | ".join(cells)))
        return lines

    # -- report ------------------------------------------------------------------------

    def report(self, started, elapsed):
        lines = []
        rounds = self.args.rounds
        lines.append("| scenario | ankisync | official | ratio |")
        lines.append("|---|---:|---:|---:|")

        def fmt(v, unit):
            if v is None:
                return "—"
            return "%.1f ms" % (v * 1000) if unit == "ms" else "%.2f s" % v

        curve_metrics = {m for rows in self.curves.values() for _, ms, mem in rows
                         for m in ms + [mem]}
        for metric in self.order:
            if metric in curve_metrics:
                continue
            unit = self.units[metric]
            med = {k: (statistics.median(v) if v else None)
                   for k, v in self.results[metric].items()}
            a, o = med["ankisync"], med["official"]
            ratio = "%.2f" % (a / o) if a is not None and o else "—"
            lines.append("| %s | %s | %s | %s |" % (metric, fmt(a, unit), fmt(o, unit), ratio))
        if self.peaks or self.curves:
            for name, peak in self.peaks.items():
                a, o = peak["ankisync"], peak["official"]
                lines.append("| peak RSS during `%s` | %.0f MB | %.0f MB | %.2f |"
                             % (name, a, o, a / o if o else 0))
            a = self.servers["ankisync"].peak_overall
            o = self.servers["official"].peak_overall
            lines.append("| **peak RSS, whole run** | %.0f MB | %.0f MB | %.2f |"
                         % (a, o, a / o if o else 0))
        if self.curves:
            lines.append("")
            lines.extend(self.curve_table())
        cpu = "?"
        with contextlib.suppress(OSError):
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        cpu = line.split(":", 1)[1].strip()
                        break
        import anki.buildinfo
        ankisync_version = "?"
        with contextlib.suppress(OSError):
            with open(os.path.join(REPO, "ankisync.py")) as f:
                for line in f:
                    if line.startswith("__version__"):
                        ankisync_version = line.split("=")[1].strip().strip("\"'")
                        break
        lines.append("")
        lines.append("Medians of %d round%s (servers alternated), times as the modern client "
                     "sees them; ratio = ankisync / official (below 1: ankisync is faster)."
                     % (rounds, "" if rounds == 1 else "s"))
        lines.append("Machine: %s, %d cores, %s, Python %s; anki %s (client and official "
                     "server), ankisync %s (zstd: %s); %s; %s run took %.0f s."
                     % (cpu, os.cpu_count() or 0, platform.system() + " " + platform.release(),
                        platform.python_version(), anki.buildinfo.version, ankisync_version,
                        self.servers["ankisync"].zstd_backend(),
                        started.strftime("%Y-%m-%d"), "quick" if self.args.quick else "full",
                        elapsed))
        load = os.getloadavg()[0]
        if self.load_at_start > 0.7 or load > 2.5:
            lines.append("Note: other work was running (load average %.1f at start, %.1f at end)"
                         ": these numbers are noisier than usual." % (self.load_at_start, load))
        if self.failures:
            lines.append("")
            lines.append("FAILURES:")
            lines.extend("- " + f for f in self.failures)
        return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and 1 round: a smoke run in under 2 minutes")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3, quick 1)")
    parser.add_argument("--only", default=None,
                        help="comma-separated scenarios or curves: "
                             + ", ".join(SCENARIOS + CURVES))
    parser.add_argument("--scale", action="store_true",
                        help="the scale curves (%s) instead of the scenarios" % ", ".join(CURVES))
    parser.add_argument("--cache", default=None,
                        help="folder to keep built collections in across runs "
                             "(default: inside the run's temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (logs)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="abort the whole run after this many seconds "
                             "(default 600 quick, 5400 full)")
    parser.add_argument("--op-timeout", type=float, default=600,
                        help="longest single sync operation, seconds")
    parser.add_argument("--spy", default=None, metavar="DIR",
                        help="profile the ankisync server with py-spy (must be installed) "
                             "into DIR/<scenario>.svg and .txt")
    parser.add_argument("--out", default=None, help="also write the Markdown table here")
    parser.add_argument("--media-files", type=int, default=None,
                        help="files per round of the media scenario (default 300, quick 30)")
    parser.add_argument("--media-kb", type=int, default=None,
                        help="KB per media file (default 30)")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.timeout is None:
        args.timeout = 600 if args.quick else 5400
    names = (CURVES if args.scale else SCENARIOS) if not args.only else \
        [n.strip() for n in args.only.split(",") if n.strip()]
    for n in names:
        if n not in SCENARIOS + CURVES:
            parser.error("unknown scenario %r (choose from %s)"
                         % (n, ", ".join(SCENARIOS + CURVES)))

    global ZSTD
    ZSTD = _Zstd()
    root = tempfile.mkdtemp(prefix="ankisync-bench-")
    bench = Bench(args, root, args.cache or os.path.join(root, "cache"))

    def cleanup():
        bench.kill_servers()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    atexit.register(cleanup)

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)

    def watchdog():
        time.sleep(args.timeout)
        say("TIMEOUT: the run exceeded %.0f s; killing the servers" % args.timeout)
        for srv in bench.servers.values():
            say("%s log tail:\n%s" % (srv.kind, srv.log_tail(25)))
        bench.kill_servers()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        os._exit(3)

    threading.Thread(target=watchdog, daemon=True).start()

    started = datetime.datetime.now()
    t0 = time.perf_counter()
    say("ankisync bench: %s, %d round(s), scenarios %s; temp %s; zstd for meta: %s"
        % ("quick" if args.quick else "full", args.rounds, ",".join(names), root, ZSTD.name))
    try:
        bench.start_servers()
        bench.run([n for n in names if n in SCENARIOS])
        bench.run_curves([n for n in names if n in CURVES])
        for srv in bench.servers.values():
            srv.check()
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except ServerDied as e:
        say("ERROR: %s" % e)
        return 2
    table = bench.report(started, time.perf_counter() - t0)
    print()
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    if args.keep:
        say("kept %s (server logs in server-*/server.log)" % root)
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
