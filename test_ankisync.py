"""Story tests for ankisync, driven by real Anki clients.

Every test is a short story of devices syncing through a sync server:

* the server is either the official one shipped in the ``anki`` wheel or ankisync
  (``ANKISYNC_TEST_SERVER=official|ankisync``, default ``ankisync``), started fresh
  for every test;
* "modern" devices are ``anki`` 26.x collections living inside this test process
  (sync protocol v11);
* "legacy" devices are ``anki`` 2.1.54 collections (sync protocol v10) driven through
  this very file run as a script inside a Python 3.9 venv that the suite builds itself
  (``python test_ankisync.py legacy-client '<json>'``).

Run:  /tmp/venvs/modern/bin/python -m pytest -q test_ankisync.py [-m fullsync|normalsync|media]

The file has three parts:
1. code shared by both client generations (collection operations and ``snapshot``);
   it must stay valid Python 3.9 and must work with anki 2.1.54 and 26.x alike;
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
            "notes": db.all("select id, guid, mid, mod, tags, flds from notes order by id"),
            "cards": db.all(
                "select id, nid, did, ord, type, queue, due, ivl, factor, reps, lapses"
                " from cards order by id"
            ),
            "revlog": db.all(
                "select id, cid, ease, ivl, lastIvl, factor, time, type from revlog order by id"
            ),
            "decks": sorted([d.id, d.name] for d in col.decks.all_names_and_ids()),
            "deck_conf": sorted([d["id"], d.get("conf")] for d in decks if not d["dyn"]),
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


def _add(col, notetype, deck, fields, tags=()):
    note = col.new_note(col.models.by_name(notetype))
    for i, value in enumerate(fields):
        note.fields[i] = value
    for tag in tags:
        note.add_tag(tag)
    col.add_note(note, col.decks.id(deck))
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
    """Answer `count` cards from `deck` (and its children) with cycling eases."""
    col.decks.select(col.decks.id(deck))
    if hasattr(col.sched, "reset"):
        col.sched.reset()
    answered = []
    for i in range(count):
        card = col.sched.getCard()
        if card is None:
            break
        col.sched.answerCard(card, eases[i % len(eases)])
        answered.append(card.id)
    return answered


@op
def add_notes(col, deck, prefix, count, notetype="Basic", tags=()):
    return [
        _add(col, notetype, deck, ["%s %d" % (prefix, i), "back %d" % i], tags)
        for i in range(count)
    ]


@op
def edit_note(col, nid, field, value):
    note = col.get_note(nid)
    note[field] = value
    col.update_note(note)
    return note.mod


@op
def tag_note(col, nid, tag):
    note = col.get_note(nid)
    note.add_tag(tag)
    col.update_note(note)


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
    note = col.get_note(nid)
    return dict(note.items())


@op
def find_notes(col, query):
    return list(col.find_notes(query))


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
    for name, size, seed in files:
        with open(os.path.join(folder, name), "wb") as f:
            f.write(media_content(seed, size))
    col.media.check()
    return sorted(os.listdir(folder))


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


def outcome_name(out):
    """'no_changes' | 'normal_sync' | 'full_sync' | 'full_download' | 'full_upload'."""
    return out.ChangesRequired.Name(out.required).lower()


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


def legacy_main(argv):
    cmd = json.loads(argv[0])
    base = cmd["endpoint"]
    # anki 2.1.54 (Rust sync) reads its endpoints from these variables.
    os.environ["SYNC_ENDPOINT"] = base + "sync/"
    os.environ["SYNC_ENDPOINT_MEDIA"] = base + "msync/"
    from anki.collection import Collection
    from anki.sync import SyncAuth

    col = Collection(cmd["path"])
    hkey = cmd.get("hkey")
    results = []
    try:
        for name, kwargs in cmd["steps"]:
            result = None
            if name == "login":
                hkey = col.sync_login(cmd["user"], cmd["password"]).hkey
            elif name in ("sync", "full_upload", "full_download", "sync_media"):
                auth = SyncAuth(hkey=hkey, host_number=0)
                if name == "sync":
                    # Like aqt: commit the open transaction before a sync, reopen after.
                    col.save(trx=False)
                    result = outcome_name(col.sync_collection(auth))
                    col.db.begin()
                elif name == "sync_media":
                    col.save()
                    col.sync_media(auth)  # blocking in 2.1.54; raises on error
                else:
                    col.close_for_full_sync()
                    try:
                        getattr(col, name)(auth)
                    finally:
                        col.reopen(after_full_sync=True)
            else:
                result = OPS[name](col, **kwargs)
                col.save()
            results.append(result)
    finally:
        col.close()
    sys.stdout.write(RESULT_PREFIX + json.dumps({"hkey": hkey, "results": results}) + "\n")
    return 0


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
import tempfile  # noqa: E402
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
        ("legacy", "uses an anki 2.1.54 (protocol v10) device"),
    ]:
        config.addinivalue_line("markers", "%s: %s" % (mark, doc))


# pytest only calls pytest_configure for plugins and conftest files, not for a test
# module; so the module also registers its marks itself when pytest imports it, before
# any decorator below uses them (pytest.mark._config is the running session's config).
if getattr(pytest.mark, "_config", None) is not None:
    pytest_configure(pytest.mark._config)


def xfail_on_official(reason):
    """For stories the official server itself cannot pass (an upstream quirk)."""
    return pytest.mark.xfail(SERVER_KIND == "official", reason=reason, strict=True)


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
        env = dict(os.environ, SYNC_BASE=self.base, SYNC_HOST="127.0.0.1",
                   SYNC_PORT=str(self.port))
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
        out = self.col.sync_collection(self.auth, False)  # media synced separately
        if out.new_endpoint:
            self.auth.endpoint = out.new_endpoint
        return outcome_name(out)

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
    """An anki 2.1.54 profile (protocol v10), driven through a subprocess per call."""

    kind = "legacy"

    def __init__(self, name, folder, server, python, user=USER, password=PASSWORD):
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


def find_python39():
    candidates = [shutil.which("python3.9")]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.9*/bin/python3.9")),
                         reverse=True)
    for candidate in candidates:
        if candidate and subprocess.run([candidate, "-c", "import sys, venv; "
                                         "assert sys.version_info[:2] == (3, 9)"],
                                        capture_output=True).returncode == 0:
            return candidate
    return None


def ensure_venv(name, requirement_sets):
    """<cache>/<name>: a Python 3.9 venv with the given pip installs, built once.
    A marker file tells a finished venv from a half-built one."""
    venv = os.path.join(CACHE, name)
    python = os.path.join(venv, "bin", "python")
    marker = os.path.join(venv, ".ankisync-tests-ready")
    os.makedirs(CACHE, exist_ok=True)
    with open(os.path.join(CACHE, name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test runs build it only once
        if os.path.exists(marker):
            return python
        python39 = find_python39()
        if python39 is None:
            pytest.skip("no Python 3.9 found (python3.9 on PATH or ~/.pyenv/versions/3.9*)")
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([python39, "-m", "venv", venv], check=True)
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
    return ensure_venv("venv-anki-2.1.54", [LEGACY_REQUIREMENTS])


@pytest.fixture
def make_device(server, tmp_path, request):
    """make_device(kind, name) -> a fresh device (empty profile) of that generation."""
    devices = []

    def make(kind, name, user=USER, password=PASSWORD):
        folder = str(tmp_path / name)
        if kind == "modern":
            device = ModernDevice(name, folder, server, user, password)
        else:
            device = LegacyDevice(name, folder, server,
                                  request.getfixturevalue("legacy_python"), user, password)
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
@pytest.mark.parametrize("gen_laptop,gen_phone", GENERATION_PAIRS)
def test_phone_replaces_server_copy_by_forced_upload(make_device, gen_laptop, gen_phone):
    """After both devices are set up, the phone's schema changes (a field is added)
    so its next sync must be full; it uploads, and the laptop must download."""
    laptop = make_device(gen_laptop, "laptop")
    laptop.do("build_sample")
    first_upload(laptop)
    phone = make_device(gen_phone, "phone")
    join_by_download(phone)

    phone.do("add_field", notetype="Basic", field="Beispiel")
    assert phone.sync() == "full_sync"
    phone.full_upload()
    assert phone.sync() == "no_changes"
    assert laptop.sync() == "full_sync"
    laptop.full_download()
    state = assert_same(laptop, phone)
    basic = [m for m in state["notetypes"] if m[1] == "Basic"][0]
    assert basic[2] == ["Front", "Back", "Beispiel"]
