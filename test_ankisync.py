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

Run:  /tmp/venvs/modern/bin/python -m pytest -q test_ankisync.py [-m MARK]
      marks: fullsync, normalsync, media, legacy (e.g. -m "fullsync and not legacy")

The file has three parts:
1. code shared by all client generations (collection operations and ``snapshot``);
   it must stay valid Python 3.8 and work with anki 2.1.26, 2.1.54 and 26.x alike;
2. the legacy-client driver (script entry point);
3. the pytest harness and the stories (only imported under pytest).
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
def wait_for_file(col, path, delay=0.0, timeout=30):
    """Block until `path` exists, then `delay` seconds more: the starting gun that lets
    devices in different processes begin a sync within a millisecond of each other."""
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
SYNC_VERBS = ("login", "sync", "full_upload", "full_download", "sync_media")


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
    if verb == "sync":
        # Like aqt: commit the open transaction before a sync, open a new one after.
        col.save(trx=False)
        try:
            return sync_collection(col, lambda: col.sync_collection(auth))[0]
        finally:
            col.db.begin()
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

import contextlib  # noqa: E402
import fcntl  # noqa: E402
import glob  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import urllib.request  # noqa: E402

import pytest  # noqa: E402
from anki.collection import Collection  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER_KIND = os.environ.get("ANKISYNC_TEST_SERVER", "ankisync")
CACHE = os.path.expanduser(os.environ.get("ANKISYNC_TEST_CACHE", "~/.cache/ankisync-tests"))
USER, PASSWORD = "user", "pass"


def pytest_configure(config):
    for mark, doc in [
        ("fullsync", "full upload/download stories (issue 'core')"),
        ("normalsync", "incremental sync stories (issue 'incremental')"),
        ("media", "media sync stories (issue 'media')"),
        ("legacy", "uses an anki 2.1.54 or 2.1.26 (protocol v10) device"),
    ]:
        config.addinivalue_line("markers", "%s: %s" % (mark, doc))


# pytest only calls pytest_configure for plugins and conftest files, not for a test
# module; so the module also registers its marks itself when pytest imports it, before
# any decorator below uses them (pytest.mark._config is the running session's config).
if getattr(pytest.mark, "_config", None) is not None:
    pytest_configure(pytest.mark._config)


# --- the server ------------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SyncServer:
    """One server process on 127.0.0.1 with its own data dir (`base`)."""

    def __init__(self, kind, base, users):
        self.kind = kind
        self.base = base
        self.users = list(users)
        self.port = free_port()
        self.url = "http://127.0.0.1:%d/" % self.port
        self.log_path = os.path.join(os.path.dirname(base), "server-%s.log" % kind)
        self.proc = None

    def command(self):
        if self.kind == "official":
            return [sys.executable, "-m", "anki.syncserver"]
        script = os.path.join(HERE, "ankisync.py")
        if not os.path.exists(script):
            pytest.skip("ankisync.py does not exist yet")
        return [sys.executable, script, "serve"]

    def start(self):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SYNC_")}
        env.update(SYNC_BASE=self.base, SYNC_HOST="127.0.0.1", SYNC_PORT=str(self.port))
        for i, (name, password) in enumerate(self.users, 1):
            env["SYNC_USER%d" % i] = "%s:%s" % (name, password)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), env=env, stdout=log, stderr=log,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.time() + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited with %s:\n%s" % (self.proc.returncode,
                                                                  self.log_tail()))
            try:
                with urllib.request.urlopen(self.url + "health", timeout=2) as r:
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

    def stop(self):
        """Polite stop (SIGTERM, then SIGKILL after 5 s)."""
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self):
        self.stop()
        self.start()  # same port and data: clients keep their endpoint and keys

    def add_user(self, name, password):
        self.users.append((name, password))
        self.restart()

    def died(self):
        return self.proc is not None and self.proc.poll() is not None

    def log_tail(self, lines=80):
        try:
            with open(self.log_path, "rb") as f:
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@pytest.fixture
def server(tmp_path):
    srv = SyncServer(SERVER_KIND, str(tmp_path / "server-data"), [(USER, PASSWORD)])
    os.makedirs(srv.base)
    srv.start()
    yield srv
    died = srv.died()
    srv.kill()
    # Printed output only shows up in the report of a failing test.
    print("---- %s server log (tail) ----\n%s" % (srv.kind, srv.log_tail()))
    if died:
        pytest.fail("the sync server died during the test")


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

    def sync_on_signal(self, go_file, delay):
        wait_for_file(self.col, go_file, delay)
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
        lines = [l for l in stdout.splitlines() if l.startswith(RESULT_PREFIX)]
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

    def sync_on_signal(self, go_file, delay):
        steps = [] if self.hkey else [("login", {})]
        steps += [("wait_for_file", {"path": go_file, "delay": delay}), ("sync", {})]
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

    def make(kind, name, user=USER, password=PASSWORD):
        folder = str(tmp_path / name)
        if kind == "modern":
            device = ModernDevice(name, folder, server, user, password)
        else:
            python = request.getfixturevalue({"legacy": "legacy_python",
                                              "py26": "py26_python"}[kind])
            device = LegacyDevice(kind, name, folder, server, python, user, password)
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
    time.sleep(1.1)  # a note's mtime has one-second resolution
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


def sync_simultaneously(devices, delays, tmp_path):
    """Make the devices start a sync at the same instant (plus their delays); return
    the outcomes, or the exceptions raised."""
    go_file = str(tmp_path / ("go-%f" % time.time()))
    results = [None] * len(devices)

    def worker(i):
        try:
            results[i] = devices[i].sync_on_signal(go_file, delays[i])
        except Exception as exc:  # a sync cut short by the other device's sync
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(devices))]
    for t in threads:
        t.start()
    time.sleep(1)  # legacy devices need a moment to start their process
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
        # same ids (a client-side clash, not a server matter), hence the pauses.
        added.update(laptop.do("add_notes", deck="Math", prefix="laptop %d" % round_no,
                               count=600))
        time.sleep(1)
        added.update(phone.do("add_notes", deck="Math", prefix="phone %d" % round_no,
                              count=600))
        time.sleep(1)
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

    # Deletions on both sides and an addition on the phone. A second later, as in real
    # life: anki 2.1.54 only rescans the media folder when its mtime (in whole seconds)
    # differs from the one recorded at the last scan.
    time.sleep(1)
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
