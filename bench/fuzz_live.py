#!/usr/bin/env python3
"""Fuzz a live ankisync with mutated real client traffic (testdata/traces/) for N seconds.

    .venv/bin/python bench/fuzz_live.py                         # 60 s, a random seed
    .venv/bin/python bench/fuzz_live.py --seconds 600           # the 10-minute run
    .venv/bin/python bench/fuzz_live.py --seconds 30 --seed 7   # repeat a run
    .venv/bin/python bench/fuzz_live.py --python python3.9 --workers 2 --findings /tmp/f
    .venv/bin/python bench/fuzz_live.py --replay /tmp/f/finding-0003.bin   # send one again

It starts `ankisync.py serve` itself on 127.0.0.1 and a free port, with a fresh data
folder and one user per worker (user:pass, user2:pass2, ...), logs each user in and
fully uploads a new collection; then every worker, until the time is up, takes one
recorded exchange of a real client (modern v11, legacy v8-v10 forms, `GET
/msync/begin`), puts its user's host key and a session key in, mutates it and sends it
on a raw socket, reading the answer with a 10 s timeout. Mutation families, one per
request, each with several kinds:

  json      the decoded payload: other types, integers at and past 64 bits, huge and
            non-finite floats, lone surrogates, nesting thousands deep, long strings,
            keys deleted or added, rows of the wrong length, hostile media names; and
            the JSON text itself (BOM, trailing bytes, invalid UTF-8, a key twice)
  envelope  the `anki-sync` header (its fields, or the header as a whole), the body's
            compression (none, gzip, truncated, trailing bytes, a zstd bomb); legacy
            forms: fields, parts missing or twice, boundary games, gzip
  http      Content-Length (non-ASCII digits, signs, huge, twice, with chunked),
            chunk sizes, Transfer-Encoding, request lines, header lines
  bytes     random byte flips, cuts, insertions in the whole raw request
  pipeline  a valid GET /health followed on the same connection by a mutated request
  media     uploadChanges zips made here: hostile names and `_meta`, lying headers
  upload    full uploads of real collections changed with sqlite3 or byte flips
  valid     the exchange as recorded (with this run's keys): a baseline

A normal-sync method (applyChanges, chunk, ...) is often sent after a valid `start` on
the same connection, so that it reaches a session. Findings: an answer 500-599 (a 503
with Retry-After, and the protocol's 501 for an unsupported sync version, excepted), a
traceback or ERROR line in the server's log (blamed on the requests in flight or just
answered, matched by route), GET /health on a fresh connection failing (it is checked
every 2 s, 5 s timeout), and the server exiting.
Each distinct finding is printed once, and its request saved in the findings folder
(finding-NNNN.bin, the raw bytes; .pre.bin, a request sent before it on the same
connection; .txt, what and why, the log excerpt; -upload.bin, the mutated upload the
user's collection came from, when there is one), for --replay: it sends the files
given, in order, to a fresh server, with that server's host key put in (give a
finding's -upload.bin before its .bin). The exit status is 1 when there were findings.
Everything talks to 127.0.0.1 only (the script's own logins come from 127.0.0.2, so
that the fuzzed wrong passwords do not lock it out), every loop is bounded by count
and time, and the server is stopped at the end; only the findings folder stays.
"""

import argparse
import atexit
import base64
import collections
import copy
import gzip
import io
import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
import warnings
import zipfile
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
ANKISYNC_PY = os.path.join(REPO, "ankisync.py")
TRACES = os.path.join(REPO, "testdata", "traces")
sys.path.insert(0, REPO)

import ankisync  # noqa: E402  (zstd and a new collection, as the server makes them)

HOST = "127.0.0.1"
SETUP_SOURCE = "127.0.0.2"      # the script's own logins: see the docstring
CLIENT = "fuzz,0,linux"
ANSWER_TIMEOUT = 10.0
HEALTH_EVERY = 2.0
HEALTH_TIMEOUT = 5.0
START_TIMEOUT = 30.0
RESET_EVERY = 45.0              # seconds between a worker's fresh valid uploads
DETAIL_MAX = 20                 # distinct findings printed in full
SAVE_PER_FINDING = 3            # requests saved per distinct finding
SAVE_MAX = 300                  # files of findings in all
DECODE_LIMIT = 256 * 1024 * 1024
READ_KEEP = 4096                # bytes of an answer's body kept (the rest is read, dropped)
READ_MAX = 512 * 1024 * 1024    # an answer larger than this is cut off
LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ([A-Z]+) ")
NORMAL_SYNC = {"applyGraves", "applyChanges", "chunk", "applyChunk", "sanityCheck2",
               "finish", "abort"}


class Raw(str):
    """JSON text put into a payload as it is: tokens json cannot write (NaN, 1e999),
    nesting deeper than Python's recursion, numbers of 5,000 digits."""


# --------------------------------------------------------------------------------------
# Hostile values
# --------------------------------------------------------------------------------------

INTS = [(2 ** 63, "2**63"), (-2 ** 63 - 1, "-2**63-1"), (2 ** 64, "2**64"),
        (10 ** 30, "10**30"), (-10 ** 30, "-10**30"), (2 ** 63 - 1, "2**63-1"),
        (-2 ** 63, "-2**63"), (2 ** 53 + 1, "2**53+1"), (2 ** 31, "2**31"),
        (-2 ** 31 - 1, "-2**31-1"), (2 ** 32, "2**32"), (-1, "-1"), (0, "0"),
        (Raw("9" * 5000), "5000 digits"), (Raw("-0"), "-0")]
FLOATS = [(1e308, "1e308"), (-1e308, "-1e308"), (5e-324, "5e-324"), (-0.0, "-0.0"),
          (0.5, "0.5"), (9.3e18, "9.3e18"), (1.0, "1.0"), (Raw("1e999"), "1e999"),
          (Raw("-1e999"), "-1e999"), (Raw("NaN"), "NaN"), (Raw("Infinity"), "Infinity"),
          (Raw("-Infinity"), "-Infinity"), (Raw("1E+400"), "1E+400"), (Raw("1.0e-99999"), "tiny")]
STRINGS = ["", "\ud800", "\udfff", "a\udc00b", "\x00", "\u202e", "\U0001F600", "e\u0301",
           "1", "-1", "null", "[]", " ", "\n", "\x1f", "\ufeff", "%s", "'", '"', "\\"]
TYPES = [[], {}, None, True, False, 0, 1.5, "", "x", [[]], {"": None}, [None, None, None],
         [1, 2, 3], {"a": 1}]
MEDIA_NAMES = [
    "../x", "..", ".", "a/b", "a\\b", "", "_meta", "/etc/passwd", "C:x", "c:\\x", "x\x00y",
    "x\ny", "x\ry", "x\x7f", "\t", " x", "x ", "x.", "e\u0301.jpg", "\ufb01.jpg", "CON",
    "nul.txt", "x.convert", ".backup-1", ".copy-img0.bin", ".incoming-img0.bin",
    ".spool-1", "a" * 256, "\u00e9" * 128, "\ud800.jpg", "%2e%2e%2fx", "collection.anki2",
    "media.db", "..\\x", "x/", "/", "\u202egpj.exe", "img0.bin", "IMG0.BIN", "\x01",
    ".", "-", "~x", "x" * 1000, "\u3000", "a:b", "img0.bin\x00.jpg"]
CHARSETS = ["utf-8", "latin-1", "utf-16"]


def value_text(value, label=None):
    """A short description of a value put in."""
    if label:
        return label
    if isinstance(value, Raw):
        text = str(value)
        return text if len(text) <= 24 else "%s...(%d chars)" % (text[:12], len(text))
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= 30 else "%s...(%d chars)" % (text[:16], len(text))


def deep(rng):
    n = rng.choice([200, 1000, 5000, 100000])
    if rng.random() < 0.5:
        return Raw("[" * n + "]" * n), "[]x%d" % n
    return Raw('{"a":' * n + "1" + "}" * n), "{}x%d" % n


def long_value(rng):
    n = rng.choice([1000, 70000, 1 << 20])
    choice = rng.randrange(3)
    if choice == 0:
        return "x" * n, "str x%d" % n
    if choice == 1:
        return Raw("[" + "0," * (n // 2) + "0]"), "list of %d" % (n // 2 + 1)
    return "\u00e9\U0001F600" * (n // 8), "unicode x%d" % (n // 8)


# --------------------------------------------------------------------------------------
# JSON: walking, writing, mutating
# --------------------------------------------------------------------------------------

def has_surrogate(text):
    return any(0xD800 <= ord(ch) <= 0xDFFF for ch in text)


def dump(value):
    """JSON text as the clients write it (compact, raw UTF-8), with Raw tokens verbatim
    and lone surrogates written as escapes (they have no UTF-8)."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=has_surrogate(value))
    if isinstance(value, dict):
        return "{" + ",".join("%s:%s" % (dump(str(k)), dump(v)) for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(dump(v) for v in value) + "]"
    return json.dumps(value)


def paths(obj, limit=3000):
    """Paths to every node of obj (root first), at most `limit`."""
    found, stack = [()], [((), obj)]
    while stack and len(found) < limit:
        path, value = stack.pop()
        if isinstance(value, dict) and not isinstance(value, Raw):
            items = value.items()
        elif isinstance(value, list):
            items = enumerate(value)
        else:
            continue
        for key, child in items:
            found.append(path + (key,))
            stack.append((path + (key,), child))
    return found


def get_at(obj, path):
    for key in path:
        obj = obj[key]
    return obj


def set_at(obj, path, value):
    if not path:
        return value
    get_at(obj, path[:-1])[path[-1]] = value
    return obj


def path_text(path):
    return "$" + "".join(".%s" % k if isinstance(k, str) else "[%d]" % k for k in path)[:60]


def pick_path(rng, obj, want=None):
    """A random node; `want(value)` narrows the choice when some node fits it."""
    every = paths(obj)
    if want:
        fitting = [p for p in every if want(get_at(obj, p))]
        if fitting:
            return rng.choice(fitting)
    return rng.choice(every)


def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def is_container(v):
    return isinstance(v, (dict, list)) and not isinstance(v, Raw)


def is_rows(v):
    return isinstance(v, list) and v and all(isinstance(r, list) for r in v)


KNOWN_KEYS = ["minUsn", "lnewer", "graves", "chunk", "done", "changes", "cards", "notes",
              "revlog", "decks", "models", "dconf", "tags", "conf", "crt", "files", "lastUsn",
              "local", "u", "p", "v", "cv", "_pad", "usn", "mod", "client", "data", "sk", "k"]


def json_op(rng, obj, op):
    """One mutation of obj (mutated in place where it can be); (new obj, description)."""
    if op == "type":
        path = pick_path(rng, obj)
        value = copy.deepcopy(rng.choice(TYPES))
        return set_at(obj, path, value), "%s=%s" % (path_text(path), value_text(value))
    if op == "int":
        path = pick_path(rng, obj, is_int)
        value, label = rng.choice(INTS)
        return set_at(obj, path, value), "%s=%s" % (path_text(path), label)
    if op == "negative":
        path = pick_path(rng, obj, lambda v: is_int(v) and v > 0)
        old = get_at(obj, path)
        value = -old if is_int(old) and old else -rng.randrange(1, 1 << 40)
        return set_at(obj, path, value), "%s=%d" % (path_text(path), value)
    if op == "float":
        path = pick_path(rng, obj, lambda v: isinstance(v, (int, float)))
        value, label = rng.choice(FLOATS)
        return set_at(obj, path, value), "%s=%s" % (path_text(path), label)
    if op == "string":
        path = pick_path(rng, obj, lambda v: isinstance(v, str))
        value = rng.choice(STRINGS)
        return set_at(obj, path, value), "%s=%s" % (path_text(path), value_text(value))
    if op == "name":
        path = pick_path(rng, obj, lambda v: isinstance(v, str))
        value = rng.choice(MEDIA_NAMES)
        return set_at(obj, path, value), "%s=%s" % (path_text(path), value_text(value))
    if op == "deep":
        path = pick_path(rng, obj)
        value, label = deep(rng)
        return set_at(obj, path, value), "%s=%s" % (path_text(path), label)
    if op == "long":
        path = pick_path(rng, obj, lambda v: isinstance(v, (str, list)))
        value, label = long_value(rng)
        return set_at(obj, path, value), "%s=%s" % (path_text(path), label)
    if op == "empty":
        path = pick_path(rng, obj, is_container)
        old = get_at(obj, path)
        value = {} if isinstance(old, dict) else [] if isinstance(old, list) else ""
        return set_at(obj, path, value), "%s=%s" % (path_text(path), value_text(value))
    if op == "delete":
        path = pick_path(rng, obj, lambda v: is_container(v) and len(v) > 0)
        parent = get_at(obj, path)
        if is_container(parent) and parent:
            key = rng.choice(list(parent)) if isinstance(parent, dict) \
                else rng.randrange(len(parent))
            del parent[key]
            return obj, "del %s" % path_text(path + (key,))
        return None, "delete: nothing"
    if op == "add":
        path = pick_path(rng, obj, lambda v: isinstance(v, dict))
        parent = get_at(obj, path)
        key = rng.choice(KNOWN_KEYS + ["zz%d" % rng.randrange(100), "", "\ud800", "x" * 300])
        value = copy.deepcopy(rng.choice(TYPES + [2 ** 64, "\ud800"]))
        if isinstance(parent, dict):
            parent[key] = value
            return obj, "add %s=%s" % (path_text(path + (key,)), value_text(value))
        return [obj, value], "wrapped in a list"
    if op == "dup":
        path = pick_path(rng, obj, lambda v: isinstance(v, list) and len(v) > 0)
        parent = get_at(obj, path)
        if isinstance(parent, list) and parent:
            times = rng.choice([1, 2, 100])
            i = rng.randrange(len(parent))
            parent[i:i] = [copy.deepcopy(parent[i]) for _ in range(times)]
            return obj, "%s[%d] x%d more" % (path_text(path), i, times)
        return None, "dup: nothing"
    if op == "row":
        path = pick_path(rng, obj, is_rows)
        rows = get_at(obj, path)
        if not is_rows(rows):
            path = pick_path(rng, obj, lambda v: isinstance(v, list))
            rows = [get_at(obj, path)]
        row = rng.choice(rows)
        if not isinstance(row, list):
            return None, "row: nothing"
        how = rng.choice(["short", "long", "empty", "huge"])
        if how == "short" and row:
            row.pop()
        elif how == "long":
            row.append(rng.choice([0, "", None]))
        elif how == "empty":
            del row[:]
        else:
            row.extend([0] * 1000)
        return obj, "row of %s %s" % (path_text(path), how)
    if op == "swap":
        value = copy.deepcopy(rng.choice(TYPES + [2 ** 64, "\ud800"]))
        return value, "payload=%s" % value_text(value)
    raise ValueError(op)


JSON_OPS = ["type", "int", "int", "negative", "float", "string", "name", "deep", "long",
            "empty", "delete", "add", "dup", "row", "row", "swap"]
TEXT_OPS = ["bom", "trailing", "cut", "utf8", "dupkey", "nul", "whitespace", "charset"]


def text_op(rng, text, op):
    """Mutations of the JSON text itself: bytes in, bytes out."""
    if op == "bom":
        return b"\xef\xbb\xbf" + text, "BOM first"
    if op == "trailing":
        tail = rng.choice([b" x", b"}", b"\x00", b"{}", b"\n\n", b"/*c*/", b",1"])
        return text + tail, "then %r" % tail
    if op == "cut":
        at = rng.randrange(len(text)) if text else 0
        return text[:at], "cut at %d of %d" % (at, len(text))
    if op == "utf8":
        bad = rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80"])
        quote = text.find(b'"', 1)
        at = quote + 1 if quote > 0 else len(text)
        return text[:at] + bad + text[at:], "invalid UTF-8 %r in a string" % bad
    if op == "dupkey":
        if text.startswith(b'{"'):
            end = text.find(b",", 1)
            member = text[1:end] if end > 0 else text[1:-1]
            return b"{" + member + b"," + text[1:], "first key twice"
        return b'{"a":1,"a":' + text + b"}", "a key twice"
    if op == "nul":
        return text.replace(b'"', b'"\x00', 1), "NUL after a quote"
    if op == "whitespace":
        return b" \t\r\n" * 1000 + text + b"\x0b", "whitespace around, VT after"
    if op == "charset":
        try:
            return text.decode("utf-8").encode(rng.choice(["utf-16", "utf-32"])), "UTF-16/32"
        except UnicodeDecodeError:
            return text, "charset: not UTF-8"
    raise ValueError(op)


# --------------------------------------------------------------------------------------
# Compression
# --------------------------------------------------------------------------------------

_LOCAL = threading.local()


def zstd():
    """This thread's ankisync zstd backend (their contexts are per thread)."""
    if not hasattr(_LOCAL, "zstd"):
        _LOCAL.zstd = ankisync.choose_zstd()
    return _LOCAL.zstd


def zstd_bomb(megabytes):
    """A zstd frame of `megabytes` MiB of zeros, made without holding them."""
    left = [megabytes * 1024 * 1024]
    block = bytes(1024 * 1024)

    def read(n):
        take = min(n, left[0], len(block))
        left[0] -= take
        return block[:take]
    parts = []
    zstd().compress_stream(read, parts.append)
    return b"".join(parts)


_BOMBS = {}


def bomb(kind, megabytes):
    """Zeros, compressed; made once per size (gzip of 400 MiB takes a second)."""
    key = (kind, megabytes)
    if key not in _BOMBS:
        if kind == "zstd":
            _BOMBS[key] = zstd_bomb(megabytes)
        else:
            packer = zlib.compressobj(9, zlib.DEFLATED, 31)     # 31: a gzip wrapper
            block = bytes(1024 * 1024)
            _BOMBS[key] = b"".join([packer.compress(block) for _ in range(megabytes)]
                                   + [packer.flush()])
    return _BOMBS[key]


def gzip_bytes(data):
    return gzip.compress(data, compresslevel=1, mtime=0)


def gunzip_maybe(data):
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data), True
    return data, False


# --------------------------------------------------------------------------------------
# The recorded exchanges
# --------------------------------------------------------------------------------------

class Template:
    """One recorded request, decoded: its envelope and its payload (JSON, or bytes for
    a collection or a zip)."""

    def __init__(self, file):
        with open(file, encoding="utf-8") as f:
            rec = json.load(f)["request"]
        self.file = os.path.relpath(file, TRACES)
        self.folder = os.path.dirname(self.file)
        self.verb, self.target = rec["method"], rec["path"]
        self.chunked = rec["chunked"]
        self.headers = [(k, v) for k, v in rec["headers"]
                        if k.lower() not in ("host", "content-length", "transfer-encoding")]
        body = base64.b64decode(rec["body_b64"])
        path = urllib.parse.urlsplit(self.target).path
        self.method = path.rstrip("/").rsplit("/", 1)[-1]
        self.area = "msync" if "/msync/" in path else "sync"
        self.route = "%s/%s" % (self.area, self.method)
        self.sync_header = None
        self.parts, self.boundary, self.data_gzip = None, None, False
        self.payload = None             # JSON value, or bytes when there is no JSON
        self.has_json = False
        sync = self.header("anki-sync")
        if sync is not None:
            self.style = "modern"
            self.sync_header = json.loads(sync)
            raw = zstd().decompress(body, DECODE_LIMIT) if body else b""
            self._set_payload(raw)
        elif "multipart/form-data" in (self.header("content-type") or ""):
            self.style = "legacy"
            self.boundary = self.header("content-type").split("boundary=", 1)[1].encode()
            self.parts = split_multipart(body, self.boundary)
            for part in self.parts:
                if part[0] == "data":
                    raw, self.data_gzip = gunzip_maybe(part[2])
                    self._set_payload(raw)
        else:
            self.style = "get"
            self.query = urllib.parse.parse_qsl(urllib.parse.urlsplit(self.target).query,
                                                keep_blank_values=True)

    def _set_payload(self, raw):
        if self.method in ("upload", "uploadChanges"):
            self.payload = raw
            return
        try:
            self.payload, self.has_json = json.loads(raw), True
        except ValueError:
            self.payload = raw

    def header(self, name):
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    # -- this run's identity put in -----------------------------------------------------

    def json_for(self, me):
        payload = copy.deepcopy(self.payload)
        if self.method == "hostKey" and isinstance(payload, dict):
            payload.update(u=me.user, p=me.password)
        return payload

    def header_for(self, me):
        header = dict(self.sync_header)
        if header.get("k"):
            header["k"] = me.key
        if header.get("s"):
            header["s"] = me.session
        return header

    def fields_for(self, me):
        """The legacy form's parts as [name, part head, content], keys replaced."""
        out = []
        for name, head, content in self.parts:
            if name == "k":
                content = me.key.encode()
            elif name == "sk":
                content = me.sk.encode()
            elif name == "s":
                content = me.session.encode()
            out.append([name, head, content])
        return out

    def target_for(self, me):
        if self.style != "get":
            return self.target
        query = [(k, me.key if k == "k" else v) for k, v in self.query]
        return self.target.split("?", 1)[0] + "?" + urllib.parse.urlencode(query)

    def encode_data(self, raw):
        """A payload's bytes as this envelope carries them."""
        if self.style == "modern":
            return zstd().compress(raw)
        return gzip_bytes(raw) if self.data_gzip else raw

    def request(self, me, raw=None, header=None, fields=None):
        """The request with this run's keys; `raw` the payload's bytes (decoded),
        `header` the anki-sync header's text, `fields` the legacy parts."""
        if raw is None and self.payload is not None:
            raw = self.payload if isinstance(self.payload, bytes) \
                else dump(self.json_for(me)).encode("utf-8")
        headers = list(self.headers)
        if self.style == "modern":
            if header is None:
                header = json.dumps(self.header_for(me), separators=(",", ":"))
            headers = [(k, header if k.lower() == "anki-sync" else v) for k, v in headers]
            body = self.encode_data(raw or b"")
        elif self.style == "legacy":
            if fields is None:
                fields = self.fields_for(me)
                for part in fields:
                    if part[0] == "data" and raw is not None:
                        part[2] = self.encode_data(raw)
            body = join_multipart(fields, self.boundary)
        else:
            body = b""
        return Req(self.verb, self.target_for(me), headers, body, self.chunked)


def split_multipart(body, boundary):
    """[name, part head, content] of each part, as sent."""
    parts = []
    for chunk in body.split(b"--" + boundary)[1:]:
        if chunk.startswith(b"--"):
            break
        chunk = chunk[2:] if chunk.startswith(b"\r\n") else chunk
        head, _, content = chunk.partition(b"\r\n\r\n")
        if content.endswith(b"\r\n"):
            content = content[:-2]
        name = re.search(rb'name="([^"]*)"', head)
        parts.append([name.group(1).decode() if name else "", head, content])
    return parts


def join_multipart(parts, boundary, closing=True, newline=b"\r\n"):
    out = [b"--%s%s%s%s%s%s%s" % (boundary, newline, head, newline, newline, content, newline)
           for _, head, content in parts]
    if closing:
        out.append(b"--%s--%s" % (boundary, newline))
    return b"".join(out)


def load_templates():
    templates = []
    for folder in sorted(os.listdir(TRACES)):
        path = os.path.join(TRACES, folder)
        if not os.path.isdir(path):
            continue
        for name in sorted(os.listdir(path)):
            if name.endswith(".json"):
                templates.append(Template(os.path.join(path, name)))
    if not templates:
        raise SystemExit("no recorded exchanges under %s" % TRACES)
    return templates


# --------------------------------------------------------------------------------------
# Requests on the wire
# --------------------------------------------------------------------------------------

class Req:
    """A request before framing: http ops change these fields, then frame() writes it."""

    def __init__(self, verb, target, headers, body, chunked):
        self.verb, self.target, self.version = verb, target, "HTTP/1.1"
        self.headers = list(headers)
        self.body, self.chunked = body, chunked
        self.framing = None             # (header lines, framed body) set by an http op
        self.extra = []                 # header lines (bytes) added as they are

    def frame(self, rng, port):
        line = b"%s %s %s" % (enc(self.verb), enc(self.target), enc(self.version))
        lines = [b"host: %s:%d" % (HOST.encode(), port)]
        lines += [b"%s: %s" % (enc(k), enc(v)) for k, v in self.headers]
        if self.framing is not None:
            framing, body = self.framing
        elif self.chunked:
            framing, body = [b"transfer-encoding: chunked"], chunk_body(rng, self.body)
        elif self.body or self.verb != "GET":
            framing, body = [b"content-length: %d" % len(self.body)], self.body
        else:
            framing, body = [], b""
        lines += framing + self.extra
        return line + b"\r\n" + b"".join(h + b"\r\n" for h in lines) + b"\r\n" + body


def enc(value):
    if isinstance(value, bytes):
        return value
    return value.encode("utf-8", "surrogatepass")


def chunk_body(rng, body, size_line=None):
    """The body as 1 to 3 chunks; `size_line(n)` writes a chunk's size line."""
    cuts = sorted(rng.randrange(len(body) + 1) for _ in range(rng.randrange(3))) if body else []
    pieces, last = [], 0
    for cut in cuts + [len(body)]:
        if cut > last:
            pieces.append(body[last:cut])
        last = cut
    out = []
    for i, piece in enumerate(pieces):
        size = size_line(len(piece)) if size_line and i == 0 else b"%x" % len(piece)
        out.append(size + b"\r\n" + piece + b"\r\n")
    return b"".join(out) + b"0\r\n\r\n"


class Answer:
    def __init__(self, status=None, reason="", headers=None, body=b"", error=None):
        self.status, self.reason, self.body, self.error = status, reason, body, error
        self.headers = headers or {}

    @property
    def label(self):
        return self.status if self.status is not None else "no answer (%s)" % self.error

    @property
    def closes(self):
        return self.status is None or self.headers.get("connection", "").lower() == "close"


class Wire:
    """A client socket read with one deadline per answer."""

    def __init__(self, port, source=None, timeout=ANSWER_TIMEOUT):
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            if source:
                try:
                    self.sock.bind((source, 0))
                except OSError:
                    pass            # no such loopback address here: 127.0.0.1 it is
            self.sock.connect((HOST, port))
        except BaseException:
            self.sock.close()
            raise
        self.buf = b""
        self.eof = False

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data, half_close=False):
        """Sends; a refusal mid-body (reset, broken pipe) is the server's right: its answer
        may still be there to read."""
        try:
            self.sock.sendall(data)
            if half_close:
                self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _fill(self, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout()
        self.sock.settimeout(left)
        data = self.sock.recv(256 * 1024)
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def _line(self, deadline, limit=65536):
        while b"\r\n" not in self.buf:
            if len(self.buf) > limit or not self._fill(deadline):
                raise EOFError
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exactly(self, n, deadline, keep):
        """Reads n bytes, keeping the first `keep`."""
        kept = b""
        while n > 0:
            if not self.buf and not self._fill(deadline):
                raise EOFError
            take, self.buf = self.buf[:n], self.buf[n:]
            n -= len(take)
            if len(kept) < keep:
                kept += take[:keep - len(kept)]
        return kept

    def answer(self):
        """The next answer (interim 1xx skipped), or an Answer saying why there is none."""
        deadline = time.monotonic() + self.timeout
        try:
            while True:
                while b"\r\n\r\n" not in self.buf:
                    if len(self.buf) > 65536:
                        return Answer(error="garbled")
                    if not self._fill(deadline):
                        return Answer(error="closed" if not self.buf else "cut")
                head, self.buf = self.buf.split(b"\r\n\r\n", 1)
                lines = head.split(b"\r\n")
                match = re.match(rb"HTTP/1\.[01] (\d{3})(?: (.*))?$", lines[0])
                if not match:
                    return Answer(error="garbled")
                status = int(match.group(1))
                if 100 <= status < 200:
                    continue
                headers = {}
                for line in lines[1:]:
                    k, _, v = line.partition(b":")
                    headers[k.strip().lower().decode("latin-1")] = v.strip().decode("latin-1")
                reason = (match.group(2) or b"").decode("latin-1")
                body = self._body(status, headers, deadline)
                return Answer(status, reason, headers, body)
        except socket.timeout:
            return Answer(error="timeout")
        except (ConnectionResetError, BrokenPipeError):
            return Answer(error="reset")
        except (EOFError, OSError, ValueError):
            return Answer(error="cut")

    def _body(self, status, headers, deadline):
        if status in (204, 304):
            return b""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            kept, total = b"", 0
            while True:
                size = int(self._line(deadline).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self._line(deadline):
                        pass        # trailers
                    return kept
                total += size
                if total > READ_MAX:
                    raise EOFError
                kept += self._exactly(size, deadline, max(0, READ_KEEP - len(kept)))
                self._line(deadline)
        if "content-length" in headers:
            return self._exactly(min(int(headers["content-length"]), READ_MAX), deadline,
                                 READ_KEEP)
        kept = self.buf
        while self._fill(deadline) and len(kept) < READ_MAX:
            kept, self.buf = kept + self.buf, b""
        return kept[:READ_KEEP]


# --------------------------------------------------------------------------------------
# The server, the script's own client calls
# --------------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def users_for(count):
    return [("user", "pass")] + [("user%d" % i, "pass%d" % i) for i in range(2, count + 1)]


class Server:
    """ankisync.py serve on 127.0.0.1, as the tests start it (test_ankisync.SyncServer)."""

    def __init__(self, python, root, users):
        self.python, self.users = python, users
        self.base = os.path.join(root, "data")
        self.log_path = os.path.join(root, "server.log")
        self.port = free_port()
        self.proc = None

    def start(self):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SYNC_")}
        env.update(SYNC_BASE=self.base, SYNC_HOST=HOST, SYNC_PORT=str(self.port))
        for i, (name, password) in enumerate(self.users, 1):
            env["SYNC_USER%d" % i] = "%s:%s" % (name, password)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([self.python, ANKISYNC_PY, "serve"], env=env,
                                         stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit("the server exited with %s:\n%s"
                                 % (self.proc.returncode, self.log_tail()))
            if health(self.port, timeout=2).status == 200:
                return
            time.sleep(0.1)
        self.stop()
        raise SystemExit("the server did not answer /health in %.0f s:\n%s"
                         % (START_TIMEOUT, self.log_tail()))

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self):
        if not self.alive():
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def log_tail(self, lines=30):
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""


def health(port, timeout=HEALTH_TIMEOUT):
    try:
        wire = Wire(port, timeout=timeout)
    except OSError as e:
        return Answer(error=type(e).__name__)
    try:
        wire.send(b"GET /health HTTP/1.1\r\nhost: %s:%d\r\n\r\n" % (HOST.encode(), port))
        return wire.answer()
    finally:
        wire.close()


def v11_call(port, area, method, payload, key="", session="", raw=False):
    """One valid modern request from SETUP_SOURCE: (status, decoded body)."""
    header = json.dumps({"v": 11, "k": key, "c": CLIENT, "s": session}, separators=(",", ":"))
    body = zstd().compress(payload if raw else json.dumps(payload).encode())
    req = Req("POST", "/%s/%s" % (area, method),
              [("anki-sync", header), ("content-type", "application/octet-stream")],
              body, False)
    wire = Wire(port, source=SETUP_SOURCE, timeout=60)
    try:
        wire.send(req.frame(random.Random(0), port))
        ans = wire.answer()
    finally:
        wire.close()
    data = ans.body
    if ans.status == 200 and data[:4] == b"\x28\xb5\x2f\xfd":
        data = zstd().decompress(data, DECODE_LIMIT)
    return ans.status, data


class Me:
    """A worker's identity: user, password, host key, media session key, session."""

    def __init__(self, user, password, rng):
        self.user, self.password = user, password
        self.key = self.sk = ""
        self.rng = rng
        self.new_session()

    def new_session(self):
        self.session = "fz%06x" % self.rng.randrange(1 << 24)

    def login(self, port):
        deadline = time.monotonic() + 60
        while True:
            status, data = v11_call(port, "sync", "hostKey", {"u": self.user, "p": self.password})
            if status == 200:
                self.key = json.loads(data)["key"]
                break
            if time.monotonic() > deadline:
                raise RuntimeError("login of %s: %s %r" % (self.user, status, data[:200]))
            time.sleep(1.5)     # throttled by the fuzzed wrong passwords: one check a second
        status, data = v11_call(port, "msync", "begin", {"v": CLIENT}, self.key, self.session)
        try:
            self.sk = json.loads(data)["data"]["sk"] if status == 200 else self.key
        except (ValueError, KeyError, TypeError):
            self.sk = self.key

    def upload(self, port, collection):
        status, data = v11_call(port, "sync", "upload", collection, self.key, self.session,
                                raw=True)
        return status


# --------------------------------------------------------------------------------------
# The fuzzer: one shot = one mutated request (and what goes before it)
# --------------------------------------------------------------------------------------

class Shot:
    def __init__(self, family, kind, desc, template, req=None):
        self.family, self.kind, self.desc = family, kind, desc
        self.template = template
        self.route = template.route if template else "page/health"
        self.req = req
        self.data = None            # the bytes, once framed
        self.pre = None             # a request sent before it on the same connection
        self.answers = 1            # answers expected to `data` (2 when pipelined)
        self.half_close = False     # the request is cut short: FIN after it
        self.status = None
        self.pre_status = None
        self.pre_template = None
        self.pre_shot = None        # the valid start before it, when that answered 5xx
        self.reason = ""
        self.retry_after = None
        self.worker = self.user = self.key = None
        self.n = 0
        self.started = self.finished = None

    def first_line(self):
        line = (self.data or b"").split(b"\r\n", 1)[0]
        return line[:70].decode("latin-1").replace("\x00", "\\0")


FAMILIES = [("json", 30), ("envelope", 17), ("http", 18), ("bytes", 8), ("pipeline", 5),
            ("media", 10), ("upload", 5), ("valid", 3)]


class Fuzzer:
    def __init__(self, rng, templates, me, port, collection, workdir):
        self.rng, self.me, self.port = rng, me, port
        self.templates = templates
        self.with_json = [t for t in templates if t.has_json]
        self.media = [t for t in templates if t.method == "uploadChanges"]
        self.uploads = [t for t in templates if t.method == "upload"]
        self.gets = [t for t in templates if t.style == "get"] or templates
        self.starts = {t.folder: t for t in reversed(templates) if t.method == "start"}
        self.collection = collection
        self.workdir = workdir
        self.families = [f for f, _ in FAMILIES]
        self.weights = [w for _, w in FAMILIES]

    def make(self):
        rng = self.rng
        family = rng.choices(self.families, self.weights)[0]
        shot = getattr(self, "make_" + family)()
        if shot.data is None:
            shot.data = shot.req.frame(rng, self.port)
        tmpl = shot.template
        if tmpl is not None and tmpl.method in NORMAL_SYNC and shot.pre is None \
                and family not in ("pipeline",) and rng.random() < 0.7:
            start = self.starts.get(tmpl.folder)
            if start is not None:
                shot.pre = start.request(self.me).frame(rng, self.port)
                shot.pre_template = start
        return shot

    # -- families -----------------------------------------------------------------

    def make_valid(self):
        tmpl = self.rng.choice(self.templates)
        return Shot("valid", "valid/%s" % tmpl.style, "as recorded", tmpl, tmpl.request(self.me))

    def make_json(self):
        rng = self.rng
        tmpl = rng.choice(self.with_json)
        obj = tmpl.json_for(self.me)
        descs, kinds = [], []
        if rng.random() < 0.15:
            text = dump(obj).encode("utf-8")
            op = rng.choice(TEXT_OPS)
            text, desc = text_op(rng, text, op)
            kinds.append("text-" + op)
            descs.append(desc)
        else:
            wanted = rng.choice([1, 1, 1, 2, 3])
            for _ in range(wanted * 3):         # an op finds nothing to change now and then
                op = rng.choice(JSON_OPS)
                new, desc = json_op(rng, obj, op)
                if new is None:
                    continue
                obj = new
                kinds.append(op)
                descs.append(desc)
                if len(kinds) == wanted:
                    break
            try:
                text = dump(obj).encode("utf-8", "surrogatepass")
            except RecursionError:
                text = b"[]"
        kind = "json/" + (kinds[0] if kinds else "none")
        return Shot("json", kind, "; ".join(descs) or "unchanged", tmpl,
                    tmpl.request(self.me, raw=text))

    def make_envelope(self):
        tmpl = self.rng.choice([t for t in self.templates if t.style != "get"]
                               if self.rng.random() < 0.9 else self.gets)
        if tmpl.style == "modern":
            return self.modern_envelope(tmpl)
        if tmpl.style == "legacy":
            return self.legacy_envelope(tmpl)
        return self.query_envelope(tmpl)

    def modern_envelope(self, tmpl):
        rng, me = self.rng, self.me
        raw = tmpl.payload if isinstance(tmpl.payload, bytes) \
            else dump(tmpl.json_for(me)).encode()
        op = rng.choice(["field", "field", "field", "header", "header", "compress", "compress",
                         "compress", "content-type", "no-header", "hybrid"])
        req = tmpl.request(me, raw=raw)
        if op == "field":
            header = tmpl.header_for(me)
            sub = rng.choice(["type", "int", "string", "name", "deep", "long", "delete", "add",
                              "empty", "float"])
            key = rng.choice(["v", "k", "c", "s"])
            if sub == "delete":
                header.pop(key, None)
                desc = "header without %s" % key
            elif sub == "add":
                header[rng.choice(["x", "", "V", "k\x00"])] = 1
                desc = "header with an extra field"
            else:
                obj, desc = json_op(rng, {key: header.get(key)}, sub)
                if isinstance(obj, dict):
                    header.update(obj)
                desc = "anki-sync " + desc
            text = dump(header)
            req = tmpl.request(me, raw=raw, header=text)
            return Shot("envelope", "envelope/header-" + sub, desc, tmpl, req)
        if op == "header":
            good = json.dumps(tmpl.header_for(me), separators=(",", ":"))
            choices = [
                ("", "empty"), ("{", "'{'"), ("null", "null"), ("[]", "[]"), ("11", "11"),
                ('{"v":11}', "only v"), (good + good, "twice in one"), (good[:-1], "cut"),
                (good.replace('"v":11', '"v":11.0'), "v 11.0"),
                (good.replace('"v":11', '"v":"11"'), 'v "11"'),
                (good.replace('"v":11', '"v":true'), "v true"),
                (good.replace('"k":"', '"k":"\\ud800'), "k with \\ud800"),
                (good.replace('"c":"', '"c":"\\udfff'), "c with \\udfff"),
                (b'{"v":11,"k":"\xff\xfe","c":"x","s":"y"}', "non-UTF-8 bytes"),
                (good.encode() + b"\xb2", "latin-1 byte after"),
                ("[" * 5000 + "]" * 5000, "nested 5000 deep"),
                ('{"v":11,' + '"a":[' * 3000 + "]" * 3000 + "}", "a field nested 3000 deep"),
                (good.replace(":", ": "), "spaces"), (" " + good, "leading space"),
                (good.replace('"v":11', '"v":11,"v":1'), "v twice"),
                (good.replace('"v":11', '"v":1e999'), "v 1e999"),
                (good.replace('"v":11', '"v":NaN'), "v NaN"),
                (good.replace('"v":11', '"v":%d' % 2 ** 64), "v 2**64"),
                (good.replace('"v":11', '"v":-11'), "v -11"),
                (good.replace('"v":11', '"v":8'), "v 8 (a legacy number)"),
            ]
            text, desc = rng.choice(choices)
            req.headers = [(k, text if k.lower() == "anki-sync" else v) for k, v in req.headers]
            if rng.random() < 0.15:
                req.headers.append(("anki-sync", good))
                desc += ", then a valid second anki-sync header"
            return Shot("envelope", "envelope/header-raw", "anki-sync: " + desc, tmpl, req)
        if op == "compress":
            z = zstd().compress(raw)
            choices = [
                (raw, "not compressed"), (gzip_bytes(raw), "gzip"),
                (zlib.compress(raw), "zlib"), (zstd().compress(z), "zstd twice"),
                (z[:rng.randrange(max(1, len(z)))], "zstd cut short"),
                (z + rng.choice([b"\x00", b"garbage", z[:5]]), "zstd then bytes"),
                (z[:len(z) // 2], "half a zstd frame"),
                (b"", "empty body"),
                (zstd().compress(raw[:len(raw) // 2]) + zstd().compress(raw[len(raw) // 2:]),
                 "two zstd frames"),
                (b"\x50\x2a\x4d\x18\x04\x00\x00\x00abcd" + z, "skippable frame first"),
                (flip(rng, z, 3), "zstd with 3 bytes flipped"),
                (b"\x28\xb5\x2f\xfd" + bytes(20), "zstd magic, then zeros"),
            ]
            if rng.random() < 0.08:
                megabytes = rng.choice([50, 400])
                choices = [(bomb("zstd", megabytes), "zstd bomb of %d MiB" % megabytes)]
            body, desc = rng.choice(choices)
            req.body = body
            return Shot("envelope", "envelope/compression", desc, tmpl, req)
        if op == "content-type":
            value = rng.choice(["", "text/plain", "multipart/form-data", "application/json",
                                "multipart/form-data; boundary=x", "\xff"])
            req.headers = [(k, v) for k, v in req.headers if k.lower() != "content-type"]
            if rng.random() < 0.8:
                req.headers.append(("Content-Type", value))
            return Shot("envelope", "envelope/content-type", "content-type %r" % value, tmpl, req)
        if op == "no-header":
            req.headers = [(k, v) for k, v in req.headers if k.lower() != "anki-sync"]
            return Shot("envelope", "envelope/no-header", "anki-sync header removed", tmpl, req)
        # hybrid: a legacy form with an anki-sync header, or the other way round
        legacy = rng.choice([t for t in self.templates if t.style == "legacy"] or [tmpl])
        form = legacy.request(self.me)
        req.headers = [(k, v) for k, v in req.headers if k.lower() != "content-type"]
        req.headers.append(("content-type", "multipart/form-data; boundary=%s"
                            % (legacy.boundary or b"x").decode()))
        req.body = form.body
        return Shot("envelope", "envelope/hybrid", "anki-sync header on a legacy form", tmpl, req)

    def legacy_envelope(self, tmpl):
        rng, me = self.rng, self.me
        fields = tmpl.fields_for(me)
        raw = tmpl.payload if isinstance(tmpl.payload, bytes) \
            else dump(tmpl.json_for(me)).encode() if tmpl.payload is not None else None
        data = [p for p in fields if p[0] == "data"]
        if data and raw is not None:
            data[0][2] = tmpl.encode_data(raw)
        op = rng.choice(["field", "field", "missing", "twice", "order", "gzip", "gzip",
                         "boundary", "boundary", "boundary", "part-head", "many"])
        boundary, closing, newline = tmpl.boundary, True, b"\r\n"
        ctype = None
        desc = op
        if op == "field":
            part = rng.choice(fields)
            values = [b"", b"x" * 70000, b"\xff\xfe", b"\x00", b"-1", b"2", b"01", b"\xef\xbc\x91",
                      b"1 ", b"\xed\xa0\x80", b"null", b'{"a":1}', b"9" * 30, me.key.encode()[:-1]]
            part[2] = rng.choice(values)
            desc = "field %s=%s" % (part[0], value_text(part[2].decode("latin-1")))
        elif op == "missing":
            part = fields.pop(rng.randrange(len(fields)))
            desc = "field %s missing" % part[0]
        elif op == "twice":
            part = copy.deepcopy(rng.choice(fields))
            if rng.random() < 0.5:
                part[2] = b"other"
            fields.insert(rng.randrange(len(fields) + 1), part)
            desc = "field %s twice" % part[0]
        elif op == "order":
            rng.shuffle(fields)
            desc = "parts in order %s" % ",".join(p[0] for p in fields)
        elif op == "gzip":
            if not data:
                data = [["data", b'Content-Disposition: form-data; name="data"; filename="data"',
                         b""]]
                fields.append(data[0])
            packed = data[0][2]
            source = raw or b"{}"
            choices = [(source, "data not gzipped"), (packed[:len(packed) // 2], "gzip cut"),
                       (packed + b"trailing", "gzip then bytes"),
                       (gzip_bytes(gzip_bytes(source)), "gzip twice"),
                       (zlib.compress(source), "zlib, not gzip"),
                       (flip(rng, packed, 2), "gzip with 2 bytes flipped"),
                       (zstd().compress(source), "zstd in a legacy form"),
                       (None, "gzip bomb"), (b"", "empty data")]
            data[0][2], desc = rng.choice(choices)
            if data[0][2] is None:
                megabytes = rng.choice([1, 50, 400])
                data[0][2], desc = bomb("gzip", megabytes), "gzip bomb of %d MiB" % megabytes
            cparts = [p for p in fields if p[0] == "c"]
            if cparts and rng.random() < 0.3:
                cparts[0][2] = rng.choice([b"0", b"1", b"2"])
                desc += ", c=%s" % cparts[0][2].decode()
        elif op == "boundary":
            how = rng.choice(["other", "no-close", "quoted", "long", "lf", "none", "empty",
                              "preamble", "spaces", "twice", "prefix", "case"])
            desc = "boundary: " + how
            if how == "other":
                boundary = b"other-boundary"
                ctype = "multipart/form-data; boundary=%s" % tmpl.boundary.decode()
            elif how == "no-close":
                closing = False
            elif how == "quoted":
                ctype = 'multipart/form-data; boundary="%s"' % tmpl.boundary.decode()
            elif how == "long":
                boundary = b"b" * rng.choice([71, 200, 5000])
            elif how == "lf":
                newline = b"\n"
            elif how == "none":
                ctype = "multipart/form-data"
            elif how == "empty":
                ctype = "multipart/form-data; boundary="
            elif how == "spaces":
                boundary = b"a b "
            elif how == "twice":
                ctype = "multipart/form-data; boundary=zz; boundary=%s" % tmpl.boundary.decode()
            elif how == "prefix":
                boundary = tmpl.boundary[:len(tmpl.boundary) // 2]
                ctype = "multipart/form-data; boundary=%s" % tmpl.boundary.decode()
            elif how == "case":
                ctype = "Multipart/Form-Data; BOUNDARY=%s" % tmpl.boundary.decode()
            body = join_multipart(fields, boundary, closing, newline)
            if how == "preamble":
                body = b"preamble\r\n" + body + b"epilogue" * 100
            req = tmpl.request(me, fields=fields)
            req.body = body
            set_ctype(req, ctype or "multipart/form-data; boundary=%s" % boundary.decode())
            return Shot("envelope", "envelope/form-boundary", desc, tmpl, req)
        elif op == "part-head":
            part = rng.choice(fields)
            heads = [b"", b"Content-Disposition: form-data",
                     b"Content-Disposition: form-data; name=",
                     b"Content-Disposition: form-data; name=%s" % part[0].encode(),
                     b'Content-Disposition: form-data; name="%s"; name="k"' % part[0].encode(),
                     b'Content-Disposition: form-data; name*=UTF-8\'\'%s' % part[0].encode(),
                     b'Content-Disposition: form-data; name="%s"\r\n folded: x' % part[0].encode(),
                     b'Content-Disposition: form-data; name="\xff"',
                     b'content-disposition:form-data;name="%s"' % part[0].encode(),
                     b"X: " + b"y" * 9000 + b'\r\nContent-Disposition: form-data; name="%s"'
                     % part[0].encode()]
            part[1] = rng.choice(heads)
            desc = "part %s head %s" % (part[0], value_text(part[1].decode("latin-1")))
        elif op == "many":
            n = rng.choice([17, 100, 5000])
            for i in range(n):
                fields.append(["x%d" % i, b'Content-Disposition: form-data; name="x%d"' % i, b"1"])
            desc = "%d more parts" % n
        req = tmpl.request(me, fields=fields)
        return Shot("envelope", "envelope/form-" + op, desc, tmpl, req)

    def query_envelope(self, tmpl):
        rng, me = self.rng, self.me
        base = tmpl.target.split("?", 1)[0]
        key = me.key
        queries = [("", "no query"), ("?", "empty query"), ("?k=%s" % key, "no v"),
                   ("?v=x", "no k"), ("?k=%s&k=%s&v=x" % (key, key), "k twice"),
                   ("?k=&v=x", "k empty"), ("?k=%%zz&v=%%", "bad escapes"),
                   ("?k=%s%%00&v=x" % key, "NUL in k"),
                   ("?k=%s&v=%s" % (key, "x" * 9000), "long v"),
                   ("?k=%s&v=%%ff%%fe" % key, "non-UTF-8 v"), ("?k=%s#frag" % key, "fragment"),
                   ("?k=%s&v=\xe9" % key, "raw latin-1 in the query"),
                   ("?k=%s&v=%%ED%%A0%%80" % key, "surrogate escape"),
                   ("?k=%s;v=x" % key, "semicolon")]
        query, desc = rng.choice(queries)
        req = tmpl.request(me)
        req.target = (base + query).encode("latin-1")
        return Shot("envelope", "envelope/query", desc, tmpl, req)

    def make_http(self):
        rng = self.rng
        tmpl = rng.choice(self.templates)
        req = tmpl.request(self.me)
        op = rng.choice(["length", "length", "length", "chunk", "chunk", "te", "line", "line",
                         "header", "header", "lf"])
        body = req.body
        half = False
        if op == "length":
            values = [(b"\xb2", "'\\xb2' (superscript 2)"), (b"\xd9\xa3", "Arabic-Indic 3"),
                      (b"\xef\xbc\x95", "fullwidth 5"), (b"-1", "-1"), (b"-%d" % len(body), "-n"),
                      (b"+%d" % len(body), "+n"), (b" %d" % len(body), "' n'"),
                      (b"%d " % len(body), "'n '"), (b"0x%x" % len(body), "0xN"),
                      (b"1_0", "1_0"), (b"9" * 30, "30 nines"), (b"9" * 18, "18 nines"),
                      (b"%d" % (len(body) + 100), "n+100"), (b"", "empty"),
                      (b"%d, %d" % (len(body), len(body)), "'n, n'"), (b"1e3", "1e3"),
                      (b"%d" % (2 ** 64 + len(body)), "2**64+n"), (b"0%d" % len(body), "0n")]
            value, desc = rng.choice(values)
            framing = [b"content-length: " + value]
            extra = rng.random()
            if extra < 0.2:
                framing.append(b"content-length: %d" % (len(body) + 1))
                desc += ", and a second content-length n+1"
            elif extra < 0.35:
                framing.append(b"transfer-encoding: chunked")
                desc += ", and transfer-encoding: chunked"
                body = chunk_body(rng, body)
            req.framing = (framing, body)
            half = True
            kind = "http/content-length"
            desc = "Content-Length " + desc
        elif op == "chunk":
            sizes = [(lambda n: b"-3", "-3"), (lambda n: b"0x%x" % n, "0xN"),
                     (lambda n: b"1_0", "1_0"), (lambda n: b" %x" % n, "' N'"),
                     (lambda n: b"%x " % n, "'N '"), (lambda n: b"+%x" % n, "+N"),
                     (lambda n: b"f" * 20, "20 f"), (lambda n: b"f" * 15, "15 f"),
                     (lambda n: b"%x;a=b" % n, "extension"), (lambda n: b"%x;" % n, "';' only"),
                     (lambda n: b"", "empty"), (lambda n: b"%X" % n, "upper hex"),
                     (lambda n: b"\xb2", "'\\xb2'"), (lambda n: b"%x;" % n + b"x" * 2000,
                                                     "2000-byte extension"),
                     (lambda n: b"%x" % (n + 5), "N+5"), (lambda n: b"%x" % max(0, n - 1), "N-1"),
                     (lambda n: b"0" * 40 + b"%x" % n, "40 leading zeros")]
            size_line, desc = rng.choice(sizes)
            framed = chunk_body(rng, body or b"x", size_line)
            tail = rng.random()
            if tail < 0.15:
                framed = framed[:-5]
                desc += ", no last chunk"
            elif tail < 0.3:
                filler = b"y" * rng.choice([10, 9000])
                framed = framed[:-2] + b"x-trailer: 1\r\n" + filler + b"\r\n\r\n"
                desc += ", a trailer"
            elif tail < 0.4:
                framed = framed.replace(b"\r\n", b"\n")
                desc += ", LF only"
            req.framing = ([b"transfer-encoding: chunked"], framed)
            half = True
            kind = "http/chunk-size"
            desc = "chunk size " + desc
        elif op == "te":
            values = [b"chunked, chunked", b"gzip, chunked", b"Chunked", b"identity", b" chunked",
                      b"chunked\x0b", b"chunked;q=1", b"x", b"chunked, identity", b"CHUNKED"]
            value = rng.choice(values)
            framing = [b"transfer-encoding: " + value]
            if rng.random() < 0.3:
                framing.append(b"transfer-encoding: chunked")
            req.framing = (framing, chunk_body(rng, body))
            half = True
            kind, desc = "http/transfer-encoding", "Transfer-Encoding %r" % value
        elif op == "line":
            choices = [
                (lambda: setattr(req, "verb", "post"), "method post"),
                (lambda: setattr(req, "verb", rng.choice(["PUT", "DELETE", "OPTIONS", "PATCH",
                                                          "CONNECT", "TRACE", "PRI"])),
                 "another method"),
                (lambda: setattr(req, "verb", "HEAD"), "method HEAD"),
                (lambda: setattr(req, "verb", "GET" if req.verb == "POST" else "POST"),
                 "GET/POST swapped"),
                (lambda: setattr(req, "verb", "P\x00ST"), "NUL in method"),
                (lambda: setattr(req, "version", "HTTP/1.0"), "HTTP/1.0"),
                (lambda: setattr(req, "version", "HTTP/2.0"), "HTTP/2.0"),
                (lambda: setattr(req, "version", "HTTP/1.1x"), "HTTP/1.1x"),
                (lambda: setattr(req, "version", "HTTP/01.1"), "HTTP/01.1"),
                (lambda: setattr(req, "version", ""), "no version"),
                (lambda: setattr(req, "target", "http://127.0.0.1" + req.target), "absolute-form"),
                (lambda: setattr(req, "target", "*"), "target *"),
                (lambda: setattr(req, "target", req.target + "%00"), "%00 in target"),
                (lambda: setattr(req, "target", req.target.replace("/sync/", "/sync/%2e%2e/")
                                 .replace("/msync/", "/msync/../")), "dot segments"),
                (lambda: setattr(req, "target", "/" + "a" * 17000), "target of 17000 bytes"),
                (lambda: setattr(req, "target", req.target.encode() + b"\xff\xfe"),
                 "0xff in target"),
                (lambda: setattr(req, "target", ""), "empty target"),
                (lambda: setattr(req, "target", "//" + req.target), "double slash"),
                (lambda: setattr(req, "target", req.target.upper()), "upper-case target"),
                (lambda: setattr(req, "target", req.target + "/../../etc/passwd"), "../ after"),
                (lambda: setattr(req, "verb", req.verb + " "), "two spaces"),
            ]
            change, desc = rng.choice(choices)
            change()
            kind, desc = "http/request-line", "request line: " + desc
            half = True
        elif op == "header":
            choices = [
                ([b"no colon here"], "a line without colon"),
                ([b" folded: continuation"], "an obs-fold line"),
                ([b"x-a : b"], "space before colon"),
                ([b"x-a: \xff\xfe\x80"], "non-latin bytes in a value"),
                ([b"x-\xe9: 1"], "non-ASCII header name"),
                ([b"x-a: b\x00c"], "NUL in a value"),
                ([b": empty name"], "empty name"),
                ([b"x-long: " + b"y" * 20000], "a 20000-byte header"),
                ([b"x-%d: 1" % i for i in range(150)], "150 headers"),
                ([b"expect: 100-continue"], "Expect: 100-continue"),
                ([b"expect: 200-ok"], "Expect: 200-ok"),
                ([b"connection: close"], "Connection: close"),
                ([b"connection: upgrade", b"upgrade: h2c"], "Upgrade: h2c"),
                ([b"host: other", b"host: 127.0.0.1"], "Host twice"),
                ([b"x-forwarded-for: 1.2.3.4, \xff, ::1"], "X-Forwarded-For"),
                ([b"x-real-ip: 999.1.1.1"], "X-Real-IP"),
                ([b"content-encoding: gzip"], "Content-Encoding: gzip"),
                ([b"anki-sync: " + b"[" * 8000], "anki-sync nested, second"),
                ([b"x-a: 1\rx-b: 2"], "bare CR"),
            ]
            lines, desc = rng.choice(choices)
            req.extra = lines
            kind, desc = "http/header-line", "header: " + desc
            half = rng.random() < 0.5
        else:
            data = req.frame(rng, self.port)
            head, _, rest = data.partition(b"\r\n\r\n")
            shot = Shot("http", "http/lf-only", "head lines end in LF only", tmpl, req)
            shot.data = head.replace(b"\r\n", b"\n") + b"\n\n" + rest
            return shot
        shot = Shot("http", kind, desc, tmpl, req)
        shot.half_close = half
        return shot

    def make_bytes(self):
        rng = self.rng
        tmpl = rng.choice(self.templates)
        data = tmpl.request(self.me).frame(rng, self.port)
        op = rng.choice(["flip", "flip", "cut", "insert", "repeat", "delete", "ff-run"])
        head_len = data.find(b"\r\n\r\n") + 4
        at = rng.randrange(len(data)) if rng.random() < 0.5 or len(data) <= head_len \
            else rng.randrange(head_len, len(data))
        if op == "flip":
            n = rng.choice([1, 1, 2, 8])
            data, desc = flip(rng, data, n), "%d bytes flipped" % n
        elif op == "cut":
            data, desc = data[:at], "cut at %d of %d" % (at, len(data))
        elif op == "insert":
            junk = bytes(rng.randrange(256) for _ in range(rng.choice([1, 4, 100])))
            data, desc = data[:at] + junk + data[at:], "%d random bytes at %d" % (len(junk), at)
        elif op == "repeat":
            n = rng.randrange(1, 200)
            data, desc = data[:at] + data[at:at + n] * 2 + data[at + n:], "bytes at %d twice" % at
        elif op == "delete":
            n = rng.randrange(1, 50)
            data, desc = data[:at] + data[at + n:], "%d bytes gone at %d" % (n, at)
        else:
            n = rng.randrange(1, 40)
            data, desc = data[:at] + b"\xff" * n + data[at + n:], "%d bytes of 0xff at %d" % (n, at)
        shot = Shot("bytes", "bytes/" + op, desc, tmpl)
        shot.data, shot.half_close = data, True
        return shot

    def make_pipeline(self):
        rng = self.rng
        maker = rng.choice([self.make_json, self.make_envelope, self.make_http, self.make_valid])
        shot = maker()
        if shot.data is None:
            shot.data = shot.req.frame(rng, self.port)
        shot.data = b"GET /health HTTP/1.1\r\nhost: %s:%d\r\n\r\n" % (HOST.encode(), self.port) \
            + shot.data
        shot.answers = 2
        shot.kind = "pipeline/" + shot.kind
        shot.family = "pipeline"
        shot.desc = "GET /health, then " + shot.desc
        return shot

    def make_media(self):
        rng, me = self.rng, self.me
        tmpl = rng.choice(self.media)
        if rng.random() < 0.2:
            archive = tmpl.payload
            op = rng.choice(["flip", "cut", "append"])
            if op == "flip":
                archive, desc = flip(rng, archive, rng.choice([1, 3, 10])), "recorded zip, flipped"
            elif op == "cut":
                at = rng.randrange(len(archive))
                archive, desc = archive[:at], "recorded zip cut at %d" % at
            else:
                archive, desc = archive + archive, "recorded zip twice"
            kind = "media/raw-" + op
        else:
            archive, desc, kind = make_zip(rng)
        return Shot("media", kind, desc, tmpl, tmpl.request(me, raw=archive))

    def make_upload(self):
        rng = self.rng
        tmpl = rng.choice(self.uploads)
        base = self.collection if rng.random() < 0.3 else tmpl.payload
        path = os.path.join(self.workdir, "mutate.anki2")
        data, kind, desc = mutate_collection(rng, base, path)
        return Shot("upload", "upload/" + kind, desc, tmpl, tmpl.request(self.me, raw=data))


def set_ctype(req, value):
    req.headers = [(k, v) for k, v in req.headers if k.lower() != "content-type"]
    req.headers.append(("content-type", value))


def flip(rng, data, n):
    if not data:
        return data
    data = bytearray(data)
    for _ in range(n):
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8) if rng.random() < 0.7 else rng.randrange(1, 256)
    return bytes(data)


# --------------------------------------------------------------------------------------
# Media zips
# --------------------------------------------------------------------------------------

def make_zip(rng):
    """An uploadChanges zip in the real shape (entries "0", "1", ... and `_meta`
    [[name, entry or null]]), mutated; (bytes, description, kind)."""
    n = rng.choice([0, 1, 2, 3, 5, 26])
    files = [("img%d.bin" % rng.randrange(50), bytes(rng.randrange(256) for _ in
                                                      range(rng.choice([0, 1, 100, 2000]))))
             for _ in range(n)]
    meta = [[name, str(i)] for i, (name, _) in enumerate(files)]
    if rng.random() < 0.3:
        meta.append(["gone%d.bin" % rng.randrange(9), None])        # a deletion
    entries = [(str(i), content) for i, (_, content) in enumerate(files)]
    op = rng.choice(["name", "name", "name", "meta-json", "meta-json", "entry-ref",
                     "meta-bytes", "entry-name", "lying", "method", "dup-name", "no-meta",
                     "big-meta", "valid"])
    desc = op
    meta_bytes = None
    if op == "name":
        if not meta:
            meta.append(["x", None])
        row = rng.choice(meta)
        row[0] = rng.choice(MEDIA_NAMES)
        desc = "name %s" % value_text(row[0])
    elif op == "meta-json":
        obj, desc = json_op(rng, meta, rng.choice(JSON_OPS))
        meta = obj if obj is not None else meta
        desc = "_meta " + desc
    elif op == "entry-ref":
        if not meta:
            meta.append(["x", "0"])
        row = rng.choice(meta)
        row[1] = rng.choice(["99", "_meta", 5, "", ["0"], "-1", "0 ", "00", True, {"a": 1}])
        desc = "_meta entry %s" % value_text(row[1])
    elif op == "meta-bytes":
        meta_bytes = rng.choice([b"", b"{", b"\xff\xfe", b"null", b"[[\"a\"]]", b"[" * 5000,
                                 b"\xef\xbb\xbf[]", dump(meta).encode() + b" x"])
        desc = "_meta bytes %s" % value_text(meta_bytes.decode("latin-1"))
    elif op == "entry-name":
        if entries:
            i = rng.randrange(len(entries))
            new = rng.choice(MEDIA_NAMES + ["0/", "../0"])
            entries[i] = (new, entries[i][1])
            desc = "zip entry %s" % value_text(new)
    elif op == "dup-name":
        if meta:
            meta.append(list(meta[0]))
            desc = "a name twice in _meta"
    elif op == "no-meta":
        meta = None
        desc = "no _meta"
    elif op == "big-meta":
        meta = [["f%05d%s" % (i, "x" * 200), None] for i in range(300)]
        desc = "_meta of 300 long deletions (over 50 KB)"
    data_meta = meta_bytes if meta_bytes is not None else \
        None if meta is None else dump(meta).encode("utf-8", "surrogatepass")
    out = io.BytesIO()
    method = zipfile.ZIP_DEFLATED if rng.random() < 0.5 else zipfile.ZIP_STORED
    if op == "method":
        method = zipfile.ZIP_DEFLATED
    with warnings.catch_warnings(), zipfile.ZipFile(out, "w", method) as archive:
        warnings.simplefilter("ignore")         # a name twice is one of the mutations
        for name, content in entries:
            try:
                archive.writestr(name, content)
            except (ValueError, UnicodeError, IndexError):    # zipfile refuses "" and a few
                archive.writestr("bad-name", content)
        if data_meta is not None:
            archive.writestr("_meta", data_meta)
    data = out.getvalue()
    if op == "lying":
        data, desc = lie_in_zip(rng, data)
    elif op == "method":
        data, desc = patch_central(data, rng, 10, struct.pack("<H", rng.choice([1, 12, 14, 99]))), \
            "compression method not stored/deflate"
    return data, desc, "media/zip-" + op


def central_offsets(data):
    return [m.start() for m in re.finditer(b"PK\x01\x02", data)]


def patch_central(data, rng, field, value):
    """Overwrites `value` at byte `field` of a random central directory header."""
    spots = central_offsets(data)
    if not spots:
        return data
    at = rng.choice(spots) + field
    return data[:at] + value + data[at + len(value):]


def lie_in_zip(rng, data):
    choices = [(20, struct.pack("<I", 0xFFFFFFFF), "compressed size zip64 mark"),
               (24, struct.pack("<I", 0xFFFFFFFF), "size zip64 mark"),
               (24, struct.pack("<I", 10 ** 9), "size 1 GB"),
               (24, struct.pack("<I", 0), "size 0"),
               (16, struct.pack("<I", 0xDEADBEEF), "wrong CRC"),
               (42, struct.pack("<I", 0x7FFFFFFF), "local header far away"),
               (8, struct.pack("<H", 1), "encrypted flag"),
               (28, struct.pack("<H", 0xFFFF), "name length 65535"),
               (30, struct.pack("<H", 0xFFFF), "extra length 65535")]
    field, value, desc = rng.choice(choices)
    if rng.random() < 0.2:
        end = data.rfind(b"PK\x05\x06")
        if end >= 0:
            count = rng.choice([0, 0xFFFF, 1000])
            return data[:end + 10] + struct.pack("<H", count) + data[end + 12:], \
                "end record count %d" % count
    return patch_central(data, rng, field, value), desc


# --------------------------------------------------------------------------------------
# Collections
# --------------------------------------------------------------------------------------

SQL_VALUES = [2 ** 63 - 1, -2 ** 63, -1, 0, 10 ** 15, 1.5, 1e308, -0.0, "", "x" * 5000,
              "\x00", "e\u0301", "{", "[]", "null", b"\x00\xff", b"", None, "\U0001F600"]


def mutate_collection(rng, base, path):
    """A collection changed by one sqlite3 statement or a few flipped bytes; (bytes,
    kind, description)."""
    op = rng.choice(["cell", "cell", "cell", "json-cell", "json-cell", "delete", "drop",
                     "user_version", "duplicate", "flip", "cut", "not-sqlite"])
    if op == "flip":
        at = rng.randrange(100, len(base)) if rng.random() < 0.8 else rng.randrange(100)
        data = bytearray(base)
        for i in range(rng.choice([1, 4, 32])):
            data[min(len(data) - 1, at + i)] ^= 1 << rng.randrange(8)
        return bytes(data), op, "bytes flipped at %d" % at
    if op == "cut":
        at = rng.choice([4096, len(base) // 2, len(base) - 1, 100, 16])
        return base[:at], op, "cut at %d of %d" % (at, len(base))
    if op == "not-sqlite":
        data = rng.choice([b"", b"SQLite format 3\x00", b"x" * 4096, gzip_bytes(base)])
        return data, op, "%d bytes, not a collection" % len(data)
    for leftover in (path, path + "-journal", path + "-wal", path + "-shm"):
        if os.path.exists(leftover):
            os.unlink(leftover)
    with open(path, "wb") as f:
        f.write(base)
    desc = op
    con = sqlite3.connect(path)
    try:
        tables = [r[0] for r in con.execute(
            "select name from sqlite_master where type='table' and name not like 'sqlite_%'")]
        table = rng.choice(tables)
        columns = [r[1] for r in con.execute('pragma table_info("%s")' % table)]
        rowids = [r[0] for r in con.execute('select rowid from "%s" limit 2000' % table)] \
            if op != "drop" else []
        if op in ("cell", "json-cell") and rowids:
            rowid, column = rng.choice(rowids), rng.choice(columns)
            value = rng.choice(SQL_VALUES)
            if op == "json-cell":
                texts = [(r, c) for c in columns for r, v in con.execute(
                    'select rowid, "%s" from "%s" limit 200' % (c, table))
                    if isinstance(v, str) and v[:1] in "{["]
                if texts:
                    rowid, column = rng.choice(texts)
                    old = con.execute('select "%s" from "%s" where rowid=?' % (column, table),
                                      (rowid,)).fetchone()[0]
                    try:
                        obj, what = json_op(rng, json.loads(old), rng.choice(JSON_OPS))
                        value = dump(obj) if obj is not None else old
                        desc = "json %s" % what
                    except (ValueError, RecursionError):
                        pass
                else:
                    blobs = [(r, c) for c in columns for r, v in con.execute(
                        'select rowid, "%s" from "%s" limit 200' % (c, table))
                        if isinstance(v, bytes) and v]
                    if blobs:
                        rowid, column = rng.choice(blobs)
                        old = con.execute('select "%s" from "%s" where rowid=?'
                                          % (column, table), (rowid,)).fetchone()[0]
                        value = flip(rng, old, rng.choice([1, 2, 5]))
                        desc = "blob bytes flipped"
            if isinstance(value, str):
                value = value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
            con.execute('update "%s" set "%s"=? where rowid=?' % (table, column), (value, rowid))
            shown = "blob x'%s'" % value[:16].hex() if isinstance(value, bytes) \
                else value_text(value)
            desc = "%s.%s row %d %s" % (table, column, rowid,
                                       desc if op == "json-cell" and desc != op else "= " + shown)
        elif op == "delete" and rowids:
            if rng.random() < 0.5:
                con.execute('delete from "%s"' % table)
                desc = "every row of %s deleted" % table
            else:
                con.execute('delete from "%s" where rowid=?' % table, (rng.choice(rowids),))
                desc = "a row of %s deleted" % table
        elif op == "drop":
            con.execute('drop table "%s"' % table)
            desc = "table %s dropped" % table
        elif op == "user_version":
            value = rng.choice([0, 11, 17, 18, 19, 99, -1, 2 ** 31 - 1])
            con.execute("pragma user_version=%d" % value)
            if "col" in tables and rng.random() < 0.5:
                con.execute("update col set ver=?", (value,))
                desc = "user_version and col.ver %d" % value
            else:
                desc = "user_version %d" % value
        elif op == "duplicate" and rowids:
            rowid = rng.choice(rowids)
            con.execute('insert into "%s" select * from "%s" where rowid=?' % (table, table),
                        (rowid,))
            desc = "row of %s copied" % table
        else:
            desc = "%s: nothing to change in %s" % (op, table)
        con.commit()
    except sqlite3.Error as e:
        desc = "%s (%s)" % (desc, str(e)[:40])
    finally:
        con.close()
    with open(path, "rb") as f:
        return f.read(), op, desc


# --------------------------------------------------------------------------------------
# The server's log
# --------------------------------------------------------------------------------------

class LogWatch:
    """Reads the server's log as it grows; bad records are ERROR/CRITICAL lines with
    their tracebacks, and lines outside the log format (a thread's traceback on
    stderr, 'Exception in thread ...')."""

    def __init__(self, path):
        self.path = path
        self.offset = 0
        self.partial = ""
        self.held = None            # the last record read: more of it may be on its way

    def poll(self, flush=False):
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        self.offset += len(data)
        text = self.partial + data.decode("utf-8", "replace")
        lines = text.split("\n")
        self.partial = lines.pop()
        records = [self.held] if self.held else []
        self.held = None
        for line in lines:
            match = LOG_RECORD.match(line)
            if match:
                records.append([match.group(1), line])
            elif records and records[-1][0] in ("ERROR", "CRITICAL", "STDERR"):
                records[-1].append(line)
            else:
                records.append(["STDERR", line])
        if records and not flush and records[-1][0] in ("ERROR", "CRITICAL", "STDERR"):
            self.held = records.pop()       # complete only once the next one has begun
        return [r for r in records if r[0] in ("ERROR", "CRITICAL", "STDERR")
                or any("Traceback" in line for line in r[1:])]


def last_line(record):
    """The exception line of a traceback record (else its first line)."""
    for line in reversed(record[1:]):
        line = line.strip()
        if line and not line.startswith(("File ", "^", "~")) and not line.startswith("Traceback"):
            return line[:160]
    return LOG_RECORD.sub("", record[1])[:160]


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------

class Distinct:
    """One kind of finding: what it says, how often, on which routes, its first sample."""

    def __init__(self, kind, status, summary):
        self.kind, self.status, self.summary = kind, status, summary
        self.count = 0
        self.routes = []
        self.first = self.shot = self.upload = None


def same_text(summary):
    """A finding's text with what varies between requests taken out (numbers, quoted
    values, the method named), so that one fault counts once."""
    text = re.sub(r"^\S+ is not an HTTP method", "M is not an HTTP method", summary)
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "Q", text)
    return re.sub(r"-?\d+", "N", text)


class Run:
    def __init__(self, args, server, findings_dir, root):
        self.args, self.server, self.findings_dir, self.root = args, server, findings_dir, root
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.log = LogWatch(server.log_path)
        self.statuses = collections.Counter()
        self.kinds = collections.Counter()
        self.kind_bad = collections.Counter()       # 5xx or no answer, per kind
        self.families = collections.Counter()
        self.pre_statuses = collections.Counter()
        self.script_errors = collections.Counter()
        self.script_error_text = {}
        self.sent = self.resets = self.relogins = 0
        self.health_ok = self.health_fail = 0
        self.inflight = {}
        self.recent = collections.deque(maxlen=64)
        self.distinct = collections.OrderedDict()   # key -> Distinct
        self.pending = []           # [time first read, log record] its request has not ended
        self.last_upload = {}       # user -> the last shot of theirs an upload answered 200
        self.findings = 0
        self.saved = 0
        self.next_id = 0
        self.started = time.monotonic()

    # -- bookkeeping ----------------------------------------------------------------

    def begin(self, shot):
        with self.lock:
            self.next_id += 1
            shot.n = self.next_id
            shot.started = time.monotonic()
            self.inflight[shot.n] = shot

    def end(self, shot):
        with self.lock:
            shot.finished = time.monotonic()
            self.inflight.pop(shot.n, None)
            self.sent += 1
            self.statuses[shot.status] += 1
            self.kinds[shot.kind] += 1
            self.families[shot.family] += 1
            if shot.pre_status is not None:
                self.pre_statuses[shot.pre_status] += 1
            bad = isinstance(shot.status, int) and 500 <= shot.status <= 599
            if bad or not isinstance(shot.status, int):
                self.kind_bad[shot.kind] += 1
            if shot.route == "sync/upload" and shot.status == 200:
                if shot.family == "upload":
                    self.last_upload[shot.user] = shot
                else:
                    self.last_upload.pop(shot.user, None)
            self.recent.append(shot)
            if shot.pre_shot is not None:
                shot.pre_shot.n, shot.pre_shot.finished = shot.n, shot.finished
                self.judge(shot.pre_shot)
            self.judge(shot)

    def judge(self, shot):
        """The findings of one answered request: its 5xx, the log records since. A 501
        for a sync version the server does not speak is the protocol's own answer (old
        clients show "please upgrade Anki"), not a fault: it is counted, not reported."""
        bad = isinstance(shot.status, int) and 500 <= shot.status <= 599 and not (
            shot.status == 501 and "sync version" in (shot.reason or ""))
        records = self.log.poll(flush=bad)
        if shot.status == 500 and not records and not self.pending:
            time.sleep(0.1)                 # its traceback may still be on its way
            records = self.log.poll(flush=True)
        claimed = self.blame(records, shot if bad else None)
        if bad and not claimed and not (shot.status == 503 and shot.retry_after):
            self.finding("5xx", shot.status, [shot], shot.reason or "(no reason)", None)

    def blame(self, records, current, final=False):
        """Each bad log record as a finding on the request it most likely came from (the
        route it names, else the ones just answered); a record whose route is still in
        flight waits for that request to end. Whether one was `current`'s."""
        claimed = False
        now = time.monotonic()
        queue, self.pending = self.pending + [[now, r] for r in records], []
        for seen, record in queue:
            what = re.search(r"during (\S+)", record[1])
            route = what.group(1).rstrip(":") if what else None
            if current is not None and not claimed and route in (None, current.route):
                self.finding("5xx", current.status, [current], last_line(record), record)
                claimed = True
                continue
            flying = [s for s in self.inflight.values() if route is None or route == s.route
                      or (s.pre_template is not None and route == s.pre_template.route)]
            if flying and not final and now - seen < ANSWER_TIMEOUT + 5:
                self.pending.append([seen, record])
                continue
            window = [s for s in self.recent if s.finished and seen - s.finished < 5] + flying
            suspects = ([s for s in window if route and s.route == route] or window)[-3:]
            self.finding("log", suspects[-1].status if suspects else None, suspects,
                         last_line(record), record)
        return claimed

    def finding(self, kind, status, shots, summary, record):
        """Counts one finding; prints and saves it if it is new (and a few more of the
        same, as samples)."""
        self.findings += 1
        shot = shots[-1] if shots else None
        summary = " ".join(summary.split())
        key = (kind, status if kind != "log" else None, same_text(summary))
        entry = self.distinct.get(key)
        if entry is None:
            entry = self.distinct[key] = Distinct(kind, status, summary)
        entry.count += 1
        if shot and shot.route not in entry.routes:
            entry.routes.append(shot.route)
        upload = self.last_upload.get(shot.user) if shot and kind != "exit" and record \
            else None
        if entry.count <= SAVE_PER_FINDING and self.saved < SAVE_MAX:
            name = self.save(kind, status, shots, summary, record, upload)
            if entry.first is None:
                entry.first, entry.shot, entry.upload = name, shot, upload
        if entry.count == 1 and len(self.distinct) <= DETAIL_MAX:
            print("FINDING %d: %s %s %s | %s: %s | %s" % (
                len(self.distinct), kind, status if status is not None else "-",
                shot.route if shot else "-", shot.kind if shot else "-",
                (shot.desc if shot else "")[:80], summary[:140]), flush=True)
            if upload is not None:
                print("    this user's last accepted upload: %s: %s" % (upload.kind,
                                                                       upload.desc[:80]))
            if entry.first:
                print("    saved as %s" % entry.first, flush=True)
        elif entry.count == 1 and len(self.distinct) == DETAIL_MAX + 1:
            print("(more distinct findings: only counted from here on; see the summary)",
                  flush=True)

    def save(self, kind, status, shots, summary, record, upload):
        os.makedirs(self.findings_dir, exist_ok=True)
        self.saved += 1
        base = os.path.join(self.findings_dir, "finding-%04d" % self.saved)
        lines = ["finding: %s, status %s" % (kind, status), "summary: %s" % summary, ""]
        named = [(base + ("" if i == len(shots) - 1 else "-suspect%d" % (i + 1)), shot)
                 for i, shot in enumerate(shots)]
        if upload is not None:
            named.insert(0, (base + "-upload", upload))
            lines.append("the user's last accepted upload is saved too: it may have stored "
                         "what the request trips over")
        for name, shot in named:
            with open(name + ".bin", "wb") as f:
                f.write(shot.data or b"")
            if shot.pre:
                with open(name + ".pre.bin", "wb") as f:
                    f.write(shot.pre)
            lines += ["request: %s.bin%s" % (os.path.basename(name),
                                              " (after %s.pre.bin on the same connection)"
                                              % os.path.basename(name) if shot.pre else ""),
                      "  route: %s" % shot.route, "  first line: %s" % shot.first_line(),
                      "  mutation: %s: %s" % (shot.kind, shot.desc),
                      "  template: %s" % (shot.template.file if shot.template else "-"),
                      "  status: %s%s" % (shot.status, " (before it: %s)" % shot.pre_status
                                          if shot.pre else ""),
                      "  reason: %s" % shot.reason[:300],
                      "  user: %s" % shot.user, "  host key: %s" % shot.key,
                      "  half-closed after sending: %s" % shot.half_close, ""]
        if record:
            lines += ["server log:"] + record[1:][:200]
        with open(base + ".txt", "w", encoding="utf-8", errors="replace") as f:
            f.write("\n".join(lines) + "\n")
        return base + ".bin"

    def script_error(self, where):
        text = traceback.format_exc()
        with self.lock:
            key = "%s: %s" % (where, text.strip().splitlines()[-1][:120])
            self.script_errors[key] += 1
            if key not in self.script_error_text:
                self.script_error_text[key] = text
                print("script error (counted, the run goes on) in %s:\n%s" % (where, text),
                      file=sys.stderr, flush=True)

    # -- the threads ----------------------------------------------------------------

    def worker(self, index, fuzzer, me, collection, end):
        rng = fuzzer.rng
        last_reset = time.monotonic()
        while time.monotonic() < end and not self.stop.is_set():
            if time.monotonic() - last_reset > RESET_EVERY:
                last_reset = time.monotonic()
                self.reset(me, collection)
            if rng.random() < 0.02:
                me.new_session()
            try:
                shot = fuzzer.make()
            except Exception:
                self.script_error("making a request")
                continue
            shot.worker, shot.user, shot.key = index, me.user, me.key
            self.begin(shot)
            try:
                self.fire(shot)
            except Exception:
                shot.status = "script error"
                self.script_error("sending a request")
            try:
                self.end(shot)
            except Exception:
                self.script_error("recording an answer")
            # A 500 after a mutated upload was stored: that upload is the finding; more
            # requests on the same collection would only find it again.
            if 500 in (shot.status, shot.pre_shot and shot.pre_shot.status) \
                    and me.user in self.last_upload:
                last_reset = time.monotonic()
                self.reset(me, collection)

    def fire(self, shot):
        port = self.server.port
        try:
            wire = Wire(port)
        except OSError as e:
            shot.status = "no answer (connect: %s)" % type(e).__name__
            return
        try:
            if shot.pre is not None:
                wire.send(shot.pre)
                ans = wire.answer()
                shot.pre_status = ans.label
                if ans.status is not None and ans.status >= 500:
                    pre = shot.pre_shot = Shot("valid", "valid/start-before", "the valid start "
                                               "sent before a mutated request", shot.pre_template)
                    pre.data, pre.status, pre.user, pre.key = shot.pre, ans.status, shot.user, \
                        shot.key
                    pre.reason = " ".join(ans.body[:300].decode("latin-1").split())
                    pre.retry_after = ans.headers.get("retry-after")
                if ans.closes or wire.eof:
                    wire.close()
                    wire = Wire(port)
            wire.send(shot.data, shot.half_close)
            ans = None
            for i in range(shot.answers):
                ans = wire.answer()
                if ans.status is None or (i + 1 < shot.answers and ans.closes):
                    break
            shot.status = ans.label
            shot.reason = " ".join(ans.body[:300].decode("latin-1").split()) \
                if ans.status and ans.status >= 400 else ""
            shot.retry_after = ans.headers.get("retry-after")
        finally:
            wire.close()

    def reset(self, me, collection):
        """A fresh valid upload (and a login again if the key stopped working), so that
        the fuzzing goes on against a sane collection."""
        try:
            status = me.upload(self.server.port, collection)
            if status == 403:
                me.login(self.server.port)
                with self.lock:
                    self.relogins += 1
                me.upload(self.server.port, collection)
            with self.lock:
                self.resets += 1
                self.last_upload.pop(me.user, None)
        except Exception:
            self.script_error("a reset upload")

    def watchdog(self, end):
        """GET /health every HEALTH_EVERY s; the log read even when no request ends."""
        while not self.stop.is_set() and time.monotonic() < end + 1:
            t0 = time.monotonic()
            if not self.server.alive():
                with self.lock:
                    self.finding("exit", self.server.proc.returncode,
                                 list(self.inflight.values()) or list(self.recent)[-3:],
                                 "the server exited with %s" % self.server.proc.returncode,
                                 ["EXIT"] + self.server.log_tail(40).splitlines())
                self.stop.set()
                return
            ans = health(self.server.port)
            with self.lock:
                if ans.status == 200:
                    self.health_ok += 1
                else:
                    self.health_fail += 1
                    suspects = list(self.inflight.values()) or list(self.recent)[-3:]
                    self.finding("health", ans.label, suspects,
                                 "/health answered %s after %.1f s" % (ans.label,
                                                                      time.monotonic() - t0),
                                 None)
                try:
                    self.blame(self.log.poll(flush=True), None)
                except Exception:
                    pass
            self.stop.wait(max(0.0, HEALTH_EVERY - (time.monotonic() - t0)))

    def progress(self, end):
        while not self.stop.wait(10) and time.monotonic() < end:
            with self.lock:
                secs = time.monotonic() - self.started
                print("[%4.0f s] %d sent (%.1f/s), %d findings (%d distinct)" % (
                    secs, self.sent, self.sent / max(secs, 0.001), self.findings,
                    len(self.distinct)), file=sys.stderr, flush=True)

    # -- the end ----------------------------------------------------------------------

    def summary(self, seconds):
        out = []
        p = out.append
        p("")
        p("== fuzz_live summary ==")
        p("seconds run       %.1f" % seconds)
        p("requests sent     %d (%.1f/s), %d workers; %d sent after a valid start; "
          "%d valid re-uploads, %d logins again" % (
              self.sent, self.sent / max(seconds, 0.001), self.args.workers,
              sum(self.pre_statuses.values()), self.resets, self.relogins))
        p("statuses          " + table(self.statuses))
        if self.pre_statuses:
            p("  valid starts    " + table(self.pre_statuses))
        p("families          " + "  ".join("%s %d" % (f, self.families[f])
                                           for f, _ in FAMILIES if self.families[f]))
        p("mutation kinds    (sent; 5xx or no answer)")
        by_family = collections.defaultdict(list)
        for kind, n in sorted(self.kinds.items()):
            by_family[kind.split("/")[0]].append("%s %d%s" % (
                kind.split("/", 1)[1], n, "; %d" % self.kind_bad[kind] if self.kind_bad[kind]
                else ""))
        for family, items in sorted(by_family.items()):
            text, line = "", "  %-9s " % family
            for item in items:
                if len(line) + len(item) > 100:
                    text += line.rstrip() + "\n"
                    line = " " * 12
                line += item + ", "
            p(text + line.rstrip(", "))
        p("/health checks    %d passed, %d failed" % (self.health_ok, self.health_fail))
        p("server            %s" % ("running at the end" if self.server.alive()
                                    else "EXITED with %s" % self.server.proc.returncode))
        if self.script_errors:
            p("script errors     %d (the script's own bugs, not the server's):"
              % sum(self.script_errors.values()))
            for key, n in self.script_errors.most_common(5):
                p("  %dx %s" % (n, key))
        p("findings          %d in all, %d distinct%s" % (
            self.findings, len(self.distinct),
            "; saved in %s" % self.findings_dir if self.saved else ""))
        for i, entry in enumerate(self.distinct.values()):
            p("  %2d. %-6s %-4s x%-4d %s" % (i + 1, entry.kind, entry.status if entry.status
                                              is not None else "-", entry.count,
                                              entry.summary[:110]))
            shot = entry.shot
            p("      on %s%s" % (", ".join(entry.routes[:4]),
                                 ", ..." if len(entry.routes) > 4 else ""))
            if shot:
                p("      first: %s: %s  [%s]" % (shot.kind, shot.desc[:80],
                                                 os.path.basename(entry.first)))
            if entry.upload is not None:
                p("      after the upload %s: %s" % (entry.upload.kind, entry.upload.desc[:80]))
        p("seed              %d (again: bench/fuzz_live.py --seconds %g --seed %d --workers %d)"
          % (self.args.seed, self.args.seconds, self.args.seed, self.args.workers))
        print("\n".join(out), flush=True)


def table(counter):
    def order(item):
        return (0, item[0], "") if isinstance(item[0], int) else (1, 0, str(item[0]))
    return "  ".join("%s x%d" % (k, n) for k, n in sorted(counter.items(), key=order))


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60, help="how long to fuzz (60)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter for the server (this one)")
    parser.add_argument("--findings", default=None,
                        help="folder for the findings' requests (default: a new temp folder)")
    parser.add_argument("--workers", type=int, default=2, help="connections in parallel (2)")
    parser.add_argument("--replay", nargs="+", metavar="FILE",
                        help="send saved finding-NNNN.bin files to a fresh server instead")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1, 10 ** 6)
    args.workers = max(1, min(args.workers, 16))
    return args


def setup(args, root):
    """The server started, each worker's user logged in with a fresh upload."""
    users = users_for(args.workers)
    server = Server(args.python, root, users)
    atexit.register(server.stop)
    server.start()
    collection_path = os.path.join(root, "new.anki2")
    ankisync.create_collection(collection_path)
    with open(collection_path, "rb") as f:
        collection = f.read()
    identities = []
    for i, (user, password) in enumerate(users):
        me = Me(user, password, random.Random("%d-me-%d" % (args.seed, i)))
        me.login(server.port)
        status = me.upload(server.port, collection)
        if status != 200:
            raise SystemExit("the first upload of %s answered %s:\n%s"
                             % (user, status, server.log_tail()))
        identities.append(me)
    return server, collection, identities


def saved_identity(path):
    """(host key, user) a saved request was sent with, from its finding's .txt."""
    name = os.path.basename(path)
    text_path = re.sub(r"(-upload|-suspect\d+)?\.bin$", ".txt", path)
    key, user, mine = None, "user", False
    if os.path.exists(text_path):
        with open(text_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                line = line.strip()
                if line.startswith("request: "):
                    mine = line.split()[1] == name
                elif mine and line.startswith("host key:"):
                    key = line.split(":", 1)[1].strip()
                elif mine and line.startswith("user:"):
                    user = line.split(":", 1)[1].strip()
    return (key if key != "None" else None), user


def replay(args):
    """Each saved request sent again to a fresh server, its host key replaced by the
    new one; the answers and any new bad log records printed."""
    root = tempfile.mkdtemp(prefix="fuzz-live-replay-")
    try:
        args.workers = 16
        server, _, identities = setup(args, root)
        by_user = {me.user: me for me in identities}
        log = LogWatch(server.log_path)
        log.poll(flush=True)
        bad = 0
        for path in args.replay:
            with open(path, "rb") as f:
                data = f.read()
            pre_path = path[:-4] + ".pre.bin"
            pre = open(pre_path, "rb").read() if os.path.exists(pre_path) else None
            old_key, user = saved_identity(path)
            me = by_user.get(user, identities[0])
            if old_key and old_key != "None":
                data = data.replace(old_key.encode(), me.key.encode())
                pre = pre.replace(old_key.encode(), me.key.encode()) if pre else None
            wire = Wire(server.port)
            try:
                if pre:
                    wire.send(pre)
                    print("%s: before it %s" % (os.path.basename(pre_path), wire.answer().label))
                wire.send(data, half_close=True)
                answers = []
                for _ in range(4):
                    ans = wire.answer()
                    answers.append(ans)
                    if ans.status is None:
                        break
            finally:
                wire.close()
            if len(answers) > 1 and answers[-1].status is None:
                answers.pop()           # the connection closing after the last answer
            print("%s: %s" % (os.path.basename(path), ", ".join(
                "%s %s" % (a.label, " ".join(a.body[:100].decode("latin-1").split())
                           if a.status and a.status >= 400 else "") for a in answers)))
            time.sleep(0.3)
            for record in log.poll(flush=True):
                bad += 1
                print("  server log: " + "\n    ".join(record[1:2] + record[2:][-8:]))
            if any(a.status and 500 <= a.status <= 599 for a in answers):
                bad += 1
        server.stop()
        return 1 if bad else 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.replay:
        return replay(args)
    root = tempfile.mkdtemp(prefix="fuzz-live-")
    findings_dir = args.findings or tempfile.mkdtemp(prefix="fuzz-live-findings-")
    made_findings_dir = args.findings is None
    print("fuzz_live: seed %d, %g s, %d workers, server %s on %s" % (
        args.seed, args.seconds, args.workers, ANKISYNC_PY, args.python), flush=True)
    server = None
    try:
        templates = load_templates()
        server, collection, identities = setup(args, root)
        print("server on %s:%d (log %s); %d recorded exchanges from %s" % (
            HOST, server.port, server.log_path, len(templates), TRACES), flush=True)
        run = Run(args, server, findings_dir, root)
        run.log.poll(flush=True)        # start-up lines are no finding
        end = time.monotonic() + args.seconds
        threads = []
        for i, me in enumerate(identities):
            workdir = os.path.join(root, "worker%d" % i)
            os.makedirs(workdir)
            fuzzer = Fuzzer(random.Random(args.seed * 1000 + i), templates, me, server.port,
                            collection, workdir)
            threads.append(threading.Thread(target=run.worker, daemon=True,
                                            args=(i, fuzzer, me, collection, end)))
        threads.append(threading.Thread(target=run.watchdog, args=(end,), daemon=True))
        threads.append(threading.Thread(target=run.progress, args=(end,), daemon=True))
        for t in threads:
            t.start()
        try:
            for t in threads[:len(identities)]:
                while t.is_alive():
                    t.join(0.5)
        except KeyboardInterrupt:
            print("interrupted: finishing the requests under way", file=sys.stderr)
        run.stop.set()
        for t in threads:
            t.join(ANSWER_TIMEOUT * 3)
        seconds = time.monotonic() - run.started
        time.sleep(0.3)
        with run.lock:
            run.blame(run.log.poll(flush=True), None, final=True)
        if not server.alive():
            pass        # the watchdog has counted it
        elif health(server.port).status != 200:
            with run.lock:
                run.health_fail += 1
                run.finding("health", None, list(run.recent)[-3:], "/health failed at the end",
                            None)
        if run.saved:
            shutil.copy(server.log_path, os.path.join(findings_dir, "server.log"))
        run.summary(seconds)
        return 1 if run.findings else 0
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
        if made_findings_dir and os.path.isdir(findings_dir) and not os.listdir(findings_dir):
            os.rmdir(findings_dir)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
