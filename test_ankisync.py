"""Story tests for ankisync, driven by real Anki clients.

Every test is a short story of devices syncing through a sync server:

* the server is either the official one shipped in the ``anki`` wheel or ankisync
  (``ANKISYNC_TEST_SERVER=official|ankisync``, default ``ankisync``), started fresh,
  with an empty data dir, for every test;
* "modern" devices are ``anki`` 26.x collections living inside this test process
  (sync protocol v11);
* "legacy" devices are ``anki`` 2.1.54 collections (protocol v10, Rust sync code) and
  "py26" devices ``anki`` 2.1.26 collections (protocol v10, Python sync code), driven
  through this very file run as a script inside venvs the suite builds once under
  ``${ANKISYNC_TEST_CACHE:-~/.cache/ankisync-tests}`` (Python 3.9 and 3.8 found on PATH
  or in ~/.pyenv): ``venv/bin/python test_ankisync.py legacy-client '<json>'``.

Run:  python3 -m pip install pytest hypothesis anki==26.9.3 zstandard backports.zstd
      python3 -m pytest -q test_ankisync.py [-m MARK]
      marks (declared in pyproject.toml): fullsync, normalsync, media, legacy
      (e.g. -m "fullsync and not legacy")
      ANKISYNC_TEST_SERVER_PYTHON runs the server under another Python (CI: 3.9).

The file has four parts:
1. code shared by all client generations (collection operations and ``snapshot``);
   it must stay valid Python 3.8 and work with anki 2.1.26, 2.1.54 and 26.x alike;
2. the legacy-client driver (script entry point);
3. the pytest harness (SyncServer, the one way to start a server; the devices) and
   the stories (only imported under pytest);
4. the pieces one at a time, spoken by hand through a few request helpers that all
   answer a Response, grouped in the order of ankisync.py's sections: limits and
   errors, protocol words, configuration, users, envelopes, the collection store,
   collection sync, media sync, HTTP, the command line, then its appendices (zstd,
   the schema 18 -> 11 conversion, a new collection, media zips, a private CA).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import time
import unicodedata

# =====================================================================================
# Part 1. Collection operations shared by both client generations.
#
# Each operation takes an open Collection plus JSON-able keyword arguments and returns
# something JSON-able. Modern devices call them in-process, legacy devices in the
# driver subprocess, so a story can apply the very same change on any device.
# =====================================================================================

OPS = {}


def op(fn):
    OPS[fn.__name__] = fn
    return fn


def _jsonable(value):
    # Snapshots are compared after a JSON round trip so that in-process (modern) and
    # subprocess (legacy) results have identical types (tuples -> lists etc.).
    return json.loads(json.dumps(value))


@op
def snapshot(col):
    """Everything two synced devices must agree on (usn/ls columns excluded)."""
    db = col.db
    decks = col.decks.all()
    return _jsonable(
        {
            # Tags as a list: anki 2.1.26 writes "  a  b  " where later clients write " a b ".
            "notes": [
                [nid, guid, mid, mod, tags.split(), flds]
                for nid, guid, mid, mod, tags, flds in db.all(
                    "select id, guid, mid, mod, tags, flds from notes order by id")
            ],
            "cards": db.all(
                "select id, nid, did, ord, type, queue, due, ivl, factor, reps, lapses"
                " from cards order by id"
            ),
            "revlog": db.all(
                "select id, cid, ease, ivl, lastIvl, factor, time, type from revlog order by id"
            ),
            "decks": sorted([d["id"], d["name"]] for d in decks),
            "deck_to_config": sorted([d["id"], d["conf"]] for d in decks if not d["dyn"]),
            "notetypes": sorted(
                [
                    m["id"],
                    m["name"],
                    [f["name"] for f in m["flds"]],
                    [t["name"] for t in m["tmpls"]],
                ]
                for m in col.models.all()
            ),
            "tags": sorted(col.tags.all()),
            "deck_configs": sorted(
                [
                    c["id"],
                    c["name"],
                    c["new"]["perDay"],
                    c["rev"]["perDay"],
                    c["new"]["delays"],
                    c["lapse"]["delays"],
                    c["maxTaken"],
                ]
                for c in col.decks.all_config()
            ),
        }
    )


# Small shims where anki 2.1.26 (camelCase API) differs from 2.1.54 and 26.x.


def _notetype(col, name):
    models = col.models
    return models.by_name(name) if hasattr(models, "by_name") else models.byName(name)


def _get_note(col, nid):
    return col.get_note(nid) if hasattr(col, "get_note") else col.getNote(nid)


def _update_note(col, note):
    if hasattr(col, "update_note"):
        col.update_note(note)
    else:
        note.flush()


def _add(col, notetype, deck, fields, tags=()):
    did = col.decks.id(deck)
    model = _notetype(col, notetype)
    if hasattr(col, "new_note"):
        note = col.new_note(model)
    else:  # anki 2.1.26: new cards go to the note type's current deck
        from anki.notes import Note

        model["did"] = did
        note = Note(col, model)
    for i, value in enumerate(fields):
        note.fields[i] = value
    for tag in tags:
        if hasattr(note, "add_tag"):
            note.add_tag(tag)
        else:
            note.addTag(tag)
    if hasattr(col, "add_note"):
        col.add_note(note, did)
    else:
        col.addNote(note)
    return note.id


@op
def build_sample(col):
    """A small but varied collection: nested decks, three note types, tags, reviews,
    an extra deck options preset. Returns the note ids."""
    if col.sched_ver() == 1:  # anki 2.1.54 may create v1 collections
        col.upgrade_to_v2_scheduler()
    col.set_v3_scheduler(True)  # modern clients can only review with v3
    nids = []
    verbs = ["gehen", "sehen", "machen", "sagen", "kommen", "wissen", "nehmen", "geben"]
    for i, verb in enumerate(verbs):
        nids.append(
            _add(col, "Basic", "Lang::Deutsch::Verben", [verb, "to %s #%d" % (verb, i)],
                 ["wort", "verb"])
        )
    for noun in ["Haus", "Baum", "Straße", "Mädchen"]:
        nids.append(
            _add(col, "Basic (and reversed card)", "Lang::Deutsch::Nomen", [noun, noun.lower()],
                 ["wort", "nomen"])
        )
    for word, meaning in [("猫", "cat"), ("犬", "dog"), ("日本語", "Japanese")]:
        nids.append(_add(col, "Basic", "Lang::日本語", [word, meaning], ["日本語"]))
    for i in range(3):
        nids.append(
            _add(col, "Cloze", "Math",
                 ["{{c1::%d}} + {{c2::%d}} = %d" % (i, i + 1, 2 * i + 1), "extra %d" % i],
                 ["math"])
        )
    # A separate options preset for the verbs deck.
    conf_id = col.decks.add_config_returning_id("Intensiv")
    conf = col.decks.get_config(conf_id)
    conf["new"]["perDay"] = 50
    col.decks.update_config(conf)
    verben = col.decks.get(col.decks.id("Lang::Deutsch::Verben"))
    col.decks.set_config_id_for_deck_dict(verben, conf_id)
    review(col, "Lang", 6)
    review(col, "Math", 3, eases=[1, 4])
    return nids


@op
def review(col, deck, count, eases=(3, 4, 2, 1)):
    """Answer the first `count` cards (by id) of `deck` and its children, cycling through
    `eases`. Cards are picked by id rather than from the study queue: anki 2.1.54's v3
    queue occasionally came back empty right after switching decks."""
    cids = sorted(col.find_cards('"deck:%s"' % deck))[:count]
    for i, cid in enumerate(cids):
        card = col.get_card(cid)
        card.start_timer()
        col.sched.answerCard(card, eases[i % len(eases)])
    return cids


@op
def add_notes(col, deck, prefix, count, notetype="Basic", tags=()):
    return [
        _add(col, notetype, deck, ["%s %d" % (prefix, i), "back %d" % i], tags)
        for i in range(count)
    ]


@op
def add_notes_with_fronts(col, deck, fronts):
    return [_add(col, "Basic", deck, [front, "back"]) for front in fronts]


@op
def edit_note(col, nid, field, value):
    note = _get_note(col, nid)
    note[field] = value
    _update_note(col, note)
    return note.mod


@op
def tag_note(col, nid, tag):
    note = _get_note(col, nid)
    note.add_tag(tag)
    _update_note(col, note)


@op
def delete_notes(col, nids):
    col.remove_notes(nids)


@op
def rename_deck(col, old, new):
    col.decks.rename(col.decks.id(old), new)


@op
def set_new_per_day(col, conf_name, per_day):
    conf = [c for c in col.decks.all_config() if c["name"] == conf_name][0]
    conf["new"]["perDay"] = per_day
    col.decks.update_config(conf)


@op
def add_field(col, notetype, field):
    # Changing a note type's fields is a schema change: the next sync must be full.
    col.mod_schema(check=False)
    model = col.models.by_name(notetype)
    col.models.add_field(model, col.models.new_field(field))
    col.models.save(model)


@op
def note_fields(col, nid):
    return dict(_get_note(col, nid).items())


@op
def find_notes(col, query):
    return list(col.find_notes(query) if hasattr(col, "find_notes") else col.findNotes(query))


@op
def use_v2_scheduler(col):
    """anki 2.1.26 creates collections on the v1 scheduler, which modern clients no
    longer support; its users could switch to v2 in the preferences."""
    if col.schedVer() == 1:
        col.changeSchedulerVer(2)


@op
def wait_for_file(col, path, delay=0.0, timeout=30, ready=None):
    """Block until `path` exists, then `delay` seconds more: the starting gun that lets
    devices in different processes begin a sync within a millisecond of each other.
    The file `ready`, made first, tells the starter that this device is waiting."""
    if ready:
        open(ready, "w").close()
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if time.time() > deadline:
            raise TimeoutError(path)
        time.sleep(0.0005)
    time.sleep(delay)


# --- media ---------------------------------------------------------------------------


def media_content(seed, size):
    """Deterministic pseudo-random bytes, incompressible like real images/audio."""
    return random.Random(seed).randbytes(size)


@op
def write_media(col, files):
    """files: [[desired_name, size, seed], ...]. Written through the client's media
    API, which normalizes names (NFC etc.). Returns the names actually used."""
    return [col.media.write_data(name, media_content(seed, size)) for name, size, seed in files]


@op
def write_raw_media(col, files):
    """Drop files straight into the media folder under the exact (maybe NFD) name, then
    run Check Media like a user would; it renames non-NFC names so they can sync."""
    folder = col.media.dir()
    before = set(os.listdir(folder))
    for name, size, seed in files:
        with open(os.path.join(folder, name), "wb") as f:
            f.write(media_content(seed, size))
    col.media.check()
    return sorted(set(os.listdir(folder)) - before)


@op
def delete_media(col, names):
    # A plain file deletion, as when the user removes a file in the media folder (the
    # sync's folder scan turns it into a deletion that is sent to the server).
    for name in names:
        os.remove(os.path.join(col.media.dir(), name))


@op
def media_files(col):
    """{name: sha1} of the media folder."""
    folder = col.media.dir()
    out = {}
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[name] = hashlib.sha1(f.read()).hexdigest()
    return out


def sync_collection(col, sync):
    """Run one collection sync (`sync` does the client call and returns its output).
    Returns 'no_changes' | 'normal_sync' | 'full_sync' | 'full_download' | 'full_upload'.

    After a successful normal sync the clients themselves report NO_CHANGES ("nothing
    more to do"), so a completed normal sync is recognised by the col.ls (last sync)
    stamp, which only a normal sync moves."""
    last_sync = col.db.scalar("select ls from col")
    out = sync()
    outcome = out.ChangesRequired.Name(out.required).lower()
    if outcome == "no_changes" and col.db.scalar("select ls from col") != last_sync:
        outcome = "normal_sync"
    return outcome, out


# =====================================================================================
# Part 2. Legacy client driver: runs inside the anki 2.1.54 venv (Python 3.9).
#
#   python test_ankisync.py legacy-client '{"path": ..., "endpoint": "http://h:p/",
#       "user": ..., "password": ..., "hkey": ..., "steps": [["op", {kwargs}], ...]}'
#
# Steps are collection operations from Part 1 plus the sync verbs login, sync,
# full_upload, full_download, sync_media. The answer is one JSON line on stdout,
# prefixed with RESULT_PREFIX: {"hkey": ..., "results": [...]}.
# =====================================================================================

RESULT_PREFIX = "ANKISYNC-TEST-RESULT:"
SYNC_VERBS = ("login", "sync", "sync_told", "full_upload", "full_download", "sync_media")


def legacy_main(argv):
    cmd = json.loads(argv[0])
    base = cmd["endpoint"]
    # anki 2.1.54 (Rust sync) reads its endpoints from these variables.
    os.environ["SYNC_ENDPOINT"] = base + "sync/"
    os.environ["SYNC_ENDPOINT_MEDIA"] = base + "msync/"
    import anki.sync

    python_sync = hasattr(anki.sync, "FullSyncer")  # anki <= 2.1.27: sync code in Python
    if python_sync:
        from anki.storage import Collection

        # URL = SYNC_BASE % hostNum ("" here) + "sync/" + method
        anki.sync.SYNC_BASE = base + "%s"
        run_sync_verb = python_sync_verb
    else:
        from anki.collection import Collection

        run_sync_verb = rust_sync_verb

    state = {"col": Collection(cmd["path"]), "hkey": cmd.get("hkey"), "cmd": cmd,
             "Collection": Collection}
    results = []
    try:
        for name, kwargs in cmd["steps"]:
            if name in SYNC_VERBS:
                result = run_sync_verb(state, name)
            else:
                result = OPS[name](state["col"], **kwargs)
                state["col"].save()
            results.append(result)
    finally:
        if state["col"] is not None and state["col"].db:
            state["col"].close()
    sys.stdout.write(RESULT_PREFIX + json.dumps({"hkey": state["hkey"], "results": results})
                     + "\n")
    return 0


def rust_sync_verb(state, verb):
    """anki 2.1.28-2.1.56: the Rust backend syncs (protocol 10)."""
    from anki.sync import SyncAuth

    col, cmd = state["col"], state["cmd"]
    if verb == "login":
        state["hkey"] = col.sync_login(cmd["user"], cmd["password"]).hkey
        return None
    auth = SyncAuth(hkey=state["hkey"], host_number=0)
    if verb in ("sync", "sync_told"):
        # Like aqt: commit the open transaction before a sync, open a new one after.
        col.save(trx=False)
        try:
            outcome, out = sync_collection(col, lambda: col.sync_collection(auth))
        finally:
            col.db.begin()
        # sync_told: the message the device shows too (meta's msg).
        return outcome if verb == "sync" else [outcome, out.server_message]
    if verb == "sync_media":
        col.save()
        col.sync_media(auth)  # blocking in 2.1.54; raises on error
        return None
    col.close_for_full_sync()
    try:
        getattr(col, verb)(auth)  # full_upload / full_download
    finally:
        col.reopen(after_full_sync=True)


def python_sync_verb(state, verb):
    """anki 2.1.26: anki/sync.py (protocol 10), as driven by aqt/sync.py."""
    from anki.sync import FullSyncer, RemoteServer, Syncer

    col, cmd = state["col"], state["cmd"]
    server = RemoteServer(state["hkey"], hostNum=None)
    if verb == "login":
        state["hkey"] = server.hostKey(cmd["user"], cmd["password"])
        assert state["hkey"], "login refused"
        return None
    if verb == "sync":
        ret = Syncer(col, server).sync()
        outcomes = {"noChanges": "no_changes", "success": "normal_sync",
                    "fullSync": "full_sync"}
        if ret not in outcomes:
            raise RuntimeError("sync failed: %s" % ret)
        return outcomes[ret]
    if verb == "sync_media":
        raise NotImplementedError("media sync is not driven for anki 2.1.26")
    full = FullSyncer(col, state["hkey"], server.client, hostNum=None)
    try:
        if verb == "full_upload":
            assert full.upload(), "full upload failed"
        else:
            ret = full.download()
            assert ret is None, ret
    finally:
        state["col"] = state["Collection"](cmd["path"])  # both close the collection


if __name__ == "__main__" and sys.argv[1:2] == ["legacy-client"]:
    sys.exit(legacy_main(sys.argv[2:]))


# =====================================================================================
# Part 3. The pytest harness and the stories.
# =====================================================================================

import base64  # noqa: E402
import concurrent.futures  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import errno  # noqa: E402
import fcntl  # noqa: E402
import functools  # noqa: E402
import glob  # noqa: E402
import gzip  # noqa: E402
import html  # noqa: E402
import http.client  # noqa: E402
import io  # noqa: E402
import ipaddress  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import pty  # noqa: E402
import pwd  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import resource  # noqa: E402
import select  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sqlite3  # noqa: E402
import ssl  # noqa: E402
import stat  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import tracemalloc  # noqa: E402
import types  # noqa: E402
import urllib.parse  # noqa: E402
import urllib.request  # noqa: E402
import zipfile  # noqa: E402
import zlib  # noqa: E402
import argparse  # noqa: E402

import pytest  # noqa: E402
import zstandard  # noqa: E402
from anki import generic_pb2  # noqa: E402
from anki._backend import RustBackend  # noqa: E402
from google.protobuf.internal import decoder as protobuf_decoder  # noqa: E402
from google.protobuf.message import DecodeError  # noqa: E402
from google.protobuf.unknown_fields import UnknownFieldSet  # noqa: E402
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from anki.collection import Collection  # noqa: E402
from anki.sync import SyncAuth  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import ankisync  # noqa: E402

SERVER_KIND = os.environ.get("ANKISYNC_TEST_SERVER", "ankisync")
CACHE = os.path.expanduser(os.environ.get("ANKISYNC_TEST_CACHE", "~/.cache/ankisync-tests"))
ANKISYNC_PY = os.path.join(HERE, "ankisync.py")
USER, PASSWORD = "user", "pass"
# The tests may run in a container themselves; the stories are of a server on a machine
# of its own unless a test says otherwise (ankisync.in_container).
os.environ["ANKISYNC_CONTAINER"] = "0"
# The marks (fullsync, normalsync, media, legacy) are declared in pyproject.toml.


def wait_until(condition, timeout, what, every=0.05):
    """Ask `condition()` every `every` seconds until it answers something true, and return
    that; fail, saying `what` was awaited, once `timeout` seconds have gone by without."""
    deadline = time.monotonic() + timeout
    while True:
        answer = condition()
        if answer:
            return answer
        if time.monotonic() > deadline:
            raise AssertionError("waited %s s in vain for %s" % (timeout, what))
        time.sleep(every)


# --- the server ------------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SyncServer:
    """One server process on 127.0.0.1 with its own data folder (`base`): the one way
    the tests start a server, most often through the start_server fixture.

    kind: "ankisync", or "official" (the one in the anki wheel);
    users: (name, password) pairs, given as SYNC_USER1, SYNC_USER2, ...;
    env: more variables for the process (they override SYNC_BASE and the rest);
    ini: lines of the [server] section of an ini of its own, passed with --config
        (ankisync only), for the settings the official server's variables have no
        names for; SYNC_* still override it;
    certificate: a make_certificate() to serve HTTPS with (through the ini);
    self_signed: serve HTTPS from the server's own private CA (tls = self-signed); the
        tests' own requests then skip verification, as a browser's first visit would;
    prepare: prepare(base) runs once, on the new data folder, before the first start;
    port: a given one, as when a server takes over another's data and clients.
    """

    def __init__(self, base, kind="ankisync", users=((USER, PASSWORD),), env=None, ini=None,
                 certificate=None, prepare=None, port=None, self_signed=False):
        self.kind = kind
        self.base = base
        self.users = list(users)
        self.env = dict(env or {})
        self.port = port or free_port()
        self.ssl_context = None         # an HTTPS server's: what clients trust
        if certificate is not None:
            ini = (ini or "") + "certfile = %s\nkeyfile = %s\n" % (certificate.cert,
                                                                   certificate.key)
            self.ssl_context = ssl.create_default_context(cafile=certificate.ca)
        if self_signed:
            ini = (ini or "") + "tls = self-signed\n"
            self.ssl_context = ssl._create_unverified_context()
        scheme = "http" if self.ssl_context is None else "https"
        self.url = "%s://127.0.0.1:%d/" % (scheme, self.port)
        self.log_path = "%s-%s.log" % (base, kind)
        self.config_path = None
        if ini is not None:
            assert kind == "ankisync", "the official server reads no ini"
            self.config_path = base + ".ini"
            with open(self.config_path, "w") as f:
                f.write("[server]\n" + ini)
        self.proc = None
        self.stopped = False            # by the test, on purpose: no death to report
        os.makedirs(base, exist_ok=True)
        if prepare is not None:
            prepare(base)

    def command(self):
        if self.kind == "official":
            return [sys.executable, "-m", "anki.syncserver"]
        # CI also runs the stories with the server on the oldest Python it supports.
        python = os.environ.get("ANKISYNC_TEST_SERVER_PYTHON") or sys.executable
        config = ["--config", self.config_path] if self.config_path else []
        return [python, ANKISYNC_PY] + config + ["serve"]

    def start(self):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SYNC_")}
        env.update(SYNC_BASE=self.base, SYNC_HOST="127.0.0.1", SYNC_PORT=str(self.port))
        env.update(self.env)
        for i, (name, password) in enumerate(self.users, 1):
            env["SYNC_USER%d" % i] = "%s:%s" % (name, password)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), env=env, stdout=log, stderr=log,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.stopped = False
        log.close()
        deadline = time.time() + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited with %s:\n%s" % (self.proc.returncode,
                                                                  self.log_tail()))
            try:
                with urllib.request.urlopen(self.url + "health", timeout=2,
                                            context=self.ssl_context) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.time() > deadline:
                self.kill()
                raise RuntimeError("server not ready after 20s:\n" + self.log_tail())
            time.sleep(0.05)

    def kill(self):
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.stopped = True

    def stop(self):
        """Polite stop (SIGTERM, then SIGKILL after 5 s)."""
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()
            self.stopped = True

    def restart(self):
        self.stop()
        self.start()  # same port and data: clients keep their endpoint and keys

    def add_user(self, name, password):
        self.users.append((name, password))
        self.restart()

    def died(self):
        """True if the process ended without the test ending it."""
        return self.proc is not None and self.proc.poll() is not None and not self.stopped

    def log(self):
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def log_tail(self, lines=80):
        try:
            text = self.log()
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@pytest.fixture
def start_server(tmp_path):
    """start_server(base=None, **options) -> a running SyncServer, the options as
    SyncServer takes them, its data folder a new one in tmp_path unless `base` names
    one. At the end of the test each is killed and its log shown (in a failing test's
    report); the test fails if one had died."""
    servers = []

    def start(base=None, **options):
        srv = SyncServer(base or str(tmp_path / ("server-%d" % len(servers))), **options)
        servers.append(srv)
        srv.start()
        return srv

    yield start
    for srv in servers:
        died = srv.died()
        srv.kill()
        # Printed output only shows up in the report of a failing test.
        print("---- %s server log (tail) ----\n%s" % (srv.kind, srv.log_tail()))
        if died:
            pytest.fail("the sync server died during the test")


@pytest.fixture
def server(start_server):
    """The server of the stories: the official one or ankisync (ANKISYNC_TEST_SERVER),
    with one user."""
    return start_server(kind=SERVER_KIND)


# --- devices ---------------------------------------------------------------------------


class ModernDevice:
    """An anki 26.x profile inside this process (protocol v11)."""

    kind = "modern"

    def __init__(self, name, folder, server, user=USER, password=PASSWORD):
        self.name = name
        self.server = server
        self.user, self.password = user, password
        os.makedirs(folder, exist_ok=True)
        self.col = Collection(os.path.join(folder, "collection.anki2"))
        self.auth = None

    def __repr__(self):
        return "<%s %s>" % (self.kind, self.name)

    def do(self, name, **kwargs):
        return OPS[name](self.col, **kwargs)

    def login(self):
        self.auth = self.col.sync_login(self.user, self.password, self.server.url)

    def sync(self):
        if self.auth is None:
            self.login()
        # sync_media=False: media is synced separately, when a story says so.
        outcome, out = sync_collection(self.col,
                                       lambda: self.col.sync_collection(self.auth, False))
        if out.new_endpoint:
            self.auth.endpoint = out.new_endpoint
        return outcome

    def sync_told(self):
        """A sync, and the message the device shows with it (meta's msg)."""
        if self.auth is None:
            self.login()
        outcome, out = sync_collection(self.col,
                                       lambda: self.col.sync_collection(self.auth, False))
        return outcome, out.server_message

    def sync_on_signal(self, go_file, delay, ready):
        wait_for_file(self.col, go_file, delay, ready=ready)
        return self.sync()

    def _full(self, upload):
        if self.auth is None:
            self.login()
        self.col.close_for_full_sync()
        try:
            # server_usn=None: no media sync piggy-backed on the full sync.
            self.col.full_upload_or_download(auth=self.auth, server_usn=None, upload=upload)
        finally:
            self.col.reopen(after_full_sync=True)

    def full_upload(self):
        self._full(True)

    def full_download(self):
        self._full(False)

    def sync_media(self, timeout=120):
        if self.auth is None:
            self.login()
        self.col.sync_media(self.auth)
        deadline = time.time() + timeout
        # media_sync_status() raises if the background media sync failed.
        while self.col.media_sync_status().active:
            if time.time() > deadline:
                self.col.abort_media_sync()
                raise TimeoutError("media sync still running after %ss" % timeout)
            time.sleep(0.05)

    def snapshot(self):
        return snapshot(self.col)

    def media_files(self):
        return media_files(self.col)

    def media_folder(self):
        return self.col.media.dir()

    def close(self):
        if self.col.db:
            self.col.close()


class LegacyDevice:
    """An anki 2.1.54 ("legacy") or 2.1.26 ("py26") profile, both protocol v10, driven
    through one subprocess per call (see legacy_main)."""

    def __init__(self, kind, name, folder, server, python, user=USER, password=PASSWORD):
        self.kind = kind
        self.name = name
        self.server = server
        self.python = python
        self.user, self.password = user, password
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, "collection.anki2")
        self.hkey = None

    def __repr__(self):
        return "<%s %s>" % (self.kind, self.name)

    def run(self, *steps):
        cmd = {"path": self.path, "endpoint": self.server.url, "user": self.user,
               "password": self.password, "hkey": self.hkey,
               "steps": [[name, kwargs] for name, kwargs in steps]}
        proc = subprocess.run([self.python, os.path.abspath(__file__), "legacy-client",
                               json.dumps(cmd)], capture_output=True, timeout=300)
        stdout = proc.stdout.decode("utf-8", "replace")
        lines = [line for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
        if proc.returncode != 0 or not lines:
            raise LegacyClientError("legacy client failed (%s) running %s:\n%s\n%s" % (
                proc.returncode, [s[0] for s in steps], stdout[-3000:],
                proc.stderr.decode("utf-8", "replace")[-5000:]))
        answer = json.loads(lines[-1][len(RESULT_PREFIX):])
        self.hkey = answer["hkey"]
        return answer["results"]

    def do(self, name, **kwargs):
        return self.run((name, kwargs))[0]

    def login(self):
        self.run(("login", {}))

    def _sync_verb(self, verb):
        steps = [(verb, {})] if self.hkey else [("login", {}), (verb, {})]
        return self.run(*steps)[-1]

    def sync(self):
        return self._sync_verb("sync")

    def sync_told(self):
        return tuple(self._sync_verb("sync_told"))

    def sync_on_signal(self, go_file, delay, ready):
        steps = [] if self.hkey else [("login", {})]
        steps += [("wait_for_file", {"path": go_file, "delay": delay, "ready": ready}),
                  ("sync", {})]
        return self.run(*steps)[-1]

    def full_upload(self):
        self._sync_verb("full_upload")

    def full_download(self):
        self._sync_verb("full_download")

    def sync_media(self):
        self._sync_verb("sync_media")

    def snapshot(self):
        return self.do("snapshot")

    def media_files(self):
        return self.do("media_files")

    def media_folder(self):
        return os.path.splitext(self.path)[0] + ".media"    # as anki names it

    def close(self):
        pass


class LegacyClientError(Exception):
    pass


# --- the legacy venv (built once, cached) ----------------------------------------------

# Upper bounds that keep pip from wandering through releases that do not support
# Python 3.9 (slow backtracking with file:// mirrors), and protobuf 3.x, which the
# generated code in anki 2.1.54 needs.
LEGACY_REQUIREMENTS = [
    "anki==2.1.54", "protobuf>=3.17,<4", "requests<2.33", "urllib3<2.3", "markdown<3.8",
    "importlib-metadata<8", "beautifulsoup4<4.13", "soupsieve<2.7", "orjson<3.11",
    "decorator<5.2", "typing-extensions<4.13", "charset-normalizer<3.5", "idna<3.11",
    "zipp<3.21",
]


def find_python(version):
    """A Python `version` ("3.9") on PATH as pythonX.Y or under ~/.pyenv/versions."""
    candidates = [shutil.which("python" + version)]
    candidates += sorted(glob.glob(os.path.expanduser(
        "~/.pyenv/versions/%s.*/bin/python%s" % (version, version))), reverse=True)
    for candidate in candidates:
        if candidate and subprocess.run(
                [candidate, "-c", "import sys, venv; assert sys.version_info[:2] == (%s)"
                 % version.replace(".", ", ")], capture_output=True).returncode == 0:
            return candidate
    return None


def ensure_venv(name, python_version, requirement_sets):
    """<cache>/<name>: a venv on Python `python_version` with the given pip installs,
    built once. A marker file tells a finished venv from a half-built one."""
    venv = os.path.join(CACHE, name)
    python = os.path.join(venv, "bin", "python")
    marker = os.path.join(venv, ".ankisync-tests-ready")
    os.makedirs(CACHE, exist_ok=True)
    with open(os.path.join(CACHE, name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test runs build it only once
        if os.path.exists(marker):
            return python
        base_python = find_python(python_version)
        if base_python is None:
            pytest.skip("%s needs Python %s (python%s on PATH or ~/.pyenv/versions)"
                        % (name, python_version, python_version))
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([base_python, "-m", "venv", venv], check=True)
        for requirements in requirement_sets:
            proc = subprocess.run([python, "-m", "pip", "install", "-q"] + requirements,
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError("pip install %s failed:\n%s" % (requirements,
                                                                    proc.stderr[-3000:]))
        open(marker, "w").close()
        return python


@pytest.fixture(scope="session")
def legacy_python():
    return ensure_venv("venv-anki-2.1.54", "3.9", [LEGACY_REQUIREMENTS])


@pytest.fixture(scope="session")
def py26_python():
    # ankirspy 2.1.26 has wheels for CPython 3.7/3.8 only; anki 2.1.26 itself is pure
    # Python and pins nothing, so its dependencies are capped by hand.
    return ensure_venv("venv-anki-2.1.26", "3.8", [
        ["--no-deps", "anki==2.1.26", "ankirspy==2.1.26"],
        ["beautifulsoup4<4.13", "decorator<5", "distro<1.10", "orjson<3.10",
         "protobuf<3.21", "requests[socks]<2.32", "urllib3<2.3", "soupsieve<2.7",
         "charset-normalizer<3.5", "idna<3.11", "typing-extensions<4.13"],
    ])


@pytest.fixture
def make_device(server, tmp_path, request):
    """make_device(kind, name) -> a fresh device (empty profile) of that generation:
    "modern" (anki 26.x), "legacy" (anki 2.1.54) or "py26" (anki 2.1.26)."""
    devices = []

    def make(kind, name, user=USER, password=PASSWORD, on=None):
        folder = str(tmp_path / name)
        if kind == "modern":
            device = ModernDevice(name, folder, on or server, user, password)
        else:
            python = request.getfixturevalue({"legacy": "legacy_python",
                                              "py26": "py26_python"}[kind])
            device = LegacyDevice(kind, name, folder, on or server, python, user, password)
        devices.append(device)
        return device

    yield make
    for device in devices:
        device.close()


GENERATION_PAIRS = [
    pytest.param("modern", "modern", id="modern-modern"),
    pytest.param("legacy", "legacy", id="legacy-legacy", marks=pytest.mark.legacy),
    pytest.param("modern", "legacy", id="modern-legacy", marks=pytest.mark.legacy),
    pytest.param("legacy", "modern", id="legacy-modern", marks=pytest.mark.legacy),
]


# --- story helpers ---------------------------------------------------------------------


def first_upload(device):
    """The first device of an account: the server is empty, so sync asks for a full
    upload, which the device does."""
    outcome = device.sync()
    # Modern clients know the server is empty ("full_upload"); the answer may also be
    # the generic "full_sync" (then the user would choose; we choose upload).
    assert outcome in ("full_upload", "full_sync"), outcome
    device.full_upload()


def join_by_download(device):
    """A new, empty device joins an account that has data: full download."""
    outcome = device.sync()
    assert outcome in ("full_download", "full_sync"), outcome
    device.full_download()


def assert_same(a, b):
    sa, sb = a.snapshot(), b.snapshot()
    for key in sa:
        assert sa[key] == sb[key], "%s differs between %r and %r" % (key, a, b)
    return sa


def set_up_pair(make_device, gen_laptop, gen_phone):
    """The usual start: the laptop has a collection and uploads it, the phone joins."""
    laptop = make_device(gen_laptop, "laptop")
    nids = laptop.do("build_sample")
    first_upload(laptop)
    phone = make_device(gen_phone, "phone")
    join_by_download(phone)
    return laptop, phone, nids


def sync_normally(device):
    outcome = device.sync()
    assert outcome in ("normal_sync", "no_changes"), "%r: %s" % (device, outcome)
    return outcome


# =====================================================================================
# Stories: full sync (issue "core")
# =====================================================================================


@pytest.mark.fullsync
@pytest.mark.parametrize("gen_laptop,gen_phone", GENERATION_PAIRS)
def test_laptop_uploads_phone_downloads(make_device, gen_laptop, gen_phone):
    laptop = make_device(gen_laptop, "laptop")
    nids = laptop.do("build_sample")
    first_upload(laptop)
    # Nothing changed since the upload: the laptop's next sync has nothing to do.
    assert laptop.sync() == "no_changes"

    phone = make_device(gen_phone, "phone")
    join_by_download(phone)
    state = assert_same(laptop, phone)
    assert len(state["notes"]) == len(nids) == 18
    assert len(state["revlog"]) >= 9
    assert ["Lang::Deutsch::Verben"] == [n for _, n in state["decks"] if n.endswith("Verben")]
    assert "Intensiv" in [c[1] for c in state["deck_configs"]]

    # Both devices keep syncing normally afterwards, and nobody asks for a full sync.
    sync_normally(laptop)
    sync_normally(phone)
    assert phone.sync() == "no_changes"
    assert_same(laptop, phone)


@pytest.mark.fullsync
def test_server_restart_keeps_the_collection(server, make_device):
    laptop = make_device("modern", "laptop")
    laptop.do("build_sample")
    first_upload(laptop)
    server.restart()
    assert laptop.sync() == "no_changes"  # the old host key still works
    phone = make_device("modern", "phone")
    join_by_download(phone)
    assert_same(laptop, phone)


@pytest.mark.fullsync
def test_second_user_gets_a_separate_collection(server, make_device):
    laptop = make_device("modern", "laptop")
    laptop.do("build_sample")
    first_upload(laptop)
    server.add_user("zweiter", "geheim")
    other = make_device("modern", "other", user="zweiter", password="geheim")
    other.do("add_notes", deck="Privat", prefix="nur meins", count=2)
    first_upload(other)  # the second account is still empty: upload, not download
    assert laptop.sync() == "no_changes"
    assert len(other.snapshot()["notes"]) == 2
    with pytest.raises(Exception):
        make_device("modern", "intruder", user="zweiter", password="falsch").login()


# =====================================================================================
# Stories: normal (incremental) sync (issue "incremental")
# =====================================================================================


@pytest.mark.normalsync
@pytest.mark.parametrize("gen_laptop,gen_phone", GENERATION_PAIRS)
def test_laptop_adds_phone_studies_and_edits_laptop_receives_all(make_device, gen_laptop,
                                                                 gen_phone):
    laptop, phone, nids = set_up_pair(make_device, gen_laptop, gen_phone)
    revlog_before = len(laptop.snapshot()["revlog"])

    # New notes written on the laptop show up on the phone.
    new = laptop.do("add_notes", deck="Lang::Deutsch::Verben", prefix="laufen", count=3,
                    tags=["neu"])
    assert laptop.sync() == "normal_sync"
    assert phone.sync() == "normal_sync"
    assert sorted(phone.do("find_notes", query="tag:neu")) == sorted(new)

    # The phone edits, deletes, studies, renames a deck, tags, changes options.
    phone.do("edit_note", nid=nids[0], field="Back", value="to go (edited on the phone)")
    phone.do("delete_notes", nids=[nids[1], new[0]])
    phone.do("review", deck="Lang::Deutsch::Nomen", count=3)
    phone.do("rename_deck", old="Lang::Deutsch::Nomen", new="Lang::Deutsch::Substantive")
    phone.do("tag_note", nid=nids[2], tag="wichtig")
    phone.do("set_new_per_day", conf_name="Default", per_day=33)
    assert phone.sync() == "normal_sync"
    assert laptop.sync() == "normal_sync"

    state = assert_same(laptop, phone)
    assert laptop.do("note_fields", nid=nids[0])["Back"] == "to go (edited on the phone)"
    assert laptop.do("find_notes", query="nid:%d,%d" % (nids[1], new[0])) == []
    assert len(state["revlog"]) == revlog_before + 3
    deck_names = [name for _, name in state["decks"]]
    assert "Lang::Deutsch::Substantive" in deck_names
    assert "Lang::Deutsch::Nomen" not in deck_names
    assert "wichtig" in state["tags"]
    assert [c[2] for c in state["deck_configs"] if c[1] == "Default"] == [33]

    # Nothing is left over: a second sync right away has nothing to do.
    assert laptop.sync() == "no_changes"


@pytest.mark.normalsync
@pytest.mark.parametrize("newer_syncs_first", [True, False], ids=["newer-first", "older-first"])
@pytest.mark.parametrize("gen_laptop,gen_phone", GENERATION_PAIRS[:2] + GENERATION_PAIRS[3:])
def test_same_note_edited_on_both_newer_edit_wins(make_device, gen_laptop, gen_phone,
                                                  newer_syncs_first):
    laptop, phone, nids = set_up_pair(make_device, gen_laptop, gen_phone)
    laptop.do("edit_note", nid=nids[3], field="Back", value="older, from the laptop")
    # A note's mtime has one-second resolution: the phone edits in a later second.
    edited = time.time()
    wait_until(lambda: time.time() >= int(edited) + 1, timeout=5, every=0.01,
               what="the second after the laptop's edit")
    phone.do("edit_note", nid=nids[3], field="Back", value="newer, from the phone")

    order = [phone, laptop, phone] if newer_syncs_first else [laptop, phone, laptop]
    for device in order:
        sync_normally(device)
    assert_same(laptop, phone)
    for device in (laptop, phone):
        assert device.do("note_fields", nid=nids[3])["Back"] == "newer, from the phone"


@pytest.mark.normalsync
@pytest.mark.parametrize("gen_laptop,gen_phone", GENERATION_PAIRS)
def test_phone_adds_a_field_forcing_full_sync_laptop_downloads(make_device, gen_laptop,
                                                               gen_phone):
    laptop, phone, nids = set_up_pair(make_device, gen_laptop, gen_phone)

    phone.do("add_field", notetype="Basic", field="Beispiel")
    assert phone.sync() == "full_sync"  # both sides have cards: the user must choose
    phone.full_upload()
    assert phone.sync() == "no_changes"
    assert laptop.sync() == "full_sync"
    laptop.full_download()
    state = assert_same(laptop, phone)
    basic = [m for m in state["notetypes"] if m[1] == "Basic"][0]
    assert basic[2] == ["Front", "Back", "Beispiel"]
    sync_normally(laptop)


def clock_past(ids):
    """Wait until the clock has passed the newest of these note ids (times in ms), so
    that the next device's ids follow them. A card's id is minted with its note's, a
    moment later: a tenth of a second more covers it."""
    newest = max(ids) + 100
    wait_until(lambda: time.time() * 1000 > newest, timeout=30, every=0.01,
               what="the clock past note id %d" % newest)


def sync_simultaneously(devices, delays, tmp_path):
    """Make the devices start a sync at the same instant (plus their delays); return
    the outcomes, or the exceptions raised."""
    go_file = str(tmp_path / ("go-%f" % time.time()))
    ready = ["%s.ready-%d" % (go_file, i) for i in range(len(devices))]
    results = [None] * len(devices)

    def worker(i):
        try:
            results[i] = devices[i].sync_on_signal(go_file, delays[i], ready[i])
        except Exception as exc:  # a sync cut short by the other device's sync
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(devices))]
    for t in threads:
        t.start()
    # Legacy devices need a moment to start their process: the gun goes off once every
    # device waits for it (or has failed before).
    wait_until(lambda: all(os.path.exists(path) or results[i] is not None
                           for i, path in enumerate(ready)),
               timeout=120, what="both devices waiting for the gun", every=0.01)
    open(go_file, "w").close()
    for t in threads:
        t.join(300)
    return results


@pytest.mark.normalsync
@pytest.mark.parametrize("gen_laptop,gen_phone", [GENERATION_PAIRS[0], GENERATION_PAIRS[2]])
def test_two_devices_sync_at_the_same_moment(make_device, tmp_path, gen_laptop, gen_phone):
    laptop, phone, nids = set_up_pair(make_device, gen_laptop, gen_phone)
    added = set(nids)
    # Each round: both devices add notes, then sync together (a normal sync of 600 new
    # notes takes the official server only some 20 ms, hence the precise start).
    for round_no, delays in enumerate([(0, 0), (0.005, 0), (0, 0.005)]):
        # Note ids are creation times in ms, and adding many notes runs ahead of the
        # clock: two devices adding hundreds of notes in the same second would mint the
        # same ids (a client-side clash, not a server matter), hence the waits.
        laptop_ids = laptop.do("add_notes", deck="Math", prefix="laptop %d" % round_no,
                               count=600)
        clock_past(laptop_ids)
        phone_ids = phone.do("add_notes", deck="Math", prefix="phone %d" % round_no,
                             count=600)
        clock_past(phone_ids)
        added.update(laptop_ids + phone_ids)
        outcomes = sync_simultaneously([laptop, phone], delays, tmp_path)
        print("round %d outcomes:" % round_no,
              [o if isinstance(o, str) else str(o).strip().splitlines()[-1][:200]
               for o in outcomes])
        for outcome in outcomes:
            # One of them may be cut off by the other; none may demand a full sync.
            assert isinstance(outcome, Exception) or outcome in ("normal_sync", "no_changes")

    # A calm round afterwards brings both to the same state, with nothing lost.
    for device in (laptop, phone, laptop):
        sync_normally(device)
    state = assert_same(laptop, phone)
    assert added <= {row[0] for row in state["notes"]}


# =====================================================================================
# Stories: media sync (issue "media")
# =====================================================================================


def media_plan():
    """300 files: spaces, Japanese, accents typed as NFC and as NFD, sizes from one byte
    to a few MB, plus one 20 MB file. [desired_name, size, seed] like write_media."""
    rnd = random.Random(20240611)
    patterns = [
        "karte %03d.jpg",
        "音声ファイル_%03d.mp3",
        "日本語 の 画像 %03d.png",
        unicodedata.normalize("NFC", "café crème %03d.png"),
        unicodedata.normalize("NFD", "résumé à l'été %03d.txt"),  # normalized on write
        "Ünïcödé Ñame %03d.gif",
    ]
    plan = []
    for i in range(299):
        size = rnd.choice([rnd.randint(1, 200), rnd.randint(200, 60000), rnd.randint(1, 400000)])
        if i % 60 == 7:
            size = rnd.randint(1000000, 3000000)
        plan.append([patterns[i % len(patterns)] % i, size, 1000 + i])
    plan.append(["großes Video 20MB.mp4", 20 * 1024 * 1024, 7])
    return plan


def write_media_on(device, plan):
    """Write the planned files on `device`; return {stored name: sha1}."""
    names = device.do("write_media", files=plan)
    for name, (desired, _, _) in zip(names, plan):
        # Clients store NFC names; anki 26 also lower-cases them, 2.1.54 keeps the case.
        assert name in (unicodedata.normalize("NFC", desired),
                        unicodedata.normalize("NFC", desired).lower()), name
    return {name: hashlib.sha1(media_content(seed, size)).hexdigest()
            for name, (_, size, seed) in zip(names, plan)}


@pytest.mark.media
@pytest.mark.parametrize("gen_laptop,gen_phone", GENERATION_PAIRS)
def test_media_files_reach_the_other_device_and_deletions_follow(make_device, gen_laptop,
                                                                 gen_phone):
    laptop = make_device(gen_laptop, "laptop")
    phone = make_device(gen_phone, "phone")
    expected = write_media_on(laptop, media_plan())
    # Files dropped into the folder with NFD names, then renamed by Check Media.
    raw = [[unicodedata.normalize("NFD", "naïve Übung %d.txt" % i), 100 + i, 50 + i]
           for i in range(3)]
    renamed = laptop.do("write_raw_media", files=raw)
    assert [n.lower() for n in renamed] == [unicodedata.normalize("NFC", n).lower()
                                           for n, _, _ in raw]
    for name, (_, size, seed) in zip(renamed, raw):
        expected[name] = hashlib.sha1(media_content(seed, size)).hexdigest()
    assert laptop.media_files() == expected

    laptop.sync_media()
    phone.sync_media()
    assert phone.media_files() == expected

    # Deletions on both sides and an addition on the phone. In a later second, as in real
    # life: anki 2.1.54 only rescans the media folder when its mtime (in whole seconds)
    # differs from the one recorded at the last scan. (File times come from a clock that
    # may lag time.time() by a tick: hence the 50 ms more.)
    scanned = max(int(os.stat(device.media_folder()).st_mtime) for device in (laptop, phone))
    wait_until(lambda: time.time() >= scanned + 1.05, timeout=5, every=0.01,
               what="the second after the media folders' last change")
    names = sorted(expected)
    laptop_deletes, phone_deletes = names[:10], names[10:15]
    laptop.do("delete_media", names=laptop_deletes)
    phone.do("delete_media", names=phone_deletes)
    for name in laptop_deletes + phone_deletes:
        del expected[name]
    expected.update(write_media_on(phone, [["vom Handy %d.jpg" % i, 5000 + i, 900 + i]
                                           for i in range(3)]))

    for _ in range(2):
        laptop.sync_media()
        phone.sync_media()
    assert laptop.media_files() == expected
    assert phone.media_files() == expected


# =====================================================================================
# Story: a much older desktop (anki 2.1.26, sync code in Python)
# =====================================================================================


@pytest.mark.fullsync
@pytest.mark.normalsync
@pytest.mark.legacy
def test_old_2_1_26_desktop_uploads_and_keeps_syncing_with_modern_laptop(make_device):
    old = make_device("py26", "old-desktop")
    old.do("use_v2_scheduler")
    nids = old.do("add_notes", deck="Lang::Deutsch", prefix="Wort", count=5, tags=["wort"])
    first_upload(old)  # 2.1.26 only knows "full sync needed"; the story picks upload
    assert old.sync() == "no_changes"

    laptop = make_device("modern", "laptop")
    join_by_download(laptop)
    assert_same(old, laptop)

    # Normal syncs both ways.
    new = laptop.do("add_notes", deck="Lang::Deutsch", prefix="neu", count=2)
    assert laptop.sync() == "normal_sync"
    assert old.sync() == "normal_sync"
    assert sorted(old.do("find_notes", query="neu")) == sorted(new)
    old.do("edit_note", nid=nids[0], field="Back", value="edited on the old desktop")
    assert old.sync() == "normal_sync"
    assert laptop.sync() == "normal_sync"
    assert laptop.do("note_fields", nid=nids[0])["Back"] == "edited on the old desktop"
    assert_same(old, laptop)

    # And a second old desktop can start from what the modern laptop left on the server.
    old2 = make_device("py26", "old-desktop-2")
    join_by_download(old2)
    assert_same(old2, laptop)


# =====================================================================================
# Part 4. The pieces, one at a time, in the order of ankisync.py's sections: limits and
# errors, protocol words, configuration, users, envelopes, the collection store,
# collection sync, media sync, HTTP, the command line; then its appendices: zstd, the
# schema 18 -> 11 conversion (with the official backend as the oracle), a new collection,
# media zips, a private certificate authority.
# =====================================================================================


# --- helpers: requests spoken by hand, recorded traces, the command line, a phone ------


MIB = 1024 * 1024


TRACES = os.path.join(HERE, "testdata", "traces")


def traced_exchanges():
    for path in sorted(glob.glob(os.path.join(TRACES, "*", "*.json"))):
        with open(path) as f:
            yield os.path.relpath(path, TRACES), json.load(f)


def header(exchange, name):
    for key, value in exchange["request"]["headers"]:
        if key.lower() == name.lower():
            return value
    return None


def split_reader(data, step):
    """A read() that hands out at most `step` bytes, like a slow socket."""
    source = io.BytesIO(data)
    return lambda n=-1: source.read(min(n, step) if n and n > 0 else step)


class Response:
    """What the server answered, the one shape every request helper returns: the status,
    the headers (a dict, names as sent), the body (a modern answer's decompressed) and
    the HTTP version of the status line."""

    def __init__(self, status, headers, body, version="HTTP/1.1"):
        self.status = status
        self.headers = headers
        self.body = body
        self.version = version

    def json(self):
        return json.loads(self.body)

    def __repr__(self):         # what a failed assertion shows of it
        return "<Response %s %r>" % (self.status, self.body[:300])


def post(server, path, body=b"", headers=None, method="POST", source=None):
    """One request on a fresh connection, from 127.0.0.1 or the `source` address."""
    address = (source, 0) if source else None
    if server.ssl_context is not None:
        conn = http.client.HTTPSConnection("127.0.0.1", server.port, timeout=30,
                                           context=server.ssl_context, source_address=address)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30,
                                          source_address=address)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return Response(response.status, dict(response.getheaders()), response.read(),
                        "HTTP/%d.%d" % divmod(response.version, 10))
    finally:
        conn.close()


ZSTD = ankisync.choose_zstd()


def anki_sync_header(key, session="s1"):
    return {"anki-sync": json.dumps({"v": 11, "k": key, "c": "test,0,linux", "s": session})}


def modern(server, method, payload, key="", area="sync", session="s1", source=None):
    """A v11 request: `payload` as JSON (bytes as they are), zstd, the anki-sync header.
    The body of a 200 comes back decompressed."""
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    answer = post(server, "/%s/%s" % (area, method), ZSTD.compress(data),
                  anki_sync_header(key, session), source=source)
    if answer.status == 200:
        assert int(answer.headers["anki-original-size"]) >= 0
        answer.body = ZSTD.decompress(answer.body, 10**9)
    return answer


def legacy(server, method, fields, data=None, area="sync", gzip_data=True, data_first=False,
           source=None):
    """A legacy form: the short fields, then `data` (before them with data_first, as
    Anki 2.1.50+ sends it)."""
    parts = [b'--BB\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n'
             % (name.encode(), value.encode()) for name, value in fields.items()]
    if data is not None:
        payload = gzip.compress(data) if gzip_data else data
        part = (b'--BB\r\nContent-Disposition: form-data; name="data"; filename="data"\r\n'
                b"Content-Type: application/octet-stream\r\n\r\n" + payload + b"\r\n")
        parts.insert(0 if data_first else len(parts), part)
    body = b"".join(parts) + b"--BB--\r\n"
    return post(server, "/%s/%s" % (area, method), body,
                {"Content-Type": "multipart/form-data; boundary=BB"}, source=source)


def login(server):
    answer = modern(server, "hostKey", {"u": USER, "p": PASSWORD})
    assert answer.status == 200, answer
    return answer.json()["key"]


def media_zip(files, meta=None, compression=None):
    """An uploadChanges zip: files is [(name, bytes)]; meta overrides the _meta list."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression or zipfile.ZIP_STORED) as archive:
        for index, (_, data) in enumerate(files):
            archive.writestr(str(index), data)
        archive.writestr("_meta", json.dumps(
            meta if meta is not None else [[name, str(i)] for i, (name, _) in enumerate(files)]))
    return out.getvalue()


def ankisync_command(*args):
    """ankisync.py's command line with `args`, as a user types it, for the runs that are
    no server to wait for (SyncServer starts those): a user command, --help, a serve
    that is to refuse to start, or one that asks on a terminal first."""
    return [sys.executable, ANKISYNC_PY] + list(args)


def run_ankisync(*args, env=None, stdin="", timeout=60):
    """ankisync_command(*args) run to its end, `stdin` its input; its output as text."""
    return subprocess.run(ankisync_command(*args), input=stdin, env=env, capture_output=True,
                          text=True, timeout=timeout)


def cli(tmp_path, *args, stdin=""):
    """A command with the ini of tmp_path (made at the first call), its data beside it."""
    config = tmp_path / "test.ini"
    if not config.exists():
        config.write_text("[server]\ndata = data\n")
    return run_ankisync("--config", str(config), *args, stdin=stdin)


# The stories of attacks (the open internet under HTTP, the password guessers under Users,
# the bombs under Envelopes) each hold an attack open (idle, slow or silent connections,
# TLS handshakes that never end, bombs without a key, password guessers, a burst) while a
# real modern device syncs. Attacks come from 127.0.0.1 and, as other addresses,
# 127.0.0.2-4 (Linux routes all of 127/8 to lo); their counts and times are bounded and
# they end by themselves, well before the server's own 20-30 s timeouts would end them.


def phone_with_notes(make_device, on=None):
    """A real anki 26 device with a small collection, not synced yet."""
    phone = make_device("modern", "phone", on=on)
    phone.do("add_notes", deck="Default", prefix="word", count=5)
    return phone


def phone_keeps_syncing(phone, prefix, within=15):
    """The phone adds two notes and syncs them, in less than the HEADER_TIMEOUT (20 s)
    that it would wait if an attacker's connections could hold up the server."""
    started = time.monotonic()
    phone.do("add_notes", deck="Default", prefix=prefix, count=2)
    assert sync_normally(phone) == "normal_sync"
    assert time.monotonic() - started < within


# --- Limits and errors -----------------------------------------------------------------


def test_an_oversize_body_gets_413(start_server):
    srv = start_server(env={"MAX_SYNC_PAYLOAD_MEGS": "1"})
    key = login(srv)
    big = os.urandom(2 * 1024 * 1024)      # random: zstd cannot shrink it under 1 MiB
    assert modern(srv, "upload", big, key=key).status == 413
    bomb = b"\0" * (4 * 1024 * 1024)       # compresses to almost nothing, inflates past 3 MiB
    assert modern(srv, "upload", bomb, key=key).status == 413
    assert modern(srv, "meta", {"v": 11, "cv": "t"}, key=key).status == 200
    # Refused from its head, before the body came: the log still names the user.
    assert re.search(r"127\.0\.0\.1 %s refused 413: request body of" % USER, srv.log())


def collection_of_version(tmp_path, version):
    path = str(tmp_path / ("v%d.anki2" % version))
    ankisync.create_collection(path)
    with sqlite3.connect(path) as db:
        db.execute("update col set ver=?", (version,))
    with open(path, "rb") as f:
        return f.read()


def test_bad_requests_get_a_reason_and_the_server_keeps_serving(server, tmp_path):
    key = login(server)
    valid = collection_of_version(tmp_path, 11)
    envelope = {"anki-sync": json.dumps({"v": 11, "k": key, "c": "x", "s": "s"})}
    cases = {
        "garbage body": post(server, "/sync/meta", b"\x00garbage").status,
        "json without envelope": post(server, "/sync/meta", b'{"v":11}',
                                      {"Content-Type": "application/json"}).status,
        "broken zstd": post(server, "/sync/meta", b"\x28\xb5\x2f\xfd garbage", envelope).status,
        "bad anki-sync header": post(server, "/sync/meta", ZSTD.compress(b"{}"),
                                     {"anki-sync": "{not json"}).status,
        "broken gzip": legacy(server, "meta", {"k": key, "c": "1"}, b"{}", gzip_data=False).status,
        "bad multipart": post(server, "/sync/meta", b"--XX\r\nnonsense",
                              {"Content-Type": "multipart/form-data; boundary=BB"}).status,
        "unknown key": modern(server, "meta", {"v": 11, "cv": "x"}, key="nobody").status,
        "wrong password": modern(server, "hostKey", {"u": USER, "p": "wrong"}).status,
        "unknown method": modern(server, "teleport", {}, key=key).status,
        "GET on a POST method": post(server, "/sync/meta", method="GET").status,
        "sync version from the future": modern(server, "meta", {"v": 99, "cv": "x"},
                                               key=key).status,
        "non-SQLite upload": modern(server, "upload", b"hello, not a database", key=key).status,
        "corrupt upload": modern(server, "upload", valid[:len(valid) // 2], key=key).status,
        "schema-14 upload": modern(server, "upload", collection_of_version(tmp_path, 14),
                                   key=key).status,
        "chunk without a sync": modern(server, "chunk", {}, key=key).status,
        "start without a session key": modern(server, "start", {"minUsn": 0}, key=key,
                                              session="").status,
    }
    expected = {"unknown key": 403, "wrong password": 403, "unknown method": 404,
                "GET on a POST method": 405, "sync version from the future": 501,
                "chunk without a sync": 409}
    for case, status in cases.items():
        assert status == expected.get(case, 400), case
    # ... and the server still serves a real client.
    answer = modern(server, "meta", {"v": 11, "cv": "test"}, key=key)
    assert answer.status == 200 and answer.json()["empty"] is True
    assert post(server, "/health", method="GET").status == 200


# --- Protocol words: versions, wire names, routes --------------------------------------


def test_meta_refuses_unknown_sync_versions_with_501(server):
    key = login(server)
    answer = legacy(server, "meta", {"k": key, "s": "abc", "c": "1"},
                    json.dumps({"v": 7, "cv": "ankidesktop,2.0"}).encode())
    assert answer.status == 501 and b"not supported" in answer.body


@pytest.mark.parametrize("path,expected", [
    ("/sync/meta", ("sync", "meta")),
    ("/msync//begin", ("msync", "begin")),
    ("/sync/meta/", ("sync", "meta")),
    ("//sync///hostKey?x=1", ("sync", "hostKey")),
    ("/anki/sync/start", ("sync", "start")),            # a proxy prefix nobody configured
    ("/sync/sync/meta", ("sync", "meta")),               # `.../sync/` typed as the endpoint
    ("/msync/begin?k=abc&v=anki", ("msync", "begin")),
    ("/syncmeta", ("sync", "meta")),                     # SYNC_ENDPOINT without its slash
    ("/msyncbegin", ("msync", "begin")),
    ("/begin", ("msync", "begin")),                      # AnkiDroid media URL without msync/
    ("/mediaChanges", ("msync", "mediaChanges")),
    ("/", ("page", "index")),
    ("/health", ("page", "health")),
    ("/account", ("page", "account")),
    ("//account/", ("page", "account")),
    ("/account/collection.colpkg", ("page", "account/collection.colpkg")),
    ("/api/stats", ("page", "api/stats")),
])
def test_routes_forgive_what_users_type(path, expected):
    assert ankisync.route(path, "/") == expected


def test_routes_under_a_base_path():
    assert ankisync.route("/anki/sync/meta", "/anki/") == ("sync", "meta")
    assert ankisync.route("/anki/", "/anki/") == ("page", "index")
    assert ankisync.route("/anki/account", "/anki/") == ("page", "account")
    with pytest.raises(ankisync.SyncError) as e:
        ankisync.route("/sync/nonsense", "/")
    assert e.value.status == 404


# --- Configuration ---------------------------------------------------------------------


def test_configuration_from_the_ini_and_the_official_servers_variables(tmp_path, monkeypatch):
    ini = tmp_path / "conf" / "server.ini"
    ini.parent.mkdir()
    ini.write_text("[server]\nport = 8080   # inline comments are fine\ndata = mydata\n"
                   "base_path = anki\nmax_payload_mb = 7\nzstd = python\n")
    config = ankisync.Config.load(str(ini), environ={})
    assert (config.port, config.max_payload, config.zstd) == (8080, 7 * 1024 * 1024, "python")
    assert config.data == str(tmp_path / "conf" / "mydata")         # beside the ini
    assert config.normalized_base_path() == "/anki/"
    monkeypatch.chdir(tmp_path)
    config = ankisync.Config.load(str(ini), environ={
        "SYNC_BASE": "elsewhere", "SYNC_PORT": "9000", "SYNC_HOST": "::1",
        "MAX_SYNC_PAYLOAD_MEGS": "300", "SYNC_USER1": "a:b:c", "SYNC_USER2": "d:e",
        "ANKISYNC_ZSTD": "libzstd"})
    assert config.data == str(tmp_path / "elsewhere")               # beside the caller
    assert (config.host, config.port, config.max_payload_mb, config.zstd) == \
        ("::1", 9000, 300, "libzstd")
    assert config.env_users == [("a", "b:c"), ("d", "e")]
    with pytest.raises(SystemExit, match="name:password"):
        ankisync.Config.load(str(ini), environ={"SYNC_USER1": "nocolon"})
    with pytest.raises(SystemExit, match="does not exist"):
        ankisync.Config.load(str(tmp_path / "missing.ini"), environ={})


def test_a_mistyped_option_is_named_and_a_bad_value_refused(tmp_path, capsys):
    ini = tmp_path / "server.ini"
    ini.write_text("[server]\nprot = 8080\n")
    assert ankisync.Config.load(str(ini), environ={}).port == ankisync.DEFAULT_PORT
    assert "unknown option 'prot' ignored (did you mean port?)" in capsys.readouterr().err
    for line, error in [("log_level = LOUD", "log_level is one of DEBUG, INFO"),
                        ("port = eighty", "port takes a port number"),
                        ("port = 70000", "port takes a port number"),
                        ("max_payload_mb = -5", r"max_payload_mb takes a whole number \(1 or"),
                        ("quota_media_mb = -1", r"quota_media_mb takes a whole number \(0 or"),
                        ("moved_to = javascript:alert(1)", "moved_to takes an http"),
                        ("moved_to = anki.example.org", "moved_to takes an http"),
                        ("trusted_proxies = the proxy", "trusted_proxies takes addresses"),
                        ("zstd = fast", "zstd is one of auto, stdlib")]:
        ini.write_text("[server]\n%s\n" % line)
        with pytest.raises(SystemExit, match=error):
            ankisync.Config.load(str(ini), environ={})
    with pytest.raises(SystemExit, match="SYNC_PORT: port takes a port number"):
        ankisync.Config.load(None, environ={"SYNC_PORT": "x"})


def test_options_under_another_heading_stop_the_start_with_the_fix(tmp_path):
    """A backend meant for 127.0.0.1 whose ini says [ankisync] or [Server] would listen
    on every network with its options ignored; a file with no heading, likewise."""
    ini = tmp_path / "server.ini"
    for text, error in [("[ankisync]\nhost = 127.0.0.1\n", r"not \[ankisync\]"),
                        ("[Server]\nhost = 127.0.0.1\n", r"not \[Server\].*case-sensitive"),
                        ("[server]\nport = 8080\n[tls]\ncertfile = x\n", r"not \[tls\]"),
                        ("[DEFAULT]\nhost = 127.0.0.1\n", r"not \[DEFAULT\]"),
                        ("host = 127.0.0.1\n", r"must follow a line \[server\]")]:
        ini.write_text(text)
        with pytest.raises(SystemExit, match=error):
            ankisync.Config.load(str(ini), environ={})
    done = run_ankisync("--config", str(ini), "lsuser")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().startswith("ankisync: ") and len(done.stderr.splitlines()) == 1


def test_the_ini_and_the_readme_show_every_option_with_its_default():
    with open(os.path.join(HERE, "ankisync.ini")) as f:
        assert f.read() == ankisync.render_ini()
    with open(os.path.join(HERE, "README.md")) as f:
        readme = f.read()
    for option in ankisync.OPTIONS:
        assert ankisync.readme_row(option) in readme, option.name


# --- Users: the user commands, passwords, secrets at rest, the login guard -------------


def test_cli_manages_users(tmp_path):
    assert cli(tmp_path, "adduser", "alice", stdin="s3cret\n").returncode == 0
    assert cli(tmp_path, "adduser", "bob@example.com", stdin="pw\n").returncode == 0
    assert cli(tmp_path, "lsuser").stdout.split() == ["alice", "bob@example.com"]
    again = cli(tmp_path, "adduser", "alice", stdin="x\n")
    assert again.returncode != 0 and "already exists" in again.stderr and "passwd" in again.stderr
    bad = cli(tmp_path, "adduser", "../evil", stdin="x\n")
    assert bad.returncode != 0 and "bad user name" in bad.stderr
    assert "Traceback" not in bad.stderr
    # Names a person could not tell from another: zero-width, right-to-left override.
    for hidden in ("al\u200bice", "\u202ealice", "ali\u2028ce"):
        refused = cli(tmp_path, "adduser", hidden, stdin="x\n")
        assert refused.returncode != 0 and "an invisible one" in refused.stderr, hidden
    assert cli(tmp_path, "lsuser").stdout.split() == ["alice", "bob@example.com"]
    empty = cli(tmp_path, "adduser", "carol", stdin="\n")
    assert empty.returncode != 0 and "empty password" in empty.stderr
    missing = cli(tmp_path, "passwd", "nobody", stdin="x\n")
    assert missing.returncode != 0 and "lsuser" in missing.stderr
    assert cli(tmp_path, "deluser", "bob@example.com").returncode == 0
    assert cli(tmp_path, "lsuser").stdout.split() == ["alice"]
    assert cli(tmp_path, "deluser", "bob@example.com").returncode != 0
    users = ankisync.UserStore(str(tmp_path / "data"))
    assert users.login("alice", "s3cret") and not users.login("alice", "wrong")


def test_passwd_logs_out_every_device_of_the_user(tmp_path):
    users = ankisync.UserStore(str(tmp_path))
    users.add("alice", "one")
    key = users.login("alice", "one")
    assert users.user_for_key(key) == "alice"
    users.set_password("alice", "two")
    assert users.user_for_key(key) is None
    assert users.login("alice", "one") is None and users.login("alice", "two")


def test_password_hashes_are_slow_salted_phc_strings(tmp_path):
    phc = ankisync.hash_password("pw")
    scheme, params = phc.split("$")[1:3]
    assert scheme == "pbkdf2-sha256" and int(params.split(",")[0][2:]) >= 600000
    assert ankisync.hash_password("pw") != phc and ankisync.verify_password("pw", phc)


def test_an_unknown_user_costs_as_much_as_a_wrong_password(tmp_path):
    users = ankisync.UserStore(str(tmp_path))
    users.add("alice", "pw")

    def timed(name):
        start = time.perf_counter()
        assert users.login(name, "wrong") is None
        return time.perf_counter() - start
    assert timed("nobody") > 0.5 * timed("alice")


def test_user_commands_reach_a_running_server(server):
    """adduser, passwd and deluser from another process, while the server runs."""
    env = dict(os.environ, SYNC_BASE=server.base)
    assert run_ankisync("adduser", "bob", env=env, stdin="first\n").returncode == 0
    answer = modern(server, "hostKey", {"u": "bob", "p": "first"})
    assert answer.status == 200
    key = answer.json()["key"]
    assert modern(server, "meta", {"v": 11, "cv": "t"}, key=key).status == 200
    assert run_ankisync("passwd", "bob", env=env, stdin="second\n").returncode == 0
    wait_until(lambda: modern(server, "meta", {"v": 11, "cv": "t"}, key=key).status != 200,
               timeout=ankisync.KEY_CACHE_SECONDS + 5, what="the old key refused", every=0.5)
    assert modern(server, "hostKey", {"u": "bob", "p": "second"}).status == 200
    assert run_ankisync("deluser", "bob", env=env).returncode == 0
    assert modern(server, "hostKey", {"u": "bob", "p": "second"}).status == 403


def test_a_user_deleted_with_data_and_added_again_syncs_at_once(server, make_device):
    laptop = make_device("modern", "laptop")
    laptop.do("add_notes", deck="Default", prefix="word", count=5)
    first_upload(laptop)
    last_request = time.monotonic()     # the laptop's; its key was cached before it
    env = dict(os.environ, SYNC_BASE=server.base)
    assert run_ankisync("deluser", "--delete-data", USER, env=env).returncode == 0
    assert run_ankisync("adduser", USER, env=env, stdin=PASSWORD + "\n").returncode == 0
    # The new devices come once the server's cache of host keys has let go of the old
    # account's: KEY_CACHE_SECONDS after the laptop's last request at the latest.
    wait_until(lambda: time.monotonic() > last_request + ankisync.KEY_CACHE_SECONDS + 0.1,
               timeout=ankisync.KEY_CACHE_SECONDS + 5, every=0.05,
               what="the cached host keys expired")
    phone = make_device("modern", "phone")
    phone.do("add_notes", deck="Default", prefix="again", count=2)
    first_upload(phone)                 # the server holds nothing of the old data
    laptop2 = make_device("modern", "laptop2")
    join_by_download(laptop2)
    assert_same(phone, laptop2)


def test_users_from_the_environment_are_hashed_once_not_at_every_start(tmp_path,
                                                                      monkeypatch):
    """5,000 SYNC_USERn took 13 minutes at every start, each password checked again. A
    variable unchanged since the last start now costs no PBKDF2 at all; a changed one
    is hashed anew, and its devices log in again."""
    users = ankisync.UserStore(str(tmp_path))
    env = [("u%d" % i, "pw%d" % i) for i in range(6)]
    users.apply_environment(env, hashed=False)
    costly = []
    for name in ("hash_password", "verify_password"):
        original = getattr(ankisync, name)
        monkeypatch.setattr(ankisync, name,
                            lambda *a, _original=original, _name=name: (costly.append(_name),
                                                                         _original(*a))[1])
    users.apply_environment(env, hashed=False)
    assert costly == []
    users.apply_environment(env[:5] + [("u5", "new")], hashed=False)
    assert costly == ["verify_password", "hash_password"]
    assert users.login("u5", "new") and not users.login("u5", "pw5")
    assert users.login("u0", "pw0")


def test_secrets_from_files_as_containers_give_them_and_one_line_when_unreadable(tmp_path):
    """SYNC_USERn_FILE and metrics_token_file: read at start, the trailing newline
    dropped; a file that cannot be read stops the start in one line naming it."""
    (tmp_path / "alice").write_text("alice:s3cret\n")
    (tmp_path / "token").write_text("t0ken\r\n")
    ini = tmp_path / "server.ini"
    ini.write_text("[server]\nmetrics_token_file = %s\n" % (tmp_path / "token"))
    config = ankisync.Config.load(str(ini), environ={
        "SYNC_USER1_FILE": str(tmp_path / "alice"), "SYNC_USER2": "bob:pw"})
    assert config.env_users == [("alice", "s3cret"), ("bob", "pw")]
    assert config.metrics_token == "t0ken"
    missing = str(tmp_path / "nowhere")
    for environ, named in [({"SYNC_USER1_FILE": missing}, "SYNC_USER1_FILE"),
                           ({"ANKISYNC_METRICS_TOKEN_FILE": missing}, "metrics_token_file")]:
        with pytest.raises(SystemExit) as refused:
            ankisync.Config.load(str(tmp_path / "server.ini"), environ=environ)
        said = str(refused.value)
        assert named in said and missing in said and "No such file" in said
        assert "\n" not in said
    with pytest.raises(SystemExit, match="not both"):
        ankisync.Config.load(str(ini), environ={"SYNC_USER1": "a:b",
                                                "SYNC_USER1_FILE": str(tmp_path / "alice")})


def test_a_hash_from_the_hash_command_in_a_secret_file_lets_the_user_sync(start_server,
                                                                         make_device, tmp_path):
    """`ankisync.py hash` prints the PHC string PASSWORDS_HASHED=1 takes: given in a
    SYNC_USER1_FILE, the password itself is in no file, and the device logs in with it."""
    printed = run_ankisync("hash", stdin="horse battery\n")
    assert printed.returncode == 0, printed.stderr
    phc = printed.stdout.strip()
    assert phc.startswith("$pbkdf2-sha256$i=600000,l=32$") and "horse" not in phc
    assert ankisync.verify_password("horse battery", phc)
    secret = tmp_path / "alice-secret"
    secret.write_text("alice:%s\n" % phc)
    (tmp_path / "metrics-secret").write_text("m3trics\n")
    srv = start_server(users=(), env={"SYNC_USER1_FILE": str(secret), "PASSWORDS_HASHED": "1"},
                       ini="metrics = on\nmetrics_token_file = %s\nip_header = X-Real-IP\n"
                       % (tmp_path / "metrics-secret"))
    phone = make_device("modern", "phone", user="alice", password="horse battery", on=srv)
    phone.do("add_notes", deck="Default", prefix="h", count=2)
    first_upload(phone)
    elsewhere = {"X-Real-IP": "203.0.113.9"}
    assert post(srv, "/metrics", method="GET", headers=elsewhere).status == 403
    assert post(srv, "/metrics", method="GET",
                headers=dict(elsewhere, Authorization="Bearer m3trics")).status == 200
    empty = run_ankisync("hash", stdin="\n")
    assert empty.returncode != 0 and "empty password" in empty.stderr


def test_a_user_named_jose_from_the_environment_syncs_and_passwd_says_where_it_comes_from(
        start_server, make_device, tmp_path):
    srv = start_server(env={"SYNC_USER2": "José:contraseña"})
    laptop = make_device("modern", "laptop", user="José", password="contraseña", on=srv)
    laptop.do("add_notes", deck="Default", prefix="palabra", count=3)
    first_upload(laptop)
    # NFD, and another case: the same user, the same folder.
    phone = make_device("modern", "phone", user=unicodedata.normalize("NFD", "JOSÉ"),
                        password="contraseña", on=srv)
    join_by_download(phone)
    assert_same(laptop, phone)
    assert os.path.exists(os.path.join(srv.base, "José", "collection.anki2"))
    env = dict(os.environ, SYNC_BASE=srv.base)
    proc = run_ankisync("passwd", "josé", env=env, stdin="nueva\n")
    assert proc.returncode == 0 and "SYNC_USER" in proc.stdout, proc.stdout + proc.stderr
    proc = run_ankisync("deluser", "JOSÉ", env=env)
    assert proc.returncode == 0 and "SYNC_USER" in proc.stdout and "José" in proc.stdout


def test_users_named_as_the_servers_own_files_sync_beside_them(start_server, make_device):
    """A user called auth.db or notice.txt (any case) gets a folder of their own: their
    sync and a restore point leave the server's files alone."""
    srv = start_server(users=(("auth.db", "pw1"), ("NOTICE.TXT", "pw2")))
    for name, password in (("auth.db", "pw1"), ("NOTICE.TXT", "pw2")):
        device = make_device("modern", name, user=name, password=password, on=srv)
        device.do("add_notes", deck="Default", prefix=name, count=2)
        first_upload(device)
        assert device.sync() == "no_changes"
        admin(srv, "backup", name)
    assert os.path.isfile(os.path.join(srv.base, "auth.db"))
    assert os.path.isfile(os.path.join(srv.base, "%61uth.db", "collection.anki2"))
    assert os.path.isfile(os.path.join(srv.base, "%4EOTICE.TXT", "collection.anki2"))
    assert "Traceback" not in srv.log()


# --- secrets at rest ---


def open_modes(folder):
    """{path: mode} of what under `folder` (itself included) others may read or enter."""
    found = {}
    for root, folders, files in os.walk(folder):
        for path in [root] + [os.path.join(root, name) for name in files]:
            mode = stat.S_IMODE(os.lstat(path).st_mode)
            if mode & 0o077:
                found[os.path.relpath(path, folder)] = oct(mode)
    return found


def file_bytes(*paths):
    """The content of those of `paths` that exist, one after the other."""
    content = b""
    for path in paths:
        if os.path.exists(path):
            with open(path, "rb") as f:
                content += f.read()
    return content


@contextlib.contextmanager
def umask(mask):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def test_the_data_folder_is_private_and_auth_db_keeps_only_digests_of_keys(start_server,
                                                                          make_device):
    with umask(0o022):                  # a usual shell's: files 0644, folders 0755
        srv = start_server()
    phone = phone_with_notes(make_device, on=srv)
    phone.do("write_media", files=[["cat.jpg", 5000, 1], ["dog.mp3", 20000, 2]])
    first_upload(phone)
    phone.sync_media()
    assert sorted(os.listdir(os.path.join(srv.base, USER, "media"))) == ["cat.jpg", "dog.mp3"]
    assert open_modes(srv.base) == {}
    auth = os.path.join(srv.base, "auth.db")
    stored = file_bytes(auth, auth + "-wal")
    official_key = hashlib.sha1(("%s:%s" % (USER, PASSWORD)).encode()).hexdigest()
    for hkey in (phone.auth.hkey, official_key):
        assert hkey.encode() not in stored
        assert ankisync.key_digest(hkey).encode() in stored


OLD_KEY = "0123456789abcdef0123456789abcdef01234567"


def data_folder_of_0_1_0(base):
    """What ankisync 0.1.0 left: host keys in plain, user_version 0, files 0644."""
    with umask(0o022):
        with contextlib.closing(sqlite3.connect(os.path.join(base, "auth.db"))) as db, db:
            db.execute("pragma journal_mode=wal")
            db.executescript("""
                create table users (
                    name text primary key, hash text not null, created integer not null);
                create table hostkeys (
                    hkey text primary key, name text not null, created integer not null);
                create index ix_hostkeys_name on hostkeys (name);""")
            db.execute("insert into users values (?, ?, 0)",
                       (USER, ankisync.hash_password(PASSWORD, rounds=1000)))
            db.execute("insert into hostkeys values (?, ?, 0)", (OLD_KEY, USER))
        os.makedirs(os.path.join(base, USER))
        ankisync.create_collection(os.path.join(base, USER, "collection.anki2"))


def test_an_auth_db_of_0_1_0_is_converted_at_start_and_its_keys_keep_working(start_server,
                                                                           make_device):
    srv = start_server(prepare=data_folder_of_0_1_0)
    assert open_modes(srv.base) == {}
    assert modern(srv, "meta", {"v": 11, "cv": "test"}, key=OLD_KEY).status == 200
    # A phone logged in under 0.1.0 syncs on with its key, without logging in again.
    phone = phone_with_notes(make_device, on=srv)
    phone.auth = SyncAuth(hkey=OLD_KEY, endpoint=srv.url)
    first_upload(phone)
    phone_keeps_syncing(phone, "after the upgrade")
    assert phone.auth.hkey == OLD_KEY
    auth = os.path.join(srv.base, "auth.db")
    with contextlib.closing(sqlite3.connect("file:%s?mode=ro" % auth, uri=True)) as db:
        assert db.execute("pragma user_version").fetchone()[0] > 0
        assert (ankisync.key_digest(OLD_KEY),) in db.execute("select hkey from hostkeys")
    assert OLD_KEY.encode() not in file_bytes(auth, auth + "-wal")


# --- password guessers ---


def guess(server, name, source="127.0.0.2", headers=None, prefix="/"):
    """One login with a wrong password: (status, the Retry-After header or None)."""
    body = ZSTD.compress(json.dumps({"u": name, "p": "guess%d" % random.random()}).encode())
    answer = post(server, prefix + "sync/hostKey", body,
                  dict(anki_sync_header(""), **(headers or {})), source=source)
    return answer.status, answer.headers.get("Retry-After")


def test_password_guessers_are_throttled_while_the_owner_logs_in_and_syncs(server,
                                                                          make_device):
    phone = phone_with_notes(make_device)
    assert guess(server, "admin") == (403, None)
    answers, stop = [], threading.Event()
    told_to_wait = [0] * 16         # the 429s each guesser has had

    def guesser(number):
        while not stop.is_set():
            answer = guess(server, USER)
            answers.append(answer)
            told_to_wait[number] += answer[0] == 429
            time.sleep(0.05)

    guessers = [threading.Thread(target=guesser, args=(i,)) for i in range(16)]
    for thread in guessers:
        thread.start()
    try:
        wait_until(lambda: any(status == 429 for status, _ in answers), timeout=30,
                   what="the guessers throttled")
        first_upload(phone)         # logs in with its password, from 127.0.0.1
        phone_keeps_syncing(phone, "while guessed at")
        # The guessers go on until each has been told to wait ten times: by then every
        # guess that had queued up for its turn has had its answer.
        wait_until(lambda: min(told_to_wait) >= 10, timeout=60,
                   what="every guesser told to wait ten times")
    finally:
        stop.set()
        for thread in guessers:
            thread.join()
    statuses = [status for status, _ in answers]
    assert set(statuses) == {403, 429}
    assert statuses.count(429) > 0.9 * len(answers)
    assert all(1 <= int(retry) <= 900 for status, retry in answers if status == 429)
    log = server.log()
    assert "login failed: 'user' from 127.0.0.2: wrong password" in log
    assert "login failed: 'admin' from 127.0.0.2: no such user" in log
    # Five failures lock the address: guesses already waiting for their turn then must
    # not be checked either.
    assert statuses.count(403) <= 10, "%d passwords checked" % statuses.count(403)


@pytest.mark.parametrize("ip_header", ["X-Forwarded-For", "RightmostXForwardedFor"])
def test_behind_a_proxy_each_forwarded_address_is_throttled_on_its_own(start_server,
                                                                       make_device,
                                                                       ip_header):
    srv = start_server(env={"SYNC_IP_HEADER": ip_header})
    phone = phone_with_notes(make_device, on=srv)

    def via_proxy(address, claimed="198.51.100.7"):
        # The proxy appends the address it saw to what the client claimed.
        return {"X-Forwarded-For": "%s, %s" % (claimed, address)}

    assert [guess(srv, "alice", headers=via_proxy("10.0.0.1"))[0] for _ in range(5)] == [403] * 5
    assert guess(srv, "alice", headers=via_proxy("10.0.0.1")) == (429, "60")
    assert guess(srv, "alice", headers=via_proxy("10.0.0.1", claimed="10.0.0.9"))[0] == 429
    assert guess(srv, "bob", headers=via_proxy("10.0.0.2")) == (403, None)
    first_upload(phone)
    phone_keeps_syncing(phone, "behind the proxy")
    assert "login failed: 'alice' from 10.0.0.1: no such user" in srv.log()


def test_guessers_on_64_addresses_do_not_lock_the_owner_out(server):
    """The owner logged in from home before; guessers on 64 other addresses then try
    their password. Their guesses are paced to one check a second, but not the owner's
    right password from home."""
    assert login(server)
    for number in range(2, 66):
        assert guess(server, USER, source="127.0.0.%d" % number)[0] in (403, 429)
    assert guess(server, USER, source="127.0.0.66")[0] == 429      # the pace holds
    for _ in range(3):
        assert login(server)


def test_one_user_s_wrong_passwords_do_not_lock_out_the_others_behind_the_router(start_server):
    """A family behind one address: the child mistypes six times, the address waits;
    the parent, who logged in from there before, still gets in."""
    srv = start_server(users=((USER, PASSWORD), ("parent", "pw2")))
    home = "127.0.0.9"
    answer = modern(srv, "hostKey", {"u": "parent", "p": "pw2"}, source=home)
    assert answer.status == 200
    assert [guess(srv, USER, source=home)[0] for _ in range(6)][-1] == 429
    assert modern(srv, "hostKey", {"u": "parent", "p": "pw2"}, source=home).status == 200
    assert guess(srv, USER, source=home)[0] == 429      # the mistyper still waits


def test_a_forwarded_address_is_believed_only_from_the_trusted_proxy(start_server):
    """With ip_header set, a client that talks to the server directly could write any
    address in the header, and so dodge the lockout by changing it at every guess."""
    srv = start_server(env={"SYNC_IP_HEADER": "X-Forwarded-For"},
                       ini="trusted_proxies = 127.0.0.1\n")
    statuses = [guess(srv, "alice", source="127.0.0.2",
                      headers={"X-Forwarded-For": "10.0.0.%d" % i})[0] for i in range(7)]
    assert statuses[:5] == [403] * 5 and statuses[5:] == [429, 429]
    assert "from 127.0.0.2: no such user" in srv.log()
    # From the proxy itself, a request without the header is logged once, not silently
    # counted against everyone behind the proxy.
    assert guess(srv, "bob", source="127.0.0.1")[0] == 403
    assert guess(srv, "bob", source="127.0.0.1")[0] == 403
    assert srv.log().count("has no x-forwarded-for header") == 1


def test_guessers_spread_over_many_addresses_get_one_check_a_second(start_server,
                                                                    make_device):
    srv = start_server(env={"SYNC_IP_HEADER": "X-Forwarded-For"})
    phone = phone_with_notes(make_device, on=srv)
    answers, checked = [], []       # checked: when each password check had its answer

    def guesser(number):
        # Each guess from an address of its own: only the user name's count grows.
        for i in range(40):
            answer = guess(srv, USER, headers={"X-Forwarded-For": "10.%d.0.%d" % (number, i)})
            answers.append(answer)
            if answer[0] == 403:
                checked.append(time.monotonic())
            time.sleep(0.1)             # the pace of the attack

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(guesser, range(4)))
    seconds = time.monotonic() - started
    statuses = [status for status, _ in answers]
    assert set(statuses) == {403, 429}
    assert all(retry == "1" for status, retry in answers if status == 429)
    # The owner logs in from elsewhere once the name may have its next check: a second
    # after the last one began, so surely a second after its answer came.
    last_check = max(checked)
    wait_until(lambda: time.monotonic() > last_check + ankisync.USER_CHECK_INTERVAL,
               timeout=5, every=0.01, what="the name's next check due")
    first_upload(phone)
    phone_keeps_syncing(phone, "after the spread guesses")
    assert statuses.count(403) <= ankisync.LOGIN_FAILURES_ALLOWED + seconds + 1, \
        "%d checks in %.1f s" % (statuses.count(403), seconds)


def test_without_an_ip_header_a_forwarded_for_header_changes_nothing(server, make_device):
    phone = phone_with_notes(make_device)
    answers = [guess(server, "alice", headers={"X-Forwarded-For": "10.0.0.%d" % i})[0]
               for i in range(6)]
    assert answers == [403] * 5 + [429]
    assert "login failed: 'alice' from 127.0.0.2: no such user" in server.log()
    first_upload(phone)
    phone_keeps_syncing(phone, "after the guesses")


# --- Envelopes: chunked bodies, multipart forms, zstd and gzip, the traces decoded -----


def chunked(data, sizes=(7, 1, 300)):
    out, pos, i = bytearray(), 0, 0
    while pos < len(data):
        size = sizes[i % len(sizes)]
        piece = data[pos:pos + size]
        out += b"%x;ext=1\r\n" % len(piece) + piece + b"\r\n"
        pos += size
        i += 1
    return bytes(out) + b"0\r\nX-Trailer: yes\r\n\r\n"


class Headers(dict):
    def get(self, key, default=None):
        for k, v in self.items():
            if k.lower() == key.lower():
                return v
        return default


def request_head(*headers):
    """A POST's head as the listener parses it, with these header lines."""
    return ankisync.RequestHead("\r\n".join(("POST /sync/meta HTTP/1.1",) + headers).encode())


def test_chunked_body_decodes_with_extensions_and_trailers():
    payload = os.urandom(5000)
    reader = ankisync.BodyReader(io.BufferedReader(io.BytesIO(chunked(payload))),
                                 request_head("Transfer-Encoding: chunked"), 10**6)
    sink = bytearray()
    ankisync.copy_stream(reader.read, sink.extend)
    assert bytes(sink) == payload and reader.finished


@pytest.mark.parametrize("body,status", [
    (b"zz\r\nabc\r\n0\r\n\r\n", 400),          # size is not hex
    (b"5\r\nabc", 400),                         # body ends inside a chunk
    (b"3\r\nabcXX0\r\n\r\n", 400),              # chunk not followed by CRLF
    (b"400\r\n" + b"a" * 1024 + b"\r\n0\r\n\r\n", 413),   # over the limit
])
def test_broken_chunked_bodies_are_refused(body, status):
    reader = ankisync.BodyReader(io.BufferedReader(io.BytesIO(body)),
                                 request_head("Transfer-Encoding: chunked"), 1000)
    with pytest.raises(ankisync.SyncError) as e:
        ankisync.copy_stream(reader.read, lambda b: None)
    assert e.value.status == status


def test_content_length_over_the_limit_is_refused_before_reading():
    with pytest.raises(ankisync.SyncError) as e:
        ankisync.BodyReader(io.BytesIO(b""), request_head("Content-Length: 5000"), 1000)
    assert e.value.status == 413


@pytest.mark.parametrize("step", [1, 3, 7, 100, 1 << 20])
def test_every_traced_multipart_body_parses_at_any_split(step, tmp_path):
    seen = 0
    for name, exchange in traced_exchanges():
        content_type = header(exchange, "content-type") or ""
        if "multipart" not in content_type:
            continue
        seen += 1
        raw = base64.b64decode(exchange["request"]["body_b64"])
        boundary = re.search(r"boundary=(\S+)", content_type).group(1)
        spool = ankisync.Spool(str(tmp_path), 10**9)
        fields = ankisync.MultipartParser(split_reader(raw, step), boundary, spool).parse()
        expected = dict(exchange["request"]["multipart_fields"])
        if not raw.rstrip().endswith(b"--"):
            # Anki 2.0 writes no closing boundary; the recorder dropped that last part.
            last = raw.rsplit(b"--" + boundary.encode(), 1)[1]
            part, value = re.match(rb'\r\n.*name="(\w+)"\r\n\r\n(.*)\r\n$', last,
                                   re.S).groups()
            expected[part.decode()] = value.decode()
        assert set(fields) == set(expected), name
        for key, value in expected.items():
            if key != "data":
                assert fields[key] == value, name
        if "data" in expected and "data_len" not in exchange["request"]:
            assert spool.size == int(expected["data"].strip("<> bytes")), name
    assert seen > 40


def test_old_ankidroid_multipart_without_closing_boundary(tmp_path):
    body = (b'--Anki-sync-boundary\r\nContent-Disposition: form-data; name="k"\r\n\r\nKEY\r\n'
            b'--Anki-sync-boundary\r\nContent-Disposition: form-data; name="s"\r\n\r\nSKEY\r\n')
    fields = ankisync.MultipartParser(split_reader(body, 5), "Anki-sync-boundary",
                                      ankisync.Spool(str(tmp_path), 1000)).parse()
    assert fields == {"k": "KEY", "s": "SKEY"}


@pytest.mark.parametrize("body", [
    b"no boundary here at all",
    b"--B\r\nContent-Disposition: form-data\r\n\r\nx\r\n--B--\r\n",         # part without name
    b"--B\r\nContent-Disposition: form-data; name=\"k\"" + b"x" * 9000,       # endless headers
    b"".join(b'--B\r\nContent-Disposition: form-data; name="f%d"\r\n\r\nv\r\n' % i
             for i in range(40)) + b"--B--\r\n",                             # too many parts
])
def test_bad_multipart_bodies_are_refused(body, tmp_path):
    with pytest.raises(ankisync.SyncError) as e:
        ankisync.MultipartParser(split_reader(body, 1000), "B",
                                 ankisync.Spool(str(tmp_path), 10**6)).parse()
    assert e.value.status == 400


class FakeHandler:
    """What Envelopes.decode reads of a request's head: the verb, path and headers."""

    def __init__(self, exchange):
        request = exchange["request"]
        self.command = request["method"]
        self.path = request["path"]
        self.headers = Headers(request["headers"])


@pytest.fixture
def app(tmp_path):
    config = ankisync.Config()
    config.data = str(tmp_path / "data")
    return ankisync.SyncApp(config)


def test_every_traced_request_decodes_to_what_the_client_sent(app, monkeypatch):
    """Both envelopes, three client generations: the payload comes out as sent."""
    monkeypatch.setattr(app.users, "user_for_key", lambda key: "user" if key else None)
    checked = 0
    for name, exchange in traced_exchanges():
        request = exchange["request"]
        raw = base64.b64decode(request["body_b64"])
        area, method = ankisync.route(request["path"], "/")
        handler = FakeHandler(exchange)
        body = ankisync.BodyReader(io.BufferedReader(io.BytesIO(raw)),
                                   request_head("Content-Length: %d" % len(raw)), 10**8)
        req = app.envelopes.decode(handler, "127.0.0.1", area, method, body)
        try:
            if "json" in request:
                assert req.json() == request["json"], name
                checked += 1
            if request.get("multipart_fields", {}).get("k"):
                assert req.hkey == request["multipart_fields"]["k"], name
            if header(exchange, "anki-sync"):
                assert req.modern and req.hkey == json.loads(header(exchange, "anki-sync"))["k"]
        finally:
            req.close()
    assert checked > 100


# --- fuzzed: gzip against Python's gzip ---

# How a socket hands a body over: in pieces of any size.
read_sizes = st.lists(st.integers(1, 9000), min_size=1, max_size=6)

@st.composite
def gzip_streams(draw):
    """(stream, content): gzip members of any level, some with a file name, one after
    another, as legacy clients (and gzip -c a b) write them."""
    members, content = [], []
    for _ in range(draw(st.integers(1, 3))):
        data = draw(compressible)
        out = io.BytesIO()
        with gzip.GzipFile(draw(st.sampled_from(["", "data", "dätä.bin"])), "wb",
                           draw(st.integers(0, 9)), out, mtime=draw(st.integers(0, 1 << 31))) as f:
            f.write(data)
        members.append(out.getvalue())
        content.append(data)
    return b"".join(members), b"".join(content)


def gunzip(read, limit):
    """gunzip_stream's output and return value; the sink fails the test past `limit`."""
    parts, write = bounded_sink(limit)
    total = ankisync.gunzip_stream(read, write, limit)
    assert total == sum(map(len, parts))
    return b"".join(parts)


@settings(max_examples=80, deadline=None, derandomize=True)
@given(stream=gzip_streams(), sizes=read_sizes, slack=st.integers(-3, 3))
def test_gzip_members_inflate_as_python_gzip_does(stream, sizes, slack):
    """Valid gzip streams of several members, read in pieces of any size, inflate to what
    Python's gzip gives; a limit below the content is a 413, never a byte past it."""
    data, content = stream
    assert gzip.decompress(data) == content
    limit = max(0, len(content) + slack)
    if limit >= len(content):
        assert gunzip(pieces(data, sizes), limit) == content
    else:
        with pytest.raises(ankisync.SyncError) as refused:
            gunzip(pieces(data, sizes), limit)
        assert refused.value.status == 413


def test_gzip_a_big_member_in_reads_of_every_size():
    """Past IO_BLOCK the inflater stops at its output cap with input left over: several
    MiB in one member come out whole, in reads of 7 bytes or of a MiB, and one byte of
    limit short is a 413."""
    content = b"".join(b"row %d;" % (i % 5000) for i in range(200000))
    data = gzip.compress(content) + gzip.compress(b"and a second member")
    content += b"and a second member"
    for sizes in ([7, 4093], [ankisync.MIB]):
        assert gunzip(pieces(data, sizes), len(content)) == content
    with pytest.raises(ankisync.SyncError) as refused:
        gunzip(pieces(data, [ankisync.MIB]), len(content) - 1)
    assert refused.value.status == 413


def drawn_damage(draw, data, hows, rounds, start=0):
    """`data` damaged `rounds` times past byte `start`, each a way drawn from `hows`: a
    byte set or flipped, dropped, bytes put in or appended, or the rest cut off. The one
    way the fuzzed tests spoil a valid input."""
    data = bytearray(data)
    for _ in range(rounds):
        if len(data) <= start:
            break
        at = draw(st.integers(start, len(data) - 1))
        how = draw(st.sampled_from(hows))
        if how == "set":
            data[at] = draw(st.integers(0, 255))
        elif how == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif how == "drop":
            del data[at]
        elif how == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif how == "append":
            data += draw(st.binary(min_size=1, max_size=12))
        else:
            del data[at:]
    return bytes(data)


@st.composite
def damaged_gzip(draw):
    return drawn_damage(draw, draw(gzip_streams())[0], ["set", "flip", "cut", "append"],
                        draw(st.integers(1, 3)))


@settings(max_examples=250, deadline=None, derandomize=True)
@given(data=st.one_of(st.binary(max_size=100), damaged_gzip()), sizes=read_sizes,
       limit=st.one_of(st.just(1 << 20), st.integers(0, 5000)))
def test_gzip_random_and_damaged_bytes_are_a_400_or_413_only(data, sizes, limit):
    """Anything else: SyncError 400 (bad gzip) or 413 (over the limit), never another
    exception, never output past the limit; what it does inflate, Python's gzip agrees."""
    try:
        content = gunzip(pieces(data, sizes), limit)
    except ankisync.SyncError as e:
        assert e.status in (400, 413), e.reason
        return
    assert content == gzip.decompress(data)


# --- fuzzed: multipart forms ---

BOUNDARY_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'()+_,-./:=?"


def spool():
    """The Spool _decode_legacy gives the parser, kept in memory at these sizes."""
    return ankisync.Spool(tempfile.gettempdir(), ankisync.MIB)


@st.composite
def multipart_forms(draw):
    """(body, boundary, fields in order, data or None): a legacy client's form, its parts
    in any order, with or without the closing boundary old AnkiDroid leaves out."""
    boundary = draw(st.text(BOUNDARY_CHARS, min_size=1, max_size=70))
    marker = b"\r\n--" + boundary.encode("latin-1")
    fields = draw(st.dictionaries(st.text("cksvx", min_size=1, max_size=3),
                                  st.text(st.characters(blacklist_categories=("Cs",)),
                                          max_size=40), max_size=5))
    data = draw(st.one_of(st.none(), compressible))
    parts = [(name, value.encode("utf-8")) for name, value in fields.items()]
    if data is not None:
        parts.insert(draw(st.integers(0, len(parts))), ("data", data))
    for _, content in parts:
        assume((content + marker).find(marker) == len(content))
    preamble = draw(st.sampled_from([b"", b"\r\n", b"preamble text\r\n"]))
    body = preamble + b"--" + boundary.encode("latin-1")
    for name, content in parts:
        disposition = 'form-data; name="%s"' % name + ('; filename="data"' if name == "data"
                                                        else "")
        body += (b"\r\nContent-Disposition: " + disposition.encode() +
                 (b"\r\nContent-Type: application/octet-stream" if name == "data" else b"") +
                 b"\r\n\r\n" + content + marker)
    closed = not parts or draw(st.booleans())
    if closed:
        body += b"--\r\n"
    else:
        body = body[:-len(marker)] + b"\r\n"            # the body just stops
    return body, boundary, list(fields.items()), data


@settings(max_examples=150, deadline=None, derandomize=True)
@given(form=multipart_forms(), sizes=read_sizes)
def test_multipart_forms_parse_to_their_fields_and_data(form, sizes):
    """Any form, read in pieces of any size, gives its fields (each to on_field as soon
    as it is read) and its data part byte for byte."""
    body, boundary, fields, data = form
    seen, sink = [], spool()
    parsed = ankisync.MultipartParser(pieces(body, sizes), boundary, sink,
                                      lambda name, value: seen.append((name, value))).parse()
    assert seen == fields
    expected = dict(fields)
    if data is not None:
        expected["data"] = None
    assert parsed == expected
    assert sink.getvalue() == (data or b"")


def test_multipart_a_data_part_bigger_than_a_read_block():
    """A data part of several IO_BLOCKs, delimiters split across reads of any size,
    parses to its bytes; and a body of random bytes spanning the block is refused."""
    data = random.Random(1).randbytes(3 * ankisync.IO_BLOCK + 123)
    body = (b"--Anki-sync-boundary\r\nContent-Disposition: form-data; name=\"c\"\r\n\r\n1"
            b"\r\n--Anki-sync-boundary\r\nContent-Disposition: form-data; name=\"data\"; "
            b"filename=\"data\"\r\nContent-Type: application/octet-stream\r\n\r\n" + data +
            b"\r\n--Anki-sync-boundary--\r\n")
    for sizes in ([ankisync.IO_BLOCK], [4099, 3, 17], [ankisync.IO_BLOCK - 1, 2]):
        sink = spool()
        fields = ankisync.MultipartParser(pieces(body, sizes), "Anki-sync-boundary",
                                          sink).parse()
        assert fields == {"c": "1", "data": None} and sink.getvalue() == data
    with pytest.raises(ankisync.SyncError):
        ankisync.MultipartParser(pieces(data, [ankisync.IO_BLOCK]), "Anki-sync-boundary",
                                 spool()).parse()


@st.composite
def damaged_forms(draw):
    body, boundary, _, _ = draw(multipart_forms())
    body = bytearray(body)
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, max(0, len(body) - 1)))
        how = draw(st.sampled_from(["set", "drop", "cut", "insert"]))
        if how == "set" and body:
            body[at] = draw(st.integers(0, 255))
        elif how == "drop":
            del body[at:at + 1]
        elif how == "cut":
            del body[at:]
        else:
            body[at:at] = draw(st.sampled_from([b"\r\n", b"--", b'"', b"\r\n\r\n",
                                                b"--" + boundary.encode("latin-1")]))
    return bytes(body), boundary


@settings(max_examples=250, deadline=None, derandomize=True)
@given(form=st.one_of(damaged_forms(),
                      st.tuples(st.binary(max_size=200),
                                st.text(st.characters(max_codepoint=255), max_size=80))),
       sizes=read_sizes)
def test_multipart_random_and_damaged_bodies_are_a_sync_error_only(form, sizes):
    """Random bodies and damaged forms, with any boundary a header can carry: the
    parser returns fields or raises SyncError, nothing else."""
    body, boundary = form
    try:
        fields = ankisync.MultipartParser(pieces(body, sizes), boundary, spool()).parse()
    except ankisync.SyncError:
        return
    assert all(isinstance(value, str) for name, value in fields.items() if name != "data")


# --- bombs without a key ---


@functools.lru_cache(maxsize=None)
def zstd_bomb(size=290 * MIB):
    """zstd of `size` zero bytes, made a MiB at a time: about 9 KB."""
    compressor = zstandard.ZstdCompressor().compressobj()
    zeros = bytes(MIB)
    return b"".join([compressor.compress(zeros) for _ in range(size // MIB)]
                    + [compressor.flush()])


@functools.lru_cache(maxsize=None)
def gzip_bomb(size=290 * MIB):
    """gzip of `size` zero bytes, made a MiB at a time: about 290 KB."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(MIB)
    return b"".join([compressor.compress(zeros) for _ in range(size // MIB)]
                    + [compressor.flush()])


def file_sizes(folder):
    sizes = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with contextlib.suppress(OSError):
                sizes[os.path.relpath(path, folder)] = os.stat(path).st_size
    return sizes


class DiskWatch:
    """Looks at every file under `folder` every few ms, on a thread, while in use:
    `grown` names each that appeared or grew meanwhile."""

    def __init__(self, folder):
        self.folder = folder
        self.grown = set()
        self.stop = threading.Event()

    def __enter__(self):
        self.before = file_sizes(self.folder)
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.stop.set()
        self.thread.join()
        self.look()

    def watch(self):
        while not self.stop.wait(0.002):
            self.look()

    def look(self):
        self.grown.update(path for path, size in file_sizes(self.folder).items()
                          if size > self.before.get(path, -1))


def test_bombs_without_a_valid_key_are_refused_before_a_byte_is_inflated_or_stored(
        server, make_device):
    phone = phone_with_notes(make_device)
    first_upload(phone)
    bomb = zstd_bomb()
    assert len(bomb) < 64 * 1024

    def upload(_=None):
        return post(server, "/sync/upload", bomb, anki_sync_header("not-a-key")).status

    with DiskWatch(server.base) as disk:
        assert upload() == 403
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            assert list(pool.map(upload, range(4))) == [403] * 4
        # Legacy forms: the key before the data (Anki 2.1.26, AnkiDroid), a gzip bomb...
        assert legacy(server, "upload", {"k": "not-a-key", "c": "1"}, gzip_bomb(),
                      gzip_data=False).status == 403
        # ...and the data before the key (Anki 2.1.50+), 1 MiB from an address that never
        # showed a valid key.
        assert legacy(server, "upload", {"k": "not-a-key", "c": "0"}, os.urandom(MIB),
                      gzip_data=False, data_first=True, source="127.0.0.2").status == 403
        # hostKey, the one method without a key: a "password" of 1 MiB.
        assert modern(server, "hostKey", {"u": USER, "p": "a" * MIB}).status == 413
    assert disk.grown == set()
    assert os.listdir(os.path.join(server.base, ".tmp")) == []
    phone_keeps_syncing(phone, "after the bombs")


# --- Collection store: uploads, crashes, schema 18, damaged files, the data folder, disks ---


def collection_with_notes(tmp_path, count):
    """A schema-11 collection file with `count` notes, made without any client."""
    path = str(tmp_path / ("c%d.anki2" % count))
    ankisync.create_collection(path)
    with sqlite3.connect(path) as db:
        mid = int(next(iter(json.loads(db.execute("select models from col").fetchone()[0]))))
        db.executemany("insert into notes values (?, ?, ?, 0, 0, '', ?, '', 0, 0, '')",
                       [(i + 1, "g%d" % i, mid, "front %d\x1fback %s" % (i, os.urandom(40).hex()))
                        for i in range(count)])
        db.execute("update col set mod=?, scm=?", (count, count))
    with open(path, "rb") as f:
        return f.read()


def stored_mod(server):
    db = sqlite3.connect(os.path.join(server.base, USER, "collection.anki2"))
    try:
        assert db.execute("pragma integrity_check").fetchone()[0] == "ok"
        return db.execute("select mod from col").fetchone()[0]
    finally:
        db.close()


@pytest.mark.parametrize("moment", ["mid-body", "while-checking"])
def test_a_server_killed_during_an_upload_keeps_the_previous_collection(server, tmp_path, moment):
    key = login(server)
    answer = modern(server, "upload", collection_with_notes(tmp_path, 10), key=key)
    assert answer.status == 200 and answer.body == b"OK", answer
    assert stored_mod(server) == 10
    new = ZSTD.compress(collection_with_notes(tmp_path, 60000))
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("POST", "/sync/upload")
    conn.putheader("anki-sync", json.dumps({"v": 11, "k": key, "c": "t", "s": "s"}))
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    half = len(new) // 2 if moment == "mid-body" else len(new)
    for start in range(0, half, 65536):
        piece = new[start:min(start + 65536, half)]
        conn.send(b"%x\r\n" % len(piece) + piece + b"\r\n")
    if moment == "while-checking":
        conn.send(b"0\r\n\r\n")
        time.sleep(0.05)
    server.kill()
    conn.close()
    server.start()
    assert stored_mod(server) in ((10, 60000) if moment == "while-checking" else (10,))
    leftovers = [name for _, _, files in os.walk(server.base) for name in files
                 if name.startswith(".") and name not in (".serve.lock", ankisync.COLLECTION_LOCK,
                                                          ankisync.MEDIA_LOCK)
                 or name.endswith((".convert", "-journal"))
                 or name == "collection.anki2-wal"]
    assert leftovers == []
    assert modern(server, "meta", {"v": 11, "cv": "t"}, key=key).status == 200


@pytest.mark.fullsync
def test_a_data_folder_from_the_official_server_moves_to_ankisync(start_server, make_device):
    """The official server keeps schema 18 in the same layout: ankisync adopts it."""
    official = start_server(kind="official")
    laptop = make_device("modern", "laptop", on=official)
    laptop.do("build_sample")
    first_upload(laptop)
    laptop.do("write_media", files=[["moved.png", 3000, 1]])
    laptop.sync_media()
    official.stop()
    # ankisync on the same folder and port: the laptop's endpoint and key stay as they are.
    ours = start_server(base=official.base, port=official.port)
    assert laptop.sync() == "no_changes"
    phone = make_device("modern", "phone", on=ours)
    join_by_download(phone)
    phone.sync_media()
    assert_same(laptop, phone)
    assert phone.media_files() == laptop.media_files() != {}


def schema18_collection(tmp_path, notes):
    """A collection as a modern client uploads it: schema 18."""
    path = str(tmp_path / "modern.anki2")
    col = Collection(path)
    for i in range(notes):
        _add(col, "Basic", "Deck", ["front %d" % i, "back"])
    col.close()
    with open(path, "rb") as f:
        return f.read()


def served_version(body, tmp_path):
    path = str(tmp_path / "served.anki2")
    with open(path, "wb") as f:
        f.write(body)
    db = ankisync.connect_collection(path)
    try:
        return db.execute("select ver, usn from col").fetchone(), db.execute(
            "select count() from notes").fetchone()[0]
    finally:
        db.close()


def test_modern_downloads_get_the_uploaded_schema_18_file_until_the_next_sync(server, tmp_path):
    """Modern clients need not upgrade a schema-11 file right after a modern upload."""
    key = login(server)
    answer = modern(server, "upload", schema18_collection(tmp_path, 3), key=key)
    assert answer.status == 200 and answer.body == b"OK", answer
    body = modern(server, "download", {}, key=key).body
    assert served_version(body, tmp_path) == ((18, 1), 3)
    body = legacy(server, "download", {"k": key, "v": "ankidesktop,2.1.54"}).body
    assert served_version(body, tmp_path) == ((11, 2), 3)     # the same usn steps on both
    body = modern(server, "download", {}, key=key).body
    assert served_version(body, tmp_path) == ((18, 3), 3)
    # A normal sync changes the collection: from then on everyone gets schema 11.
    modern(server, "meta", {"v": 11, "cv": "t"}, key=key)
    for method, payload in [("start", {"minUsn": 0, "lnewer": True}),
                            ("applyChanges", {"changes": {"models": [], "decks": [[], []],
                                                          "tags": ["new"]}}),
                            ("finish", {})]:
        assert modern(server, method, payload, key=key).status == 200
    body = modern(server, "download", {}, key=key).body
    assert served_version(body, tmp_path) == ((11, 5), 3)
    assert not os.path.exists(os.path.join(server.base, USER, "collection.schema18.anki2"))


def test_a_full_download_needs_no_second_copy_of_the_collection(server, make_device):
    laptop = make_device("modern", "laptop")
    laptop.do("add_notes", deck="Default", prefix="word", count=20)
    first_upload(laptop)
    key = login(server)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    head = json.dumps({"v": 11, "k": key, "c": "test,0,linux", "s": "s1"})
    conn.request("POST", "/sync/download", ZSTD.compress(b'{"_pad":null}'), {"anki-sync": head})
    response = conn.getresponse()
    first = response.read(10)           # the download is under way, and reads the file itself
    folder = os.path.join(server.base, USER)
    assert [n for n in os.listdir(folder) if n.startswith(ankisync.TEMP_PREFIXES)] == []
    # A sync that writes meanwhile goes on in a copy: the download stays whole.
    laptop.do("add_notes", deck="Default", prefix="meanwhile", count=2)
    assert sync_normally(laptop) == "normal_sync"
    data = ZSTD.decompress(first + response.read(), 10 ** 9)
    conn.close()
    path = str(server.base) + ".downloaded.anki2"
    with open(path, "wb") as f:
        f.write(data)
    db = ankisync.connect_collection(path)
    assert db.execute("pragma integrity_check").fetchone() == ("ok",)
    assert db.execute("select count() from notes").fetchone() == (20,)
    db.close()


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_a_damaged_collection_is_set_aside_and_a_device_uploads_its_notes(server, make_device,
                                                                          damage):
    laptop = make_device("modern", "laptop")
    laptop.do("add_notes", deck="Default", prefix="word", count=5)
    first_upload(laptop)
    path = os.path.join(server.base, USER, "collection.anki2")
    server.stop()
    with open(path, "r+b") as f:
        if damage == "empty":
            f.truncate(0)
        elif damage == "truncated":
            f.truncate(os.path.getsize(path) // 2)
        else:
            f.write(b"this is not a database at all")
    server.start()
    # The next sync finds an empty collection: a full sync, and the laptop uploads.
    outcome = laptop.sync()
    assert outcome in ("full_upload", "full_sync"), outcome
    laptop.full_upload()
    phone = make_device("modern", "phone")
    join_by_download(phone)
    assert_same(laptop, phone)
    aside = [n for n in os.listdir(os.path.dirname(path)) if ".damaged-" in n]
    assert aside == ([] if damage == "empty" else aside[:1]) and (damage == "empty" or aside)
    if damage != "empty":
        assert "is damaged" in server.log_tail(200)


def test_unicase_collate():
    assert ankisync.unicase_collate("abc", "ABC") == 0
    assert ankisync.unicase_collate("Straße", "STRASSE") == 0
    assert ankisync.unicase_collate("a", "B") == -1
    assert ankisync.unicase_collate("b", "A") == 1


def test_a_second_server_on_the_same_data_folder_refuses_to_start(server):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNC_")}
    env.update(SYNC_BASE=server.base, SYNC_HOST="127.0.0.1", SYNC_PORT=str(free_port()))
    proc = run_ankisync("serve", env=env, timeout=30)     # it must end by itself
    assert proc.returncode != 0
    assert "already serves" in proc.stderr and "pid %d" % server.proc.pid in proc.stderr
    assert "Traceback" not in proc.stderr
    assert post(server, "/health", method="GET").status == 200


def test_a_data_folder_the_server_cannot_write_is_one_line_naming_the_owner(tmp_path):
    python = "/usr/bin/python3"
    if os.getuid() != 0 or not shutil.which("runuser") or not os.path.exists(python):
        pytest.skip("needs root, runuser and a Python other users can run")
    shared = tempfile.mkdtemp(prefix="ankisync-test-", dir="/tmp")    # others may enter it
    os.chmod(shared, 0o755)
    script = os.path.join(shared, "ankisync.py")
    shutil.copy(os.path.join(HERE, "ankisync.py"), script)
    os.chmod(script, 0o644)
    data = pathlib.Path(shared) / "data"
    data.mkdir()
    (data / "auth.db").write_bytes(b"")
    os.chmod(str(data), 0o755)          # root's, as a bind mount made by Docker would be
    # Not run_ankisync: a copy of ankisync.py that `nobody` can read, run as `nobody` by
    # a Python of the system's, each command to end with its error.
    for args in (["serve"], ["adduser", "bob"], ["lsuser"]):
        for _ in range(3):      # a port free a moment ago may be taken by then: another
            proc = subprocess.run(["runuser", "-u", "nobody", "--", "env",
                                   "SYNC_BASE=%s" % data, "SYNC_PORT=%d" % free_port(),
                                   python, script] + args,
                                  capture_output=True, text=True, timeout=30, input="pw\n")
            if "already in use" not in proc.stderr:
                break
        assert proc.returncode != 0, args
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "cannot write" in lines[0] and "uid 0" in lines[0] and "chown" in lines[0]
    shutil.rmtree(shared)


# --- small disks ---


@pytest.fixture
def small_disk(tmp_path):
    """A 12 MiB tmpfs, for a data folder that fills up; skipped where mount is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: %s" % proc.stderr.strip())
    yield str(mount)
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(folder, leave=0):
    """Fill the file system of `folder` up to `leave` bytes free; returns the filler."""
    filler = os.path.join(folder, "filler")
    with open(filler, "wb") as f:
        block = b"\0" * 65536
        try:
            while shutil.disk_usage(folder).free > leave + len(block):
                f.write(block)
                f.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_lets_users_log_in_refuses_writes_with_507_and_heals_by_itself(
        small_disk, start_server, make_device, tmp_path):
    data = os.path.join(small_disk, "data")
    srv = start_server(env={"SYNC_BASE": data})
    laptop = phone_with_notes(make_device, on=srv)
    first_upload(laptop)
    laptop.do("write_media", files=[["a.jpg", 2000, 1]])
    laptop.sync_media()
    filler = fill(small_disk)
    try:
        # A new device logs in (nothing is written for a login) ...
        phone = make_device("modern", "phone2", on=srv)
        phone.login()
        # ... but what must be stored is refused with 507 and a reason, not 500 or 400.
        key = login(srv)
        big = media_zip([("b.jpg", os.urandom(300000))])
        answer = modern(srv, "uploadChanges", big, key=key, area="msync")
        assert answer.status == 507 and b"disk is full" in answer.body, answer
        assert b"Errno" not in answer.body
        media = os.path.join(data, USER, "media")
        assert os.path.exists(os.path.join(media, "a.jpg"))           # the folder it would be in
        assert not os.path.exists(os.path.join(media, "b.jpg"))
        assert "disk full during msync/uploadChanges" in srv.log()
    finally:
        os.unlink(filler)
    # Room again: the same device syncs on, nothing to repair.
    join_by_download(phone)
    assert_same(laptop, phone)
    laptop.do("write_media", files=[["c.jpg", 2000, 2]])
    laptop.sync_media()


def test_on_a_small_disk_a_collection_is_stored_once_and_downloads_work(small_disk,
                                                                         start_server,
                                                                         make_device):
    """A collection of a third of the disk: its schema-18 copy is not kept, and a full
    download streams the file itself, needing no room for a copy."""
    data = os.path.join(small_disk, "data")
    srv = start_server(env={"SYNC_BASE": data})
    laptop = make_device("modern", "laptop", on=srv)
    rng = random.Random(5)
    fronts = ["".join(rng.choice("abcdefghij klmnop") for _ in range(2000))
              for _ in range(2000)]
    laptop.do("add_notes_with_fronts", deck="Default", fronts=fronts)
    first_upload(laptop)
    folder = os.path.join(data, USER)
    assert os.path.exists(os.path.join(folder, "collection.anki2"))    # stored here, once
    assert not os.path.exists(os.path.join(folder, "collection.schema18.anki2"))
    fill(small_disk, leave=256 * 1024)
    phone = make_device("modern", "phone", on=srv)
    join_by_download(phone)
    assert_same(laptop, phone)


# --- Collection sync: meta, sessions spoken by hand, old devices replayed --------------


@pytest.mark.parametrize("version,conf,reason", [
    (8, {}, ""),                                                    # no schedVer: v1
    (8, {"schedVer": 1, "creationOffset": None}, ""),
    (8, {"schedVer": 2, "creationOffset": None}, "v2 scheduler"),
    (8, {"schedVer": 2, "creationOffset": 0}, "v2 scheduler"),      # the first reason wins
    (9, {"schedVer": 2, "creationOffset": None}, ""),
    (9, {"schedVer": 2, "creationOffset": 0}, "timezone"),          # UTC is an offset too
    (9, {"schedVer": 1, "creationOffset": -60}, "timezone"),
    (10, {"schedVer": 2, "creationOffset": 120}, ""),
    (11, {"schedVer": 2, "creationOffset": 120}, ""),
])
def test_old_clients_are_refused_by_the_official_rules(version, conf, reason):
    refusal = ankisync.old_client_refusal(version, json.dumps(conf))
    assert (reason in refusal) if reason else refusal == ""


def test_two_requests_compute_at_once_and_a_wait_for_a_users_lock_holds_no_turn(tmp_path):
    """Alice's laptop holds her lock and a turn; her phone waits for her lock, holding no
    turn, so Bob still gets the second turn at once. Carol waits for a turn until Alice's
    laptop is done."""
    def user_lock(name):
        folder = tmp_path / name
        folder.mkdir()
        lock = threading.Lock()
        return lambda: ankisync.UserLock(lock, name + " is busy",
                                         ankisync.FolderLock(str(folder / "lock")))

    alice, bob, carol = user_lock("alice"), user_lock("bob"), user_lock("carol")
    assert ankisync.COMPUTING_MAX == 2
    events = []

    def hold(lock, name, release):
        with lock():
            events.append(name)
            release.wait(10)

    laptop_done, bob_done, rest_done = threading.Event(), threading.Event(), threading.Event()
    threads = [threading.Thread(target=hold, args=(alice, "laptop", laptop_done))]
    threads[0].start()
    wait_until(lambda: events == ["laptop"], 5, "the laptop's turn")
    threads.append(threading.Thread(target=hold, args=(alice, "phone", rest_done)))
    threads[1].start()
    threads.append(threading.Thread(target=hold, args=(bob, "bob", bob_done)))
    threads[2].start()
    wait_until(lambda: "bob" in events, 5, "Bob's turn beside the laptop's")
    threads.append(threading.Thread(target=hold, args=(carol, "carol", rest_done)))
    threads[3].start()
    time.sleep(0.2)
    assert events == ["laptop", "bob"]          # two turns taken: Carol and the phone wait
    laptop_done.set()
    wait_until(lambda: len(events) == 3, 5, "the next turn")
    bob_done.set()
    wait_until(lambda: sorted(events) == ["bob", "carol", "laptop", "phone"], 5, "every turn")
    rest_done.set()
    for thread in threads:
        thread.join(15)


def server_state(server):
    """What a normal sync could change on the server, read from the committed file."""
    db = sqlite3.connect(os.path.join(server.base, USER, "collection.anki2"))
    try:
        return (db.execute("select mod, usn, ls, tags, decks, models from col").fetchone(),
                db.execute("select count(), total(mod) from notes").fetchone(),
                db.execute("select count() from cards").fetchone(),
                db.execute("select count() from revlog").fetchone(),
                db.execute("select count() from graves").fetchone())
    finally:
        db.close()


def a_note_row(server):
    db = sqlite3.connect(os.path.join(server.base, USER, "collection.anki2"))
    try:
        return list(db.execute("select id, guid, mid, mod, usn, tags, flds, '', '', 0, '' "
                               "from notes limit 1").fetchone())
    finally:
        db.close()


@pytest.fixture
def laptop_with_cards(server, make_device):
    laptop = make_device("modern", "laptop")
    laptop.do("build_sample")
    first_upload(laptop)
    return laptop


@pytest.mark.normalsync
def test_a_client_killed_mid_sync_leaves_the_server_unchanged(server, laptop_with_cards,
                                                              make_device):
    before = server_state(server)
    key = login(server)
    modern(server, "meta", {"v": 11, "cv": "t"}, key=key, session="dying")
    note = a_note_row(server)
    steps = [("start", {"minUsn": 0, "lnewer": True, "graves": None}),
             ("applyGraves", {"chunk": {"cards": [], "notes": [note[0]], "decks": []}}),
             ("applyChanges", {"changes": {"models": [], "decks": [[], []], "tags": ["crash"]}}),
             ("chunk", {"_pad": None}),
             ("applyChunk", {"chunk": {"done": False, "notes": [note[:6] + ["edited\x1fx"]
                                                                + note[7:]]}})]
    for method, payload in steps:
        answer = modern(server, method, payload, key=key, session="dying")
        assert answer.status == 200, (method, answer)
    # The phone dies here: no sanityCheck2, no finish. Nothing of it is on disk ...
    assert server_state(server) == before
    # ... and the laptop's next sync simply works, and a new phone agrees with it.
    laptop_with_cards.do("add_notes", deck="Lang::Deutsch", prefix="after", count=2)
    assert sync_normally(laptop_with_cards) == "normal_sync"
    phone = make_device("modern", "phone")
    join_by_download(phone)
    assert_same(laptop_with_cards, phone)


def test_an_abandoned_sync_is_rolled_back_after_the_idle_timeout(tmp_path):
    config = ankisync.Config()
    config.data, config.session_timeout = str(tmp_path), 1
    app = ankisync.SyncApp(config)
    syncer = app.collection_for("alice")
    syncer.collection.open()
    syncer.session = ankisync.SyncSession("s", syncer.collection.conn, 0, True)
    syncer.session.apply_changes({"models": [], "decks": [[], []], "tags": ["lost"]})
    app.expire_idle_sessions()
    assert syncer.session is not None                   # still within the timeout

    def rolled_back():
        app.expire_idle_sessions()
        return syncer.session is None
    # Rolled back once the timeout is over: within 1.1 s from here, as it was before.
    wait_until(rolled_back, timeout=config.session_timeout + 0.1, every=0.02,
               what="the idle session rolled back")
    tags = syncer.collection.open().execute("select tags from col").fetchone()[0]
    assert json.loads(tags) == {}


@pytest.mark.normalsync
def test_crafted_sync_requests_get_4xx_and_change_nothing(server, laptop_with_cards):
    key = login(server)
    note = a_note_row(server)
    before = server_state(server)

    def attempt(*calls, session="s1"):
        """Runs meta, start, then `calls` up to the first that fails; returns the answer
        to the last one run."""
        modern(server, "meta", {"v": 11, "cv": "t"}, key=key, session=session)
        assert modern(server, "start", {"minUsn": 0, "lnewer": True}, key=key,
                      session=session).status == 200
        for method, payload in calls:
            answer = modern(server, method, payload, key=key, session=session)
            if answer.status != 200:
                break
        modern(server, "abort", {}, key=key, session=session)
        return answer

    unknown_notetype = note[:2] + [123456789] + note[3:]
    too_many_fields = note[:6] + ["a\x1fb\x1fc"] + note[7:]
    cases = {
        "note of a notetype the server lacks":
            [("applyChunk", {"chunk": {"notes": [unknown_notetype]}})],
        "note with too many fields": [("applyChunk", {"chunk": {"notes": [too_many_fields]}})],
        "card row too short": [("applyChunk", {"chunk": {"cards": [[1, 2, 3]]}})],
        "revlog row with text": [("applyChunk", {"chunk": {"revlog": [["x"] * 9]}})],
        "chunk that is not an object": [("applyChunk", {"chunk": [1, 2]})],
        "graves that are not ids":
            [("applyGraves", {"chunk": {"cards": ["nope"], "notes": [], "decks": []}})],
        "notetype without fields":
            [("applyChanges", {"changes": {"models": [{"id": 5, "mod": 1}], "decks": [[], []],
                                           "tags": []}})],
        "decks not a pair":
            [("applyChanges", {"changes": {"models": [], "decks": [], "tags": []}})],
        "finish after a failed sanity check":
            [("sanityCheck2", {"client": [[0, 0, 0], 1, 1, 1, 0, 1, 1, 1]}), ("finish", {})],
    }
    for case, calls in cases.items():
        answer = attempt(*calls)
        assert 400 <= answer.status < 500, (case, answer)
        assert answer.body.strip(), case                 # a reason, not an empty answer
        assert server_state(server) == before, case
    # Methods out of order or from another device's session.
    modern(server, "meta", {"v": 11, "cv": "t"}, key=key)
    assert modern(server, "applyChunk", {"chunk": {}}, key=key).status == 409
    assert modern(server, "finish", {}, key=key).status == 409
    assert modern(server, "start", {"minUsn": 0, "lnewer": True}, key=key,
                  session="a").status == 200
    assert modern(server, "chunk", {}, key=key, session="b").status == 409
    assert modern(server, "finish", {}, key=key, session="b").status == 409
    modern(server, "abort", {}, key=key, session="a")
    assert server_state(server) == before
    # The laptop still syncs normally afterwards.
    laptop_with_cards.do("add_notes", deck="Lang::Deutsch", prefix="still", count=1)
    assert sync_normally(laptop_with_cards) == "normal_sync"


@pytest.mark.normalsync
def test_ankidroid_sends_its_deletions_inside_start_with_ids_as_strings(server,
                                                                        laptop_with_cards):
    """AnkiDroid's Java sync and old AnkiMobile: graves in `start`, maybe as strings."""
    key = login(server)
    note = a_note_row(server)
    db = sqlite3.connect(os.path.join(server.base, USER, "collection.anki2"))
    card = db.execute("select id from cards where nid=?", (note[0],)).fetchone()[0]
    db.close()
    fields = {"k": key, "s": "droid123", "c": "1"}

    def call(method, payload):
        answer = legacy(server, method, fields, json.dumps(payload).encode())
        assert answer.status == 200, (method, answer)
        return answer.json()
    meta = call("meta", {"v": 10, "cv": "ankidroid,2.15.6,Android"})
    graves = {"cards": [str(card)], "notes": [str(note[0])], "decks": []}
    assert call("start", {"minUsn": meta["usn"], "lnewer": True, "graves": graves}) == \
        {"cards": [], "notes": [], "decks": []}
    call("applyChanges", {"changes": {"models": [], "decks": [[], []], "tags": []}})
    assert call("chunk", {})["done"] is True
    call("applyChunk", {"chunk": {"done": True}})
    sanity = call("sanityCheck2", {"client": "missing notes"})      # a client-side failure
    assert sanity["status"] == "bad"
    assert legacy(server, "finish", fields, b"{}").status == 400        # rolled back, not committed
    db = sqlite3.connect(os.path.join(server.base, USER, "collection.anki2"))
    try:
        assert db.execute("select count() from notes where id=?", (note[0],)).fetchone()[0] == 1
    finally:
        db.close()
    # The same again, with a sanity check that passes: the deletion is committed.
    meta = call("meta", {"v": 10, "cv": "ankidroid,2.15.6,Android"})
    call("start", {"minUsn": meta["usn"], "lnewer": True, "graves": graves})
    call("applyChanges", {"changes": {"models": [], "decks": [[], []], "tags": []}})
    call("chunk", {})
    call("applyChunk", {"chunk": {"done": True}})
    db = sqlite3.connect(os.path.join(server.base, USER, "collection.anki2"))
    try:
        cards, notes, revlog = (db.execute("select count() from %s" % table).fetchone()[0]
                                for table in ("cards", "notes", "revlog"))
        models, decks, dconf = (len(json.loads(db.execute("select %s from col" % c).fetchone()[0]))
                                for c in ("models", "decks", "dconf"))
    finally:
        db.close()
    counts = [[0, 0, 0], cards - 1, notes - 1, revlog, 0, models, decks, dconf]
    assert call("sanityCheck2", {"client": counts})["status"] == "ok"
    assert isinstance(call("finish", {}), int)
    db = sqlite3.connect(os.path.join(server.base, USER, "collection.anki2"))
    try:
        assert db.execute("select count() from notes where id=?", (note[0],)).fetchone()[0] == 0
        assert db.execute("select count() from graves where oid=? and type=1",
                          (note[0],)).fetchone()[0] == 1
    finally:
        db.close()
    # The laptop learns of the deletion at its next sync.
    assert sync_normally(laptop_with_cards) == "normal_sync"
    assert laptop_with_cards.col.db.scalar("select count() from notes where id=?", note[0]) == 0


def test_note_tags_are_normalized_as_anki_stores_them():
    for sent, stored in [("", ""), (" ", ""), (" a b ", " a b "), ("a b", " a b "),
                         ("  a  b ", " a b "), ("a\u3000b", " a b ")]:
        assert ankisync.normalize_note_tags(sent) == stored


@pytest.mark.normalsync
def test_the_server_sorts_and_checksums_notes_as_the_client_does(server, laptop_with_cards):
    fronts = ["<b>Bold</b> word", "caf&eacute; &amp; cr&egrave;me", '<img src="cat.jpg"> cat',
              "1984", "<div>x<br>y</div>", "plain", "&nbsp;space", "<!-- hidden -->shown"]
    laptop_with_cards.do("add_notes_with_fronts", deck="Lang::Deutsch", fronts=fronts)
    assert sync_normally(laptop_with_cards) == "normal_sync"
    on_server = sqlite3.connect(os.path.join(server.base, USER, "collection.anki2"))
    try:
        rows = dict((flds.split("\x1f")[0], (sfld, csum)) for flds, sfld, csum in on_server.execute(
            "select flds, sfld, csum from notes"))
    finally:
        on_server.close()
    on_laptop = laptop_with_cards.col.db.all("select flds, sfld, csum from notes")
    for flds, sfld, csum in on_laptop:
        front = flds.split("\x1f")[0]
        if front in fronts:
            assert rows[front] == (sfld, csum), front


# --- the seed's devices: Anki 2.0 (v8) and Anki 2.1.4 (v9), replayed ---
# Neither client installs from the package index any more: their real requests, recorded on
# loopback (testdata/traces/README.md), are sent again byte for byte.


class RecordedStory:
    """The requests two old devices of one user really sent, replayed in order to a live
    server. Host keys differ between servers: each recorded key is swapped for the live one,
    learnt when the recorded hostKey is replayed. The recorded answers are one server's (the
    official one for v9, ankisync 0.1.0 for v8); they are compared where they do not depend
    on the clock."""

    def __init__(self, server, folder):
        self.server = server
        self.trace = {name[len(folder) + 1:-len(".json")]: exchange
                      for name, exchange in traced_exchanges() if name.startswith(folder + "/")}
        self.keys = {}

    def names(self, first="", last="~"):
        return sorted(name for name in self.trace if first <= name <= last)

    def send(self, name, path=None, body=None):
        """Replay request `name` (e.g. "009-meta"), to another path or with another body."""
        request = self.trace[name]["request"]
        raw = base64.b64decode(request["body_b64"]) if body is None else body
        path = path or request["path"]
        for recorded, live in self.keys.items():
            raw, path = raw.replace(recorded.encode(), live.encode()), path.replace(recorded, live)
        headers = {k: v for k, v in request["headers"]
                   if k.lower() not in ("host", "content-length")}
        answer = post(self.server, path, raw, headers, method=request["method"])
        if name.endswith("hostKey") and answer.status == 200:
            self.keys[self.trace[name]["response"]["json"]["key"]] = answer.json()["key"]
        return answer

    def meta(self, name):
        answer = self.send(name)
        assert answer.status == 200, answer
        return answer.json()

    def collection_in(self, name):
        """The collection file a recorded upload carried."""
        raw = base64.b64decode(self.trace[name]["request"]["body_b64"])
        part = raw.split(b"Content-Type: application/octet-stream\r\n\r\n", 1)[1]
        return gzip.decompress(part.rsplit(b"\r\n--Anki-sync-boundary", 1)[0])

    def upload_as(self, like, collection):
        """A full upload in the form this client writes: the short fields of request
        `like`, then the gzipped file and, this time, the closing boundary."""
        fields = self.trace[like]["request"]["multipart_fields"]
        body = b"".join(b'--Anki-sync-boundary\r\nContent-Disposition: form-data; '
                        b'name="%s"\r\n\r\n%s\r\n' % (k.encode(), v.encode())
                        for k, v in fields.items() if k != "data")
        body += (b'--Anki-sync-boundary\r\nContent-Disposition: form-data; name="data"; '
                 b'filename="data"\r\nContent-Type: application/octet-stream\r\n\r\n'
                 + gzip.compress(collection) + b"\r\n--Anki-sync-boundary--\r\n")
        return self.send(like, "/sync/upload", body)

    def replay(self, names):
        """Send each request in turn and check each answer against the recorded one;
        returns the answers by name."""
        answers = {}
        for name in names:
            answer = answers[name] = self.send(name)
            recorded = self.trace[name]["response"]
            assert answer.status == recorded["status"] == 200, (name, answer)
            method = name.split("-", 1)[1]
            if method in ("hostKey", "upload", "download", "downloadFiles", "finish"):
                continue            # keys, files and the server's clock: checked by the story
            got, expected = answer.json(), recorded["json"]
            if method == "meta":
                for field in ("usn", "empty", "media_usn", "cont", "msg"):
                    assert got[field] == expected[field], (name, field)
            elif method == "begin":
                assert got["data"]["usn"] == expected["data"]["usn"], name
            elif method == "chunk":
                # The official server sends rows in another order, and cards' data as "{}".
                for table in ("revlog", "cards", "notes"):
                    assert (sorted(row[0] for row in got.get(table, []))
                            == sorted(row[0] for row in expected.get(table, []))), (name, table)
                assert got["done"] == expected["done"], name
            else:
                assert got == expected, name
        return answers


def collection_rows(data, tmp_path):
    """What a collection file holds (notes, cards, reviews, settings), to compare copies."""
    path = str(tmp_path / ("copy-%d.anki2" % random.randrange(10**9)))
    with open(path, "wb") as f:
        f.write(data)
    with contextlib.closing(sqlite3.connect(path)) as db:
        rows = {table: db.execute("select * from %s order by id" % table).fetchall()
                for table in ("notes", "cards", "revlog")}
        rows["conf"] = json.loads(db.execute("select conf from col").fetchone()[0])
    return rows


@pytest.fixture
def old_server(start_server):
    """An ankisync with the users the recorded devices log in as."""
    return start_server(users=[("u1", "pass"), ("u2", "pass")])


def test_anki_2_0_starts_an_account_then_both_devices_sync_collection_and_media(old_server,
                                                                              tmp_path):
    """Anki 2.0.52 (sync v8, the protocol of AnkiDroid up to 2.8) on a new account. The
    account's empty collection is v2-scheduler, which 2.0 cannot use, but the device is
    about to upload its own: it is let through. Then the recorded story of 2.0 and an
    Anki 2.1.4 laptop, including 2.0's download, a form with no closing boundary."""
    story = RecordedStory(old_server, "v8-anki2.0.52")
    story.replay(["008-hostKey"])                                   # the 2.0 device logs in
    meta = story.meta("009-meta")
    assert meta["cont"] and meta["empty"] and meta["msg"] == ""

    # It uploads its v1-scheduler collection (the one of the recording): kept as it is.
    collection = story.collection_in("003-upload")
    assert collection_rows(collection, tmp_path)["conf"].get("schedVer", 1) == 1
    answer = story.upload_as("010-download", collection)
    assert answer.status == 200 and answer.body == b"OK", answer

    story.replay(["001-hostKey"] + story.names("004", "007"))      # the laptop adds media
    answers = story.replay(story.names("008"))                      # and the story goes on
    downloaded = answers["010-download"].body
    assert collection_rows(downloaded, tmp_path) == collection_rows(collection, tmp_path)
    assert b"snd1.mp3" in answers["013-downloadFiles"].body


def test_anki_2_1_4_devices_sync_the_recorded_story_as_with_the_official_server(old_server,
                                                                               tmp_path):
    """Two Anki 2.1.4 devices (sync v9, the tutorial's version): full upload of 50 notes with
    reviews and media, full download, then edits, deletions and media both ways. Every
    answer matches the official server's in the recording."""
    story = RecordedStory(old_server, "v9-anki2.1.4")
    answers = story.replay(story.names())
    collection = story.collection_in("003-upload")
    assert collection_rows(answers["010-download"].body, tmp_path) == collection_rows(collection,
                                                                                     tmp_path)
    assert len(collection_rows(collection, tmp_path)["notes"]) == 50


def test_old_devices_are_stopped_before_they_damage_a_newer_collection(old_server, tmp_path):
    """A laptop with Anki 26.9 uploads: its collection has the v2 (v3) scheduler and the new
    timezone handling. Anki 2.0 would schedule it with v1 rules, Anki 2.1.4 would move due
    days: both are told why they cannot sync and what to do, like the official server's
    refusal but with the way out. Once the laptop turns on the legacy timezone handling,
    the 2.1.4 device syncs again; 2.0 still cannot."""
    laptop = ModernDevice("laptop", str(tmp_path / "laptop"), old_server, "u2", "pass")
    try:
        laptop.do("build_sample")
        first_upload(laptop)
        story = RecordedStory(old_server, "v8-anki2.0.52")
        story.replay(["001-hostKey", "008-hostKey"])                # both old devices log in
        old_laptop = story.meta("002-meta")                          # Anki 2.1.4, v9
        assert not old_laptop["cont"]
        assert "timezone" in old_laptop["msg"] and "Legacy timezone" in old_laptop["msg"]
        old_phone = story.meta("009-meta")                           # Anki 2.0.52, v8
        assert not old_phone["cont"] and "v2 scheduler" in old_phone["msg"]

        laptop.col.set_config("creationOffset", None)
        assert laptop.sync() == "normal_sync"
        assert story.meta("002-meta")["cont"]
        assert not story.meta("009-meta")["cont"]
    finally:
        laptop.close()


# --- Media sync: crafted uploads, usn, begin, a damaged media.db -----------------------


def media_usn(server, key):
    answer = modern(server, "begin", {"v": "test"}, key=key, area="msync")
    assert answer.status == 200, answer
    return answer.json()["data"]["usn"]


def bomb_zip():
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("0", "w", force_zip64=True) as f:
            block = b"\0" * (1 << 20)
            for _ in range(110):                     # 110 MiB of zeros, ~110 KiB zipped
                f.write(block)
        archive.writestr("_meta", json.dumps([["bomb.bin", "0"]]))
    return out.getvalue()


def many_entries_zip():
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for i in range(1000):
            archive.writestr(str(i), b"x")
        archive.writestr("_meta", json.dumps([["f%d" % i, str(i)] for i in range(1000)]))
    return out.getvalue()


CRAFTED_UPLOADS = {
    "parent folder": lambda: media_zip([("../evil", b"x")]),
    "absolute path": lambda: media_zip([("/etc/x", b"x")]),
    "subfolder": lambda: media_zip([("a/b", b"x")]),
    "backslash": lambda: media_zip([("a\\b", b"x")]),
    "drive": lambda: media_zip([("C:evil", b"x")]),
    "the _meta name": lambda: media_zip([("_meta", b"x")]),
    "300-byte name": lambda: media_zip([("n" * 296 + ".png", b"x")]),
    "NFD name": lambda: media_zip([("cafe\u0301.jpg", b"x")]),
    "control character": lambda: media_zip([("a\nb.png", b"x")]),
    "empty file": lambda: media_zip([("empty.png", b"")]),
    "zip bomb": bomb_zip,
    "truncated zip": lambda: media_zip([("ok.png", b"x" * 5000)])[:3000],
    "1000 entries": many_entries_zip,
    "entry missing": lambda: media_zip([], meta=[["ghost.png", "7"]]),
    "meta not a list": lambda: media_zip([], meta={"a": "0"}),
    "good file then a bad one": lambda: media_zip([("good.png", b"fine"), ("../evil", b"x")]),
}


@pytest.mark.parametrize("case", sorted(CRAFTED_UPLOADS))
def test_crafted_media_uploads_are_refused_and_change_nothing(server, case):
    key = login(server)
    answer = modern(server, "uploadChanges", media_zip([("first.png", b"one")]), key=key,
                    area="msync")
    assert answer.status == 200 and answer.json()["data"] == [1, 1]
    answer = modern(server, "uploadChanges", CRAFTED_UPLOADS[case](), key=key, area="msync")
    assert 400 <= answer.status < 500, (case, answer)
    assert media_usn(server, key) == 1
    media = os.path.join(server.base, USER, "media")
    assert sorted(os.listdir(media)) == ["first.png"]
    everything = [os.path.join(root, name)
                  for root, _, names in os.walk(os.path.dirname(server.base)) for name in names]
    assert not any("evil" in path or path.endswith("/x") for path in everything)


def test_media_usn_rises_by_one_per_change_and_deletions_stay(server):
    key = login(server)

    def upload(zipped):
        return modern(server, "uploadChanges", zipped, key=key, area="msync").json()

    def sanity(count):
        return modern(server, "mediaSanity", {"local": count}, key=key,
                      area="msync").json()["data"]

    assert upload(media_zip([("a.png", b"1"), ("b.png", b"2")]))["data"] == [2, 2]
    assert upload(media_zip([("a.png", b"1")]))["data"] == [1, 2]          # same content
    assert upload(media_zip([], meta=[["b.png", None], ["gone.png", ""]]))["data"] == [2, 3]
    rows = modern(server, "mediaChanges", {"lastUsn": 0}, key=key, area="msync").json()["data"]
    assert [(name, usn) for name, usn, _ in rows] == [("a.png", 1), ("b.png", 3)]
    assert rows[1][2] == ""
    assert sanity(1) == "OK" and sanity(2) == "mediaSanity"
    answer = modern(server, "downloadFiles", {"files": ["b.png"]}, key=key, area="msync")
    assert answer.status == 409


def test_every_form_of_media_begin_and_the_legacy_session_key(server):
    """POST with the v11 header, POST multipart (AnkiDroid), GET with a query (2.1.22+)."""
    key = login(server)
    answer = modern(server, "begin", {"v": "anki,26.9.3"}, key=key, area="msync")
    assert answer.status == 200 and answer.json() == {"data": {"usn": 0, "sk": key}, "err": ""}
    answer = legacy(server, "begin", {"k": key, "v": "ankidroid,2.15.6", "c": "1"}, b"{}",
                    area="msync")
    assert answer.status == 200 and answer.json()["data"]["sk"] == key
    answer = post(server, "/msync/begin?k=%s&v=anki%%2C2.1.54" % key, method="GET")
    assert answer.status == 200 and answer.json()["data"]["usn"] == 0
    # Later legacy media calls name the key `sk`; their data may come uncompressed.
    answer = legacy(server, "mediaChanges", {"sk": key}, b'{"lastUsn": 0}', area="msync",
                    gzip_data=False)
    assert answer.status == 200 and answer.json() == {"data": [], "err": ""}
    assert post(server, "/msync/begin?k=%s" % key, method="GET").status == 400      # no version


def test_a_damaged_media_db_is_made_again_from_the_files_and_devices_sync_on(server,
                                                                           make_device):
    laptop = make_device("modern", "laptop")
    laptop.do("add_notes", deck="Default", prefix="word", count=2)
    first_upload(laptop)
    laptop.do("write_media", files=[["a.jpg", 3000, 1], ["b.mp3", 5000, 2]])
    laptop.sync_media()
    server.stop()
    with open(os.path.join(server.base, USER, "media.db"), "wb") as f:
        f.write(b"not a database" * 100)
    for side in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(server.base, USER, "media.db" + side))
    server.start()
    phone = make_device("modern", "phone")
    join_by_download(phone)
    phone.sync_media()
    assert phone.media_files() == laptop.media_files()
    laptop.do("write_media", files=[["c.jpg", 2000, 3]])
    laptop.sync_media()
    phone.sync_media()
    assert phone.media_files() == laptop.media_files() and len(phone.media_files()) == 3
    assert "media.db was damaged" in server.log_tail(300)


# --- HTTP: connections, the open internet, TLS, the front page -------------------------


def test_idle_keep_alive_connections_do_not_hold_up_new_ones(server):
    """Threads are reused between connections, never shared by two at once."""
    held = []
    for _ in range(5):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("GET", "/health")
        assert conn.getresponse().read() == b"ok\n"
        held.append(conn)                   # open and idle, as a client between syncs
    start = time.monotonic()
    assert post(server, "/health", method="GET").status == 200
    assert time.monotonic() - start < 2
    for conn in held:
        conn.request("GET", "/health")      # the first ones are still served, too
        assert conn.getresponse().status == 200
        conn.close()


def read_response(data):
    """The Response in the raw bytes of an answer: its status line, headers and body."""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert data.startswith(b"HTTP/") and lines[0].count(" ") >= 1, data[:200]
    version, status = lines[0].split(" ", 2)[:2]
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return Response(int(status), headers, body, version)


def raw_exchange(server, data, pause=0):
    """Bytes in, the whole answer out, on a fresh socket; the client may `pause` before
    it half-closes and reads, as one on a slow network would."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(data)
        time.sleep(pause)
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while True:
            block = s.recv(65536)
            if not block:
                return read_response(answer)
            answer += block


@pytest.mark.parametrize("request_bytes,status", [
    (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", 200),
    (b"GET /health HTTP/1.0\r\n\r\n", 200),
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /health HTTP/2.0\r\n\r\n", 400),
    (b"GET /health HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    (b"GET /health HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", 431),
    (b"GET /health HTTP/1.1\r\nX-Long: " + b"a" * 70000 + b"\r\n\r\n", 431),
])
def test_request_lines_and_headers_are_read_strictly(server, request_bytes, status):
    answer = raw_exchange(server, request_bytes)
    assert answer.status == status, answer


def test_headers_are_case_insensitive_and_expect_100_continue_works(server):
    key = login(server)
    body = ZSTD.compress(json.dumps({"v": 11, "cv": "t"}).encode())
    head = ("POST /sync/meta HTTP/1.1\r\nANKI-SYNC: %s\r\ncontent-length: %d\r\n"
            "Expect: 100-continue\r\n\r\n" % (json.dumps({"v": 11, "k": key, "c": "t", "s": "s"}),
                                               len(body))).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(head)
        assert s.recv(100).startswith(b"HTTP/1.1 100")
        s.sendall(body)
        answer = read_response(s.recv(65536))
    assert answer.version == "HTTP/1.1" and answer.status == 200
    assert "anki-original-size" in answer.headers


def test_a_refused_body_closes_the_connection_instead_of_being_read_as_a_request(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.putrequest("POST", "/sync/upload")
    conn.putheader("Content-Length", str(10 ** 12))        # far over the limit
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and response.getheader("Connection") == "close"
    conn.close()
    assert post(server, "/health", method="GET").status == 200


# --- the open internet: idle, slow and silent clients ---


@pytest.fixture
def many_sockets():
    """The open-file limit raised to the hard limit while a test holds hundreds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@contextlib.contextmanager
def held():
    """A list for sockets and connections: all are closed at the end, come what may."""
    socks = []
    try:
        yield socks
    finally:
        for sock in socks:
            sock.close()


def connect(server, source="127.0.0.1", send=b""):
    """A raw TCP connection from `source` that sends `send`, then nothing."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10,
                                    source_address=(source, 0))
    if send:
        sock.sendall(send)
    return sock


def kept_alive(server, source):
    """A connection that asked for /health once and now waits, as clients between syncs."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10,
                                      source_address=(source, 0))
    conn.request("GET", "/health")
    assert conn.getresponse().read() == b"ok\n"
    return conn


def peer_state(sock):
    """'waiting' (open, nothing from the server), 'closed' (EOF or reset) or 'answered'."""
    timeout = sock.gettimeout()
    sock.settimeout(0)
    try:
        data = sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return "waiting"
    except ConnectionResetError:
        return "closed"
    finally:
        sock.settimeout(timeout)
    return "answered" if data else "closed"


@contextlib.contextmanager
def trickling(streams, every=0.5):
    """Every `every` seconds, one thread sends each (socket, data) its next byte; yields
    a function that tells how many bytes each has been sent so far."""
    stop = threading.Event()
    sent = [0]

    def run():
        while not stop.wait(every):
            for sock, data in streams:
                with contextlib.suppress(OSError):
                    sock.send(data[sent[0]:sent[0] + 1])
            sent[0] += 1

    def bytes_sent():
        return sent[0]

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield bytes_sent
    finally:
        stop.set()
        thread.join()


def test_300_idle_connections_hold_no_thread_and_the_phone_syncs(server, make_device,
                                                                  many_sockets):
    phone = phone_with_notes(make_device)
    with held() as socks:
        # 200 connections that say nothing (100 of them from the phone's own address)
        # and 100 kept alive after a request: far more than the 64 workers.
        for source in ("127.0.0.1", "127.0.0.2"):
            socks += [connect(server, source) for _ in range(100)]
        kept = [kept_alive(server, "127.0.0.3") for _ in range(100)]
        socks += kept
        first_upload(phone)
        phone_keeps_syncing(phone, "while 300 wait")
        assert post(server, "/health", method="GET").status == 200
        # None of the 300 was dropped to make room, and the kept-alive ones still serve.
        assert [peer_state(s) for s in socks[:200]] + [peer_state(c.sock) for c in kept] \
            == ["waiting"] * 300
        for conn in kept:
            conn.request("GET", "/health")
            assert conn.getresponse().read() == b"ok\n"


@pytest.mark.parametrize("limit,attacker", [
    # An attacker on the phone's own address (one NAT), then on an address of its own.
    ("max_connections_per_address", "127.0.0.1"),
    ("max_connections", "127.0.0.2"),
])
def test_past_the_limit_new_connections_close_the_longest_waiting_ones(start_server,
                                                                       make_device,
                                                                       many_sockets, limit,
                                                                       attacker):
    srv = start_server(ini="%s = 20\n" % limit)
    phone = phone_with_notes(make_device, on=srv)
    # A connection younger than this may be spared (a burst of requests is on its way in).
    # Its age is what the pauses below wait for, and only time brings that: they stay sleeps.
    settle = getattr(ankisync, "EVICT_AFTER", 0) + 0.3
    with held() as socks:
        # 100 silent connections, in two waves with a pause between; then the phone.
        socks += [connect(srv, attacker) for _ in range(80)]
        time.sleep(settle)
        socks += [connect(srv, attacker) for _ in range(20)]
        time.sleep(settle)
        first_upload(phone)
        phone_keeps_syncing(phone, "past the limit")
        states = [peer_state(s) for s in socks]
    # Each newcomer past the limit closed the connection that had waited longest.
    assert states[0] == "closed" and set(states) == {"closed", "waiting"}, states
    assert "closed" not in states[states.index("waiting"):], "not the oldest went first"
    assert states.count("waiting") >= 10, states


SLOW_UPLOAD_HEAD = (b"POST /sync/upload HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Type: multipart/form-data; boundary=BB\r\n"
                    b"Content-Length: 10000000\r\n\r\n")


def test_slow_and_silent_requests_wait_in_the_listener_while_the_phone_syncs(server,
                                                                            make_device,
                                                                            many_sockets):
    phone = phone_with_notes(make_device)
    first_upload(phone)
    with held() as socks:
        slow_heads = [connect(server, "127.0.0.2", b"G") for _ in range(100)]
        slow_bodies = [connect(server, "127.0.0.3", SLOW_UPLOAD_HEAD) for _ in range(100)]
        no_bodies = [connect(server, "127.0.0.4", SLOW_UPLOAD_HEAD) for _ in range(100)]
        socks += slow_heads + slow_bodies + no_bodies
        head = b"ET /health HTTP/1.1\r\nX-Slow: " + b"a" * 200
        body = b'--BB\r\nContent-Disposition: form-data; name="data"\r\n\r\n' + b"x" * 200
        with trickling([(s, head) for s in slow_heads]
                       + [(s, body) for s in slow_bodies]) as bytes_sent:
            wait_until(lambda: bytes_sent() >= 2, timeout=10, what="a few bytes each in")
            phone_keeps_syncing(phone, "among slow clients")
            assert post(server, "/health", method="GET").status == 200
            phone_keeps_syncing(phone, "still among them")
        # All 300 are still there, unanswered: they cost the listener a buffer each.
        assert [peer_state(s) for s in socks] == ["waiting"] * 300


def test_64_connections_that_pipeline_and_never_read_hold_no_worker(server, make_device):
    """Each sends 2,000 requests at once and reads no answer. A worker answers while
    the client takes its answers; past that the connection waits in the listener for
    its client, not a worker in a blocked send."""
    phone = phone_with_notes(make_device)
    first_upload(phone)
    burst = HEALTH * 2000
    held = []
    try:
        for _ in range(64):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.send(burst)
            held.append(sock)
        time.sleep(1)
        started = time.monotonic()
        assert statuses(exchange(server.port, HEALTH_LAST)) == [200]
        assert time.monotonic() - started < 5      # 0.2.1: no answer in a minute
        phone_keeps_syncing(phone, "while 64 connections read nothing")
    finally:
        for sock in held:
            sock.close()


def big_collection(tmp_path, megabytes):
    """A valid collection padded with random bytes: a download that fills the socket."""
    path = str(tmp_path / "big.anki2")
    ankisync.create_collection(path)
    with sqlite3.connect(path) as db:
        db.execute("create table padding (x)")
        db.executemany("insert into padding values (?)",
                       [(os.urandom(1 << 20),) for _ in range(megabytes)])
    with open(path, "rb") as f:
        return f.read()


def test_64_downloads_nobody_reads_hold_four_workers_at_most(start_server, tmp_path):
    """One account starts 64 full downloads of a 24 MB collection and reads none: four
    are answered (and paced), the others get a 409 at once, and another user syncs."""
    srv = start_server(users=((USER, PASSWORD), ("other", "pw2")))
    key = login(srv)
    assert modern(srv, "upload", big_collection(tmp_path, 24), key=key).status == 200
    request = (b"POST /sync/download HTTP/1.1\r\nHost: x\r\nanki-sync: %s\r\n"
               b"Content-Length: %d\r\n\r\n%s"
               % (json.dumps({"v": 11, "k": key, "c": "t", "s": ""}).encode(),
                  len(ZSTD.compress(b"{}")), ZSTD.compress(b"{}")))
    held = []
    try:
        for _ in range(64):
            sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(request)
            held.append(sock)
        refused = 0
        for sock in held:
            ready, _, _ = select.select([sock], [], [], 5)
            assert ready
            refused += sock.recv(64).startswith(b"HTTP/1.1 409")
        assert refused >= 60
        assert statuses(exchange(srv.port, HEALTH_LAST)) == [200]
        other = modern(srv, "hostKey", {"u": "other", "p": "pw2"}).json()["key"]
        assert modern(srv, "meta", {"v": 11, "cv": "t"}, key=other).status == 200
    finally:
        for sock in held:
            sock.close()


# --- memory after a burst ---


def proc_status(server, field):
    """A number from the server's /proc/PID/status: Threads, or VmRSS in KiB."""
    with open("/proc/%d/status" % server.proc.pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def test_after_a_burst_of_200_syncs_the_threads_end_and_the_memory_returns(server,
                                                                           make_device,
                                                                           many_sockets):
    phone = phone_with_notes(make_device)
    first_upload(phone)
    key = login(server)
    threads_before, rss_before = proc_status(server, "Threads"), proc_status(server, "VmRSS")
    peak, burst_over = [threads_before], threading.Event()

    def sample():
        while not burst_over.wait(0.01):
            peak.append(proc_status(server, "Threads"))

    gun = threading.Barrier(200)

    def meta(i):
        gun.wait()
        # Four addresses of 50: one address's share of connections is 128.
        return modern(server, "meta", {"v": 11, "cv": "test"}, key=key,
                      source="127.0.0.%d" % (1 + i % 4)).status

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(200) as pool:
            assert list(pool.map(meta, range(200))) == [200] * 200
    finally:
        burst_over.set()
        sampler.join()
    assert threads_before + 4 <= max(peak) <= threads_before + ankisync.MAX_WORKERS + 4, peak
    deadline = time.monotonic() + ankisync.WORKER_IDLE + 5
    while proc_status(server, "Threads") > threads_before + 1:
        assert time.monotonic() < deadline, "threads still %d, %d before the burst" % (
            proc_status(server, "Threads"), threads_before)
        time.sleep(0.2)
    rss_after = proc_status(server, "VmRSS")
    assert rss_after < rss_before + 30 * 1024, (rss_before, rss_after)
    phone_keeps_syncing(phone, "after the burst")


# --- hostile bytes: what a stranger or a device sends never stops a worker ---


@contextlib.contextmanager
def server_in_this_process(tmp_path):
    """An ankisync Server on a thread of this process, with one user, for the tests that
    break its parts with monkeypatch or read its log through caplog: both reach only
    this process. Yields what post() and the devices take (url, port, ssl_context), and
    the Server as `.server`."""
    config = ankisync.Config()
    config.data, config.host, config.port = str(tmp_path / "data"), "127.0.0.1", free_port()
    app = ankisync.SyncApp(config)
    app.users.add(USER, PASSWORD)
    srv = ankisync.Server((config.host, config.port), app)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield types.SimpleNamespace(url="http://127.0.0.1:%d/" % config.port, port=config.port,
                                    ssl_context=None, server=srv, base=config.data)
    finally:
        srv.shutdown()
        thread.join(10)
        srv.server_close()


def exchange(port, raw, timeout=10):
    """`raw` bytes sent on a fresh connection; everything the server answers before it
    closes (or stops answering for `timeout` seconds)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        answer = b""
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        except socket.timeout:
            pass
        return answer


def statuses(answer):
    return [int(code) for code in re.findall(rb"^HTTP/1\.1 (\d{3}) ", answer, re.MULTILINE)]


HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
HEALTH_LAST = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"   # then it closes


def broken_once(original):
    """`original`, except that its first call raises a fault no request should cause."""
    calls = []

    def broken(*args, **kwargs):
        if not calls:
            calls.append(1)
            raise RuntimeError("injected fault")
        return original(*args, **kwargs)
    return broken


# Each stage of a request, where a fault is injected, and what is sent to reach it.
FAULT_STAGES = {
    "head, in the listener": (ankisync.RequestHead, "__init__", HEALTH_LAST),
    "listener reading": (ankisync.Server, "on_read", HEALTH_LAST),
    "body": (ankisync.BodyReader, "read", None),
    "dispatch": (ankisync.SyncApp, "dispatch", None),
    "answer": (ankisync.Handler, "send_response", HEALTH_LAST),
    "worker, around the request": (ankisync.Server, "finish_request", HEALTH_LAST),
    "next request on the same connection": (ankisync.Server, "next_request",
                                            HEALTH + HEALTH_LAST),
}


@pytest.mark.parametrize("stage", sorted(FAULT_STAGES))
def test_a_fault_at_any_stage_of_a_request_costs_that_connection_only(stage, tmp_path,
                                                                      monkeypatch, caplog):
    """A fault of the server's at any stage: logged once, that connection at most is
    closed, the worker lives on, and the books (workers, connections) balance again."""
    caplog.set_level("INFO", logger="ankisync")
    thread_deaths = []
    monkeypatch.setattr(threading, "excepthook", thread_deaths.append)
    owner, name, raw = FAULT_STAGES[stage]
    with server_in_this_process(tmp_path) as here:
        srv = here.server
        if raw is None:     # a login: its body is read and dispatched
            raw = (b"POST /sync/hostKey HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                   b"anki-sync: %s\r\n"
                   b"Content-Length: %d\r\n\r\n"
                   % (json.dumps({"v": 11, "k": "", "c": "t", "s": ""}).encode(),
                      len(ZSTD.compress(b'{"u":"user","p":"pass"}')))
                   + ZSTD.compress(b'{"u":"user","p":"pass"}'))
        monkeypatch.setattr(owner, name, broken_once(getattr(owner, name)))
        answer = exchange(here.port, raw)
        assert all(status in (200, 500) for status in statuses(answer)), answer
        for _ in range(3):
            assert statuses(exchange(here.port, HEALTH + HEALTH_LAST)) == [200, 200]
        wait_until(lambda: srv.workers.busy() == 0, 10, "every worker idle again")
        wait_until(lambda: not srv.connections, 10, "every connection closed")
    assert caplog.text.count("RuntimeError: injected fault") == 1, caplog.text
    assert not thread_deaths


def test_a_fault_inside_a_sync_is_a_500_with_its_traceback_not_a_client_error(tmp_path,
                                                                             monkeypatch,
                                                                             caplog):
    """A bug of the server's (here a KeyError in `chunk`) is no "Check Database" for the
    user: the answer is 500, the log has the traceback, and the next sync works."""
    caplog.set_level("INFO", logger="ankisync")
    with server_in_this_process(tmp_path) as here:
        phone = ModernDevice("phone", str(tmp_path / "phone"), here)
        phone.do("add_notes", deck="Default", prefix="word", count=3)
        first_upload(phone)
        phone.do("add_notes", deck="Default", prefix="more", count=2)

        def broken(self):
            raise KeyError("a bug of the server's")
        monkeypatch.setattr(ankisync.SyncSession, "chunk", broken)
        with pytest.raises(Exception):
            phone.sync()
        assert "internal error during sync/chunk" in caplog.text
        assert "KeyError: \"a bug of the server's\"" in caplog.text
        assert re.search(r"sync/chunk 500 ", caplog.text)
        monkeypatch.undo()
        assert sync_normally(phone) == "normal_sync"
        phone.close()


def open_files_under(folder):
    """The files under `folder` this process holds open."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink("/proc/self/fd/" + fd)
            if target.startswith(folder + os.sep):
                found.append(target)
    return found


def test_a_user_who_stopped_syncing_holds_no_open_files(tmp_path, monkeypatch):
    """With thousands of users who once synced, open files ran out: a user's collection
    and media.db now close once the user has been idle a while, and open again at the
    next sync."""
    with server_in_this_process(tmp_path) as here:
        phone = ModernDevice("phone", str(tmp_path / "phone"), here)
        phone.do("add_notes", deck="Default", prefix="word", count=3)
        first_upload(phone)
        phone.do("add_notes", deck="Default", prefix="more", count=1)
        assert sync_normally(phone) == "normal_sync"
        phone.sync_media()
        user_folder = os.path.join(here.base, USER)
        assert open_files_under(user_folder)
        here.server.app.expire_idle_sessions()          # not idle yet: stays open
        assert open_files_under(user_folder)
        monkeypatch.setattr(ankisync, "USER_IDLE", 0)
        here.server.app.expire_idle_sessions()
        assert open_files_under(user_folder) == []
        phone.do("add_notes", deck="Default", prefix="later", count=1)
        assert sync_normally(phone) == "normal_sync"
        phone.close()


def test_seventy_connections_with_a_pipelined_bad_length_leave_the_server_answering(server):
    """The fuzzer's find: a valid /health, then behind it on the same connection a
    Content-Length of '²' (a digit to str.isdigit, not to HTTP). Each gets its 400, and
    /health answers during and after, with nothing in the log but the refusals."""
    attack = HEALTH + b"POST /sync/meta HTTP/1.1\r\nHost: x\r\nContent-Length: \xb2\r\n\r\n"
    held = [socket.create_connection(("127.0.0.1", server.port), timeout=10)
            for _ in range(70)]
    try:
        for sock in held:
            sock.sendall(attack)
        assert statuses(exchange(server.port, HEALTH_LAST)) == [200]
        for sock in held:
            answer = b""
            while b"ASCII digits" not in answer:
                data = sock.recv(4096)
                assert data, answer
                answer += data
            assert statuses(answer) == [200, 400]
    finally:
        for sock in held:
            sock.close()
    assert statuses(exchange(server.port, HEALTH_LAST)) == [200]
    assert statuses(exchange(server.port, attack[len(HEALTH):])) == [400]
    log = server.log()
    assert "Traceback" not in log and "Exception in thread" not in log


@pytest.mark.parametrize("line", [
    b"Content-Length: \xb2",                # a superscript two: isdigit() says yes
    b"Content-Length: -1",
    b"Content-Length: +5",
    b"Content-Length: 0x10",
    b"Content-Length: 1_0",
    b"Content-Length: 5\r\nContent-Length: 6",
    b"Content-Length: 99999999999999999999999",
    b"Transfer-Encoding: gzip, chunked",
    b"Content Length: 5",                   # a header name is a token: no space
    b" folded: header",
    b"Bad\x00Header: x",
])
def test_numbers_and_headers_outside_http_grammar_get_400_and_close(server, line):
    answer = exchange(server.port, b"POST /sync/meta HTTP/1.1\r\nHost: x\r\n" + line
                      + b"\r\n\r\n" + HEALTH)
    assert statuses(answer) == [400], answer        # closed: the /health behind is not read
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("size", [b"-3", b"0x5", b"1_0", b" 5", b"+5", b"1" * 20, b"\xb2"])
def test_chunk_sizes_outside_hexdig_get_400(server, size):
    key = login(server)
    answer = exchange(server.port, b"POST /sync/meta HTTP/1.1\r\nHost: x\r\n"
                      b"anki-sync: %s\r\nTransfer-Encoding: chunked\r\n\r\n%s\r\nabcde\r\n0\r\n\r\n"
                      % (json.dumps({"v": 11, "k": key, "c": "t", "s": ""}).encode(), size))
    assert statuses(answer) == [400], answer
    assert b"chunk size" in answer
    assert statuses(exchange(server.port, HEALTH_LAST)) == [200]


def deep(levels, inner='"x"'):
    """JSON text nested `levels` deep."""
    return "[" * levels + inner + "]" * levels


def nested(levels):
    """A value nested `levels` deep, for a payload that json.dumps writes."""
    value = "x"
    for _ in range(levels):
        value = [value]
    return value


def header_with(**fields):
    envelope = {"v": 11, "k": "", "c": "test,0,linux", "s": ""}
    envelope.update(fields)
    return json.dumps(envelope)


def test_a_stranger_s_strange_json_gets_400_and_counts_as_nothing(server):
    """No key, no password: lone surrogates and deep nesting, in the header and in a
    login. Each is a 400 with its reason, never a 500; none counts as a failed login, so
    the owner's right password still works after them all."""
    login_body = ZSTD.compress(b'{"u":"user","p":"pass"}')
    cases = {
        "surrogate key": ({"anki-sync": header_with(k="\ud800")}, login_body),
        "surrogate key, escaped by hand": ({"anki-sync": header_with().replace(
            '"k": ""', '"k": "\\ud800"')}, login_body),
        "header nested 3,000 deep": ({"anki-sync": header_with().replace(
            '"k": ""', '"k": %s' % deep(3000))}, login_body),
        "header nested 70 deep": ({"anki-sync": header_with().replace(
            '"k": ""', '"k": %s' % deep(70))}, login_body),
        "surrogate in the name": ({"anki-sync": header_with()},
                                  ZSTD.compress(b'{"u":"\\ud800","p":"pass"}')),
        "surrogate in the password": ({"anki-sync": header_with()},
                                      ZSTD.compress(b'{"u":"user","p":"\\udfff"}')),
        "login nested 20,000 deep": ({"anki-sync": header_with()},
                                     ZSTD.compress(('{"u":"user","p":%s}'
                                                    % deep(20000)).encode())),
        "a number past 1e308": ({"anki-sync": header_with()},
                                ZSTD.compress(b'{"u":"user","p":"pass","x":1e999}')),
        "a list for the name": ({"anki-sync": header_with()},
                                ZSTD.compress(b'{"u":["user"],"p":"pass"}')),
    }
    for case, (headers, body) in cases.items():
        for _ in range(3):
            answer = post(server, "/sync/hostKey", body, headers)
            assert answer.status == 400, (case, answer)
    assert login(server)
    log = server.log()
    assert "Traceback" not in log and "login failed" not in log


def start_a_sync(server, key, session="s1"):
    assert modern(server, "meta", {"v": 11, "cv": "t"}, key=key).status == 200
    answer = modern(server, "start", {"minUsn": 0, "lnewer": False}, key=key,
                    session=session)
    assert answer.status == 200, answer
    return answer


# What a logged-in device may send wrongly, method by method: each a 400.
BAD_FIELDS = [
    ("meta", {"v": 11, "cv": nested(100)}),
    ("meta", {"v": 2 ** 63}),
    ("meta", {"v": "11\u0661"}),
    ("start", {"minUsn": 2 ** 63, "lnewer": False}),
    ("start", {"minUsn": "1_0"}),
    ("start", {"minUsn": 0, "graves": {"notes": 5}}),
    ("start", {"minUsn": 0, "graves": ["notes"]}),
    ("applyGraves", {"chunk": {"cards": [2 ** 64]}}),
    ("applyGraves", {"chunk": {"decks": {"1": 2}}}),
    ("applyChanges", {"changes": {"models": {"1": {}}}}),
    ("applyChanges", {"changes": {"decks": [[{"id": 1.5e300}], []]}}),
    ("applyChanges", {"changes": {"decks": [[], [], []]}}),
    ("applyChanges", {"changes": {"tags": [1, 2]}}),
    ("applyChanges", {"changes": {"conf": [1]}}),
    ("applyChanges", {"changes": {"crt": "soon"}}),
    ("applyChanges", {"changes": {"models": [{"id": 1, "flds": "x", "tmpls": []}]}}),
    ("applyChunk", {"chunk": {"revlog": [[1] * 8]}}),
    ("applyChunk", {"chunk": {"revlog": [[2 ** 63] + [1] * 8]}}),
    ("applyChunk", {"chunk": {"cards": [[1] * 16 + [-2 ** 63 - 1, ""]]}}),
    ("applyChunk", {"chunk": {"notes": [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]}}),
    ("applyChunk", {"chunk": {"notes": "all of them"}}),
    ("sanityCheck2", {"client": [[0, 0, 0], 1, 2, 3, 0, 1, 1, 2 ** 70]}),
]


@pytest.mark.parametrize("method,payload", BAD_FIELDS,
                         ids=["%s-%d" % (m, i) for i, (m, _) in enumerate(BAD_FIELDS)])
def test_a_field_of_the_wrong_shape_is_a_400_and_the_next_sync_works(server, method,
                                                                     payload):
    """Checked against the method's shape before it runs: the wrong type, a number past
    SQLite's 64 bits, a row of the wrong length. A refused row refuses its request (not
    the next one), and a device's next sync goes through."""
    key = login(server)
    if method not in ("meta", "start"):
        start_a_sync(server, key)
    answer = modern(server, method, payload, key=key)
    assert answer.status == 400, answer
    start_a_sync(server, key, session="s2")
    assert modern(server, "applyChunk", {"chunk": {"done": True}}, key=key,
                  session="s2").status == 200
    assert modern(server, "chunk", {}, key=key, session="s2").status == 200
    assert "Traceback" not in server.log()


def test_a_config_pushed_without_rollover_gets_the_official_default(server):
    """Anki 2.1.28 - 2.1.35 push a v2 scheduler's config without `rollover`; the official
    server keeps it with rollover 4, so the next device must get the same, or they never
    agree."""
    key = login(server)
    start_a_sync(server, key)
    changes = {"conf": {"curDeck": 1, "schedVer": 2}}
    assert modern(server, "applyChanges", {"changes": changes}, key=key).status == 200
    assert modern(server, "applyChunk", {"chunk": {"done": True}}, key=key).status == 200
    assert modern(server, "chunk", {}, key=key).status == 200
    assert modern(server, "finish", {}, key=key).status == 200
    start_a_sync(server, key, session="s2")
    answer = modern(server, "applyChanges", {"changes": {}}, key=key, session="s2")
    assert answer.json()["conf"] == {"curDeck": 1, "schedVer": 2, "rollover": 4}


def test_a_client_version_with_a_lone_surrogate_is_refused_before_the_work(server, tmp_path):
    """It used to be stored in the device records after a full upload, which then failed
    with a 500: the device believed a finished upload had failed."""
    key = login(server)
    headers = {"anki-sync": json.dumps({"v": 11, "k": key, "c": "\udcff", "s": ""})}
    answer = post(server, "/sync/upload", ZSTD.compress(collection_of_version(tmp_path, 11)),
                  headers)
    assert answer.status == 400 and b"surrogate" in answer.body
    assert modern(server, "download", {}, key=key).status == 200
    assert "Traceback" not in server.log()


ODD_MEDIA_NAMES = ["song.convert", ".backup-notes.txt", ".copy-of-x.jpg", ".incoming-a.png",
                   ".spool-b.mp3", ".upload-c.gif", ".new-collection-d.svg"]


def test_media_named_like_the_server_s_temporary_files_survive_restarts(server):
    """The start-up clean-up once walked media/ too, and deleted a device's
    `.backup-notes.txt` at every start. It now looks only where the server makes its
    temporary files."""
    key = login(server)
    files = [(name, name.encode() * 3) for name in ODD_MEDIA_NAMES]
    answer = modern(server, "uploadChanges", media_zip(files), key=key, area="msync")
    assert answer.status == 200 and answer.json()["data"] == [len(files), len(files)]
    server.restart()
    key = login(server)
    media = os.path.join(server.base, USER, "media")
    assert sorted(os.listdir(media)) == sorted(ODD_MEDIA_NAMES)
    answer = modern(server, "downloadFiles", {"files": ODD_MEDIA_NAMES}, key=key, area="msync")
    with zipfile.ZipFile(io.BytesIO(answer.body)) as archive:
        names = json.loads(archive.read("_meta"))
        assert sorted(names.values()) == sorted(ODD_MEDIA_NAMES)
        for entry, name in names.items():
            assert archive.read(entry) == name.encode() * 3


@pytest.mark.parametrize("meta", [
    [["\ud800.png", "0"]],
    [["ok.png", ["0"]]],
    [[5, "0"]],
    [["ok.png", "0", "extra"]],
    [["deep.png", nested(100)]],
])
def test_a_media_upload_with_a_strange_meta_is_a_400(server, meta):
    key = login(server)
    raw = media_zip([("ok.png", b"x")], meta=meta)
    answer = modern(server, "uploadChanges", raw, key=key, area="msync")
    assert answer.status == 400, answer
    assert media_usn(server, key) == 0
    assert "Traceback" not in server.log()


# The live fuzzer's finds (bench/fuzz_live.py): uploads that passed SQLite's integrity
# check and then failed every sync after them with a 500.
DAMAGED_UPLOADS = {
    "notes dropped": "drop table notes",
    "cards dropped": "drop table cards",
    "revlog dropped": "drop table revlog",
    "graves dropped": "drop table graves",
    "a column gone": "alter table notes drop column data",
    "a blob for col.mod": "update col set mod = x'00ff'",
    "a note's text not UTF-8": "insert into notes values (1, 'g', 1, 0, 0, '', "
                               "cast(x'66f36f' as text), '', 0, 0, '')",
    "the config not UTF-8": "update col set conf = cast(x'7bf3' as text)",
    "a blob for col.usn": "update col set usn = x'01'",
    "a null usn in a card": "create table c2 as select * from cards; drop table cards; "
                           "alter table c2 rename to cards; "
                           "insert into cards select 1,1,1,0,0,null,0,0,0,0,0,0,0,0,0,0,0,''",
}


@pytest.mark.parametrize("case", sorted(DAMAGED_UPLOADS))
def test_an_upload_missing_a_table_or_holding_bytes_for_numbers_is_refused(server, tmp_path,
                                                                          case):
    key = login(server)
    path = str(tmp_path / "damaged.anki2")
    ankisync.create_collection(path)
    with sqlite3.connect(path) as db:
        db.executescript(DAMAGED_UPLOADS[case])
    with open(path, "rb") as f:
        answer = modern(server, "upload", f.read(), key=key)
    assert answer.status == 400 and b"Check Database" in answer.body, answer
    start_a_sync(server, key)
    assert modern(server, "chunk", {}, key=key).status == 200
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("method", [b"DELETE", b"PUT", b"post", b"TRACE"])
def test_an_http_method_ankisync_does_not_answer_is_a_405(server, method):
    answer = exchange(server.port, method + b" /sync/meta HTTP/1.1\r\nHost: x\r\n\r\n")
    assert statuses(answer) == [405], answer


@pytest.mark.parametrize("version,status", [(0, 400), (-1, 400), (100, 400), (7, 501),
                                            (12, 501)])
def test_only_a_version_some_anki_could_send_gets_the_protocol_s_501(server, version, status):
    """501 is what old clients turn into "please upgrade Anki"; a value no client sends
    is no version at all."""
    key = login(server)
    assert modern(server, "meta", {"v": version, "cv": "t"}, key=key).status == status


# --- TLS ---


def make_certificate(folder):
    """A test CA and a certificate for 127.0.0.1 it signed, by openssl. Anki's client
    (rustls) trusts a CA from SSL_CERT_FILE, not a server's self-signed certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl makes the test certificate")
    os.makedirs(folder, exist_ok=True)
    paths = types.SimpleNamespace(**{name: os.path.join(folder, name + ".pem")
                                     for name in ("ca", "ca_key", "cert", "key", "csr")})
    extensions = os.path.join(folder, "extensions.cnf")
    with open(extensions, "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                "extendedKeyUsage=serverAuth\n")
    for args in (["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                  "/CN=ankisync test CA", "-keyout", paths.ca_key, "-out", paths.ca],
                 ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
                  "-keyout", paths.key, "-out", paths.csr],
                 ["x509", "-req", "-in", paths.csr, "-CA", paths.ca, "-CAkey", paths.ca_key,
                  "-CAcreateserial", "-days", "1", "-extfile", extensions, "-out", paths.cert]):
        subprocess.run(["openssl"] + args, check=True, capture_output=True, timeout=60)
    return paths


def test_serves_https_itself_with_a_certificate_from_the_ini(start_server, tmp_path):
    srv = start_server(certificate=make_certificate(str(tmp_path / "tls")))
    answer = post(srv, "/", method="GET")                # start() had /health over TLS
    assert answer.status == 200 and b"https://127.0.0.1:%d/" % srv.port in answer.body


# --- TLS: the private CA of tls = self-signed (appendix E) ---


def tls_files(base):
    folder = os.path.join(base, ".tls")
    return {name: open(os.path.join(folder, name)).read()
            for name in ("ca.pem", "ca.key", "server.pem", "server.key")}


def test_the_tls_command_makes_a_ca_and_a_chain_openssl_accepts_in_private_files(tmp_path,
                                                                                monkeypatch):
    data = str(tmp_path / "data")
    env = dict(os.environ, SYNC_BASE=data, ANKISYNC_TLS_NAMES="anki.lan, 198.51.100.7")
    done = subprocess.run(ankisync_command("tls"), env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    folder = os.path.join(data, ".tls")
    assert "made a new CA" in done.stdout and folder in done.stdout
    assert "tls = self-signed" in done.stdout           # the ini does not say it yet
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    for name in ("ca.pem", "ca.key", "server.pem", "server.key"):
        assert stat.S_IMODE(os.stat(os.path.join(folder, name)).st_mode) == 0o600, name
    first = tls_files(data)
    _, names, addresses = ankisync.certificate_facts(first["server.pem"])
    assert {"localhost", "anki.lan"} <= names
    assert {ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "198.51.100.7")} <= addresses
    if shutil.which("openssl"):
        for strict in ([], ["-x509_strict"]):
            done = subprocess.run(["openssl", "verify"] + strict + [
                "-purpose", "sslserver", "-CAfile", "ca.pem", "server.pem"], cwd=folder,
                capture_output=True, text=True, timeout=60)
            assert done.returncode == 0 and "server.pem: OK" in done.stdout, done.stderr
    # A start within 30 days of the end makes a new one; one before, none.
    monkeypatch.setenv("ANKISYNC_TLS_NAMES", env["ANKISYNC_TLS_NAMES"])
    config = ankisync.Config()
    config.data = data
    names, addresses = ankisync.certificate_names(config)
    ends = ankisync.certificate_facts(first["server.pem"])[0]
    stale = ankisync.server_certificate_stale
    assert stale(config, names, addresses, ends - datetime.timedelta(days=31)) == ""
    assert "the old one ends" in stale(config, names, addresses,
                                       ends - datetime.timedelta(days=29))
    # Again: a new server certificate, the same CA.
    done = subprocess.run(ankisync_command("tls"), env=env, capture_output=True, text=True,
                          timeout=60)
    again = tls_files(data)
    assert done.returncode == 0 and "new CA" not in done.stdout
    assert again["ca.pem"] == first["ca.pem"] and again["ca.key"] == first["ca.key"]
    assert again["server.pem"] != first["server.pem"]
    # A CA without its key is named, with the fix, in one line.
    os.remove(os.path.join(folder, "ca.key"))
    done = subprocess.run(ankisync_command("tls"), env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("ankisync: ") and "ca.key is missing" in done.stderr


def download_ca(srv, folder):
    """What a user does first: open the front page without trusting anything yet, follow
    its link to the CA and save it."""
    page = post(srv, "/", method="GET").body.decode()
    assert 'href="/ca.pem"' in page and "SSL_CERT_FILE" in page and "AnkiMobile" in page
    answer = post(srv, "/ca.pem", method="GET")
    assert answer.status == 200 and answer.headers["Content-Type"] == "application/x-pem-file"
    der = post(srv, "/ca.crt", method="GET")
    assert der.headers["Content-Type"] == "application/x-x509-ca-cert"
    assert der.body == ssl.PEM_cert_to_DER_cert(answer.body.decode())
    path = os.path.join(folder, "downloaded-ca.pem")
    with open(path, "wb") as f:
        f.write(answer.body)
    return path


@pytest.mark.legacy
def test_devices_that_trust_the_downloaded_ca_sync_over_https(start_server, make_device,
                                                              tmp_path, monkeypatch):
    srv = start_server(self_signed=True)
    ca = download_ca(srv, str(tmp_path))
    assert open(ca).read() == tls_files(srv.base)["ca.pem"]
    trusting = ssl.create_default_context(cafile=ca)     # the hostname checked, and
    trusting.verify_flags |= ssl.VERIFY_X509_STRICT      # strict, as 3.13's default is
    for host in ("127.0.0.1", "localhost"):
        url = "https://%s:%d/health" % (host, srv.port)
        with urllib.request.urlopen(url, timeout=10, context=trusting) as answer:
            assert answer.status == 200
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(srv.url + "health", timeout=10,      # the system's CAs: no
                               context=ssl.create_default_context())
    # A modern Anki (rustls) that trusts only the downloaded CA uploads and syncs,
    run_device_elsewhere(srv.url, str(tmp_path / "phone"), {"SSL_CERT_FILE": ca})
    # one given the CA as AnkiDroid's setting gives it (no SSL_CERT_FILE) joins it,
    code = "import sys, test_ankisync as t; t.device_with_a_certificate_main(*sys.argv[1:])"
    env = {k: v for k, v in os.environ.items() if k != "SSL_CERT_FILE"}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "tablet"), srv.url, ca],
                          cwd=HERE, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # and a 2.1.54 one joins the collection and syncs too. Its rustls (0.20) takes host
    # names only ("invalid dnsname" for an address): the certificate has the names too.
    monkeypatch.setenv("SSL_CERT_FILE", ca)
    by_name = types.SimpleNamespace(url="https://localhost:%d/" % srv.port)
    laptop = make_device("legacy", "laptop", on=by_name)
    join_by_download(laptop)
    assert laptop.snapshot()["notes"]
    phone_keeps_syncing(laptop, "legacy", within=60)


def test_a_private_ca_on_a_long_host_name_keeps_its_name_within_64_characters(tmp_path):
    """RFC 5280 allows a common name 64 characters: a NAS's long host name is cut, the
    date that tells one CA from the next is kept."""
    now = datetime.datetime(2026, 12, 6, 2, 47, tzinfo=datetime.timezone.utc)
    cert, _ = ankisync.make_ca("a-very-long-hostname-of-a-nas.in.a.home.network.example", now)
    path = tmp_path / "ca.pem"
    path.write_text(cert)
    subject = dict(pair for rdn in ssl._ssl._test_decode_cert(str(path))["subject"]
                   for pair in rdn)
    assert len(subject["commonName"]) == 64
    assert subject["commonName"].startswith("ankisync CA on a-very-long-hostname")
    assert subject["commonName"].endswith(", 2026-12-06 02:47")


def test_a_certificate_of_ones_own_wins_over_the_private_ca(start_server, tmp_path):
    srv = start_server(certificate=make_certificate(str(tmp_path / "own")),
                       ini="tls = self-signed\n")       # the make_certificate CA verifies
    page = post(srv, "/", method="GET")
    assert page.status == 200 and b"ca.pem" not in page.body
    assert post(srv, "/ca.pem", method="GET").status == 404
    assert not os.path.exists(os.path.join(srv.base, ".tls"))


def test_a_new_address_gets_a_new_certificate_from_the_same_ca(start_server):
    srv = start_server(self_signed=True)
    first = tls_files(srv.base)
    srv.restart()                                        # nothing new: nothing made
    assert tls_files(srv.base) == first
    srv.env["ANKISYNC_TLS_NAMES"] = "198.51.100.7"       # the machine got a new address
    srv.restart()
    second = tls_files(srv.base)
    assert second["ca.pem"] == first["ca.pem"] and second["ca.key"] == first["ca.key"]
    assert second["server.pem"] != first["server.pem"]
    _, _, addresses = ankisync.certificate_facts(second["server.pem"])
    assert ipaddress.ip_address("198.51.100.7") in addresses
    assert "new: 198.51.100.7" in srv.log()
    # The CA the devices trusted before still verifies the server.
    ca = os.path.join(srv.base, ".tls", "ca.pem")
    with urllib.request.urlopen(srv.url + "health", timeout=10,
                                context=ssl.create_default_context(cafile=ca)) as answer:
        assert answer.status == 200
    # Docker's health check follows the ini to https.
    env = dict(os.environ, SYNC_BASE=srv.base, SYNC_HOST="127.0.0.1", SYNC_PORT=str(srv.port))
    done = subprocess.run(ankisync_command("health", "--config", srv.config_path), env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "ok: https://" in done.stdout, done.stderr


def device_elsewhere_main(folder, url):
    """A phone's story in a process of its own (see run_device_elsewhere)."""
    phone = ModernDevice("phone", folder, types.SimpleNamespace(url=url))
    try:
        phone.do("add_notes", deck="Default", prefix="word", count=5)
        first_upload(phone)
        phone_keeps_syncing(phone, "elsewhere")
    finally:
        phone.close()


def device_with_a_certificate_main(folder, url, ca):
    """AnkiDroid's way (its custom certificate setting hands the PEM text to the backend's
    set_custom_certificate), in a process of its own like device_elsewhere_main's."""
    tablet = ModernDevice("tablet", folder, types.SimpleNamespace(url=url))
    try:
        with open(ca) as f:
            assert tablet.col._backend.set_custom_certificate(f.read())
        join_by_download(tablet)
        phone_keeps_syncing(tablet, "tablet")
    finally:
        tablet.close()


def run_device_elsewhere(url, folder, env):
    """device_elsewhere_main in a new process: the Anki client reads SSL_CERT_FILE when
    it makes its HTTP client, which this process may have done already, without it."""
    code = "import sys, test_ankisync as t; t.device_elsewhere_main(*sys.argv[1:])"
    proc = subprocess.run([sys.executable, "-c", code, folder, url], cwd=HERE,
                          env=dict(os.environ, **env), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


# --- TLS: certificates reloaded when their files change, and Let's Encrypt (ACME) ---


def served_serial(srv, host="127.0.0.1"):
    """The serial of the certificate a new connection to the server gets."""
    context = ssl._create_unverified_context()
    with socket.create_connection((host, srv.port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=host) as sock:
            der = sock.getpeercert(binary_form=True)
    return int.from_bytes(ankisync.tbs_fields(der)[1][1], "big")


def pem_serial(path):
    with open(path) as f:
        der = ankisync.pem_body(f.read(), "CERTIFICATE")       # a chain's leaf
    return int.from_bytes(ankisync.tbs_fields(der)[1][1], "big")


def test_new_certificate_files_are_served_without_a_restart_and_a_bad_pair_is_refused(
        start_server, tmp_path):
    first = make_certificate(str(tmp_path / "tls"))
    srv = start_server(certificate=first)
    old_serial = pem_serial(first.cert)
    assert served_serial(srv) == old_serial
    # A connection open before the change (a sync in progress) keeps its certificate.
    open_one = srv.ssl_context.wrap_socket(socket.create_connection(("127.0.0.1", srv.port),
                                                                    timeout=10),
                                           server_hostname="127.0.0.1")
    # certbot's renewal: new files in the same place, from another CA.
    second = make_certificate(str(tmp_path / "renewed"))
    shutil.copy(second.key, first.key)
    shutil.copy(second.cert, first.cert)
    wait_until(lambda: served_serial(srv) == pem_serial(second.cert), 20,
               "the renewed certificate")
    assert "HTTPS certificate replaced" in srv.log()
    open_one.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert open_one.recv(4096).startswith(b"HTTP/1.1 200")
    der = open_one.getpeercert(binary_form=True)
    assert int.from_bytes(ankisync.tbs_fields(der)[1][1], "big") == old_serial
    open_one.close()
    # A device that trusts the new CA syncs.
    run_device_elsewhere(srv.url, str(tmp_path / "phone"), {"SSL_CERT_FILE": second.ca})
    # A certificate whose key is not the one beside it is refused, the old pair kept.
    third = make_certificate(str(tmp_path / "wrong"))
    shutil.copy(third.cert, first.cert)
    wait_until(lambda: "does not load" in srv.log(), 20, "the refusal in the log")
    assert served_serial(srv) == pem_serial(second.cert)
    srv.ssl_context = ssl.create_default_context(cafile=second.ca)
    assert post(srv, "/health", method="GET").status == 200
    assert "Traceback" not in srv.log()


def test_a_running_server_serves_its_private_ca_s_renewed_certificate(tmp_path, monkeypatch,
                                                                      caplog):
    """The daily look (renew_private_ca): a new address gets a new certificate from the
    same CA, swapped into the listener's ServerTls; an unusable CA is a log line."""
    config = ankisync.Config()
    config.data = str(tmp_path / "data")
    config.tls = "self-signed"
    tls = ankisync.ServerTls(ankisync.private_ca_context(config))
    before = tls.context
    ankisync.renew_private_ca(config, tls)              # nothing new: nothing swapped
    assert tls.context is before
    monkeypatch.setenv("ANKISYNC_TLS_NAMES", "198.51.100.9")
    with caplog.at_level("INFO", logger="ankisync"):
        ankisync.renew_private_ca(config, tls)
    assert tls.context is not before and "HTTPS certificate replaced" in caplog.text
    with open(os.path.join(config.data, ".tls", "server.pem")) as f:
        assert ipaddress.ip_address("198.51.100.9") in ankisync.certificate_facts(f.read())[2]
    os.remove(os.path.join(config.data, ".tls", "ca.key"))
    monkeypatch.setenv("ANKISYNC_TLS_NAMES", "198.51.100.10")
    renewed = tls.context
    ankisync.renew_private_ca(config, tls)
    assert tls.context is renewed and "could not be renewed" in caplog.text


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_a_client_hello_s_alpn_is_read_from_any_bytes_without_a_fault(data):
    assert isinstance(ankisync.client_alpn(b"\x16\x03\x01" + data), tuple)


def make_pebble_certificate(folder):
    """Pebble's own HTTPS (its API): Debian's pebble ships without its test certificates,
    so appendix E's CA makes one for 127.0.0.1 (strict enough for Python 3.13's checks,
    which openssl's make_certificate CA, without key usage, is not)."""
    os.makedirs(folder, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    ca, ca_key = ankisync.make_ca("pebble test", now)
    cert, key = ankisync.make_server_certificate(
        ca, ca_key, ["localhost"], [ipaddress.ip_address("127.0.0.1")], now)
    paths = types.SimpleNamespace(**{name: os.path.join(folder, name + ".pem")
                                     for name in ("ca", "cert", "key")})
    for path, text in ((paths.ca, ca), (paths.cert, cert), (paths.key, key)):
        with open(path, "w") as f:
            f.write(text)
    return paths


class Pebble:
    """Let's Encrypt's test CA (pebble) and its DNS (pebble-challtestsrv) on loopback,
    checking domains on the given ports."""

    def __init__(self, folder, tls_port, http_port, validity):
        for program in ("pebble", "pebble-challtestsrv"):
            if shutil.which(program) is None:
                pytest.skip("%s is not installed (Debian: apt-get install pebble)" % program)
        os.makedirs(folder, exist_ok=True)
        self.certificate = make_pebble_certificate(os.path.join(folder, "api"))
        self.port, self.management = free_port(), free_port()
        self.dns, self.dns_management = free_port(), free_port()
        config = os.path.join(folder, "pebble.json")
        with open(config, "w") as f:
            json.dump({"pebble": {
                "listenAddress": "127.0.0.1:%d" % self.port,
                "managementListenAddress": "127.0.0.1:%d" % self.management,
                "certificate": self.certificate.cert, "privateKey": self.certificate.key,
                "httpPort": http_port, "tlsPort": tls_port, "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
                "certificateValidityPeriod": validity}}, f)
        self.log_path = os.path.join(folder, "pebble.log")
        log = open(self.log_path, "ab")
        self.procs = [
            subprocess.Popen(["pebble-challtestsrv", "-defaultIPv4", "127.0.0.1",
                              "-defaultIPv6", "", "-dns01", "127.0.0.1:%d" % self.dns,
                              "-http01", "", "-https01", "", "-tlsalpn01", "",
                              "-management", "127.0.0.1:%d" % self.dns_management],
                             stdout=log, stderr=log, start_new_session=True),
            subprocess.Popen(["pebble", "-config", config, "-dnsserver",
                              "127.0.0.1:%d" % self.dns], stdout=log, stderr=log,
                             env=dict(os.environ, PEBBLE_VA_NOSLEEP="1",
                                      PEBBLE_WFE_NONCEREJECT="0", PEBBLE_AUTHZREUSE="0"),
                             start_new_session=True)]
        log.close()
        self.directory = "https://127.0.0.1:%d/dir" % self.port
        self.trusting = ssl.create_default_context(cafile=self.certificate.ca)
        wait_until(self.answers, 20, "pebble")

    def answers(self):
        try:
            with urllib.request.urlopen(self.directory, timeout=2, context=self.trusting):
                return True
        except OSError:
            return False

    def root(self, folder):
        """Pebble's issuing root, as a device would be given it: a file."""
        url = "https://127.0.0.1:%d/roots/0" % self.management
        with urllib.request.urlopen(url, timeout=10, context=self.trusting) as answer:
            path = os.path.join(folder, "pebble-root.pem")
            with open(path, "wb") as f:
                f.write(answer.read())
        return path

    def point_dns(self, address):
        request = urllib.request.Request(
            "http://127.0.0.1:%d/set-default-ipv4" % self.dns_management,
            data=json.dumps({"ip": address}).encode(), method="POST")
        urllib.request.urlopen(request, timeout=10).close()

    def stop(self):
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def pebble(tmp_path):
    started = []

    def start(tls_port, http_port, validity=3600):
        started.append(Pebble(str(tmp_path / ("pebble-%d" % len(started))), tls_port,
                              http_port, validity))
        return started[-1]

    yield start
    for one in started:
        one.stop()
        with open(one.log_path, errors="replace") as f:
            print("---- pebble log (tail) ----\n" + "\n".join(f.read().splitlines()[-40:]))


def start_acme_server(tmp_path, directory, api_ca, port, http_port, domain):
    """ankisync with acme_domain, its first HTTPS (a stand-in) trusted by no one: health is
    asked without verification, as start() would for tls = self-signed."""
    base = str(tmp_path / ("server-acme-%d" % port))
    srv = SyncServer(base, port=port, env={"SSL_CERT_FILE": api_ca}, ini=(
        "acme_domain = %s\nacme_directory = %s\nacme_http_port = %d\n"
        % (domain, directory, http_port)))
    srv.ssl_context = ssl._create_unverified_context()
    srv.url = "https://127.0.0.1:%d/" % port
    return srv


def acme_files(srv):
    return os.path.join(srv.base, ".tls", "acme.pem")


@pytest.mark.parametrize("challenge", ["tls-alpn-01", "http-01"])
def test_lets_encrypt_certificate_obtained_renewed_while_running_and_devices_sync(
        pebble, tmp_path, challenge):
    """acme_domain against pebble. localhost: pebble's DNS (challtestsrv) and the device's
    (the system's) both give 127.0.0.1 for it. HTTP-01 is tested by pointing pebble's
    TLS-ALPN-01 at a closed port: the first challenge fails, the second wins."""
    port, http_port = free_port(), free_port()
    ca = pebble(port if challenge == "tls-alpn-01" else free_port(), http_port, validity=45)
    srv = start_acme_server(tmp_path, ca.directory, ca.certificate.ca, port, http_port,
                            "localhost")
    try:
        srv.start()
        wait_until(lambda: os.path.exists(acme_files(srv)), 60, "the first certificate",
                   every=0.2)
        first = pem_serial(acme_files(srv))
        wait_until(lambda: served_serial(srv, "localhost") == first, 10, "it served")
        log = srv.log()
        assert "temporary self-signed" in log and "HTTPS certificate replaced" in log
        folder = os.path.join(srv.base, ".tls")
        for name in ("acme.pem", "acme.key", "acme-account.key"):
            assert stat.S_IMODE(os.stat(os.path.join(folder, name)).st_mode) == 0o600, name
        # A real Anki trusting pebble's root (as a phone trusts Let's Encrypt's) syncs at
        # the domain.
        root = ca.root(str(tmp_path))
        url = "https://localhost:%d/" % port
        trusting = ssl.create_default_context(cafile=root)
        with urllib.request.urlopen(url + "health", timeout=10, context=trusting) as answer:
            assert answer.status == 200
        run_device_elsewhere(url, str(tmp_path / "phone"), {"SSL_CERT_FILE": root})
        # Two thirds into its 45 s, the running server renews it; the device syncs on.
        wait_until(lambda: pem_serial(acme_files(srv)) != first, 60, "the renewal",
                   every=0.5)
        second = pem_serial(acme_files(srv))
        wait_until(lambda: served_serial(srv, "localhost") == second, 10, "it served")
        code = "import sys, test_ankisync as t; t.device_again_main(*sys.argv[1:])"
        proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "phone"), url],
                              cwd=HERE, env=dict(os.environ, SSL_CERT_FILE=root),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert not srv.died() and "Traceback" not in srv.log()
        assert "for localhost by %s" % challenge in srv.log()
        if challenge == "http-01":                  # tried first, failed, named
            assert "tls-alpn-01 check of localhost failed" in srv.log()
    finally:
        srv.kill()
        print("---- ankisync log (tail) ----\n" + srv.log_tail())


def device_again_main(folder, url):
    """The phone of device_elsewhere_main, later: it logs in and syncs its new notes."""
    phone = ModernDevice("phone", folder, types.SimpleNamespace(url=url))
    try:
        phone_keeps_syncing(phone, "again")
    finally:
        phone.close()


def test_lets_encrypt_failures_are_logged_with_the_fix_and_the_server_stays_up(pebble,
                                                                              tmp_path):
    port, http_port = free_port(), free_port()
    ca = pebble(port, http_port)
    ca.point_dns("127.0.0.9")        # the domain's DNS leads elsewhere
    srv = start_acme_server(tmp_path, ca.directory, ca.certificate.ca, port, http_port,
                            "localhost")
    # The CA out of reach: nothing listens at its address.
    gone = start_acme_server(tmp_path, "https://127.0.0.1:%d/dir" % free_port(),
                             ca.certificate.ca, free_port(), free_port(), "localhost")
    try:
        srv.start()
        gone.start()
        wait_until(lambda: "next try in" in srv.log(), 60, "the failure in the log")
        line = [x for x in srv.log().splitlines() if "next try in" in x][0]
        assert "no certificate from 127.0.0.1:%d for localhost" % ca.port in line
        assert "127.0.0.9" in line                  # the CA's own detail
        assert "DNS must point at this machine" in line and "port 443" in line, line
        assert "Traceback" not in srv.log()
        wait_until(lambda: "next try in" in gone.log(), 60, "the failure in the log")
        line = [x for x in gone.log().splitlines() if "next try in" in x][0]
        assert "no answer from the CA" in line and "acme_directory" in line, line
        for one in (srv, gone):
            answer = post(one, "/health", method="GET")
            assert answer.status == 200 and not one.died()
        assert not os.path.exists(acme_files(srv))
    finally:
        srv.kill()
        gone.kill()
        print("---- ankisync logs (tail) ----\n" + srv.log_tail() + "\n" + gone.log_tail())


def test_stalled_tls_handshakes_stall_nobody_and_each_port_names_the_wrong_scheme(
        start_server, server, tmp_path):
    certificate = make_certificate(str(tmp_path / "tls"))
    srv = start_server(certificate=certificate)
    with held() as socks:
        socks.append(connect(srv))                          # TCP, then silence
        socks.append(connect(srv, send=b"\x16\x03\x01"))    # 3 bytes of a TLS record
        assert post(srv, "/health", method="GET").status == 200
        key = login(srv)
        assert modern(srv, "meta", {"v": 11, "cv": "test"}, key=key).status == 200
        run_device_elsewhere(srv.url, str(tmp_path / "phone"), {"SSL_CERT_FILE": certificate.ca})
        assert [peer_state(s) for s in socks] == ["waiting", "waiting"]
    # A TLS handshake sent to the plain HTTP port is logged and closed.
    with pytest.raises(OSError):
        ssl.create_default_context().wrap_socket(connect(server), server_hostname="127.0.0.1")
    assert "spoke HTTPS to this HTTP port" in server.log()
    # Plain HTTP sent to the HTTPS port gets a 426 that says what to do, and a log line
    # (once, however often it comes); the answer must not be lost to a TCP reset.
    for _ in range(2):
        answer = raw_exchange(srv, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", pause=0.3)
        assert answer.version == "HTTP/1.1" and answer.status == 426, answer
        assert b"use https://x:%d/" % srv.port in answer.body, answer
    assert srv.log().count("sent plain HTTP to this HTTPS port") == 1


def test_http_typed_for_the_https_port_tells_both_clients_to_use_https_not_check_database(
        start_server, make_device, tmp_path):
    """A 400 there made Anki say "Please use the Check Database function", sending the
    user to repair a healthy collection. Anki 26.9 shows the status line's words."""
    srv = start_server(certificate=make_certificate(str(tmp_path / "tls")))
    typed = types.SimpleNamespace(url="http://127.0.0.1:%d/" % srv.port)
    with pytest.raises(Exception) as modern_error:
        make_device("modern", "desktop", on=typed).login()
    text = str(modern_error.value)
    assert "Check Database" not in text, text
    assert "426 this port speaks HTTPS: use https://127.0.0.1:%d/" % srv.port in text, text
    # Without the test CA (SSL_CERT_FILE) the https:// address itself is refused, in the
    # words the README quotes.
    with pytest.raises(Exception) as untrusted:
        make_device("modern", "laptop", on=srv).login()
    assert "error sending request for url ()" in str(untrusted.value), untrusted.value


@pytest.mark.legacy
def test_http_typed_for_the_https_port_is_no_check_database_on_anki_2_1_54(
        start_server, make_device, tmp_path):
    srv = start_server(certificate=make_certificate(str(tmp_path / "tls")))
    typed = types.SimpleNamespace(url="http://127.0.0.1:%d/" % srv.port)
    with pytest.raises(LegacyClientError) as error:
        make_device("legacy", "desktop", on=typed).login()
    text = str(error.value)
    assert "Check Database" not in text and "426 Upgrade Required" in text, text


def test_each_certificate_mistake_is_one_line_naming_the_option_the_file_and_the_fix(
        tmp_path):
    """Checked before the data folder: an unwritable one must not take the blame."""
    tls = make_certificate(str(tmp_path / "tls"))
    other = make_certificate(str(tmp_path / "other"))
    der = str(tmp_path / "cert.der")
    subprocess.run(["openssl", "x509", "-in", tls.cert, "-outform", "der", "-out", der],
                   check=True, capture_output=True, timeout=60)
    locked = str(tmp_path / "locked-key.pem")      # asked for on a terminal there is not
    subprocess.run(["openssl", "pkey", "-in", tls.key, "-aes256", "-passout", "pass:x",
                    "-out", locked], check=True, capture_output=True, timeout=60)
    missing = str(tmp_path / "live" / "fullchain.pem")
    port = free_port()
    (tmp_path / "afile").write_text("x")            # a data folder that is a file
    for certfile, keyfile, said in [
            (missing, tls.key, "certfile %s does not exist" % missing),
            (der, tls.key, "certfile %s is no PEM certificate" % der),
            (tls.key, tls.cert, "certfile %s holds a private key, no certificate" % tls.key),
            (tls.cert, other.key, "keyfile %s is not the key of certfile %s: set keyfile to "
                                  "the key made with this certificate" % (other.key, tls.cert)),
            (tls.cert, locked, "keyfile %s is encrypted with a passphrase" % locked),
            (tls.cert, "", "certfile %s holds no private key and keyfile is empty: set "
                           "keyfile" % tls.cert),
            ("", tls.key, "keyfile is set (%s) but certfile is not" % tls.key)]:
        ini = ("[server]\nhost = 127.0.0.1\nport = %d\ndata = %s\ncertfile = %s\n"
               "keyfile = %s\n" % (port, tmp_path / "afile", certfile, keyfile))
        text = refused_serve(tmp_path, ini)
        assert text.startswith("ankisync: ") and said in text, text
        assert len(text.strip().splitlines()) == 1, text
        # `health` finds no server, and says why none started.
        config = tmp_path / "health.ini"
        config.write_text(ini)
        done = run_ankisync("health", "--config", str(config))
        assert done.returncode != 0 and "no answer from" in done.stderr, done.stderr
        assert said in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_a_key_only_root_may_read_is_named_with_the_user_and_the_fix(tmp_path):
    """certbot's privkey.pem is root's alone; a server run as another user used to say
    it could not write its data folder."""
    python = "/usr/bin/python3"
    if os.getuid() != 0 or not shutil.which("runuser") or not os.path.exists(python):
        pytest.skip("needs root, runuser and a Python other users can run")
    shared = tempfile.mkdtemp(prefix="ankisync-test-", dir="/tmp")    # others may enter it
    try:
        os.chmod(shared, 0o755)
        script = os.path.join(shared, "ankisync.py")
        shutil.copy(os.path.join(HERE, "ankisync.py"), script)
        os.chmod(script, 0o644)
        tls = make_certificate(os.path.join(shared, "live"))
        os.chmod(os.path.dirname(tls.cert), 0o755)
        os.chmod(tls.cert, 0o644)
        os.chmod(tls.key, 0o600)                    # as certbot leaves it
        config = os.path.join(shared, "ankisync.ini")
        with open(config, "w") as f:
            f.write("[server]\ncertfile = %s\nkeyfile = %s\ndata = %s\n"
                    % (tls.cert, tls.key, os.path.join(shared, "data")))
        os.chmod(config, 0o644)
        proc = subprocess.run(["runuser", "-u", "nobody", "--", "env", "SYNC_PORT=%d"
                               % free_port(), python, script, "--config", config, "serve"],
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode != 0
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert lines[0].startswith("ankisync: keyfile %s is not readable by uid %d (nobody)"
                                   % (tls.key, pwd.getpwnam("nobody").pw_uid)), lines[0]
        assert "run ankisync as root" in lines[0] and "ssl-cert" in lines[0], lines[0]
    finally:
        shutil.rmtree(shared)


# --- the front page ---


def test_the_front_page_tells_each_client_its_address(server):
    answer = post(server, "/", method="GET")
    page = answer.body.decode()
    assert answer.status == 200 and ankisync.__version__ in page
    base = "http://127.0.0.1:%d/" % server.port
    for address in (base, base + "sync/", base + "msync/", base + "%s"):
        assert address in page
    page = post(server, "/", method="GET", headers={"Host": "<script>x</script>"}).body
    assert b"<script>x" not in page


CLIENT_LINES = [      # what each generation's own code reads (README, "Setting up the clients")
    "SYNC_ENDPOINT=http://HOST:27701/sync/", "SYNC_ENDPOINT_MEDIA=http://HOST:27701/msync/",
    "aqt.mediasync.SYNC_BASE", '"http://HOST:27701/%s"',            # Anki 2.1.22 - 2.1.26
    'SYNC_BASE = "http://HOST:27701/"', 'SYNC_MEDIA_BASE', '"http://HOST:27701/msync/"',  # 2.0
    "Sync url", "Media sync url",                                   # AnkiDroid up to 2.15
]


def test_readme_front_page_and_docstring_give_each_client_the_same_lines(server):
    page = post(server, "/", method="GET", headers={"Host": "HOST:27701"}).body
    page = html.unescape(page.decode())
    with open(os.path.join(HERE, "README.md")) as f:
        readme = f.read()
    docstring = " ".join(ankisync.__doc__.split())
    for line in CLIENT_LINES:
        assert line in readme and line in page, line
        assert line in docstring, line


# --- Command line ----------------------------------------------------------------------


def test_config_may_follow_the_command_and_each_command_explains_itself(tmp_path):
    assert cli(tmp_path, "adduser", "ana", stdin="pw\n").returncode == 0
    after = run_ankisync("lsuser", "--config", str(tmp_path / "test.ini"))
    assert after.returncode == 0 and after.stdout.split() == ["ana"]
    for command in ankisync.COMMANDS:
        shown = run_ankisync(command.name, "--help").stdout
        assert " ".join(command.description.split()[:4]) in " ".join(shown.split())


def read_until(fd, text, timeout=30):
    """Read the pipe `fd` until `text` has come (a prompt, which ends without a newline)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while text not in seen:
        left = deadline - time.monotonic()
        assert left > 0, "no %r in %r" % (text, seen)
        if select.select([fd], [], [], left)[0]:
            block = os.read(fd, 4096)
            assert block, "the output ended before %r: %r" % (text, seen)
            seen += block
    return seen


def test_serve_offers_to_create_the_first_user_on_a_terminal(tmp_path):
    config = tmp_path / "first.ini"
    config.write_text("[server]\nhost = 127.0.0.1\nport = %d\ndata = data\n" % free_port())
    main_end, child_end = pty.openpty()
    # Not a SyncServer: this serve asks its questions on the terminal before it listens.
    proc = subprocess.Popen(ankisync_command("--config", str(config), "serve"),
                            stdin=child_end, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    os.close(child_end)
    try:
        # Each answer once its question is out: getpass flushes what was typed ahead. A
        # bad name is refused with the reason, and the question asked again.
        for prompt, answer, before in (
                (b"Name of the first user", b"bad/name\n", b""),
                (b"Name of the first user", b"alice\n", b"ankisync: "),
                (b"Password for alice: ", b"s3cret\n", b""), (b"Again: ", b"s3cret\n", b"")):
            assert before in read_until(proc.stdout.fileno(), prompt)
            os.write(main_end, answer)

        def added():
            assert proc.poll() is None, "serve ended"
            return ankisync.UserStore(str(tmp_path / "data")).exists("alice")
        wait_until(added, timeout=30, what="alice added", every=0.2)
        assert ankisync.UserStore(str(tmp_path / "data")).login("alice", "s3cret")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        os.close(main_end)


def test_serve_without_users_and_without_a_terminal_says_what_to_run(start_server):
    srv = start_server(users=(), ini="")            # stdin is /dev/null, no terminal
    text = srv.log().split("listening on")[0]       # what it said before it listened
    assert "ankisync.py --config %s adduser NAME" % srv.config_path in text, text
    assert "SYNC_USER1" in text


# --- Appendix A. zstd: the three backends, each against the others and zstandard -------


MB = 1000 * 1000


def available_backends():
    backends = []
    for name in ankisync.ZSTD_BACKENDS:
        try:
            backends.append(ankisync.choose_zstd(name))
        except ankisync.ZstdError:
            pass
    return backends


BACKENDS = available_backends()


BACKEND_IDS = [b.name for b in BACKENDS]


backend_param = pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)


def test_all_three_backends_present_where_expected():
    names = set(BACKEND_IDS)
    assert {"libzstd", "python"} <= names
    try:
        import backports.zstd  # noqa: F401
    except ImportError:
        return
    assert "stdlib" in names


# --- payloads ---


def make_big_sqlite_bytes(tmp_path, megabytes, seed=7):
    rng = random.Random(seed)
    path = str(tmp_path / "collection.anki2")
    db = sqlite3.connect(path)
    db.execute("create table notes (id integer primary key, mod integer, tags text, flds text)")
    words = ["card", "note", "deck", "review", "kanji", "verb", "<b>", "</b>", "Paris", "1984"]
    note_id = 1500000000000
    while os.path.getsize(path) < megabytes * MB:
        rows = []
        for _ in range(2000):
            note_id += rng.randint(1, 9999)
            fields = " ".join(rng.choice(words) for _ in range(rng.randint(2, 40)))
            rows.append((note_id, note_id // 1000, " vocab ", fields))
        db.executemany("insert into notes values (?,?,?,?)", rows)
        db.commit()
    db.close()
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def big_sqlite_bytes(tmp_path_factory):
    return make_big_sqlite_bytes(tmp_path_factory.mktemp("db"), 3)


def json_text():
    rng = random.Random(3)
    notes = [{"id": 1600000000000 + i, "fields": ["front %d" % rng.randint(0, 99999), "back"],
              "tags": ["t%d" % rng.randint(0, 20)], "usn": -1} for i in range(20000)]
    return json.dumps({"notes": notes}).encode()


def long_repeats():
    # A 1 MB random chunk, repeated: matches of a whole MB at 1 MB offsets, across blocks.
    chunk = random.Random(5).randbytes(MB)
    return chunk * 11 + b"z" * (3 * MB)


SMALL_PAYLOADS = {
    "empty": b"",
    "one-byte": b"\x00",
    "short-text": b"hello, anki",
    "json": json_text(),
    "random": os.urandom(300 * 1000),
    "repetition": b"abc" * 400000,
    "zeros": bytes(2 * MB + 17),
    "block-edge": os.urandom(128 * 1024),
}


def stream_decode(backend, data, limit=1 << 40, chunk=7777):
    parts = []
    count = backend.decompress_stream(split_reader(data, chunk), parts.append, limit)
    out = b"".join(parts)
    assert count == len(out)
    return out


def zstandard_frame(data, level=3, checksum=True, content_size=True):
    return zstandard.ZstdCompressor(
        level=level, write_checksum=checksum, write_content_size=content_size).compress(data)


def skippable_frame(payload, variant=0):
    return struct.pack("<II", ankisync.SKIPPABLE_MAGIC + variant, len(payload)) + payload


# --- round trips ---


@pytest.mark.parametrize("name", sorted(SMALL_PAYLOADS))
@pytest.mark.parametrize("writer", BACKENDS, ids=BACKEND_IDS)
def test_round_trip_across_backends(writer, name):
    data = SMALL_PAYLOADS[name]
    whole = writer.compress(data)
    parts = []
    streamed_size = writer.compress_stream(split_reader(data, 5000), parts.append)
    streamed = b"".join(parts)
    assert streamed_size == len(streamed)
    for frame in (whole, streamed):
        assert zstandard.ZstdDecompressor().decompressobj().decompress(frame) == data
        for reader in BACKENDS:
            assert reader.decompress(frame, len(data)) == data, reader.name
            assert stream_decode(reader, frame) == data, reader.name


@pytest.mark.parametrize("writer", BACKENDS, ids=BACKEND_IDS)
def test_sqlite_round_trip(writer, big_sqlite_bytes):
    frame = writer.compress(big_sqlite_bytes)
    for reader in BACKENDS:
        decoded = stream_decode(reader, frame, limit=len(big_sqlite_bytes))
        assert decoded == big_sqlite_bytes, reader.name


def test_python_writer_declares_content_size_only_when_known():
    python = ankisync.choose_zstd("python")
    data = os.urandom(300000)
    whole = python.compress(data)
    assert zstandard.frame_content_size(whole) == len(data)
    streamed = python.compress(b"")
    assert zstandard.frame_content_size(streamed) == 0
    parts = []
    python.compress_stream(io.BytesIO(data).read, parts.append)
    assert zstandard.frame_content_size(b"".join(parts)) == -1
    for size in (0, 1, 255, 256, 65791, 65792, 300000):
        frame = python.compress(bytes(size))
        assert zstandard.frame_content_size(frame) == size
        assert zstandard.ZstdDecompressor().decompress(frame) == bytes(size)


# --- frames from the reference compressor ---


@pytest.mark.parametrize("level", [1, 3, 19])
@pytest.mark.parametrize("checksum", [True, False])
@pytest.mark.parametrize("content_size", [True, False])
@backend_param
def test_zstandard_frames(backend, level, checksum, content_size, big_sqlite_bytes):
    data = big_sqlite_bytes[:MB] + SMALL_PAYLOADS["json"][:300000]
    frame = zstandard_frame(data, level, checksum, content_size)
    assert backend.decompress(frame, len(data)) == data


@backend_param
def test_zstandard_stream_writer_and_compressobj(backend, big_sqlite_bytes):
    data = big_sqlite_bytes[:2 * MB]
    sink = io.BytesIO()
    with zstandard.ZstdCompressor(level=3).stream_writer(sink, closefd=False) as writer:
        for i in range(0, len(data), 10000):
            writer.write(data[i:i + 10000])
            if i % 300000 == 0:
                writer.flush()            # zstd.FLUSH_BLOCK: many small blocks
    assert stream_decode(backend, sink.getvalue()) == data

    compressor = zstandard.ZstdCompressor(level=1, write_checksum=True).compressobj()
    frame = b"".join(compressor.compress(data[i:i + 65536]) for i in range(0, len(data), 65536))
    frame += compressor.flush()
    assert stream_decode(backend, frame) == data


@backend_param
def test_big_frame_with_long_matches(backend):
    data = long_repeats()
    assert len(data) > 10 * MB
    for level in (3, 19):
        compressor = zstandard.ZstdCompressor(level=level, write_checksum=True).compressobj()
        frame = compressor.compress(data) + compressor.flush()   # streamed: no content size
        assert len(frame) < len(data) // 5
        assert stream_decode(backend, frame, limit=len(data), chunk=65536) == data


@backend_param
def test_concatenated_and_skippable_frames(backend):
    python = ankisync.choose_zstd("python")
    pieces = [b"first frame " * 100, b"", os.urandom(5000), SMALL_PAYLOADS["json"][:50000]]
    stream = (skippable_frame(b"metadata")
              + zstandard_frame(pieces[0])
              + skippable_frame(b"", 15)
              + python.compress(pieces[1])
              + backend.compress(pieces[2])
              + skippable_frame(os.urandom(100000), 3)
              + zstandard_frame(pieces[3], level=19, content_size=False)
              + skippable_frame(b"trailer"))
    expected = b"".join(pieces)
    assert backend.decompress(stream, len(expected)) == expected
    assert stream_decode(backend, stream, chunk=1000) == expected
    assert stream_decode(backend, skippable_frame(b"only this")) == b""


@backend_param
def test_one_byte_reads(backend):
    data = SMALL_PAYLOADS["json"][:3000] * 3
    frame = zstandard_frame(data, level=19) + skippable_frame(b"xy") + zstandard_frame(b"!")
    assert stream_decode(backend, frame, chunk=1) == data + b"!"


@backend_param
def test_rle_and_raw_literals(backend):
    rng = random.Random(11)
    for size in (1, 2, 5, 31, 32, 200, 1000, 5000, 70000):
        for data in (bytes([rng.randrange(256)]) * size,
                     bytes(rng.randrange(4) for _ in range(size)),
                     bytes(rng.randrange(256) for _ in range(size)),
                     (b"ab" * size)[:size]):
            for level in (1, 19):
                frame = zstandard_frame(data, level=level)
                assert backend.decompress(frame, size) == data


def rare_feature_payloads():
    """Inputs that make zstd use its rarer block features."""
    rng = random.Random(2)
    base = bytes(rng.randrange(256) for _ in range(64))
    chunk = bytes(rng.randrange(256) for _ in range(2000))
    tokens = [bytes(rng.randrange(256) for _ in range(4)) for _ in range(300)]
    return {
        # literals all one byte: an RLE literals section
        "rle-literals": b"".join(b"Q" + base[i:i + 8]
                                 for i in (rng.randrange(56) for _ in range(3000))),
        # incompressible literals between long matches: raw literals with a 12-bit size
        "raw-literals": b"".join(chunk + bytes(rng.randrange(256) for _ in range(50))
                                 for _ in range(20)),
        # every sequence alike: RLE mode for the sequence codes
        "rle-tables": (b"abcdefgh" * 3 + b"Z") * 5000,
        # 4-byte matches everywhere: more than 0x7F00 sequences in one block
        "many-sequences": b"".join(rng.choice(tokens) for _ in range(200000)),
    }


@pytest.mark.parametrize("name", sorted(rare_feature_payloads()))
@backend_param
def test_rare_block_features(backend, name):
    data = rare_feature_payloads()[name]
    for level in (1, 3, 19):
        assert backend.decompress(zstandard_frame(data, level=level), len(data)) == data


# --- refusing bad input ---


@backend_param
def test_truncated_frames_refused(backend):
    data = SMALL_PAYLOADS["json"][:20000]
    for frame in (zstandard_frame(data, level=19), zstandard_frame(data, checksum=False),
                  ankisync.choose_zstd("python").compress(data), skippable_frame(b"abcdef")):
        cuts = set(range(1, 40)) | set(range(1, len(frame), 97)) | {len(frame) - 1}
        for cut in sorted(c for c in cuts if c < len(frame)):
            with pytest.raises(ankisync.ZstdError):
                backend.decompress(frame[:cut], 1 << 30)


@backend_param
def test_empty_input_is_empty_output(backend):
    assert backend.decompress(b"", 0) == b""
    assert stream_decode(backend, b"", limit=0) == b""


@backend_param
def test_garbage_refused(backend):
    for garbage in (b"\x00", b"not zstd at all", b"\x28\xb5\x2f\xfd", os.urandom(1000),
                    zstandard_frame(b"ok") + b"\x00\x00\x00"):
        with pytest.raises(ankisync.ZstdError):
            backend.decompress(garbage, 1 << 20)


@backend_param
def test_flipped_bytes_refused_or_harmless(backend):
    """A flipped byte must give ZstdError, or (in a field like the window size) the same data."""
    rng = random.Random(1234)
    data = SMALL_PAYLOADS["json"][:60000] + os.urandom(2000) + b"\x00" * 5000
    frame = zstandard_frame(data, level=19)
    errors = 0
    for _ in range(300):
        broken = bytearray(frame)
        pos = rng.randrange(len(broken))
        broken[pos] ^= 1 << rng.randrange(8)
        try:
            out = backend.decompress(bytes(broken), 10 * len(data))
        except ankisync.ZstdError:
            errors += 1
        else:
            assert out == data, "flip at %d accepted with different output" % pos
    assert errors > 250


@backend_param
def test_bad_checksum_refused(backend):
    frame = bytearray(zstandard_frame(b"checked content " * 1000, checksum=True))
    frame[-1] ^= 0x40
    with pytest.raises(ankisync.ZstdError):
        backend.decompress(bytes(frame), 1 << 20)


@backend_param
def test_dictionary_frames_refused(backend):
    samples = [("sample %d %s" % (i, "word " * (i % 17))).encode() for i in range(2000)]
    dictionary = zstandard.train_dictionary(4096, samples)
    frame = zstandard.ZstdCompressor(dict_data=dictionary).compress(samples[5])
    with pytest.raises(ankisync.ZstdError):
        backend.decompress(frame, 1 << 20)


def test_python_dictionary_message():
    header = struct.pack("<IBB", ankisync.ZSTD_MAGIC, 0x21, 7) + b"\x01\x00\x00"
    with pytest.raises(ankisync.ZstdError, match="dictionaries are not supported"):
        ankisync.choose_zstd("python").decompress(header, 100)


@backend_param
def test_window_too_large_refused(backend):
    # Window_Descriptor exponent 18: a 256 MiB window, above the 128 MiB ceiling.
    frame = struct.pack("<IBB", ankisync.ZSTD_MAGIC, 0, 18 << 3) + b"\x01\x00\x00"
    with pytest.raises(ankisync.ZstdError):
        backend.decompress(frame, 1 << 40)
    # ...and exactly 128 MiB is fine.
    frame = struct.pack("<IBB", ankisync.ZSTD_MAGIC, 0, 17 << 3) + b"\x09\x00\x00" + b"x"
    assert backend.decompress(frame, 10) == b"x"


@backend_param
def test_reserved_block_type_refused(backend):
    frame = struct.pack("<IBB", ankisync.ZSTD_MAGIC, 0x20, 1) + b"\x07\x00\x00"
    with pytest.raises(ankisync.ZstdError):
        backend.decompress(frame, 100)


# --- limits ---


@backend_param
def test_limit(backend):
    data = SMALL_PAYLOADS["json"][:500000]
    for frame in (zstandard_frame(data), zstandard_frame(data, content_size=False),
                  ankisync.choose_zstd("python").compress(data)):
        assert backend.decompress(frame, len(data)) == data
        for limit in (0, 1, 1000, len(data) // 2, len(data) - 1):
            with pytest.raises(ankisync.ZstdLimitError):
                backend.decompress(frame, limit)
            written = []
            with pytest.raises(ankisync.ZstdLimitError):
                backend.decompress_stream(io.BytesIO(frame).read, written.append, limit)
            assert sum(map(len, written)) <= limit
    # The limit counts all frames together.
    two = zstandard_frame(data) + zstandard_frame(data)
    assert backend.decompress(two, 2 * len(data)) == data + data
    with pytest.raises(ankisync.ZstdLimitError):
        backend.decompress(two, 2 * len(data) - 1)


@pytest.fixture(scope="module")
def zip_bombs():
    """1 GB of zeros, streamed (no content size) and one-shot (content size declared)."""
    compressor = zstandard.ZstdCompressor(level=3).compressobj()
    zeros = bytes(4 * MB)
    streamed = b"".join(compressor.compress(zeros) for _ in range(250)) + compressor.flush()
    declared = zstandard.ZstdCompressor(level=3).compress(bytes(250 * 4 * MB))
    assert len(streamed) < 200000 and len(declared) < 200000
    return streamed, declared


@backend_param
def test_zip_bomb_refused_quickly_in_little_memory(backend, zip_bombs):
    for bomb in zip_bombs:
        tracemalloc.start()
        start = time.perf_counter()
        try:
            with pytest.raises(ankisync.ZstdLimitError):
                backend.decompress_stream(io.BytesIO(bomb).read, lambda chunk: None, 2 * MB)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert time.perf_counter() - start < 5
        assert peak < 16 * MB


# --- pieces ---


def test_xxh64_matches_zstd_checksums():
    hasher = ankisync.XXH64()
    assert hasher.intdigest() == 0xEF46DB3751D8E999
    rng = random.Random(9)
    for size in list(range(0, 70)) + [100, 1000, 4096, 100003]:
        data = bytes(rng.randrange(256) for _ in range(size))
        frame = zstandard_frame(data, checksum=True)
        hasher = ankisync.XXH64()
        for i in range(0, size, 13):      # odd pieces exercise the stripe buffering
            hasher.update(data[i:i + 13])
        assert hasher.intdigest() & 0xFFFFFFFF == struct.unpack("<I", frame[-4:])[0], size


def test_choose_auto_prefers_stdlib_then_libzstd():
    chosen = ankisync.choose_zstd()
    assert chosen.name == BACKEND_IDS[0]
    assert ankisync.choose_zstd("auto").name == chosen.name
    assert ankisync.choose_zstd(" Python ").name == "python"


def test_choose_unknown_backend():
    with pytest.raises(ankisync.ZstdError, match="unknown zstd backend"):
        ankisync.choose_zstd("brotli")


def test_forced_unavailable_backends_say_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "compression.zstd", None)
    monkeypatch.setitem(sys.modules, "backports.zstd", None)
    with pytest.raises(ankisync.ZstdError, match="backports.zstd"):
        ankisync.choose_zstd("stdlib")
    monkeypatch.setattr(ankisync.ctypes.util, "find_library", lambda name: None)
    monkeypatch.setattr(ankisync, "LIBZSTD_FALLBACK_NAMES", ("libzstd-missing.so.0",))
    with pytest.raises(ankisync.ZstdError, match="install"):
        ankisync.choose_zstd("libzstd")
    assert ankisync.choose_zstd().name == "python"


def test_errors_are_one_line():
    for backend in BACKENDS:
        for bad in (b"\x28\xb5\x2f\xfd\x00", b"junk", zstandard_frame(b"x" * 1000)[:-2]):
            with pytest.raises(ankisync.ZstdError) as info:
                backend.decompress(bad, 1000)
            assert "\n" not in str(info.value) and str(info.value)


# --- fuzzed: each backend against zstandard, random and damaged frames ---

# Every backend that loads here (python always does).
ZSTD_BACKENDS = []
for _name in ("python", "libzstd", "stdlib"):
    try:
        ZSTD_BACKENDS.append(ankisync.choose_zstd(_name))
    except ankisync.ZstdError:
        pass
# The libzstd inside the zstandard package, numbered as ZSTD_versionNumber() numbers it.
LIBZSTD_REFERENCE_VERSION = sum(part * scale for part, scale in zip(zstandard.ZSTD_VERSION,
                                                                    (10000, 100, 1)))
ZSTD_REFERENCE = zstandard.ZstdDecompressor(max_window_size=1 << ankisync.WINDOW_LOG_MAX)


def zstd_reference(data):
    """What libzstd (through the zstandard package) makes of every frame of `data`;
    zstandard.ZstdError for what it refuses, including input that ends inside a frame."""
    out = []
    while data:
        frame = ZSTD_REFERENCE.decompressobj()
        out.append(frame.decompress(data))
        if not frame.eof:
            raise zstandard.ZstdError("input ends inside a frame")
        data = frame.unused_data
    return b"".join(out)


def pieces(data, sizes):
    """read(n) over `data` that hands out at most the next of `sizes` bytes per call, as
    a socket or a zip member does."""
    stream, turn = io.BytesIO(data), [0]

    def read(n=-1):
        size = sizes[turn[0] % len(sizes)] if sizes else n
        turn[0] += 1
        return stream.read(size if n is None or n < 0 else min(n, size))
    return read


def bounded_sink(limit):
    """write() that collects, and fails the test the moment more than `limit` arrives."""
    parts, total = [], [0]

    def write(data):
        total[0] += len(data)
        assert total[0] <= limit, "wrote %d bytes past a limit of %d" % (total[0], limit)
        parts.append(bytes(data))
    return parts, write




# Data a compressor finds something in: runs, repeats and a small alphabet.
compressible = st.one_of(
    st.binary(max_size=3000),
    st.text(alphabet="ab c\n", max_size=6000).map(str.encode),
    st.lists(st.tuples(st.binary(min_size=1, max_size=24), st.integers(1, 120)),
             max_size=24).map(lambda runs: b"".join(chunk * n for chunk, n in runs)),
)


def zstd_frames(data, level, checksum, content_size, streamed):
    compressor = zstandard.ZstdCompressor(level=level, write_checksum=checksum,
                                          write_content_size=content_size)
    if streamed:        # no content size, blocks as the data came
        out = compressor.compressobj()
        return out.compress(data) + out.flush()
    return compressor.compress(data)


@st.composite
def zstandard_streams(draw):
    """(stream, its content): zstandard frames of several settings, skippable frames
    between them."""
    stream, content = [], []
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.booleans()) and draw(st.booleans()):
            stream.append(skippable_frame(draw(st.binary(max_size=40)), draw(st.integers(0, 15))))
        data = draw(compressible)
        stream.append(zstd_frames(data, draw(st.sampled_from([-5, 1, 3, 7, 12, 19])),
                                  draw(st.booleans()), draw(st.booleans()),
                                  draw(st.booleans())))
        content.append(data)
    return b"".join(stream), b"".join(content)


@pytest.mark.parametrize("zstd", ZSTD_BACKENDS, ids=lambda z: z.name)
@settings(max_examples=40, deadline=None, derandomize=True)
@given(data=compressible)
def test_zstd_round_trip(zstd, data):
    """What a backend compresses, it and libzstd decompress to the same bytes."""
    frame = zstd.compress(data)
    assert zstd.decompress(frame, len(data)) == data
    assert zstd_reference(frame) == data


@pytest.mark.parametrize("zstd", ZSTD_BACKENDS, ids=lambda z: z.name)
@settings(max_examples=60, deadline=None, derandomize=True)
@given(stream=zstandard_streams())
def test_zstd_frames_of_libzstd_decode_to_the_same_bytes(zstd, stream):
    """Frames libzstd writes at any level, with or without checksum and content size,
    several in a row with skippable frames between, decode to what they hold."""
    frames, content = stream
    assert zstd.decompress(frames, len(content)) == content
    if content:
        with pytest.raises(ankisync.ZstdLimitError):
            zstd.decompress(frames, len(content) - 1)


def check_zstd_against_reference(zstd, data, limit):
    """A backend either gives what libzstd gives, within `limit`, or raises ZstdError."""
    parts, write = bounded_sink(limit)
    try:
        produced = zstd.decompress_stream(io.BytesIO(data).read, write, limit)
    except ankisync.ZstdLimitError:
        try:
            assert len(zstd_reference(data)) > limit
        except zstandard.ZstdError:
            pass            # the limit came first: the backend stopped before the damage
        return
    except ankisync.ZstdError:
        return
    assert produced == sum(map(len, parts)) <= limit
    try:
        expected = zstd_reference(data)
    except zstandard.ZstdError:
        # The system's libzstd may be older than zstandard's (1.5.4 here, 1.5.7 there):
        # 1.5.4 lets through some corrupt sequence sections that 1.5.7 refuses.
        assert zstd.name == "libzstd" and zstd.version != LIBZSTD_REFERENCE_VERSION
        return
    assert b"".join(parts) == expected


@st.composite
def damaged_frames(draw):
    """A zstandard frame with a few bytes changed, flipped or dropped past its header,
    where the blocks are: most damage is found only deep in the decoder."""
    frame = bytearray(drawn_damage(
        draw, zstd_frames(draw(compressible), draw(st.sampled_from([1, 3, 9, 19])),
                          draw(st.booleans()), True, False),
        ["set", "flip", "drop"], draw(st.integers(1, 3)), start=6))
    if draw(st.booleans()) and draw(st.booleans()):
        del frame[len(frame) - draw(st.integers(1, 8)):]
    return bytes(frame)


zstd_limits = st.one_of(st.just(1 << 24), st.integers(0, 1 << 16))


@pytest.mark.parametrize("zstd", ZSTD_BACKENDS, ids=lambda z: z.name)
@settings(max_examples=120, deadline=None, derandomize=True)
@given(data=st.one_of(st.binary(max_size=300),
                      st.binary(max_size=300).map(lambda b: struct.pack("<I", ankisync.ZSTD_MAGIC)
                                                  + b)),
       limit=zstd_limits)
def test_zstd_random_bytes_decode_as_libzstd_does_or_raise_zstd_error(zstd, data, limit):
    """Random bytes, some behind a frame's magic: never an error other than ZstdError,
    never output past the limit, and what is decoded is what libzstd decodes."""
    check_zstd_against_reference(zstd, data, limit)


@pytest.mark.parametrize("zstd", ZSTD_BACKENDS, ids=lambda z: z.name)
@settings(max_examples=300, deadline=None, derandomize=True)
@given(data=damaged_frames(), limit=zstd_limits)
def test_zstd_damaged_frames_decode_as_libzstd_does_or_raise_zstd_error(zstd, data, limit):
    """Valid frames with bytes changed or cut off: the same contract. Frames without a
    checksum decode to garbage, which must be libzstd's garbage, byte for byte."""
    check_zstd_against_reference(zstd, data, limit)


def zstd_outcome(zstd, read, limit):
    parts = []
    try:
        zstd.decompress_stream(read, parts.append, limit)
    except ankisync.ZstdLimitError:
        return "over the limit"
    except ankisync.ZstdError:
        return "refused"
    return b"".join(parts)


@pytest.mark.parametrize("zstd", ZSTD_BACKENDS, ids=lambda z: z.name)
@settings(max_examples=100, deadline=None, derandomize=True)
@given(data=st.one_of(damaged_frames(), zstandard_streams().map(lambda s: s[0])),
       sizes=st.lists(st.integers(1, 50), min_size=1, max_size=5), limit=zstd_limits)
def test_zstd_damaged_frames_read_in_small_pieces_end_alike(zstd, data, sizes, limit):
    """Whether the input comes whole or a few bytes per read, the outcome is the same:
    the same bytes, or the same refusal."""
    assert zstd_outcome(zstd, pieces(data, sizes), limit) == \
        zstd_outcome(zstd, io.BytesIO(data).read, limit)


def test_zstd_libzstd_before_1_5_7_lets_a_damaged_sequence_section_through():
    """Found by the fuzzing above: libzstd 1.5.4 (the system's here) decodes this damaged
    frame, libzstd 1.5.7 and the pure-Python decoder refuse it. Not ankisync's to fix."""
    frame = (b"(\xb5/\xfd /U\x01\x00\x04\x02\x00\x00\x00\x00\x00\x00\x01\x02\x00\x00\x01"
             b"\x00\x00\x02\x00\x01\x00\x00\x00\x01\x02\x00\x00\x00\x00\x00\x00\x00\x00\x00"
             b"\x00\x00\x03\x14\x03\x02\x17\x00\xb6\x04")
    with pytest.raises(zstandard.ZstdError):
        zstd_reference(frame)
    for zstd in ZSTD_BACKENDS:
        check_zstd_against_reference(zstd, frame, 1 << 20)
    with pytest.raises(ankisync.ZstdError):
        ankisync.choose_zstd("python").decompress(frame, 1 << 20)


@pytest.mark.parametrize("zstd", ZSTD_BACKENDS, ids=lambda z: z.name)
@settings(max_examples=40, deadline=None, derandomize=True)
@given(stream=zstandard_streams(), sizes=read_sizes)
def test_zstd_streams_read_in_random_pieces(zstd, stream, sizes):
    """decompress_stream and compress_stream take reads of any size, as sockets give."""
    frames, content = stream
    parts, write = bounded_sink(len(content))
    assert zstd.decompress_stream(pieces(frames, sizes), write, len(content)) == len(content)
    assert b"".join(parts) == content
    packed = []
    written = zstd.compress_stream(pieces(content, sizes), packed.append)
    assert written == sum(map(len, packed))
    assert zstd_reference(b"".join(packed)) == content


@pytest.mark.parametrize("zstd", ZSTD_BACKENDS, ids=lambda z: z.name)
def test_zstd_big_frames_of_many_blocks(zstd):
    """Over 128 KiB a frame has several blocks and the window matters: checked once
    at a size hypothesis would make slow."""
    data = b"".join(b"%d,%s;" % (i, b"xyz" * (i % 7)) for i in range(40000))
    data += random.Random(8878).randbytes(70000)
    for level in (1, 19):
        frame = zstandard.ZstdCompressor(level=level, write_checksum=True).compress(data)
        assert zstd.decompress(frame, len(data)) == data
    assert zstd_reference(zstd.compress(data)) == data


# --- Appendix B. Schema 18 to 11, against the official backend -------------------------


JSON_COLUMNS = ("conf", "models", "decks", "dconf", "tags")


# --- a tiny protobuf encoder, only for hand-made edge-case blobs ---


def varint(value):
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def key(number, wire):
    return varint(number << 3 | wire)


def pv(number, value):
    return key(number, 0) + varint(value)


def pl(number, payload):
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    return key(number, 2) + varint(len(payload)) + payload


def pf(number, value):
    return key(number, 5) + struct.pack("<f", value)


def packed_floats(number, values):
    return pl(number, b"".join(struct.pack("<f", v) for v in values))


# --- helpers ---


def official_downgrade(src, dst):
    """Copy `src` (schema 18) to `dst` and downgrade it with the backend."""
    shutil.copy(src, dst)
    backend = RustBackend(server=True)
    backend.open_collection(collection_path=dst, media_folder_path=dst + ".media",
                            media_db_path=dst + ".mdb")
    backend.close_collection(downgrade_to_schema11=True)


def our_downgrade(src, dst):
    shutil.copy(src, dst)
    conn = ankisync.connect_collection(dst)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT ver FROM col").fetchone()[0] == 18
        ankisync.downgrade_to_schema11(conn)
    finally:
        conn.close()


def db_snapshot(path):
    conn = ankisync.connect_collection(path)
    try:
        col = conn.execute(
            "SELECT id, crt, mod, scm, ver, dty, usn, ls FROM col").fetchall()
        json_cols = dict(zip(JSON_COLUMNS, (json.loads(text) for text in
                         conn.execute("SELECT %s FROM col" % ",".join(JSON_COLUMNS))
                         .fetchone())))
        tables = {t: conn.execute("SELECT * FROM %s" % t).fetchall()
                  for t in ("notes", "cards", "revlog", "graves")}
        master = conn.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_master "
            "ORDER BY name").fetchall()
        journal = conn.execute("PRAGMA journal_mode").fetchone()[0]
    finally:
        conn.close()
    with open(path, "rb") as f:
        header = f.read(20)
    return dict(col=col, json=json_cols, tables=tables, master=master,
                journal=journal, header=header[18:20])


def assert_same_db(ours, official):
    for column in JSON_COLUMNS:
        assert ours["json"][column] == official["json"][column], column
    assert ours["col"] == official["col"]
    assert ours["tables"] == official["tables"]
    assert ours["master"] == official["master"]
    assert ours["journal"] == official["journal"] == "delete"
    assert ours["header"] == official["header"] == b"\x01\x01"


def compare_downgrades(src, tmp_path):
    ours, official = str(tmp_path / "ours.anki2"), str(tmp_path / "official.anki2")
    our_downgrade(src, ours)
    official_downgrade(src, official)
    a, b = db_snapshot(ours), db_snapshot(official)
    assert_same_db(a, b)
    return a


def set_blob(path, sql, params):
    conn = ankisync.connect_collection(path)
    try:
        conn.execute(sql, params)
    finally:
        conn.close()


# --- a rich schema-18 collection ---


def build_rich_collection(path):
    col = Collection(path)
    mm = col.models

    custom = mm.new("Vocabulary ✓")
    for name in ("Wort", "Bedeutung", "Beispiel"):
        field = mm.new_field(name)
        field["media"] = []
        field["legacyFieldKey"] = {"nested": [1, 2.5, "ü"]}
        mm.add_field(custom, field)
    custom["flds"][1]["rtl"] = True
    custom["flds"][2]["sticky"] = True
    custom["flds"][2]["description"] = "a hint"
    custom["flds"][0]["size"] = 14
    template = mm.new_template("Erkennen")
    template["qfmt"] = "{{Wort}}"
    template["afmt"] = "{{FrontSide}}<hr id=answer>{{Bedeutung}}"
    template["bqfmt"] = "<b>{{Wort}}</b>"
    template["bsize"] = 300
    template["bfont"] = "Times"
    template["templateExtra"] = "kept"
    mm.add_template(custom, template)
    second = mm.new_template("Produzieren")
    second["qfmt"] = "{{Bedeutung}}{{Beispiel}}"
    second["afmt"] = "{{Wort}}"
    mm.add_template(custom, second)
    custom["vers"] = []
    custom["tags"] = ["legacy"]
    custom["modelExtra"] = {"a": None, "b": [True, 0.1]}
    custom["css"] = ".card { color: red; }"
    custom["sortf"] = 1
    custom["latexsvg"] = True
    mm.add(custom)
    custom = mm.by_name("Vocabulary ✓")

    cloze = mm.by_name("Cloze")

    parent = col.decks.id("Sprachen")
    child = col.decks.id("Sprachen::日本語::Kanji ✍")
    other = col.decks.id("Ünïcode Deck")
    deck = col.decks.get(child)
    deck["reviewLimit"] = 50
    deck["newLimit"] = 0
    deck["reviewLimitToday"] = {"limit": 7, "today": col.sched.today}
    deck["newLimitToday"] = {"limit": 3, "today": col.sched.today}
    deck["desiredRetention"] = 70
    deck["desc"] = "**Markdown** description"
    deck["md"] = True
    deck["deckExtra"] = {"x": 1}
    deck["extendNew"] = 5
    deck["extendRev"] = 10
    col.decks.save(deck)
    deck = col.decks.get(other)
    deck["desiredRetention"] = 85
    col.decks.save(deck)

    preset_id = col.decks.add_config_returning_id("Intensiv")
    preset = col.decks.get_config(preset_id)
    preset["new"]["perDay"] = 99
    preset["new"]["delays"] = [0.5, 3.0, 15.0, 1440.0]
    preset["new"]["initialFactor"] = 1310
    preset["new"]["ints"] = [2, 7, 0]
    preset["new"]["order"] = 0
    preset["new"]["bury"] = True
    preset["new"]["newExtra"] = "n"
    preset["rev"]["perDay"] = 9999
    preset["rev"]["ease4"] = 1.45
    preset["rev"]["ivlFct"] = 0.85
    preset["rev"]["maxIvl"] = 3650
    preset["rev"]["hardFactor"] = 1.1
    preset["rev"]["fuzz"] = 0.05
    preset["lapse"]["delays"] = [5.0, 20.0]
    preset["lapse"]["mult"] = 0.3
    preset["lapse"]["minInt"] = 3
    preset["lapse"]["leechFails"] = 12
    preset["lapse"]["leechAction"] = 0
    preset["lapse"]["lapseExtra"] = [1]
    preset["maxTaken"] = 120
    preset["autoplay"] = False
    preset["timer"] = 1
    preset["replayq"] = False
    preset["fsrsWeights"] = [0.4, 0.6, 2.4, 5.8, 4.93, 0.94, 0.86, 0.01, 1.49,
                             0.14, 0.94, 2.18, 0.05, 0.34, 1.26, 0.29, 2.61]
    preset["fsrsParams5"] = [0.40255, 1.18385, 3.173, 15.69105, 7.1949,
                             0.5345, 1.4604, 0.0046, 1.54575, 0.1192, 1.01925,
                             1.9395, 0.11, 0.29605, 2.2698, 0.2315, 2.9898,
                             0.51655, 0.6621]
    preset["fsrsParams6"] = [0.212, 1.2931, 2.3065, 8.2956, 6.4133, 0.8334,
                             3.0194, 0.001, 1.8722, 0.1666, 0.796, 1.4835,
                             0.0614, 0.2629, 1.6483, 0.6014, 1.8729, 0.5425,
                             0.0912, 0.0658, 0.1542]
    preset["desiredRetention"] = 0.85
    preset["sm2Retention"] = 0.7
    preset["easyDaysPercentages"] = [1.0, 0.5, 1.0, 1.0, 0.0, 1.0, 0.75]
    preset["newMix"] = 2
    preset["interdayLearningMix"] = 1
    preset["reviewOrder"] = 7
    preset["newSortOrder"] = 3
    preset["newGatherPriority"] = 5
    preset["newPerDayMinimum"] = 4
    preset["buryInterdayLearning"] = True
    preset["stopTimerOnAnswer"] = True
    preset["secondsToShowQuestion"] = 2.5
    preset["secondsToShowAnswer"] = 0.3
    preset["questionAction"] = 1
    preset["answerAction"] = 3
    preset["waitForAudio"] = False
    preset["weightSearch"] = "deck:Sprachen -is:suspended"
    preset["ignoreRevlogsBeforeDate"] = "2024-01-31"
    preset["presetExtra"] = {"deep": {"er": [None, False]}}
    col.decks.update_config(preset)

    odd_id = col.decks.add_config_returning_id("Odd values")
    odd = col.decks.get_config(odd_id)
    odd["new"]["perDay"] = 12000  # out of range: reset to 20
    odd["new"]["initialFactor"] = 6000  # out of range: reset to 2.5
    odd["rev"]["ivlFct"] = 3.0
    odd["rev"]["hardFactor"] = 0.3
    odd["rev"]["maxIvl"] = 0
    odd["lapse"]["leechFails"] = 0
    odd["maxTaken"] = 0
    odd["desiredRetention"] = 0.5
    odd["sm2Retention"] = 0.99
    odd["lapse"]["delays"] = []
    odd["new"]["delays"] = [0.001, 1e-7, 123456.789]
    col.decks.update_config(odd)

    for did, conf_id in ((child, preset_id), (other, odd_id)):
        deck = col.decks.get(did)
        deck["conf"] = conf_id
        col.decks.save(deck)

    notes = []
    for i in range(12):
        note = col.new_note(custom)
        note["Wort"] = "Wort %d <b>fett</b>" % i
        note["Bedeutung"] = "meaning %d" % i
        note["Beispiel"] = "Beispiel" if i % 2 else ""
        note.tags = ["vokabeln", "lang::de", "日本"] if i % 3 else ["misc"]
        col.add_note(note, child if i % 2 else parent)
        notes.append(note)
    for i in range(4):
        note = col.new_note(cloze)
        note["Text"] = "{{c1::Tokyo}} is in {{c2::Japan}} %d" % i
        note.tags = ["geo"]
        col.add_note(note, other)
    for name in ("Basic", "Basic (and reversed card)"):
        note = col.new_note(mm.by_name(name))
        note["Front"] = name
        note["Back"] = "back"
        col.add_note(note, 1)

    col.decks.select(child)
    for ease in (3, 1, 4, 2, 3, 3):
        card = col.sched.getCard()
        if card is None:
            break
        col.sched.answerCard(card, ease)
    col.decks.select(other)
    for ease in (4, 4, 1):
        card = col.sched.getCard()
        if card is None:
            break
        col.sched.answerCard(card, ease)

    filtered = col.decks.new_filtered("Gefiltert ⚡")
    fdeck = col.decks.get(filtered)
    fdeck["terms"] = [["tag:vokabeln", 50, 1], ["deck:Sprachen", 20, 6]]
    fdeck["resched"] = False
    fdeck["delays"] = [1.0, 10.0]
    fdeck["previewAgainSecs"] = 30
    fdeck["previewHardSecs"] = 300
    fdeck["previewGoodSecs"] = 0
    col.decks.save(fdeck)
    col.sched.rebuild_filtered_deck(filtered)

    col.remove_notes([notes[0].id, notes[5].id])
    col.decks.remove([col.decks.id("Temporary")])
    col.set_config("customKey", {"list": [1, 2.5, "ü"], "none": None})
    col.set_config("anotherKey", 12345678901234)
    col.tags.set_collapsed("lang", True) if hasattr(col.tags, "set_collapsed") else None
    col.close()


@pytest.fixture(scope="session")
def rich18(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("rich") / "collection.anki2")
    build_rich_collection(path)
    conn = ankisync.connect_collection(path)
    try:
        assert conn.execute("SELECT ver FROM col").fetchone()[0] == 18
    finally:
        conn.close()
    return path


@pytest.fixture()
def copy18(rich18, tmp_path):
    path = str(tmp_path / "edge18.anki2")
    shutil.copy(rich18, path)
    return path


# --- the downgrade against the oracle ---


def test_rich_collection_downgrades_like_official(rich18, tmp_path):
    result = compare_downgrades(rich18, tmp_path)
    decks = result["json"]["decks"]
    assert any(d["dyn"] == 1 for d in decks.values())
    assert any(d["name"] == "Sprachen::日本語::Kanji ✍" for d in decks.values())
    assert len(result["json"]["dconf"]) == 3
    assert result["tables"]["revlog"]
    assert result["tables"]["graves"]
    assert "customKey" in result["json"]["conf"]


def test_new_server_collection_downgrades_like_official(tmp_path):
    src = str(tmp_path / "server.anki2")
    backend = RustBackend(server=True)
    backend.open_collection(collection_path=src, media_folder_path=src + ".m",
                            media_db_path=src + ".mdb")
    backend.close_collection(downgrade_to_schema11=False)
    compare_downgrades(src, tmp_path)


NOTETYPE_EDGE_BLOBS = [
    pv(1, 7) + pv(2, 70001) + pv(4, (1 << 64) - 5) + pv(9, 99) + pv(10, 0),
    pv(1, 1) + pl(8, pv(1, 65537) + pv(2, 9) + pv(3, 4) + pl(3, varint(70000) + varint(2)))
    + pl(8, pv(2, 2)) + pl(255, '{"id": 5, "css": "x", "extra": [1], "vers": []}'),
    pl(3, "css") + pl(3, "later css wins") + pl(255, "not json"),
    pl(255, "[1, 2]") + pv(10, (1 << 64) - 1),
    pl(255, b"\xff\xfe"),
    pl(255, '{"x": "\\ud800", "y": 1}'),
    pl(255, '{"x": "\\ud83d\\ude00", "big": 1e400}'),
    pl(255, '{"x": "\\ud83d\\ude00", "n": NaN}'),
    pl(255, '{"pair": "\\ud83d\\ude00", "dup": 1, "dup": 2}'),
    pv(99, 5) + pl(100, b"skip") + key(101, 1) + b"12345678" + key(102, 5) + b"1234",
]


@pytest.mark.parametrize("blob", NOTETYPE_EDGE_BLOBS)
def test_notetype_edge_blobs(copy18, tmp_path, blob):
    set_blob(copy18, "UPDATE notetypes SET config = ? WHERE name = 'Basic'", (blob,))
    compare_downgrades(copy18, tmp_path)


FIELD_EDGE_BLOBS = [
    pv(4, 70000) + pv(9, (1 << 64) - 2) + pv(10, 0) + pv(11, 1) + pv(1, 2),
    pv(10, 4000000000) + pl(255, '{"name": "no", "media": [], "ord": 9}'),
    b"",
]


TEMPLATE_EDGE_BLOBS = [
    pv(5, (1 << 64) - 3) + pv(7, 300) + pv(8, 0),
    pv(5, 12345) + pl(255, '{"qfmt": "no", "keep": 1.5}') + pl(6, "Courier"),
]


@pytest.mark.parametrize("blob", FIELD_EDGE_BLOBS)
def test_field_edge_blobs(copy18, tmp_path, blob):
    set_blob(copy18, "UPDATE fields SET config = ? WHERE ord = 0", (blob,))
    compare_downgrades(copy18, tmp_path)


@pytest.mark.parametrize("blob", TEMPLATE_EDGE_BLOBS)
def test_template_edge_blobs(copy18, tmp_path, blob):
    set_blob(copy18, "UPDATE templates SET config = ? WHERE ord = 0", (blob,))
    compare_downgrades(copy18, tmp_path)


DAY_LIMIT = pv(1, 4000000000) + pv(2, 3000000000)


DECK_EDGE_BLOBS = [
    # (common, kind)
    (pv(1, 1) + pv(3, 4000000000) + pv(4, (1 << 64) - 3) + pv(7, 123456789),
     pl(1, pv(1, 1) + pv(2, 4000000000) + pv(3, 3) + pv(6, 0) + pl(8, b"")
        + pl(9, DAY_LIMIT) + pf(10, 0.7))),
    (pl(255, '{"md": true, "conf": 99, "extra": "x", "terms": 1}'),
     pl(1, pv(1, 1) + pv(5, 1) + pf(10, float("nan")))),
    (b"", pl(1, pv(1, 1) + pf(10, 0.85) + pv(7, 4000000000))),
    (pl(255, '{"md": "from other"}'), pl(1, pv(1, 1) + pv(5, 1))),
    (pl(255, '{"md": "from other"}'), pl(1, pv(1, 1))),
    (b"", pl(1, pv(1, 1) + pf(10, -3.0))),
    (b"", pl(1, pv(1, 1) + pf(10, 1e30))),
    (b"", pl(2, b"") + pl(1, pv(1, 1) + pl(4, "desc"))),
    (b"", pl(1, pv(1, 1)) + pl(2, pv(1, 1))),
    (pl(255, '{"resched": 5, "x": 1}'),
     pl(2, pv(1, 1) + pl(2, pl(1, "is:due") + pv(2, 4000000000) + pv(3, 99))
        + packed_floats(3, [1.0, float("nan"), float("inf")]) + pf(3, 0.1)
        + pv(4, 5) + pv(5, 6) + pv(6, 7) + pv(7, 8))),
    (b"", pl(1, pv(1, 5)) + pl(1, pv(4, 5) if False else pl(4, "merged"))),
]


@pytest.mark.parametrize("common,kind", DECK_EDGE_BLOBS)
def test_deck_edge_blobs(copy18, tmp_path, common, kind):
    set_blob(copy18, "UPDATE decks SET common = ?, kind = ? WHERE name = 'Default'",
             (common, kind))
    compare_downgrades(copy18, tmp_path)


DECK_CONFIG_EDGE_BLOBS = [
    b"",
    packed_floats(1, [1.0, float("nan")]) + pf(1, 2.0) + packed_floats(2, [])
    + pv(9, 10000) + pv(10, 0) + pf(11, 1.31) + pf(12, float("nan"))
    + pf(13, 1.3) + pf(14, 1.0) + pf(15, 0.5) + pv(16, 36501) + pv(17, 36500)
    + pv(18, 0) + pv(19, 40000) + pv(20, 1) + pv(21, 7) + pv(22, 10000)
    + pv(23, 1) + pv(24, 9999) + pv(25, 1) + pv(26, 1) + pv(30, 99)
    + pv(31, (1 << 64) - 1) + pv(32, 4000000000) + pv(36, 2) + pf(37, 0.7)
    + pf(40, 0.97) + pf(41, float("inf")) + pf(42, 1e-7) + pv(43, 9) + pv(44, 1),
    pf(11, 5.0) + pf(37, 0.99) + pf(40, 0.6999) + pv(43, 4) + pv(20, 5)
    + pl(255, '{"new": {"perDay": 5, "x": 1}, "rev": 3, "lapse": {"mult": 2,'
              ' "y": [2]}, "maxTaken": 1, "z": true}'),
    pf(11, 1.3099) + pl(255, '{"new": [], "top": 1}') + pf(37, 0.7 * 0.9999),
    pl(255, "[]") + packed_floats(4, [1.5e-45, 3.4028234e38, -0.0]),
    pv(99, 1) + pv(7, 3) + pv(8, 4) + pv(39, 5),
]


@pytest.mark.parametrize("blob", DECK_CONFIG_EDGE_BLOBS)
def test_deck_config_edge_blobs(copy18, tmp_path, blob):
    set_blob(copy18, "UPDATE deck_config SET config = ? WHERE id = 1", (blob,))
    compare_downgrades(copy18, tmp_path)


# --- corrupt uploads ---


def our_downgrade_fails(path, tmp_path):
    dst = str(tmp_path / "bad.anki2")
    with pytest.raises(ankisync.CorruptCollection) as info:
        our_downgrade(path, dst)
    # Rolled back: still a schema-18 file.
    conn = ankisync.connect_collection(dst)
    try:
        assert conn.execute("SELECT ver FROM col").fetchone()[0] == 18
        assert conn.execute("SELECT count() FROM deck_config").fetchone()[0]
    finally:
        conn.close()
    return str(info.value)


def official_downgrade_fails(path, tmp_path):
    # The backend reports nothing: a failed downgrade leaves the file at 18.
    dst = str(tmp_path / "bad_official.anki2")
    official_downgrade(path, dst)
    conn = ankisync.connect_collection(dst)
    try:
        assert conn.execute("SELECT ver FROM col").fetchone()[0] == 18
    finally:
        conn.close()


CORRUPT_CASES = [
    ("UPDATE notetypes SET config = ? WHERE name = 'Basic'", (b"\x08\xff",)),
    ("UPDATE notetypes SET config = ? WHERE name = 'Basic'", (pl(3, b"\xc3\x28"),)),
    ("UPDATE fields SET config = ? WHERE ord = 0", (pl(3, b"ok") + pl(3, b"\xff"),)),
    ("UPDATE templates SET config = ? WHERE ord = 0", (b"\x0a\x05ab",)),
    ("UPDATE decks SET kind = ? WHERE id = 1", (b"",)),
    ("UPDATE decks SET kind = ? WHERE id = 1", (pv(3, 1),)),
    ("UPDATE decks SET common = ? WHERE id = 1", (key(1, 3) + key(1, 4),)),
    ("UPDATE deck_config SET config = ? WHERE id = 1", (pl(11, b"\x00\x00"),)),
    ("UPDATE deck_config SET config = ? WHERE id = 1", (pl(1, b"\x00\x00\x80"),)),
    ("UPDATE deck_config SET config = ? WHERE id = 1", (key(0, 0) + b"\x01",)),
    ("UPDATE deck_config SET config = ? WHERE id = 1", (b"\x48" + b"\xff" * 9 + b"\x02",)),
    ("UPDATE config SET val = ? WHERE KEY = 'curDeck'", (b"{bad json",)),
    ("UPDATE config SET val = ? WHERE KEY = 'curDeck'", (b"NaN",)),
    ("UPDATE config SET val = ? WHERE KEY = 'curDeck'", (b'"\\udc00"',)),
]


@pytest.mark.parametrize("sql,params", CORRUPT_CASES)
def test_corrupt_blobs_are_rejected(copy18, tmp_path, sql, params):
    set_blob(copy18, sql, params)
    assert our_downgrade_fails(copy18, tmp_path)
    official_downgrade_fails(copy18, tmp_path)


def test_proto_reader_basics():
    blob = pv(1, 150) + pl(2, "héllo") + pf(3, 0.9) + key(4, 1) + b"\x01" * 8
    fields = ankisync.proto_fields(blob)
    assert fields[1] == [(0, 150)]
    assert ankisync.pb_string(fields, 2) == "héllo"
    assert ankisync.f32_json(ankisync.pb_float(fields, 3)) == 0.9
    assert ankisync.pb_int64(ankisync.proto_fields(pv(1, (1 << 64) - 1)), 1) == -1
    assert ankisync.pb_int32(ankisync.proto_fields(pv(1, (1 << 64) - 2)), 1) == -2
    assert ankisync.pb_present(ankisync.proto_fields(pv(9, 0)), 9)
    assert not ankisync.pb_present(fields, 9)
    for bad in (b"\x08", b"\x08\x80", b"\x12\x05ab", b"\x1b", b"\x1d\x00"):
        with pytest.raises(ankisync.CorruptCollection):
            ankisync.proto_fields(bad)
    with pytest.raises(ankisync.CorruptCollection):
        ankisync.pb_string(ankisync.proto_fields(pl(1, b"\xe2\x82")), 1)
    with pytest.raises(ankisync.CorruptCollection):      # a string where a bool belongs
        ankisync.pb_bool(ankisync.proto_fields(pl(1, b"")), 1)


def test_f32_json():
    def single(x):
        return struct.unpack("<f", struct.pack("<f", x))[0]
    for value, text in ((0.9, "0.9"), (1.3, "1.3"), (10.0, "10.0"),
                        (0.005, "0.005"), (1e-7, "1e-07"), (2.5, "2.5"),
                        (3.4028234663852886e38, "3.4028235e+38")):
        assert repr(ankisync.f32_json(single(value))) == text
    assert ankisync.f32_json(float("nan")) is None
    assert ankisync.f32_json(float("-inf")) is None
    assert ankisync.f32_scaled_to_int(single(1.31), 1000.0, 0xFFFF) == 1310
    assert ankisync.f32_scaled_to_int(single(0.7), 100.0, 0xFFFFFFFF) == 70
    assert ankisync.f32_scaled_to_int(float("nan"), 100.0, 0xFFFFFFFF) == 0
    assert ankisync.f32_scaled_to_int(1e30, 1000.0, 0xFFFF) == 0xFFFF
    assert ankisync.dumps_compact({"a": [1, 0.5], "ü": None}) == '{"a":[1,0.5],"ü":null}'
    assert ankisync.dumps_compact([math.nan, {"x": -math.inf}, 1.5]) == \
        '[null,{"x":null},1.5]'


# --- check_schema11 ---


@pytest.fixture(scope="session")
def official11(rich18, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("official11") / "collection.anki2")
    official_downgrade(rich18, path)
    return path


def check_with(path, tmp_path, column, mutate):
    dst = str(tmp_path / "check.anki2")
    shutil.copy(path, dst)
    conn = ankisync.connect_collection(dst)
    try:
        value = json.loads(conn.execute("SELECT %s FROM col" % column).fetchone()[0])
        mutate(value)
        conn.execute("UPDATE col SET %s = ?" % column, (json.dumps(value),))
        ankisync.check_schema11(conn)
    finally:
        conn.close()
    return dst


def first(mapping, test=lambda v: True):
    return next(v for v in mapping.values() if test(v))


def normal(decks):
    return first(decks, lambda d: not d["dyn"])


def filtered(decks):
    return first(decks, lambda d: d["dyn"])


def test_check_schema11_accepts_official_output(official11, tmp_path):
    conn = ankisync.connect_collection(official11)
    try:
        ankisync.check_schema11(conn)
    finally:
        conn.close()
    optional_keys = [
        ("decks", lambda d: normal(d).pop("desc")),
        ("decks", lambda d: normal(d).pop("browserCollapsed")),
        ("decks", lambda d: normal(d).update(dyn=False)),
        ("dconf", lambda d: first(d).pop("replayq")),
        ("dconf", lambda d: first(d)["new"].pop("initialFactor")),
        ("models", lambda m: first(m)["tmpls"][0].pop("afmt")),
        ("models", lambda m: first(m).pop("req")),
        ("models", lambda m: first(m)["flds"][0].update(rtl=1)),
    ]
    for column, mutate in optional_keys:
        Collection(check_with(official11, tmp_path, column, mutate)).close()


CHECK_FAILURES = [
    ("decks", lambda d: normal(d).pop("collapsed")),
    ("decks", lambda d: normal(d).update(collapsed=1)),
    ("decks", lambda d: normal(d).update(desc=None)),
    ("decks", lambda d: normal(d).pop("dyn")),
    ("decks", lambda d: normal(d).pop("conf")),
    ("decks", lambda d: normal(d).pop("lrnToday")),
    ("decks", lambda d: normal(d).pop("name")),
    ("decks", lambda d: filtered(d).pop("terms")),
    ("decks", lambda d: filtered(d).update(terms=[["x", 1]])),
    ("decks", lambda d: filtered(d).pop("resched")),
    ("dconf", lambda d: first(d).pop("maxTaken")),
    ("dconf", lambda d: first(d).pop("new")),
    ("dconf", lambda d: first(d).pop("mod")),
    ("models", lambda m: first(m).update(type=2)),
    ("models", lambda m: first(m).pop("did")),
    ("models", lambda m: first(m).pop("css")),
    ("models", lambda m: first(m).pop("tmpls")),
    ("models", lambda m: first(m)["flds"][0].pop("font")),
    ("models", lambda m: first(m)["flds"][0].pop("size")),
    ("models", lambda m: first(m)["tmpls"][0].pop("qfmt")),
    ("tags", lambda t: t.update(bad="1")),
]


@pytest.mark.parametrize("column,mutate", CHECK_FAILURES)
def test_check_schema11_rejects(official11, tmp_path, column, mutate):
    with pytest.raises(ankisync.CorruptCollection):
        check_with(official11, tmp_path, column, mutate)
    # ...and the official upgrade refuses the same file.
    dst = str(tmp_path / "check.anki2")
    with pytest.raises(Exception):
        Collection(dst).close()


@pytest.mark.parametrize("column,text", [("conf", ""), ("decks", "[]"),
                                         ("tags", "{bad")])
def test_check_schema11_rejects_non_objects(official11, tmp_path, column, text):
    dst = str(tmp_path / "check.anki2")
    shutil.copy(official11, dst)
    conn = ankisync.connect_collection(dst)
    try:
        conn.execute("UPDATE col SET %s = ?" % column, (text,))
        with pytest.raises(ankisync.CorruptCollection):
            ankisync.check_schema11(conn)
    finally:
        conn.close()


# --- fuzzed: the protobuf readers ---

def protobuf_records(blob):
    """Every record of `blob` as the protobuf library reads it: (number, wire, value),
    fixed-size values as their bytes, as proto_records gives them."""
    message = generic_pb2.Empty()
    message.ParseFromString(blob)
    sizes = {ankisync.WIRE_FIXED64: 8, ankisync.WIRE_FIXED32: 4}
    return [(field.field_number, field.wire_type,
             field.data.to_bytes(sizes[field.wire_type], "little")
             if field.wire_type in sizes else field.data)
            for field in UnknownFieldSet(message)]


def encode_varint(value):
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


protobuf_record = st.one_of(
    st.tuples(st.integers(1, ankisync.MAX_FIELD_NUMBER), st.just(ankisync.WIRE_VARINT),
              st.integers(0, ankisync.U64_MASK)),
    st.tuples(st.integers(1, ankisync.MAX_FIELD_NUMBER), st.just(ankisync.WIRE_FIXED64),
              st.binary(min_size=8, max_size=8)),
    st.tuples(st.integers(1, ankisync.MAX_FIELD_NUMBER), st.just(ankisync.WIRE_LEN),
              st.binary(max_size=40)),
    st.tuples(st.integers(1, ankisync.MAX_FIELD_NUMBER), st.just(ankisync.WIRE_FIXED32),
              st.binary(min_size=4, max_size=4)))


def encode_records(records):
    out = bytearray()
    for number, wire, value in records:
        out += encode_varint(number << 3 | wire)
        if wire == ankisync.WIRE_VARINT:
            out += encode_varint(value)
        elif wire == ankisync.WIRE_LEN:
            out += encode_varint(len(value)) + value
        else:
            out += value
    return bytes(out)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(records=st.lists(protobuf_record, max_size=8))
def test_protobuf_records_read_back_as_written(records):
    """Any well-formed message reads back record for record, as the protobuf library
    reads it too."""
    blob = encode_records(records)
    assert ankisync.proto_records(blob) == records == protobuf_records(blob)


@st.composite
def damaged_messages(draw):
    """A well-formed message with a few bytes put in somewhere, or cut off."""
    blob = encode_records(draw(st.lists(protobuf_record, max_size=4)))
    at = draw(st.integers(0, len(blob)))
    if draw(st.booleans()):
        return blob[:at]
    return blob[:at] + draw(st.binary(min_size=1, max_size=3)) + blob[at:]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(blob=st.one_of(st.binary(max_size=60), damaged_messages()))
def test_protobuf_random_bytes_refused_with_corrupt_collection_only(blob):
    """Random and damaged messages: CorruptCollection (what the schema-18 upload and
    the .colpkg readers catch) or records the protobuf library reads alike. The library
    is more lenient only with groups and over-long varints, which prost refuses."""
    try:
        records = ankisync.proto_records(blob)
    except ankisync.CorruptCollection:
        return
    assert records == protobuf_records(blob)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(buf=st.binary(max_size=14), pos=st.integers(0, 14))
def test_read_varint_agrees_with_the_protobuf_library(buf, pos):
    """read_varint gives the protobuf library's value and position, or CorruptCollection:
    for a truncated varint, or a tenth byte carrying more than bit 63 (prost's rule)."""
    try:
        value, end = ankisync.read_varint(buf, pos)
    except ankisync.CorruptCollection:
        try:
            _, end = protobuf_decoder._DecodeVarint(buf, pos)
        except (IndexError, DecodeError):
            return                  # the library refuses it too
        assert end - pos == ankisync.VARINT_MAX_BYTES and buf[end - 1] > 1
        return
    assert (value, end) == protobuf_decoder._DecodeVarint(buf, pos)


# Records at the field numbers the converters read, of any wire type, with values that
# are valid messages, bad UTF-8, JSON or not.
converter_value = st.one_of(st.binary(max_size=12), st.just(b"\xff\xfe"),
                            st.lists(protobuf_record.filter(lambda r: r[0] < 50),
                                     max_size=3).map(encode_records),
                            st.sampled_from([b"{}", b'{"a": 1, "new": {"x": 2}}', b"[1]",
                                             b'{"a": NaN}', b"[" * 200 + b"]" * 200]))
converter_message = st.lists(st.one_of(
    st.tuples(st.sampled_from(list(range(1, 47)) + [255]), st.just(ankisync.WIRE_LEN),
              converter_value),
    protobuf_record.map(lambda r: (r[0] % 47 + 1, r[1], r[2]))), max_size=10).map(
        encode_records)


@settings(max_examples=250, deadline=None, derandomize=True)
@given(blob=converter_message, other=converter_message)
def test_schema18_converters_raise_only_corrupt_collection(blob, other):
    """The note type, field, template, deck and deck config readers on any message:
    a legacy object that JSON can hold, or CorruptCollection, nothing else."""
    calls = [
        lambda: ankisync.notetype_to_legacy((1, "n", 0, 0, blob), [], []),
        lambda: ankisync.field_to_legacy(0, "f", blob),
        lambda: ankisync.template_to_legacy(0, "t", blob),
        lambda: ankisync.deck_to_legacy((1, "d", 0, 0, blob, other)),
        lambda: ankisync.deck_config_to_legacy((1, "c", 0, 0, blob)),
    ]
    for call in calls:
        try:
            legacy = call()
        except ankisync.CorruptCollection:
            continue
        json.loads(ankisync.dumps_compact(legacy))


# --- Appendix C. A new collection ------------------------------------------------------


def official_new_collection(path):
    backend = RustBackend(server=True)
    backend.open_collection(collection_path=path, media_folder_path=path + ".m",
                            media_db_path=path + ".mdb")
    backend.close_collection(downgrade_to_schema11=True)


def strip_ids(models):
    """Note types keyed by name, without their time- and random-based ids."""
    result = {}
    for notetype in models.values():
        notetype = json.loads(json.dumps(notetype))
        notetype.pop("id")
        for item in notetype["flds"] + notetype["tmpls"]:
            assert isinstance(item.pop("id"), int)
        result[notetype["name"]] = notetype
    return result


def test_create_collection_matches_official(tmp_path):
    ours, official = str(tmp_path / "ours.anki2"), str(tmp_path / "official.anki2")
    before = int(time.time() * 1000)
    ankisync.create_collection(ours)
    official_new_collection(official)
    a, b = db_snapshot(ours), db_snapshot(official)
    assert os.listdir(str(tmp_path)).count("ours.anki2") == 1
    assert not [n for n in os.listdir(str(tmp_path)) if n.endswith(".tmp")]

    assert a["col"][0][1] == b["col"][0][1]  # crt: 04:00 local
    assert before <= a["col"][0][3] <= int(time.time() * 1000)  # scm
    assert a["col"][0][:3] + a["col"][0][4:] == b["col"][0][:3] + b["col"][0][4:]
    for column in ("decks", "dconf", "tags"):
        assert a["json"][column] == b["json"][column]
    conf_a, conf_b = dict(a["json"]["conf"]), dict(b["json"]["conf"])
    basic = [int(k) for k, m in a["json"]["models"].items() if m["name"] == "Basic"]
    assert conf_a.pop("curModel") == basic[0]
    conf_b.pop("curModel")
    assert conf_a == conf_b
    assert strip_ids(a["json"]["models"]) == strip_ids(b["json"]["models"])
    ids = sorted(int(k) for k in a["json"]["models"])
    assert ids == list(range(ids[0], ids[0] + 6)) and ids[0] == basic[0]
    for table in a["tables"].values():
        assert table == []
    assert [m for m in a["master"] if not m[1].startswith("sqlite_stat")] == \
        [m for m in b["master"] if not m[1].startswith("sqlite_stat")]
    assert a["journal"] == "delete" and a["header"] == b"\x01\x01"
    conn = ankisync.connect_collection(ours)
    try:
        assert conn.execute("PRAGMA page_size").fetchone()[0] == 4096
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        ankisync.check_schema11(conn)
    finally:
        conn.close()


def test_client_can_use_created_collection(tmp_path):
    path = str(tmp_path / "collection.anki2")
    ankisync.create_collection(path)
    col = Collection(path)
    try:
        for notetype in col.models.all():
            note = col.new_note(notetype)
            if notetype["name"] == "Image Occlusion":
                note["Occlusion"] = "{{c1::image-occlusion:rect:left=.1:top=.1:width=.2:height=.2}}"
                note["Image"] = '<img src="x.png">'
            elif notetype["type"] == 1:
                note["Text"] = "{{c1::cloze}} text"
            else:
                note["Front"] = notetype["name"]
                note["Back"] = "back"
                if "Add Reverse" in note:
                    note["Add Reverse"] = "y"
            col.add_note(note, 1)
        assert col.card_count() >= 8
        col.decks.select(1)
        card = col.sched.getCard()
        col.sched.answerCard(card, 3)
        assert col.db.scalar("SELECT count() FROM revlog") == 1
        assert not col.fix_integrity()[1] or True
    finally:
        col.close()


def test_create_collection_keeps_folder_clean_on_failure(tmp_path, monkeypatch):
    path = str(tmp_path / "collection.anki2")

    def explode(*args):
        raise OSError("disk full")
    monkeypatch.setattr(ankisync, "fsync_path", explode)
    with pytest.raises(OSError):
        ankisync.create_collection(path)
    assert os.listdir(str(tmp_path)) == []


# --- Appendix D. Media zips, against zipfile -------------------------------------------


class Unseekable(io.RawIOBase):
    """A stream zipfile cannot go back in, as a network stream is."""

    def __init__(self):
        self.data = bytearray()

    def writable(self):
        return True

    def write(self, data):
        self.data += data
        return len(data)


def java_style_zip(files):
    """Deflated entries whose sizes and CRC follow the data (general purpose bit 3), as
    streaming writers such as AnkiDroid's ZipOutputStream make them."""
    out = Unseekable()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files:
            with archive.open(name, "w") as f:
                f.write(data)
    made = bytes(out.data)
    assert struct.unpack_from("<H", made, 6)[0] & 0x08          # the sizes follow the data
    return made


def test_the_zip_reader_reads_stored_deflated_and_streamed_entries_as_zipfile_does():
    files = [("0", b"plain " * 1000), ("1", os.urandom(3000)), ("_meta", b"[]"),
             ("\u00e9t\u00e9.txt", b"summer")]
    for made in (media_zip(files[:2]), media_zip(files, meta=[]), media_zip(
            files, compression=zipfile.ZIP_DEFLATED), java_style_zip(files)):
        reader = ankisync.ZipReader(io.BytesIO(made))
        with zipfile.ZipFile(io.BytesIO(made)) as archive:
            assert sorted(reader.entries) == sorted(archive.namelist())
            for name, entry in reader.entries.items():
                assert reader.read(entry) == archive.read(name)


def lie_about(made, name, field, value):
    """The zip with one entry's central-directory CRC or size changed."""
    data = bytearray(made)
    at = data.find(b"PK\x01\x02")
    while at >= 0:
        fields = list(ankisync.ZIP_CENTRAL.unpack_from(data, at))
        start = at + ankisync.ZIP_CENTRAL.size
        if bytes(data[start:start + fields[10]]).decode() == name:
            fields[{"crc": 7, "size": 9}[field]] = value
            data[at:start] = ankisync.ZIP_CENTRAL.pack(*fields)
            return bytes(data)
        at = data.find(b"PK\x01\x02", at + 1)
    raise AssertionError("no entry %s" % name)


def test_the_zip_reader_refuses_what_lies_and_what_media_never_are():
    content = b"x" * 5000
    stored = media_zip([("a.png", content)])
    deflated = media_zip([("a.png", content)], compression=zipfile.ZIP_DEFLATED)
    for made, why in ((lie_about(stored, "0", "crc", 1), "CRC"),
                      (lie_about(deflated, "0", "crc", 1), "CRC"),
                      (lie_about(deflated, "0", "size", 100), "more than its header"),
                      (lie_about(stored, "0", "size", 6000), "less than its header")):
        reader = ankisync.ZipReader(io.BytesIO(made))
        with pytest.raises(ankisync.ZipError, match=why):
            reader.read(reader.entries["0"])
    with pytest.raises(ankisync.ZipError, match="zip64"):
        ankisync.ZipReader(io.BytesIO(lie_about(stored, "0", "size", 0xFFFFFFFF)))
    for cut in (3000, 40, 0):
        with pytest.raises(ankisync.ZipError, match="cut short|not a zip"):
            ankisync.ZipReader(io.BytesIO(stored[:cut]))
    with pytest.raises(ankisync.ZipError):
        ankisync.ZipReader(io.BytesIO(b"PK\x05\x06" + b"\xff" * 18))


def test_the_zip_writer_makes_zips_zipfile_reads_and_checks():
    out = io.BytesIO()
    writer = ankisync.ZipWriter(out)
    writer.add("0", b"small")
    writer.add_file("1", io.BytesIO(os.urandom(3 * 65536 + 7)))
    writer.add("_meta", b'{"0":"a.png","1":"b.mp3"}')
    writer.close()
    with zipfile.ZipFile(io.BytesIO(out.getvalue())) as archive:
        assert archive.testzip() is None                 # every CRC right
        assert archive.namelist() == ["0", "1", "_meta"]
        assert archive.read("0") == b"small" and archive.getinfo("1").file_size == 3 * 65536 + 7
    reader = ankisync.ZipReader(io.BytesIO(out.getvalue()))
    assert reader.read(reader.entries["_meta"]) == b'{"0":"a.png","1":"b.mp3"}'


# --- fuzzed: against zipfile, random and damaged zips ---

# What MediaSync catches around ZipReader: its own ZipError, and zlib's for a damaged
# deflate stream.
ZIP_REFUSALS = (ankisync.ZipError, zlib.error)
zip_names = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00/"),
                    min_size=1, max_size=24)




@st.composite
def python_zips(draw):
    """A zip as Python's zipfile writes it: stored and deflated entries, some with zip64
    extra fields, some after a data descriptor, maybe an archive comment."""
    unseekable = draw(st.booleans()) and draw(st.booleans())
    target = Unseekable() if unseekable else io.BytesIO()
    with zipfile.ZipFile(target, "w") as archive:
        for name, data in draw(st.dictionaries(zip_names, compressible, max_size=6)).items():
            info = zipfile.ZipInfo(name)
            info.compress_type = draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
            with archive.open(info, "w", force_zip64=draw(st.booleans())) as entry:
                entry.write(data)
        if draw(st.booleans()):
            archive.comment = draw(st.binary(max_size=60))
    return bytes(target.data) if unseekable else target.getvalue()


def read_with_zipfile(data):
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {info.filename: archive.read(info.filename) for info in archive.infolist()}


@settings(max_examples=80, deadline=None, derandomize=True)
@given(data=python_zips())
def test_zips_of_python_zipfile_read_alike(data):
    """Every entry Python's zipfile writes, ZipReader finds by the same name and reads
    to the same bytes."""
    reader = ankisync.ZipReader(io.BytesIO(data))
    expected = read_with_zipfile(data)
    assert sorted(reader.entries) == sorted(expected)
    for name, entry in reader.entries.items():
        assert reader.read(entry) == expected[name]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(files=st.lists(st.tuples(zip_names, compressible, st.booleans()), max_size=6,
                      unique_by=lambda file: file[0]))
def test_zips_of_zip_writer_read_alike_in_python_zipfile(files):
    """ZipWriter's zips (what downloadFiles sends) read in Python's zipfile as written,
    whether an entry came whole (add) or streamed from a file (add_file)."""
    out = io.BytesIO()
    writer = ankisync.ZipWriter(out)
    for name, data, streamed in files:
        if streamed:
            writer.add_file(name, io.BytesIO(data))
        else:
            writer.add(name, data)
    writer.close()
    with zipfile.ZipFile(io.BytesIO(out.getvalue())) as archive:
        assert archive.testzip() is None
        assert archive.namelist() == [name for name, _, _ in files]
        assert [archive.read(name) for name, _, _ in files] == [data for _, data, _ in files]
    reader = ankisync.ZipReader(io.BytesIO(out.getvalue()))
    assert {name: reader.read(entry) for name, entry in reader.entries.items()} == \
        {name: data for name, data, _ in files}


def check_zip_reader(data):
    """ZipReader on any bytes: it refuses with ZIP_REFUSALS or reads entries, never
    writing more of one than its header declares; what it reads, zipfile reads alike."""
    try:
        reader = ankisync.ZipReader(io.BytesIO(data))
    except ankisync.ZipError:
        return
    for name, entry in reader.entries.items():
        parts, write = bounded_sink(entry.size)
        try:
            reader.copy(entry, write)
        except ZIP_REFUSALS:
            continue
        content = b"".join(parts)
        assert len(content) == entry.size and zlib.crc32(content) == entry.crc
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                expected = archive.read(name)
        except Exception:
            continue                # zipfile refuses what ZipReader reads: no reference
        assert content == expected


@st.composite
def damaged_zips(draw):
    """A zipfile zip with bytes set, flipped, dropped or put in anywhere, or cut short."""
    return drawn_damage(draw, draw(python_zips()), ["set", "flip", "drop", "insert", "cut"],
                        draw(st.integers(1, 4)))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(data=st.one_of(st.binary(max_size=200), damaged_zips()))
def test_zip_reader_refuses_random_and_damaged_zips_only_with_zip_error(data):
    """Random bytes and damaged zips: ZipError or zlib.error (what MediaSync catches),
    no other exception, and never more bytes of an entry than it declares."""
    check_zip_reader(data)


def test_zip_writer_marks_a_name_beyond_ascii_as_utf8():
    """Found by the fuzzing above: ZipWriter wrote names as UTF-8 without setting bit 11,
    so zipfile (and ZipReader) read '\\x80' back as cp437's '┬Ç'."""
    out = io.BytesIO()
    writer = ankisync.ZipWriter(out)
    writer.add("\x80", b"")
    writer.add_file("café.jpg", io.BytesIO(b"jpeg"))
    writer.add("0", b"plain ascii")
    writer.close()
    with zipfile.ZipFile(io.BytesIO(out.getvalue())) as archive:
        assert archive.namelist() == ["\x80", "café.jpg", "0"]
        assert [info.flag_bits & ankisync.ZIP_UTF8 for info in archive.infolist()] == \
            [ankisync.ZIP_UTF8, ankisync.ZIP_UTF8, 0]
    assert sorted(ankisync.ZipReader(io.BytesIO(out.getvalue())).entries) == \
        ["0", "café.jpg", "\x80"]


def test_zip_reader_refuses_a_zip64_archive():
    """65,535 entries need zip64's end record, which media zips never use: ZipError."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for index in range(0xFFFF):
            archive.writestr(str(index), b"")
    with pytest.raises(ankisync.ZipError, match="zip64"):
        ankisync.ZipReader(io.BytesIO(out.getvalue()))


# --- Appendix E. A private certificate authority, against RFC 6979 ---------------------


def test_ecdsa_p256_signs_as_rfc_6979_a_2_5_says():
    """The signature is the pure-Python one: checked against the RFC's own vectors (P-256,
    SHA-256), nonce and all, so a slip in the curve or the nonce cannot hide."""
    key = 0xC9AFA9D845BA75166B5C215767B1D6934E50C3DB36E89B127B8A622B120F6721
    assert ankisync.public_point(key).hex().upper() == (
        "04" "60FED4BA255A9D31C961EB74C6356D68C049B8923B61FA6CE669622E60F29FB6"
        "7903FE1008B8BC99A41AE9E95628BC64F2F1B20C2D7E9F5177A3C294D4462299")
    vectors = {
        b"sample": ("A6E3C57DD01ABE90086538398355DD4C3B17AA873382B0F24D6129493D8AAD60",
                    "EFD48B2AACB6A8FD1140DD9CD45E81D69D2C877B56AAF991C34D0EA84EAF3716",
                    "F7CB1C942D657C41D436C7A1B6E29F65F3E900DBB9AFF4064DC4AB2F843ACDA8"),
        b"test": ("D16B6AE827F17175E040871A1C7EC3500192C4C92677336EC2537ACAEE0008E0",
                  "F1ABB023518351CD71D881567B1EA663ED3EFCF6C5132B354F28D3B0B7D38367",
                  "019F4113742A2B14BD25926B49C649155F267E60D3814B4C0CC84250E46F0083"),
    }
    for message, (k, r, s) in vectors.items():
        digest = hashlib.sha256(message).digest()
        assert ankisync.rfc6979_nonce(key, digest) == int(k, 16)
        assert ankisync.ecdsa_sign(key, message) == (int(r, 16), int(s, 16))


# --- restore points: "I pressed Upload by mistake" ----------------------------------------


def admin(server, *args, check=True):
    """An ankisync command on a server's data folder (a SyncServer, or the folder's
    path), from another process."""
    data = getattr(server, "base", server)
    done = run_ankisync(*args, env=dict(os.environ, SYNC_BASE=data), timeout=120)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def restore_points(server, user=USER):
    """[(id, why, notes)] as `backups` lists them, newest first."""
    return [(line.split()[0], line.split()[3], int(line.split()[4]))
            for line in admin(server, "backups", user).stdout.splitlines()
            if line[:8].isdigit()]


def note_count(device):
    return len(find_notes(device.col, ""))


def test_a_mistaken_upload_is_undone_by_a_restore_and_the_restore_by_another(server,
                                                                           make_device,
                                                                           tmp_path):
    """A laptop has 30 notes and media. A new phone with 5 notes of its own answers
    "Upload" in the full-sync dialog, and the laptop, unaware, deletes a picture. The
    server kept the laptop's collection; `restore` brings it and the picture back to a
    fresh device and to the laptop, and restoring again undoes the restore."""
    laptop = make_device("modern", "laptop")
    laptop.do("add_notes", deck="Lang::Deutsch", prefix="Wort", count=30)
    laptop.do("write_media", files=[["haus.jpg", 3000, 1], ["baum.png", 5000, 2],
                                    ["hund.mp3", 7000, 3]])
    first_upload(laptop)
    laptop.sync_media()

    phone = make_device("modern", "phone")
    phone.do("add_notes", deck="Default", prefix="phone", count=5)
    assert phone.sync() == "full_sync"
    phone.full_upload()                                     # the mistake
    laptop.do("delete_media", names=["baum.png"])
    laptop.sync_media()

    points = restore_points(server)
    assert [(why, notes) for _, why, notes in points] == [("upload", 30)]
    if server.kind == "ankisync":       # the point as a package: its notes, and the picture
        package = str(tmp_path / "point.colpkg")                # deleted after it
        admin(server, "export", USER, package, "--point", points[0][0])
        imported = imported_package(package, str(tmp_path / "imported"))
        assert len(find_notes(imported, "")) == 30
        assert sorted(media_files(imported)) == ["baum.png", "haus.jpg", "hund.mp3"]
        imported.close()
    admin(server, "restore", USER, points[0][0])

    fresh = make_device("modern", "fresh")
    join_by_download(fresh)
    fresh.sync_media()
    assert note_count(fresh) == 30
    assert sorted(fresh.media_files()) == ["baum.png", "haus.jpg", "hund.mp3"]
    assert laptop.sync() == "full_sync"
    laptop.full_download()
    assert note_count(laptop) == 30

    undo = [p for p in restore_points(server) if p[1] == "restore"]
    assert [(why, notes) for _, why, notes in undo] == [("restore", 5)]
    admin(server, "restore", USER, undo[0][0])
    again = make_device("modern", "again")
    join_by_download(again)
    assert note_count(again) == 5


@pytest.mark.legacy
@pytest.mark.parametrize("command", ["restore", "import"])
def test_after_a_restore_or_import_each_device_is_told_to_download_until_it_has(
        server, make_device, tmp_path, command):
    """A laptop, a phone (Anki 26.9) and an old laptop (2.1.54) share 4 notes; the admin
    restores the point of them, or imports an export of them, after the laptop added 2.
    Each device's next sync, after a server restart too, says what happened and to
    choose Download; each downloads, and its syncs after that say nothing."""
    laptop, phone, nids = set_up_pair(make_device, "modern", "modern")
    old = make_device("legacy", "old")
    join_by_download(old)
    package = str(tmp_path / "vier.colpkg")
    admin(server, "backup", USER)
    admin(server, "export", USER, package)
    point = restore_points(server)[0][0]
    laptop.do("add_notes", deck="Default", prefix="danach", count=2)
    sync_normally(laptop)
    admin(server, *(("restore", USER, point) if command == "restore"
                     else ("import", USER, package)))
    server.restart()                    # what the devices are told outlives a restart

    said = ("The collection was restored on the server (restore point %s, " % point
            if command == "restore" else
            "A collection was imported on the server (vier.colpkg, ")
    devices = (laptop, phone, old)
    for device in devices:
        outcome, message = device.sync_told()
        assert outcome == "full_sync", device
        assert message.startswith(said), (device, message)
        assert message.endswith("choose Download in the next dialog; Upload would undo "
                                "the %s." % command), (device, message)
    for device in devices:
        device.full_download()
        assert len(device.snapshot()["notes"]) == len(nids)
    for device in devices:
        outcome, message = device.sync_told()
        assert outcome in ("normal_sync", "no_changes") and message == "", (device, message)


def test_after_a_restore_a_full_upload_ends_the_download_advice(server, make_device):
    """After a restore the phone answers Upload, on purpose: the collection is the
    phone's now, and the laptop's full sync comes without the restore's advice."""
    laptop, phone, _ = set_up_pair(make_device, "modern", "modern")
    admin(server, "backup", USER)
    admin(server, "restore", USER, restore_points(server)[0][0])
    assert "restored on the server" in phone.sync_told()[1]
    phone.full_upload()
    assert laptop.sync_told() == ("full_sync", "")


def test_the_days_first_normal_sync_leaves_one_daily_restore_point(server, make_device):
    """A laptop uploads 12 notes, adds 3 and syncs: the server keeps the day's restore
    point of the 15 notes, on a thread of its own once the sync has been answered. The
    phone's sync later that day makes no second one."""
    laptop = make_device("modern", "laptop")
    laptop.do("add_notes", deck="Default", prefix="Wort", count=12)
    first_upload(laptop)
    assert restore_points(server) == []         # the empty collection it replaced: nothing
    laptop.do("add_notes", deck="Default", prefix="neu", count=3)
    assert laptop.sync() == "normal_sync"
    daily = wait_until(lambda: [p for p in restore_points(server) if p[1] == "daily"], 10,
                       "the daily restore point")
    assert [notes for _, _, notes in daily] == [15]
    phone = make_device("modern", "phone")
    join_by_download(phone)
    phone.do("add_notes", deck="Default", prefix="phone", count=2)
    assert phone.sync() == "normal_sync"
    assert laptop.sync() == "normal_sync"
    time.sleep(0.5)                             # time enough for a point that should not come
    assert [p[1] for p in restore_points(server)].count("daily") == 1


def test_retention_keeps_the_last_uploads_days_and_weeks_within_the_budget(tmp_path):
    config = ankisync.Config()
    points = ankisync.RestorePoints(str(tmp_path), config)
    day = 86400
    now = time.time()
    made = [{"id": "u%d" % i, "time": now - i * 3600, "why": "upload", "size": MIB}
            for i in range(15)]
    made += [{"id": "d%d" % i, "time": now - i * day - 60, "why": "daily", "size": MIB}
             for i in range(60)]
    made.sort(key=lambda p: p["time"], reverse=True)
    kept = [p["id"] for p in points.retained(made)]
    assert [i for i in kept if i.startswith("u")] == ["u%d" % i for i in range(10)]
    daily = [int(i[1:]) for i in kept if i.startswith("d")]
    assert daily[:7] == list(range(7))                    # the last seven days
    assert 7 <= len(daily) <= 7 + 4 and max(daily) < 35   # and four weeks back, no more
    config.backup_budget_mb = 5
    kept = points.retained(made)
    assert sum(p["size"] for p in kept) <= 5 * MIB and kept[0]["id"] == made[0]["id"]
    config.backup_budget_mb = 0
    assert [p["id"] for p in points.retained(made)] == [made[0]["id"]]   # the newest stays


def test_a_restore_waits_for_a_sync_of_that_user_and_leaves_other_users_alone(server,
                                                                          make_device):
    server.add_user("bea", "pw2")
    laptop = make_device("modern", "laptop")
    laptop.do("add_notes", deck="Default", prefix="mine", count=4)
    first_upload(laptop)
    admin(server, "backup", USER)
    other = make_device("modern", "bea-laptop", user="bea", password="pw2")
    other.do("add_notes", deck="Default", prefix="hers", count=3)
    first_upload(other)
    point = restore_points(server)[0][0]
    restored = []
    worker = threading.Thread(target=lambda: restored.append(admin(server, "restore", USER,
                                                                   point)))
    worker.start()
    for round_ in range(3):                     # bea syncs on while alice's collection moves
        other.do("add_notes", deck="Default", prefix="more %d" % round_, count=1)
        assert other.sync() == "normal_sync"
    worker.join(120)
    assert restored and restored[0].returncode == 0
    assert laptop.sync() == "full_sync"
    fresh = make_device("modern", "bea-phone", user="bea", password="pw2")
    join_by_download(fresh)
    assert note_count(fresh) == 6


@pytest.mark.parametrize("command", ["backup", "restore"])
def test_a_backup_or_restore_waits_for_the_sync_in_progress_and_the_sync_succeeds(
        server, make_device, command):
    """A phone is in the middle of a sync (between `start` and `finish`) when the admin
    runs a command on that user: the command waits for the sync to end, the phone's
    sync is answered as if no command ran, and the command then does its work."""
    laptop = make_device("modern", "laptop")
    laptop.do("add_notes", deck="Default", prefix="mine", count=4)
    first_upload(laptop)
    admin(server, "backup", USER)
    args = ["restore", USER, restore_points(server)[0][0]] if command == "restore" \
        else ["backup", USER]
    key = login(server)
    start_a_sync(server, key)
    changes = {"models": [], "decks": [[], []], "tags": ["phone"]}
    assert modern(server, "applyChanges", {"changes": changes}, key=key).status == 200
    waiting = subprocess.Popen(ankisync_command(*args), env=dict(os.environ, SYNC_BASE=server.base),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2)
        assert waiting.poll() is None, waiting.communicate()
        for method, payload in [("applyChunk", {"chunk": {"done": True}}), ("chunk", {}),
                                ("finish", {})]:
            answer = modern(server, method, payload, key=key)
            assert answer.status == 200, answer
        out, err = waiting.communicate(timeout=60)
    finally:
        waiting.kill()
    assert waiting.returncode == 0, out + err
    assert "%s is syncing: waiting for the sync to end" % USER in err
    assert laptop.sync() == ("full_sync" if command == "restore" else "normal_sync")
    if command == "backup":
        assert "phone" in laptop.col.tags.all()
    assert "Traceback" not in server.log()


def imported_package(package, folder):
    """The .colpkg imported as Anki's File > Import does, into a new profile folder: the
    collection, open."""
    target = os.path.join(folder, "collection.anki2")
    os.makedirs(folder)
    backend = RustBackend()
    backend.import_collection_package(col_path=target, backup_path=package,
                                      media_folder=target[:-6] + ".media",
                                      media_db=target[:-6] + ".media.db2")
    return Collection(target, backend=backend)


def assert_imports_as(package, folder, device):
    """The .colpkg, imported into a new profile, is the device's collection and media,
    whole."""
    imported = imported_package(package, folder)
    try:
        assert snapshot(imported) == device.snapshot()
        assert media_files(imported) == device.media_files()
    finally:
        imported.close()


def test_export_writes_a_package_anki_imports_with_notes_reviews_and_media(server,
                                                                         make_device,
                                                                         tmp_path):
    laptop = make_device("modern", "laptop")
    laptop.do("build_sample")
    laptop.do("review", deck="Lang::Deutsch", count=3)
    laptop.do("write_media", files=[["a.jpg", 2000, 5], ["b c.png", 4000, 6]])
    first_upload(laptop)
    laptop.sync_media()
    package = str(tmp_path / "alice.colpkg")
    admin(server, "export", USER, package)

    assert_imports_as(package, str(tmp_path / "imported"), laptop)

    # ... and back in, over a collection of one note: a restore point first.
    admin(server, "import", USER, package)
    assert [why for _, why, _ in restore_points(server)][0] == "import"
    fresh = make_device("modern", "fresh")
    join_by_download(fresh)
    fresh.sync_media()
    assert fresh.snapshot() == laptop.snapshot()
    assert fresh.media_files() == laptop.media_files()


def ankisyncd_folder(root, users):
    """A data folder laid out as ankisyncd 2.x keeps it: auth.db (sha256 of name,
    password and salt, then the salt) and collections/<name>/collection.anki2 with
    collection.media/ and collection.media.server.db."""
    os.makedirs(os.path.join(root, "collections"))
    auth = sqlite3.connect(os.path.join(root, "auth.db"))
    auth.execute("create table auth (username varchar primary key, hash varchar)")
    for name, password, collection, media in users:
        salt = os.urandom(8).hex()
        auth.execute("insert into auth values (?, ?)", (name, hashlib.sha256(
            (name + password + salt).encode()).hexdigest() + salt))
        folder = os.path.join(root, "collections", name)
        os.makedirs(os.path.join(folder, "collection.media"))
        shutil.copyfile(collection, os.path.join(folder, "collection.anki2"))
        db = sqlite3.connect(os.path.join(folder, "collection.media.server.db"))
        db.execute("create table media (fname text not null primary key, usn int not null, "
                   "csum text)")
        for usn, (file_name, data) in enumerate(sorted(media.items()), 1):
            with open(os.path.join(folder, "collection.media", file_name), "wb") as f:
                f.write(data)
            db.execute("insert into media values (?, ?, ?)",
                       (file_name, usn, hashlib.sha1(data).hexdigest()))
        db.commit()
        db.close()
    auth.commit()
    auth.close()


def test_users_of_ankisyncd_come_over_with_their_passwords_collections_and_media(
        server, make_device, tmp_path):
    laptop = make_device("modern", "laptop")
    laptop.do("build_sample")
    first_upload(laptop)
    stored = os.path.join(server.base, USER, "collection.anki2")      # schema 11, as theirs
    pictures = {"katze.jpg": media_content(7, 3000), "maus.png": media_content(8, 900)}
    old = str(tmp_path / "ankisyncd")
    ankisyncd_folder(old, [("carla", "alt-pw", stored, pictures),
                           ("dieter", "sein pw", stored, {})])
    done = admin(server, "import-ankisyncd", old)
    assert "2 users imported" in done.stdout

    device = make_device("modern", "carla-laptop", user="carla", password="alt-pw")
    join_by_download(device)
    device.sync_media()
    assert device.snapshot()["notes"] == laptop.snapshot()["notes"]
    assert sorted(device.media_files()) == ["katze.jpg", "maus.png"]
    with contextlib.closing(sqlite3.connect(os.path.join(server.base, "auth.db"))) as db:
        hashes = dict(db.execute("select name, hash from users"))
    assert hashes["carla"].startswith("$pbkdf2-sha256$")               # replaced at login
    assert hashes["dieter"].startswith("$ankisyncd-sha256$")           # not logged in yet
    assert modern(server, "hostKey", {"u": "dieter", "p": "wrong"}).status == 403
    assert modern(server, "hostKey", {"u": "dieter", "p": "sein pw"}).status == 200


@pytest.mark.parametrize("command", ["restore", "import"])
def test_a_restore_or_import_killed_at_any_moment_leaves_one_whole_collection(server, tmp_path,
                                                                               command):
    key = login(server)
    assert modern(server, "upload", collection_with_notes(tmp_path, 20000), key=key).status == 200
    admin(server, "backup", USER)
    package = str(tmp_path / "big.colpkg")
    admin(server, "export", USER, package)
    assert modern(server, "upload", collection_with_notes(tmp_path, 10), key=key).status == 200
    point = [p for p in restore_points(server) if p[1] == "manual"][0][0]
    path = os.path.join(server.base, USER, "collection.anki2")
    for delay in (0.05, 0.15, 0.3, 0.5, 0.8):
        proc = subprocess.Popen(ankisync_command(command, USER,
                                                 point if command == "restore" else package),
                                env=dict(os.environ, SYNC_BASE=server.base),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        with contextlib.closing(sqlite3.connect(path)) as db:
            assert db.execute("pragma quick_check").fetchall() == [("ok",)]
            assert db.execute("select count() from notes").fetchone()[0] in (10, 20000)
        assert modern(server, "meta", {"v": 11, "cv": "t"}, key=key).status == 200
    server.restart()
    leftovers = [name for _, _, files in os.walk(server.base) for name in files
                 if name.startswith(ankisync.TEMP_PREFIXES)]
    assert leftovers == []


def test_a_package_from_a_modern_anki_becomes_the_collection(server, make_device, tmp_path):
    """Anki 2.1.50+ exports in its newer layout (zstd, schema 18, a protobuf media list)."""
    laptop = make_device("modern", "laptop")
    laptop.do("build_sample")
    laptop.do("write_media", files=[["x.jpg", 2500, 9]])
    package = str(tmp_path / "modern.colpkg")
    laptop.col.export_collection_package(package, include_media=True, legacy=False)
    laptop.col.reopen()
    admin(server, "import", USER, package)
    fresh = make_device("modern", "fresh")
    join_by_download(fresh)
    fresh.sync_media()
    assert fresh.snapshot()["notes"] == laptop.snapshot()["notes"]
    assert fresh.media_files() == laptop.media_files()


# --- restore points that undo, quotas that count, imports that stay inside ---




def a_second_later(device):
    """Wait for the second after the media folder's last change: Anki rescans the folder
    only when its mtime, in whole seconds, has moved."""
    scanned = int(os.stat(device.media_folder()).st_mtime)
    wait_until(lambda: time.time() >= scanned + 1.05, timeout=5, every=0.01,
               what="the second after the media folder's last change")


def bytes_in(folder):
    return sum(os.path.getsize(os.path.join(top, name))
               for top, _, names in os.walk(folder) for name in names)


class ServerClock:
    """The clock of a server running in this process (server_in_this_process): `offset`
    seconds ahead of the machine's. Anki refuses to sync with a server 5 minutes off, so
    steps stay under that."""

    def __init__(self, monkeypatch):
        self.offset = 0
        shim = types.SimpleNamespace(**{n: getattr(time, n) for n in dir(time)
                                        if not n.startswith("__")})
        shim.time = lambda: time.time() + self.offset
        monkeypatch.setattr(ankisync, "time", shim)


def test_restoring_the_oldest_of_ten_restore_points_keeps_it_and_the_undo(server, make_device):
    """The laptop's 30 notes are kept when a phone answers Upload; the phone then uploads
    nine more times, so that point is the oldest of the ten kept. Restoring it brings the
    30 notes back (0.2.1 pruned it first, then failed with "No such file"), and both it
    and the point that undoes the restore are listed afterwards."""
    laptop = make_device("modern", "laptop")
    laptop.do("add_notes", deck="Default", prefix="Wort", count=30)
    first_upload(laptop)
    phone = make_device("modern", "phone")
    phone.do("add_notes", deck="Default", prefix="phone", count=5)
    assert phone.sync() == "full_sync"
    phone.full_upload()
    for round_ in range(9):
        phone.do("add_notes", deck="Default", prefix="again %d" % round_, count=1)
        phone.full_upload()
    points = restore_points(server)
    assert len(points) == 10 and points[-1][1:] == ("upload", 30)
    oldest = points[-1][0]

    admin(server, "restore", USER, oldest)
    after = restore_points(server)
    assert [(why, notes) for _, why, notes in after if why == "restore"] == [("restore", 14)]
    assert oldest in [point_id for point_id, _, _ in after]
    fresh = make_device("modern", "fresh")
    join_by_download(fresh)
    assert note_count(fresh) == 30


def test_a_restore_or_import_without_room_for_its_undo_is_refused_and_changes_nothing(
        small_disk, start_server, make_device, tmp_path):
    """A phone's mistaken upload replaced the laptop's 30 notes, and the disk is nearly
    full. `restore` and `import` would leave no point to undo them (0.2.1 went on with a
    warning): both are refused in one line saying what must be free and what is, and
    nothing changes. With room again the restore runs, and can be undone."""
    data = os.path.join(small_disk, "data")
    srv = start_server(env={"SYNC_BASE": data})
    laptop = make_device("modern", "laptop", on=srv)
    laptop.do("add_notes", deck="Default", prefix="Wort", count=30)
    first_upload(laptop)
    package = str(tmp_path / "laptop.colpkg")
    admin(data, "export", USER, package)
    phone = make_device("modern", "phone", on=srv)
    phone.do("add_notes", deck="Default", prefix="phone", count=5)
    assert phone.sync() == "full_sync"
    phone.full_upload()                                     # the mistake
    point = [p for p in restore_points(data) if p[1] == "upload"][0][0]
    stored = os.path.join(data, USER, "collection.anki2")
    size = os.path.getsize(stored)
    filler = fill(small_disk, leave=2 * size)         # room for a restore, not for its undo
    try:
        assert size < shutil.disk_usage(small_disk).free < 3 * size
        before = file_bytes(stored), admin(data, "backups", USER).stdout
        for command in (("restore", USER, point), ("import", USER, package)):
            done = admin(data, *command, check=False)
            lines = done.stderr.splitlines()
            assert done.returncode == 1 and len(lines) == 1, (command, done.stderr)
            assert re.search(r"no room .* undo this: [0-9.]+ [KM]iB must be free .*, "
                             r"[0-9.]+ [KM]iB is; make room", lines[0]), lines[0]
            assert (file_bytes(stored), admin(data, "backups", USER).stdout) == before
            assert leftovers(types.SimpleNamespace(data=data)) == []
    finally:
        os.unlink(filler)
    admin(data, "restore", USER, point)
    fresh = make_device("modern", "fresh", on=srv)
    join_by_download(fresh)
    assert note_count(fresh) == 30
    assert [(why, notes) for _, why, notes in restore_points(data)][0] == ("restore", 5)


def test_deleted_pictures_and_restore_points_count_against_the_quotas(start_server,
                                                                       make_device):
    """quota_media_mb = 1: a laptop keeps one 400 KiB picture, replacing it three times;
    the pictures it deleted wait in the trash only as far as the quota leaves room, the
    latest first (0.2.1 kept them all: 1.6 MiB on a 1 MiB quota). quota_collection_mb = 1:
    five full uploads of a 0.3 MiB collection keep restore points within 1 MiB."""
    srv = start_server(ini="quota_collection_mb = 1\nquota_media_mb = 1\n")
    laptop = make_device("modern", "laptop", on=srv)
    rng = random.Random(7)
    laptop.do("add_notes_with_fronts", deck="Default", fronts=[
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(2000))
        for _ in range(120)])
    first_upload(laptop)
    for round_ in range(4):
        if round_:
            a_second_later(laptop)
            laptop.do("delete_media", names=["bild%d.jpg" % (round_ - 1)])
        laptop.do("write_media", files=[["bild%d.jpg" % round_, 400 * 1024, round_]])
        laptop.sync_media()
    user = os.path.join(srv.base, USER)
    assert os.listdir(os.path.join(user, "media")) == ["bild3.jpg"]
    assert bytes_in(os.path.join(user, "media")) + bytes_in(os.path.join(user, "media.trash")) \
        <= MIB
    kept = [name for _, _, names in os.walk(os.path.join(user, "media.trash")) for name in names]
    assert kept == ["bild2.jpg"]                        # the last one deleted: restorable

    for _ in range(5):
        laptop.full_upload()
    assert 1 <= len(restore_points(srv)) and bytes_in(os.path.join(user, "backups")) <= MIB


def test_over_a_lowered_quota_deleting_notes_and_pictures_gets_a_user_syncing(start_server,
                                                                              make_device):
    """A laptop stores 2 MiB of notes and 1.6 MiB of pictures; then the admin lowers the
    quotas to 1 MiB each. 20 new notes are refused, with the reason at the next sync; deleting
    500 notes syncs, and so does deleting a picture while the rest is still over the quota
    (0.2.1 refused every sync, deletions too). The phone gets what is left."""
    srv = start_server(ini="")
    laptop = make_device("modern", "laptop", on=srv)
    rng = random.Random(3)
    nids = laptop.do("add_notes_with_fronts", deck="Default", fronts=[
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(3000))
        for _ in range(600)])
    laptop.do("write_media", files=[["bild%d.jpg" % i, 400 * 1024, i] for i in range(4)])
    first_upload(laptop)
    laptop.sync_media()
    with open(srv.config_path, "w") as f:
        f.write("[server]\nquota_collection_mb = 1\nquota_media_mb = 1\n")
    srv.restart()

    laptop.do("add_notes_with_fronts", deck="Default", fronts=["neu %d " % i + "x" * 3000
                                                               for i in range(20)])
    with pytest.raises(Exception):
        laptop.sync()                                       # refused: only "413" shows ...
    with pytest.raises(Exception) as told:
        laptop.sync()                                       # ... the next meta says why
    assert "over the 1 MiB it allows each user" in str(told.value)
    laptop.do("delete_notes", nids=nids[:500])
    assert laptop.sync() == "normal_sync"
    a_second_later(laptop)
    laptop.do("delete_media", names=["bild0.jpg"])
    laptop.sync_media()                                     # 1.2 MiB left, but less

    phone = make_device("modern", "phone", on=srv)
    join_by_download(phone)
    phone.sync_media()
    assert note_count(phone) == 120
    assert sorted(phone.media_files()) == ["bild1.jpg", "bild2.jpg", "bild3.jpg"]


def test_a_restore_after_the_server_clock_stepped_back_brings_back_the_deleted_picture(
        tmp_path, make_device, monkeypatch):
    """The server's clock runs 200 s fast when a phone's mistaken upload replaces the
    laptop's collection; NTP then steps it back, and the laptop deletes a picture.
    Restoring the point brings the picture back (0.2.1 looked in the trash by the clock,
    which now said the deletion came before the point)."""
    clock = ServerClock(monkeypatch)
    with server_in_this_process(tmp_path) as srv:
        clock.offset = 200
        laptop = make_device("modern", "laptop", on=srv)
        laptop.do("add_notes", deck="Default", prefix="Wort", count=30)
        laptop.do("write_media", files=[["haus.jpg", 3000, 1], ["baum.png", 5000, 2]])
        first_upload(laptop)
        laptop.sync_media()
        phone = make_device("modern", "phone", on=srv)
        phone.do("add_notes", deck="Default", prefix="phone", count=5)
        assert phone.sync() == "full_sync"
        phone.full_upload()                                 # the mistake, at the fast clock
        clock.offset = 0                                    # NTP steps the clock back
        a_second_later(laptop)
        laptop.do("delete_media", names=["baum.png"])
        laptop.sync_media()

        point = restore_points(srv)[0][0]
        admin(srv, "restore", USER, point)
        fresh = make_device("modern", "fresh", on=srv)
        join_by_download(fresh)
        fresh.sync_media()
        assert note_count(fresh) == 30
        assert sorted(fresh.media_files()) == ["baum.png", "haus.jpg"]


def zeros_package(path, collection, media_name, size):
    """A .colpkg in 2.1's layout with one media file of `size` zero bytes, deflated."""
    with zipfile.ZipFile(str(path), "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("collection.anki2", collection)
        with archive.open("0", "w") as entry:
            block = b"\0" * MIB
            for start in range(0, size, MIB):
                entry.write(block[:size - start])
        archive.writestr("media", json.dumps({"0": media_name}))
    return str(path)


def test_import_refuses_a_media_file_or_a_collection_bigger_than_a_sync_takes(tmp_path):
    """`import` of a package holding a 100 MiB + 1 byte video (0.2.1 stored it; no device
    could sync it), and, with max_payload_mb = 1, one holding a 4 MiB collection: one line
    naming the file, the limit and what to do; alice as she was, nothing left behind."""
    config, folder = alice(tmp_path)
    before = folder_state(folder)
    small = notes_collection(tmp_path / "small.anki2", 4)
    video = zeros_package(tmp_path / "video.colpkg", small, "film.mp4",
                          ankisync.MEDIA_FILE_MAX + 1)
    big = tmp_path / "big.anki2"
    notes_collection(big, 4)
    with contextlib.closing(sqlite3.connect(str(big))) as db:
        db.execute("create table padding (x)")
        db.executemany("insert into padding values (?)", [(os.urandom(MIB),)] * 4)
        db.commit()
    large = legacy_package(tmp_path / "large.colpkg", [("collection.anki2", big.read_bytes())])
    with open(str(tmp_path / "test.ini"), "a") as f:
        f.write("max_payload_mb = 1\n")
    for package, words in ((video, "media file 'film.mp4' is over 100 MiB, the largest a "
                                   "sync takes: delete it"),
                           (large, "the collection inside is over 3 MiB, the largest this "
                                   "server takes (3 times max_payload_mb): raise")):
        started = time.monotonic()
        done = cli(tmp_path, "import", "alice", package)
        lines = done.stderr.splitlines()
        assert done.returncode == 1 and len(lines) == 1, done.stderr
        assert lines[0].startswith("ankisync: cannot import %s: %s" % (package, words)), lines
        assert folder_state(folder) == before and leftovers(config) == []
        assert time.monotonic() - started < 10


def test_import_ankisyncd_follows_no_symbolic_link_and_leaves_oversize_files_behind(
        server, make_device, tmp_path):
    """An old ankisyncd folder with links out of it: a "picture" of carla's that is the
    admin's private key, dora's whole folder a link to a laptop's own Anki profile,
    emil's collection a link to alice's on this server; and a 100 MiB + 1 byte video
    (0.2.1 followed every link and took the video). Every user comes over; what is
    linked or too big stays behind, named in one line; carla's phone gets her picture
    only."""
    laptop = make_device("modern", "laptop")
    laptop.do("add_notes", deck="Default", prefix="Laptop", count=3)
    laptop.do("write_media", files=[["privat.jpg", 900, 4]])
    first_upload(laptop)
    laptop.close()                                          # Anki quits on the laptop
    secret = tmp_path / "admin-key"
    secret.write_bytes(b"-----BEGIN OPENSSH PRIVATE KEY-----\n")
    theirs = file_bytes(os.path.join(server.base, USER, "collection.anki2"))   # schema 11
    root = ankisyncd_data(str(tmp_path / "old"), [
        ("carla", "pw", theirs, {"katze.jpg": b"jpeg" * 100}), ("dora", "pw", theirs, {}),
        ("emil", "pw", theirs, {})])
    carla_media = os.path.join(root, "collections", "carla", "collection.media")
    os.symlink(str(secret), os.path.join(carla_media, "key.jpg"))
    with open(os.path.join(carla_media, "film.mp4"), "wb") as f:
        f.truncate(ankisync.MEDIA_FILE_MAX + 1)             # sparse: no 100 MiB written
    dora = os.path.join(root, "collections", "dora")
    shutil.rmtree(dora)
    os.symlink(os.path.dirname(laptop.col.path), dora)
    emil = os.path.join(root, "collections", "emil", "collection.anki2")
    os.unlink(emil)
    os.symlink(os.path.join(server.base, USER, "collection.anki2"), emil)

    done = admin(server, "import-ankisyncd", root, check=False)
    lines = done.stderr.splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert "key.jpg (a symbolic link, not followed)" in lines[0], lines[0]
    assert "film.mp4 (over 100 MiB, the largest a sync takes)" in lines[0]
    assert "%s: a symbolic link, which import-ankisyncd does not follow" % dora in lines[0]
    assert "%s: a symbolic link" % emil in lines[0]
    assert "3 users imported" in done.stdout
    assert leftovers(types.SimpleNamespace(data=server.base)) == []

    phone = make_device("modern", "carla-phone", user="carla", password="pw")
    join_by_download(phone)
    phone.sync_media()
    assert note_count(phone) == 3 and list(phone.media_files()) == ["katze.jpg"]
    for name in ("dora", "emil"):                           # nothing came: theirs upload
        path = os.path.join(server.base, name, "collection.anki2")
        assert not os.path.exists(path) or ankisync.collection_counts(path)[0] == 0


# --- fuzzed: damaged .colpkg files and ankisyncd folders, given to the commands ---





def notes_collection(path, count):
    """A schema-11 collection file with `count` notes, made without any client."""
    ankisync.create_collection(str(path))
    with sqlite3.connect(str(path)) as db:
        mid = int(next(iter(json.loads(db.execute("select models from col").fetchone()[0]))))
        db.executemany("insert into notes values (?, ?, ?, 0, 0, '', ?, '', 0, 0, '')",
                       [(i + 1, "g%d" % i, mid, "front %d\x1fback" % i) for i in range(count)])
    db.close()
    with open(str(path), "rb") as f:
        return f.read()


def legacy_package(path, entries, compression=zipfile.ZIP_DEFLATED):
    """A .colpkg as Anki 2.1 wrote it: `entries` is [(zip entry, bytes)]."""
    with zipfile.ZipFile(str(path), "w", compression) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return str(path)


def modern_package(tmp_path):
    """A .colpkg as Anki 2.1.50+ writes it (zstd, schema 18, a protobuf media list), by
    the real anki wheel: two notes, two pictures."""
    from anki.collection import Collection
    folder = tmp_path / "anki"
    folder.mkdir(exist_ok=True)
    col = Collection(str(folder / "collection.anki2"))
    try:
        basic = col.models.by_name("Basic")
        for index in range(2):
            note = col.new_note(basic)
            note["Front"], note["Back"] = "q%d" % index, '<img src="p%d.jpg">' % index
            col.add_note(note, col.decks.id("Default"))
            col.media.write_data("p%d.jpg" % index, b"jpeg %d " % index * 50)
        package = str(tmp_path / "modern.colpkg")
        col.export_collection_package(package, include_media=True, legacy=False)
    finally:
        col.close()
    return package


def alice(tmp_path):
    """alice, with a collection of 3 notes and a picture: (config, her folder). Made in
    this process; the commands under test then run as the admin runs them."""
    cli_config = tmp_path / "test.ini"
    cli_config.write_text("[server]\ndata = data\n")
    config = ankisync.Config.load(str(cli_config))
    ankisync.UserStore(config.data).add("alice", password="pw")
    folder = ankisync.UserFolder(config, "alice")
    package = legacy_package(tmp_path / "start.colpkg", [
        ("collection.anki2", notes_collection(tmp_path / "start.anki2", 3)),
        ("0", b"picture"), ("media", json.dumps({"0": "a.jpg"}))])
    ankisync.import_package(folder, package, ankisync.choose_zstd("python"))
    return config, folder


def folder_state(folder):
    """What an import that fails must leave as it was: the collection's bytes, the media
    database's, the files in the user's folder (no temp file left over) and the media."""
    def read(path):
        with open(path, "rb") as f:
            return f.read()
    return (read(folder.collection.path), read(os.path.join(folder.path, "media.db")),
            sorted(os.listdir(folder.path)), sorted(os.listdir(os.path.join(folder.path,
                                                                            "media"))))


def patch_central(data, name, offset, value, size="<H"):
    """`data` (a zip) with a field of `name`'s central directory header set to `value`:
    offset 8 is the flags, 10 the method, 16 the CRC, 20 and 24 the sizes."""
    data = bytearray(data)
    at = data.index(struct.pack("<I", ankisync.ZIP_CENTRAL_MAGIC))
    while True:
        length = struct.unpack_from("<H", data, at + 28)[0]
        if bytes(data[at + 46:at + 46 + length]) == name.encode():
            struct.pack_into(size, data, at + offset, value)
            return bytes(data)
        at = data.index(struct.pack("<I", ankisync.ZIP_CENTRAL_MAGIC), at + 4)


def damaged_packages(tmp_path):
    """(what, package path, words the one line must hold): every kind of damage a .colpkg
    met in the wild or in the fuzzing below."""
    good_collection = notes_collection(tmp_path / "good.anki2", 5)
    good = [("collection.anki2", good_collection), ("0", b"new picture"),
            ("media", json.dumps({"0": "b.jpg"}))]
    good_path = legacy_package(tmp_path / "good.colpkg", good)
    with open(good_path, "rb") as f:
        good_bytes = f.read()
    modern = modern_package(tmp_path)
    with open(modern, "rb") as f:
        modern_bytes = f.read()
    with zipfile.ZipFile(modern) as archive:
        modern_entries = [(info.filename, archive.read(info)) for info in archive.infolist()]

    def modern_with(**changes):
        return [(name, changes.get(name, data)) for name, data in modern_entries
                if changes.get(name, data) is not None]

    def file(name, data):
        path = tmp_path / name
        path.write_bytes(data)
        return str(path)

    (tmp_path / "a folder.colpkg").mkdir()
    with open(legacy_package(tmp_path / "stored.colpkg", good, zipfile.ZIP_STORED), "rb") as f:
        stored_bytes = f.read()
    deflated = legacy_package(tmp_path / "deflated.colpkg", good)
    with zipfile.ZipFile(deflated) as archive:
        info = archive.getinfo("collection.anki2")
    with open(deflated, "rb") as f:
        flipped = bytearray(f.read())
    flipped[info.header_offset + 30 + len("collection.anki2") + info.compress_size // 2] ^= 0x55
    return [
        ("not a zip", file("text.colpkg", b"this is not a package\n"), "not a zip file"),
        ("an empty file", file("empty.colpkg", b""), "not a zip file"),
        ("cut in half", file("half.colpkg", good_bytes[:len(good_bytes) // 2]), "truncated"),
        ("its last byte cut", file("cut.colpkg", good_bytes[:-1]), "truncated"),
        ("an empty zip", legacy_package(tmp_path / "none.colpkg", []), "an empty zip"),
        ("no collection", legacy_package(tmp_path / "nocol.colpkg", good[1:]),
         "no collection.anki2"),
        ("no such file", str(tmp_path / "missing.colpkg"), "there is no such file"),
        ("a folder", str(tmp_path / "a folder.colpkg"), "a folder"),
        ("a collection that is not SQLite", legacy_package(
            tmp_path / "notsqlite.colpkg", [("collection.anki2", b"SQLite? no" * 500)]),
         "not an Anki collection"),
        ("a collection that is SQLite but not Anki's", legacy_package(
            tmp_path / "sqlite.colpkg", [("collection.anki2", sqlite_file(tmp_path))]),
         "not an Anki collection"),
        ("a bad CRC", file("crc.colpkg", patch_central(good_bytes, "collection.anki2", 16,
                                                        0x12345678, "<I")), "damaged"),
        ("a damaged deflate stream", file("flipped.colpkg", bytes(flipped)), "damaged"),
        ("an entry that runs past the end", file("short.colpkg", patch_central(
            stored_bytes, "collection.anki2", 20, struct.pack("<II", *[len(stored_bytes)] * 2),
            "8s")), "truncated"),
        ("an encrypted entry", file("locked.colpkg", patch_central(
            good_bytes, "collection.anki2", 8, 1)), "encrypted"),
        ("an unknown compression method", file("method.colpkg", patch_central(
            good_bytes, "collection.anki2", 10, 99)), "damaged"),
        ("a meta version from the future", legacy_package(
            tmp_path / "future.colpkg", modern_with(meta=b"\x08\x07")), "newer Anki"),
        ("a meta that is not protobuf", legacy_package(
            tmp_path / "meta.colpkg", modern_with(meta=b"\xff")), "meta entry"),
        ("a media list naming a file twice", legacy_package(tmp_path / "twice.colpkg", good[:2] + [
            ("1", b"x"), ("media", json.dumps({"0": "b.jpg", "1": "b.jpg"}))]), "twice"),
        ("a media list naming a missing entry", legacy_package(
            tmp_path / "gone.colpkg", good[:1] + good[2:]), "which it does not hold"),
        ("a media list naming ../x", legacy_package(
            tmp_path / "escape.colpkg", good[:2] + [("media", json.dumps({"0": "../x"}))]),
         "not a plain file name"),
        ("a media list naming a number", legacy_package(
            tmp_path / "number.colpkg", good[:2] + [("media", json.dumps({"0": 7}))]),
         "cannot store"),
        ("a media list that is not JSON", legacy_package(
            tmp_path / "json.colpkg", good[:2] + [("media", b"{\"0\": ")]), "media list"),
        ("a media list that is a list", legacy_package(
            tmp_path / "list.colpkg", good[:2] + [("media", b"[1, 2]")]), "media list"),
        ("a corrupt zstd collection", legacy_package(tmp_path / "zstd.colpkg", modern_with(**{
            "collection.anki21b": modern_entries[1][1][:40] + b"\0" * 40})), "damaged"),
        ("a corrupt zstd media list", legacy_package(tmp_path / "zlist.colpkg", modern_with(
            media=b"not zstd")), "media list"),
        ("a corrupt zstd media file", legacy_package(tmp_path / "zfile.colpkg", modern_with(
            **{"0": b"\x28\xb5\x2f\xfd junk"})), "media file 'p"),
        ("a zstd media list naming a missing entry", legacy_package(
            tmp_path / "zgone.colpkg", modern_with(**{"1": None})), "which it does not hold"),
        ("modern, its last byte cut", file("mcut.colpkg", modern_bytes[:-1]), "truncated"),
    ]


def sqlite_file(tmp_path):
    path = tmp_path / "other.sqlite"
    with sqlite3.connect(str(path)) as db:
        db.execute("create table t (x)")
    db.close()
    return path.read_bytes()


def test_a_damaged_colpkg_is_refused_in_one_line_and_changes_nothing(tmp_path):
    """`import` of a damaged package (before: six kinds ended in a traceback, a
    truncated one printed 'cancelled', a bad media name left temp files behind): one
    line on stderr naming the file and what is wrong, exit status 1, and alice's
    collection, media and folder exactly as they were."""
    config, folder = alice(tmp_path)
    before = folder_state(folder)
    for what, package, words in damaged_packages(tmp_path):
        done = cli(tmp_path, "import", "alice", package)
        lines = done.stderr.splitlines()
        assert done.returncode == 1 and done.stdout == "", (what, done.stdout, done.stderr)
        assert len(lines) == 1 and lines[0].startswith("ankisync: cannot import %s: "
                                                       % package), (what, done.stderr)
        assert words in lines[0], (what, lines[0])
        assert folder_state(folder) == before, what


def test_packages_from_anki_of_either_layout_still_import(tmp_path):
    """The good packages the damaged ones were made from import: 2.1's layout and the
    modern one, its media list read through legacy_zip_filename when that is set."""
    config, folder = alice(tmp_path)
    done = cli(tmp_path, "import", "alice", modern_package(tmp_path))
    assert done.returncode == 0, done.stderr
    assert ankisync.collection_counts(folder.collection.path)[0] == 2
    assert sorted(os.listdir(os.path.join(folder.path, "media"))) == ["a.jpg", "p0.jpg",
                                                                        "p1.jpg"]
    # MediaEntry.legacy_zip_filename (field 255) names the zip entry: here "7".
    zstd = ankisync.choose_zstd("python")
    from anki.import_export_pb2 import MediaEntries, PackageMetadata
    listing = MediaEntries(entries=[MediaEntries.MediaEntry(name="c.jpg", size=5,
                                                            legacy_zip_filename=7)])
    package = legacy_package(tmp_path / "numbered.colpkg", [
        ("meta", PackageMetadata(version=PackageMetadata.VERSION_LATEST).SerializeToString()),
        ("collection.anki21b", zstd.compress(notes_collection(tmp_path / "n.anki2", 4))),
        ("7", zstd.compress(b"seven")), ("media", zstd.compress(listing.SerializeToString()))])
    done = cli(tmp_path, "import", "alice", package)
    assert done.returncode == 0, done.stderr
    with open(os.path.join(folder.path, "media", "c.jpg"), "rb") as f:
        assert f.read() == b"seven"


@st.composite
def package_damage(draw):
    """Where and how to damage a package: bytes set, flipped, dropped or inserted, or
    the end cut off, anywhere (local headers, data, central directory)."""
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        edits.append((draw(st.floats(0, 1)), draw(st.sampled_from(["set", "flip", "drop",
                                                                   "insert", "cut"])),
                      draw(st.integers(0, 255))))
    return edits


def damage(data, edits):
    data = bytearray(data)
    for where, how, value in edits:
        if not data:
            break
        at = min(int(where * len(data)), len(data) - 1)
        if how == "set":
            data[at] = value
        elif how == "flip":
            data[at] ^= 1 << value % 8
        elif how == "drop":
            del data[at]
        elif how == "insert":
            data[at:at] = bytes([value])
        else:
            del data[at:]
    return bytes(data)


PACKAGES_MADE = {}


def alice_and_packages(tmp_path):
    """alice and a good package of either layout, made once per test (hypothesis calls
    it again and again with one tmp_path): (config, {layout: [(entry, bytes)]})."""
    if tmp_path not in PACKAGES_MADE:
        config, _ = alice(tmp_path)
        legacy = legacy_package(tmp_path / "good.colpkg", [
            ("collection.anki2", notes_collection(tmp_path / "good.anki2", 5)),
            ("0", b"new picture" * 30), ("media", json.dumps({"0": "b.jpg"}))])
        packages = {}
        for layout, path in (("modern", modern_package(tmp_path)), ("legacy", legacy)):
            with zipfile.ZipFile(path) as archive:
                packages[layout] = [(info.filename, archive.read(info))
                                    for info in archive.infolist()]
        PACKAGES_MADE[tmp_path] = config, packages
    return PACKAGES_MADE[tmp_path]


def check_import_fails_only_in_words(config, package):
    """`import` either imports the package, or fails with the ValueError main() prints
    as one line naming the file, alice's collection, media and folder as they were."""
    folder = ankisync.UserFolder(config, "alice")
    before = folder_state(folder)
    try:
        ankisync.command_import(config, argparse.Namespace(name="alice", file=package))
    except ValueError as e:
        assert str(e).startswith("cannot import %s: " % package) and "\n" not in str(e)
        assert folder_state(folder) == before


@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=st.sampled_from(["modern", "legacy"]),
       compression=st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]),
       edits=package_damage())
def test_import_of_packages_damaged_anywhere_fails_only_in_words(tmp_path, layout,
                                                                 compression, edits):
    """Packages of either layout with bytes damaged anywhere in the file (headers,
    data, central directory): imported, or refused in one line, nothing changed."""
    config, packages = alice_and_packages(tmp_path)
    package = legacy_package(tmp_path / "damaged.colpkg", packages[layout], compression)
    with open(package, "rb") as f:
        data = damage(f.read(), edits)
    with open(package, "wb") as f:
        f.write(data)
    check_import_fails_only_in_words(config, package)


@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=st.sampled_from(["modern", "legacy"]), target=st.integers(0, 5),
       edits=package_damage())
def test_import_of_packages_with_a_damaged_entry_fails_only_in_words(tmp_path, layout,
                                                                     target, edits):
    """One entry damaged inside a sound zip (its CRC right): the meta, the zstd or SQLite
    collection, the media list, a media file. The same contract."""
    config, packages = alice_and_packages(tmp_path)
    entries = packages[layout]
    target %= len(entries)
    package = legacy_package(tmp_path / "damaged.colpkg", [
        (name, damage(data, edits) if index == target else data)
        for index, (name, data) in enumerate(entries)])
    check_import_fails_only_in_words(config, package)


def ankisyncd_data(root, users):
    """An ankisyncd 2.x data folder: auth.db (sha256 of name, password and salt, then the
    salt) and collections/<name>/ with collection.anki2 (bytes, or None for none) and
    collection.media/ ({file name: bytes})."""
    os.makedirs(os.path.join(root, "collections"))
    auth = sqlite3.connect(os.path.join(root, "auth.db"))
    auth.execute("create table auth (username varchar primary key, hash varchar)")
    for name, password, collection, media in users:
        salt = "0123456789abcdef"
        auth.execute("insert into auth values (?, ?)", (name, hashlib.sha256(
            (name + password + salt).encode()).hexdigest() + salt))
        folder = os.path.join(root, "collections", name)
        os.makedirs(os.path.join(folder, "collection.media"))
        if collection is not None:
            with open(os.path.join(folder, "collection.anki2"), "wb") as f:
                f.write(collection)
        for file_name, data in media.items():
            with open(os.path.join(folder, "collection.media", file_name), "wb") as f:
                f.write(data)
    auth.commit()
    auth.close()
    return str(root)


def users_of(config):
    return sorted(ankisync.UserStore(config.data).names())


def leftovers(config):
    return [name for _, _, files in os.walk(config.data) for name in files
            if name.startswith(ankisync.TEMP_PREFIXES)]


def test_a_damaged_ankisyncd_folder_is_refused_in_one_line_before_any_user_is_added(tmp_path):
    """import-ankisyncd of a folder whose auth.db cannot be used (before: tracebacks, or
    a message naming ankisync's own auth.db), or without collections/ (the users would
    come without their collections, and a second run would skip them): one line naming
    the file, exit status 1, no user added, alice as she was."""
    config, folder = alice(tmp_path)
    before = folder_state(folder)
    good = notes_collection(tmp_path / "theirs.anki2", 2)

    def auth_db(root, sql):
        os.makedirs(root)
        db = sqlite3.connect(os.path.join(root, "auth.db"))
        db.executescript(sql)
        db.close()
        os.makedirs(os.path.join(root, "collections"), exist_ok=True)
        return root

    def no_collections(root):
        ankisyncd_data(root, [("carla", "pw", good, {})])
        shutil.rmtree(os.path.join(root, "collections"))
        return root

    not_sqlite = str(tmp_path / "text")
    os.makedirs(not_sqlite)
    with open(os.path.join(not_sqlite, "auth.db"), "w") as f:
        f.write("carla:secret\n" * 100)
    cases = [
        ("no such folder", str(tmp_path / "missing"), "no such folder"),
        ("no auth.db", str(tmp_path), "no auth.db"),
        ("an auth.db that is not SQLite", not_sqlite, "not ankisyncd's auth.db"),
        ("an auth.db without its table", auth_db(str(tmp_path / "t"), "create table x (y);"),
         "no such table: auth"),
        ("a hash that is not ankisyncd's", auth_db(str(tmp_path / "h"), "create table auth "
                                                   "(username, hash); insert into auth "
                                                   "values ('carla', 'x'), ('dora', '%s');"
                                                   % ("0" * 80)), "not ankisyncd's"),
        ("a name no folder can have", auth_db(str(tmp_path / "n"), "create table auth "
                                              "(username, hash); insert into auth values "
                                              "('dora', '%s'), ('a/b', '%s');"
                                              % ("0" * 80, "0" * 80)), "bad user name"),
        ("no collections/", no_collections(str(tmp_path / "c")), "no collections/ folder"),
    ]
    for what, root, words in cases:
        done = cli(tmp_path, "import-ankisyncd", root)
        lines = done.stderr.splitlines()
        assert done.returncode == 1 and done.stdout == "", (what, done.stdout, done.stderr)
        assert len(lines) == 1 and lines[0].startswith("ankisync: cannot import %s"
                                                       % root), (what, done.stderr)
        assert words in lines[0], (what, lines[0])
        assert users_of(config) == ["alice"], what
        assert folder_state(folder) == before and leftovers(config) == [], what


def test_an_ankisyncd_collection_that_is_not_sqlite_stays_behind_and_says_so(tmp_path):
    """One user's collection is not SQLite (before: a traceback after the users before
    them were added), another's is SQLite but no Anki collection, a third's media has
    a name no client could sync (before: a traceback and temp files left over): every
    user comes over, the good collection and files too; the command names each file
    that stayed behind on one line of stderr and ends with status 1."""
    config, folder = alice(tmp_path)
    before = folder_state(folder)
    good = notes_collection(tmp_path / "theirs.anki2", 2)
    root = ankisyncd_data(str(tmp_path / "old"), [
        ("alice", "other", good, {}),                            # she is here already
        ("carla", "pw", b"not a database" * 300, {"c.jpg": b"jpeg"}),
        ("dora", "pw", sqlite_file(tmp_path), {}),
        ("emil", "pw", good, {"e.jpg": b"jpeg", "e\u0301.jpg": b"nfd", "x\x01.jpg": b"ctl"}),
        ("fritz", "pw", None, {}),
    ])
    done = cli(tmp_path, "import-ankisyncd", root)
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    carla = os.path.join(root, "collections", "carla", "collection.anki2")
    dora = os.path.join(root, "collections", "dora", "collection.anki2")
    assert len(lines) == 1 and lines[0].startswith("ankisync: cannot import %s: " % carla)
    assert dora in lines[0] and "carla's first device uploads" in lines[0], lines[0]
    assert "alice: skipped" in done.stdout and "4 users imported" in done.stdout
    assert "emil: 2 notes, 0 cards, 1 media files (2 left behind: names ankisync cannot " \
           "store)" in done.stdout, done.stdout
    assert users_of(config) == ["alice", "carla", "dora", "emil", "fritz"]
    assert folder_state(folder) == before and leftovers(config) == []
    emil = ankisync.UserFolder(config, "emil")
    assert ankisync.collection_counts(emil.collection.path)[0] == 2
    assert os.listdir(os.path.join(emil.path, "media")) == ["e.jpg"]
    assert not os.path.exists(ankisync.UserFolder(config, "carla").collection.path) or \
        os.path.getsize(ankisync.UserFolder(config, "carla").collection.path) == 0


# --- the first ten minutes: what a newcomer meets -----------------------------------------


def test_the_log_and_the_front_page_give_the_address_a_phone_needs(start_server):
    srv = start_server(env={"SYNC_HOST": "0.0.0.0"})            # every network, as by default
    text, port = srv.log(), srv.port
    assert "listening on http://127.0.0.1:%d/  (from the computer ankisync runs on)" % port in text
    lan = ankisync.lan_addresses()
    for address in lan:
        assert ("listening on http://%s:%d/  (from phones and other computers)"
                % (address, port)) in text
    page = post(srv, "/", method="GET", headers={"Host": "127.0.0.1:%d" % port}).body.decode()
    assert '<meta name="viewport" content="width=device-width' in page
    shown = re.findall(r'data-url="([^"]+)"', page)
    assert shown[0] == "http://127.0.0.1:%d/" % port and len(shown) == len(set(shown))
    assert ["http://%s:%d/" % (a, port) for a in lan] == shown[1:]
    # Opened on the server itself, the clients' rows name an address phones can reach.
    row = "Self-hosted sync server: <code>%s</code>" % (shown[1] if lan else shown[0])
    assert row in page


@pytest.fixture
def browser():
    """A real browser: Debian's chromium, headless, driven by Playwright (its Python
    package only; it downloads no browser of its own). Skipped, saying why, without them."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("the browser stories need Debian's chromium (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the browser stories need Playwright (pip install playwright)")
    with sync_playwright() as playwright:
        # A name that is not localhost: the page then is what a phone on the LAN opens
        # over http://, no "secure context", as on a real network.
        instance = playwright.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--host-resolver-rules=MAP ankisync.lan 127.0.0.1"])
        try:
            yield instance
        finally:
            instance.close()


SCREENSHOTS = os.path.join(HERE, "test-output", "screenshots")


def screenshot(page, name):
    """The whole page as a PNG in test-output/screenshots/: what a person sees, kept for
    a look after the run (CI lists them)."""
    os.makedirs(SCREENSHOTS, exist_ok=True)
    page.screenshot(path=os.path.join(SCREENSHOTS, name + ".png"), full_page=True)


def test_the_copy_buttons_copy_on_a_phone_that_opened_the_page_over_plain_http(
        start_server, browser, tmp_path):
    """navigator.clipboard is missing on http:// pages other than localhost: the button
    copies another way, or selects the address, and says which; no script error."""
    srv = start_server(env={"SYNC_HOST": "0.0.0.0"})
    for width, height, name in [(390, 844, "phone"), (1280, 800, "desktop")]:
        page = browser.new_page(viewport={"width": width, "height": height})
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto("http://ankisync.lan:%d/" % srv.port)
        assert page.evaluate("window.isSecureContext") is False
        button = page.locator("button").first
        button.click()
        page.wait_for_function("document.querySelector('button').textContent != 'copy'",
                               timeout=5000)
        said = button.text_content()
        assert said in ("copied", "selected: copy it") and errors == []
        if said.startswith("selected"):
            assert page.evaluate("String(window.getSelection())") == \
                button.get_attribute("data-url")
        screenshot(page, "front-page-%s" % name)
        page.close()


# --- behind a reverse proxy, in a container: the address users are to type ------------


def readme_block(language):
    """The README's first ```language block, as a user copies it."""
    with open(os.path.join(HERE, "README.md")) as f:
        return re.search(r"```%s\n(.*?)```" % language, f.read(), re.S).group(1)


class Proxy:
    """nginx or apache2, started by a test on a loopback port with the README's block
    in a configuration of its own (in `folder`), in front of `backend`: what post(),
    modern() and devices need of a server (url, port, ssl_context)."""

    ssl_context = None

    def __init__(self, kind, folder, backend):
        self.kind, self.folder, self.backend = kind, folder, backend
        binary = shutil.which(kind) or shutil.which(kind, path="/usr/sbin:/sbin")
        if binary is None:
            pytest.skip("%s is not installed: apt-get install %s (.ci/run does)" % (kind, kind))
        self.port = free_port()
        self.url = "http://127.0.0.1:%d/anki/" % self.port
        os.makedirs(folder, exist_ok=True)
        # The README's block, adapted only in the backend's port.
        block = readme_block({"nginx": "nginx", "apache2": "apache"}[kind]).replace(
            "127.0.0.1:27701", "127.0.0.1:%d" % backend.port)
        conf = os.path.join(folder, kind + ".conf")
        with open(conf, "w") as f:
            f.write(getattr(self, kind + "_conf")(block))
        command = {"nginx": [binary, "-p", folder, "-c", conf, "-g", "daemon off;"],
                   "apache2": [binary, "-X", "-d", folder, "-f", conf]}[kind]
        with open(os.path.join(folder, "output.log"), "wb") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=out,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

        def listening():
            if self.proc.poll() is not None:
                raise AssertionError("%s exited: %s" % (kind, self.log()))
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", self.port)) == 0
        wait_until(listening, timeout=20, what="%s listening" % kind)

    def nginx_conf(self, block):
        folder = self.folder
        temp = "\n".join("    %s_temp_path %s/%s;" % (name, folder, name)
                         for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        return """user %s;
worker_processes 1;
pid %s/nginx.pid;
error_log %s/error.log;
events { worker_connections 64; }
http {
    access_log %s/access.log;
%s
    server {
        listen 127.0.0.1:%d;
%s
    }
}
""" % (pwd.getpwuid(os.getuid()).pw_name, folder, folder, folder, temp, self.port, block)

    def apache2_conf(self, block):
        modules = "/usr/lib/apache2/modules"
        if not os.path.isdir(modules):
            pytest.skip("apache2's modules are not in %s" % modules)
        # Debian builds some of them in: those are not to be loaded again.
        loaded = "\n".join("<IfModule !%s_module>\n    LoadModule %s_module %s/mod_%s.so\n"
                           "</IfModule>" % (name, name, modules, name)
                           for name in ("mpm_event", "authz_core", "unixd", "proxy",
                                        "proxy_http", "headers"))
        # Apache refuses to serve as root: its children become nobody then.
        user = "User nobody\nGroup nogroup\n" if os.getuid() == 0 else ""
        folder = self.folder
        return """%s
%sServerName 127.0.0.1
Listen 127.0.0.1:%d
PidFile %s/apache2.pid
ErrorLog %s/error.log
Mutex file:%s default
%s
""" % (loaded, user, self.port, folder, folder, folder, block)

    def log(self):
        text = ""
        for name in ("output.log", "error.log"):
            with contextlib.suppress(OSError), open(os.path.join(self.folder, name)) as f:
                text += f.read()[-3000:]
        return text

    def stop(self):
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture
def start_proxy(tmp_path):
    """start_proxy(kind, backend) -> a running Proxy (nginx or apache2) with the README's
    block, stopped at the end of the test, its log shown in a failing test's report."""
    proxies = []

    def start(kind, backend):
        proxy = Proxy(kind, str(tmp_path / ("%s-%d" % (kind, len(proxies)))), backend)
        proxies.append(proxy)
        return proxy

    yield start
    for proxy in proxies:
        proxy.stop()
        print("---- %s log (tail) ----\n%s" % (proxy.kind, proxy.log()))


# The ini lines the README gives with its proxy blocks, but public_url (each test says).
PROXY_INI = "ip_header = X-Forwarded-For\nbase_path = /anki/\n"


def shown_addresses(server, path="/", headers=None, source=None):
    """The front page's addresses (its copy buttons), and the page."""
    page = post(server, path, method="GET", headers=headers, source=source).body.decode()
    return re.findall(r'data-url="([^"]+)"', page), page


@pytest.mark.parametrize("kind", ["nginx", "apache2"])
def test_devices_sync_through_the_readmes_proxy_block_and_its_page_shows_the_proxys_address(
        start_server, start_proxy, make_device, kind):
    srv = start_server(ini=PROXY_INI, users=((USER, PASSWORD), ("ana", "pw2")))
    proxy = start_proxy(kind, srv)
    laptop = make_device("modern", "laptop", on=proxy)
    laptop.do("add_notes", deck="Default", prefix="word", count=5)
    first_upload(laptop)

    def joins_and_adds_notes(kind, name):
        device = make_device(kind, name, on=proxy)
        join_by_download(device)
        device.do("add_notes", deck="Default", prefix="from the " + name, count=2)
        assert sync_normally(device) == "normal_sync"
        assert sync_normally(laptop) == "normal_sync"
        assert_same(laptop, device)

    joins_and_adds_notes("modern", "phone")
    if find_python("3.9") is not None:              # anki 2.1.54's venv needs it
        joins_and_adds_notes("legacy", "old laptop")
    # The page, fetched through the proxy, offers the proxy's address and nothing else.
    shown, page = shown_addresses(proxy, "/anki/")
    assert shown == [proxy.url], shown
    assert ":%d" % srv.port not in page
    assert "Self-hosted sync server: <code>%s</code>" % proxy.url in page
    # Five wrong passwords through the proxy lock out no one else there.
    assert [guess(proxy, "mallory", source="127.0.0.1", prefix="/anki/")[0]
            for _ in range(5)] == [403] * 5
    answer = post(proxy, "/anki/sync/hostKey", ZSTD.compress(json.dumps(
        {"u": "ana", "p": "pw2"}).encode()), anki_sync_header(""))
    assert answer.status == 200, answer
    # A browser logs in to the account page through it: its Origin is the proxy's, which
    # the proxy tells in Host or X-Forwarded-Host (Apache keeps its own Host).
    origin = {"Origin": proxy.url.rstrip("/").rsplit("/", 1)[0]}
    first = page_get(proxy, {}, path="/anki/account")
    cookies = {name: value for name, (value, _) in cookies_set(first).items()}
    login = form_post(proxy, {"do": "login", "csrf": page_form(first), "name": "ana",
                              "password": "pw2"}, cookies, origin, path="/anki/account")
    assert login.status == 303, (login.status, login.body[:300])


def test_a_trusted_proxys_forwarded_scheme_and_host_make_the_page_address(start_server):
    srv = start_server(ini=PROXY_INI)
    said = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "anki.example.org",
            "X-Forwarded-For": "203.0.113.5"}
    shown, page = shown_addresses(srv, headers=said)
    assert shown == ["https://anki.example.org/anki/"], shown
    assert "Self-hosted sync server: <code>https://anki.example.org/anki/</code>" in page
    assert ":%d" % srv.port not in page           # none of the backend's own addresses
    # RFC 7239's Forwarded says the same; of a list, the nearest proxy's entry counts.
    forwarded = {"Forwarded": 'for=198.51.100.1;host=evil.example, '
                              'for=203.0.113.5;proto=https;host="anki.example.org"'}
    assert shown_addresses(srv, headers=forwarded)[0] == ["https://anki.example.org/anki/"]
    # What is no scheme or no host name gets a 400 with the reason.
    for bad in ({"X-Forwarded-Proto": "gopher"}, {"X-Forwarded-Host": "a<b>"}):
        answer = post(srv, "/", method="GET", headers=bad)
        assert answer.status == 400 and b"the proxy's forwarded" in answer.body, answer
    # Without ip_header, a proxy's headers change nothing but what is listed.
    plain = start_server(ini="base_path = /anki/\n")
    shown, page = shown_addresses(plain, headers=said)
    assert "anki.example.org" not in page and shown == ["http://127.0.0.1:%d/anki/"
                                                         % plain.port]
    assert "ip_header is not set" in page
    # From an address that is no trusted proxy, anyone could have written them.
    untrusting = start_server(ini=PROXY_INI + "trusted_proxies = 10.0.0.0/8\n")
    said.update(Forwarded="proto=https;host=anki.example.org",
                Host="127.0.0.1:%d" % untrusting.port)
    shown, page = shown_addresses(untrusting, headers=said)
    assert "anki.example.org" not in page and "https://" not in page
    assert shown[0] == "http://127.0.0.1:%d/anki/" % untrusting.port
    answer = post(untrusting, "/", method="GET", headers={"X-Forwarded-Proto": "gopher"})
    assert answer.status == 200


def test_public_url_is_the_one_address_the_page_and_the_log_give(start_server, tmp_path):
    srv = start_server(ini=PROXY_INI, env={"ANKISYNC_PUBLIC_URL": "https://anki.example.com/anki",
                                           "SYNC_HOST": "0.0.0.0"})
    public = "https://anki.example.com/anki/"        # the trailing slash clients need
    for headers in ({}, {"X-Forwarded-Proto": "http", "X-Forwarded-Host": "elsewhere.example"}):
        shown, page = shown_addresses(srv, headers=headers)
        assert shown == [public], shown
        assert "Self-hosted sync server: <code>%s</code>" % public in page
    log = srv.log()
    assert "clients use %s (public_url)" % public in log
    assert "from phones and other computers" not in log
    said = refused_serve(tmp_path, "[server]\npublic_url = anki.example.com\n")
    assert "public_url takes an http:// or https:// address, not 'anki.example.com'" in said
    assert "Traceback" not in said


def test_in_a_container_the_log_and_page_name_this_computers_address_and_docker_exec(
        start_server, tmp_path, monkeypatch):
    srv = start_server(env={"ANKISYNC_CONTAINER": "1", "SYNC_HOST": "0.0.0.0"})
    log = srv.log()
    assert "phones and other computers use this computer's address, port %d" % srv.port in log
    assert "(from phones and other computers)" not in log        # no bridge address
    shown, page = shown_addresses(srv, headers={"Host": "192.168.1.20:%d" % srv.port})
    assert shown == ["http://192.168.1.20:%d/" % srv.port], shown    # as the browser came
    for address in ankisync.lan_addresses():
        assert address not in page
    assert "docker exec -it &lt;container&gt; python ankisync.py adduser NAME" in page
    assert "this computer&#x27;s address" in page or "this computer's address" in page
    # Bound to loopback inside a container, nothing outside reaches it: the log says so
    # and gives no address to phones.
    inside = start_server(env={"ANKISYNC_CONTAINER": "1", "SYNC_HOST": "127.0.0.1"})
    assert "listening on 127.0.0.1 inside a container: nothing outside" in inside.log()
    assert "phones and other computers use" not in inside.log()
    # The check itself: the runtimes' marker files, or ANKISYNC_CONTAINER.
    marker = tmp_path / ".dockerenv"
    monkeypatch.delenv("ANKISYNC_CONTAINER")
    monkeypatch.setattr(ankisync, "CONTAINER_MARKERS", (str(marker),))
    assert not ankisync.in_container()
    marker.write_text("")
    assert ankisync.in_container()
    monkeypatch.setenv("ANKISYNC_CONTAINER", "0")
    assert not ankisync.in_container()


def test_in_a_container_an_unwritable_data_folder_gets_the_hosts_fix(tmp_path, monkeypatch):
    """The paths a container sees are not the host's: a root-owned host folder mounted at
    /data is fixed on the host, and an ini mounted over the image's that keeps the data
    beside it (inside the image) is fixed by `data = /data`."""
    monkeypatch.setenv("ANKISYNC_CONTAINER", "1")
    volume = tmp_path / "data"
    volume.mkdir()
    monkeypatch.setattr(ankisync, "CONTAINER_DATA", str(volume))
    os.chown(str(volume), 10001, 10001)
    error = PermissionError(errno.EACCES, "Permission denied", str(volume))
    said = ankisync.unwritable(str(volume), error)
    assert "on the host, `chown -R %d` the folder you mounted at %s" % (os.getuid(), volume) \
        in said and "--user" in said
    inside = tmp_path / "app" / "ankisync-data"
    said = ankisync.unwritable(str(inside), error)
    assert "inside the container" in said and "`data = %s`" % volume in said
    monkeypatch.setenv("ANKISYNC_CONTAINER", "0")
    assert "chown -R %d %s" % (os.getuid(), volume) in ankisync.unwritable(str(volume), error)


def test_wrong_passwords_from_the_proxy_itself_lock_out_no_one_else(start_server):
    """Behind a proxy that passes no client address, every login comes from the proxy:
    five wrong passwords there must not lock every user out. The user guessed at is
    still paced."""
    srv = start_server(ini=PROXY_INI, users=((USER, PASSWORD), ("ana", "pw2")))
    assert [guess(srv, USER, source="127.0.0.1")[0] for _ in range(5)] == [403] * 5
    # The name guessed at is still paced: one check a second.
    assert (429, "1") in [guess(srv, USER, source="127.0.0.1") for _ in range(3)]
    answer = modern(srv, "hostKey", {"u": "ana", "p": "pw2"}, source="127.0.0.1")
    assert answer.status == 200, answer
    assert srv.log().count("has no x-forwarded-for header") == 1


# --- Pages: /account and /api/stats --------------------------------------------------


def cookies_set(answer):
    """name -> (value, attributes) of the one Set-Cookie an answer carries, if any."""
    header = answer.headers.get("Set-Cookie")
    if not header:
        return {}
    name, _, rest = header.partition("=")
    value, _, attributes = rest.partition(";")
    return {name: (value, attributes)}


def page_form(answer):
    """The CSRF token of the (last) form in a page."""
    return re.findall(r'name="csrf" value="([0-9a-f]+)"', answer.body.decode())[-1]


def form_post(srv, fields, cookies, headers=None, source=None, path="/account"):
    body = urllib.parse.urlencode(fields).encode()
    sent = {"Content-Type": "application/x-www-form-urlencoded",
            "Cookie": "; ".join("%s=%s" % item for item in cookies.items())}
    sent.update(headers or {})
    return post(srv, path, body, sent, source=source)


def page_get(srv, cookies, path="/account", source=None):
    return post(srv, path, method="GET", source=source,
                headers={"Cookie": "; ".join("%s=%s" % item for item in cookies.items())})


def page_login(srv, name=USER, password=PASSWORD, source=None):
    """A browser's login by hand: the form, its cookie and token, the post. The cookies
    it holds then, and the answer to the post."""
    first = page_get(srv, {}, source=source)
    cookies = {name_: value for name_, (value, _) in cookies_set(first).items()}
    answer = form_post(srv, {"do": "login", "csrf": page_form(first), "name": name,
                             "password": password}, cookies, source=source)
    cookies.update({name_: value for name_, (value, _) in cookies_set(answer).items()})
    return cookies, answer


def followed(srv, answer, cookies, source=None):
    """What a browser shows after a form: a change answers 303 (a reload must not post it
    again), with cookies, and the page by GET then says what was done, once."""
    assert answer.status == 303, (answer.status, answer.body[:300])
    cookies.update({name: value for name, (value, _) in cookies_set(answer).items()})
    page = page_get(srv, cookies, path=answer.headers["Location"], source=source)
    cookies.update({name: value for name, (value, _) in cookies_set(page).items()})
    return page


def test_account_forms_refuse_a_missing_token_another_site_and_a_tampered_cookie(start_server):
    """CSRF: a form without the token this browser was given, or posted from another
    site, is refused before any password is checked; the session cookie is HttpOnly,
    SameSite=Strict, signed (a changed byte is no login) and bound to the session's
    own token; forms are small and urlencoded, or a 4xx says why."""
    srv = start_server()
    first = page_get(srv, {})
    assert first.status == 200 and 'name="password"' in first.body.decode()
    (form_name, (form_value, attributes)), = cookies_set(first).items()
    assert form_name == "ankisync_form" and "HttpOnly" in attributes
    cookies, token = {form_name: form_value}, page_form(first)
    login = {"do": "login", "csrf": token, "name": USER, "password": PASSWORD}
    for fields, jar, headers in [
            (dict(login, csrf=""), cookies, {}),                            # no token
            (dict(login, csrf="0" * 32), cookies, {}),                      # a forged one
            (login, {}, {}),                                                # no form cookie
            (login, {form_name: "A" * 32}, {}),                             # another browser's
            (login, cookies, {"Origin": "http://evil.example"}),            # another origin
            (login, cookies, {"Sec-Fetch-Site": "cross-site"})]:
        refused = form_post(srv, fields, jar, headers)
        assert refused.status == 403 and "refused" in refused.body.decode(), (fields, headers)
        assert "Set-Cookie" not in refused.headers
    assert "login failed" not in srv.log()                  # no password was even checked
    answer = form_post(srv, login, cookies, {"Origin": "http://127.0.0.1:%d" % srv.port})
    assert answer.status == 303 and answer.headers["Location"] == "/account"
    (name, (session, attributes)), = cookies_set(answer).items()
    flags = [a.strip() for a in attributes.split(";")]
    assert name == "ankisync_session" and "HttpOnly" in flags and "SameSite=Strict" in flags
    assert "Path=/" in flags and "Max-Age=%d" % ankisync.PAGE_SESSION_SECONDS in flags
    assert "Secure" not in flags                            # plain http: it would never return
    cookies[name] = session
    page = page_get(srv, cookies)
    assert "<h1>%s</h1>" % USER in page.body.decode()
    # The login form's token is not the session's: a form needs the page's own.
    assert form_post(srv, {"do": "logout", "csrf": token}, cookies).status == 403
    # A cookie changed anywhere is no login, only the form again.
    for tampered in [session[:-1] + ("0" if session[-1] != "0" else "1"),
                     "YWRtaW4" + session[session.index("."):],          # another name
                     session.split(".")[0] + ".9999999999." + session.split(".")[2]]:
        again = page_get(srv, dict(cookies, ankisync_session=tampered))
        assert again.status == 200 and "<h1>Log in</h1>" in again.body.decode()
        assert "<h1>%s</h1>" % USER not in again.body.decode()
    # Forms are small urlencoded bodies.
    token = page_form(page)
    assert form_post(srv, {"do": "logout", "csrf": token, "x": "y" * 20000},
                     cookies).status == 413
    assert post(srv, "/account", b"do=logout", {"Content-Type": "text/plain",
                                                "Cookie": "ankisync_session=" + session}
                ).status == 415
    assert post(srv, "/account", b"do=logout&do=login&csrf=" + token.encode(), {
        "Content-Type": "application/x-www-form-urlencoded",
        "Cookie": "; ".join("%s=%s" % c for c in cookies.items())}).status == 400
    assert post(srv, "/account", b"%ff=1", {
        "Content-Type": "application/x-www-form-urlencoded"}).status == 400
    # What a form did is shown from a cookie signed for this session: one made up, or
    # another session's, says nothing.
    made_up = "W1wiSGFja2VkXCIsIG51bGxd." + "0" * 64
    assert "Hacked" not in page_get(srv, dict(cookies, ankisync_said=made_up)).body.decode()
    logout = form_post(srv, {"do": "logout", "csrf": token}, cookies)
    assert logout.status == 303 and cookies_set(logout)["ankisync_session"][0] == ""
    # The cookie is dead on the server too: a copy kept elsewhere is no login.
    assert "<h1>Log in</h1>" in page_get(srv, cookies).body.decode()


def test_a_stranger_sees_only_the_login_form_and_no_user_data(start_server, make_device):
    """Pages answer a stranger nothing but the login form: no name, no count, no package,
    no stats; the front page names no user either."""
    srv = start_server(users=(("alice-private", "pw-private"),))
    phone = make_device("modern", "phone", user="alice-private", password="pw-private", on=srv)
    phone.do("add_notes", deck="Default", prefix="secret-note", count=3)
    first_upload(phone)
    seen = []
    for path in ("/", "/account", "/account/", "//account", "/account/collection.colpkg",
                 "/api/stats"):
        answer = post(srv, path, method="GET")
        seen.append((path, answer.status))
        assert b"alice-private" not in answer.body and b"secret-note" not in answer.body
        assert not answer.body.startswith(b"PK")                # no package
        if path.startswith("/account"):
            assert "<h1>Log in</h1>" in answer.body.decode()
    assert [status for _, status in seen] == [200, 200, 200, 200, 403, 401]
    for authorization in ("Bearer nonsense", "Bearer ", "Basic YTpi", ""):
        stats = post(srv, "/api/stats", method="GET", headers={"Authorization": authorization})
        assert stats.status == 401 and b"alice" not in stats.body
        assert (b"unknown or revoked" in stats.body) == (authorization == "Bearer nonsense")
        assert stats.headers["WWW-Authenticate"].startswith("Bearer")
    # A host key is no API token, nor the other way round.
    key = modern(srv, "hostKey", {"u": "alice-private", "p": "pw-private"}).json()["key"]
    assert post(srv, "/api/stats", method="GET",
                headers={"Authorization": "Bearer " + key}).status == 401


def test_page_cookies_are_secure_over_https_and_from_a_proxy_that_ended_tls(start_server,
                                                                           tmp_path):
    """Secure (never sent in clear): over the server's own HTTPS, and behind a trusted
    proxy that says it ended TLS (X-Forwarded-Proto: https); not over plain HTTP, nor when
    an address that is no trusted proxy only claims it."""
    tls = start_server(certificate=make_certificate(str(tmp_path / "tls")))
    cookies, answer = page_login(tls)
    assert answer.status == 303 and "; Secure" in answer.headers["Set-Cookie"]
    assert "<h1>%s</h1>" % USER in page_get(tls, cookies).body.decode()
    proxied = start_server(ini="ip_header = X-Forwarded-For\ntrusted_proxies = 127.0.0.1\n")
    claimed = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.7"}
    for source, secure in (("127.0.0.1", True), ("127.0.0.2", False)):
        page = post(proxied, "/account", method="GET", headers=claimed, source=source)
        assert page.status == 200 and ("; Secure" in page.headers["Set-Cookie"]) == secure


def test_a_session_ends_at_its_expiry(start_server):
    srv = start_server(env={ankisync.PAGE_SESSION_TEST: "2"})
    cookies, answer = page_login(srv)
    assert "Max-Age=2;" in answer.headers["Set-Cookie"]
    assert "<h1>%s</h1>" % USER in page_get(srv, cookies).body.decode()
    time.sleep(3)           # the browser would drop it by now; one that kept it gets no more
    expired = page_get(srv, cookies)
    assert "<h1>Log in</h1>" in expired.body.decode() and "<h1>%s" % USER not in \
        expired.body.decode()


def test_wrong_passwords_on_the_page_throttle_sync_logins_from_that_address(start_server):
    """One LoginGuard: five wrong passwords on the account page lock the address out of
    hostKey too (even with the right password), and the other way round."""
    srv = start_server(users=((USER, PASSWORD), ("bob", "bobs")))
    guesser = "127.0.0.2"
    for _ in range(ankisync.LOGIN_FAILURES_ALLOWED):
        _, answer = page_login(srv, password="wrong", source=guesser)
        assert answer.status == 403 and "wrong user name or password" in answer.body.decode()
    _, answer = page_login(srv, source=guesser)
    assert answer.status == 429 and int(answer.headers["Retry-After"]) > 0
    sync = modern(srv, "hostKey", {"u": USER, "p": PASSWORD}, source=guesser)
    assert sync.status == 429
    assert modern(srv, "hostKey", {"u": USER, "p": PASSWORD}).status == 200   # others log in
    other = "127.0.0.3"         # bob: the name "user" is paced by now, from anywhere
    for _ in range(ankisync.LOGIN_FAILURES_ALLOWED):
        assert modern(srv, "hostKey", {"u": "bob", "p": "wrong"}, source=other).status == 403
    _, answer = page_login(srv, "bob", "bobs", source=other)
    assert answer.status == 429 and "<h1>Log in</h1>" in answer.body.decode()


def test_in_a_browser_a_user_sees_their_counts_downloads_the_colpkg_makes_a_token_and_changes_the_password(  # noqa: E501
        start_server, make_device, browser, tmp_path):
    """The account page in a real browser, at phone and desktop width: log in with the
    sync password; the counts a 26.9.3 device uploaded; the .colpkg downloaded imports
    in Anki whole; an API token answers /api/stats until revoked; a new password logs
    the device out (Anki's own AuthFailed) and in again with it."""
    from anki.errors import SyncError as AnkiSyncError, SyncErrorKind
    srv = start_server()
    laptop = make_device("modern", "laptop", on=srv)
    laptop.do("build_sample")
    laptop.do("review", deck="Lang::Deutsch", count=3)
    laptop.do("write_media", files=[["a.jpg", 2000, 5], ["b c.png", 4000, 6]])
    first_upload(laptop)
    laptop.sync_media()
    admin(srv, "backup", USER)
    (point, _, _), = restore_points(srv)
    notes, cards = laptop.col.note_count(), laptop.col.card_count()
    url = "http://ankisync.lan:%d/account" % srv.port
    for width, height, name in [(390, 844, "phone"), (1280, 800, "desktop")]:
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(url)
        screenshot(page, "account-login-%s" % name)
        page.fill("input[name=name]", USER)
        page.fill("input[name=password]", PASSWORD)
        page.click("button:has-text('Log in')")
        page.wait_for_selector("h1:text('%s')" % USER)
        rows = dict(zip(page.locator("th").all_text_contents(),
                        page.locator("td").all_text_contents()))
        assert rows["Notes"] == str(notes) and rows["Cards"] == str(cards)
        assert rows["Media files"].startswith("2, ")
        lists = page.locator("ul").all_text_contents()
        assert "26.09.3" in lists[0] and "(full upload)" in lists[0]      # the device
        assert point in lists[1] and "manual: %d notes" % notes in lists[1]
        screenshot(page, "account-%s" % name)
        assert page.evaluate("document.documentElement.scrollWidth") <= width   # no sideways
        page.close()
    page = browser.new_page(viewport={"width": 390, "height": 844})
    page.goto(url)
    page.fill("input[name=name]", USER)
    page.fill("input[name=password]", PASSWORD)
    page.click("button:has-text('Log in')")
    assert "HttpOnly" not in page.evaluate("document.cookie") and \
        page.evaluate("document.cookie") == ""              # no script sees either cookie
    with page.expect_download() as download:
        page.click("text=Download the collection as .colpkg")
    package = str(tmp_path / "downloaded.colpkg")
    download.value.save_as(package)
    assert download.value.suggested_filename.endswith(".colpkg")
    assert_imports_as(package, str(tmp_path / "imported"), laptop)

    page.fill("input[name=label]", "home assistant")
    page.click("button:has-text('Make a token')")
    token = page.locator(".note code").text_content()
    stats = post(srv, "/api/stats", method="GET", headers={"Authorization": "Bearer " + token})
    assert stats.status == 200 and stats.headers["Content-Type"] == "application/json"
    counted = stats.json()
    assert (counted["notes"], counted["cards"], counted["media_files"]) == (notes, cards, 2)
    assert counted["collection_bytes"] > 0 and counted["media_bytes"] == 6000
    assert counted["user"] == USER and counted["last_sync"] > time.time() - 600
    with open(os.path.join(HERE, "README.md")) as f:          # the README's example
        example = re.search(r'\n(\{"cards".*?\})\n', f.read(), re.DOTALL).group(1)
    assert sorted(json.loads(example)) == sorted(counted)
    page.goto(url)
    assert token not in page.content()                      # shown once only
    assert "home assistant" in page.content()
    with page.expect_navigation():
        page.click("button:has-text('Revoke')")
    assert "Revoked the token home assistant" in page.locator(".note").text_content()
    assert "home assistant" not in " ".join(page.locator("li").all_text_contents())
    assert post(srv, "/api/stats", method="GET",
                headers={"Authorization": "Bearer " + token}).status == 401

    page.fill("input[name=old]", PASSWORD)
    page.fill("input[name=new]", "new pass")
    page.fill("input[name=again]", "new pass")
    page.click("button:has-text('Change password')")
    assert "Every device must log in again" in page.locator(".note").text_content()
    assert page.locator("h1").text_content() == USER        # this browser stays logged in
    screenshot(page, "account-password-changed")
    laptop.do("add_notes", deck="Default", prefix="after", count=1)
    with pytest.raises(AnkiSyncError) as refused:
        laptop.sync()
    assert refused.value.kind == SyncErrorKind.AUTH
    laptop.password, laptop.auth = "new pass", None
    assert laptop.sync() == "normal_sync"
    page.close()


def test_with_only_a_phone_browser_a_user_undoes_a_mistaken_upload(start_server, make_device,
                                                                   browser, tmp_path):
    """The laptop has 30 notes and a picture; a new phone answers Upload by mistake. In a
    phone-sized browser the user logs in, finds the restore point the upload left,
    downloads it (a .colpkg that imports as the laptop's collection), is told what a
    restore does before it happens, restores; a reload restores nothing twice. Both
    devices' next syncs ask for a full sync, and Download brings the 30 notes back.
    Logging out ends the session, for a copy of its cookie too."""
    srv = start_server()
    laptop = make_device("modern", "laptop", on=srv)
    laptop.do("add_notes", deck="Lang::Deutsch", prefix="Wort", count=30)
    laptop.do("write_media", files=[["haus.jpg", 3000, 1]])
    first_upload(laptop)
    laptop.sync_media()
    phone = make_device("modern", "phone", on=srv)
    phone.do("add_notes", deck="Default", prefix="phone", count=5)
    assert phone.sync() == "full_sync"
    phone.full_upload()                                     # the mistake
    (point, why, notes), = restore_points(srv)
    assert (why, notes) == ("upload", 30)

    url = "http://ankisync.lan:%d/account" % srv.port
    phone_browser = browser.new_context(viewport={"width": 390, "height": 844})
    page = phone_browser.new_page()
    page.goto(url)
    page.fill("input[name=name]", USER)
    page.fill("input[name=password]", PASSWORD)
    page.click("button:has-text('Log in')")
    item = page.locator("li:has(code:text-is('%s'))" % point)
    assert "before a full upload" in item.text_content() and "30 notes" in item.text_content()
    with page.expect_download() as download:
        item.locator("a:text('Download')").click()
    package = str(tmp_path / "point.colpkg")
    download.value.save_as(package)
    assert_imports_as(package, str(tmp_path / "imported"), laptop)

    item.locator("button").click()
    page.wait_for_selector("h1:text('Restore %s?')" % point)
    screenshot(page, "account-restore-asks")
    asked = page.locator("body").text_content()
    assert "choose Download" in asked and "Upload would send back" in asked
    cells = page.locator("td").all_text_contents()
    assert cells == ["30", "30", "5", "5"]                   # the point's and today's
    assert len(restore_points(srv)) == 1                    # asking changed nothing
    other_tab = phone_browser.new_page()                     # the same question, twice
    other_tab.goto(page.url)
    page.click("button:has-text('Restore %s')" % point)
    said = page.locator(".note").text_content()
    assert "restored %s of %s: 30 notes" % (point, USER) in said
    assert "restoring it undoes this" in said and "choose Download" in said
    screenshot(page, "account-restored")
    assert page.url == url                                  # by GET, after a 303
    page.reload()
    assert page.locator(".note").count() == 0               # said once
    other_tab.click("button:has-text('Restore %s')" % point)   # answers a page now stale
    assert "nothing was restored" in other_tab.locator(".note").text_content()
    other_tab.close()
    assert [why for _, why, _ in restore_points(srv)] == ["restore", "upload"]
    assert "account from 127.0.0.1: restored %s of %s" % (point, USER) in srv.log()

    for device in (laptop, phone):
        assert device.sync() == "full_sync", device
        device.full_download()
        assert note_count(device) == 30, device

    cookies = {c["name"]: c["value"] for c in page.context.cookies()}
    page.click("button:has-text('Log out')")
    page.wait_for_selector("h1:text('Log in')")
    assert "<h1>Log in</h1>" in page_get(srv, cookies).body.decode()
    phone_browser.close()


def test_a_user_restores_and_downloads_only_their_own_restore_points(start_server,
                                                                     make_device):
    """The account page acts on its own user: a form naming another user, or another
    user's point, restores nothing of theirs; a point that is not there is a one-line
    404 or 400; a malformed query is a 400, never the collection of today instead."""
    srv = start_server(users=((USER, PASSWORD), ("bob", "bobs")))
    for name, password, count in ((USER, PASSWORD, 3), ("bob", "bobs", 4)):
        device = make_device("modern", name, user=name, password=password, on=srv)
        device.do("add_notes", deck="Default", prefix=name, count=count)
        first_upload(device)
        admin(srv, "backup", name)
        time.sleep(1.1)     # ids are seconds, each user's own: the two must differ here
    (bobs, _, _), = restore_points(srv, "bob")
    assert bobs not in [point for point, _, _ in restore_points(srv)]
    cookies, _ = page_login(srv)
    token = page_form(page_get(srv, cookies))
    for fields in ({"id": bobs}, {"id": bobs, "name": "bob", "seen": "x"}):
        answer = form_post(srv, dict(fields, do="restore", csrf=token), cookies)
        assert answer.status == 400 and "no restore point" in answer.body.decode()
    asked = page_get(srv, cookies, path="/account?ask=restore&id=%s&name=bob" % bobs)
    assert asked.status == 404 and "no restore point" in asked.body.decode()
    assert [why for _, why, _ in restore_points(srv, "bob")] == ["manual"]
    # Their own point: asked by GET, confirmed by the form it shows, once. The same form
    # again (a second tab, Back and resubmit) restores nothing.
    (own, _, _), = restore_points(srv)
    asked = page_get(srv, cookies, path="/account?ask=restore&id=" + own)
    seen = re.search(r'name="seen" value="([^"]+)"', asked.body.decode()).group(1)
    confirm = {"do": "restore", "csrf": page_form(asked), "id": own, "seen": seen}
    assert followed(srv, form_post(srv, confirm, cookies), cookies).status == 200
    again = form_post(srv, confirm, cookies)
    assert again.status == 409 and "nothing was restored" in again.body.decode()
    assert [why for _, why, _ in restore_points(srv)] == ["restore", "manual"]
    for query, status in (("point=" + bobs, 404), ("point=nope", 404), ("point=", 404),
                          ("point=%ff", 400), ("point", 400),
                          ("point=a&point=b&" + "x=1&" * 10, 400), ("p" * 300, 400)):
        answer = page_get(srv, cookies, path="/account/collection.colpkg?" + query)
        assert answer.status == status and not answer.body.startswith(b"PK"), query
        assert answer.body.decode().count("\n") == 1
    assert "Traceback" not in srv.log()


# --- what there is to study: Anki's day, reckoned on the server ---

CHRONO_TZ_RECHECK = 1.5     # seconds: the wheel's chrono looks at TZ again after 1 s at most
NEPAL = -345                # Anki's minutes west of UTC for +5:45: a zone off the whole hour


@pytest.fixture
def time_zone(monkeypatch):
    """time_zone(name): this process (and the anki wheel in it) lives in that zone until
    the test ends."""
    moved = []

    def live_in(name):
        monkeypatch.setenv("TZ", name)
        time.tzset()
        time.sleep(CHRONO_TZ_RECHECK)
        moved.append(name)

    yield live_in
    if moved:
        monkeypatch.undo()
        time.tzset()
        time.sleep(CHRONO_TZ_RECHECK)       # the next test's collections in its own zone


def set_rollover(col, hour):
    """Preferences > Review > Next day starts at: Anki's own way, which forgets the day
    it had reckoned (a raw set_config would keep it until the old day ends)."""
    prefs = col.get_preferences()
    prefs.scheduling.rollover = hour
    col.set_preferences(prefs)


def a_day_of_study(col):
    """Cards and reviews on both sides of the collection's day start, written by hand as
    a device's own changes (usn -1), so they sync: reviews due yesterday, today and
    tomorrow, learning cards inside and beyond the learn-ahead limit, a suspended review,
    new cards, a buried and a suspended new one; reviews a minute after and a minute
    before the day started, a manual entry and a rescheduling, and days studied back to
    the day before yesterday, then a gap (with only a manual entry in it) and one more.
    Anki's is:due, is:new and "Studied N cards today" of it are the test's 4, 2 and 2,
    the streak 3 days."""
    cids = sorted(col.find_cards("deck:Default"))
    assert len(cids) >= 11
    today, now = col.sched.today, int(time.time())
    # (type, queue, due) in Anki's numbers: type 2 review, 1 learning, 0 new; queue as
    # the type, or -1 suspended, -3 buried by hand; a learning card in queue 3 is due
    # on a day, in queue 1 at a second.
    states = [(2, 2, today - 1), (2, 2, today), (2, 2, today + 1),
              (1, 3, today),
              (1, 1, now + 600), (1, 1, now + 3600),        # within the 1200 s, beyond
              (2, -1, today - 1),
              (0, -3, 1000), (0, -1, 1001), (0, 0, 1002), (0, 0, 1003)]
    for cid, (kind, queue, due) in zip(cids, states):
        col.db.execute("update cards set type = ?, queue = ?, due = ?, ivl = ?, usn = -1, "
                       "mod = ? where id = ?", kind, queue, due, 1 if kind == 2 else 0,
                       now, cid)
    start = (col.sched.day_cutoff - 86400) * 1000
    day = 86_400_000
    for offset, kind in [(60_000, 1), (90_000, 0), (120_000, 4), (150_000, 5),   # today
                         (-60_000, 1), (-day - 60_000, 2), (-2 * day - 60_000, 4),
                         (-3 * day - 60_000, 1)]:
        col.db.execute("insert into revlog (id, cid, usn, ease, ivl, lastIvl, factor, time, "
                       "type) values (?, ?, -1, 3, 1, 0, 2500, 6000, ?)", start + offset,
                       cids[0], kind)
    return 4, 2, 2, 3


def api_stats(srv, user=USER, password=PASSWORD):
    """/api/stats as a dashboard reads it, with a token made on the account page."""
    cookies, _ = page_login(srv, user, password)
    made = followed(srv, form_post(srv, {"do": "token", "csrf": page_form(
        page_get(srv, cookies)), "label": "dashboard"}, cookies), cookies)
    token = re.search(r"shown this once: <code>([^<]+)</code>", made.body.decode()).group(1)
    stats = post(srv, "/api/stats", method="GET", headers={"Authorization": "Bearer " + token})
    assert stats.status == 200, stats
    return stats.json(), cookies


def studied_today(col):
    """N of the wheel's "Studied N cards in M seconds today"."""
    return int(re.search(r"\d+", col.studied_today()).group())


@pytest.mark.parametrize("zone,minutes_west", [("UTC", None), ("Asia/Kathmandu", NEPAL)])
@pytest.mark.parametrize("rollover_from_now", [-1, 12], ids=["day-began-an-hour-ago",
                                                            "day-ends-in-12-hours"])
def test_due_new_and_reviewed_today_are_the_wheel_s_own_counts_in_the_collection_s_day(
        start_server, make_device, time_zone, zone, minutes_west, rollover_from_now):
    """A laptop in Kathmandu (+5:45) or in UTC, its day starting at an hour chosen from
    the clock (an hour ago, or in twelve: never near now), uploads cards and reviews on
    both sides of its day start. The server, itself in another zone, answers on
    /api/stats and the account page what the anki wheel counts for the same collection:
    is:due, new cards, "Studied N cards today"; and the streak."""
    srv = start_server(env={"TZ": "America/St_Johns"})     # -3:30: the server's own zone
    time_zone(zone)                                         # must not count
    laptop = make_device("modern", "laptop", on=srv)
    col = laptop.col
    set_rollover(col, (time.localtime().tm_hour + rollover_from_now) % 24)
    laptop.do("add_notes", deck="Default", prefix="study", count=11)
    expected = a_day_of_study(col)
    assert col.get_config("localOffset", None) == minutes_west     # what the device syncs
    first_upload(laptop)
    wheel = (len(col.find_cards("is:due")), len(col.find_cards("is:new -is:suspended -is:buried")),
             studied_today(col))
    assert wheel == expected[:3]
    stats, cookies = api_stats(srv)
    assert (stats["due"], stats["new"], stats["reviewed_today"], stats["streak"]) == expected
    assert (stats["notes"], stats["cards"]) == (11, 11)                # the old keys stay
    page = page_get(srv, cookies).body.decode()
    rows = dict(re.findall(r"<tr><th>([^<]+)</th><td>([^<]*)</td></tr>", page))
    assert (rows["Due today"], rows["New"], rows["Reviewed today"], rows["Streak"]) == (
        "4", "2", "2", "3 days")


def test_the_streak_waits_for_today_and_grows_with_a_review(start_server, make_device):
    """Reviews yesterday and the day before: a streak of 2 while today has none yet (the
    day is not over), 0 studied today; the laptop answers a card and syncs: 3, and 1
    studied today, as the wheel says. A day without a review ends the streak."""
    srv = start_server()
    laptop = make_device("modern", "laptop", on=srv)
    col = laptop.col
    set_rollover(col, (time.localtime().tm_hour + 12) % 24)
    laptop.do("add_notes", deck="Default", prefix="streak", count=3)
    start = (col.sched.day_cutoff - 86400) * 1000
    for days_ago in (1, 2, 4):
        col.db.execute("insert into revlog (id, cid, usn, ease, ivl, lastIvl, factor, time, "
                       "type) values (?, ?, -1, 3, 1, 0, 2500, 6000, 1)",
                       start - (days_ago - 1) * 86_400_000 - 60_000,
                       col.find_cards("deck:Default")[0])
    first_upload(laptop)
    stats, _ = api_stats(srv)
    assert (stats["reviewed_today"], stats["streak"]) == (0, 2) and studied_today(col) == 0
    laptop.do("review", deck="Default", count=1)
    sync_normally(laptop)
    stats, _ = api_stats(srv)
    assert (stats["reviewed_today"], stats["streak"]) == (1, 3)
    assert studied_today(col) == 1
    assert ankisync.study_streak([]) == 0 and ankisync.study_streak([2, 3]) == 0
    assert ankisync.study_streak([0, 2, 3]) == 1 and ankisync.study_streak([1]) == 1


def utc(*when):
    return int(datetime.datetime(*when, tzinfo=datetime.timezone.utc).timestamp())


def test_anki_s_day_on_the_server_v1_v2_legacy_and_v2_new_by_hand():
    """The three ways rslib reckons a day, on values worked out by hand: a collection
    made in Nepal (+5:45) at 10:00 on 1 January 2024, its day starting at 4:00; "now" a
    second before and at 4:00 Nepal time on 3 January (22:15 UTC the day before)."""
    nepal = ankisync.utc_offset(NEPAL)
    crt = utc(2024, 1, 1, 4, 15)                        # 10:00 in Nepal
    before, at = utc(2024, 1, 2, 22, 14, 59), utc(2024, 1, 2, 22, 15)
    timing = ankisync.sched_timing_today
    # v2, creationOffset set: calendar days in each offset, less one before the rollover.
    assert timing(crt, before, nepal, nepal, 4) == (1, at)
    assert timing(crt, at, nepal, nepal, 4) == (2, at + 86400)
    # Made in Nepal, now in Newfoundland (-3:30, 9:45 on 2 January then): day 1 till
    # 4:00 there on the 3rd.
    newfoundland = ankisync.utc_offset(210)
    assert timing(crt, utc(2024, 1, 2, 13, 15), nepal, newfoundland, 4) == (
        1, utc(2024, 1, 3, 7, 30))
    # v2 without creationOffset: whole days since crt's day start in today's offset; at
    # the very second of the rollover, Anki's next day is that second.
    assert timing(crt, before, None, nepal, 4) == (1, at)
    assert timing(crt, at, None, nepal, 4) == (2, at)
    assert timing(crt, at + 1, None, nepal, 4) == (2, at + 86400)
    # v1: days of 24 hours from crt itself, whatever the offsets.
    assert timing(crt, crt + 2 * 86400 - 1, None, nepal, None) == (1, crt + 2 * 86400)
    assert timing(crt, crt + 2 * 86400, nepal, nepal, None) == (2, crt + 3 * 86400)
    # rslib's own test values (legacy_timing, in Brisbane's +10:00).
    brisbane, now = ankisync.utc_offset(-600), 1584491078
    assert timing(1575226800, now, None, brisbane, None) == (107, 1584558000)
    assert timing(1533564000, now, None, brisbane, 0) == (589, 1584540000)
    assert timing(1524038400, now, None, brisbane, 4) == (700, 1584554400)
    # From a config: schedVer 1 or missing is v1; rollover capped at 23; an offset of a
    # day or more, or none, is UTC.
    conf = {"schedVer": 2, "rollover": 30, "creationOffset": 0, "localOffset": 24 * 60}
    assert ankisync.collection_timing(conf, utc(2024, 1, 1), utc(2024, 1, 3, 22, 59)) == (
        1, utc(2024, 1, 3, 23))
    assert ankisync.collection_timing({}, crt, at) == timing(crt, at, None, None, None)
    assert ankisync.collection_timing({"schedVer": 2, "localOffset": NEPAL}, crt, at) == (
        2, at)


def test_study_counts_of_no_collection_or_a_broken_one_are_zeros(tmp_path):
    zeros = {"due": 0, "new": 0, "reviewed_today": 0, "streak": 0}
    assert ankisync.study_counts(str(tmp_path / "none.anki2")) == zeros
    broken = tmp_path / "broken.anki2"
    broken.write_bytes(b"SQLite format 3\0" + b"\xff" * 4000)
    assert ankisync.study_counts(str(broken)) == zeros
    db = sqlite3.connect(str(tmp_path / "odd.anki2"))
    db.execute("create table col (crt, conf)")
    db.execute("insert into col values (0, '[1]')")
    db.commit()
    db.close()
    assert ankisync.study_counts(str(tmp_path / "odd.anki2")) == zeros


# --- the admin page ---------------------------------------------------------------------

ADMIN_TOKEN = "correct horse admin staple"


@pytest.fixture(scope="module")
def admin_hash():
    """The hash `ankisync.py hash` prints for ADMIN_TOKEN: what admin_token holds."""
    printed = run_ankisync("hash", stdin=ADMIN_TOKEN + "\n")
    assert printed.returncode == 0, printed.stderr
    return printed.stdout.strip()


def admin_login(srv, token=ADMIN_TOKEN, source=None):
    """page_login on /admin: the admin's cookies, and the answer to the login."""
    first = page_get(srv, {}, path="/admin", source=source)
    cookies = {name: value for name, (value, _) in cookies_set(first).items()}
    answer = form_post(srv, {"do": "login", "csrf": page_form(first), "password": token},
                       cookies, source=source, path="/admin")
    cookies.update({name: value for name, (value, _) in cookies_set(answer).items()})
    return cookies, answer


def test_the_admin_page_is_off_without_admin_token_and_refused_elsewhere_or_without_the_token(
        start_server, admin_hash, tmp_path):
    """No admin_token: /admin is a 404. With it: another address gets a one-line 403
    before any form (admin_from is this machine by default, or what it names); a wrong
    token is no login and counts in the LoginGuard; the ini takes only a hash, and
    admin_token_file holds one as a container secret does."""
    plain = start_server()
    assert post(plain, "/admin", method="GET").status == 404
    srv = start_server(ini="admin_token = %s\n" % admin_hash)
    for method in ("GET", "POST"):
        refused = post(srv, "/admin", b"do=login", method=method, source="127.0.0.2",
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert refused.status == 403 and refused.body.decode().count("\n") == 1
        assert b"admin_from" in refused.body and b"<form" not in refused.body
    assert "admin page refused to 127.0.0.2" in srv.log()
    assert "admin page on at /admin, from 127.0.0.1/32, ::1/128" in srv.log()
    # Through a proxy on this machine, without ip_header, everyone would be 127.0.0.1.
    proxied = post(srv, "/admin", method="GET", headers={"X-Forwarded-For": "203.0.113.5"})
    assert proxied.status == 403
    assert "<h1>Log in</h1>" in page_get(srv, {}, path="/admin").body.decode()
    cookies, answer = admin_login(srv, token="wrong")
    assert answer.status == 403 and "wrong admin token" in answer.body.decode()
    assert ankisync.ADMIN_COOKIE not in cookies
    assert "admin login failed from 127.0.0.1: wrong token" in srv.log()
    assert "<h1>Admin</h1>" not in page_get(srv, cookies, path="/admin").body.decode()
    # A user's sync password, or their account session, is no admin login.
    _, answer = admin_login(srv, token=PASSWORD)
    assert answer.status == 403
    account, _ = page_login(srv)
    forged = {ankisync.ADMIN_COOKIE: account["ankisync_session"]}
    assert "<h1>Admin</h1>" not in page_get(srv, forged, path="/admin").body.decode()
    cookies, answer = admin_login(srv)
    assert answer.status == 303 and answer.headers["Location"] == "/admin"
    flags = [a.strip() for a in cookies_set(answer)[ankisync.ADMIN_COOKIE][1].split(";")]
    assert "Path=/admin" in flags and "HttpOnly" in flags and "SameSite=Strict" in flags
    page = page_get(srv, cookies, path="/admin").body.decode()
    assert "<h1>Admin</h1>" in page and "<td>%s</td>" % USER in page
    # Its session opens /admin only from admin_from, even with the cookie.
    assert page_get(srv, cookies, path="/admin", source="127.0.0.2").status == 403

    secret = tmp_path / "admin-secret"
    secret.write_text(admin_hash + "\n")
    other = start_server(ini="admin_token_file = %s\nadmin_from = 127.0.0.2, 10.0.0.0/8\n"
                         % secret)
    assert post(other, "/admin", method="GET").status == 403
    _, answer = admin_login(other, source="127.0.0.2")
    assert answer.status == 303
    text = refused_serve(tmp_path, "[server]\nadmin_token = %s\n" % ADMIN_TOKEN)
    assert "admin_token takes the hash `ankisync.py hash` prints" in text, text
    assert ADMIN_TOKEN not in text and "Traceback" not in text



def test_admin_forms_refuse_a_missing_token_another_site_and_the_account_page_s_token(
        start_server, admin_hash):
    """CSRF: an admin form without this browser's token, with another page's, or from
    another site changes nothing; with its own it does, and says so in the log."""
    srv = start_server(ini="admin_token = %s\n" % admin_hash)
    cookies, _ = admin_login(srv)
    page = page_get(srv, cookies, path="/admin")
    token = page_form(page)
    account = page_form(page_get(srv, {}))
    add = {"do": "adduser", "csrf": token, "name": "mallory", "password": "pw"}
    for fields, jar, headers in [
            (dict(add, csrf=""), cookies, {}),
            (dict(add, csrf=account), cookies, {}),
            (add, dict(cookies, ankisync_admin_form="A" * 32), {}),
            (add, cookies, {"Origin": "http://evil.example"}),
            (add, cookies, {"Sec-Fetch-Site": "cross-site"})]:
        refused = form_post(srv, fields, jar, headers, path="/admin")
        assert refused.status == 403 and "refused" in refused.body.decode(), (fields, headers)
    assert "mallory" not in admin(srv, "lsuser").stdout
    answer = followed(srv, form_post(srv, add, cookies, path="/admin"), cookies)
    assert answer.status == 200 and "added user mallory" in answer.body.decode()
    assert 'class="note"' not in page_get(srv, cookies, path="/admin").body.decode()  # once
    assert "mallory" in admin(srv, "lsuser").stdout
    assert "admin from 127.0.0.1: added user mallory" in srv.log()
    # A user's mistake is a line on the page, not a traceback.
    again = form_post(srv, add, cookies, path="/admin")
    assert again.status == 400 and "already exists" in again.body.decode()
    reset = followed(srv, form_post(srv, {"do": "passwd", "csrf": token, "name": USER,
                                          "password": "x"}, cookies, path="/admin"), cookies)
    assert reset.status == 200 and "SYNC_USERn" in reset.body.decode()     # as `passwd` says
    # A notice keeps its lines, not control characters a device would show as boxes.
    followed(srv, form_post(srv, {"do": "notice", "csrf": token, "notice": "one\r\ntwo\x01"},
                            cookies, path="/admin"), cookies)
    with open(os.path.join(srv.base, ankisync.NOTICE_FILE), encoding="utf-8") as f:
        assert f.read() == "one\ntwo"
    nobody = form_post(srv, {"do": "restore", "csrf": token, "name": "nobody", "id": "1"},
                       cookies, path="/admin")
    assert nobody.status == 400 and "no user" in nobody.body.decode()
    assert "Traceback" not in srv.log()


def test_in_a_browser_the_admin_adds_a_user_who_syncs_resets_restores_and_deletes_them(
        start_server, make_device, browser, tmp_path, admin_hash):
    """The admin page in a real browser, at phone and desktop width: log in with the
    token; add a user, as whom a 26.9.3 device then syncs; a new password asks that
    device to log in; a restore from the page makes its next sync a full one; the notice
    set there reaches it; deleting the user with their data leaves nothing. Every change
    is in the server's log with "admin" and the address, and on the page's own log."""
    from anki.errors import SyncError as AnkiSyncError, SyncErrorKind
    srv = start_server(ini="admin_token = %s\n" % admin_hash)
    url = "http://ankisync.lan:%d/admin" % srv.port
    page = None
    for width, height, name in [(390, 844, "phone"), (1280, 800, "desktop")]:
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(url)
        screenshot(page, "admin-login-%s" % name)
        page.fill("input[name=password]", ADMIN_TOKEN)
        page.click("button:has-text('Log in')")
        page.wait_for_selector("h1:text('Admin')")
        screenshot(page, "admin-%s" % name)
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        if name == "phone":
            page.close()

    form = page.locator("form:has(input[value=adduser])")
    form.locator("input[name=name]").fill("carol")
    form.locator("input[name=password]").fill("carols pw")
    form.locator("button").click()
    assert "added user carol" in page.locator(".note").text_content()
    phone = make_device("modern", "carol-phone", user="carol", password="carols pw", on=srv)
    phone.do("add_notes", deck="Default", prefix="carol", count=3)
    first_upload(phone)
    assert phone.sync() == "no_changes"
    admin(srv, "backup", "carol")
    (point, _, _), = restore_points(srv, "carol")
    phone.do("add_notes", deck="Default", prefix="later", count=2)
    assert phone.sync() == "normal_sync"

    page.goto(url)
    rows = page.locator("tr:has(td:text-is('carol')) td").all_text_contents()
    assert rows[0] == "carol" and rows[2] == "5"                       # notes
    form = page.locator("form:has(input[value=passwd]):has(input[value=carol])")
    form.locator("input[name=password]").fill("carols new pw")
    form.locator("button").click()
    assert "changed the password of carol" in page.locator(".note").text_content()
    with pytest.raises(AnkiSyncError) as refused:
        phone.sync()
    assert refused.value.kind == SyncErrorKind.AUTH
    phone.password, phone.auth = "carols new pw", None
    assert phone.sync() == "no_changes"

    page.locator("form:has(input[value=restore]):has(input[value='%s']) button"
                 % point).click()
    # First what it does, changing nothing: the point's counts beside today's, the device.
    page.wait_for_selector("h1:text('Restore %s?')" % point)
    assert "26.09.3" in page.locator("ul").last.text_content()
    assert note_count(phone) == 5
    page.click("button:has-text('Restore %s')" % point)
    assert "restored %s of carol: 3 notes" % point in page.locator(".note").text_content()
    assert phone.sync() == "full_sync"
    phone.full_download()
    assert note_count(phone) == 3

    page.fill("textarea[name=notice]", "The server moves on Sunday")
    page.click("button:has-text('Set notice')")
    assert "set the notice" in page.locator(".note").text_content()
    assert "The server moves on Sunday" in phone.sync_told()[1]
    screenshot(page, "admin-after-changes")

    form = page.locator("form:has(input[value=deluser]):has(input[value=carol])")
    form.locator("input[name=data]").check()
    form.locator("button").click()
    page.wait_for_selector("h1:text('Delete carol?')")
    assert "3 notes" in page.content() and os.path.exists(os.path.join(srv.base, "carol"))
    screenshot(page, "admin-delete-asks")
    page.click("button:has-text('Delete carol and their data')")
    assert "deleted user carol and their data" in page.locator(".note").text_content()
    assert not os.path.exists(os.path.join(srv.base, "carol"))
    assert "carol" not in admin(srv, "lsuser").stdout
    with pytest.raises(AnkiSyncError) as refused:
        phone.sync()
    assert refused.value.kind == SyncErrorKind.AUTH

    log = srv.log()
    for change in ("added user carol", "changed the password of carol",
                   "restored %s of carol" % point, "set the notice",
                   "deleted user carol and their data"):
        assert "admin from 127.0.0.1: " + change in log, change
        assert "admin from 127.0.0.1: " + change in page.locator("pre").text_content(), change
    assert ADMIN_TOKEN not in log and "Traceback" not in log
    page.close()


def test_bytes_past_ascii_in_a_cookie_a_token_or_a_form_are_no_login_not_a_fault(
        start_server, make_device):
    """The fuzzer's finds: one byte past ASCII where a secret is compared (the form's
    token, the session's or the message cookie's MAC, the metrics token) is a refusal
    like any wrong secret, never a 500."""
    srv = start_server(ini="metrics = on\nmetrics_token = m3trics\n")
    cookies, _ = page_login(srv)
    name = cookies["ankisync_session"].split(".")[0]
    for sent in ({"Cookie": "ankisync_session=%s.9999999999.\xe9" % name},
                 {"Cookie": "; ".join("%s=%s" % c for c in cookies.items())
                  + "; ankisync_said=abc.\xe9"}):
        answer = post(srv, "/account", method="GET", headers=sent)
        assert answer.status == 200, answer
    refused = form_post(srv, {"do": "login", "csrf": "\xe9"}, {"ankisync_form": "A" * 24})
    assert refused.status == 403 and "refused" in refused.body.decode()
    metrics = post(srv, "/metrics", method="GET", headers={"Authorization": "Bearer \xe9"})
    assert metrics.status == 200            # this machine's, the token compared all the same
    assert "Traceback" not in srv.log()


def test_a_download_cut_off_while_its_body_is_read_leaves_no_package(start_server,
                                                                     make_device):
    """A logged-in browser that asks for the .colpkg with a body it never finishes:
    the package made for it is deleted, not left in the spool to fill the disk."""
    srv = start_server()
    device = make_device("modern", "laptop", on=srv)
    device.do("add_notes", deck="Default", prefix="n", count=3)
    first_upload(device)
    cookies, _ = page_login(srv)
    spool = os.path.join(srv.base, ".tmp")
    for _ in range(3):
        conn = socket.create_connection(("127.0.0.1", srv.port))
        conn.sendall(("GET /account/collection.colpkg HTTP/1.1\r\nHost: x\r\n"
                      "Cookie: %s\r\nContent-Length: 200000\r\n\r\n"
                      % "; ".join("%s=%s" % c for c in cookies.items())).encode())
        conn.sendall(b"x" * 65536)
        time.sleep(0.5)                 # the package is made while the rest is awaited
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()                    # a reset, not a goodbye
    deadline = time.time() + 10
    while time.time() < deadline and any(n.endswith(".colpkg") for n in os.listdir(spool)):
        time.sleep(0.1)
    assert not [n for n in os.listdir(spool) if n.endswith(".colpkg")]
    assert page_get(srv, cookies).status == 200


@pytest.fixture
def logged_in_pages(start_server, admin_hash):
    """A server with an admin page, and a browser logged in to both pages: (server,
    {page: (cookies, csrf token)}). Shared by every example of a fuzzed test."""
    srv = start_server(ini="admin_token = %s\n" % admin_hash)
    account, _ = page_login(srv)
    admin_cookies, _ = admin_login(srv)
    return srv, {"/account": (account, page_form(page_get(srv, account))),
                 "/admin": (admin_cookies, page_form(page_get(srv, admin_cookies,
                                                              path="/admin")))}


PAGE_ACTIONS = ["login", "password", "token", "revoke", "restore", "adduser", "passwd",
                "deluser", "notice"]              # not logout: the examples share a login
page_values = st.text(max_size=30)


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/account", "/admin", "/account/collection.colpkg",
                             "/api/stats"]),
       query=st.text(max_size=40), method=st.sampled_from(["GET", "POST"]),
       fields=st.dictionaries(st.sampled_from(["name", "password", "id", "confirmed", "new",
                                               "old", "again", "label", "notice", "data"])
                              | st.text(max_size=6), page_values, max_size=5),
       action=st.sampled_from(PAGE_ACTIONS) | page_values,
       raw=st.none() | st.binary(max_size=120), with_token=st.booleans(),
       cookie=st.none() | st.text(st.characters(min_codepoint=32, max_codepoint=255,
                                                blacklist_characters="\x7f"), max_size=120),
       authorization=st.none() | st.text(st.characters(min_codepoint=32, max_codepoint=255,
                                                       blacklist_characters="\x7f"),
                                         max_size=60))
def test_pages_answer_any_form_cookie_query_or_token_with_a_page_or_a_4xx(
        logged_in_pages, path, query, method, fields, action, raw, with_token, cookie,
        authorization):
    """Whatever a browser or a stranger sends the pages (logged in or not, with the right
    form token or none, a made-up cookie, a query, a bearer token, bytes that are no
    form), the answer is a page, a redirect or a 4xx in a line: never a 5xx, never a
    traceback in the log."""
    srv, logins = logged_in_pages
    cookies, token = logins.get(path, logins["/account"])
    body = raw if raw is not None else urllib.parse.urlencode(
        dict(fields, do=action, **({"csrf": token} if with_token else {}))).encode()
    headers = {"Content-Type": "application/x-www-form-urlencoded",
               "Cookie": cookie if cookie is not None else
               "; ".join("%s=%s" % item for item in cookies.items())}
    if authorization is not None:
        headers["Authorization"] = authorization
    target = path + ("?" + urllib.parse.quote(query, safe="=&%") if query else "")
    answer = post(srv, target, body if method == "POST" else b"", headers, method=method)
    assert answer.status < 500, (answer.status, answer.body[:200])
    if answer.status >= 400 and not answer.body.startswith(b"<!doctype"):
        assert answer.body.strip().count(b"\n") == 0, answer.body[:200]
    assert "Traceback" not in srv.log()


def refused_serve(tmp_path, ini):
    """`serve` with `ini`, which is to refuse to start: what it said, all of it."""
    config = tmp_path / ("refused-%d.ini" % random.randrange(10**6))
    config.write_text(ini)
    done = run_ankisync("serve", "--config", str(config),
                        env=dict(os.environ, SYNC_USER1="ana:pw"))
    assert done.returncode != 0, done.stdout
    return done.stdout + done.stderr


def test_each_client_gets_its_own_menu_path_on_the_front_page(server):
    page = post(server, "/", method="GET").body.decode()
    for client, path in [("Anki 2.1.57 and later", "Preferences &rarr; Syncing &rarr; "
                          "Self-hosted sync server"),
                         ("AnkiDroid 2.16 and later", "Settings &rarr; Sync &rarr; Custom sync "
                          "server"),
                         ("AnkiMobile", "Settings &rarr; Syncing &rarr; Custom server"),
                         ("AnkiDroid 2.15 and older", "Settings &rarr; Advanced &rarr; "
                          "Custom sync server")]:
        assert re.search(r"<th>%s[^<]*</th><td>%s" % (re.escape(client), re.escape(path)),
                         page), client
    assert page.count('onclick="copy(this)"') == page.count("<li>")


def test_an_oversize_body_is_answered_with_413_five_times_in_a_row(start_server):
    srv = start_server(env={"MAX_SYNC_PAYLOAD_MEGS": "1"})
    key = login(srv)
    big = ZSTD.compress(os.urandom(3 * 1024 * 1024))
    for _ in range(5):
        answer = post(srv, "/sync/upload", big, anki_sync_header(key))
        assert answer.status == 413 and b"max_payload_mb" in answer.body
    assert "max_payload_mb" in srv.log_tail()


def test_startup_errors_say_in_one_line_what_to_do(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        text = refused_serve(tmp_path, "[server]\nhost = 127.0.0.1\nport = %d\ndata = busy\n"
                             % port)
        assert "port %d is already in use" % port in text, text
        assert "Traceback" not in text and not (tmp_path / "busy").exists()
    text = refused_serve(tmp_path, "[server]\nhost = 192.0.2.55\nport = %d\n" % free_port())
    assert "is not an address of this machine" in text, text
    (tmp_path / "afile").write_text("x")
    text = refused_serve(tmp_path, "[server]\nhost = 127.0.0.1\nport = %d\ndata = afile\n"
                         % free_port())
    assert "is a file: set `data`" in text, text
    config = ankisync.Config()
    config.port = 80
    refused = ankisync.unbindable(config, PermissionError(errno.EACCES, "Permission denied"))
    assert "port 80 needs more rights" in refused and "above 1023" in refused


def test_adduser_says_when_a_name_takes_over_old_data_and_fresh_sets_it_aside(tmp_path):
    assert cli(tmp_path, "adduser", "ana", stdin="pw\n").returncode == 0
    folder = tmp_path / "data" / "ana"
    folder.mkdir()
    ankisync.create_collection(str(folder / "collection.anki2"))
    assert cli(tmp_path, "deluser", "ana").returncode == 0
    again = cli(tmp_path, "adduser", "ana", stdin="pw\n")
    assert again.returncode == 0 and "takes over the collection" in again.stdout
    assert cli(tmp_path, "deluser", "ana").returncode == 0
    fresh = cli(tmp_path, "adduser", "--fresh", "ana", stdin="pw\n")
    assert fresh.returncode == 0 and "old data folder is now" in fresh.stdout
    assert not (folder / "collection.anki2").exists()
    assert [p.name for p in (tmp_path / "data").iterdir() if p.name.startswith("ana.old-")]


def test_a_failed_login_is_logged_with_the_name_and_whether_it_exists(server):
    assert modern(server, "hostKey", {"u": USER, "p": "wrong-guess"}).status == 403
    assert modern(server, "hostKey", {"u": "ghost", "p": "wrong-guess"}).status == 403
    deadline = time.monotonic() + 10
    while "'ghost'" not in server.log_tail():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    log_text = server.log_tail()
    assert "login failed: %r from 127.0.0.1: wrong password" % USER in log_text
    assert "login failed: 'ghost' from 127.0.0.1: no such user" in log_text
    assert "wrong-guess" not in log_text


def test_health_asks_the_server_by_its_scheme_as_docker_does(server, start_server, tmp_path):
    env = dict(os.environ, SYNC_BASE=server.base, SYNC_HOST="127.0.0.1",
               SYNC_PORT=str(server.port))
    health = ankisync_command("health")
    done = subprocess.run(health, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "ok: http://127.0.0.1:%d/health" % server.port in done.stdout
    secure = start_server(certificate=make_certificate(str(tmp_path / "tls")))
    done = subprocess.run(health + ["--config", secure.config_path], capture_output=True,
                          text=True, timeout=60, env=dict(env, SYNC_PORT=str(secure.port)))
    assert done.returncode == 0 and "ok: https://" in done.stdout, done.stdout + done.stderr
    port = free_port()                  # nothing listens there
    done = subprocess.run(health, env=dict(env, SYNC_PORT=str(port)), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0 and "no answer from" in done.stderr
    with open(os.path.join(HERE, "Dockerfile")) as f:
        dockerfile = f.read()
    assert 'CMD ["python", "ankisync.py", "health"]' in dockerfile
    assert "useradd --system" not in dockerfile and "ENV SYNC_" not in dockerfile
    with open(os.path.join(HERE, "ankisync.ini")) as f:
        assert "\ndata = ankisync-data\n" in f.read()       # the line the image rewrites


def test_the_systemd_unit_in_the_readme_is_valid(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("no systemd on this machine")
    with open(os.path.join(HERE, "README.md")) as f:
        unit = re.search(r"```ini\n(\[Unit\].*?)```", f.read(), re.S).group(1)
    unit = unit.replace("/home/pi/ankisync", HERE).replace("User=pi", "User=root")
    unit = unit.replace("/usr/bin/python3", shutil.which("python3"))
    path = tmp_path / "ankisync.service"
    path.write_text(unit)
    done = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                          text=True, timeout=60)
    problems = [line for line in (done.stdout + done.stderr).splitlines()
                if "ankisync.service" in line]
    assert done.returncode == 0 and problems == [], done.stdout + done.stderr


# --- for the person running it: a notice on every device ---------------------------------


def test_a_notice_reaches_modern_and_legacy_clients_without_stopping_their_sync(start_server,
                                                                               make_device):
    notice = 'Server moves on <Sunday>: see https://example.org/move?a=1&b=2'
    srv = start_server(ini="notice = %s\n" % notice)
    laptop = make_device("modern", "laptop", on=srv)
    laptop.do("add_notes", deck="Default", prefix="x", count=2)
    laptop.login()
    out = laptop.col.sync_collection(laptop.auth, False)
    assert out.server_message == (
        'Server moves on &lt;Sunday&gt;: see <a href="https://example.org/move?a=1&amp;b=2">'
        'https://example.org/move?a=1&amp;b=2</a>')
    laptop.full_upload()
    assert laptop.sync() in ("normal_sync", "no_changes")        # the notice stops nothing
    key = login(srv)
    answer = legacy(srv, "meta", {"k": key, "s": "abc", "c": "1"},
                    json.dumps({"v": 10, "cv": "anki,2.1.54"}).encode())
    meta = answer.json()
    assert meta["msg"] == notice and meta["cont"] is True      # old clients print it as is


def test_a_moved_server_sends_modern_clients_on_and_tells_old_ones(start_server, make_device):
    old = start_server()
    laptop = make_device("modern", "laptop", on=old)
    laptop.do("add_notes", deck="Default", prefix="vorher", count=3)
    first_upload(laptop)
    old.stop()
    new = start_server(prepare=lambda base: shutil.copytree(old.base, base, dirs_exist_ok=True))
    old = start_server(base=old.base, port=old.port, ini="moved_to = %s\n" % new.url)

    laptop.do("add_notes", deck="Default", prefix="nachher", count=1)
    assert laptop.sync() == "normal_sync"
    assert laptop.auth.endpoint == new.url                      # followed, and remembered
    fresh = make_device("modern", "fresh", on=new)
    join_by_download(fresh)
    assert note_count(fresh) == 4
    key = login(old)
    meta = legacy(old, "meta", {"k": key, "s": "abc", "c": "1"},
                  json.dumps({"v": 10, "cv": "anki,2.1.54"}).encode()).json()
    assert not meta["cont"] and new.url in meta["msg"]


@pytest.mark.media
def test_a_moved_server_refuses_the_media_of_the_run_that_found_the_move(start_server,
                                                                         make_device):
    old = start_server()
    laptop = make_device("modern", "laptop", on=old)
    laptop.do("add_notes", deck="Default", prefix="vorher", count=2)
    before = write_media_on(laptop, [["vorher.jpg", 3000, 1]])
    first_upload(laptop)
    laptop.sync_media()
    old.stop()
    new = start_server(prepare=lambda base: shutil.copytree(old.base, base, dirs_exist_ok=True))
    old = start_server(base=old.base, port=old.port, ini="moved_to = %s\n" % new.url)
    added = write_media_on(laptop, [["neu %d.jpg" % i, 2000 + i, 10 + i] for i in range(3)])

    # One run as Anki runs it: the collection (meta's 308 followed, the new address
    # remembered), then media in the background from the address the run began with.
    laptop.do("add_notes", deck="Default", prefix="nachher", count=1)
    out = laptop.col.sync_collection(laptop.auth, True)
    assert out.new_endpoint == new.url
    with pytest.raises(Exception) as refused:
        wait_until(lambda: not laptop.col.media_sync_status().active, timeout=60,
                   every=0.05, what="the media sync of the run")
    # What the device shows: the move and the new address, not a bare status.
    assert "this sync server has moved to %s" % new.url in str(refused.value)
    assert not set(added) & set(os.listdir(os.path.join(old.base, USER, "media")))
    after_move = old.log().split(" sync/meta 308 ", 1)[1]
    assert set(re.findall(r" msync/\w+ (\d+) ", after_move)) == {"410"}

    # The next run goes to the new address, for the collection and for media.
    laptop.auth.endpoint = out.new_endpoint
    assert laptop.sync() in ("normal_sync", "no_changes")
    laptop.sync_media()
    stored = os.path.join(new.base, USER, "media")
    for name, sha1 in added.items():
        with open(os.path.join(stored, name), "rb") as f:
            assert hashlib.sha1(f.read()).hexdigest() == sha1
    fresh = make_device("modern", "fresh", on=new)
    join_by_download(fresh)
    fresh.sync_media()
    assert fresh.media_files() == dict(before, **added)


# --- for the person running it: status and metrics ---------------------------------------


def test_the_last_sync_is_the_latest_even_within_one_second(tmp_path):
    users = ankisync.UserStore(str(tmp_path))
    users.add("ann", "pw")
    users.saw("ann", "key1", "anki,26.9.3", "10.0.0.2", "upload")
    users.saw("ann", "key2", "anki,2.1.54", "10.0.0.3", "download")
    assert [d[0] for d in users.devices("ann")] == ["anki,2.1.54", "anki,26.9.3"]
    users.saw("ann", "key1", "anki,26.9.3", "10.0.0.2", "normal")
    assert [d[0] for d in users.devices("ann")] == ["anki,26.9.3", "anki,2.1.54"]
    # A new password, a new host key: the same device, one line, seen since its first sync.
    first = users.devices("ann")[0][2]
    users.saw("ann", "key3", "anki,26.9.3", "10.0.0.9", "normal")
    seen = users.devices("ann")
    assert [d[:3] for d in seen] == [("anki,26.9.3", "10.0.0.9", first),
                                     ("anki,2.1.54", "10.0.0.3", seen[1][2])]


@pytest.mark.legacy
def test_status_tells_each_users_collection_media_last_sync_devices_and_backups(server,
                                                                              make_device):
    laptop = make_device("modern", "laptop")
    laptop.do("add_notes", deck="Default", prefix="s", count=7)
    laptop.do("write_media", files=[["p.jpg", 3000, 1]])
    first_upload(laptop)
    laptop.sync_media()
    phone = make_device("legacy", "phone")                     # anki 2.1.54
    join_by_download(phone)
    rows = [re.split(r"\s{2,}", line) for line in admin(server, "status").stdout.splitlines()]
    assert rows[0][0].startswith("ankisync %s, data folder" % ankisync.__version__)
    row = dict(zip(rows[1], next(r for r in rows[2:] if r[0] == USER)))
    assert (row["notes"], row["cards"]) == ("7", "7")
    assert row["media"].startswith("1 files")
    assert "2.1.54" in row["last sync"] and "from 127.0.0.1" in row["last sync"]
    assert row["devices"] == "2"
    detail = admin(server, "status", USER).stdout
    assert detail.count("\ndevice ") == 2
    assert "(full upload)" in detail and "(full download)" in detail


def test_the_small_things_an_admin_meets_at_the_command_line(server, tmp_path):
    """`status | head` ends quietly; a device that updated Anki is still one device;
    `export` into a missing folder, `import` of a missing file and an import of nobody
    each say what is wrong in their own words."""
    users = ankisync.UserStore(server.base)
    for client, address in [("anki,2.1.54 (b6a7760c),lin:debian", "192.168.1.5"),
                            ("anki,26.9.3 (86e4a2a4),lin:debian", "192.168.1.5"),
                            ("ankidroid,2.15.6,Android", "192.168.1.7")]:
        users.saw(USER, "key", client, address, "normal sync")
    rows = [re.split(r"\s{2,}", line) for line in admin(server, "status").stdout.splitlines()]
    assert dict(zip(rows[1], next(r for r in rows[2:] if r[0] == USER)))["devices"] == "2"
    piped = subprocess.run("%s | head -1" % " ".join(shlex.quote(part) for part in
                                                     ankisync_command("status")),
                           shell=True, capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, SYNC_BASE=server.base))
    assert piped.stdout.startswith("ankisync ") and piped.stderr == ""
    missing_folder = str(tmp_path / "nowhere" / "alice.colpkg")
    done = admin(server, "export", USER, missing_folder, check=False)
    assert done.returncode != 0 and ".partial" not in done.stderr
    assert "there is no folder %s" % os.path.dirname(missing_folder) in done.stderr
    done = admin(server, "import", USER, str(tmp_path / "typo.colpkg"), check=False)
    assert done.returncode != 0 and "there is no such file" in done.stderr
    empty = tmp_path / "ankisyncd"
    ankisyncd_folder(str(empty), [])
    assert admin(server, "import-ankisyncd", str(empty)).stdout.strip() == "no users imported"


def parse_metrics(text):
    """The Prometheus text format, checked as a scraper reads it: every sample under its
    declared # TYPE, names and labels well formed. Returns {(name, labels): value}."""
    types, samples = {}, {}
    sample = re.compile(r'^([a-z_]+)(?:\{((?:[a-z_]+="(?:[^"\\]|\\.)*",?)*)\})? (\S+)$')
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert kind in ("counter", "gauge", "histogram"), line
            types[name] = kind
            continue
        if line.startswith("# HELP ") or not line:
            continue
        match = sample.match(line)
        assert match, line
        name, labels, value = match.groups()
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in types or (family in types and types[family] == "histogram"), line
        assert name.startswith("ankisync_")
        samples[(name, labels or "")] = float(value)
    return samples


def test_metrics_count_requests_and_syncs_for_this_machine_or_the_token(start_server,
                                                                        make_device):
    assert post(start_server(), "/metrics", method="GET").status == 404       # off by default
    srv = start_server(ini="metrics = on\nmetrics_token = s3cret\nip_header = X-Forwarded-For\n")
    laptop = make_device("modern", "laptop", on=srv)
    laptop.do("add_notes", deck="Default", prefix="m", count=3)
    first_upload(laptop)
    before = parse_metrics(post(srv, "/metrics", method="GET").body.decode())
    assert before[("ankisync_syncs_total", 'kind="full upload"')] == 1
    assert before[("ankisync_users", "")] == 1
    assert before[("ankisync_collection_bytes", 'user="%s"' % USER)] > 0
    assert modern(srv, "hostKey", {"u": USER, "p": "wrong"}).status == 403
    laptop.do("add_notes", deck="Default", prefix="n", count=1)
    assert laptop.sync() == "normal_sync"
    after = parse_metrics(post(srv, "/metrics", method="GET").body.decode())
    assert after[("ankisync_failed_logins_total", "")] == before[
        ("ankisync_failed_logins_total", "")] + 1
    assert after[("ankisync_syncs_total", 'kind="normal sync"')] == 1
    assert after[("ankisync_throttled_addresses", "")] == 0     # one failure locks nobody out
    guess = ZSTD.compress(json.dumps({"u": USER, "p": "guess"}).encode())
    for _ in range(ankisync.LOGIN_FAILURES_ALLOWED + 1):
        post(srv, "/sync/hostKey", guess, dict(anki_sync_header(""),
                                                **{"X-Forwarded-For": "198.51.100.7"}))
    locked = parse_metrics(post(srv, "/metrics", method="GET").body.decode())
    assert locked[("ankisync_throttled_addresses", "")] == 1
    assert after[("ankisync_requests_total", 'method="sync/meta",status="200"')] > before[
        ("ankisync_requests_total", 'method="sync/meta",status="200"')]
    assert after[("ankisync_request_duration_seconds_count", 'method="sync/meta"')] >= 2
    assert after[("ankisync_received_bytes_total", "")] > before[
        ("ankisync_received_bytes_total", "")]
    # Another machine (as the proxy header tells) needs the token.
    elsewhere = {"X-Forwarded-For": "203.0.113.9"}
    assert post(srv, "/metrics", method="GET", headers=elsewhere).status == 403
    assert post(srv, "/metrics", method="GET",
                headers=dict(elsewhere, Authorization="Bearer wrong")).status == 403
    assert post(srv, "/metrics", method="GET",
                headers=dict(elsewhere, Authorization="Bearer s3cret")).status == 200
    assert b"metrics" not in post(srv, "/", method="GET").body      # the page tells nothing


def stored_notes(server):
    with contextlib.closing(sqlite3.connect(os.path.join(server.base, USER,
                                                         "collection.anki2"))) as db:
        return db.execute("select count() from notes").fetchone()[0]


def test_a_quota_refuses_a_sync_whole_with_a_message_the_device_shows(start_server,
                                                                       make_device):
    srv = start_server(ini="quota_collection_mb = 1\nquota_media_mb = 1\n")
    laptop = make_device("modern", "laptop", on=srv)
    laptop.do("add_notes", deck="Default", prefix="klein", count=3)
    first_upload(laptop)                                    # small enough
    rng = random.Random(3)
    laptop.do("add_notes_with_fronts", deck="Default", fronts=[
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(3000))
        for _ in range(600)])                               # about 2 MiB more
    with pytest.raises(Exception):
        laptop.sync()                                       # refused: only "413" shows ...
    with pytest.raises(Exception) as told:
        laptop.sync()                                       # ... so the next meta says why
    assert "Your collection would take" in str(told.value)
    assert "1 MiB it allows each user" in str(told.value)
    assert stored_notes(srv) == 3                           # nothing of it half-applied
    laptop.do("write_media", files=[["gross.jpg", 1500 * 1024, 4], ["klein.jpg", 500, 5]])
    with pytest.raises(Exception):
        laptop.sync_media()
    assert not os.listdir(os.path.join(srv.base, USER, "media"))
    with pytest.raises(Exception) as told:
        laptop.sync()
    assert "media files would take 1.5 MiB" in str(told.value)
