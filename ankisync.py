#!/usr/bin/env python3
"""ankisync: a self-hosted Anki sync server in one file.

Copy this file anywhere Python 3.9 or newer runs, add a user and start it:

    python3 ankisync.py adduser alice
    python3 ankisync.py serve

Then point your Anki clients at it (the page at http://HOST:27701/ shows the exact
address for each client generation):

    Anki 2.1.57+, AnkiDroid 2.16+, AnkiMobile    http://HOST:27701/
    Anki 2.1.28 - 2.1.56                         SYNC_ENDPOINT=http://HOST:27701/sync/
                                                 SYNC_ENDPOINT_MEDIA=http://HOST:27701/msync/
    Anki 2.1.22 - 2.1.26 (an add-on)             import anki.sync, aqt.mediasync
                                                 anki.sync.SYNC_BASE = aqt.mediasync.SYNC_BASE
                                                     = "http://HOST:27701/%s"
    Anki 2.1.0 - 2.1.21 (an add-on)              import anki.sync
                                                 anki.sync.SYNC_BASE = "http://HOST:27701/%s"
    Anki 2.0 (an add-on)                         import anki.sync
                                                 anki.sync.SYNC_BASE = "http://HOST:27701/"
                                                 anki.sync.SYNC_MEDIA_BASE
                                                     = "http://HOST:27701/msync/"
    AnkiDroid up to 2.15                         Sync url http://HOST:27701/
                                                 Media sync url http://HOST:27701/msync/

Both protocol generations are spoken: the modern one (sync version 11: an
``anki-sync`` header and zstd bodies) and the legacy one (versions 8 to 10:
multipart forms and gzip). Each user's collection is a schema-11 SQLite file in
``<data>/<user>/collection.anki2``, next to ``media/`` and ``media.db``, the same
layout as Anki's own sync server, so a data folder can move between the two.

Nothing but the Python standard library is needed. zstd comes from
``compression.zstd`` (Python 3.14+), from the system's libzstd, or from the pure
Python decoder below, in that order.

The file reads top to bottom from the protocol's words to its machinery: limits,
errors, protocol words (versions, wire names, request and reply), configuration,
users, envelopes, the collection store, collection sync (one method per wire name,
``meta`` first), media sync, restore points, HTTP, the command line; then six
appendices: A. zstd, B. the schema 18 to 11 conversion, C. a new collection, D. media
zips, E. a private certificate authority, F. an ACME client; ``main()`` last. A request enters at
``Handler.serve`` (HTTP), is unwrapped by ``Envelopes``, authenticated by ``Accounts``
and answered by ``CollectionSync`` or ``MediaSync``; a browser's ``/account`` and a
dashboard's ``/api/stats`` are answered by ``Pages``.
``docs/protocol.md`` describes the protocol as ankisync speaks it; comments cite it by
section.

License: GNU Affero General Public License v3.0 or later.
"""

import argparse
import base64
import collections
import configparser
import contextlib
import ctypes
import ctypes.util
import datetime
import difflib
import errno
import functools
import getpass
import gzip
import hashlib
import hmac
import html
import io
import ipaddress
import itertools
import json
import logging
import math
import operator
import os
import queue
import random
import re
import secrets
import select
import selectors
import shutil
import socket
import sqlite3
import ssl
import stat
import struct
import sys
import tempfile
import textwrap
import threading
import time
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__version__ = "0.2.1"

log = logging.getLogger("ankisync")


# ---------------------------------------------------------------------------
# Limits
#   Every limit the server enforces, each with the reason for its value.
# ---------------------------------------------------------------------------

MIB = 1024 * 1024

DEFAULT_PORT = 27701                # the port Anki's community servers settled on
ZSTD_BACKENDS = ("stdlib", "libzstd", "python")    # best first: see appendix A
DEFAULT_MAX_PAYLOAD_MB = 100        # the official server's MAX_SYNC_PAYLOAD_MEGS default
DECOMPRESSED_FACTOR = 3             # official: decompressed bodies may be 3x the wire cap
SESSION_TIMEOUT = 300               # seconds before a vanished client's sync is rolled back
USER_IDLE = 600                     # seconds after a user's last request their files close
LOCK_WAIT = 60                      # seconds a request waits for the same user's other device
COMPUTING_MAX = 2                   # requests computing at once; more wait a turn (UserLock)
GLIBC_M_ARENA_MAX = -8              # mallopt() parameter number in glibc's malloc.h
GLIBC_ARENAS = 2                    # 8 users syncing at once: 85 MB RSS by default, 52 with 2
SPOOL_MEMORY_MAX = 1 * MIB          # bodies above this go to a temporary file, not RAM
SCHEMA18_KEEP_FREE = 10             # the schema-18 copy of an upload is kept while 10x it is free
IO_BLOCK = 256 * 1024               # read/write granularity for streamed bodies
JSON_PAYLOAD_MAX = 200 * MIB        # a JSON body is parsed in memory; nothing legitimate comes near
MULTIPART_MAX_PARTS = 16            # legacy forms carry at most six parts (c, k, sk, s, v, data)
MULTIPART_HEADER_MAX = 8 * 1024     # part headers are one or two short lines
MULTIPART_FIELD_MAX = 64 * 1024     # every part but `data` is a short string
CHUNK_SIZE = 250                    # rows per `chunk` reply, as the official server sends
DEFAULT_ROLLOVER = 4                # the hour a day starts, as Anki and the official server set it
ROLLOVER_MAX = 23                   # Anki reads a later hour as 23: a day starts within the day
UTC_OFFSET_LIMIT = 24 * 60          # minutes: chrono's FixedOffset is under a day, Anki then UTC
LEARN_AHEAD_DEFAULT = 1200          # seconds: Anki's "learn ahead limit" (collapseTime) default
GRAVES_MAX = 1_000_000              # deletions in one request; far above any real collection
KEY_CACHE_MAX = 5000                # host keys known in memory; past it the cache starts afresh
HOSTKEY_BODY_MAX = 64 * 1024        # a login is a name and a password; a larger body is no login
UNAUTHENTICATED_HOLD = 64 * 1024    # form bytes kept in memory, not on disk, till its key is seen
TRUSTED_ADDRESS_SECONDS = 3600      # an address that showed a valid key may send big forms so long
KEY_CACHE_SECONDS = 5               # how soon `passwd` and `deluser` reach a running server
PBKDF2_ROUNDS = 600_000             # OWASP 2023 advice for PBKDF2-HMAC-SHA256
PBKDF2_LENGTH = 32                  # bytes of derived key, as the official server's PHC strings
AUTH_SCHEMA = 2                     # auth.db's user_version: 1 digests keys, 2 folds names

# Password guessing: failures are counted per address and per user name.
LOGIN_FAILURES_ALLOWED = 5          # wrong passwords from one address before it has to wait
LOGIN_FAILURE_WINDOW = 900          # seconds a failure is remembered (15 minutes)
LOCKOUT_FIRST = 60                  # seconds of the first wait; each further failure doubles it
LOCKOUT_MAX = 900                   # ...up to this
USER_CHECK_INTERVAL = 1.0           # a user under attack gets one password check a second, no more
PASSWORD_CHECKS_AT_ONCE = 1         # PBKDF2 keeps a core busy ~0.3 s: guessers must not take all
PASSWORD_CHECK_WAIT = 10            # seconds a login waits for its turn before a 503
GUARD_TABLE_MAX = 10_000            # addresses and names remembered; the oldest are forgotten first
NOTICE_REPEAT = 60                  # seconds before a warning about one address is logged again
KNOWN_LOGIN_SECONDS = 30 * 86400    # a login's address counts as the user's own for a month

# Pages: /account, where a user sees their collection in a browser, and /api/stats.
PAGE_FORM_MAX = 16 * 1024           # a form is a name, two passwords and a token: bytes, not KiB
PAGE_FORM_FIELDS = 8                # fields in one form: ours send at most five
QUERY_MAX = 256                     # a page's query names a restore point: longer is not ours
PAGE_SESSION_SECONDS = 8 * 3600     # a browser stays logged in a working day, then asks again
PAGE_SESSION_TEST = "ANKISYNC_TEST_SESSION_SECONDS"  # for the tests only: a shorter lifetime
SESSION_COOKIE = "ankisync_session"  # the signed login: name, expiry, MAC
FORM_COOKIE = "ankisync_form"        # random, per browser: what CSRF tokens are bound to
FORM_COOKIE_SECONDS = 365 * 86400   # it holds no secret of the user's: kept, so forms never
                                    # fail for a cookie that just expired
CSRF_HEX = 32                       # hex digits of a form's token: 128 bits
ADMIN_COOKIE = "ankisync_admin"     # the admin page's signed login, apart from a user's
ADMIN_FORM_COOKIE = "ankisync_admin_form"   # ...and its forms' cookie, both on its own path
ADMIN_NAME = "admin"                # who an admin session is for (its MAC covers the hash)
SAID_COOKIE = "ankisync_said"       # what a form did, signed, shown once by the page it leads to
ADMIN_SAID_COOKIE = "ankisync_admin_said"   # ...and the admin page's, on its own path
SAID_MAX = 700                      # characters of that message: as UTF-8 in base64 it stays
                                    # within the 4 KB a browser keeps of a cookie
SAID_SECONDS = 120                  # a redirect follows at once: a later visit shows nothing
ADMIN_GUARD_NAME = "/admin"         # the admin's name in the LoginGuard: no user name holds
                                    # a slash, so guessing the token paces no user, nor back
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"
ADMIN_LOG_LINES = 200               # the log's last lines the admin page shows, kept in memory
NOTICE_FILE = "notice.txt"          # in the data folder: the notice set on the admin page
NOTICE_MAX = 2000                   # characters of a notice: a paragraph, not a page
PHC_PARTS = 5                       # "", scheme, parameters, salt, digest of a $-joined PHC
API_TOKEN_BYTES = 32                # an API token's randomness: no guessing, so no throttle
API_TOKENS_MAX = 20                 # per user: dashboards are few; auth.db must not fill up

# Connections: one listener thread holds every connection between requests and reads
# each request's head (and a legacy form's first bytes) itself, so that a worker thread
# is spent only on a request that has arrived; the limits follow nginx and Apache.
HEADER_TIMEOUT = 20                 # seconds for a request line and headers (Apache: 20-40)
IDLE_TIMEOUT = 30                   # seconds a kept-alive connection may wait for its next request
BODY_GRACE = 20                     # seconds a body may take before BODY_MIN_RATE applies (Apache)
BODY_MIN_RATE = 500                 # bytes a second a body must average after that (Apache MinRate)
SEND_TIMEOUT = 60                   # seconds a client may leave its answer unread, then it is cut
SEND_GRACE = 20                     # seconds an answer may take before SEND_MIN_RATE applies
SEND_MIN_RATE = 4096                # bytes a second an answer must be taken at after that: a
                                    # phone on the slowest mobile data does ten times more
USER_DOWNLOADS_MAX = 4              # one user's downloads answered at once: a device fetches
                                    # one at a time, and a family syncs a few devices at once
HEAD_MAX = 16 * 1024                # request line and headers: Anki sends under 1 KiB (nginx 32)
MAX_HEADERS = 100                   # as http.client allows; a client sends six
BODY_PREREAD = UNAUTHENTICATED_HOLD  # a form's bytes the listener gathers before a worker reads on
MAX_CONNECTIONS = 1024              # open connections; a new one past it closes the longest idle
MAX_CONNECTIONS_PER_ADDRESS = 256   # one address's share: a class behind one NAT fits in it
MAX_WORKERS = 64                    # requests served at once; more wait their turn, in order
WORKER_IDLE = 10                    # seconds an idle worker waits, then ends and frees its caches
LINGER_SECONDS = 2                  # after a refusal, unread bytes are read this long, so the
LINGER_BYTES = 4 * MIB              # ...answer is not lost to a TCP reset, up to this much
FD_RESERVE = 64                     # file descriptors kept for collections, media and logs
SWEEP_INTERVAL = 0.5                # seconds between the listener's checks of deadlines
EVICT_AFTER = 1.0                   # seconds a connection waits before a newcomer may replace it
HOT_WAIT = 0.005                    # seconds a worker waits for a sync's next request itself
USERNAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$")  # a folder name as it is
USERNAME_MAX = 64                   # characters; the name, escaped, becomes a folder name
USERNAME_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f/\\]")     # no file system takes these
# Unicode's controls, formats (zero-width, right-to-left overrides), line and paragraph
# separators, private and surrogate code points: a name a person could not tell apart.
USERNAME_INVISIBLE = ("Cc", "Cf", "Zl", "Zp", "Co", "Cs")
FOLDER_UNSAFE = re.compile(r'[<>:"|?*%]')  # refused by Windows; % because it escapes them
# The server's own files beside the users' folders: a user of that name gets it escaped.
DATA_FOLDER_FILES = ("auth.db", "auth.db-wal", "auth.db-shm", "auth.db-journal", "notice.txt")

MEDIA_CHANGES_PAGE = 1000           # rows per mediaChanges reply (official)
MEDIA_UPLOAD_MAX_FILES = 25         # entries in one uploadChanges zip (official)
MEDIA_FILE_MAX = 100 * MIB          # largest single media file (official)
MEDIA_META_MAX = 50 * 1024          # the upload `_meta` entry is read up to this size (official)
MEDIA_DOWNLOAD_FILES_MAX = 25       # names in one downloadFiles request (official)
MEDIA_DOWNLOAD_BYTES = 2_621_440    # a downloadFiles zip stops after passing 2.5 MiB (official)
MEDIA_NAME_MAX_BYTES = 255          # longest file name in UTF-8 (official)

UPLOAD_CORRUPT = "Your upload was corrupt. Please use Check Database, or restore from backup."
UPLOAD_TOO_LARGE = "collection exceeds size limit"
QUOTA_REFUSAL = ("Your %s would take %.1f MiB on this sync server, over the %d MiB it allows "
                 "each user: make room (Tools > Check Media, unused notes), or ask its admin.")

# What an old client shows instead of syncing a collection it would damage: Anki 2.0 and
# 2.1 in a text window, AnkiDroid in its "Sync error" dialog (the official server says only
# that the client does not support it).
OLD_SCHEDULER_CLIENT = (
    "This collection uses the v2 scheduler, which Anki 2.0 and AnkiDroid 2.8 and older do not "
    "know: they would schedule its cards wrongly. Update this device (Anki 2.1, AnkiDroid 2.9 "
    "or later) to keep syncing it.")
OLD_TIMEZONE_CLIENT = (
    "This collection uses the new timezone handling: Anki 2.1.21 and older and AnkiDroid 2.14 "
    "and older cannot sync it without moving cards' due days. Update this device (Anki 2.1.22, "
    "AnkiDroid 2.15 or later), or on a computer with Anki 2.1.41 to 2.1.66 tick \"Legacy "
    "timezone handling\" in Preferences (on 2.1.22 to 2.1.40, untick \"New timezone "
    "handling\"), sync there, then here.")

SQLITE_MAGIC = b"SQLite format 3\x00"
PEM_CERTIFICATE = re.compile(rb"-----BEGIN (?:TRUSTED )?CERTIFICATE-----")
PEM_KEY = re.compile(rb"-----BEGIN (?:RSA |EC |DSA |ENCRYPTED )?PRIVATE KEY-----")
PEM_ENCRYPTED = re.compile(rb"-----BEGIN ENCRYPTED PRIVATE KEY-----|Proc-Type: 4,ENCRYPTED")
WEB_ADDRESS = re.compile(r"https?://(?:(?!&quot;|&#x27;)[^\s<>])+")  # linked in a notice
QUOTED_MAX = 60                     # characters of a client's text quoted in an error or the log
HOST_KEY_HEX = 40                   # the host key's length: clients kept it as a sha1 hex digest
ADDRESS_MAX = 64                    # an address from a proxy header, as logged and counted
CHUNK_LINE_MAX = 1024               # a chunk-size line with extensions; real ones are ~10 bytes
CHUNK_DIGITS_MAX = 15               # hex digits of a chunk size: 2^60 bytes, far past any limit
LENGTH_DIGITS_MAX = 18              # digits of a Content-Length: under 2^63, so int() is safe
TRAILER_LINE_MAX = 8 * 1024         # a trailer line after the last chunk, as for a header
METRICS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)  # seconds
STATUS_DEVICE_DAYS = 30             # `status` counts the devices seen in this many days
LAN_ADDRESSES_FRESH = 60            # seconds the LAN addresses shown are trusted (DHCP moves)
FORWARDED_HOST_MAX = 261            # a proxy's X-Forwarded-Host: a DNS name (253) and a port
CONTAINER_MARKERS = ("/.dockerenv", "/run/.containerenv")   # Docker's and podman's, in each one
CONTAINER_DATA = "/data"             # the image's volume (Dockerfile): where data belongs there
HEALTH_TIMEOUT = 4                  # seconds `health` waits: under Docker's 5 s check timeout
PEM_READ_MAX = 1 * MIB              # of a certfile or keyfile read to check it: a chain
                                    # is a few KiB, and /dev/zero must not fill RAM
WRONG_SCHEME_STATUS = 426           # plain HTTP on the TLS port: see Server.wrong_scheme
ONE_SHOT_REPLY_MAX = 4 * MIB        # smaller streamed answers are compressed in one call
RAW_REPLY_MAX = 1024                # smaller answers go uncompressed in a zstd frame: making a
                                    # compressor cost more than the bytes it would save
SQL_IDS_PER_QUERY = 500             # ids bound in one `in (...)`: far below SQLite's 32766
JSON_DEPTH_MAX = 64                 # a client's JSON nests under 10 (add-on settings in conf more)
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1    # SQLite's integers: ids, usns, times
NUMERIC_TEXT = re.compile(r"-?[0-9]{1,20}(?:\.[0-9]{0,20})?")  # a number as old clients wrote it
SURROGATE = re.compile("[\ud800-\udfff]")      # left alone by json.loads: no pair around it
ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]", re.ASCII)

# Temporary files, named so that a server started again removes what a killed one left.
TEMP_SPOOL = ".spool-"              # a request body too big for memory
TEMP_UPLOAD = ".upload-"            # an uploaded collection, checked before it replaces one
TEMP_COPY = ".copy-"                # a download's snapshot while a sync writes
TEMP_INCOMING = ".incoming-"        # a media file on its way in
TEMP_NEW_COLLECTION = ".new-collection-"
TEMP_CONVERT = ".convert"           # suffix: a stored schema-18 file being converted
TEMP_BACKUP = ".backup-"            # a restore point being written, or unpacked
TEMP_TLS = ".tls-"                  # a key or certificate of the private CA or ACME being written
TEMP_PREFIXES = (TEMP_SPOOL, TEMP_UPLOAD, TEMP_COPY, TEMP_INCOMING, TEMP_NEW_COLLECTION,
                 TEMP_BACKUP)

# A user's folder: what the server and the CLI share, and the locks they both take.
BACKUP_FOLDER = "backups"           # restore points
MEDIA_TRASH_FOLDER = "media.trash"  # media files deleted or replaced, for a restore
COLLECTION_LOCK = ".collection.lock"
MEDIA_LOCK = ".media.lock"
FULL_SYNC_NOTICE = "full-sync-notice.json"  # after a restore or import: who still must hear it
FULL_SYNC_NOTICE_DEVICES = 200      # devices a notice remembers as done: more than a family
                                    # has; a client naming itself anew each time cannot grow it
COMMAND_LOCK_WAIT = 900             # seconds a command waits for a sync to end (big ones: minutes)
LOCK_POLL = 0.02                    # seconds between tries of a lock another process holds
BACKUP_GZIP_LEVEL = 1               # a collection packs to about a third; level 6 gains ~5%
BACKUP_FREE_FACTOR = 3              # a point is made only while 3x the collection is free
PACKAGE_LEGACY, PACKAGE_LEGACY_2, PACKAGE_LATEST = 1, 2, 3      # a .colpkg's `meta` version
ANKISYNCD_SCHEME = "ankisyncd-sha256"   # an imported ankisyncd hash, until the next login
TRASH_BATCH = "usn%d-%d-%s"         # media.trash/usn<media usn>-<ms>-<rand>: usns never step back
NAMED_AT_MOST = 5                   # files one line of an import's error names; the rest counted

# The private CA of `tls = self-signed` (appendix E).
TLS_FOLDER = ".tls"                 # <data>/.tls/: ca.pem, ca.key, server.pem, server.key; the
                                    # dot keeps it from a user's folder (a user named "tls")
CA_DAYS = 3650                      # the CA: ten years, as each device trusts it by hand once
SERVER_CERT_DAYS = 397              # Apple's limit: 398 days for public CAs (825 for private
                                    # ones), and Chrome's; 397 stays under both with a day spare
CERT_RENEW_DAYS = 30                # a start this close to the end makes a new server certificate
CERT_BACKDATE = datetime.timedelta(hours=1)    # a device whose clock is slow trusts it at once
CERT_NAME_MAX = 64                  # characters of a common name (RFC 5280's ub-common-name):
                                    # stricter clients refuse a longer one
CERT_SERIAL_BITS = 64               # random serials: CA/Browser Forum asks 64 bits, RFC 5280 < 160
PRIVATE_CA_CHECK = 86400            # seconds between a running server's checks that its private
                                    # certificate still serves: a year's, renewed 30 days early
CERT_CHECK_INTERVAL = 5             # seconds between looks at certfile's and keyfile's times: a
                                    # certbot or Caddy renewal is served within seconds, for 2 stats

# Let's Encrypt: ACME, RFC 8555 (appendix F).
ACME_LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
ACME_RENEW_AT = 2 / 3               # of a certificate's life: Let's Encrypt asks renewal with a
                                    # third left (30 of 90 days), so its outages pass unnoticed
ACME_RETRY_FIRST = 60               # seconds after a failed attempt before the next; doubled each
ACME_RETRY_MAX = 6 * 3600           # ...up to this: Let's Encrypt allows 5 failed validations per
                                    # name an hour, and a fix (DNS, a port) takes a while anyway
ACME_TIMEOUT = 30                   # seconds one request to the CA may take
ACME_POLL = 1                       # seconds between looks at an authorization or order
ACME_POLL_MAX = 120                 # seconds a validation or an order may take before it counts
                                    # as failed (Let's Encrypt's take seconds)
ACME_BAD_NONCE_TRIES = 5            # a badNonce is retried with the nonce it came with (8555 6.5)
ACME_REPLY_MAX = 1 * MIB            # a directory, order or certificate chain is a few KiB
ALPN_ACME = "acme-tls/1"            # RFC 8737 4: the protocol a TLS-ALPN-01 validation offers
TLS_HELLO_PEEK = 16 * 1024          # bytes of a ClientHello looked at for that protocol: one
                                    # TLS record at most (RFC 8446 5.1)
TLS_HELLO_WAIT = 1.0                # seconds the rest of a split ClientHello is awaited while a
                                    # TLS-ALPN-01 validation is open; then: the usual certificate


# ---------------------------------------------------------------------------
# Errors
#   One exception root. It carries the HTTP status and a one-line reason that
#   the client (or curl) sees instead of a traceback.
# ---------------------------------------------------------------------------

class SyncError(Exception):
    """A request that cannot be served; `status` is the HTTP answer."""

    def __init__(self, status, reason, retry_after=None, location=None, phrase=None):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.retry_after = retry_after      # seconds, sent as Retry-After (429, 503)
        self.location = location            # where a 308 sends the client
        # The status line's words instead of the standard ones: a modern client's media
        # sync shows them (never the body) for a status it has no sentence of its own for.
        self.phrase = phrase


def bad_request(reason):
    return SyncError(400, reason)


def out_of_space(error):
    """True for the ways a full disk, or a used-up quota, shows itself."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
    return isinstance(error, sqlite3.OperationalError) and "is full" in str(error)


class CorruptCollection(SyncError):
    """An uploaded or stored collection that cannot be read or converted."""

    def __init__(self, reason):
        super().__init__(400, reason)


# ---------------------------------------------------------------------------
# Protocol words
#   The versions clients speak, every method by its wire name, and the request
#   and the reply that carry them.
# ---------------------------------------------------------------------------

class SyncVersion:
    """The sync protocol's versions, named as rslib names them by what each added
    (docs/protocol.md 1.2)."""

    V08_SESSIONKEY = 8          # Anki 2.0, AnkiDroid 2.8: the oldest the official server takes
    V09_V2_SCHEDULER = 9        # Anki 2.1.0, AnkiDroid 2.9: knows the v2 scheduler
    V10_V2_TIMEZONE = 10        # Anki 2.1.22, AnkiDroid 2.15: days counted by creationOffset
    V11_DIRECT_POST = 11        # Anki 2.1.57, AnkiDroid 2.16, AnkiMobile: header and zstd
    MIN, MAX = V08_SESSIONKEY, V11_DIRECT_POST

    PLAUSIBLE = range(1, 100)   # a version some Anki could name; past it, no version at all

    @classmethod
    def check(cls, version):
        """`version` if ankisync speaks it. Else, for a version a client could have, the
        501 that old clients turn into "please upgrade Anki" (the official server's
        answer too); for any other value, a 400."""
        if not isinstance(version, int) or isinstance(version, bool):
            raise bad_request("the client's sync version `v` is missing")
        if version not in cls.PLAUSIBLE:
            raise bad_request("%d is no sync version" % version)
        if not cls.MIN <= version <= cls.MAX:
            raise SyncError(501, "sync version %d is not supported (%d to %d are)"
                            % (version, cls.MIN, cls.MAX))
        return version


# Every method by its wire name, and how it runs: "login" needs no key; "alone" runs by
# itself under the user's lock; "session" belongs to the sync that `start` opens; "upload"
# takes the lock only to swap the file in. CollectionSync and MediaSync have one method
# of each name.
SYNC_EVENTS = {"finish": "normal sync", "upload": "full upload", "download": "full download"}
COLLECTION_METHODS = {
    "hostKey": "login", "meta": "alone", "start": "session", "applyGraves": "session",
    "applyChanges": "session", "chunk": "session", "applyChunk": "session",
    "sanityCheck2": "session", "finish": "session", "abort": "alone", "upload": "upload",
    "download": "alone",
}
MEDIA_METHODS = ("begin", "mediaChanges", "uploadChanges", "downloadFiles", "mediaSanity")
DOWNLOADS = ("download", "downloadFiles")      # the answers that may take long to send


# --- what a client sends: JSON decoded in one place, each method's fields in one table ---

def client_json(text, what):
    """JSON from a client, decoded once, here: strict UTF-8, no NaN or Infinity, no lone
    surrogate (it could not be stored as UTF-8), nested at most JSON_DEPTH_MAX deep.
    Anything else is the client's mistake: a 400 that names `what`."""
    try:
        if isinstance(text, (bytes, bytearray, memoryview)):
            text = bytes(text).decode("utf-8")
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise bad_request("%s: JSON nested over %d levels" % (what, JSON_DEPTH_MAX))
    except ValueError as e:             # UnicodeDecodeError is one too
        raise bad_request("%s: invalid JSON (%s)" % (what, str(e)[:QUOTED_MAX]))
    # Lone surrogates come only from \u escapes: strings are searched only when one is there.
    # Each container's members are sorted by type in one pass at C speed (set(map(type)));
    # only nested containers, floats and (rarely) strings are then looked at one by one,
    # so a chunk of thousands of plain rows costs little more than json.loads itself.
    strings = ESCAPED_SURROGATE.search(text) is not None
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if type(item) is dict:
            if strings and any(SURROGATE.search(key) for key in item):
                raise bad_request("%s: a lone surrogate in a JSON key" % what)
            children = item.values()
        elif type(item) is list:
            children = item
        else:
            children = (item,)          # the whole document is one scalar
        kinds = set(map(type, children))
        if float in kinds and not all(math.isfinite(c) for c in children if type(c) is float):
            raise bad_request("%s: a JSON number out of range" % what)
        if strings and str in kinds and any(
                SURROGATE.search(c) for c in children if type(c) is str):
            raise bad_request("%s: a lone surrogate in a JSON string" % what)
        if dict in kinds or list in kinds:
            if depth >= JSON_DEPTH_MAX:
                raise bad_request("%s: JSON nested over %d levels" % (what, JSON_DEPTH_MAX))
            pending.extend((c, depth + 1) for c in children if type(c) in (dict, list))
    return value


def _reject_constant(name):
    # Python accepts NaN/Infinity tokens; JSON and the official parser do not.
    raise ValueError("invalid JSON number " + name)


def to_int(value, what="value"):
    """Numbers as clients send them: ints, floats (legacy) or numeric strings; always
    within SQLite's 64 bits, so no id or usn overflows on its way into a table."""
    if type(value) is int and INT64_MIN <= value <= INT64_MAX:
        return value
    number = None
    if isinstance(value, (bool, int)):
        number = int(value)
    elif isinstance(value, float) and math.isfinite(value):
        number = int(value)
    elif isinstance(value, str) and NUMERIC_TEXT.fullmatch(value):
        number = int(float(value)) if "." in value else int(value)
    if number is None or not INT64_MIN <= number <= INT64_MAX:
        raise bad_request("%s must be a number within 64 bits, not %s"
                          % (what, str(value)[:QUOTED_MAX]))
    return number


# The shape of every field a method reads, checked before the method runs, so a client's
# mistake is a 400 naming the field and never a TypeError deep inside (docs/protocol.md
# 3.8; 4 and 6 name the fields). A shape is INT (to_int), FLAG (any value, as true or false),
# TEXT (a string), ANY (left to the method), [shape] (a list of them), (shape, ...) (a
# list of exactly these) or {key: shape} (an object; keys absent or null are left out).
INT, FLAG, TEXT, ANY = "int", "flag", "text", "any"


def plain_values(values, shape):
    """True if every value is already what `shape` (INT or TEXT) makes of it: checked at
    C speed, since a chunk holds thousands. False sends them one by one through shaped()."""
    kinds = set(map(type, values))
    if shape is TEXT:
        return kinds <= {str}
    return not values or (kinds == {int} and INT64_MIN <= min(values)
                          and max(values) <= INT64_MAX)


class FlatRow(tuple):
    """A row shape of INT, TEXT and ANY only (a card, a note, a review). Rows that already
    hold plain ints and strings where they belong, as every client sends them, are passed
    whole: their values are gathered column by column at C speed, without a call per
    value. Anything else (floats, numeric strings, a wrong type) takes shaped()'s way."""

    def __init__(self, shape):
        super().__init__()
        self.columns = [(kind, [i for i, inner in enumerate(shape) if inner is kind])
                        for kind in (INT, TEXT)]

    def holds(self, rows):
        if set(map(type, rows)) - {list} or set(map(len, rows)) - {len(self)}:
            return False
        for kind, positions in self.columns:
            if not positions:
                continue
            pick = operator.itemgetter(*positions)
            values = list(map(pick, rows)) if len(positions) == 1 else \
                list(itertools.chain.from_iterable(map(pick, rows)))
            if not plain_values(values, kind):
                return False
        return True


GRAVES = {"cards": [INT], "notes": [INT], "decks": [INT]}
SYNC_OBJECT = {"id": INT, "mod": INT, "usn": INT}          # a notetype, deck or deck config
NOTETYPE = dict(SYNC_OBJECT, flds=[{}], tmpls=[{}], sortf=INT)
REVLOG_ROW = FlatRow((INT,) * 9)
CARD_ROW = FlatRow((INT,) * 17 + (ANY,))        # data: a string, or an object from 2.1.26
NOTE_ROW = FlatRow((INT, TEXT, INT, INT, ANY, TEXT, TEXT, ANY, ANY, ANY, ANY))
METHOD_SHAPES = {
    ("sync", "hostKey"): {"u": TEXT, "p": TEXT},
    ("sync", "meta"): {"v": INT},
    ("sync", "start"): {"minUsn": INT, "lnewer": FLAG, "graves": GRAVES},
    ("sync", "applyGraves"): {"chunk": GRAVES},
    ("sync", "applyChanges"): {"changes": {
        "models": [NOTETYPE], "decks": ([SYNC_OBJECT], [SYNC_OBJECT]), "tags": [TEXT],
        "conf": {}, "crt": INT}},
    ("sync", "applyChunk"): {"chunk": {
        "revlog": [REVLOG_ROW], "cards": [CARD_ROW], "notes": [NOTE_ROW], "done": FLAG}},
    ("sync", "sanityCheck2"): {"client": ANY},     # SANITY_COUNTS, or why the client failed
    ("msync", "mediaChanges"): {"lastUsn": INT},
    ("msync", "mediaSanity"): {"local": INT},
    ("msync", "downloadFiles"): {"files": [TEXT]},
}
MEDIA_ZIP_META = [(TEXT, ANY)]                  # uploadChanges' _meta: [name, zip entry or null]
SANITY_COUNTS = FlatRow((ANY,) + (INT,) * 7)            # [due counts], cards, notes, revlog, ...
SYNC_HEADER = {"v": ANY, "k": TEXT, "c": TEXT, "s": TEXT}     # the anki-sync header's fields


def shaped(value, shape, what):
    """`value` checked against `shape`, its numbers made ints; a 400 naming `what` if not."""
    if shape is INT:
        return to_int(value, what)
    if shape is ANY:
        return value
    if shape is FLAG:
        return bool(value)
    if shape is TEXT:
        if not isinstance(value, str):
            raise bad_request("%s must be a string" % what)
        return value
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            raise bad_request("%s must be an object" % what)
        for key, inner in shape.items():
            if value.get(key) is not None:
                value[key] = shaped(value[key], inner, "%s.%s" % (what, key))
        return value
    if not isinstance(value, list):
        raise bad_request("%s must be a list" % what)
    if isinstance(shape, tuple):
        if len(value) != len(shape):
            raise bad_request("%s must be a list of %d values" % (what, len(shape)))
        if isinstance(shape, FlatRow) and shape.holds([value]):
            return value
        return [shaped(v, inner, what) for v, inner in zip(value, shape)]
    if shape[0] in (INT, TEXT) and plain_values(value, shape[0]):
        return value
    if isinstance(shape[0], FlatRow) and shape[0].holds(value):
        return value
    return [shaped(v, shape[0], what) for v in value]



class SyncRequest:
    """One decoded request: who, which method, and the payload behind the envelope."""

    def __init__(self, area, method, address="-"):
        self.area = area                # "sync" or "msync"
        self.method = method
        self.address = address          # the client's, for throttling and the log
        self.version = None             # the anki-sync header's; a form names none
        self.hkey = ""
        self.skey = ""
        self.client_version = ""
        self.user = None
        self.payload = None             # a Spool with the decompressed payload
        self._json = None

    @property
    def modern(self):
        """Came in the v11 envelope (the anki-sync header), so is answered in it (zstd)."""
        return self.version is not None

    def json(self):
        """The payload as a JSON object, every field the method reads in its shape."""
        if self._json is None:
            value = {}
            if self.payload is not None and self.payload.size:
                if self.payload.size > JSON_PAYLOAD_MAX:
                    raise SyncError(413, "JSON payload over %d MiB" % (JSON_PAYLOAD_MAX // MIB))
                value = client_json(self.payload.getvalue(), "the %s request" % self.method)
            self._json = shaped({} if value is None else value,
                                METHOD_SHAPES.get((self.area, self.method), {}), self.method)
        return self._json

    def close(self):
        if self.payload is not None:
            self.payload.close()


def over_limit(req, limit):
    if (req.area, req.method) == ("sync", "hostKey"):
        return SyncError(413, "hostKey body over %d KiB: this is no login" % (limit // 1024))
    return SyncError(413, "decompressed body over the %d MiB limit (max_payload_mb x %d)"
                     % (limit // MIB, DECOMPRESSED_FACTOR))


class Reply:
    """A method's answer: bytes in memory, or a file streamed from disk."""

    def __init__(self, body=b"", stream=None, size=None):
        self.body = body
        self.stream = stream            # a readable file object, for large answers
        self.size = len(body) if stream is None else size

    @classmethod
    def json(cls, obj):
        return cls(dumps_compact(obj).encode("utf-8"))

    @classmethod
    def text(cls, text):
        return cls(text.encode("utf-8"))

    def close(self):
        if self.stream is not None:
            self.stream.close()


# ---------------------------------------------------------------------------
# Configuration
#   One table of options: the ini file, its comments and the README's table are
#   made from it. ankisync.ini is read first, then the official server's
#   environment variables on top, so ankisync drops in where
#   `python -m anki.syncserver` ran.
# ---------------------------------------------------------------------------

class Option:
    """One setting: its ini name, default, parser, the environment variable that overrides
    it, the README's summary of it and the ini's comment on it."""

    def __init__(self, name, default, summary, comment, parse=str, env=None, choices=(),
                 secret=False):
        self.name, self.default, self.summary = name, default, summary
        self.comment, self.parse, self.env, self.choices = comment, parse, env, choices
        self.secret = secret            # a wrong value may be the secret: never repeated

    def read(self, text, where):
        """The value `text` (from the ini or the environment) gives, or a one-line error."""
        text = text.strip()
        if not text:
            return self.default
        try:
            value = self.parse(text)
        except ValueError:
            raise SystemExit("ankisync: %s: %s takes %s%s"
                             % (where, self.name, TAKES.get(self.parse, "a number"),
                                "" if self.secret else ", not %r" % text))
        if self.choices and value not in self.choices:
            raise SystemExit("ankisync: %s: %s is one of %s, not %r"
                             % (where, self.name, ", ".join(self.choices), text))
        return value


def whole_number(text):
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def counting_number(text):
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def port_number(text):
    value = int(text)
    if not 1 <= value <= 65535:
        raise ValueError(text)
    return value


def web_address(text):
    """An http(s) address with a host: what a client can be sent to."""
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or \
            any(c in text for c in " \t\r\n\"'<>\\"):
        raise ValueError(text)
    return text


def address_networks(text):
    """'127.0.0.1, 10.0.0.0/8, ::1' as networks."""
    return tuple(ipaddress.ip_network(part.strip(), strict=False)
                 for part in text.split(",") if part.strip())


def phc_hash(text):
    """A PHC string as `ankisync.py hash` prints it, never the secret itself: a secret
    in the ini would be read by whoever reads the ini."""
    parts = text.split("$")
    if len(parts) != PHC_PARTS or parts[0] or parts[1] != "pbkdf2-sha256" or \
            not all(parts[2:]):
        raise ValueError(text)
    return text


TAKES = {whole_number: "a whole number (0 or more)", counting_number: "a whole number (1 or more)",
         port_number: "a port number (1 to 65535)",
         phc_hash: "the hash `ankisync.py hash` prints ($pbkdf2-sha256$...), never the token "
                   "itself",
         web_address: "an http:// or https:// address",
         address_networks: "addresses or networks, separated by commas (127.0.0.1, 10.0.0.0/8)"}


OPTIONS = (
    Option("host", "0.0.0.0", "address to listen on", """
        Address to listen on. 0.0.0.0 reaches the server from phones and other computers
        on your network; 127.0.0.1 keeps it to this machine (behind a reverse proxy).""",
           env="SYNC_HOST"),
    Option("port", DEFAULT_PORT, "port", """
        Port to listen on. 27701 is the port Anki sync servers have used for years.""",
           parse=port_number, env="SYNC_PORT"),
    Option("data", "ankisync-data", "data folder, relative to the ini file", """
        Where users' collections, media and auth.db live: <data>/<user>/collection.anki2.
        The same layout as Anki's own sync server, so the folder can move between the two.""",
           env="SYNC_BASE"),
    Option("base_path", "/", "path prefix behind a reverse proxy", """
        Path prefix when a reverse proxy serves ankisync below a path, e.g. /anki/ for
        https://example.com/anki/. Clients then use https://example.com/anki/ (with the slash)."""),
    Option("max_payload_mb", DEFAULT_MAX_PAYLOAD_MB,
           "largest request body (MiB on the wire; 3× that decompressed)", """
        Largest request body, in MiB, as sent on the wire. Decompressed bodies may be 3x
        this (collections compress well). 100 is the official server's default and lets
        through collections of up to 300 MiB. Raise it for bigger collections.
        (A modern client's upload is also kept in its own schema-18 form, which makes the
        next modern download faster, but only while ten times its size stays free on the
        disk: on a small disk the collection is stored once.)""",
           parse=counting_number, env="MAX_SYNC_PAYLOAD_MEGS"),
    Option("session_timeout", SESSION_TIMEOUT, "seconds before an abandoned sync is rolled back",
           """
        Seconds a sync may sit idle before its changes are rolled back (a phone that lost
        its connection mid-sync). Clients send requests every few seconds while syncing.""",
           parse=counting_number),
    Option("log_level", "INFO", "one line per request at INFO", """
        DEBUG, INFO, WARNING or ERROR. INFO logs one line per request.""",
           parse=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR")),
    Option("zstd", "auto", "`stdlib`, `libzstd` or `python` to force a backend", """
        zstd backend: auto picks compression.zstd (Python 3.14+), then the system libzstd,
        then the pure-Python decoder (slow for big uploads, but needs nothing installed).
        Force one with stdlib, libzstd or python when troubleshooting.""",
           parse=str.lower, env="ANKISYNC_ZSTD", choices=("auto",) + ZSTD_BACKENDS),
    Option("certfile", "", "serve HTTPS directly: the certificate chain (PEM)", """
        HTTPS without a reverse proxy: a certificate chain and its key (PEM). Leave empty
        for plain HTTP. Anki accepts only certificates it trusts (e.g. Let's Encrypt)."""),
    Option("keyfile", "", "...and its key", ""),
    Option("tls", "", "`self-signed`: HTTPS from a private CA, for a LAN without a domain", """
        self-signed: serve HTTPS with a certificate from a private CA that ankisync makes
        in <data>/.tls/ (no domain, nothing installed); each device trusts its CA once: the
        front page offers it and says how. A new address gets a new certificate from the
        same CA at the next start. certfile and keyfile, when set, are used instead.""",
           parse=str.lower, env="ANKISYNC_TLS", choices=("self-signed",)),
    Option("acme_domain", "", "HTTPS with a Let's Encrypt certificate for this domain", """
        HTTPS with a certificate from Let's Encrypt (ACME), obtained at start and renewed
        while running, for this domain name (anki.example.org), which must point at this
        machine. The CA checks that the server is here on port 443 (TLS-ALPN-01: forward
        443 to `port`) or on port 80 (HTTP-01: answered on acme_http_port when ankisync
        can listen there; forward 80 to it); one of the two is enough. Until the first
        certificate comes, HTTPS answers with a temporary one no device trusts.
        Key and certificates: <data>/.tls/acme-*. certfile and keyfile win over it.""",
           parse=str.lower),
    Option("acme_email", "", "...an address Let's Encrypt may write to (optional)", """
        An e-mail address for the ACME account (optional): Let's Encrypt writes only about
        problems with it."""),
    Option("acme_directory", ACME_LETS_ENCRYPT, "...another ACME CA (its directory address)",
           """
        The ACME CA's directory. Let's Encrypt's staging CA, for trying things out without
        its rate limits: https://acme-staging-v02.api.letsencrypt.org/directory (its
        certificates are trusted by no device). Its own HTTPS is checked against the
        system's trusted CAs (SSL_CERT_FILE, when set).""", parse=web_address),
    Option("acme_http_port", 80, "...the port HTTP-01 challenges are answered on", """
        The port HTTP-01 challenges are answered on, when ankisync can listen on it (port
        80 needs root or CAP_NET_BIND_SERVICE; or forward 80 to a port above 1023).""",
           parse=port_number),
    Option("notice", "", "a message every client shows when it syncs", """
        A message every client shows when it syncs, and the sync goes on: "The server moves
        on Sunday", say. Plain text; a web address in it becomes a link on clients that
        show the message as a page (Anki 2.1.57 and later).""", env="ANKISYNC_NOTICE"),
    Option("moved_to", "", "the server's new address, once it has moved", """
        When this server has moved (its data folder copied to the new one): the new address,
        e.g. https://anki.example.com/. Modern clients (Anki 2.1.57+, AnkiDroid 2.16+,
        AnkiMobile) are sent there at their next sync and remember it; older ones are told
        to change their sync address.""", parse=web_address, env="ANKISYNC_MOVED_TO"),
    Option("metrics", "off", "`on`: /metrics in the Prometheus text format", """
        on: answer /metrics in the Prometheus text format (requests, durations, syncs,
        bytes, failed logins, sessions, users, their collection and media bytes, free
        disk), to this machine only, or to whoever sends metrics_token.""",
           parse=str.lower, env="ANKISYNC_METRICS", choices=("off", "on")),
    Option("metrics_token", "", "a token that opens /metrics to other machines", """
        A secret that opens /metrics to other machines (a Prometheus elsewhere): they send
        "Authorization: Bearer <token>". Empty: this machine only.""",
           env="ANKISYNC_METRICS_TOKEN"),
    Option("metrics_token_file", "", "...or the file holding it (Docker and systemd secrets)",
           """
        The file that holds metrics_token, as container secrets are given (Docker's
        /run/secrets/NAME, systemd's LoadCredential): read at start, its trailing newline
        dropped. SYNC_USER1_FILE, SYNC_USER2_FILE, ... likewise hold name:password.""",
           env="ANKISYNC_METRICS_TOKEN_FILE"),
    Option("admin_token", "", "turns on /admin: the hash `ankisync.py hash` makes of a token",
           """
        The admin page, /admin, in a browser: users (add, new password, delete), their
        collections and restore points (and a restore), the notice, the log's last lines.
        Off while empty. To turn it on, choose a long token, run `ankisync.py hash`, type
        the token, and set this to the hash it prints ($pbkdf2-sha256$...); never the token
        itself. The page's login asks for the token.""",
           parse=phc_hash, env="ANKISYNC_ADMIN_TOKEN", secret=True),
    Option("admin_token_file", "", "...or the file holding that hash (container secrets)", """
        The file that holds admin_token's hash, as container secrets are given (see
        metrics_token_file): read at start.""", env="ANKISYNC_ADMIN_TOKEN_FILE"),
    Option("admin_from", "127.0.0.1, ::1", "the addresses /admin answers", """
        The addresses the admin page answers, separated by commas (networks like
        192.168.1.0/24 too); others get a 403. The default is a browser on this machine.
        Behind a reverse proxy the client's address from ip_header counts, not the
        proxy's; without ip_header, a request that came through a proxy is refused, since
        every one of them would come from the proxy's address.""",
           parse=address_networks, env="ANKISYNC_ADMIN_FROM"),
    Option("public_url", "", "the address clients use (behind a proxy, in a container)", """
        The address clients type, as they type it, when it is not the one this machine
        listens on: a reverse proxy's (https://anki.example.com/anki/, base_path included)
        or a container host's. The front page and the start-up log then show it, and only it.
        Empty: the page shows the address its browser used (behind a proxy, the one the
        proxy says, when ip_header is set) and this machine's own addresses.""",
           parse=web_address, env="ANKISYNC_PUBLIC_URL"),
    Option("ip_header", "", "behind a proxy: the header with the client's address", """
        Behind a reverse proxy every connection comes from the proxy: name the header in
        which it passes the client's address (X-Forwarded-For, X-Real-IP, or one of the
        official server's SYNC_IP_HEADER values such as RightmostXForwardedFor), so failed
        logins are throttled per client and the log shows who connected; the front page then
        also believes the proxy's X-Forwarded-Proto and X-Forwarded-Host (or Forwarded).
        Leave it empty when clients connect directly: the header is then ignored, since
        anyone can send it.""",
           env="SYNC_IP_HEADER"),
    Option("trusted_proxies", "127.0.0.0/8, ::1", "where ip_header is believed from", """
        The addresses of your reverse proxies, separated by commas (networks like
        172.16.0.0/12 too): ip_header is read only on connections from them, since anyone
        else could write any address into it. The default is this machine; add the proxy
        container's network when the proxy runs in another container.""",
           parse=address_networks, env="ANKISYNC_TRUSTED_PROXIES"),
    Option("backup_uploads", 10, "restore points kept from before full uploads and restores",
           """
        Restore points: before a full upload replaces a collection (one device answering
        "Upload" in the full-sync dialog is the commonest way to lose reviews), and at
        most once a day after a normal sync, the collection is kept in <user>/backups/,
        compressed; deleted media files wait in <user>/media.trash/ as long. List and
        restore them with `ankisync.py backups NAME` and `restore NAME ID`.
        The last this many points from before a full upload, a restore or an import.""",
           parse=whole_number),
    Option("backup_days", 7, "daily restore points kept (one per day)", """
        Daily points kept: the newest of each of the last this many days with a sync.""",
           parse=whole_number),
    Option("backup_weeks", 4, "weekly restore points kept (one per week)", """
        Weekly points kept: the newest of each of the last this many weeks.""",
           parse=whole_number),
    Option("backup_budget_mb", 1024, "MiB of restore points per user at most", """
        MiB the points of one user may take; the oldest go first (the newest always
        stays). A point is about a third of the collection's size; none is made while
        less than three times the collection's size is free on the disk.""",
           parse=whole_number),
    Option("quota_collection_mb", 0, "MiB a user's collection may take (0: no limit)", """
        Quotas for a server on a small disk (a class, a family): the MiB one user's
        collection, and their media files, may take. A sync that would grow past it is
        refused whole, with a message the device shows (one that shrinks goes through);
        deleted media waiting in the trash count too, and restore points are kept within
        the collection's quota. 0 means no limit.""", parse=whole_number),
    Option("quota_media_mb", 0, "MiB a user's media files may take (0: no limit)", "",
           parse=whole_number),
    Option("max_connections", MAX_CONNECTIONS,
           "open connections; past it the longest-waiting one is closed", """
        Open connections at most. An idle or slow connection costs a socket and a small
        buffer, never a thread; past this number a new connection closes the one that has
        waited longest for a request. The open-files limit (ulimit -n) must be larger.""",
           parse=counting_number),
    Option("max_connections_per_address", MAX_CONNECTIONS_PER_ADDRESS,
           "one client address's share of them", """
        One client address's share of them, so one address cannot crowd out the others.
        A family or a class behind one router shares an address: each device uses one or
        two connections while it syncs. Raise it for a large school behind one NAT. Not
        applied to trusted_proxies when ip_header is set: everyone comes through them.""",
           parse=counting_number),
)


def render_ini():
    """ankisync.ini as shipped: every option, commented, with its default."""
    overrides = ", ".join("%s (%s)" % (o.env, o.name) for o in OPTIONS if o.env)
    lines = ["# ankisync configuration.", "#",
             "# Every option is shown with its default. Relative paths are relative to this "
             "file.",
             "# The official server's environment variables override what is set here:"]
    lines += ["#   " + line for line in textwrap.wrap(
        overrides + ", SYNC_USER1=name:password, SYNC_USER2, ..., PASSWORDS_HASHED=1 "
        "(SYNC_USERn then hold $pbkdf2-sha256$ PHC strings).", 84)]
    lines += ["", "[server]"]
    for option in OPTIONS:
        comment = textwrap.dedent(option.comment).strip()
        if comment:
            lines += [""] * (lines[-1] != "[server]")
            lines += ["# " + line for line in comment.splitlines()]
        lines.append(("%s = %s" % (option.name, option.default)).rstrip())
    return "\n".join(lines) + "\n"


def readme_row(option):
    """The option's line in the README's table."""
    default = "`%s`" % option.default if option.default != "" else "empty"
    return "| `%s` | %s | %s |" % (option.name, default, option.summary)


class Config:
    """Every setting the server reads: the options' values, and the users from SYNC_USERn."""

    def __init__(self):
        for option in OPTIONS:       # a default as an ini gives it: "127.0.0.0/8" a network
            setattr(self, option.name, option.read(str(option.default), "its default"))
        self.env_users = []          # (name, password or PHC hash) from SYNC_USERn
        self.passwords_hashed = False
        self.source = None           # the ini file read, if any

    @property
    def max_payload(self):
        return self.max_payload_mb * MIB

    @property
    def max_decompressed(self):
        return self.max_payload * DECOMPRESSED_FACTOR

    @classmethod
    def load(cls, path=None, environ=None):
        environ = os.environ if environ is None else environ
        config = cls()
        default = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ankisync.ini")
        if path is None and os.path.exists(default):
            path = default
        folder = os.path.dirname(os.path.abspath(__file__))
        if path is not None:
            if not os.path.exists(path):
                raise SystemExit("ankisync: config file %s does not exist" % path)
            config.read_ini(path)
            folder = os.path.dirname(os.path.abspath(path))
        # A relative data folder lives beside the ini, whatever the working directory;
        # SYNC_BASE, as for the official server, is relative to the working directory.
        config.data = os.path.join(folder, os.path.expanduser(config.data))
        config.read_environ(environ)
        config.data = os.path.abspath(os.path.expanduser(config.data))
        return config

    def read_ini(self, path):
        parser = configparser.ConfigParser(inline_comment_prefixes=("#", ";"))
        try:
            parser.read(path, encoding="utf-8")
        except configparser.MissingSectionHeaderError:
            raise SystemExit("ankisync: %s: the options must follow a line [server] at the top "
                             "of the file" % path)
        except configparser.Error as e:
            raise SystemExit("ankisync: cannot read %s: %s" % (path, str(e).splitlines()[0]))
        self.source = path
        # Options under another heading would be ignored, and a server meant for this
        # machine only would listen on every network: refused, so the typo is seen.
        others = [name for name in parser.sections() if name != "server"]
        if others or (parser.defaults() and not parser.has_section("server")):
            heading = others[0] if others else parser.default_section
            raise SystemExit("ankisync: %s: ankisync reads only the section [server], not [%s] "
                             "(names are case-sensitive): put the options under [server]"
                             % (path, heading))
        section = parser["server"] if parser.has_section("server") else {}
        known = {option.name: option for option in OPTIONS}
        for name in section:
            if name not in known:
                near = difflib.get_close_matches(name, known, 1)
                print("ankisync: %s: unknown option %r ignored%s" % (
                    path, name, " (did you mean %s?)" % near[0] if near else ""), file=sys.stderr)
        for option in OPTIONS:
            if option.name in section:
                setattr(self, option.name, option.read(section[option.name], path))

    def read_environ(self, environ):
        for option in OPTIONS:
            if option.env and environ.get(option.env):
                setattr(self, option.name, option.read(environ[option.env], option.env))
        self.passwords_hashed = bool(environ.get("PASSWORDS_HASHED"))
        number = 1
        while environ.get("SYNC_USER%d" % number) or environ.get("SYNC_USER%d_FILE" % number):
            variable = "SYNC_USER%d" % number
            if environ.get(variable) and environ.get(variable + "_FILE"):
                raise SystemExit("ankisync: set %s or %s_FILE, not both" % (variable, variable))
            value = environ.get(variable) or secret_from_file(environ[variable + "_FILE"],
                                                              variable + "_FILE")
            name, sep, secret = value.partition(":")
            if not sep:
                raise SystemExit("ankisync: %s must look like name:password" % (
                    variable if environ.get(variable) else variable + "_FILE's file"))
            self.env_users.append((name, secret))
            number += 1
        if self.metrics_token_file:
            if self.metrics_token:
                raise SystemExit("ankisync: set metrics_token or metrics_token_file, not both")
            self.metrics_token = secret_from_file(self.metrics_token_file, "metrics_token_file")
        if self.admin_token_file:
            if self.admin_token:
                raise SystemExit("ankisync: set admin_token or admin_token_file, not both")
            option = next(o for o in OPTIONS if o.name == "admin_token")
            self.admin_token = option.read(secret_from_file(
                self.admin_token_file, "admin_token_file"), self.admin_token_file)

    def public_address(self):
        """public_url with the trailing slash modern clients need (without it they drop
        the path's last part), or '' when it is not set."""
        url = self.public_url
        return url if not url or urllib.parse.urlsplit(url).path.endswith("/") else url + "/"

    def normalized_base_path(self):
        """The prefix as '/anki/' or '/', however it was typed."""
        parts = [p for p in self.base_path.split("/") if p]
        return "/" + "".join(p + "/" for p in parts)


def secret_from_file(path, what):
    """A secret as containers hand them over, a file of its own: read once, at start, its
    trailing newline dropped (editors and `echo` add one); unreadable, a one-line error."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit("ankisync: %s: cannot read %s: %s" % (
            what, path, e.strerror if isinstance(e, OSError) and e.strerror else e))
    if not text:
        raise SystemExit("ankisync: %s: %s is empty" % (what, path))
    return text


# The official server's SYNC_IP_HEADER names (axum-client-ip), and the header each means.
IP_HEADER_NAMES = {
    "rightmostxforwardedfor": "x-forwarded-for", "xrealip": "x-real-ip",
    "cfconnectingip": "cf-connecting-ip", "trueclientip": "true-client-ip",
    "flyclientip": "fly-client-ip", "cloudfrontvieweraddress": "cloudfront-viewer-address",
    "rightmostforwarded": "forwarded", "connectinfo": "",
}


def ip_header_name(setting):
    """The request header to take client addresses from: a header name, or one of the
    official server's SYNC_IP_HEADER values; empty for the TCP peer."""
    setting = setting.strip()
    return IP_HEADER_NAMES.get(setting.lower().replace("-", "").replace("_", ""),
                               setting.lower())


# ---------------------------------------------------------------------------
# Users
#   auth.db in the data folder: salted PBKDF2 password hashes and the host keys
#   handed out at login. The CLI writes the same file while the server runs.
# ---------------------------------------------------------------------------

def hash_password(password, rounds=PBKDF2_ROUNDS):
    """A PHC string, the format the official server reads with PASSWORDS_HASHED."""
    salt = secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, rounds, PBKDF2_LENGTH)
    return "$pbkdf2-sha256$i=%d,l=%d$%s$%s" % (rounds, PBKDF2_LENGTH, b64_nopad(salt),
                                               b64_nopad(digest))


def verify_password(password, phc):
    if phc.startswith("$%s$" % ANKISYNCD_SCHEME):
        return verify_ankisyncd_hash(password, phc)
    try:
        _, scheme, params, salt, expected = phc.split("$")
        settings = dict(p.split("=", 1) for p in params.split(","))
        if scheme != "pbkdf2-sha256":
            return False
        salt, expected = b64_decode_nopad(salt), b64_decode_nopad(expected)
        rounds = int(settings.get("i", PBKDF2_ROUNDS))
    except ValueError:
        return False
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, rounds, len(expected))
    return hmac.compare_digest(digest, expected)


def same_secret(shown, expected):
    """A constant-time comparison of what a client sent with what it should have: as
    bytes, since compare_digest refuses a str with a character past ASCII (a 500 for
    one byte of a cookie), and a header's bytes arrive as latin-1."""
    return hmac.compare_digest(shown.encode("utf-8", "surrogateescape"),
                               expected.encode("utf-8", "surrogateescape"))


def verify_ankisyncd_hash(password, phc):
    """ankisyncd's scheme: sha256 of name + password + salt, in hex (the name as it was
    stored there, kept in the string)."""
    try:
        _, _, name, salt, expected = phc.split("$")
        name = b64_decode_nopad(name).decode("utf-8")
    except ValueError:
        return False
    digest = hashlib.sha256((name + password + salt).encode("utf-8")).hexdigest()
    return hmac.compare_digest(digest, expected)


def b64_nopad(data):
    return base64.b64encode(data).decode("ascii").rstrip("=")


def b64_decode_nopad(text):
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError):
        raise ValueError("bad base64")


def b64url(data):
    """Base64 for URLs and cookies (RFC 4648 5), unpadded: ACME's JWS, page cookies."""
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def b64url_decode(text):
    return b64_decode_nopad(text.replace("-", "+").replace("_", "/"))


def normalize_username(name):
    """A user name as it is stored: NFC and trimmed, or ValueError saying the rule.

    Any letters are welcome (the official server takes `SYNC_USER1=José`); the name
    only has to be usable as a folder name, which folder_name() sees to.
    """
    name = unicodedata.normalize("NFC", (name or "").strip())
    if not 0 < len(name) <= USERNAME_MAX or USERNAME_FORBIDDEN.search(name) or \
            name in (".", "..") or any(unicodedata.category(c) in USERNAME_INVISIBLE
                                        for c in name):
        raise ValueError("bad user name %r: use 1 to %d characters, none of them a control "
                         "character, an invisible one or / \\" % (name, USERNAME_MAX))
    return name


def folder_name(name):
    """The user's folder in the data folder: the name itself where every file system
    takes it (all ASCII names of ankisync 0.1.0 do), else with the characters that
    some file system refuses written as %XX; one of the server's own files' names (in
    any case: macOS and Windows fold it) with its first character so written."""
    def escape(match):
        return "".join("%%%02X" % b for b in match.group().encode("utf-8"))
    if name.casefold() in DATA_FOLDER_FILES:
        return re.sub(r"^.", escape, name)
    if USERNAME_PATTERN.match(name):
        return name
    folder = FOLDER_UNSAFE.sub(escape, name)
    folder = re.sub(r"^\.|[. ]$", escape, folder)       # hidden, or dropped by Windows
    return folder


def name_fold(name):
    """Names that differ only in case or Unicode form are one user: macOS and Windows
    would give them the same folder."""
    return unicodedata.normalize("NFC", name).casefold()


def key_digest(hkey):
    """What auth.db keeps of a host key: a key is a bearer credential, a copy of
    auth.db must not be one. Keys carry 160 bits, so a fast hash suffices."""
    return hashlib.sha256(hkey.encode("utf-8")).hexdigest()


class UserStore:
    """Users, password hashes and host-key digests in <data>/auth.db.

    A user's host key is derived from a secret in auth.db, the name and the password
    hash, as the official server's is from the name and password: every device of the
    user gets the same one, a new password ends it, and a login writes nothing (on a
    full disk, users still get in). Its digest is stored when the password is set.
    """

    def __init__(self, folder):
        os.makedirs(folder, mode=0o700, exist_ok=True)
        self.path = os.path.join(folder, "auth.db")
        self.local = threading.local()
        self.devices_lock = threading.Lock()      # see saw()
        self.key_cache = {}         # digest -> (user, monotonic expiry): a query a request cost 15%
        # Costs the same as a real check, so an unknown name takes as long as a wrong password.
        self.decoy_hash = None      # made at the first unknown name, not by every CLI call
        with self.connect() as db:
            # WAL (a setting kept in the file) lets `adduser` write while the server reads.
            db.execute("pragma journal_mode=wal")
            db.executescript("""
                create table if not exists users (
                    name text primary key, hash text not null, created integer not null);
                create table if not exists hostkeys (
                    hkey text primary key, name text not null, created integer not null);
                create index if not exists ix_hostkeys_name on hostkeys (name);
                create table if not exists api_tokens (
                    digest text primary key, name text not null, label text not null,
                    created integer not null);
                create table if not exists page_logouts (
                    mac text primary key, expires integer not null);
                create table if not exists devices (
                    name text not null, client text not null, hkey text not null,
                    address text not null, first_seen integer not null,
                    last_seen integer not null, last_kind text not null,
                    primary key (name, client, hkey));
            """)
            version = db.execute("pragma user_version").fetchone()[0]
            if version < 1:
                # ankisync 0.1.0 kept the keys themselves: digest them in place, leaving
                # no copy in freed pages (secure_delete) or in the WAL (the checkpoint).
                db.execute("pragma secure_delete=on")
                rows = db.execute("select hkey, name, created from hostkeys").fetchall()
                db.execute("delete from hostkeys")
                db.executemany("insert or ignore into hostkeys values (?, ?, ?)",
                               [(key_digest(k), n, c) for k, n, c in rows])
            if version < 2:
                # Names compared folded, the users SYNC_USERn made, the host-key secret.
                db.executescript("""
                    alter table users add column fold text;
                    alter table users add column source text not null default 'cli';
                    create index ix_users_fold on users (fold);
                    create table secret (value blob not null);
                """)
                db.executemany("update users set fold=? where name=?",
                               [(name_fold(n), n) for (n,) in db.execute("select name from users")])
                self.secret = secrets.token_bytes(32)
                db.execute("insert into secret values (?)", (self.secret,))
                for name, phc in db.execute("select name, hash from users").fetchall():
                    self._store_key(db, name, phc)
            db.execute("pragma user_version=%d" % AUTH_SCHEMA)
            self.secret = db.execute("select value from secret").fetchone()[0]
        if version < 1:
            self.connect().execute("pragma wal_checkpoint(truncate)")

    def connect(self):
        """This thread's connection: opening one per request cost more than the query."""
        db = getattr(self.local, "db", None)
        if db is None:
            # The timeout rides out the short write locks of `adduser` in another process.
            db = self.local.db = sqlite3.connect(self.path, timeout=30)
        return db

    def names(self):
        with self.connect() as db:
            return [row[0] for row in db.execute("select name from users order by name")]

    def saw(self, name, hkey, client, address, kind):
        """A device of `name` synced (for `status`): its client, key and address, when.
        Its own connection skips the fsync per commit: a power cut may lose a record.
        The time keeps its fraction: two devices syncing within one second are told apart
        (SQLite keeps a non-integral value as it is, in any column)."""
        now = time.time()
        db = getattr(self.local, "devices_db", None)
        if db is None:
            db = self.local.devices_db = sqlite3.connect(self.path, timeout=30)
            db.execute("pragma synchronous=normal")
        # One writer at a time here: SQLite makes a waiting writer sleep a millisecond or
        # more, and 32 syncs finishing at once each slept several.
        with self.devices_lock, db:
            updated = db.execute(
                "update devices set address=?, last_seen=?, last_kind=? where name=? and "
                "client=? and hkey=?", (address, now, kind, name, client, key_digest(hkey)))
            if not updated.rowcount:
                db.execute("insert into devices values (?, ?, ?, ?, ?, ?, ?)",
                           (name, client, key_digest(hkey), address, now, now, kind))

    def devices(self, name, since=0):
        """(client, address, first seen, last seen, last kind) of each device, newest first:
        a line per client, for a device logged in again after a new password (a new host
        key) is the device it was, not one more."""
        with self.connect() as db:
            rows = db.execute("select client, address, first_seen, last_seen, last_kind from "
                              "devices where name=? and last_seen>=? order by last_seen desc",
                              (name, since)).fetchall()
        newest = {}
        for client, address, first, last, kind in rows:
            if client in newest:
                newest[client][2] = min(newest[client][2], first)
            else:
                newest[client] = [client, address, first, last, kind]
        return [tuple(row) for row in newest.values()]

    def find(self, name):
        """(name, hash, source) of the user `name` means, in any case or Unicode form."""
        with self.connect() as db:
            return db.execute("select name, hash, source from users where name=? union all "
                              "select name, hash, source from users where fold=? limit 1",
                              (name, name_fold(name))).fetchone()

    def canonical(self, name):
        """The stored spelling of `name`, or ValueError naming the way out."""
        row = self.find(name)
        if row is None:
            raise ValueError("no user %r: see `lsuser` for the names" % (name,))
        return row[0]

    def exists(self, name):
        return self.find(name) is not None

    def source(self, name):
        row = self.find(name)
        return row[2] if row else None

    def check_new(self, name):
        """The stored form of a name no user has yet, or ValueError naming the way out."""
        name = normalize_username(name)
        row = self.find(name)
        if row is not None:
            raise ValueError("user %r already exists: use `passwd %s` to change the password"
                             % (row[0], name))
        return name

    def add(self, name, password=None, phc=None, source="cli"):
        name = self.check_new(name)
        phc = phc or hash_password(password)
        with self.connect() as db:
            db.execute("insert into users (name, hash, created, fold, source) values "
                       "(?, ?, ?, ?, ?)", (name, phc, int(time.time()), name_fold(name), source))
            self._store_key(db, name, phc)

    def set_password(self, name, password=None, phc=None):
        """A new password also logs every device out: their host keys die with it."""
        name = self.canonical(name)
        phc = phc or hash_password(password)
        with self.connect() as db:
            db.execute("update users set hash=? where name=?", (phc, name))
            db.execute("delete from hostkeys where name=?", (name,))
            self._store_key(db, name, phc)
        self.key_cache.clear()

    def delete(self, name):
        name = self.canonical(name)
        with self.connect() as db:
            db.execute("delete from users where name=?", (name,))
            db.execute("delete from hostkeys where name=?", (name,))
            db.execute("delete from api_tokens where name=?", (name,))
        self.key_cache.clear()
        return name

    def add_token(self, name, label):
        """A new API token of `name` (for /api/stats); only its digest is kept, as for
        host keys: the caller shows it once."""
        token = secrets.token_urlsafe(API_TOKEN_BYTES)
        with self.connect() as db:
            count = db.execute("select count() from api_tokens where name=?",
                               (name,)).fetchone()[0]
            if count >= API_TOKENS_MAX:
                raise ValueError("%d API tokens already: revoke one first" % API_TOKENS_MAX)
            db.execute("insert into api_tokens values (?, ?, ?, ?)",
                       (key_digest(token), name, label, int(time.time())))
        return token

    def tokens(self, name):
        """(id, label, created) of each API token of `name`: the id is a digest's start,
        enough to revoke it by, useless to call with."""
        with self.connect() as db:
            return db.execute("select substr(digest, 1, 12), label, created from api_tokens "
                              "where name=? order by created, label", (name,)).fetchall()

    def revoke_token(self, name, token_id):
        with self.connect() as db:
            return db.execute("delete from api_tokens where name=? and substr(digest, 1, 12)=?",
                              (name, token_id)).rowcount

    def user_for_token(self, token):
        with self.connect() as db:
            row = db.execute("select name from api_tokens where digest=?",
                             (key_digest(token),)).fetchone()
        return row[0] if row else None

    def end_page_session(self, mac, expires):
        """A page session logged out: its cookie is worth nothing from now on, even one a
        stolen copy of it. Kept till it would have expired anyway, then forgotten."""
        with self.connect() as db:
            db.execute("delete from page_logouts where expires < ?", (int(time.time()),))
            db.execute("insert or ignore into page_logouts values (?, ?)", (mac, expires))

    def page_session_ended(self, mac):
        with self.connect() as db:
            return db.execute("select 1 from page_logouts where mac=?",
                              (mac,)).fetchone() is not None

    def key_for(self, name, phc):
        return hmac.new(self.secret, ("%s\0%s" % (name, phc)).encode("utf-8"),
                        hashlib.sha256).hexdigest()[:HOST_KEY_HEX]

    def _store_key(self, db, name, phc, key=None):
        db.execute("insert or ignore into hostkeys values (?, ?, ?)",
                   (key_digest(key or self.key_for(name, phc)), name, int(time.time())))

    def login(self, name, password):
        """The host key for a right name and password, else None."""
        row = self.find(name)
        if row is None and self.decoy_hash is None:
            self.decoy_hash = hash_password(secrets.token_hex(8))
        ok = verify_password(password, row[1] if row else self.decoy_hash)
        if not (row and ok):
            return None
        if row[1].startswith("$%s$" % ANKISYNCD_SCHEME):
            # An imported hash of another server: PBKDF2 now that the password is known.
            phc = hash_password(password)
            with self.connect() as db:
                db.execute("update users set hash=? where name=?", (phc, row[0]))
                db.execute("delete from hostkeys where name=?", (row[0],))
                self._store_key(db, row[0], phc)
            return self.key_for(row[0], phc)
        key = self.key_for(row[0], row[1])
        if self.user_for_key(key) is None:      # stored with the password; written only
            with self.connect() as db:          # if auth.db was edited by hand
                self._store_key(db, row[0], row[1], key)
        return key

    def remembered_user(self, hkey):
        """The user a host key belonged to when last seen, from memory only: for the log
        line of a request refused before it reached a worker (the listener never waits
        on auth.db)."""
        cached = self.key_cache.get(key_digest(hkey)) if isinstance(hkey, str) else None
        return cached[0] if cached else None

    def user_for_key(self, hkey):
        if not hkey:
            return None
        now = time.monotonic()
        digest = key_digest(hkey)
        cached = self.key_cache.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        with self.connect() as db:
            row = db.execute("select name from hostkeys where hkey=?", (digest,)).fetchone()
        if row is None:
            return None
        if len(self.key_cache) >= KEY_CACHE_MAX:
            self.key_cache.clear()      # a cache, not a store: every entry is a query away
        self.key_cache[digest] = (row[0], now + KEY_CACHE_SECONDS)
        return row[0]

    def apply_environment(self, env_users, hashed):
        """SYNC_USERn: create the user, or change the password when it differs.

        The official server's host key is sha1 of the variable's value; accepting it
        too lets devices moved over from that server sync on without logging in again.
        It also tells, at no cost, that a user's variable has not changed since the last
        start; the others' passwords are hashed on every core at once (PBKDF2 leaves the
        GIL), so thousands of users start in minutes, not a quarter of an hour.
        """
        changed = []
        for name, secret in env_users:
            row = self.find(name)
            official_key = hashlib.sha1(("%s:%s" % (name, secret)).encode("utf-8")).hexdigest()
            if row is not None and self.user_for_key(official_key) == row[0] and \
                    (not hashed or secret == row[1]):
                continue
            changed.append((name, secret, row, official_key))

        def new_hash(item):
            name, secret, row, _ = item
            if hashed:
                return secret if row is None or secret != row[1] else None
            if row is not None and verify_password(secret, row[1]):
                return None
            return hash_password(secret)

        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            hashes = list(pool.map(new_hash, changed))
        for (name, secret, row, official_key), phc in zip(changed, hashes):
            if row is None:
                self.add(name, phc=phc, source="env")
            elif phc is not None:
                self.set_password(name, phc=phc)
            with self.connect() as db:
                db.execute("update users set source='env' where name=?", (self.canonical(name),))
                self._store_key(db, self.canonical(name), None, official_key)


class LoginGuard:
    """Slows password guessing down to nothing worth trying.

    Per address: after LOGIN_FAILURES_ALLOWED wrong passwords in LOGIN_FAILURE_WINDOW,
    the address waits LOCKOUT_FIRST seconds, doubled with each further failure. Per
    user: once a name has had that many failures from anywhere, its password is checked
    at most once every USER_CHECK_INTERVAL, so guessers spread over many addresses gain
    little. Neither applies to a name at an address where it logged in lately
    (KNOWN_LOGIN_SECONDS) and has not failed since: guessers cannot lock the owner out,
    nor one user's wrong passwords the others behind the same router. And PBKDF2 runs
    on at most PASSWORD_CHECKS_AT_ONCE threads, so guessing cannot starve syncs of the CPU.

    `shared(address)` names the addresses everyone comes from (a trusted proxy's own, when
    a request from it lacks ip_header): locking one out would lock out every user, so
    only the per-user limits apply to them.
    """

    def __init__(self, shared=lambda address: False):
        self.shared = shared
        self.lock = threading.Lock()
        self.by_address = {}        # address -> monotonic times of recent failures
        self.by_user = {}           # name -> the same
        self.user_next = {}         # name -> when its next check may start
        self.announced = {}         # address -> end of the lockout already logged
        self.known = {}             # (address, name) -> until when its last success counts
        self.turns = threading.BoundedSemaphore(PASSWORD_CHECKS_AT_ONCE)

    @contextlib.contextmanager
    def turn(self, address, name):
        """Wait for this login's turn to check a password, or refuse it with 429/503.

        Admission is asked again once the turn comes: guesses that queued up behind
        the fifth failure must not be checked either."""
        self._admit(address, name, pace=False)
        if not self.turns.acquire(timeout=PASSWORD_CHECK_WAIT):
            raise SyncError(503, "the server is busy checking passwords: try again shortly",
                            retry_after=PASSWORD_CHECK_WAIT)
        try:
            self._admit(address, name, pace=True)
            yield
        finally:
            self.turns.release()

    def _admit(self, address, name, pace):
        now = time.monotonic()
        with self.lock:
            if self.known.get((address, name), 0) > now:
                return
            until = now if self.shared(address) else self._locked_until(address, now)
            wait = until - now
            if wait > 0:
                if self.announced.get(address) != until:
                    _bounded(self.announced, address, until)
                    log.warning("login: %s is throttled for %d s after %d failed logins",
                                address, wait, len(self.by_address[address]))
                raise SyncError(429, "too many failed logins from this address: try again in "
                                "%d seconds" % math.ceil(wait), retry_after=math.ceil(wait))
            if len(_recent(self.by_user, name, now)) >= LOGIN_FAILURES_ALLOWED:
                if self.user_next.get(name, 0) > now:
                    raise SyncError(429, "too many failed logins for this user: try again in a "
                                    "moment", retry_after=math.ceil(USER_CHECK_INTERVAL))
                if pace:
                    _bounded(self.user_next, name, now + USER_CHECK_INTERVAL)

    def failed(self, address, name):
        now = time.monotonic()
        with self.lock:
            self.known.pop((address, name), None)   # a mistake: the ordinary rules again
            for table, key in ((self.by_address, address), (self.by_user, name)):
                times = _recent(table, key, now)
                times.append(now)
                _bounded(table, key, times)

    def succeeded(self, address, name):
        # The address's failures stay: behind one router they may be someone else's.
        with self.lock:
            _bounded(self.known, (address, name), time.monotonic() + KNOWN_LOGIN_SECONDS)

    def throttled(self):
        """How many addresses wait out a lockout now (for /metrics)."""
        now = time.monotonic()
        with self.lock:
            return sum(1 for address in list(self.by_address)
                       if not self.shared(address) and self._locked_until(address, now) > now)

    def _locked_until(self, address, now):
        """When `address` may have its next password checked."""
        times = _recent(self.by_address, address, now)
        excess = len(times) - LOGIN_FAILURES_ALLOWED
        if excess < 0:
            return now
        return times[-1] + min(LOCKOUT_MAX, LOCKOUT_FIRST * 2 ** excess)


def _recent(table, key, now):
    """The failures of `key` still inside the window, the stale ones dropped."""
    times = [t for t in table.get(key, ()) if t > now - LOGIN_FAILURE_WINDOW]
    if times:
        table[key] = times
    else:
        table.pop(key, None)
    return times


def _bounded(table, key, value):
    """table[key] = value, as the newest entry, forgetting the oldest past GUARD_TABLE_MAX."""
    table.pop(key, None)
    table[key] = value
    while len(table) > GUARD_TABLE_MAX:
        del table[next(iter(table))]
    return table


# ---------------------------------------------------------------------------
# Envelopes
#   Bodies arrive chunked or with a length, wrapped in zstd (v11) or in a
#   multipart form with gzip (legacy). Everything streams through bounded
#   buffers; large bodies land in a temporary file in the data folder.
# ---------------------------------------------------------------------------

class Spool:
    """Bytes kept in memory while small, moved to a temporary file when large."""

    def __init__(self, folder, limit, what="body", memory_max=SPOOL_MEMORY_MAX, may_spill=None):
        self.folder = folder
        self.limit = limit
        self.what = what
        self.memory_max = memory_max
        self.may_spill = may_spill  # asked before the first byte goes to disk; raises to refuse
        self.size = 0
        self.memory = io.BytesIO()
        self.file = None
        self.path = None

    def write(self, data):
        self.size += len(data)
        if self.size > self.limit:
            raise SyncError(413, "%s larger than %d MiB: raise max_payload_mb if this is intended"
                            % (self.what, self.limit // MIB))
        if self.file is None and self.size > self.memory_max:
            if self.may_spill is not None:
                self.may_spill()
            fd, self.path = tempfile.mkstemp(prefix=TEMP_SPOOL, dir=self.folder)
            self.file = os.fdopen(fd, "w+b")
            self.file.write(self.memory.getvalue())
            self.memory = None
        (self.file or self.memory).write(data)
        return len(data)

    def reader(self):
        """A file object positioned at the start of what was written."""
        if self.file is not None:
            self.file.flush()
            return open(self.path, "rb")
        return io.BytesIO(self.memory.getvalue())

    def getvalue(self):
        if self.file is not None:
            with self.reader() as f:
                return f.read()
        return self.memory.getvalue()

    def save_as(self, path):
        """Move (or write) the content to `path`, durable on disk."""
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            self.file = None
            os.replace(self.path, path)
            self.path = None
        else:
            with open(path, "wb") as f:
                f.write(self.memory.getvalue())
                f.flush()
                os.fsync(f.fileno())

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.path = None


def copy_stream(read, write, block=IO_BLOCK):
    total = 0
    while True:
        data = read(block)
        if not data:
            return total
        write(data)
        total += len(data)


class BodyReader:
    """The request body as a stream, whether framed by Content-Length or chunked.

    http.server hands over the raw socket file: chunked transfer coding, which every
    modern Anki client uses, is decoded here.
    """

    def __init__(self, rfile, head, limit):
        self.rfile = rfile
        self.limit = limit
        self.received = 0
        self.chunked = head.chunked         # RequestHead has checked the framing already
        self.remaining = 0 if self.chunked else head.length    # in the chunk, or the body
        if self.remaining > limit:
            raise body_too_large(self.remaining, limit)
        self.finished = not self.chunked and self.remaining == 0

    def read(self, n=IO_BLOCK):
        if self.finished:
            return b""
        if self.chunked and self.remaining == 0:
            self.remaining = self._next_chunk_size()
            if self.remaining == 0:
                self._skip_trailers()
                self.finished = True
                return b""
        data = self.rfile.read(min(n, self.remaining))
        if not data:
            raise bad_request("request body ended early")
        self.remaining -= len(data)
        self.received += len(data)
        if self.received > self.limit:
            raise SyncError(413, "request body over the %d MiB limit (max_payload_mb)"
                            % (self.limit // MIB))
        if self.remaining == 0:
            if self.chunked:
                if self.rfile.readline(3) not in (b"\r\n", b"\n"):
                    raise bad_request("bad chunked encoding: chunk not followed by CRLF")
            else:
                self.finished = True
        return data

    def _next_chunk_size(self):
        line = self.rfile.readline(CHUNK_LINE_MAX)
        match = CHUNK_SIZE_LINE.fullmatch(line)
        if not match:
            if not line.endswith(b"\n"):
                raise bad_request("request body ended early")
            raise bad_request("bad chunked encoding: chunk size line %r" % line[:QUOTED_MAX])
        return int(match.group(1), 16)

    def _skip_trailers(self):
        for _ in range(100):
            if self.rfile.readline(TRAILER_LINE_MAX) in (b"\r\n", b"\n", b""):
                return
        raise bad_request("bad chunked encoding: too many trailers")

    def drain(self):
        while self.read(IO_BLOCK):
            pass


def body_too_large(length, limit):
    return SyncError(413, "request body of %d bytes is over the %d MiB limit: raise "
                     "max_payload_mb in the ini (MAX_SYNC_PAYLOAD_MEGS) for a bigger collection"
                     % (length, limit // MIB))


def gunzip_stream(read, write, limit):
    """Inflate gzip members from `read` to `write`, refusing output past `limit`."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    total = 0
    seen_any = False
    while True:
        data = read(IO_BLOCK)
        if not data:
            break
        seen_any = True
        while data:
            try:
                out = inflater.decompress(data, IO_BLOCK)
            except zlib.error as e:
                raise bad_request("bad gzip data: %s" % e)
            total += len(out)
            if total > limit:
                raise SyncError(413, "decompressed body over the %d MiB limit" % (limit // MIB))
            write(out)
            if inflater.eof:
                data = inflater.unused_data
                inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
                if not data:
                    seen_any = False
            else:
                data = inflater.unconsumed_tail
    if seen_any:
        raise bad_request("bad gzip data: stream ends in the middle")
    return total


class MultipartParser:
    """A small streaming multipart/form-data reader for legacy clients.

    Tolerates what they send: any part order, a missing `data` part, and old
    AnkiDroid's missing closing boundary. The `data` part streams into a Spool;
    every other part is a short string.
    """

    def __init__(self, read, boundary, data_spool, on_field=None):
        if not boundary or len(boundary) > 200:
            raise bad_request("multipart body without a usable boundary")
        self.read = read
        self.delimiter = b"--" + boundary.encode("latin-1")
        self.data_spool = data_spool
        self.on_field = on_field    # called with each short field as soon as it is read
        self.buffer = bytearray()
        self.eof = False
        self.fields = {}

    def _fill(self):
        if self.eof:
            return False
        data = self.read(IO_BLOCK)
        if not data:
            self.eof = True
            return False
        self.buffer += data
        return True

    def parse(self):
        # Preamble: everything up to the first delimiter.
        while True:
            at = self.buffer.find(self.delimiter)
            if at >= 0:
                del self.buffer[:at + len(self.delimiter)]
                break
            if len(self.buffer) > MULTIPART_HEADER_MAX:
                raise bad_request("bad multipart body: no boundary in the first bytes")
            if not self._fill():
                raise bad_request("bad multipart body: no boundary found")
        parts = 0
        while True:
            while len(self.buffer) < 4 and self._fill():
                pass
            if self.buffer[:2] == b"--" or (self.eof and not self.buffer.strip()):
                return self.fields          # closing delimiter, or a body that just stops
            parts += 1
            if parts > MULTIPART_MAX_PARTS:
                raise bad_request("bad multipart body: more than %d parts" % MULTIPART_MAX_PARTS)
            name = self._read_part_headers()
            if not self._read_part_content(name):
                return self.fields

    def _read_part_headers(self):
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(self.buffer) > MULTIPART_HEADER_MAX:
                raise bad_request("bad multipart body: part headers over %d bytes"
                                  % MULTIPART_HEADER_MAX)
            if not self._fill():
                raise bad_request("bad multipart body: part headers cut off")
        headers = bytes(self.buffer[:end]).decode("latin-1")
        del self.buffer[:end + 4]
        match = re.search(r'(?:^|;)\s*name="([^"]*)"', headers, re.IGNORECASE | re.MULTILINE)
        if not match:
            raise bad_request("bad multipart body: a part without a name")
        return match.group(1)

    def _read_part_content(self, name):
        """Copy one part's content to its sink; False when the body ended instead."""
        marker = b"\r\n" + self.delimiter
        small = bytearray()
        sink = self.data_spool.write if name == "data" else small.extend
        while True:
            at = self.buffer.find(marker)
            if at >= 0:
                sink(bytes(self.buffer[:at]))
                del self.buffer[:at + len(marker)]
                ended = True
                break
            keep = len(marker)
            if len(self.buffer) > keep:
                sink(bytes(self.buffer[:-keep]))
                del self.buffer[:-keep]
            if name != "data" and len(small) > MULTIPART_FIELD_MAX:
                raise bad_request("bad multipart body: field %r too long" % name)
            if not self._fill():
                # Old AnkiDroid ends the body without a closing boundary.
                rest = bytes(self.buffer)
                sink(rest[:-2] if rest.endswith(b"\r\n") else rest)
                self.buffer.clear()
                ended = False
                break
        if name != "data":
            if len(small) > MULTIPART_FIELD_MAX:
                raise bad_request("bad multipart body: field %r too long" % name)
            self.fields[name] = small.decode("utf-8", "replace")
            if self.on_field is not None:
                self.on_field(name, self.fields[name])
        else:
            self.fields["data"] = None      # marks that a data part was present
        return ended


class Envelopes:
    """Undoes either envelope (docs/protocol.md 3): a SyncRequest with its key checked
    before its body is read, and its payload decompressed into a Spool."""

    def __init__(self, accounts, zstd, spool_folder, config):
        self.accounts = accounts
        self.zstd = zstd
        self.spool_folder = spool_folder
        self.config = config

    def decode(self, head, address, area, method, body):
        """Undo the envelope: fills a SyncRequest with keys and the plain payload.

        The key is checked before the body is decompressed or stored: a request
        without a valid one costs a few KiB of memory and no disk.
        """
        req = SyncRequest(area, method, address)
        header = head.headers.get("anki-sync")
        content_type = head.headers.get("Content-Type", "")
        try:
            if head.command == "GET":
                if (area, method) != ("msync", "begin"):
                    raise SyncError(405, "%s/%s takes POST" % (area, method))
                query = urllib.parse.parse_qs(head.path.partition("?")[2])
                req.hkey = query.get("k", [""])[0]
                req.client_version = query.get("v", [""])[0]
                self.accounts.authenticate(req)
            elif header is not None:
                self._decode_modern(req, header, body)
            elif content_type.lower().startswith("multipart/form-data"):
                self._decode_legacy(req, content_type, body)
            else:
                raise bad_request("expected an anki-sync header (Anki 2.1.57+) or a multipart "
                                  "form (older clients): is this an Anki client?")
        except BaseException:
            req.close()
            raise
        return req

    def _decode_modern(self, req, header, body):
        fields = client_json(header, "the anki-sync header")
        if not (isinstance(fields, dict) and all(k in fields for k in "vkcs")):
            raise bad_request("bad anki-sync header: a JSON object with v, k, c and s is expected")
        shaped(fields, SYNC_HEADER, "the anki-sync header")
        req.version = SyncVersion.check(fields["v"])
        req.hkey, req.skey, req.client_version = fields["k"], fields["s"], fields["c"]
        limit = self.payload_limit(req)
        req.payload = Spool(self.spool_folder, limit, "decompressed body")
        try:
            self.zstd.decompress_stream(body.read, req.payload.write, limit)
        except ZstdLimitError:
            raise over_limit(req, limit)
        except ZstdError as e:
            raise bad_request("bad zstd body: %s" % e)
        if req.method == "begin":
            req.client_version = str(req.json().get("v") or "")

    def payload_limit(self, req):
        """hostKey is the one method a stranger may call: its body stays small.
        Every other method has its key checked here, before its body is read."""
        if (req.area, req.method) == ("sync", "hostKey"):
            return HOSTKEY_BODY_MAX
        if req.user is None:
            self.accounts.authenticate(req)
        return self.config.max_decompressed

    def _decode_legacy(self, req, content_type, body):
        """Legacy forms carry the key as a field: Anki 2.0 to 2.1.26 and AnkiDroid send it
        before `data`, and it is checked as soon as it is read; the Rust clients (2.1.28+
        for the collection, 2.1.22+ for media) send it after `data`, which then waits in
        memory (UNAUTHENTICATED_HOLD), and goes on to disk only from an address that
        showed a valid key lately."""
        match = re.search(r'boundary="?([^";]+)"?', content_type, re.IGNORECASE)
        login = (req.area, req.method) == ("sync", "hostKey")

        def on_field(name, value):
            if name in ("k", "sk") and value and not login and req.user is None:
                req.hkey = value
                self.accounts.authenticate(req)
                raw.memory_max = SPOOL_MEMORY_MAX

        def may_spill():
            if req.user is None and not self.accounts.is_trusted(req.address):
                raise SyncError(403, "a form whose key comes after its data must come from an "
                                "address that synced lately: sync again")
        raw = Spool(self.spool_folder, HOSTKEY_BODY_MAX if login else self.config.max_payload,
                    "request body", SPOOL_MEMORY_MAX if self.accounts.is_trusted(req.address)
                    else UNAUTHENTICATED_HOLD, may_spill)
        try:
            fields = MultipartParser(body.read, match.group(1) if match else "", raw,
                                     on_field).parse()
            req.hkey = fields.get("k") or fields.get("sk") or ""
            req.skey = fields.get("s") or ""
            req.client_version = fields.get("v") or ""
            limit = self.payload_limit(req)
            if fields.get("c", "0") != "0" and raw.size:
                req.payload = Spool(self.spool_folder, limit, "decompressed body")
                with raw.reader() as compressed:
                    try:
                        gunzip_stream(compressed.read, req.payload.write, limit)
                    except SyncError as e:
                        raise over_limit(req, limit) if e.status == 413 else e
            else:
                req.payload, raw = raw, None
        finally:
            if raw is not None:
                raw.close()


# ---------------------------------------------------------------------------
# Collection store
#   One schema-11 SQLite file per user, replaced atomically; uploads are checked
#   and converted first (appendix B), new collections made as Anki makes them
#   (appendix C). The data folder's own safety: private modes, one server at a time.
# ---------------------------------------------------------------------------

class Collection:
    """One user's collection file and the connection that reads and writes it.

    Beside it may lie the schema-18 file a modern client uploaded, kept in step until
    the next normal sync: modern clients that download it then skip upgrading a
    schema-11 file, the slowest part of their full download.
    """

    def __init__(self, folder):
        self.folder = folder
        self.path = os.path.join(folder, "collection.anki2")
        self.schema18_path = os.path.join(folder, "collection.schema18.anki2")
        self.conn = None
        self.inode = None           # of the file `conn` has open
        self.ours = False           # the file is known to be schema 11: no need to look
        self.readers = {}           # inode -> downloads sending that file now
        self.readers_lock = threading.Lock()

    def open(self):
        if self.conn is not None and self.replaced():
            self.close()        # deleted (`deluser --delete-data`) or restored: afresh
        if self.conn is None:
            if os.path.exists(self.path) and not self.ours and not self.readable():
                self.set_aside("it cannot be read as a collection")
            if not os.path.exists(self.path) or os.path.getsize(self.path) == 0:
                # Empty, as SQLite would read a 0-byte file: the next device uploads.
                os.makedirs(self.folder, mode=0o700, exist_ok=True)
                create_collection(self.path)
            elif not self.ours:
                self._adopt_foreign_file()
            self.ours = True
            self.conn = connect_collection(self.path)
            self.inode = os.stat(self.path).st_ino
        return self.conn

    def replaced(self):
        """True when the file is no longer the one open: a command restored another."""
        try:
            return self.conn is not None and os.stat(self.path).st_ino != self.inode
        except FileNotFoundError:
            return True

    def close(self):
        if self.conn is not None:
            try:
                self.conn.rollback()
            except sqlite3.Error:
                pass
            self.conn.close()
            self.conn = None

    def readable(self):
        """False for a file SQLite cannot read, or one that fails its quick check."""
        if os.path.getsize(self.path) == 0:
            return True
        with open(self.path, "rb") as f:
            if f.read(len(SQLITE_MAGIC)) != SQLITE_MAGIC:
                return False
        probe = connect_collection(self.path)
        try:
            probe.execute("select ver from col").fetchone()
            return probe.execute("pragma quick_check(1)").fetchall() == [("ok",)]
        except sqlite3.DatabaseError as e:
            if out_of_space(e) or "locked" in str(e):
                raise
            return False
        finally:
            probe.close()

    def set_aside(self, why):
        """A damaged collection moves out of the way, never deleted, and an empty one
        takes its place: the next device to sync is asked for a full sync, and one that
        has the notes uploads them."""
        self.close()
        aside = "%s.damaged-%s" % (self.path, time.strftime("%Y%m%d-%H%M%S"))
        for suffix in ("", "-wal", "-shm", "-journal"):
            if os.path.exists(self.path + suffix):
                os.replace(self.path + suffix, aside + suffix)
        self.drop_schema18()
        self.ours = False
        fsync_path(self.folder)
        log.error("%s is damaged (%s): moved to %s; the next device to sync will be asked "
                  "for a full sync", self.path, why, aside)

    def _adopt_foreign_file(self):
        """A schema-18 file (moved over from the official server) becomes schema 11 once."""
        probe = connect_collection(self.path)
        try:
            version = probe.execute("select ver from col").fetchone()[0]
        except (sqlite3.DatabaseError, TypeError):
            probe.close()
            raise SyncError(500, "the stored collection of this user cannot be read")
        if version == 11:
            probe.close()
            return
        temp = self.path + TEMP_CONVERT
        target = connect_collection(temp)
        try:
            probe.backup(target)    # takes what is still in a -wal file along
        finally:
            target.close()
            probe.close()
        try:
            prepare_collection_file(temp)
        except CorruptCollection as e:
            os.unlink(temp)
            raise SyncError(500, "cannot convert the stored schema-%s collection: %s"
                            % (version, e.reason))
        os.replace(temp, self.path)
        remove_side_files(self.path)
        fsync_path(self.folder)
        log.info("converted %s from schema %s to 11", self.path, version)

    def replace_with(self, new_path, schema18_path=None):
        """Atomically put an already prepared file in place of the collection."""
        self.close()
        self.ours = True
        self.drop_schema18()
        os.replace(new_path, self.path)
        remove_side_files(self.path)
        if schema18_path:
            os.replace(schema18_path, self.schema18_path)
        fsync_path(self.folder)

    def drop_schema18(self):
        """The collection changed: the schema-18 copy no longer matches it."""
        if os.path.exists(self.schema18_path):
            os.unlink(self.schema18_path)
            remove_side_files(self.schema18_path)

    def bump_for_download(self, modern):
        """A full download raises usn (and mod); returns the file to send.

        The schema-18 copy gets the same change, or is dropped if out of step.
        """
        now = now_ms()
        self.detach_readers(self.path)
        conn = self.open()
        before = conn.execute("select mod, scm, usn from col").fetchone()
        conn.execute("update col set usn=usn+1, mod=?", (now,))
        conn.execute("pragma journal_mode=delete")
        if not os.path.exists(self.schema18_path):
            return self.path
        self.detach_readers(self.schema18_path)
        try:
            copy = connect_collection(self.schema18_path)
            try:
                in_step = copy.execute("select mod, scm, usn from col").fetchone() == before
                if in_step:
                    copy.execute("update col set usn=usn+1, mod=?", (now,))
            finally:
                copy.close()
        except sqlite3.Error:
            in_step = False
        if not in_step:
            self.drop_schema18()
            return self.path
        return self.schema18_path if modern else self.path

    def size(self):
        try:
            return os.path.getsize(self.path)
        except OSError:
            return 0

    # -- downloads read the file itself, not a copy -----------------------

    def reader(self, path):
        """`path` opened for a download, as it is now, for as long as the download takes."""
        return CollectionReader(path, self)

    def detach_readers(self, path):
        """Before `path` is written in place: downloads still reading it keep that file,
        and writing goes on in a copy. Only a sync that meets a slow download pays
        for one; downloads themselves never need room for a second collection."""
        try:
            inode = os.stat(path).st_ino
        except OSError:
            return
        with self.readers_lock:
            if not self.readers.get(inode):
                return
        if path == self.path:
            self.close()
        fd, temp = tempfile.mkstemp(prefix=TEMP_COPY, dir=self.folder)
        os.close(fd)
        try:
            shutil.copyfile(path, temp)
            fsync_path(temp)
            os.replace(temp, path)
        except BaseException:
            os.unlink(temp)
            raise
        fsync_path(self.folder)


class CollectionReader:
    """An open collection file that a download is sending, counted by its inode."""

    def __init__(self, path, collection):
        self.file = open(path, "rb")
        self.collection = collection
        self.inode = os.fstat(self.file.fileno()).st_ino
        with collection.readers_lock:
            collection.readers[self.inode] = collection.readers.get(self.inode, 0) + 1

    def read(self, size=-1):
        return self.file.read(size)

    def fileno(self):
        return self.file.fileno()

    def close(self):
        if self.file is None:
            return
        self.file.close()
        self.file = None
        readers = self.collection.readers
        with self.collection.readers_lock:
            readers[self.inode] -= 1
            if not readers[self.inode]:
                del readers[self.inode]


# --- unicase collation ----------------------------------------------------------------
def unicase_collate(a, b):
    """The `unicase` collation of schema-18 tables: full case folding, then
    code points. Register it before the first statement on every connection."""
    a, b = a.casefold(), b.casefold()
    return (a > b) - (a < b)


def create_collection(path):
    """Write a brand-new schema-11 collection at `path`, atomically: a reader
    sees either nothing or the complete file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, temp = tempfile.mkstemp(prefix=TEMP_NEW_COLLECTION, suffix=".tmp",
                                dir=folder)
    os.close(fd)  # SQLite treats the empty file as a new database
    try:
        _write_new_collection(temp, time.time())
        fsync_path(temp)
        os.replace(temp, path)
    except BaseException:
        for leftover in (temp, temp + "-journal"):
            if os.path.exists(leftover):
                os.unlink(leftover)
        raise
    fsync_path(folder)


def connect_collection(path):
    """An sqlite3 connection set up the way every collection is opened here."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=LOCK_WAIT)
    conn.create_collation("unicase", unicase_collate)
    try:
        # An uploaded file is untrusted: its schema may not run functions behind our back.
        conn.execute("pragma trusted_schema=off")
    except sqlite3.Error:
        pass
    return conn


def integrity_check(path):
    """True if SQLite finds the file whole."""
    conn = connect_collection(path)
    try:
        return conn.execute("pragma integrity_check").fetchall() == [("ok",)]
    except sqlite3.DatabaseError:
        return False
    finally:
        conn.close()


def sqlite_version_of(conn):
    try:
        rows = conn.execute("select ver from col").fetchall()
    except sqlite3.DatabaseError:
        raise CorruptCollection(UPLOAD_CORRUPT)
    if len(rows) != 1:
        raise CorruptCollection(UPLOAD_CORRUPT)
    return rows[0][0]


def prepare_collection_file(path, schema18_copy=None):
    """Check an uploaded SQLite file and leave it as a schema-11, DELETE-mode collection.

    A schema-18 upload is first copied to `schema18_copy`, when given. Raises
    CorruptCollection with the sentence the client shows to its user.
    """
    with open(path, "rb") as f:
        if f.read(len(SQLITE_MAGIC)) != SQLITE_MAGIC:
            raise CorruptCollection(UPLOAD_CORRUPT)
    conn = connect_collection(path)
    try:
        # SQLite's integrity check and check_tables each read the whole file: they run side
        # by side, each on its own connection, and an upload waits for the longer one only.
        with ThreadPoolExecutor(max_workers=1) as pool:
            integrity = pool.submit(integrity_check, path)
            try:
                version = sqlite_version_of(conn)
                if version == 11:
                    check_schema11(conn)
                if version in (11, 18):         # both keep the tables a sync reads alike
                    check_tables(conn)
            finally:
                intact = integrity.result()
        if not intact:
            raise CorruptCollection(UPLOAD_CORRUPT)
        if version == 18:
            if schema18_copy:
                conn.execute("pragma wal_checkpoint(truncate)")     # all of it in the file
                shutil.copyfile(path, schema18_copy)
            downgrade_to_schema11(conn)
        elif version == 11:
            pass                        # checked above
        elif isinstance(version, int) and 14 <= version <= 17:
            raise CorruptCollection(
                "Collection schema %d is not accepted by this sync server: please update "
                "Anki, or use Check Database and sync again." % version)
        else:
            raise CorruptCollection(
                "Unsupported collection version %s: please update the sync server." % (version,))
        conn.execute("pragma journal_mode=delete")
    except (sqlite3.DatabaseError, UnicodeDecodeError):     # text in `col` not UTF-8
        raise CorruptCollection(UPLOAD_CORRUPT)
    finally:
        conn.close()
    remove_side_files(path)


SCHEMA11_COLUMNS = {}       # table -> its columns, as SCHEMA11_DDL makes them (filled once)


def check_tables(conn):
    """Every table a sync reads, with every column, and no value a sync could not send:
    a file can pass SQLite's integrity check with a table dropped, bytes where Anki
    keeps numbers and text, or text that is not UTF-8, and would then fail every sync
    after it."""
    if not SCHEMA11_COLUMNS:
        model = sqlite3.connect(":memory:")
        model.executescript(SCHEMA11_DDL)
        for (table,) in model.execute("select name from sqlite_master where type='table'"):
            SCHEMA11_COLUMNS[table] = [(r[1], r[2].lower()) for r in model.execute(
                "pragma table_info(%s)" % table)]
        model.close()
    for table, typed in SCHEMA11_COLUMNS.items():
        columns = [name for name, _ in typed]
        present = {row[1] for row in conn.execute('pragma table_info("%s")' % table)}
        missing = [column for column in columns if column not in present]
        if missing:
            log.info("upload refused: %s lacks %s", table, ", ".join(missing))
            raise CorruptCollection(UPLOAD_CORRUPT)
        # max(a, b, ...) is null when one of them is, and at least x'' when one is a blob
        # (blobs sort after everything): one comparison a row, not one per column.
        odd = "coalesce(max(%s) >= x'', 1)" % ", ".join('"%s"' % column for column in columns)
        if conn.execute("select 1 from %s where %s limit 1" % (table, odd)).fetchone():
            log.info("upload refused: %s holds a blob or a null", table)
            raise CorruptCollection(UPLOAD_CORRUPT)
        text = [name for name, kind in typed if kind == "text"] + \
            (["sfld"] if table == "notes" else [])     # text in an integer column, mostly
        if text:
            check_utf8(conn, table, text)


def check_utf8(conn, table, columns):
    """Text a sync would fail to read: SQLite keeps whatever bytes it was given. Each row's
    text is read as one value (a line break between columns, so that no two broken halves
    make a whole) and sqlite3 decodes it in C, failing on the first row that is not UTF-8."""
    joined = " || char(10) || ".join('"%s"' % column for column in columns)
    try:
        for _ in conn.execute("select %s from %s" % (joined, table)):
            pass
    except sqlite3.OperationalError:        # "Could not decode to UTF-8 column ..."
        log.info("upload refused: %s holds text that is not UTF-8", table)
        raise CorruptCollection(UPLOAD_CORRUPT)


def fsync_path(path):
    """Make a written file, or a rename inside a folder, survive a power cut."""
    folder = os.path.isdir(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if folder:
            return      # Windows cannot open a folder; its renames are durable anyway
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not folder:
            raise
    finally:
        os.close(fd)


def free_space(folder):
    """Bytes free to this process in `folder` (or the nearest folder that exists)."""
    while folder and not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    try:
        return shutil.disk_usage(folder or ".").free
    except OSError:
        return 0


def remove_side_files(path):
    for suffix in ("-wal", "-shm", "-journal"):
        try:
            os.unlink(path + suffix)
        except FileNotFoundError:
            pass


def private_modes(folder):
    """The data folder 0700 and all in it 0600 or 0700: host keys, collections and
    media are the users' own, and an old umask or a copy may have left them open."""
    for root, _, files in os.walk(folder):
        for path, mode in [(root, 0o700)] + [(os.path.join(root, f), 0o600) for f in files]:
            try:
                status = os.lstat(path)
                if status.st_mode & 0o077 and not stat.S_ISLNK(status.st_mode):
                    os.chmod(path, mode)
            except OSError as e:
                log.warning("cannot make %s private: %s", path, e)


def check_writable(folder):
    """A data folder this process can write, or a CLI error saying how to get one."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise SystemExit("ankisync: the data folder %s is a file: set `data` in the ini (or "
                         "SYNC_BASE) to a folder" % folder)
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
        auth = os.path.join(folder, "auth.db")
        if os.path.exists(auth) and not os.access(auth, os.W_OK):
            raise PermissionError(errno.EACCES, "read-only", auth)
    except OSError as e:
        raise SystemExit("ankisync: %s" % unwritable(e.filename or folder, e))


def unwritable(path, error):
    """One line on a file or folder this process may not write, with the fix."""
    where = path
    while where and not os.path.exists(where):
        where = os.path.dirname(where)
    try:
        owner = os.stat(where).st_uid
    except OSError:
        owner = None
    me = os.getuid() if hasattr(os, "getuid") else None
    reason = getattr(error, "strerror", None) or str(error)
    if in_container():
        # The paths here are the container's: the fix is on the host, or in the ini.
        inside = os.path.abspath(path) + os.sep
        if not inside.startswith(CONTAINER_DATA + os.sep) and os.path.isdir(CONTAINER_DATA):
            return ("cannot write %s (%s): that folder is inside the container, not in its "
                    "volume: set `data = %s` in the ini you mounted (or SYNC_BASE=%s)"
                    % (path, reason, CONTAINER_DATA, CONTAINER_DATA))
        if owner is not None and me is not None and owner != me:
            return ("cannot write %s (%s): it belongs to uid %d and the container runs as uid "
                    "%d: on the host, `chown -R %d` the folder you mounted at %s, or start the "
                    "container with `--user` that folder's owner" % (path, reason, owner, me, me,
                                                                       CONTAINER_DATA))
    if owner is not None and me is not None and owner != me:
        return ("cannot write %s (%s): it belongs to uid %d and ankisync runs as uid %d: "
                "`chown -R %d %s`, or set another data folder" % (path, reason, owner, me, me,
                                                                  where))
    return ("cannot write %s (%s): make it writable (chmod u+w), or set another data folder"
            % (path, reason))


def try_lock_file(file):
    """An exclusive lock on an open file, if no other process holds one; True if taken."""
    try:
        if os.name == "nt":
            import msvcrt
            file.seek(0)
            msvcrt.locking(file.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def unlock_file(file):
    if os.name == "nt":
        import msvcrt
        file.seek(0)
        msvcrt.locking(file.fileno(), msvcrt.LK_UNLCK, 1)
    else:
        import fcntl
        fcntl.flock(file.fileno(), fcntl.LOCK_UN)


class FolderLock:
    """A lock shared with other processes: the server's sync methods and the commands
    that change a user's folder (backup, restore, import) take it. Its file is open only
    while held: thousands of users must not each keep one open. Taken again by its holder
    it only counts: a sync session keeps it from `start` to its end, so that a command
    never reads a collection between two requests of a sync (SQLite would make each wait
    for the other's file lock, and the device's sync would fail)."""

    def __init__(self, path):
        self.path = path
        self.file = None
        self.holds = 0

    def acquire(self, timeout):
        if self.file is not None:
            self.holds += 1
            return True
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        self.file = open(self.path, "a+")
        deadline = time.monotonic() + timeout
        while not try_lock_file(self.file):
            if time.monotonic() > deadline:
                self.file.close()
                self.file = None
                return False
            time.sleep(LOCK_POLL)
        self.holds = 1
        return True

    def release(self):
        if self.file is None:
            return
        self.holds -= 1
        if self.holds == 0:
            unlock_file(self.file)
            self.file.close()
            self.file = None


class DataFolderLock:
    """One server per data folder: two would each keep their own view of a collection.
    The lock lives as long as the open file; the file tells who holds it."""

    def __init__(self, folder):
        self.path = os.path.join(folder, ".serve.lock")
        self.file = open(self.path, "a+")
        if not try_lock_file(self.file):
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise SystemExit("ankisync: %s already serves %s: stop it first, or give this one "
                             "another data folder" % (holder, folder))
        self.file.seek(0)
        self.file.truncate()
        self.file.write("ankisync (pid %d)" % os.getpid())
        self.file.flush()

    def close(self):
        self.file.close()


# ---------------------------------------------------------------------------
# Collection sync
#   One method per wire name, in the order a sync calls them: `hostKey` (the login,
#   in Accounts), then CollectionSync's `meta`, `start` ... `finish`, `upload` and
#   `download`. A normal sync is one SQLite transaction, begun at `start` and
#   committed at `finish`; anything else rolls it back.
# ---------------------------------------------------------------------------

class Accounts:
    """Who may sync: `hostKey` logins, the host keys they hand out, and the addresses that
    showed a valid key or password lately."""

    def __init__(self, users, shared=lambda address: False):
        self.users = users
        self.guard = LoginGuard(shared)
        self.trusted = {}               # address -> when its last valid key stops counting
        self.trusted_lock = threading.Lock()

    def hostKey(self, req):
        """A user name and password in, the user's host key out."""
        data = req.json()
        name, password = data.get("u"), data.get("p")
        if not isinstance(name, str) or not isinstance(password, str):
            raise bad_request("hostKey needs a user name `u` and a password `p`")
        name = name.strip()
        hkey = self.check_password(req.address, name, password)
        req.user = self.users.canonical(name)
        return Reply.json({"key": hkey})

    def check_password(self, address, name, password):
        """The host key for a right name and password, else a 403; throttled by one
        LoginGuard, so a sync login and a page's login count as the same guesses."""
        with self.guard.turn(address, name):
            hkey = self.users.login(name, password)
        if hkey is None:
            self.guard.failed(address, name)
            log.warning("login failed: %r from %s: %s", name[:QUOTED_MAX], address,
                        "wrong password" if self.users.exists(name) else "no such user")
            raise SyncError(403, "wrong user name or password")
        self.guard.succeeded(address, name)
        self.trust(address)
        return hkey

    def check_admin(self, address, token, phc):
        """The admin page's token against its hash, or a 403: through the same LoginGuard,
        so guessing it is paced as guessing a password is."""
        with self.guard.turn(address, ADMIN_GUARD_NAME):
            right = verify_password(token, phc)
        if not right:
            self.guard.failed(address, ADMIN_GUARD_NAME)
            log.warning("admin login failed from %s: wrong token", address)
            raise SyncError(403, "wrong admin token")
        self.guard.succeeded(address, ADMIN_GUARD_NAME)

    def authenticate(self, req):
        """Sets req.user from its host key, or refuses: before any of the body is read."""
        req.user = self.users.user_for_key(req.hkey)
        if req.user is None:
            raise SyncError(403, "unknown sync key: log in again")
        self.trust(req.address)

    def trust(self, address):
        """`address` showed a valid key or password: it may send forms whose key comes last."""
        with self.trusted_lock:
            _bounded(self.trusted, address, time.monotonic() + TRUSTED_ADDRESS_SECONDS)

    def is_trusted(self, address):
        return self.trusted.get(address, 0) > time.monotonic()


def moved_address(moved_to):
    """The `moved_to` option as clients are sent there: ending in a slash, or empty."""
    moved = moved_to.strip()
    return moved + "/" * (bool(moved) and not moved.endswith("/"))


def notice_for(notice, version):
    """The admin's notice as a client of `version` shows it: modern clients render
    `msg` as HTML, so what the admin wrote is escaped, its web addresses linked and its
    line breaks kept; older ones print it as it is."""
    if not notice or version < SyncVersion.V11_DIRECT_POST:
        return notice
    return WEB_ADDRESS.sub(lambda m: '<a href="%s">%s</a>' % (m.group(0), m.group(0)),
                           html.escape(notice, quote=True)).replace("\n", "<br>")


def old_client_refusal(version, conf):
    """Why a client of sync `version` must not sync a collection with this `conf`, or "".

    The official server's rules (rslib sync/collection/meta.rs; docs/protocol.md 1.3): the
    v2 scheduler needs version 9, the new timezone handling (a creationOffset) version 10."""
    if version >= SyncVersion.V10_V2_TIMEZONE:
        return ""                       # every meta of a modern client: no conf to parse
    try:
        conf = json.loads(conf)
    except ValueError:
        conf = None
    if not isinstance(conf, dict):
        conf = {}
    if conf.get("schedVer", 1) != 1 and version < SyncVersion.V09_V2_SCHEDULER:
        return OLD_SCHEDULER_CLIENT
    if conf.get("creationOffset") is not None and version < SyncVersion.V10_V2_TIMEZONE:
        return OLD_TIMEZONE_CLIENT
    return ""


# The GIL is one per process, and so is this: requests past COMPUTING_MAX wait for a
# turn to compute instead of all taking turns at the GIL, where each of SQLite's steps
# is a switch (32 users syncing at once: 0.68 s all computing, 0.43 s two at a time).
COMPUTING = threading.BoundedSemaphore(COMPUTING_MAX)


class UserLock:
    """A user's lock with a deadline: a request that waits too long gets 409. The thread
    lock orders this server's requests, the folder lock a command's (restore) among them;
    last comes a turn to compute, taken only with the user's locks held, so no holder of
    a turn ever waits for another lock."""

    def __init__(self, lock, reason, folder_lock, compute=True):
        self.lock = lock
        self.reason = reason
        self.folder_lock = folder_lock
        self.compute = compute

    def __enter__(self):
        deadline = time.monotonic() + LOCK_WAIT
        if not self.lock.acquire(timeout=LOCK_WAIT):
            raise SyncError(409, self.reason)
        try:
            if not self.folder_lock.acquire(max(0, deadline - time.monotonic())):
                raise SyncError(409, "a command is changing this user's data: sync again")
            if self.compute and not COMPUTING.acquire(
                    timeout=max(0, deadline - time.monotonic())):
                self.folder_lock.release()
                raise SyncError(503, "the server is too busy: sync again in a minute",
                                retry_after=60)
        except BaseException:
            self.lock.release()
            raise
        return self

    def __exit__(self, *exc):
        if self.compute:
            COMPUTING.release()
        self.folder_lock.release()
        self.lock.release()


class CollectionSync:
    """One user's collection: the protocol methods and the sync session between them
    (docs/protocol.md 4)."""

    def __init__(self, folder, media, config, busy, later):
        self.folder = folder
        self.busy = busy                # True while other requests are being answered
        self.later = later              # runs a job after the answer has gone
        self.config = config            # its notice is read at each meta: the admin page sets it
        self.moved_to = moved_address(config.moved_to)
        self.media = media              # the user's MediaStore: meta tells its usn
        self.max_decompressed = config.max_decompressed
        self.quota = config.quota_collection_mb * MIB
        # Modern clients show only the status of a refused request: the reason goes out
        # with the next `meta`, whose message every client shows.
        self.refusal = ""
        self.collection = Collection(folder)
        self.points = RestorePoints(folder, config)
        self.full_sync_notice = FullSyncNotice(folder)
        self.session = None
        self.used = time.monotonic()    # the last request's time: files close when idle
        self.clients = {}               # host key -> the client version its last meta named
        self.lock = threading.Lock()
        self.folder_lock = FolderLock(os.path.join(folder, COLLECTION_LOCK))

    def locked(self, compute=True):
        return UserLock(self.lock, "another device of this user is syncing the collection",
                        self.folder_lock, compute)

    def handle(self, req):
        kind = COLLECTION_METHODS.get(req.method)
        if kind not in ("alone", "session", "upload"):
            raise SyncError(404, "unknown sync method %r" % req.method[:QUOTED_MAX])
        self.used = time.monotonic()
        method = getattr(self, req.method)      # each method is named as on the wire
        if kind == "upload":
            return method(req)          # locks only around the swap: checking takes a while
        with self.locked():
            try:
                if kind == "session":
                    return self.stateful(req, method)
                return method(req)
            except sqlite3.DatabaseError as e:
                if out_of_space(e) or self.collection.readable():
                    raise
                self.collection.set_aside(str(e))
                raise SyncError(503, "the server's copy of this collection was damaged and "
                                "has been set aside: sync again to upload yours")

    # -- session bookkeeping --------------------------------------------

    def begin_session(self, session):
        self.folder_lock.acquire(0)     # this request holds it: now kept until the end
        self.session = session

    def end_session(self):
        self.session = None
        self.folder_lock.release()

    def abort_session(self):
        if self.session is not None:
            self.session.rollback()
            self.end_session()

    def expire_idle(self, timeout):
        """Roll back a session whose device went quiet, and close the files of a user who
        has not synced for USER_IDLE: with thousands of users, open files run out.
        Called by the housekeeping thread; the next request opens them again."""
        if not self.lock.acquire(blocking=False):
            return
        try:
            now = time.monotonic()
            if self.session is not None and now - self.session.touched > timeout:
                log.info("%s: sync session idle for %d s, rolled back", self.folder, timeout)
                self.abort_session()
            if self.session is None and now - self.used > USER_IDLE:
                self.collection.close()
        finally:
            self.lock.release()

    def stateful(self, req, method):
        """Run a method of the sync session; any failure in it rolls the session back."""
        if not req.skey:
            raise bad_request("missing session key (s)")
        data = req.json()
        if req.method != "start":
            if self.session is None:
                raise SyncError(409, "no sync in progress: the sync was cancelled or timed out")
            if self.session.skey != req.skey:
                raise SyncError(409, "another device started a sync of this collection")
            if self.collection.replaced():
                self.abort_session()
                raise SyncError(409, "the collection was restored meanwhile: sync again")
        try:
            if req.method != "start":
                self.session.settle()
            result = method(data, req)
        except BaseException:
            # A client's mistake (SyncError 4xx) or a fault of ours (5xx, with its
            # traceback in the log): either way the session is gone.
            self.abort_session()
            raise
        if self.session is not None:
            self.session.touched = time.monotonic()
        return Reply.json(result)

    # -- the methods, by their wire names -------------------------------

    def check_quota(self, size, before):
        """A change that leaves the collection over the quota, and bigger than `before`,
        is refused; one that makes it smaller passes, so a user over a lowered quota gets
        under it by deleting notes."""
        if self.quota and size > self.quota and size > before:
            self.refusal = QUOTA_REFUSAL % ("collection", size / MIB, self.quota // MIB)
            raise SyncError(413, self.refusal)

    @staticmethod
    def used_bytes(conn):
        """What the collection's rows take: its pages less the free ones deletions left
        (SQLite keeps the file's size until a vacuum)."""
        pages, free, page = (conn.execute("pragma %s" % p).fetchone()[0]
                             for p in ("page_count", "freelist_count", "page_size"))
        return (pages - free) * page

    def client_of(self, req):
        """The client's name and version: modern clients send it with every request,
        older ones only in `meta`."""
        return req.client_version or self.clients.get(req.hkey, "") or "unknown client"

    def meta(self, req):
        version = SyncVersion.check(req.json().get("v"))
        if len(self.clients) >= KEY_CACHE_MAX:
            self.clients.clear()
        self.clients[req.hkey] = str(req.json().get("cv") or req.client_version)[:QUOTED_MAX]
        if self.moved_to:
            if req.modern:      # the official redirect: the client follows and remembers it
                raise SyncError(308, "this server has moved to %s" % self.moved_to,
                                location=self.moved_to)
            return Reply.json({
                "mod": 0, "scm": 0, "usn": 0, "ts": int(time.time()), "cont": False,
                "msg": "This sync server has moved to %s: change the sync address on this "
                       "device (see %s for what to enter)." % (self.moved_to, self.moved_to),
                "hostNum": 0, "empty": False, "media_usn": 0, "uname": req.user})
        self.abort_session()
        conn = self.collection.open()
        mod, scm, usn, conf = conn.execute("select mod, scm, usn, conf from col").fetchone()
        empty = conn.execute("select 1 from cards limit 1").fetchone() is None
        told = self.full_sync_notice.message(scm, self.client_of(req), req.hkey)
        if self.collection.size() > self.max_decompressed:
            # Too big to upload again: a moving scm makes clients offer a one-way sync.
            scm = now_ms()
        # An empty collection is about to be replaced by the device's own: nothing to damage.
        refusal = "" if empty else old_client_refusal(version, conf)
        if not refusal and (self.refusal or self.media.refusal):
            refusal = self.refusal or self.media.refusal        # told once; the next try runs
            self.refusal = self.media.refusal = ""
        return Reply.json({
            "mod": mod, "scm": scm, "usn": usn, "ts": int(time.time()),
            "msg": refusal or notice_for("\n\n".join(filter(None, (told, self.config.notice))),
                                         version),
            "cont": not refusal,
            "hostNum": 0, "empty": empty,
            "media_usn": self.media.last_usn(),
            "uname": req.user,
        })

    def start(self, data, req):
        self.abort_session()
        self.collection.detach_readers(self.collection.path)
        conn = self.collection.open()
        self.quota_base = self.used_bytes(conn)     # finish refuses growth past the quota
        self.begin_session(SyncSession(req.skey, conn, data.get("minUsn") or 0,
                                       data.get("lnewer", False)))
        graves = self.session.pending_graves()
        if data.get("graves"):
            # AnkiDroid and old clients send all their deletions here instead of applyGraves.
            self.session.apply_graves(data["graves"])
        return graves

    def applyGraves(self, data, req):
        if data.get("chunk") is None:
            raise bad_request("applyGraves needs a `chunk` object")
        self.session.apply_graves(data["chunk"])
        return None

    def applyChanges(self, data, req):
        mine = self.session.pending_changes()
        self.session.apply_changes(data.get("changes"))
        return mine

    def chunk(self, data, req):
        return self.session.chunk()

    def applyChunk(self, data, req):
        self.session.apply_chunk(data.get("chunk"), overlap=not self.busy())
        return None

    def sanityCheck2(self, data, req):
        client = data.get("client")
        server = self.session.sanity_counts()
        ok = False
        if isinstance(client, list) and len(client) == len(SANITY_COUNTS) and server is not None:
            client = shaped(client, SANITY_COUNTS, "sanityCheck2: the client's counts")
            client = [[0, 0, 0]] + client[1:4] + [0] + client[5:]
            ok = client == server
        if not ok:
            self.session.rollback()
            self.session.failed = True
        return {"status": "ok" if ok else "bad", "c": client, "s": server}

    def finish(self, data, req):
        session = self.session
        if session.failed:
            raise bad_request("finish after a failed sanity check: the sync was rolled back")
        self.end_session()
        try:
            self.check_quota(self.used_bytes(session.conn), self.quota_base)
            finished = session.finish()
        except (sqlite3.Error, SyncError):
            session.rollback()
            raise
        self.collection.drop_schema18()
        if self.points.daily_due():
            self.later(self.keep_daily)
        return finished

    def keep_daily(self):
        """Today's first restore point, made after the answer: gzipping a big collection
        takes seconds no device should wait for. Under the user's lock, between syncs."""
        try:
            with self.locked(compute=False):        # seconds of gzip: no turn held
                if self.session is None and self.points.daily_due():
                    self.points.keep(self.collection.path, "daily")
        except SyncError as e:          # busy all along: the next sync's finish asks again
            log.info("%s: daily restore point put off: %s", self.folder, e.reason)

    def abort(self, req):
        self.abort_session()
        return Reply.json(None)

    def download(self, req):
        self.abort_session()
        stream = self.collection.reader(self.collection.bump_for_download(req.modern))
        self.full_sync_notice.downloaded(self.client_of(req), req.hkey)
        return Reply(stream=stream, size=os.fstat(stream.fileno()).st_size)

    def upload(self, req):
        with self.locked():
            self.abort_session()
        if req.payload.size >= self.max_decompressed:
            raise SyncError(413, UPLOAD_TOO_LARGE)
        os.makedirs(self.folder, mode=0o700, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=TEMP_UPLOAD, suffix=".anki2", dir=self.folder)
        os.close(fd)
        # Kept for modern downloads only while it costs little of the disk.
        keep18 = free_space(self.folder) > SCHEMA18_KEEP_FREE * req.payload.size
        schema18 = temp + ".schema18"
        try:
            req.payload.save_as(temp)
            prepare_collection_file(temp, schema18 if keep18 else None)
            self.check_quota(os.path.getsize(temp), self.collection.size())
            with self.locked():
                self.abort_session()
                self.collection.close()
                self.points.keep_replaced(self.collection.path, "upload",
                                          "before a full upload from %s" % req.address)
                self.full_sync_notice.end()
                self.collection.replace_with(temp, schema18 if os.path.exists(schema18) else None)
        except CorruptCollection as e:
            # A status, not the official 200 with a sentence: proxies, logs and scripts see
            # the refusal, and modern clients answer it with "use Check Database", the
            # same advice.
            log.info("%s: upload refused: %s", req.user, e.reason)
            raise
        finally:
            for path in (temp, schema18) + tuple(temp + s for s in ("-wal", "-shm", "-journal")):
                if os.path.exists(path):
                    os.unlink(path)
        return Reply.text("OK")


class SyncSession:
    """One device's normal sync in progress: its keys, usns and open transaction."""

    def __init__(self, skey, conn, client_usn, client_is_newer):
        self.skey = skey
        self.conn = conn
        self.client_usn = client_usn
        self.client_is_newer = client_is_newer
        self.chunk_ids = None           # server rows still to send, filled by the first `chunk`
        self.server_changed = {}        # table -> whether the server has rows to send there
        self.writer = None              # the thread storing the last applyChunk's rows
        self.write_error = None         # what went wrong there
        self.failed = False             # a bad sanity check rolled the transaction back
        self.touched = time.monotonic()
        conn.execute("begin immediate")
        self.server_usn = conn.execute("select usn from col").fetchone()[0]
        self.objects = CollectionObjects(conn)

    def rollback(self):
        try:
            self.settle()
        except Exception:
            pass            # rolled back either way
        try:
            if self.conn.in_transaction:
                self.conn.execute("rollback")
        except sqlite3.Error:
            pass

    # -- graves -----------------------------------------------------------

    def pending_graves(self):
        graves = {"cards": [], "notes": [], "decks": []}
        names = {0: "cards", 1: "notes", 2: "decks"}
        for oid, kind in self.conn.execute(
                "select oid, type from graves where usn >= ?", (self.client_usn,)):
            if kind in names:
                graves[names[kind]].append(oid)
        return graves

    def apply_graves(self, graves):
        usn = self.server_usn
        cards, notes, decks = (graves.get(key) or [] for key in ("cards", "notes", "decks"))
        if len(cards) + len(notes) + len(decks) > GRAVES_MAX:
            raise bad_request("more than %d deletions in one request" % GRAVES_MAX)
        self.conn.executemany("delete from cards where id=?", ((i,) for i in cards))
        self.conn.executemany("delete from notes where id=?", ((i,) for i in notes))
        for did in decks:
            if self.objects.decks.pop(str(did), None) is not None:
                self.objects.dirty.add("decks")
        self.conn.executemany(
            "insert into graves (usn, oid, type) values (?, ?, ?)",
            [(usn, i, 0) for i in cards] + [(usn, i, 1) for i in notes] +
            [(usn, i, 2) for i in decks])

    # -- notetypes, decks, deck configs, tags, config -----------------------

    def pending_changes(self):
        """The server's side of applyChanges, gathered before the client's is applied."""
        since = self.client_usn
        objects = self.objects

        def pending(mapping):
            return [obj for obj in mapping.values() if to_int(obj.get("usn", 0)) >= since]

        changes = {
            "models": pending(objects.models),
            "decks": [pending(objects.decks), pending(objects.dconf)],
            "tags": [tag for tag, usn in objects.tags.items() if to_int(usn) >= since],
        }
        if not self.client_is_newer:
            changes["conf"] = objects.conf
            changes["crt"] = objects.crt
        return changes

    def apply_changes(self, changes):
        """`changes` in the shape METHOD_SHAPES gives applyChanges."""
        if changes is None:
            raise bad_request("applyChanges needs a `changes` object")
        decks, dconfs = changes.get("decks") or ([], [])
        for model in changes.get("models") or []:
            self.merge_notetype(model)
        for deck in decks or []:
            self.merge_deck(deck)
        for dconf in dconfs or []:
            self.merge_deck_config(dconf)
        for tag in changes.get("tags") or []:
            self.add_tag(tag)
        if changes.get("crt") is not None:
            self.objects.crt = changes["crt"]
            self.objects.dirty.add("crt")
        if changes.get("conf") is not None:
            # Anki 2.1.28 - 2.1.35 send a v2 scheduler's config without `rollover`; the
            # official server stores its default with it (not for v1, which has none),
            # and devices must end with the same config.
            if to_int(changes["conf"].get("schedVer") or 1, "schedVer") >= 2:
                changes["conf"].setdefault("rollover", DEFAULT_ROLLOVER)
            self.objects.conf = changes["conf"]
            self.objects.dirty.add("conf")

    def _newer_than_stored(self, mapping, obj, what):
        oid = obj["id"] = to_int(obj.get("id"), "%s id" % what)
        obj["mod"] = obj.get("mod") or 0
        existing = mapping.get(str(oid))
        if existing is not None and to_int(existing.get("mod", 0)) > obj["mod"]:
            return None
        # Stamped with this sync's usn whatever the client wrote: a stale usn from a
        # client whose `meta` raced another device would hide the change from it.
        obj["usn"] = self.server_usn
        return existing if existing is not None else {}

    def _taken_names(self, mapping, oid):
        return {str(o.get("name", "")).casefold() for key, o in mapping.items() if key != str(oid)}

    def merge_notetype(self, model):
        existing = self._newer_than_stored(self.objects.models, model, "notetype")
        if existing is None:
            return
        for key in ("flds", "tmpls"):
            if not isinstance(model.get(key), list):
                raise bad_request("applyChanges: notetype %s has no %s list" % (model["id"], key))
        if existing and (len(existing.get("flds", [])) != len(model["flds"])
                         or len(existing.get("tmpls", [])) != len(model["tmpls"])):
            raise bad_request("notetype schema changed: notetype %s needs a full sync"
                              % model["id"])
        taken = self._taken_names(self.objects.models, model["id"])
        name = unique_name(str(model.get("name", "")), taken)
        if name != model.get("name"):
            model["name"], model["mod"] = name, int(time.time())
        self.objects.models[str(model["id"])] = model
        self.objects.dirty.add("models")

    def merge_deck(self, deck):
        if self._newer_than_stored(self.objects.decks, deck, "deck") is None:
            return
        name = normalize_deck_name(deck.get("name", ""))
        unique = unique_name(name, self._taken_names(self.objects.decks, deck["id"]))
        if unique != deck.get("name"):
            deck["name"] = unique
            if unique != name:
                deck["mod"] = int(time.time())
        self.objects.decks[str(deck["id"])] = deck
        self.objects.dirty.add("decks")

    def merge_deck_config(self, dconf):
        if self._newer_than_stored(self.objects.dconf, dconf, "deck config") is None:
            return
        self.objects.dconf[str(dconf["id"])] = dconf
        self.objects.dirty.add("dconf")

    def add_tag(self, tag):
        tag = normalize_tag(tag)
        if not tag:
            return
        tags = self.objects.tags
        if tag in tags or tag.casefold() in {t.casefold() for t in tags}:
            return
        tags[tag] = self.server_usn
        self.objects.dirty.add("tags")

    # -- rows: revlog, cards, notes -----------------------------------------

    REVLOG_COLUMNS = "id, cid, usn, ease, ivl, lastIvl, factor, time, type"
    CARD_COLUMNS = ("id, nid, did, ord, mod, usn, type, queue, due, ivl, factor, reps, "
                    "lapses, left, odue, odid, flags, data")
    NOTE_COLUMNS = "id, guid, mid, mod, usn, tags, flds, '', '', flags, data"

    def chunk(self):
        if self.chunk_ids is None:
            self.chunk_ids = [
                [r[0] for r in self.conn.execute(
                    "select id from %s where usn >= ?" % table, (self.client_usn,))]
                for table in ("revlog", "cards", "notes")]
            # Without server changes to those rows, the client's simply replace them.
            self.server_changed = {"cards": bool(self.chunk_ids[1]),
                                   "notes": bool(self.chunk_ids[2])}
        revlog_ids, card_ids, note_ids = self.chunk_ids
        taken = ([], [], [])
        count = 0
        # Round-robin over the three lists, as the official server picks them.
        while count < CHUNK_SIZE and (revlog_ids or card_ids or note_ids):
            for source, sink in ((revlog_ids, taken[0]), (note_ids, taken[2]),
                                 (card_ids, taken[1])):
                if source and count < CHUNK_SIZE:
                    sink.append(source.pop())
                    count += 1
        reply = {"done": not (revlog_ids or card_ids or note_ids)}
        for key, table, columns, ids in (("revlog", "revlog", self.REVLOG_COLUMNS, taken[0]),
                                         ("cards", "cards", self.CARD_COLUMNS, taken[1]),
                                         ("notes", "notes", self.NOTE_COLUMNS, taken[2])):
            if ids:
                reply[key] = [list(row) for row in self.conn.execute(
                    "select %s from %s where id in (%s)"
                    % (columns, table, ",".join("?" * len(ids))), ids)]
        return reply

    def apply_chunk(self, chunk, overlap=True):
        """`chunk` in the shape METHOD_SHAPES gives applyChunk: every row checked."""
        if chunk is None:
            raise bad_request("applyChunk needs a `chunk` object")
        revlog = [self.revlog_row(r) for r in chunk.get("revlog") or []]
        cards = [self.card_row(r) for r in chunk.get("cards") or []]
        notes = [self.note_row(r) for r in chunk.get("notes") or []]
        # On an idle server, checked rows are stored on a thread of their own, so SQLite
        # works while the client prepares its next chunk; the next request of the session
        # waits for it. When other requests are running the cores are taken: a thread per
        # chunk would only add switching (8 users at once: a third slower).
        self.settle()
        if not overlap:
            self.store_rows(revlog, cards, notes)
            return self.settle()
        self.writer = threading.Thread(target=self.store_rows, args=(revlog, cards, notes),
                                       name="ankisync-chunk", daemon=True)
        self.writer.start()

    def store_rows(self, revlog, cards, notes):
        try:
            if revlog:
                self.conn.executemany("insert or ignore into revlog values (?,?,?,?,?,?,?,?,?)",
                                      revlog)
            self.merge_rows("cards", cards, mod_index=4)
            self.merge_rows("notes", notes, mod_index=3)
        except Exception as e:          # handed to the request that settles the session
            self.write_error = e

    def settle(self):
        """Wait until the rows of the last applyChunk are stored; raise what failed there."""
        if self.writer is not None:
            self.writer.join()
            self.writer = None
        error, self.write_error = self.write_error, None
        if error is not None:
            raise error

    def merge_rows(self, table, rows, mod_index):
        """Insert new rows; replace stored ones unless changed here since and not older."""
        if not rows:
            return
        if not self.server_changed.get(table, True):
            self.conn.executemany("insert or replace into %s values (%s)"
                                  % (table, ",".join("?" * len(rows[0]))), rows)
            return
        ids = [row[0] for row in rows]
        stored = {}
        for start in range(0, len(ids), SQL_IDS_PER_QUERY):
            part = ids[start:start + SQL_IDS_PER_QUERY]
            for oid, mod, usn in self.conn.execute(
                    "select id, mod, usn from %s where id in (%s)"
                    % (table, ",".join("?" * len(part))),
                    part):
                stored[oid] = (mod, usn)
        keep = []
        for row in rows:
            old = stored.get(row[0])
            if old is not None and old[1] >= self.client_usn and old[0] >= row[mod_index]:
                continue
            keep.append(row)
        if keep:
            self.conn.executemany("insert or replace into %s values (%s)"
                                  % (table, ",".join("?" * len(keep[0]))), keep)

    def revlog_row(self, row):
        row[2] = self.server_usn
        return row

    def card_row(self, row):
        row[5] = self.server_usn
        data = row[17]
        row[17] = data if isinstance(data, str) else json.dumps(data)
        return row

    def note_row(self, row):
        nid, guid, mid, mod, _, tags, flds = row[:7]
        model = self.objects.models.get(str(mid))
        if model is None:
            raise bad_request("note %s uses notetype %s, which this collection does not have"
                              % (nid, mid))
        flds = FIELD_CONTROL.sub("", flds)
        fields = flds.split("\x1f")
        expected = max(1, len(model.get("flds") or []))
        if len(fields) != expected:
            raise bad_request("note %s has %d fields, its notetype %s has %d"
                              % (nid, len(fields), mid, expected))
        first = strip_html_keep_media(fields[0])
        sort_index = to_int(model.get("sortf", 0))
        if sort_index == 0:
            sort_field = first
        else:
            sort_field = strip_html_keep_media(fields[sort_index]) \
                if sort_index < len(fields) else ""
        return [nid, guid, mid, mod, self.server_usn, normalize_note_tags(tags), flds,
                sort_field, field_checksum(first), 0, ""]

    # -- the end ------------------------------------------------------------

    def sanity_counts(self):
        if self.has_unsynced():
            return None
        conn = self.conn
        def count(table):
            return conn.execute("select count() from %s" % table).fetchone()[0]
        return [[0, 0, 0], count("cards"), count("notes"), count("revlog"), 0,
                len(self.objects.models), len(self.objects.decks), len(self.objects.dconf)]

    def has_unsynced(self):
        """usn -1 anywhere means something of a client's slipped in unstamped."""
        for table in ("cards", "notes", "revlog", "graves"):
            if self.conn.execute("select 1 from %s where usn = -1 limit 1" % table).fetchone():
                return True
        objects = self.objects
        for mapping in (objects.models, objects.decks, objects.dconf):
            if any(to_int(o.get("usn", 0)) == -1 for o in mapping.values()):
                return True
        return any(to_int(usn) == -1 for usn in objects.tags.values())

    def finish(self):
        now = now_ms()
        self.objects.save(self.conn)
        self.conn.execute("update col set ls=?, mod=?, usn=usn+1", (now, now))
        self.conn.execute("commit")
        return now


class CollectionObjects:
    """The JSON columns of the `col` row, parsed once per sync session.

    Notetypes, decks, deck configs, tags and config change in memory and are
    written back just before the commit at `finish`.
    """

    COLUMNS = ("models", "decks", "dconf", "tags", "conf")

    def __init__(self, conn):
        row = conn.execute("select crt, models, decks, dconf, tags, conf from col").fetchone()
        self.crt = row[0]
        self.models, self.decks, self.dconf, self.tags, self.conf = (json.loads(v) for v in row[1:])
        self.dirty = set()

    def save(self, conn):
        for column in self.COLUMNS:
            if column in self.dirty:
                value = getattr(self, column)
                conn.execute("update col set %s=?" % column, (dumps_compact(value),))
        if "crt" in self.dirty:
            conn.execute("update col set crt=?", (self.crt,))
        self.dirty.clear()


def now_ms():
    return int(time.time() * 1000)


ASCII_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
FIELD_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1e\x7f]")   # keeps TAB, LF and the 0x1f separator
MEDIA_TAG = re.compile(
    r"""<(?:img|audio|video|object|source)\b[^>]*?\b(?:src|data)\s*=\s*"""
    r"""(?:"([^"]*)"|'([^']*)'|([^\s>]+))[^>]*>""", re.IGNORECASE | re.DOTALL)

# Comments, style and script blocks with their content, then any other tag: one pass.
HTML_MARKUP = re.compile(r"<!--.*?-->|<style\b.*?>.*?</style>|<script\b.*?>.*?</script>|<.*?>",
                         re.IGNORECASE | re.DOTALL)


def strip_html_keep_media(text):
    """The text Anki sorts and checksums a field by (docs/protocol.md appendix A)."""
    if "<" not in text and "&" not in text:
        return text
    if "<" in text:
        text = MEDIA_TAG.sub(lambda m: " %s " % next(g for g in m.groups() if g is not None), text)
        text = HTML_MARKUP.sub("", text)
    if "&" in text:
        text = html.unescape(text).replace("\xa0", " ")
    return text


def field_checksum(text):
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest()[:8], 16)


def normalize_name_component(part, fallback="blank"):
    part = ASCII_CONTROL.sub("", unicodedata.normalize("NFC", part)).strip().strip(":").strip()
    return part or fallback


def normalize_deck_name(name):
    return "::".join(normalize_name_component(p) for p in str(name).split("::"))


def normalize_tag(name):
    parts = []
    for part in unicodedata.normalize("NFC", str(name)).split("::"):
        part = re.sub(r"[\x00-\x20\x7f\u3000]", "", part)
        parts.append(part or "blank")
    tag = "::".join(parts)
    return "" if tag == "blank" else tag


def normalize_note_tags(tags):
    """" a b " with single spaces, or "" (U+3000 separates tags too)."""
    if len(tags) > 2 and tags[0] == tags[-1] == " " and "  " not in tags and "\u3000" not in tags:
        return tags         # already in shape, as from every client but 2.1.26
    names = tags.replace("\u3000", " ").split()
    return " %s " % " ".join(names) if names else ""


def unique_name(name, taken):
    """Anki's rule for a clash: append '+' until no other object has the name."""
    while name.casefold() in taken:
        name += "+"
    return name


# ---------------------------------------------------------------------------
# Media sync
#   media.db and media/ per user, laid out like the official server's. MediaSync
#   speaks the protocol; MediaStore keeps the books: the media usn rises by exactly
#   one per change, and deletions stay as entries.
# ---------------------------------------------------------------------------

class MediaSync:
    """One user's media methods, by their wire names (docs/protocol.md 6)."""

    def __init__(self, store, spool_folder, max_decompressed, quota=0, moved_to=""):
        self.store = store
        self.spool_folder = spool_folder
        self.max_decompressed = max_decompressed
        self.quota = quota                  # bytes of media files a user may have; 0: any
        self.moved_to = moved_to            # the new address, once the server has moved

    def handle(self, req):
        if req.method not in MEDIA_METHODS:
            raise SyncError(404, "unknown media method %r" % req.method[:QUOTED_MAX])
        if self.moved_to:
            # A modern client follows meta's 308 and remembers it, but the same run's media
            # sync still comes here (rslib keeps the run's endpoint; media requests follow
            # no redirect). Stored here, files would never reach the new server: refused,
            # the device's next sync goes to the new address for media too. 410, not 308:
            # for media, Anki 26.9 shows a 308 as "HttpError { code: 308 ... }", and a 410
            # as "HTTP status client error (410 <the status line's words>)".
            moved = "this sync server has moved to %s: sync again" % self.moved_to
            raise SyncError(410, moved, phrase=moved)
        method = getattr(self, req.method)      # each method is named as on the wire
        with UserLock(self.store.lock, "another device of this user is syncing media",
                      self.store.folder_lock):
            self.store.connect()        # media.db open, media/ made: uploads unpack into it
            return method(req)

    @staticmethod
    def wrapped(data):
        return Reply.json({"data": data, "err": ""})

    def begin(self, req):
        if not req.client_version:
            raise bad_request("msync/begin needs the client version (v)")
        # The host key doubles as the legacy media session key, as on the official server.
        return self.wrapped({"usn": self.store.usn(), "sk": req.hkey})

    def mediaChanges(self, req):
        since = req.json().get("lastUsn") or 0
        return self.wrapped([[name, usn, csum.hex() if size else ""]
                             for name, usn, csum, size in self.store.changes_since(since)])

    def mediaSanity(self, req):
        local = to_int(req.json().get("local"), "local")
        return self.wrapped("OK" if local == self.store.file_count() else "mediaSanity")

    def downloadFiles(self, req):
        names = req.json().get("files")
        if names is None:
            raise bad_request("downloadFiles needs a list of file names")
        if len(names) > MEDIA_DOWNLOAD_FILES_MAX:
            raise bad_request("downloadFiles: at most %d files per request"
                              % MEDIA_DOWNLOAD_FILES_MAX)
        stored = self.store.entries(names)
        planned = 0
        for name in names:
            planned += stored.get(name, (None, 0))[1]
            if planned > MEDIA_DOWNLOAD_BYTES:
                break
        # Thousands of small images come 25 to a zip: built in memory, it costs a fraction.
        spool = io.BytesIO() if planned <= ONE_SHOT_REPLY_MAX else \
            tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_MAX, dir=self.spool_folder)
        try:
            zip_meta, total = {}, 0
            archive = ZipWriter(spool)
            for index, name in enumerate(names):
                size = stored.get(name, (None, 0))[1]
                if not size:
                    raise SyncError(409, "downloadFiles: %r is not on the server"
                                    % name[:QUOTED_MAX])
                try:
                    with open(self.store.path_of(name), "rb", buffering=0) as f:
                        if size <= SPOOL_MEMORY_MAX:
                            data = f.readall()
                            archive.add(str(index), data)
                            total += len(data)
                        else:
                            archive.add_file(str(index), f)
                            total += f.tell()
                except FileNotFoundError:
                    self.store.forget(name, size)
                    raise SyncError(409, "downloadFiles: %r is missing on disk"
                                    % name[:QUOTED_MAX])
                zip_meta[str(index)] = name
                if total > MEDIA_DOWNLOAD_BYTES:
                    break
            archive.add("_meta", dumps_compact(zip_meta).encode("utf-8"))
            archive.close()
            size = spool.tell()
            spool.seek(0)
        except BaseException:
            spool.close()
            raise
        return Reply(stream=spool, size=size)

    def uploadChanges(self, req):
        changes, incoming = self._unpack_upload(req.payload)
        try:
            usn = self.store.apply(changes, self.quota)
        except BaseException:
            for path in incoming:       # files written in place too: as they were before
                if os.path.exists(path):
                    os.unlink(path)
            raise
        for name, path, _, _, in_place in changes:
            if path is not None and not in_place and os.path.exists(path):
                os.unlink(path)         # a temp file apply() had no use for
        return self.wrapped([len(changes), usn])

    def _unpack_upload(self, payload):
        """Check the whole zip and write its files to temporary names before touching anything.

        Returns [(name, temp path or None for a deletion, sha1, size)] and the temp paths.
        """
        incoming = []
        try:
            with payload.reader() as raw:
                try:
                    archive = ZipReader(raw)
                except ZipError as e:
                    raise bad_request("uploadChanges: not a readable zip (%s)" % e)
                entries = archive.entries
                if len(entries) > MEDIA_UPLOAD_MAX_FILES + 1:
                    raise bad_request("uploadChanges: more than %d files in one zip"
                                      % MEDIA_UPLOAD_MAX_FILES)
                meta = self._read_zip_meta(archive, entries)
                stored = self.store.entries([name for name, _ in meta])
                changes, names, total = [], set(), 0
                for name, entry in meta:
                    name = check_media_name(name)
                    if name in names:
                        raise bad_request("uploadChanges: %r appears twice" % name[:QUOTED_MAX])
                    names.add(name)
                    if entry is None or entry == "":
                        changes.append((name, None, None, 0, False))
                        continue
                    if not isinstance(entry, str) or entry not in entries or entry == "_meta":
                        raise bad_request("uploadChanges: zip entry %r for %r is missing"
                                          % (str(entry)[:QUOTED_MAX], name[:QUOTED_MAX]))
                    # A name with no file yet is written where it belongs (one file made,
                    # as the official server does); a new version of a file waits aside.
                    in_place = not stored.get(name, (None, 0))[1]
                    path, sha1, size = self._extract(archive, entries[entry], name, in_place,
                                                     incoming)
                    changes.append((name, path, sha1, size, in_place))
                    total += size
                    if total > self.max_decompressed:
                        raise SyncError(413, "uploadChanges: the zip unpacks to more than %d MiB"
                                        % (self.max_decompressed // MIB))
                return changes, incoming
        except BaseException:
            for temp in incoming:
                if os.path.exists(temp):
                    os.unlink(temp)
            raise

    @staticmethod
    def _read_zip_meta(archive, entries):
        if "_meta" not in entries:
            raise bad_request("uploadChanges: the zip has no _meta entry")
        if entries["_meta"].size > MEDIA_META_MAX:
            raise bad_request("uploadChanges: _meta over %d bytes" % MEDIA_META_MAX)
        try:
            raw = archive.read(entries["_meta"])
        except (ZipError, zlib.error) as e:
            raise bad_request("uploadChanges: unreadable _meta (%s)" % str(e)[:80])
        meta = shaped(client_json(raw, "uploadChanges: _meta"), MEDIA_ZIP_META,
                      "uploadChanges: a _meta entry [name, zip entry]")
        if len(meta) > MEDIA_UPLOAD_MAX_FILES:
            raise bad_request("uploadChanges: _meta must list at most %d changes"
                              % MEDIA_UPLOAD_MAX_FILES)
        return meta

    def _extract(self, archive, entry, name, in_place, incoming):
        """Copy one entry to its file, or a temp file, as the zip reader checks it (a zip's
        header can lie); the path goes into `incoming` before a byte is written."""
        if entry.size > MEDIA_FILE_MAX:
            raise bad_request("uploadChanges: %r is over %d MiB"
                              % (name[:QUOTED_MAX], MEDIA_FILE_MAX // MIB))
        if entry.size == 0:
            raise bad_request("uploadChanges: %r is empty" % name[:QUOTED_MAX])
        if in_place:
            temp = self.store.path_of(name)
            out = open(temp, "wb", buffering=0)
        else:
            fd, temp = tempfile.mkstemp(prefix=TEMP_INCOMING, dir=self.store.user_folder)
            out = os.fdopen(fd, "wb", buffering=0)
        incoming.append(temp)
        digest = hashlib.sha1()
        try:
            with out:
                def write(block):
                    digest.update(block)
                    while block:    # a full disk is the server's trouble: 507
                        block = block[out.write(block):]
                try:
                    archive.copy(entry, write)
                except (ZipError, zlib.error) as e:
                    raise bad_request("uploadChanges: cannot read %r from the zip (%s)"
                                      % (name[:QUOTED_MAX], e))
        except BaseException:
            os.unlink(temp)
            raise
        return temp, digest.digest(), entry.size


class MediaStore:
    """A user's media files and the database that numbers their changes."""

    def __init__(self, folder):
        self.user_folder = folder           # where files on their way in wait: not in media/,
        self.folder = os.path.join(folder, "media")     # whose names are the devices' own
        self.db_path = os.path.join(folder, "media.db")
        self.lock = threading.Lock()        # held by the media method in progress
        self.folder_lock = FolderLock(os.path.join(folder, MEDIA_LOCK))
        self.refusal = ""                   # a quota refusal the next `meta` tells
        self.db = None                      # its connection, kept open between requests
        self.used = time.monotonic()        # its last use: closed after USER_IDLE

    def connect(self):
        """The connection of the media methods; call it with `lock` held."""
        self.used = time.monotonic()
        if self.db is not None and not os.path.exists(self.db_path):
            self.db.close()     # deleted under the server (`deluser --delete-data`): afresh
            self.db = None
        if self.db is None:
            # Kept open: closing the last connection of a WAL database checkpoints it,
            # which cost more than a whole small upload.
            os.makedirs(self.folder, exist_ok=True)
            try:
                self.db = self._open()
            except sqlite3.DatabaseError as e:
                if out_of_space(e) or "locked" in str(e):
                    raise
                self.db = self._rebuild(str(e))
        return self.db

    def _open(self):
        db = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False,
                             timeout=LOCK_WAIT)
        try:
            db.execute("pragma journal_mode=wal")      # readers (meta) never wait for writers
            # No fsync per commit: a power cut may lose the last uploads' entries, never the
            # database; their files, moved after the commit, are then sent again.
            db.execute("pragma synchronous=normal")
            if db.execute("pragma user_version").fetchone()[0] == 0:
                db.executescript(MEDIA_SCHEMA)
                db.execute("insert into meta select 0, 0, 0 where not exists (select 1 from meta)")
                db.execute("pragma user_version = 4")
            db.execute("select last_usn from meta").fetchone()[0]
        except (sqlite3.DatabaseError, TypeError):
            db.close()
            raise sqlite3.DatabaseError("media.db cannot be read")
        return db

    def _rebuild(self, why):
        """A damaged media.db is set aside and made again from the files present. Their
        usns start above any a device has seen (a clock's seconds), so every device
        compares its files with these on its next media sync."""
        aside = "%s.damaged-%s" % (self.db_path, time.strftime("%Y%m%d-%H%M%S"))
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(self.db_path + suffix):
                os.replace(self.db_path + suffix, aside + suffix)
        db = self._open()
        usn, total = int(time.time()), 0
        names = sorted(n for n in os.listdir(self.folder)
                       if os.path.isfile(os.path.join(self.folder, n)))
        with transaction(db):
            for usn, name in enumerate(names, usn + 1):
                with open(os.path.join(self.folder, name), "rb") as f:
                    digest = hashlib.sha1()
                    copy_stream(f.read, digest.update)
                size = os.path.getsize(os.path.join(self.folder, name))
                total += size
                db.execute("insert into media values (?, ?, ?, ?, ?)",
                           (name, digest.digest(), size, usn, int(time.time())))
            db.execute("update meta set last_usn=?, total_bytes=?, total_nonempty_files=?",
                       (usn, total, len(names)))
        log.error("%s was damaged (%s): moved to %s and made again from the %d files in %s",
                  self.db_path, why, aside, len(names), self.folder)
        return db

    # -- the bookkeeping, for the media methods (with `lock` held) ---------

    def usn(self):
        return self.connect().execute("select last_usn from meta").fetchone()[0]

    def file_count(self):
        return self.connect().execute("select total_nonempty_files from meta").fetchone()[0]

    def changes_since(self, usn, limit=MEDIA_CHANGES_PAGE):
        """(name, usn, sha1, size) of the next page of changes after `usn`; size 0: deleted.
        A limit of -1: all of them."""
        return self.connect().execute(
            "select fname, usn, csum, size from media where usn > ? order by usn limit ?",
            (usn, limit)).fetchall()

    def start_above_devices(self):
        """Files arriving from another server: their usns start above any a device has
        seen (a clock's seconds), so every device compares its files with these."""
        db = self.connect()
        with transaction(db):
            db.execute("update meta set last_usn=max(last_usn, ?)", (int(time.time()),))

    def close(self):
        if self.db is not None:
            self.db.close()
            self.db = None

    def close_if_idle(self, since):
        """Close media.db if unused since `since`, unless a media method runs now."""
        if self.db is None or self.used > since or not self.lock.acquire(blocking=False):
            return
        try:
            self.close()
        finally:
            self.lock.release()

    def entries(self, names):
        """{name: (sha1, size)} of those names the database knows (size 0: deleted)."""
        found, db = {}, self.connect()
        names = list(names)
        for start in range(0, len(names), SQL_IDS_PER_QUERY):
            part = names[start:start + SQL_IDS_PER_QUERY]
            for name, csum, size in db.execute(
                    "select fname, csum, size from media where fname in (%s)"
                    % ",".join("?" * len(part)), part):
                found[name] = (csum, size)
        return found

    def size_of(self, name):
        """The file's size; 0 when it was deleted or never was."""
        row = self.connect().execute("select size from media where fname=?", (name,)).fetchone()
        return row[0] if row else 0

    def forget(self, name, size):
        """A file lost from the disk: dropped without a deletion entry, so the loss does not
        spread to the devices that still have it."""
        db = self.connect()
        with transaction(db):
            db.execute("update meta set total_bytes=max(0, total_bytes-?), "
                       "total_nonempty_files=max(0, total_nonempty_files-1)", (size,))
            db.execute("delete from media where fname=?", (name,))

    def apply(self, changes, quota=0):
        """An upload's [(name, file or None to delete, sha1, size, in place)]: one usn per
        real change, all or nothing; returns the new last usn. A file not in place moves
        after the commit, so a failed move (a full disk) leaves the old one as it was; what
        a change deletes or replaces goes to the trash, for a restore."""
        db, moves, deleted, written = self.connect(), [], [], []
        with transaction(db):
            usn, total_bytes, total_files = db.execute(
                "select last_usn, total_bytes, total_nonempty_files from meta").fetchone()
            before = total_bytes
            now = int(time.time())
            rows = self.entries([change[0] for change in changes])
            for name, temp, sha1, size, in_place in changes:
                row = rows.get(name)
                stored = row is not None and row[1] > 0         # a file to trash first
                if temp is None:
                    if not stored:
                        continue
                    usn += 1
                    total_bytes -= row[1]
                    total_files -= 1
                    deleted.append((usn, now, name))
                    moves.append((None, self.path_of(name), True))
                    continue
                if stored and bytes(row[0]) == sha1:
                    continue
                usn += 1
                if stored:
                    total_bytes -= row[1]
                    total_files -= 1
                total_bytes += size
                total_files += 1
                written.append((name, sha1, size, usn, now))
                if not in_place:
                    moves.append((temp, self.path_of(name), stored))
            db.executemany("update media set size=0, usn=?, mtime=? where fname=?", deleted)
            db.executemany("insert or replace into media values (?, ?, ?, ?, ?)", written)
            # The whole batch, or none of it; one that leaves less than it found passes,
            # so a user over a lowered quota gets under it by deleting.
            if quota and total_bytes > quota and total_bytes > before:
                self.refusal = QUOTA_REFUSAL % ("media files", total_bytes / MIB,
                                                quota // MIB)
                raise SyncError(413, self.refusal)
            db.execute("update meta set last_usn=?, total_bytes=?, total_nonempty_files=?",
                       (usn, total_bytes, total_files))
        trash = trash_batch_folder(self.user_folder, usn)
        for temp, path, stored in moves:
            if stored and os.path.exists(path):
                os.makedirs(trash, mode=0o700, exist_ok=True)
                os.replace(path, os.path.join(trash, os.path.basename(path)))
            if temp is not None:
                os.replace(temp, path)
        if quota and (written or deleted):  # the trash counts too: its oldest files give way
            trim_trash(os.path.dirname(trash), quota - total_bytes)
        return usn

    def last_usn(self):
        """For `meta`, which must not wait for a media upload of the same user."""
        if self.lock.acquire(blocking=False):
            try:
                return self.usn()
            finally:
                self.lock.release()
        db = sqlite3.connect(self.db_path, timeout=LOCK_WAIT)     # WAL: reads never wait
        try:
            return db.execute("select last_usn from meta").fetchone()[0]
        finally:
            db.close()

    def path_of(self, name):
        return os.path.join(self.folder, check_media_name(name))


MEDIA_SCHEMA = """
    create table if not exists media (
        fname text not null primary key,
        csum blob not null,
        size integer not null,
        usn integer not null,
        mtime integer not null);
    create index if not exists ix_usn on media (usn);
    create table if not exists meta (
        last_usn integer not null,
        total_bytes integer not null,
        total_nonempty_files integer not null);
"""
WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


@contextlib.contextmanager
def transaction(db):
    """begin immediate ... commit, or rollback on any error (autocommit connections)."""
    db.execute("begin immediate")
    try:
        yield db
    except BaseException:
        db.execute("rollback")
        raise
    db.execute("commit")


def check_media_name(name):
    """A name a client may store a file under; anything else could escape the folder."""
    if not isinstance(name, str) or not name:
        raise bad_request("media: empty or missing file name")
    shown = name[:QUOTED_MAX]
    if name in (".", "..", "_meta") or "/" in name or "\\" in name or WINDOWS_DRIVE.match(name):
        raise bad_request("media: file name %r is not a plain file name" % shown)
    if ASCII_CONTROL.search(name):
        raise bad_request("media: file name %r contains control characters" % shown)
    if len(name.encode("utf-8")) > MEDIA_NAME_MAX_BYTES:
        raise bad_request("media: file name %r is longer than %d bytes"
                          % (shown, MEDIA_NAME_MAX_BYTES))
    if not unicodedata.is_normalized("NFC", name):
        raise bad_request("media: file name %r is not in Unicode NFC form" % shown)
    return name


# ---------------------------------------------------------------------------
# Restore points
#   The commonest loss is one device answering "Upload" in the full-sync dialog.
#   So before a full upload replaces a collection, and once a day after a normal
#   sync, the collection is kept in <user>/backups/; deleted and replaced media
#   files wait in <user>/media.trash/. The CLI lists, makes and restores them,
#   also while the server runs: both take the user's folder locks. After a restore
#   or an import each device is told to choose Download, until it has.
# ---------------------------------------------------------------------------

class NoSuchPoint(ValueError):
    """A restore point asked for by an id that is not (or no longer) there."""


class RestorePoints:
    """One user's restore points: `<id>.anki2.gz`, a consistent SQLite snapshot, and
    `<id>.json` (when, why, notes, cards, size), written last, so a point exists only
    once it is whole."""

    def __init__(self, user_folder, config):
        self.user_folder = user_folder
        self.folder = os.path.join(user_folder, BACKUP_FOLDER)
        self.trash = os.path.join(user_folder, MEDIA_TRASH_FOLDER)
        self.config = config
        self.daily_on = None            # the day known to have its daily point

    def list(self):
        """Every point, newest first, as dicts."""
        points = []
        if os.path.isdir(self.folder):
            for name in os.listdir(self.folder):
                if name.endswith(".json") and not name.startswith("."):
                    try:
                        with open(os.path.join(self.folder, name), encoding="utf-8") as f:
                            point = json.load(f)
                    except (OSError, ValueError):
                        continue
                    if os.path.exists(self.file_of(point["id"])):
                        points.append(point)
        # Ids of one second: base, base-2 ... base-10, longer ones later.
        return sorted(points, key=lambda p: (p["time"], len(p["id"]), p["id"]), reverse=True)

    def file_of(self, point_id):
        """The point's file: gzipped, or the very file that was replaced (a hard link)."""
        plain = os.path.join(self.folder, point_id + ".anki2")
        return plain if os.path.exists(plain) else plain + ".gz"

    def find(self, point_id):
        for point in self.list():
            if point["id"] == point_id:
                return point
        raise NoSuchPoint("%s has no restore point %r: `backups NAME` lists them"
                         % (os.path.basename(self.user_folder), point_id))

    def daily_due(self):
        """True when today has no daily point yet; asked at every sync's finish, so the
        folder is read once a day, not once a sync."""
        today = time.strftime("%Y-%m-%d")
        if self.daily_on == today:
            return False
        if any(p["why"] == "daily" and time.strftime("%Y-%m-%d", time.localtime(p["time"]))
               == today for p in self.list()):
            self.daily_on = today
        return self.daily_on != today

    def keep(self, collection_path, why, note="", spare=(), undo=False):
        """A point of the collection as it is now; None when it is empty, or when the disk
        has too little room left for it (then the log says so). With `undo` (a restore,
        an import: the point is how they are undone) no room raises NoRoomForPoint
        instead, before anything is written. Pruning after it leaves the point itself
        and the points in `spare` alone."""
        if not os.path.exists(collection_path) or os.path.getsize(collection_path) == 0:
            return None
        if undo:
            self.refuse_without_room(collection_path)
        elif free_space(self.user_folder) < BACKUP_FREE_FACTOR * os.path.getsize(
                collection_path):
            log.warning("%s: no %s restore point: less than %d times the collection's size "
                        "is free", self.user_folder, why, BACKUP_FREE_FACTOR)
            return None
        os.makedirs(self.folder, mode=0o700, exist_ok=True)
        now = time.time()
        point_id = self.new_id(now)
        media_usn = media_usn_of(self.user_folder)
        fd, snapshot = tempfile.mkstemp(prefix=TEMP_BACKUP, dir=self.folder)
        os.close(fd)
        packed = snapshot + ".gz"
        try:
            notes, cards = snapshot_collection(collection_path, snapshot)
            if not (notes or cards) and why != "manual":
                return None             # a new account's empty collection: nothing to lose
            with open(snapshot, "rb") as src, open(packed, "wb") as raw:
                with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=BACKUP_GZIP_LEVEL,
                                   mtime=0) as out:
                    copy_stream(src.read, out.write)
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(packed, self.file_of(point_id))
            point = {"id": point_id, "time": int(now), "why": why, "note": note,
                     "notes": notes, "cards": cards, "media_usn": media_usn,
                     "size": os.path.getsize(self.file_of(point_id))}
            write_atomically(os.path.join(self.folder, point_id + ".json"),
                             json.dumps(point, indent=1).encode("utf-8"), TEMP_BACKUP)
        finally:
            for path in (snapshot, packed):
                if os.path.exists(path):
                    os.unlink(path)
        self.prune(spare={point_id, *spare})
        if why == "daily":
            self.daily_on = time.strftime("%Y-%m-%d", time.localtime(now))
        log.info("%s: restore point %s (%s): %d notes, %d cards", self.user_folder,
                 point_id, why, notes, cards)
        return point

    def refuse_without_room(self, collection_path):
        """NoRoomForPoint, saying what is needed and what is free, when a point of the
        collection would not fit: a restore or an import without its undo would be a
        loss no command can take back."""
        if not os.path.exists(collection_path):
            return
        needed = BACKUP_FREE_FACTOR * os.path.getsize(collection_path)
        free = free_space(self.user_folder)
        if free < needed:
            raise NoRoomForPoint(
                "%s: no room on the disk for the restore point that would undo this: %s must "
                "be free (%d times the collection), %s is; make room and run it again "
                "(nothing was changed)" % (os.path.basename(self.user_folder),
                                           human_size(needed), BACKUP_FREE_FACTOR,
                                           human_size(free)))

    def unpack(self, point_id, target):
        """The point's collection, written to `target`."""
        path = self.file_of(point_id)
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as src, open(target, "wb") as out:
            copy_stream(src.read, out.write)

    def keep_replaced(self, collection_path, why, note=""):
        """A point of a collection about to be replaced, and never written again: a hard
        link to the file, made in an instant (a full upload must not wait for a copy);
        where links cannot be made, a copy as keep() makes."""
        notes, cards, size = collection_counts(collection_path)
        if not (notes or cards):
            return None
        os.makedirs(self.folder, mode=0o700, exist_ok=True)
        now = time.time()
        point_id = self.new_id(now)
        media_usn = media_usn_of(self.user_folder)
        target = os.path.join(self.folder, point_id + ".anki2")
        try:
            os.link(collection_path, target)
        except OSError:
            return self.keep(collection_path, why, note)
        point = {"id": point_id, "time": int(now), "why": why, "note": note, "notes": notes,
                 "cards": cards, "media_usn": media_usn, "size": size}
        write_atomically(os.path.join(self.folder, point_id + ".json"),
                         json.dumps(point, indent=1).encode("utf-8"), TEMP_BACKUP)
        self.prune(spare={point_id})
        return point

    def new_id(self, now):
        """The second's id, numbered past every point of that second still kept: an id
        freed by pruning is never given again, so ids of one second sort as made."""
        base = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
        last = 0
        for name in os.listdir(self.folder):
            if name.startswith(base):
                rest = name[len(base):].split(".")[0]
                last = max(last, int(rest[1:]) if rest[1:].isdigit() else 1)
        return "%s-%d" % (base, last + 1) if last else base

    def retained(self, points):
        """The points retention keeps, newest first: the last `backup_uploads` replacements
        (uploads, restores, imports, by hand), the newest daily point of each of the last
        `backup_days` days and of each of the last `backup_weeks` weeks, all within
        budget(); the newest point always."""
        keep, days, weeks, replaced = [], set(), set(), 0
        for point in points:
            stamp = time.localtime(point["time"])
            day, week = time.strftime("%Y-%m-%d", stamp), time.strftime("%G-%V", stamp)
            wanted = False
            if point["why"] == "daily":
                if day not in days and len(days) < self.config.backup_days:
                    days.add(day)
                    wanted = True
                if week not in weeks and len(weeks) < self.config.backup_weeks:
                    weeks.add(week)
                    wanted = True
            elif replaced < self.config.backup_uploads:
                replaced += 1
                wanted = True
            if wanted:
                keep.append(point)
        budget, total, kept = self.budget(), 0, []
        for point in keep:
            if kept and total + point["size"] > budget:
                continue
            kept.append(point)
            total += point["size"]
        return kept

    def budget(self):
        """Bytes the points may take: `backup_budget_mb`, and no more than the collection
        itself may take where `quota_collection_mb` is set (a quota bounds what a user
        keeps on the disk, points too)."""
        budget, quota = self.config.backup_budget_mb, self.config.quota_collection_mb
        return (min(budget, quota) if quota else budget) * MIB

    def prune(self, spare=()):
        """The points retention no longer keeps go, but never one in `spare`: the point
        just made (the undo of what comes next, kept even when a clock stepped back makes
        it look oldest) and the one a restore reads. Then the media that no point left
        could bring back, once `backup_days` old."""
        points = self.list()
        kept = {p["id"] for p in self.retained(points)} | set(spare)
        for point in points:
            if point["id"] not in kept:
                os.unlink(os.path.join(self.folder, point["id"] + ".json"))
                os.unlink(self.file_of(point["id"]))
        kept = [p for p in points if p["id"] in kept]
        horizon = time.time() - self.config.backup_days * 86400
        for usn, stamp, batch in trash_batches(self.trash):
            if stamp < horizon and not any(deleted_after(p, usn, stamp) for p in kept):
                shutil.rmtree(batch, ignore_errors=True)


def snapshot_collection(path, target):
    """A consistent copy of a collection (SQLite's backup API), and its note and card
    counts."""
    source = sqlite3.connect("file:%s?mode=ro" % urllib.parse.quote(os.path.abspath(path)),
                             uri=True, timeout=LOCK_WAIT)
    copy = sqlite3.connect(target)
    try:
        source.backup(copy)
        copy.execute("pragma journal_mode=delete")
        notes = copy.execute("select count() from notes").fetchone()[0]
        cards = copy.execute("select count() from cards").fetchone()[0]
    finally:
        copy.close()
        source.close()
    return notes, cards


def write_atomically(path, data, prefix):
    fd, temp = tempfile.mkstemp(prefix=prefix, dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


class NoRoomForPoint(ValueError):
    """A restore or an import refused: the point that would undo it does not fit."""


def media_usn_of(user_folder):
    """The user's last media usn, read beside the server (WAL: it never waits); 0 with
    no media yet. A point keeps it: the trash after it is what a restore brings back."""
    path = os.path.join(user_folder, "media.db")
    if not os.path.exists(path):
        return 0
    try:
        db = sqlite3.connect("file:%s?mode=ro" % urllib.parse.quote(os.path.abspath(path)),
                             uri=True, timeout=LOCK_WAIT)
        try:
            return db.execute("select last_usn from meta").fetchone()[0]
        finally:
            db.close()
    except (sqlite3.Error, TypeError):
        return 0


def trash_batch_folder(user_folder, usn):
    """Where the files one media change (ending at `usn`) deleted or replaced wait."""
    return os.path.join(user_folder, MEDIA_TRASH_FOLDER, TRASH_BATCH % (
        usn, time.time() * 1000, secrets.token_hex(2)))


def trash_batches(trash):
    """(media usn, time, folder) of each batch of media files one upload deleted or
    replaced, oldest first. Batches are ordered by their usn, which only rises: the clock
    may step back. 0.2.1's batches carry only a time (usn None) and come first."""
    batches = []
    if os.path.isdir(trash):
        for name in os.listdir(trash):
            parts = name.split("-")
            try:
                if parts[0].startswith("usn"):
                    batches.append((int(parts[0][3:]), int(parts[1]) / 1000.0,
                                    os.path.join(trash, name)))
                else:
                    batches.append((None, int(parts[0]) / 1000.0, os.path.join(trash, name)))
            except (ValueError, IndexError):
                continue
    return sorted(batches, key=lambda b: (b[0] is not None, b[0] or 0, b[1]))


def deleted_after(point, usn, stamp):
    """True for a trash batch made after the point: by media usns where both have one;
    a point without one (0.2.1's) came before every batch with one."""
    if "media_usn" in point:
        return usn is not None and usn > point["media_usn"]
    return usn is not None or stamp >= point["time"]


def trim_trash(trash, room):
    """The oldest batches go until the trash takes at most `room` bytes: it counts
    against the media quota, and the files a user has now come before deleted ones."""
    batches = [(batch, folder_bytes(batch)) for _, _, batch in trash_batches(trash)]
    total = sum(size for _, size in batches)
    for batch, size in batches:
        if total <= room:
            break
        shutil.rmtree(batch, ignore_errors=True)
        total -= size


def folder_bytes(folder):
    """The bytes of the files in a folder (not below it)."""
    try:
        with os.scandir(folder) as entries:
            return sum(entry.stat(follow_symlinks=False).st_size for entry in entries)
    except OSError:
        return 0


class FolderBusy(ValueError):
    """A user's sync went on past the wait for it (a command's message, a page's 409)."""


class CollectionChanged(ValueError):
    """A restore confirmed on a page that showed another collection than today's: a sync,
    or the same restore sent again from a second tab or by Back (a page's 409)."""


class UserFolder:
    """A user's folder, for the commands that change it while the server may run: they
    take the same locks as the server's sync methods, collection and media."""

    def __init__(self, config, name, wait=COMMAND_LOCK_WAIT):
        self.config = config
        self.name = name
        self.wait = wait                # seconds to wait for a sync in progress to end
        self.path = os.path.join(config.data, folder_name(name))
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        self.collection = Collection(self.path)
        self.points = RestorePoints(self.path, config)

    @contextlib.contextmanager
    def locked(self):
        locks = [FolderLock(os.path.join(self.path, lock)) for lock in
                 (COLLECTION_LOCK, MEDIA_LOCK)]
        try:
            for lock in locks:
                if lock.acquire(0):
                    continue
                if self.wait == COMMAND_LOCK_WAIT:          # at a terminal: say why
                    print("%s is syncing: waiting for the sync to end (up to %d s)"
                          % (self.name, self.wait), file=sys.stderr, flush=True)
                if not lock.acquire(self.wait):
                    raise FolderBusy("%s is still syncing after %d s: try again when the "
                                     "sync has finished" % (self.name, self.wait))
            yield
        finally:
            for lock in reversed(locks):
                lock.release()

    def backup(self, why="manual", note=""):
        with self.locked():
            return self.points.keep(self.collection.path, why, note)

    def stamp(self):
        """Which collection file is here now: a sync that wrote, a restore or an upload
        changes it."""
        try:
            st = os.stat(self.collection.path)
        except FileNotFoundError:
            return "none"
        return "%d.%d.%d" % (st.st_ino, st.st_mtime_ns, st.st_size)

    def restore(self, point_id, seen=None):
        """The point becomes the collection (the current one a point itself first), media
        deleted since it come back, and every device is asked for a full sync. The point
        that undoes it is kept first, or nothing happens (NoRoomForPoint); pruning after
        it spares the point being restored, even the oldest. With `seen` (a page's
        stamp()), only the collection the person saw is replaced (CollectionChanged)."""
        with self.locked():
            point = self.points.find(point_id)
            if seen is not None and seen != self.stamp():
                raise CollectionChanged(
                    "nothing was restored: the collection changed since the page that asked "
                    "was shown (a sync, or this restore done already); look again")
            before = self.points.keep(self.collection.path, "restore",
                                      "before restoring %s" % point_id, spare=(point_id,),
                                      undo=True)
            fd, temp = tempfile.mkstemp(prefix=TEMP_BACKUP, suffix=".anki2", dir=self.path)
            os.close(fd)
            try:
                self.points.unpack(point_id, temp)
                self.install(temp, "restore", point_id, point["time"])
            finally:
                if os.path.exists(temp):
                    os.unlink(temp)
            store = MediaStore(self.path)
            try:
                returned = bring_back_media(store, self.points.trash, point)
            finally:
                store.close()
        return point, before, returned

    def install(self, prepared, why, what, when):
        """A checked schema-11 file becomes the collection, with a new schema time: every
        device's next sync then asks for a full sync, and a download gives this file; till
        then each device is told to choose Download (FullSyncNotice)."""
        conn = connect_collection(prepared)
        try:
            if conn.execute("pragma quick_check(1)").fetchall() != [("ok",)]:
                raise ValueError("the collection to install is damaged: nothing changed")
            usn = conn.execute("select usn from col").fetchone()[0]
            current = 0
            if os.path.exists(self.collection.path) and os.path.getsize(self.collection.path):
                probe = connect_collection(self.collection.path)
                try:
                    current = probe.execute("select usn from col").fetchone()[0]
                finally:
                    probe.close()
            now = now_ms()
            conn.execute("update col set scm=?, mod=?, usn=?", (now, now, max(usn, current) + 1))
            conn.commit()
        finally:
            conn.close()
        remove_side_files(prepared)
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        # Before the swap: a sync between the two sees the notice's scm, not yet the file's.
        FullSyncNotice(self.path).start(why, what, when, now)
        self.collection.replace_with(prepared)


class FullSyncNotice:
    """What a restore or an import tells each device at its next sync: the stock full-sync
    dialog offers Upload as readily as Download, and Upload would undo the command. The
    file, in the user's folder, survives a restart; it names the schema time the command
    gave the collection (a full upload gives another: the notice ends with it) and the
    devices that have downloaded since. A device is what `status` counts as one: a client
    and its host key. Every device of a user has the same key, so two of the same app
    version on the same system are one device here: once one has downloaded, the other
    is not told. Written under the user's folder lock, by the command and by the server."""

    def __init__(self, user_folder):
        self.path = os.path.join(user_folder, FULL_SYNC_NOTICE)

    def read(self):
        try:
            with open(self.path, encoding="utf-8") as f:
                notice = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:      # damaged: no notice, and the sync goes on
            log.warning("%s unreadable, ignored: %s", self.path, e)
            return None
        if not isinstance(notice, dict) or not isinstance(notice.get("done"), list):
            log.warning("%s is not a notice of ankisync's, ignored", self.path)
            return None
        return notice

    def write(self, notice):
        write_atomically(self.path, json.dumps(notice, indent=1).encode("utf-8"), TEMP_BACKUP)

    def start(self, why, what, when, scm):
        """A command installed a collection: `why` restore or import, `what` the restore
        point's id or the package's name, `when` its time (epoch seconds)."""
        self.write({"why": why, "what": what, "time": int(when), "scm": scm, "done": []})

    def end(self):
        """A full upload replaced the collection on purpose: nobody needs the notice."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    @staticmethod
    def device(client, hkey):
        return hashlib.sha256(("%s\n%s" % (key_digest(hkey), client)).encode("utf-8")
                              ).hexdigest()

    def message(self, scm, client, hkey):
        """The sentence for this device, or "": the collection still is the installed one
        and the device has not downloaded it."""
        notice = self.read()
        if not notice or notice.get("scm") != scm or self.device(client, hkey) in notice["done"]:
            return ""
        try:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(notice["time"]))
        except (KeyError, TypeError, ValueError, OverflowError):
            when = "recently"
        if notice.get("why") == "import":
            return ("A collection was imported on the server (%s, %s): choose Download in the "
                    "next dialog; Upload would undo the import." % (notice.get("what"), when))
        return ("The collection was restored on the server (restore point %s, %s): choose "
                "Download in the next dialog; Upload would undo the restore."
                % (notice.get("what"), when))

    def downloaded(self, client, hkey):
        notice = self.read()
        device = self.device(client, hkey)
        if notice and device not in notice["done"]:
            notice["done"] = (notice["done"] + [device])[-FULL_SYNC_NOTICE_DEVICES:]
            try:
                self.write(notice)
            except OSError as e:    # a full disk: the download goes on, the device is told again
                log.warning("%s not updated: %s", self.path, e)


def media_deleted_since(trash, point):
    """{name: path in the trash} of each media file deleted after the point: the oldest
    copy after it, the one the point's notes used."""
    wanted = {}
    for usn, stamp, batch in trash_batches(trash):
        if deleted_after(point, usn, stamp):
            for name in os.listdir(batch):
                wanted.setdefault(name, os.path.join(batch, name))
    return wanted


def bring_back_media(store, trash, point):
    """Media files deleted after the point and not on the server now: back, as new
    changes every device downloads."""
    wanted = media_deleted_since(trash, point)
    stored = store.entries(wanted)
    returned = sorted(name for name in wanted if not stored.get(name, (None, 0))[1])
    copies = []
    try:
        for name in returned:       # copies, so the trash keeps its own for the next restore
            fd, copy = tempfile.mkstemp(prefix=TEMP_INCOMING, dir=store.user_folder)
            os.close(fd)
            copies.append((name, copy))
            shutil.copyfile(wanted[name], copy)
        add_media_files(store, copies)
    finally:
        for _, copy in copies:
            if os.path.exists(copy):
                os.unlink(copy)
    return returned


# --- a user's collection in and out: .colpkg, and ankisyncd's data folder --------------

def export_package(folder, out_path, point_id=None):
    """A collection package (.colpkg) Anki imports with File > Import: the collection
    (schema 11, the layout Anki 2.1 wrote) and its media; or, given a restore point's
    id, the point's collection with today's media and those deleted since the point
    (the trash keeps them). Returns (notes, cards, files)."""
    fd, snapshot = tempfile.mkstemp(prefix=TEMP_BACKUP, dir=folder.path)
    os.close(fd)
    try:
        with folder.locked():
            if point_id is None:
                notes, cards = snapshot_collection(folder.collection.path, snapshot)
                returned = {}
            else:
                point = folder.points.find(point_id)
                folder.points.unpack(point["id"], snapshot)
                notes, cards = point["notes"], point["cards"]
                returned = media_deleted_since(folder.points.trash, point)
            store = MediaStore(folder.path)
            files = {name: os.path.join(folder.path, "media", name)
                     for name, _, _, size in store.changes_since(-1, limit=-1) if size}
            store.close()
        for name, path in returned.items():
            files.setdefault(name, path)
        conn = connect_collection(snapshot)
        try:
            conf = json.loads(conn.execute("select conf from col").fetchone()[0])
        except ValueError:
            conf = {}               # Anki mends a config it cannot read; the package still goes
        finally:
            conn.close()
        # Anki 2.1 put a v2-scheduler collection under the name Anki 2.0 does not read.
        v1 = not isinstance(conf, dict) or conf.get("schedVer", 1) == 1
        entry = "collection.anki2" if v1 else "collection.anki21"
        temp = out_path + ".partial"
        media = {}
        try:
            with zipfile.ZipFile(temp, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as archive:
                archive.write(snapshot, entry)
                for name, path in sorted(files.items()):
                    try:
                        archive.write(path, str(len(media)), zipfile.ZIP_STORED)
                    except FileNotFoundError:   # deleted by a sync since the list was read
                        continue
                    media[str(len(media))] = name
                archive.writestr("media", json.dumps(media))
            os.replace(temp, out_path)
        except BaseException:
            if os.path.exists(temp):
                os.unlink(temp)
            raise
    finally:
        os.unlink(snapshot)
    return notes, cards, len(media)


class PackageError(ValueError):
    """What is wrong with a .colpkg, in words; `import` names the file before them."""


def unpack_entry(archive, name, target, limit, zstd, shown, too_big):
    """A package's entry written to `target` (zstd-decompressed when `zstd` is given),
    up to `limit` bytes: past them PackageError "<shown> is <too_big>". A size the zip
    declares is refused before a byte is written; the bytes are counted all the same,
    since a declared size can lie."""
    with package_entry(archive, name, shown) as src, open(target, "wb") as out:
        if zstd is None:
            fits = archive.getinfo(name).file_size <= limit and \
                copy_at_most(src.read, out.write, limit)
        else:
            try:
                zstd.decompress_stream(src.read, out.write, limit)
                fits = True
            except ZstdLimitError:      # caught here: package_entry calls a ZstdError damage
                fits = False
    if not fits:
        raise PackageError("%s is %s" % (shown, too_big))


def copy_at_most(read, write, limit):
    """copy_stream up to `limit` bytes: False, and the rest unread, past them."""
    total = 0
    while True:
        data = read(IO_BLOCK)
        if not data:
            return True
        total += len(data)
        if total > limit:
            return False
        write(data)


def import_package(folder, package, zstd):
    """A .colpkg (any Anki's: 2.1's layout or the newer zstd one) becomes the user's
    collection, a restore point of the old one kept first; its media join the user's.
    A package that cannot be read raises PackageError, and nothing changes; so does
    NoRoomForPoint, asked before the unpacking and again before the point is kept."""
    folder.points.refuse_without_room(folder.collection.path)
    try:
        source = open(package, "rb")
    except IsADirectoryError:
        raise PackageError("a folder, not a .colpkg file") from None
    except OSError as e:
        raise PackageError(e.strerror or str(e)) from None
    fd, temp = tempfile.mkstemp(prefix=TEMP_BACKUP, suffix=".anki2", dir=folder.path)
    os.close(fd)
    incoming = []
    try:
        with source, open_package(source) as archive:
            entries = set(archive.namelist())
            latest = package_version(archive, entries) == PACKAGE_LATEST
            name = ("collection.anki21b" if latest else "collection.anki21"
                    if "collection.anki21" in entries else "collection.anki2")
            if name not in entries:
                raise PackageError("it holds no %s: not a collection package" % name
                                   if entries else "an empty zip, not a collection package")
            limit = folder.config.max_decompressed
            unpack_entry(archive, name, temp, limit, zstd if latest else None,
                         "the collection inside",
                         "over %d MiB, the largest this server takes (3 times max_payload_mb): "
                         "raise max_payload_mb to import it" % (limit // MIB))
            try:
                prepare_collection_file(temp)
            except CorruptCollection as e:
                raise PackageError("the collection inside is not an Anki collection"
                                   if e.reason == UPLOAD_CORRUPT else
                                   "the collection inside cannot be used: %s" % e.reason) from None
            # Every name is checked (package_media) before a temp file is made for it.
            for entry_name, media_name in package_media(archive, entries, latest, zstd):
                fd, path = tempfile.mkstemp(prefix=TEMP_INCOMING, dir=folder.path)
                os.close(fd)
                incoming.append((media_name, path))
                unpack_entry(archive, entry_name, path, MEDIA_FILE_MAX, zstd if latest else None,
                             "media file %r" % media_name[:QUOTED_MAX],
                             "over %d MiB, the largest a sync takes: delete it (or make it "
                             "smaller) in Anki and export again" % (MEDIA_FILE_MAX // MIB))
        with folder.locked():
            before = folder.points.keep(folder.collection.path, "import",
                                        "before importing %s" % os.path.basename(package),
                                        undo=True)
            folder.install(temp, "import", os.path.basename(package), time.time())
            store = MediaStore(folder.path)
            added = add_media_files(store, incoming)
            store.close()
        return before, added
    finally:
        for path in [temp] + [path for _, path in incoming]:
            if os.path.exists(path):
                os.unlink(path)
        remove_side_files(temp)


def open_package(source):
    """The zip a .colpkg is, or PackageError: a file that starts as a zip but has no end
    was cut short (a copy or download that stopped)."""
    try:
        return zipfile.ZipFile(source)
    except zipfile.BadZipFile:
        source.seek(0)
        magic = struct.pack("<I", ZIP_LOCAL_MAGIC)
        if source.read(len(magic)) == magic:
            raise PackageError("truncated: the zip's end is missing") from None
        raise PackageError("not a zip file (Anki's File > Export writes one)") from None


@contextlib.contextmanager
def package_entry(archive, name, shown=None):
    """One entry of a .colpkg, open for reading. What zipfile, zlib and zstd raise for a
    damaged one (a bad CRC, a deflate or zstd stream that is corrupt or ends early, an
    unknown compression method) comes out as a PackageError that names it as `shown`."""
    shown = shown or repr(name[:QUOTED_MAX])
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise PackageError("it holds no entry %r" % name[:QUOTED_MAX]) from None
    if info.flag_bits & ZIP_ENCRYPTED:
        raise PackageError("%s is encrypted" % shown)
    try:
        opened = archive.open(info)
    # OSError: a damaged directory points before the file's start, where seek() fails.
    except (OSError, zipfile.BadZipFile, NotImplementedError) as e:
        raise PackageError("%s is damaged (%s)" % (shown, e)) from None
    try:
        with opened as entry:
            yield entry
    except EOFError:
        raise PackageError("truncated: %s ends early" % shown) from None
    except (zipfile.BadZipFile, zlib.error, ZstdError) as e:
        raise PackageError("%s is damaged (%s)" % (shown, e)) from None


def package_version(archive, entries):
    """The `meta` entry's version (PackageMetadata field 1); 2.1's packages have none."""
    if "meta" not in entries:
        return PACKAGE_LEGACY
    with package_entry(archive, "meta") as f:
        raw = f.read(MEDIA_META_MAX)
    try:
        version = pb_uint32(proto_fields(raw), 1)
    except CorruptCollection as e:
        raise PackageError("its meta entry cannot be read (%s)" % e.reason) from None
    if version not in (PACKAGE_LEGACY, PACKAGE_LEGACY_2, PACKAGE_LATEST):
        raise PackageError("it is from a newer Anki than ankisync knows (package version %d)"
                           % version)
    return version


def package_media(archive, entries, latest, zstd):
    """(zip entry, file name) of the package's media: each name one ankisync stores, and
    named once (twice would count its file twice in media.db), each entry in the zip."""
    if "media" not in entries:
        return []           # old AnkiDroid packages have no media map
    with package_entry(archive, "media") as f:
        raw = f.read(JSON_PAYLOAD_MAX)
    try:
        if latest:
            listing = bytearray()
            zstd.decompress_stream(io.BytesIO(raw).read, listing.extend, JSON_PAYLOAD_MAX)
            # MediaEntries.entries; an entry is zip entry <its index>, or the number in
            # its legacy_zip_filename (255) when that is set, as Anki reads it.
            media = [(str(pb_uint32(entry, 255) if pb_present(entry, 255) else index),
                      pb_string(entry, 1))
                     for index, entry in enumerate(pb_messages(proto_fields(bytes(listing)), 1))]
        else:
            # {zip entry: file name}; the numbers in order, for the usns they get.
            media = sorted(json.loads(raw.decode("utf-8")).items(),
                           key=lambda item: (len(item[0]), item[0]))
    except (ValueError, AttributeError, CorruptCollection):     # ZstdError is a ValueError
        raise PackageError("its media list cannot be read") from None
    names = set()
    for entry_name, media_name in media:
        try:
            check_media_name(media_name)
        except SyncError as e:
            raise PackageError("its media list names a file ankisync cannot store (%s)"
                               % e.reason) from None
        if media_name in names:
            raise PackageError("its media list names %r twice" % media_name[:QUOTED_MAX])
        names.add(media_name)
        if entry_name not in entries:
            raise PackageError("its media list names entry %r for %r, which it does not hold"
                               % (entry_name[:QUOTED_MAX], media_name[:QUOTED_MAX]))
    return media


def add_media_files(store, files):
    """[(name, temp path)] into the user's media, each a change every device downloads;
    a file that is there with the same content stays as it is. Returns how many came."""
    changes = []
    for name, path in files:
        digest = hashlib.sha1()
        with open(path, "rb") as f:
            copy_stream(f.read, digest.update)
        changes.append((name, path, digest.digest(), os.path.getsize(path), False))
    before = store.usn()
    return store.apply(changes) - before


def import_ankisyncd(config, root, zstd):
    """Users, collections and media of an ankisyncd (or anki-sync-server-rs) data folder:
    <root>/auth.db and <root>/collections/<user>/. Old password hashes keep working and
    become PBKDF2 at each user's first login. Returns [(user, what they got, [what went
    wrong, naming the file])]. An auth.db that cannot be read raises PackageError, naming
    it, before any user is added."""
    auth = os.path.join(root, "auth.db")
    collections = os.path.join(root, "collections")
    if not os.path.isdir(root):
        raise PackageError("%s: no such folder" % root)
    for path in (auth, collections):
        if os.path.islink(path):
            raise PackageError("%s: %s: put the %s itself there" % (
                path, NOT_FOLLOWED, "file" if path == auth else "folder"))
    if not os.path.isfile(auth):
        raise PackageError("%s: no auth.db in it: give the folder that holds ankisyncd's "
                           "auth.db and collections/" % root)
    try:
        db = sqlite3.connect("file:%s?mode=ro" % urllib.parse.quote(os.path.abspath(auth)),
                             uri=True)
        try:
            columns = [row[1] for row in db.execute("pragma table_info(auth)")]
            column = "username" if "username" in columns else "user"
            rows = db.execute("select %s, hash from auth" % column).fetchall()
        finally:
            db.close()
    except sqlite3.DatabaseError as e:
        raise PackageError("%s: not ankisyncd's auth.db (%s)" % (auth, e)) from None
    # Every row is checked first: a bad one found halfway would leave half the users added.
    users, accounts = UserStore(config.data), []
    for name, old_hash in rows:
        try:
            normalize_username(name if isinstance(name, str) else "")
            accounts.append((name, ankisyncd_phc(name, old_hash)))
        except ValueError as e:
            raise PackageError("%s: %s" % (auth, e)) from None
    if accounts and not os.path.isdir(collections):
        raise PackageError("%s: no collections/ folder beside auth.db: give the folder that "
                           "holds both (ankisyncd's data_root)" % root)
    report = []
    for name, phc in accounts:
        if users.exists(name):
            report.append((name, "skipped: there is a user of that name already", []))
            continue
        users.add(name, phc=phc, source="ankisyncd")
        folder = UserFolder(config, users.canonical(name))
        source = os.path.join(collections, name)
        report.append((name,) + import_ankisyncd_user(folder, source))
    return report


def ankisyncd_phc(name, old_hash):
    """ankisyncd's sha256(name + password + salt) hex followed by its 16-hex salt, kept
    as a PHC-style string verify_password knows."""
    if not (isinstance(old_hash, str) and len(old_hash) == 80):
        raise ValueError("%r: the password hash in auth.db is not ankisyncd's" % name)
    return "$%s$%s$%s$%s" % (ANKISYNCD_SCHEME, b64_nopad(name.encode("utf-8")),
                             old_hash[64:], old_hash[:64])


NOT_FOLLOWED = "a symbolic link, which import-ankisyncd does not follow"


def import_ankisyncd_user(folder, source):
    """One user's collection and media files: (what happened, in words; [what went wrong,
    a line naming the file]). A collection that cannot be used stays behind: the user's
    first device uploads its own. No symbolic link is followed: one in an old data folder
    could carry any file of the machine (another user's, the admin's keys) to a user's
    devices."""
    collection = os.path.join(source, "collection.anki2")
    link = next((path for path in (source, collection) if os.path.islink(path)), None)
    if link is not None:
        return ("collection not imported (%s): the first device uploads" % NOT_FOLLOWED,
                ["%s: %s (%s's first device uploads instead)" % (link, NOT_FOLLOWED,
                                                                 folder.name)])
    if not os.path.exists(collection):
        return "no collection: the first device uploads", []
    fd, temp = tempfile.mkstemp(prefix=TEMP_BACKUP, suffix=".anki2", dir=folder.path)
    os.close(fd)
    try:
        why, counts = ankisyncd_collection(collection, temp, folder.config.max_decompressed)
        if why is not None:
            return ("collection not imported (%s): the first device uploads" % why,
                    ["%s: %s (%s's first device uploads instead)" % (collection, why,
                                                                     folder.name)])
        with folder.locked():
            folder.collection.replace_with(temp)
        files, refused, left = ankisyncd_media(folder, source)
        notes, cards = counts
        return "%d notes, %d cards, %d media files%s" % (
            notes, cards, files, " (%d left behind: names ankisync cannot store)" % refused
            if refused else ""), left
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
        remove_side_files(temp)


def ankisyncd_collection(collection, temp, limit):
    """(None, (notes, cards)) with the collection copied to `temp` as schema 11, or (why
    it cannot be used, None). The limit is a sync's: a bigger one no device could sync."""
    if not os.path.isfile(collection):
        return "not a file", None
    if os.path.getsize(collection) > limit:
        return ("over %d MiB, the largest collection this server takes (3 times "
                "max_payload_mb)" % (limit // MIB)), None
    try:
        counts = snapshot_collection(collection, temp)
        prepare_collection_file(temp)
    except CorruptCollection as e:
        return ("not an Anki collection" if e.reason == UPLOAD_CORRUPT else e.reason), None
    except sqlite3.DatabaseError as e:          # not SQLite at all, no notes table...
        return "not a readable Anki collection: %s" % e, None
    return None, counts


def ankisyncd_media(folder, source):
    """The media files of the user's old folder into their media: (files added, files
    left behind for names no client could sync, [a line naming the files not imported]):
    symbolic links, and files over MEDIA_FILE_MAX, which no sync would take either."""
    media = os.path.join(source, "media")
    if not (os.path.isdir(media) or os.path.islink(media)):
        media = os.path.join(source, "collection.media")
    if os.path.islink(media):
        return 0, 0, ["%s: %s (no media files of %s imported)" % (media, NOT_FOLLOWED,
                                                                  folder.name)]
    if not os.path.isdir(media):
        return 0, 0, []
    incoming, refused, left = [], 0, []
    try:
        for name in sorted(os.listdir(media)):
            path = os.path.join(media, name)
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                left.append((name, "a symbolic link, not followed"))
                continue
            if name.startswith(".") or not stat.S_ISREG(info.st_mode):
                continue
            try:
                check_media_name(name)
            except SyncError:
                refused += 1        # no client could have synced it either
                continue
            too_big = "over %d MiB, the largest a sync takes" % (MEDIA_FILE_MAX // MIB)
            if info.st_size > MEDIA_FILE_MAX:
                left.append((name, too_big))
                continue
            fd, copy = tempfile.mkstemp(prefix=TEMP_INCOMING, dir=folder.path)
            os.close(fd)
            incoming.append((name, copy))
            if not copy_file_at_most(path, copy, MEDIA_FILE_MAX):   # it grew meanwhile
                left.append((name, too_big))
                os.unlink(incoming.pop()[1])
        with folder.locked():
            store = MediaStore(folder.path)
            store.start_above_devices()
            files = add_media_files(store, incoming)
            store.close()
    finally:
        for _, copy in incoming:
            if os.path.exists(copy):
                os.unlink(copy)
    return files, refused, [left_out(media, folder.name, left)] if left else []


def copy_file_at_most(path, target, limit):
    """The file at `path`, never through a symbolic link, copied to `target` up to
    `limit` bytes: False past them."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with open(fd, "rb") as src, open(target, "wb") as out:
        return copy_at_most(src.read, out.write, limit)


def left_out(media, user, left):
    """A part of the error line: the media files not imported (the first NAMED_AT_MOST
    named) and why."""
    named = ", ".join("%s (%s)" % (name[:QUOTED_MAX], why) for name, why in left[:NAMED_AT_MOST])
    more = " and %d more" % (len(left) - NAMED_AT_MOST) if len(left) > NAMED_AT_MOST else ""
    return "%s: %d files not imported into %s's media: %s%s" % (media, len(left), user, named,
                                                                more)


# ---------------------------------------------------------------------------
# HTTP
#   The server's parts by who owns them: SyncApp (the users' syncers, the
#   dispatch), routing that forgives what users type, the front page, the
#   listener that holds every idle connection, and the workers that answer.
# ---------------------------------------------------------------------------

class SyncApp:
    """The server's state: configuration, users, zstd backend, and per-user syncers."""

    def __init__(self, config, zstd=None):
        self.config = config
        os.makedirs(config.data, exist_ok=True)
        self.users = UserStore(config.data)
        self.ip_header = ip_header_name(config.ip_header)
        self.accounts = Accounts(self.users, self.shared_address)
        self.proxy_notices = Notices()
        self.zstd = zstd or choose_zstd(config.zstd)
        self.spool_folder = os.path.join(config.data, ".tmp")
        os.makedirs(self.spool_folder, exist_ok=True)
        self.envelopes = Envelopes(self.accounts, self.zstd, self.spool_folder, config)
        self.metrics = Metrics()
        self._clean_leftovers()
        private_modes(config.data)
        self._collections = {}
        self._media = {}
        self._registry_lock = threading.Lock()
        self.base_path = config.normalized_base_path()
        self.pages = Pages(self)
        # The notice set on the admin page, kept in the data folder, wins over the ini's.
        self.ini_notice = config.notice
        config.notice = self.notice_override() or config.notice
        self.admin = AdminPage(self)
        self.recent_log = None          # a RecentLog, when `serve` runs with admin_token
        self.serving = 0                # requests being dispatched now
        self.downloads_of = {}           # user -> downloads being dispatched or answered
        self.later = Later()

    def _clean_leftovers(self):
        """Temporary files of a server that was killed mid-request, looked for only where
        the server makes them: never in media/, where a device names its files as it likes
        (`.backup-notes.txt` is a picture's name there, not a leftover)."""
        data = self.config.data
        folders = [data, self.spool_folder]
        for entry in os.scandir(data):
            if entry.is_dir(follow_symlinks=False) and entry.path != self.spool_folder:
                folders += [entry.path, os.path.join(entry.path, BACKUP_FOLDER)]
        for folder in folders:
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue
            for entry in entries:
                if (entry.name.startswith(TEMP_PREFIXES) or entry.name.endswith(TEMP_CONVERT)) \
                        and entry.is_file(follow_symlinks=False):
                    try:
                        os.unlink(entry.path)
                    except OSError:
                        pass

    def notice_override(self):
        """The notice the admin page set, or ''."""
        try:
            with open(os.path.join(self.config.data, NOTICE_FILE), encoding="utf-8") as f:
                return f.read()
        except FileNotFoundError:
            return ""
        except (OSError, UnicodeDecodeError) as e:
            log.warning("the admin page's notice is unreadable, the ini's applies: %s", e)
            return ""

    def set_notice(self, text):
        """The admin page's notice: kept for the next start, and every sync from now on
        shows it; empty, the ini's notice comes back. What happened, to log and show."""
        # A line break is a line on the device; other control characters show as boxes.
        text = re.sub(r"[\x00-\x09\x0b-\x1f\x7f]", "", text.replace("\r\n", "\n")).strip()
        if len(text) > NOTICE_MAX:
            raise ValueError("a notice of %d characters: at most %d" % (len(text), NOTICE_MAX))
        path = os.path.join(self.config.data, NOTICE_FILE)
        if text:
            write_atomically(path, text.encode("utf-8"), TEMP_UPLOAD)
            self.config.notice = text
            return "set the notice: %r" % text[:QUOTED_MAX]
        if os.path.exists(path):
            os.unlink(path)
        self.config.notice = self.ini_notice
        return "removed the notice set here; the ini's applies: %r" % self.ini_notice[:QUOTED_MAX]

    def user_folder(self, user):
        """Made when first written to, not here: a login must work on a full disk."""
        return os.path.join(self.config.data, folder_name(user))

    def collection_for(self, user):
        media = self.media_for(user)
        with self._registry_lock:
            if user not in self._collections:
                self._collections[user] = CollectionSync(
                    self.user_folder(user), media, self.config, self.busy, self.later.submit)
            return self._collections[user]

    def media_for(self, user):
        with self._registry_lock:
            if user not in self._media:
                self._media[user] = MediaStore(self.user_folder(user))
            return self._media[user]

    def expire_idle_sessions(self):
        with self._registry_lock:
            syncers = list(self._collections.values())
            stores = list(self._media.values())
        for syncer in syncers:
            syncer.expire_idle(self.config.session_timeout)
        for store in stores:
            store.close_if_idle(time.monotonic() - USER_IDLE)

    # -- the request path ---------------------------------------------------

    def dispatch(self, req):
        """Run a decoded request; decode() has checked its key already."""
        with self._registry_lock:
            self.serving += 1
        try:
            return self._dispatch(req)
        finally:
            with self._registry_lock:
                self.serving -= 1

    def busy(self):
        """True while another request than the caller's is being answered."""
        return self.serving > 1

    @contextlib.contextmanager
    def turn_of(self, req):
        """For a download, one of the USER_DOWNLOADS_MAX a user may have answered at once:
        past them a 409, so one account's slow readers cannot hold every worker. Other
        answers are small, and leave at once."""
        if req.method not in DOWNLOADS:
            yield
            return
        with self.download_turn(req.user):
            yield

    @contextlib.contextmanager
    def download_turn(self, user):
        """One of the user's USER_DOWNLOADS_MAX downloads, by a device or the account page."""
        with self._registry_lock:
            if self.downloads_of.get(user, 0) >= USER_DOWNLOADS_MAX:
                raise SyncError(409, "this user has %d downloads in progress already: sync "
                                "again when the other devices are done" % USER_DOWNLOADS_MAX)
            self.downloads_of[user] = self.downloads_of.get(user, 0) + 1
        try:
            yield
        finally:
            with self._registry_lock:
                left = self.downloads_of.pop(user) - 1
                if left:
                    self.downloads_of[user] = left

    def _dispatch(self, req):
        if req.area == "sync" and COLLECTION_METHODS.get(req.method) == "login":
            return self.accounts.hostKey(req)
        if req.area == "sync":
            syncer = self.collection_for(req.user)
            reply = syncer.handle(req)
            if req.method in SYNC_EVENTS:
                self.record(req, SYNC_EVENTS[req.method], syncer.client_of(req))
            return reply
        return MediaSync(self.media_for(req.user), self.spool_folder,
                         self.config.max_decompressed, self.config.quota_media_mb * MIB,
                         moved_address(self.config.moved_to)).handle(req)

    def active_sessions(self):
        with self._registry_lock:
            return sum(1 for syncer in self._collections.values() if syncer.session is not None)

    def record(self, req, kind, client):
        """A finished sync, for `status`: its loss (a full disk, a lock) costs nothing."""
        self.metrics.synced(kind)
        try:
            self.users.saw(req.user, req.hkey, client, req.address, kind)
        except sqlite3.Error as e:
            log.debug("not recorded: %s of %s (%s)", kind, req.user, e)

    def client_address(self, headers, peer):
        """The TCP peer; from a trusted proxy, the address in the header the admin named.
        Anyone else could write any address there, and so dodge the login guard or
        pass for this machine at /metrics."""
        if not (self.ip_header and self.is_proxy(peer)):
            return peer
        forwarded = forwarded_address(headers, self.ip_header)
        if not forwarded:
            self.proxy_notices.warn(peer, "ip_header is %s, but a request from the proxy %s "
                                    "has no %s header: its address is the proxy's, so failed "
                                    "logins there are limited per user only, not per address"
                                    % (self.config.ip_header, peer, self.ip_header))
        return forwarded or peer

    def page_address(self, headers, peer, scheme):
        """(the address the browser used, or None without a Host; True if it came through
        a proxy). A trusted proxy's X-Forwarded-Proto and -Host (or Forwarded's proto= and
        host=) are believed when ip_header is set, as its X-Forwarded-For is."""
        proxied = self.is_proxy(peer) and any(headers.get(name) for name in PROXY_HEADERS)
        host = headers.get("Host")
        if proxied and self.ip_header:
            said_scheme, said_host = forwarded_origin(headers)
            scheme, host = said_scheme or scheme, said_host or host
        if not host:
            return None, proxied
        return "%s://%s%s" % (scheme, host, self.base_path), proxied

    def shared_address(self, address):
        """True for a trusted proxy's own address behind which everyone logs in (see
        LoginGuard): with ip_header set, a request from the proxy that lacks it, or one
        from a browser on the proxy's own machine."""
        return bool(self.ip_header) and self.is_proxy(address)

    def is_proxy(self, peer):
        try:
            address = ipaddress.ip_address(peer.split("%")[0])
        except ValueError:
            return False
        return any(address in network for network in self.config.trusted_proxies
                   if network.version == address.version)


class Notices:
    """Warnings about a client, each logged at most once a NOTICE_REPEAT per address: an
    attacker repeating a mistake must not fill the log."""

    def __init__(self):
        self.until = {}
        self.lock = threading.Lock()

    def warn(self, about, text, *args):
        now = time.monotonic()
        with self.lock:
            if self.until.get((about, text), 0) > now:
                return
            _bounded(self.until, (about, text), now + NOTICE_REPEAT)
        log.warning(text, *args)


class Later:
    """Work done after an answer has gone, one job at a time on a thread of its own."""

    def __init__(self):
        self.jobs = queue.SimpleQueue()
        self.thread = None
        self.lock = threading.Lock()

    def submit(self, job):
        self.jobs.put(job)
        with self.lock:
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="ankisync-later",
                                               daemon=True)
                self.thread.start()

    def _run(self):
        while True:
            job = self.jobs.get()
            try:
                job()
            except Exception:
                log.exception("background job failed")


def is_loopback(address):
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


class Metrics:
    """What /metrics reports, counted as requests are answered; the rest is read when
    it is asked for."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = {}              # (method, status) -> count
        self.durations = {}             # method -> [count per bucket..., sum, count]
        self.syncs = {}                 # kind -> count
        self.received = self.sent = 0

    def request(self, what, status, received, sent, seconds):
        with self.lock:
            key = (what, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            row = self.durations.setdefault(what, [0] * len(METRICS_BUCKETS) + [0.0, 0])
            for i, bound in enumerate(METRICS_BUCKETS):
                if seconds <= bound:
                    row[i] += 1
            row[-2] += seconds
            row[-1] += 1
            self.received += received
            self.sent += sent

    def synced(self, kind):
        with self.lock:
            self.syncs[kind] = self.syncs.get(kind, 0) + 1

    def render(self, app):
        lines = []

        def metric(name, kind, text, samples):
            lines.extend(["# HELP %s %s" % (name, text), "# TYPE %s %s" % (name, kind)])
            for labels, value in samples:
                shown = ",".join('%s="%s"' % (k, label_value(v)) for k, v in labels)
                lines.append("%s%s %s" % (name, "{%s}" % shown if shown else "", value))

        with self.lock:
            requests = sorted(self.requests.items())
            durations = sorted((k, list(v)) for k, v in self.durations.items())
            syncs = sorted(self.syncs.items())
            received, sent = self.received, self.sent
        metric("ankisync_requests_total", "counter", "Requests answered, by method and status.",
               [((("method", m), ("status", str(st))), n) for (m, st), n in requests])
        buckets = []
        for method, row in durations:
            for bound, count in zip(METRICS_BUCKETS, row):
                buckets.append(((("method", method), ("le", repr(bound))), count))
            buckets.append(((("method", method), ("le", "+Inf")), row[-1]))
        lines.extend(["# HELP ankisync_request_duration_seconds Time to answer a request.",
                      "# TYPE ankisync_request_duration_seconds histogram"])
        for labels, value in buckets:
            lines.append('ankisync_request_duration_seconds_bucket{method="%s",le="%s"} %d'
                         % (label_value(labels[0][1]), labels[1][1], value))
        for method, row in durations:
            lines.append('ankisync_request_duration_seconds_sum{method="%s"} %r'
                         % (label_value(method), row[-2]))
            lines.append('ankisync_request_duration_seconds_count{method="%s"} %d'
                         % (label_value(method), row[-1]))
        metric("ankisync_syncs_total", "counter", "Syncs finished, by kind.",
               [((("kind", kind),), n) for kind, n in syncs])
        metric("ankisync_received_bytes_total", "counter", "Request body bytes received.",
               [((), received)])
        metric("ankisync_sent_bytes_total", "counter", "Answer bytes sent.", [((), sent)])
        metric("ankisync_failed_logins_total", "counter", "Logins refused: a wrong password "
               "or user name.", [((), sum(n for (m, st), n in requests
                                          if m == "sync/hostKey" and st == 403))])
        metric("ankisync_throttled_total", "counter", "Requests refused with 429 (password "
               "guessing).", [((), sum(n for (m, st), n in requests if st == 429))])
        metric("ankisync_throttled_addresses", "gauge", "Addresses locked out after failed "
               "logins.", [((), app.accounts.guard.throttled())])
        metric("ankisync_active_sessions", "gauge", "Normal syncs in progress.",
               [((), app.active_sessions())])
        users = app.users.names()
        metric("ankisync_users", "gauge", "Users.", [((), len(users))])
        sizes = []
        for name in users:
            folder = os.path.join(app.config.data, folder_name(name))
            collection = os.path.join(folder, "collection.anki2")
            sizes.append((name, os.path.getsize(collection) if os.path.exists(collection)
                          else 0, media_totals(os.path.join(folder, "media.db"))[1]))
        metric("ankisync_collection_bytes", "gauge", "Size of each user's collection.",
               [((("user", name),), size) for name, size, _ in sizes])
        metric("ankisync_media_bytes", "gauge", "Bytes of each user's media files.",
               [((("user", name),), media) for name, _, media in sizes])
        metric("ankisync_disk_free_bytes", "gauge", "Free space where the data folder is.",
               [((), free_space(app.config.data))])
        return "\n".join(lines) + "\n"


def label_value(value):
    """A Prometheus label value: backslash, quote and newline escaped."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def forwarded_address(headers, name):
    """The client's address as the proxy told it, or "" when the header is not there.

    Proxies append, so the rightmost entry is the one the nearest proxy wrote; an
    entry further left is whatever the client claimed.
    """
    value = headers.get(name, "") if name else ""
    entry = value.split(",")[-1].strip()
    if name == "forwarded":
        match = re.search(r'for="?\[?([^\]";]+)', entry, re.IGNORECASE)
        entry = match.group(1) if match else ""
    elif name == "cloudfront-viewer-address":
        entry = entry.rpartition(":")[0]            # "ip:port", also for IPv6
    return entry.strip()[:ADDRESS_MAX]


# Headers only a proxy adds: a page asked for with one of them came through a proxy.
PROXY_HEADERS = ("X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "Forwarded",
                 "X-Real-IP", "Via")
FORWARDED_HOST = re.compile(r"(?:[A-Za-z0-9._~-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


def forwarded_origin(headers):
    """(scheme, host) a proxy says the browser asked for, None where it says nothing; of
    each header, the value the nearest proxy added (the last), as for ip_header."""
    scheme = headers.get("X-Forwarded-Proto", "").split(",")[-1].strip()
    host = headers.get("X-Forwarded-Host", "").split(",")[-1].strip()
    for pair in headers.get("Forwarded", "").split(",")[-1].split(";"):
        key, _, value = pair.partition("=")
        key, value = key.strip().lower(), value.strip().strip('"')
        if key == "proto":
            scheme = scheme or value
        elif key == "host":
            host = host or value
    if scheme and scheme.lower() not in ("http", "https"):
        raise bad_request("the proxy's forwarded scheme %r is neither http nor https"
                          % scheme[:QUOTED_MAX])
    if host and (len(host) > FORWARDED_HOST_MAX or not FORWARDED_HOST.fullmatch(host)):
        raise bad_request("the proxy's forwarded host %r is no host name" % host[:QUOTED_MAX])
    return scheme.lower() or None, host or None


def route(path, base_path):
    """(area, method) for a sync URL; ('page', name) for the rest (docs/protocol.md 2).

    The method name alone decides, since collection and media methods have distinct
    names. So whatever users type and proxies send still arrives: double and
    trailing slashes, prefixes (`/anki/sync/meta`), `.../sync/` typed as the modern
    endpoint (`/sync/sync/meta`), a legacy endpoint without its slash (`/syncmeta`),
    a media URL without `msync/` (`/begin`).
    """
    path = path.split("?", 1)[0]      # not urlsplit: it reads '//sync/...' as a host name
    segments = [s for s in path.split("/") if s]
    prefix = [s for s in base_path.split("/") if s]
    if segments[:len(prefix)] == prefix:
        segments = segments[len(prefix):]
    if segments in ([], ["index.html"]):
        return "page", "index"
    if segments == ["health"]:
        return "page", "health"
    if segments == ["metrics"]:
        return "page", "metrics"
    if segments in (["ca.pem"], ["ca.crt"]):
        return "page", segments[0]
    if "/".join(segments) in PAGES:
        return "page", "/".join(segments)
    method = segments[-1]
    for glued in ("msync", "sync"):
        if method.startswith(glued) and (method[len(glued):] in COLLECTION_METHODS
                                         or method[len(glued):] in MEDIA_METHODS):
            method = method[len(glued):]
    if method in COLLECTION_METHODS:
        return "sync", method
    if method in MEDIA_METHODS:
        return "msync", method
    if len(segments) >= 2 and segments[-2] in ("sync", "msync"):
        raise SyncError(404, "unknown sync method %r" % method[:QUOTED_MAX])
    raise SyncError(404, "nothing here: sync clients use %ssync/ and %smsync/"
                    % (base_path, base_path))


def front_page(config, reached=None, scheme="http", proxied=False):
    """The one page a user needs: this server's addresses, each with a copy button, and
    what to enter in each client; readable on a phone.

    `reached`: the address the browser used (Host is the client's to choose), None
    without a Host; `proxied`: it came through a reverse proxy, so this machine's own
    addresses are no one's to type. public_url, when set, is the one address shown."""
    path = config.normalized_base_path()
    notes = []
    if config.public_url:
        addresses = [(config.public_address(), "this server's address")]
    elif proxied:
        addresses = [(reached or "%s://HOST%s" % (scheme, path),
                      "as this browser reached it, through a proxy")]
        if not config.ip_header:
            notes.append("This page came through a reverse proxy, and ip_header is not set: "
                         "the address above may be the proxy's way in, not yours. Set "
                         "ip_header (or public_url) in the ini, as the README's proxy "
                         "section shows.")
    else:
        addresses = [(reached or "%s://HOST:%d%s" % (scheme, config.port, path),
                      "as this browser reached it")]
        if in_container():
            notes.append("ankisync runs in a container: phones and other computers use "
                         "this computer's address, port %d (or the port published with "
                         "<code>-p</code>): <code>%s://HOST:%d%s</code>, HOST that address. "
                         "The container cannot know it; set public_url to show it here."
                         % (config.port, scheme, config.port, html.escape(path)))
        else:
            for address, where in addresses_to_show(config.host):
                url = "%s://%s:%d%s" % (scheme, url_host(address), config.port, path)
                if url != addresses[0][0]:
                    addresses.append((url, where.strip("()")))
    # A page opened on the server itself shows the address phones need in the rows.
    reachable = [url for url, where in addresses if "ankisync runs on" not in where
                 and not re.match(r"^\w+://(localhost|127\.|\[::1\])", url)]
    base = html.escape(reachable[0] if reachable else addresses[0][0])
    listed = "\n".join(
        '<li><code>%s</code> <button onclick="copy(this)" data-url="%s">copy</button> '
        '<small>%s</small></li>' % (html.escape(url), html.escape(url), html.escape(where))
        for url, where in addresses)
    listed += "".join("\n<li>%s</li>" % note for note in notes)
    adduser = ("docker exec -it &lt;container&gt; python ankisync.py adduser NAME"
               if in_container() else "python3 ankisync.py adduser NAME")
    rows = [
        ("Anki 2.1.57 and later (23.x to 26.x)",
         "Preferences &rarr; Syncing &rarr; Self-hosted sync server: <code>%s</code>" % base),
        ("AnkiDroid 2.16 and later",
         "Settings &rarr; Sync &rarr; Custom sync server: <code>%s</code>" % base),
        ("AnkiMobile", "Settings &rarr; Syncing &rarr; Custom server: <code>%s</code>" % base),
        ("Anki 2.1.28 to 2.1.56",
         "start Anki with <code>SYNC_ENDPOINT=%ssync/</code> and "
         "<code>SYNC_ENDPOINT_MEDIA=%smsync/</code>" % (base, base)),
        ("Anki 2.1.22 to 2.1.26",
         "an add-on (<code>addons21/custom_sync/__init__.py</code>): <code>import anki.sync, "
         "aqt.mediasync; anki.sync.SYNC_BASE = aqt.mediasync.SYNC_BASE = \"%s%%s\"</code>"
         % base),
        ("Anki 2.1.0 to 2.1.21",
         "an add-on (<code>addons21/custom_sync/__init__.py</code>): <code>import anki.sync; "
         "anki.sync.SYNC_BASE = \"%s%%s\"</code>" % base),
        ("Anki 2.0",
         "an add-on (<code>addons/custom_sync.py</code>): <code>import anki.sync; "
         "anki.sync.SYNC_BASE = \"%s\"; anki.sync.SYNC_MEDIA_BASE = \"%smsync/\"</code>"
         % (base, base)),
        ("AnkiDroid 2.15 and older",
         "Settings &rarr; Advanced &rarr; Custom sync server, tick Use custom sync server: "
         "Sync url <code>%s</code>, Media sync url <code>%smsync/</code>" % (base, base)),
    ]
    items = "\n".join("<tr><th>%s</th><td>%s</td></tr>" % row for row in rows)
    trust = trust_block(config) if scheme == "https" else ""
    return ("""<!doctype html>
<html><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ankisync</title>
<link rel="icon" href="data:,">
<style>body{font:16px/1.5 system-ui,sans-serif;max-width:56em;margin:1em auto;padding:0 1em}
th{text-align:left;font-weight:600;padding:.6em 0 0}td{padding:0 0 .6em;border-bottom:1px solid
#ddd}tr{display:block}th,td{display:block}code{background:#f3f3f3;overflow-wrap:anywhere}
ul{padding-left:1.2em}button{font-size:.8em}</style>
<script>
// navigator.clipboard exists only on pages served over HTTPS or from this machine; a
// phone on the LAN opens plain HTTP, where the copy goes through a hidden text field,
// and failing that the address is selected for the user to copy.
function copy(b){var url=b.dataset.url;
if(navigator.clipboard&&window.isSecureContext){navigator.clipboard.writeText(url).then(
function(){b.textContent="copied"},function(){fallback(b,url)})}else{fallback(b,url)}}
function fallback(b,url){var t=document.createElement("textarea"),ok=false;t.value=url;
t.setAttribute("readonly","");t.style.position="fixed";t.style.opacity="0";
document.body.appendChild(t);t.select();try{ok=document.execCommand("copy")}catch(e){}
document.body.removeChild(t);if(ok){b.textContent="copied";return}
var r=document.createRange();r.selectNodeContents(b.previousElementSibling);
var s=window.getSelection();s.removeAllRanges();s.addRange(r);
b.textContent="selected: copy it"}
</script>
</head><body>
<h1>ankisync %s is running</h1>
<p>This server's addresses:</p>
<ul>%s</ul>
<p>Log in from each device with a user made by <code>%s</code>.
What to enter, by client:</p>
<table>%s</table>
<p>The trailing slash matters for modern clients: without it they drop the last part
of the path.</p>
<p>Your collection, devices and restore points, your password and tokens for dashboards:
the <a href="%saccount">account page</a> (log in with your sync name and password).</p>
%s</body></html>
""" % (__version__, listed, adduser, items, html.escape(path), trust)).encode("utf-8")


def trust_block(config):
    """The front page's part on trusting a private CA (tls = self-signed): where to get
    it and, per client, how to trust it. Empty when the certificate is someone else's."""
    if private_ca(config) is None:
        return ""
    path = config.normalized_base_path()
    rows = [
        ("AnkiDroid 2.18 and later",
         "Settings &rarr; Sync &rarr; Custom sync server: paste the whole text of "
         "<a href=\"%sca.pem\">ca.pem</a> into its certificate setting" % path),
        ("AnkiDroid 2.16 and older",
         "Android's settings &rarr; Security &rarr; Encryption &amp; credentials &rarr; Install a "
         "certificate &rarr; CA certificate: pick <a href=\"%sca.crt\">ca.crt</a> "
         "(AnkiDroid 2.17 trusts neither way: update it)" % path),
        ("Anki on a computer",
         "save <a href=\"%sca.pem\">ca.pem</a> and start Anki with <code>SSL_CERT_FILE=</code>"
         "its path: Anki then trusts only the certificates in that file (append your system's "
         "bundle to it for AnkiWeb). Anki 2.1.54 and older reach HTTPS by the machine's name "
         "only, not by its address" % path),
        ("AnkiMobile (iPhone, iPad)",
         "open <a href=\"%sca.crt\">ca.crt</a> in Safari and allow the profile; Settings "
         "&rarr; General &rarr; VPN &amp; Device Management: install it; then Settings &rarr; "
         "General &rarr; About &rarr; Certificate Trust Settings: turn on full trust for it"
         % path),
    ]
    items = "\n".join("<tr><th>%s</th><td>%s</td></tr>" % row for row in rows)
    return """<h2>Trusting this server's certificate</h2>
<p>Its HTTPS certificate comes from a private certificate authority made for this server:
<a href="%sca.pem">ca.pem</a> (<a href="%sca.crt">ca.crt</a> for phones). Each device
trusts it once; a new certificate for a new address needs nothing more.</p>
<table>%s</table>
""" % (path, path, items)


# --- Pages: /account in a browser, /api/stats for dashboards ---------------------------
#
# A request for a page comes in at Handler.serve like any other; Pages.answer reads its
# cookies, checks its form (size, CSRF token, origin) and its login, and answers a
# PageAnswer, which the handler writes. The sync server's limits apply as to any request:
# the listener read the head, the body is a small form (PAGE_FORM_MAX), and a password
# goes through the LoginGuard that throttles sync logins: a guess here counts there.

PAGES = ("account", "account/collection.colpkg", "api/stats", "admin")


class PageAnswer:
    """What a page answers: a status, headers, and a body or a file to stream (and then
    delete: a download's temporary package)."""

    def __init__(self, status, body=b"", content_type="text/html; charset=utf-8",
                 headers=(), file=None):
        self.status, self.body, self.content_type = status, body, content_type
        self.headers, self.file = list(headers), file


class PageRequest:
    """What Pages needs of a request: its verb, headers, client address, whether it came
    over TLS (directly, or to a trusted proxy that says so), and its body."""

    def __init__(self, verb, headers, address, secure, body, page, query="", host=None):
        self.verb, self.headers, self.address = verb, headers, address
        self.secure, self.body, self.page = secure, body, page
        self.query = query_fields(query)
        # The host the browser asked for: its Host, or what a trusted proxy forwards.
        self.host = headers.get("Host", "") if host is None else host
        self.cookies = {}
        for part in headers.get("Cookie", "").split(";"):
            name, sep, value = part.strip().partition("=")
            if sep and name not in self.cookies:
                self.cookies[name] = value


def query_fields(query):
    """A page's query (which restore point to download): a few short fields, or a 400;
    never ignored, lest a point asked for be answered with the collection of today."""
    try:
        if len(query) > QUERY_MAX:
            raise ValueError("over %d characters" % QUERY_MAX)
        return dict(urllib.parse.parse_qsl(query, keep_blank_values=True,
                                           strict_parsing=bool(query),
                                           max_num_fields=PAGE_FORM_FIELDS, errors="strict"))
    except ValueError as e:             # UnicodeDecodeError too
        raise bad_request("a malformed query: %s" % str(e)[:QUOTED_MAX])


PAGE_STYLE = """
body{font:16px/1.5 system-ui,sans-serif;max-width:48em;margin:1em auto;padding:0 1em}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.2em .6em .2em 0;
border-bottom:1px solid #ddd;vertical-align:top}code{background:#f3f3f3;overflow-wrap:anywhere}
input{font-size:1em;max-width:100%}form{margin:.6em 0}.note{background:#fff3cd;padding:.6em}
li{margin:.3em 0}.wide{overflow-x:auto}pre{white-space:pre-wrap;overflow-wrap:anywhere;
font-size:.8em}textarea{width:100%;box-sizing:border-box;font:inherit}
h1,h3,li,td{overflow-wrap:anywhere}button{padding:.4em .8em}"""

# No script, no frame, no outside resource: a page of ours can only be itself.
PAGE_HEADERS = (
    ("Cache-Control", "no-store"),
    ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; "
                                "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "same-origin"),
)


def page_html(title, body):
    return ("""<!doctype html>
<html><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>%s</title><style>%s</style></head><body>
%s
</body></html>
""" % (html.escape(title), PAGE_STYLE, body)).encode("utf-8")


def when(stamp):
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp))


class Pages:
    """/account and /api/stats. A login is a signed cookie: its MAC covers the name, the
    expiry and the user's password hash, so a new password (or deleting the user) ends
    every session at once, as it ends every host key; a logout ends its own session (the
    one state kept: auth.db's page_logouts, till the cookie would have expired)."""

    page = "account"                    # the path under base_path
    session_cookie, form_cookie_name = SESSION_COOKIE, FORM_COOKIE
    said_cookie = SAID_COOKIE
    key_label = b"ankisync page sessions"
    login_fields = """<p>With the user name and password your Anki devices sync with.</p>
<p><label>User name<br><input name="name" autocomplete="username" required></label></p>
<p><label>Password<br><input name="password" type="password"
 autocomplete="current-password" required></label></p>"""

    def __init__(self, app):
        self.app = app
        self.users = app.users
        # The session key comes from auth.db's secret (0600 in the data folder), kept
        # apart from the host keys' use of it by its own label.
        self.key = hmac.new(app.users.secret, self.key_label, hashlib.sha256).digest()
        self.lifetime = int(os.environ.get(PAGE_SESSION_TEST) or PAGE_SESSION_SECONDS)
        self.path = app.base_path + self.page
        self.cookie_path = app.base_path

    def answer(self, req):
        if req.page == "api/stats":
            return self.stats(req)
        user, session = self.session_of(req)
        if req.page == "account/collection.colpkg":
            if user is None:
                return self.login_form(req, 403, "log in first")
            return self.download(user, req.query.get("point"))
        return self.form_answer(req, user, session)

    def form_answer(self, req, user, session):
        """GET: the page, or the login form; POST: a form, checked, then its action."""
        if req.verb != "POST":
            return self.home(req, user, session) if user else self.login_form(req)
        form = self.read_form(req)
        refusal = self.refusal(req, form, session if user else "")
        if refusal:
            return PageAnswer(403, page_html("ankisync", "<p>%s</p>" % html.escape(refusal)),
                              headers=PAGE_HEADERS)
        action = form.get("do")
        if action == "login":
            return self.log_in(req, form)
        if user is None:
            return self.login_form(req, 403, "log in first")
        if action == "logout":
            self.users.end_page_session(*self.mac_and_expiry(session))
            return self.redirect([self.cookie(self.session_cookie, "", req, 0)])
        return self.act(req, form, action, user, session)

    def home(self, req, user, session):
        """The page by GET: with what the last form did, shown once (see done()); or,
        asked by a button, what a restore would do: a GET, so Back comes back to it and
        no form is sent again."""
        if req.query:
            return self.ask(req, user, session)
        said, shown = self.said_of(req, session)
        extra = [self.cookie(self.said_cookie, "", req, 0)] if said or shown else []
        return self.render(req, user, session, 200, said, extra, shown)

    def phc_of(self, name):
        """The hash a session of `name` is bound to, or None: no such login."""
        row = self.users.find(name)
        return row[1] if row is not None and row[0] == name else None

    def ask(self, req, user, session):
        if req.query.get("ask") != "restore":
            raise bad_request("this page asks only before a restore: ?ask=restore&id=ID")
        return self.confirm_restore(req, user, session, user, req.query.get("id", ""))

    def act(self, req, form, action, user, session):
        if action == "password":
            return self.change_password(req, form, user, session)
        if action == "token":
            return self.new_token(req, form, user, session)
        if action == "revoke":
            labels = {tid: label for tid, label, _ in self.users.tokens(user)}
            if not self.users.revoke_token(user, form.get("id", "")):
                return self.render(req, user, session, 404, "no such token: nothing revoked")
            return self.done(req, session, "Revoked the token %s: a dashboard with it gets "
                             "401 from now on." % labels.get(form.get("id"), ""))
        if action == "restore":
            return self.restore(req, form, user, session, user)
        raise unknown_action(action)

    # -- sessions, forms and their tokens --------------------------------------------

    def session_value(self, name, phc, expires):
        mac = hmac.new(self.key, ("session\0%s\0%d\0%s" % (name, expires, phc)).encode("utf-8"),
                       hashlib.sha256).hexdigest()
        return "%s.%d.%s" % (b64url(name.encode("utf-8")), expires, mac)

    @staticmethod
    def mac_and_expiry(session):
        _, expires, mac = session.split(".")
        return mac, int(expires)

    def session_of(self, req):
        """(user, cookie value) of a valid, unexpired session, else (None, None)."""
        value = req.cookies.get(self.session_cookie, "")
        try:
            encoded, expires, mac = value.split(".")
            name = b64url_decode(encoded).decode("utf-8")
            expires = int(expires)
        except ValueError:                  # UnicodeDecodeError too
            return None, None
        phc = self.phc_of(name)
        if phc is None or expires < time.time() or \
                not same_secret(value, self.session_value(name, phc, expires)) or \
                self.users.page_session_ended(mac):
            return None, None
        return name, value

    def new_session(self, req, name):
        value = self.session_value(name, self.phc_of(name), int(time.time()) + self.lifetime)
        return self.cookie(self.session_cookie, value, req, self.lifetime), value

    def cookie(self, name, value, req, max_age):
        """HttpOnly: no script reads it; SameSite=Strict: no other site's page sends it;
        Secure over HTTPS: never sent in clear."""
        return ("Set-Cookie", "%s=%s; Path=%s; Max-Age=%d; HttpOnly; SameSite=Strict%s"
                % (name, value, self.cookie_path, max_age, "; Secure" if req.secure else ""))

    def csrf(self, form_cookie, session):
        return hmac.new(self.key, ("csrf\0%s\0%s" % (form_cookie, session or "")).encode(),
                        hashlib.sha256).hexdigest()[:CSRF_HEX]

    def form_cookie(self, req, headers):
        """The browser's form cookie, made at its first visit: tokens are bound to it (and
        to the session), so a token copied from another browser is worth nothing."""
        value = req.cookies.get(self.form_cookie_name, "")
        if not re.fullmatch(r"[A-Za-z0-9_-]{16,64}", value):
            value = secrets.token_urlsafe(24)
            headers.append(self.cookie(self.form_cookie_name, value, req, FORM_COOKIE_SECONDS))
        return value

    def refusal(self, req, form, session):
        """Why a posted form is refused, or None: it comes from another site (Origin,
        Sec-Fetch-Site), or without the token the page gave this browser."""
        origin = req.headers.get("Origin")
        if origin is not None and urllib.parse.urlsplit(origin).netloc != req.host:
            return "refused: this form was sent from another site"
        if req.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
            return "refused: this form was sent from another site"
        form_cookie = req.cookies.get(self.form_cookie_name, "")
        if not form_cookie or not same_secret(form.get("csrf", ""),
                                              self.csrf(form_cookie, session)):
            return "refused: the form's token is missing or stale: reload the page"
        return None

    def read_form(self, req):
        """A small urlencoded form, or a 4xx saying why not."""
        kind = req.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if kind != "application/x-www-form-urlencoded":
            raise SyncError(415, "a page takes forms (application/x-www-form-urlencoded) only")
        if not req.body.chunked and req.body.remaining > PAGE_FORM_MAX:
            raise body_too_large(req.body.remaining, PAGE_FORM_MAX)
        data = b""
        while True:
            block = req.body.read(PAGE_FORM_MAX + 1 - len(data))
            if not block:
                break
            data += block
            if len(data) > PAGE_FORM_MAX:
                raise SyncError(413, "a form over %d bytes is none of ours" % PAGE_FORM_MAX)
        try:
            fields = urllib.parse.parse_qs(data.decode("utf-8"), keep_blank_values=True,
                                           strict_parsing=True, max_num_fields=PAGE_FORM_FIELDS,
                                           errors="strict") if data else {}
        except ValueError as e:             # UnicodeDecodeError too
            raise bad_request("a malformed form: %s" % str(e)[:QUOTED_MAX])
        if any(len(values) > 1 for values in fields.values()):
            raise bad_request("a form field given twice")
        return {name: values[0] for name, values in fields.items()}

    def redirect(self, headers=()):
        """After a form: the page again by GET (a reload posts nothing twice)."""
        return PageAnswer(303, b"", "text/plain", list(PAGE_HEADERS) + list(headers) +
                          [("Location", self.path)])

    def done(self, req, session, said, shown=None, extra=()):
        """A change made: the page again by GET, which shows `said` (and a new token,
        `shown`) once. They ride in a cookie signed for this session: no one else's
        page, nor a link, can make ours say something."""
        payload = b64url(json.dumps([said[:SAID_MAX], shown], ensure_ascii=False).encode())
        value = "%s.%s" % (payload, self.said_mac(session, payload))
        return self.redirect(list(extra) + [self.cookie(self.said_cookie, value, req,
                                                        SAID_SECONDS)])

    def said_mac(self, session, payload):
        return hmac.new(self.key, ("said\0%s\0%s" % (session, payload)).encode("utf-8"),
                        hashlib.sha256).hexdigest()

    def said_of(self, req, session):
        """(message, shown token) a done() left for this session, or ("", None)."""
        payload, _, mac = req.cookies.get(self.said_cookie, "").partition(".")
        if not payload or not same_secret(mac, self.said_mac(session, payload)):
            return "", None
        said, shown = json.loads(b64url_decode(payload))
        return said, shown

    def form(self, csrf, do, inner, button, name=None):
        """One of the page's forms: its action, this browser's token, and (on the admin
        page) the user it acts on."""
        return self.form_html("post", (("do", do), ("csrf", csrf), ("name", name)), inner,
                              button)

    def ask_form(self, ask, inner, button, name=None):
        """A button that opens a page saying what a change would do: a GET, no token."""
        return self.form_html("get", (("ask", ask), ("name", name)), inner, button)

    def form_html(self, method, hidden, inner, button):
        fields = "".join('<input type="hidden" name="%s" value="%s">' % (key, html.escape(value))
                         for key, value in hidden if value is not None)
        return '<form method="%s" action="%s">%s%s <button>%s</button></form>' % (
            method, html.escape(self.path), fields, inner, button)

    def page_token(self, req, session, headers):
        if session is None:
            session = req.cookies.get(self.session_cookie)
        return self.csrf(self.form_cookie(req, headers), session)

    # -- the pages ---------------------------------------------------------------------

    def login_form(self, req, status=200, message="", extra=()):
        headers = list(PAGE_HEADERS) + list(extra)
        token = self.csrf(self.form_cookie(req, headers), None)
        said = '<p class="note">%s</p>' % html.escape(message) if message else ""
        body = """<h1>Log in</h1>%s
<form method="post" action="%s">
<input type="hidden" name="do" value="login"><input type="hidden" name="csrf" value="%s">
%s
<p><button>Log in</button></p></form>""" % (said, html.escape(self.path), token,
                                            self.login_fields)
        return PageAnswer(status, page_html("ankisync: log in", body), headers=headers)

    def log_in(self, req, form):
        try:
            name = self.check_login(req, form)
        except SyncError as e:
            extra = [("Retry-After", str(e.retry_after))] if e.retry_after else []
            return self.login_form(req, e.status, e.reason, extra)
        cookie, _ = self.new_session(req, name)
        return self.redirect([cookie])

    def check_login(self, req, form):
        """Who the login form's fields log in, or a SyncError."""
        name = form.get("name", "").strip()
        self.app.accounts.check_password(req.address, name, form.get("password", ""))
        return self.users.canonical(name)

    def change_password(self, req, form, user, session):
        new = form.get("new", "")
        if not new or new != form.get("again", ""):
            return self.render(req, user, session, 400, "the new password is empty, or the "
                               "two differ: nothing changed")
        try:
            self.app.accounts.check_password(req.address, user, form.get("old", ""))
        except SyncError as e:
            return self.render(req, user, session, e.status, "the old password is wrong: "
                               "nothing changed" if e.status == 403 else e.reason)
        self.users.set_password(user, new)
        log.info("account page from %s: %s changed their password", req.address, user)
        cookie, session = self.new_session(req, user)      # the old one died with the hash
        said = ("Password changed. Every device must log in again: Anki asks at its next "
                "sync; log in there with the new password.")
        if self.users.source(user) == "env":
            said += (" Your password also comes from the server's settings (SYNC_USERn), "
                     "whose next start sets the old one again: tell its admin.")
        return self.done(req, session, said, extra=[cookie])

    def new_token(self, req, form, user, session):
        label = form.get("label", "").strip()[:QUOTED_MAX] or "dashboard"
        try:
            token = self.users.add_token(user, label)
        except ValueError as e:
            return self.render(req, user, session, 409, str(e))
        return self.done(req, session, "", shown=(label, token))

    def restore(self, req, form, user, session, name):
        """A restore point of `name` becomes their collection, if it is still the one
        the page that asked showed (`seen`): the same form sent again restores nothing.
        Told in the log with who asked and from where."""
        folder = UserFolder(self.app.config, name, wait=LOCK_WAIT)
        point_id = form.get("id", "")
        try:
            point, before, media = folder.restore(point_id, seen=form.get("seen", ""))
        except NoSuchPoint:
            return self.render(req, user, session, 400, no_point(point_id))
        except NoRoomForPoint as e:
            return self.render(req, user, session, 507, str(e))
        except ValueError as e:     # busy, or the collection changed since the page asked
            return self.render(req, user, session, 409, str(e))
        said = restored_text(folder, point, before, media, on_page=True)
        log.info("%s from %s: %s", self.page, req.address, said.replace("\n", "; "))
        return self.done(req, session, said)

    def confirm_restore(self, req, user, session, name, point_id):
        """What restoring the point would do: what it holds beside today's collection,
        what each device will do; the button that does it carries the collection's
        stamp, so it replaces only the collection seen here."""
        folder = UserFolder(self.app.config, name, wait=LOCK_WAIT)
        try:
            point = folder.points.find(point_id)
        except NoSuchPoint:
            return self.render(req, user, session, 404, no_point(point_id))
        headers = list(PAGE_HEADERS)
        csrf = self.page_token(req, session, headers)
        seen = folder.stamp()
        notes, cards, _ = collection_counts(folder.collection.path)
        devices = self.users.devices(folder.name)
        lines = []
        for client, address, _, last, _ in devices:
            if last > point["time"]:
                fate = ("it synced after this point was made: what it synced since then is "
                        "not in the point and goes with Download")
            else:
                fate = "it has not synced since this point was made"
            lines.append("<li><code>%s</code> from %s, last sync %s: %s.</li>" % (
                html.escape(client), html.escape(address), when(last), fate))
        body = """<h1>Restore %s?</h1>
<table><tr><th></th><th>Notes</th><th>Cards</th></tr>
<tr><th>The restore point, %s (%s)</th><td>%d</td><td>%d</td></tr>
<tr><th>The collection now</th><td>%d</td><td>%d</td></tr></table>
<h2>What happens</h2><ul>
<li>The collection on the server becomes the restore point. The one it replaces is kept as
a new restore point first: restoring that one undoes this.</li>
<li>Media files deleted since the point come back.</li>
<li>At each device's next sync, Anki (AnkiDroid, AnkiMobile) asks for a full sync:
<strong>choose Download</strong>. Upload would send back the collection being replaced.
Changes a device made and did not sync before are lost.</li></ul>
<h2>Devices</h2>%s
%s<p><a href="%s">Cancel</a></p>""" % (
            html.escape(point["id"]), when(point["time"]), html.escape(
                point.get("note") or point["why"]), point["notes"], point["cards"], notes, cards,
            "<ul>%s</ul>" % "".join(lines) if lines else "<p>None has synced yet.</p>",
            self.form(csrf, "restore", '<input type="hidden" name="id" value="%s">'
                      '<input type="hidden" name="seen" value="%s">'
                      % (html.escape(point["id"]), seen), "Restore %s" % html.escape(
                          point["id"]), folder.name),
            html.escape(self.path))
        return PageAnswer(200, page_html("ankisync: restore", body), headers=headers)

    def render(self, req, user, session, status=200, message="", extra=(), shown=None):
        """The account page: the user's collection, media, devices, restore points and
        API tokens; the forms to download, restore, change the password, make and revoke
        tokens."""
        headers = list(PAGE_HEADERS) + list(extra)
        csrf = self.page_token(req, session, headers)
        stats = self.user_stats(user)
        config = self.app.config
        folder = self.app.user_folder(user)
        action = html.escape(self.path)
        parts = ["<h1>%s</h1>" % html.escape(user)]
        if message:
            parts.append('<p class="note">%s</p>' % html.escape(message).replace("\n", "<br>"))
        if shown:
            parts.append('<p class="note">Your new API token %s, shown this once: <code>%s'
                         '</code><br>Copy it now; only its digest is kept.</p>'
                         % (html.escape(shown[0]), html.escape(shown[1])))
        parts.append("""<h2>Collection</h2><table>
<tr><th>Notes</th><td>%d</td></tr><tr><th>Cards</th><td>%d</td></tr>
<tr><th>Collection</th><td>%s</td></tr><tr><th>Media files</th><td>%d, %s</td></tr>
<tr><th>Last sync</th><td>%s</td></tr>
<tr><th>Due today</th><td>%d</td></tr><tr><th>New</th><td>%d</td></tr>
<tr><th>Reviewed today</th><td>%d</td></tr><tr><th>Streak</th><td>%s</td></tr></table>
%s""" % (
            stats["notes"], stats["cards"], human_size(stats["collection_bytes"]),
            stats["media_files"], human_size(stats["media_bytes"]),
            when(stats["last_sync"]) if stats["last_sync"] else "never", stats["due"],
            stats["new"], stats["reviewed_today"],
            "1 day" if stats["streak"] == 1 else "%d days" % stats["streak"],
            '<p><a href="%s/collection.colpkg" download>Download the collection as .colpkg</a> '
            '(with its media; Anki imports it with File &rarr; Import)</p>' % action
            if stats["collection_bytes"] else "<p>Nothing to download yet: a device's first "
            "sync brings the collection here.</p>"))
        # Lists, not tables: a phone shows a line per device, not a table cut off.
        devices = "".join("<li><code>%s</code> from %s: last sync %s (%s), first %s</li>" % (
            html.escape(client), html.escape(address), when(last), html.escape(kind),
            when(first)[:10]) for client, address, first, last, kind in
            self.users.devices(user))
        parts.append("<h2>Devices</h2>" + ("<ul>%s</ul>" % devices if devices else
                                           "<p>None has synced yet.</p>"))
        parts.append("<h2>Restore points</h2>" + restore_points_html(
            self, csrf, RestorePoints(folder, config).list(), None,
            "%s/collection.colpkg?point=" % action))
        parts.append("<h2>Password</h2><p>Every device must log in again after a change.</p>"
                     + self.form(csrf, "password", '<p><label>Old password<br><input '
                                 'name="old" type="password" autocomplete="current-password" '
                                 'required></label></p><p><label>New password<br><input '
                                 'name="new" type="password" autocomplete="new-password" '
                                 'required></label></p><p><label>New password again<br><input '
                                 'name="again" type="password" autocomplete="new-password" '
                                 'required></label></p>', "Change password"))
        tokens = "".join("<li>%s, made %s %s</li>" % (
            html.escape(label), when(created),
            self.form(csrf, "revoke", '<input type="hidden" name="id" value="%s">'
                      % html.escape(tid), "Revoke")) for tid, label, created in
            self.users.tokens(user))
        parts.append("<h2>API tokens</h2><p>For a dashboard (Home Assistant, say): "
                     "<code>GET %sapi/stats</code> with <code>Authorization: Bearer TOKEN"
                     "</code> answers your counts as JSON. A token stays until revoked.</p>"
                     "<ul>%s</ul>" % (html.escape(self.app.base_path), tokens)
                     + self.form(csrf, "token", '<label>Name <input name="label" '
                                 'maxlength="60" placeholder="dashboard"></label>',
                                 "Make a token"))
        parts.append(self.form(csrf, "logout", "", "Log out"))
        return PageAnswer(status, page_html("ankisync: " + user, "\n".join(parts)),
                          headers=headers)

    def user_stats(self, user):
        """The counts `status` shows, with the last sync's time and what there is to
        study today for a dashboard."""
        counts = user_counts(self.app.config, self.users, user)
        seen = counts.pop("devices")
        counts.update(study_counts(os.path.join(self.app.user_folder(user),
                                                "collection.anki2")))
        return dict(counts, last_sync=int(seen[0][3]) if seen else None)

    def download(self, user, point_id=None):
        """The collection as a .colpkg, or a restore point's (with the media it used)."""
        # A worker waits for a sync in progress as long as a device's request would, not
        # as long as a command at a terminal does.
        folder = UserFolder(self.app.config, user, wait=LOCK_WAIT)
        if point_id is None and (not os.path.exists(folder.collection.path) or
                                 not os.path.getsize(folder.collection.path)):
            raise SyncError(404, "no collection yet: sync a device first")
        fd, temp = tempfile.mkstemp(prefix=TEMP_SPOOL, suffix=".colpkg",
                                    dir=self.app.spool_folder)
        os.close(fd)
        try:
            with self.app.download_turn(user):
                export_package(folder, temp, point_id)
        except FolderBusy as e:
            os.unlink(temp)
            raise SyncError(409, str(e))
        except NoSuchPoint:
            os.unlink(temp)
            raise SyncError(404, no_point(point_id))
        except BaseException:
            os.unlink(temp)
            raise
        name = "%s-%s.colpkg" % (user, point_id or time.strftime("%Y-%m-%d"))
        return PageAnswer(200, content_type="application/octet-stream", file=temp, headers=[
            ("Cache-Control", "no-store"),
            ("Content-Disposition", "attachment; filename=\"collection.colpkg\"; "
                                    "filename*=UTF-8''%s" % urllib.parse.quote(name))])

    def stats(self, req):
        """GET /api/stats with an API token: the user's counts as JSON, for dashboards."""
        scheme, _, token = req.headers.get("Authorization", "").partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        user = self.users.user_for_token(token) if token else None
        if user is None:
            said = ("this API token is unknown or revoked: make one on the account page"
                    if token else
                    "an API token is needed: Authorization: Bearer TOKEN, made on the "
                    "account page")
            return PageAnswer(401, (json.dumps({"error": said}) + "\n").encode(),
                              "application/json",
                              [("WWW-Authenticate", 'Bearer realm="ankisync"'),
                               ("Cache-Control", "no-store")])
        data = dict(self.user_stats(user), user=user)
        return PageAnswer(200, (json.dumps(data, sort_keys=True) + "\n").encode("utf-8"),
                          "application/json", [("Cache-Control", "no-store")])


def no_point(point_id):
    return "no restore point %r here: the page lists them" % point_id[:QUOTED_MAX]


def unknown_action(action):
    if action is None:
        return bad_request("a form without its action (do)")
    return bad_request("unknown action %r" % action[:QUOTED_MAX])


def restore_points_html(pages, csrf, points, name, download):
    """A user's restore points as a list: when, why, what each holds, a Restore button
    (which first asks) and, on the account page, a download link."""
    if not points:
        return ("<p>None yet: one is made before each full upload, before a restore, and "
                "once a day after a sync.</p>")
    items = "".join("<li><code>%s</code> %s, %s: %d notes, %d cards, %s %s%s</li>" % (
        html.escape(p["id"]), when(p["time"]), html.escape(p.get("note") or p["why"]),
        p["notes"], p["cards"], human_size(p["size"]),
        '<a href="%s%s" download>Download</a> ' % (download, urllib.parse.quote(p["id"]))
        if download else "",
        pages.ask_form("restore", '<input type="hidden" name="id" value="%s">'
                       % html.escape(p["id"]), "Restore&hellip;", name)) for p in points)
    return ("<p>A restore asks every device for a full sync: choose Download. The collection "
            "it replaces is kept as a restore point, so a restore can be undone.</p>"
            "<ul>%s</ul>" % items)


class AdminPage(Pages):
    """/admin: what the CLI's user commands do, in a browser, for the holder of the admin
    token (admin_token keeps its hash), from admin_from's addresses only. The login and
    its forms are the account page's, with their own cookies on their own path; every
    action calls what the CLI command calls, and is logged with the admin's address."""

    page = "admin"
    session_cookie, form_cookie_name = ADMIN_COOKIE, ADMIN_FORM_COOKIE
    said_cookie = ADMIN_SAID_COOKIE
    key_label = b"ankisync admin sessions"
    login_fields = """<p>With the admin token (the one whose hash admin_token holds).</p>
<p><label>Admin token<br><input name="password" type="password"
 autocomplete="current-password" required></label></p>"""

    def __init__(self, app):
        super().__init__(app)
        self.cookie_path = self.path
        self.phc = app.config.admin_token
        self.refusals = Notices()        # a stranger knocking again must not fill the log

    def answer(self, req):
        if not self.phc:
            raise SyncError(404, "no admin page here: admin_token in the ini turns it on")
        # Through a proxy the server cannot see past, everyone is the proxy: on this
        # machine, that would be everyone "from this machine".
        proxied = not self.app.ip_header and any(req.headers.get(h) for h in PROXY_HEADERS)
        if proxied or not self.allowed(req.address):
            self.refusals.warn(req.address, "admin page refused to %s: not in admin_from",
                               req.address)
            raise SyncError(403, "the admin page answers admin_from's addresses only")
        user, session = self.session_of(req)
        return self.form_answer(req, user, session)

    def allowed(self, address):
        try:
            address = ipaddress.ip_address(address.split("%")[0])
        except ValueError:
            return False
        return any(address in network for network in self.app.config.admin_from
                   if network.version == address.version)

    def phc_of(self, name):
        return self.phc if name == ADMIN_NAME else None

    def check_login(self, req, form):
        self.app.accounts.check_admin(req.address, form.get("password", ""), self.phc)
        log.info("admin from %s: logged in", req.address)
        return ADMIN_NAME

    def ask(self, req, user, session):
        """What a deletion or a restore would do, before it is done."""
        try:
            name = self.users.canonical(req.query.get("name", ""))
        except ValueError as e:
            return self.render(req, user, session, 400, str(e))
        if req.query.get("ask") == "restore":
            return self.confirm_restore(req, user, session, name, req.query.get("id", ""))
        if req.query.get("ask") == "deluser":
            return self.confirm_delete(req, session, name, req.query.get("data") == "on")
        raise bad_request("this page asks only before a restore or a deletion")

    def act(self, req, form, action, user, session):
        """One change, as its CLI command makes it, logged; the page again with what
        happened, or why nothing did. A deletion and a restore ask first (ask())."""
        name = form.get("name", "").strip()
        password = form.get("password", "")
        try:
            if action == "adduser":
                if not password:
                    raise ValueError("a new user needs a password: nothing changed")
                self.users.add(name, password)
                said = "added user %s" % self.users.canonical(name)
            elif action == "passwd":
                if not password:
                    raise ValueError("the new password is empty: nothing changed")
                name = self.users.canonical(name)
                self.users.set_password(name, password)
                said = "changed the password of %s; their devices must log in again" % name
                said += self.from_environment(name, "sets the old password again")
            elif action == "deluser":
                name = self.users.canonical(name)
                with_data = form.get("data") == "on"
                if form.get("confirmed") != "yes":
                    return self.confirm_delete(req, session, name, with_data)
                note = self.from_environment(name, "adds the user again")
                said = delete_user(self.app.config, self.users, name, with_data) + note
            elif action == "restore":
                return self.restore(req, form, user, session, self.users.canonical(name))
            elif action == "notice":
                said = self.app.set_notice(form.get("notice", ""))
            else:
                raise unknown_action(action)
        except ValueError as e:
            return self.render(req, user, session, 400, str(e))
        log.info("admin from %s: %s", req.address, said.replace("\n", "; "))
        return self.done(req, session, said)

    def from_environment(self, name, what):
        note = environment_note(self.users, name, what)
        return "; note: " + note if note else ""

    def confirm_delete(self, req, session, name, with_data):
        """What deleting `name` does, and the button that does it: nothing changes yet."""
        headers = list(PAGE_HEADERS)
        csrf = self.page_token(req, session, headers)
        counts = user_counts(self.app.config, self.users, name)
        if with_data:
            data = ("Their collection (%d notes, %d cards), %d media files and %d restore "
                    "points are deleted for good: no restore point can bring them back."
                    % (counts["notes"], counts["cards"], counts["media_files"],
                       counts["restore_points"]))
        else:
            data = ("Their collection, media and restore points stay in the data folder: "
                    "adding %s again finds them." % name)
        body = """<h1>Delete %s?</h1>
<ul><li>Their devices (%d) are refused at their next sync, and their API tokens stop.</li>
<li>%s</li></ul>
%s<p><a href="%s">Cancel</a></p>""" % (
            html.escape(name), len(counts["devices"]), html.escape(data),
            self.form(csrf, "deluser", '<input type="hidden" name="confirmed" value="yes">%s'
                      % ('<input type="hidden" name="data" value="on">' if with_data else ""),
                      "Delete %s%s" % (html.escape(name), " and their data" if with_data
                                       else ""), name),
            html.escape(self.path))
        return PageAnswer(200, page_html("ankisync: delete", body), headers=headers)

    def render(self, req, user, session, status=200, message="", extra=(), shown=None):
        """Every user's status row, their restore points and forms; the notice; the log."""
        headers = list(PAGE_HEADERS) + list(extra)
        csrf = self.page_token(req, session, headers)
        config = self.app.config
        parts = ["<h1>Admin</h1>"]
        if message:
            parts.append('<p class="note">%s</p>' % html.escape(message).replace("\n", "<br>"))
        names = self.users.names()
        rows = status_rows(config, self.users, names)
        parts.append('<h2>Users</h2><div class="wide"><table><tr>%s</tr>%s</table></div>' % (
            "".join("<th>%s</th>" % html.escape(cell) for cell in rows[0]),
            "".join("<tr>%s</tr>" % "".join("<td>%s</td>" % html.escape(cell) for cell in row)
                    for row in rows[1:])))
        parts.append("<h3>Add a user</h3>" + self.form(
            csrf, "adduser", '<p><label>User name<br><input name="name" autocomplete="off" '
            'required></label></p><p><label>Password<br><input name="password" '
            'type="password" autocomplete="new-password" required></label></p>', "Add user"))
        for name in names:
            points = RestorePoints(self.app.user_folder(name), config).list()
            parts.append("<h3>%s</h3>" % html.escape(name) + self.form(
                csrf, "passwd", '<label>New password <input name="password" type="password" '
                'autocomplete="new-password" required></label>', "Set password", name)
                + self.ask_form("deluser", '<label><input type="checkbox" name="data"> and '
                                'their collection and media</label>', "Delete user&hellip;",
                                name)
                + "<p>Restore points:</p>" + restore_points_html(self, csrf, points, name,
                                                                 None))
        parts.append(
            "<h2>Notice</h2><p>Every client shows it when it syncs. Set here, it is kept in "
            "the data folder (%s) and wins over the ini's notice; empty, the ini's applies"
            "%s.</p>" % (NOTICE_FILE, ": %s" % html.escape(self.app.ini_notice)
                         if self.app.ini_notice else " (none)")
            + self.form(csrf, "notice", '<textarea name="notice" rows="3" maxlength="%d">%s'
                        '</textarea>' % (NOTICE_MAX, html.escape(self.app.notice_override())),
                        "Set notice"))
        recent = self.app.recent_log
        parts.append("<h2>Log</h2>" + (
            "<p>The last %d lines, newest last:</p><pre>%s</pre>" % (
                ADMIN_LOG_LINES, html.escape("\n".join(recent.lines))) if recent else
            "<p>Not kept: this server was not started by <code>serve</code>.</p>"))
        parts.append(self.form(csrf, "logout", "", "Log out"))
        return PageAnswer(status, page_html("ankisync: admin", "\n".join(parts)),
                          headers=headers)


class RecentLog(logging.Handler):
    """The log's last lines, in memory, for the admin page: the server logs to stderr,
    where a journal or a container keeps it, no file of its own to read back."""

    def __init__(self, size):
        super().__init__()
        self.lines = collections.deque(maxlen=size)
        self.setFormatter(logging.Formatter(LOG_FORMAT))

    def emit(self, record):
        try:
            self.lines.append(self.format(record))
        except Exception:           # as logging's own handlers: a record never stops a request
            self.handleError(record)


HTTP_DATE = [0, ""]        # the Date header of the current second
HEAD_END = re.compile(rb"\r?\n\r?\n")
# The host a client named, without its port, if it is a name or an address and nothing else:
# it goes back into an answer's status line.
HOST_HEADER = re.compile(rb"\nhost:[ \t]*([A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])"
                         rb"(?::[0-9]{1,5})?[ \t]*\r?\n", re.IGNORECASE)
# RFC 9112's grammar, strictly: a token method, a target of visible ASCII, one space each.
TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
REQUEST_LINE = re.compile(r"%s [\x21-\x7e]+ HTTP/1\.[01]" % TOKEN)
HEADER_LINE = re.compile(r"(%s):([\t\x20-\x7e\x80-\xff]*)" % TOKEN)
CONTENT_LENGTH = re.compile(r"[0-9]{1,%d}" % LENGTH_DIGITS_MAX)
CHUNK_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,%d})[ \t]*(?:;[^\r\n]*)?\r?\n" % CHUNK_DIGITS_MAX)


class RequestHeaders(dict):
    """Request headers by lower-case name; get() takes any case."""

    def get(self, name, default=None):
        return dict.get(self, name.lower(), default)


class RequestHead:
    """A request line and its headers, read by the listener before a worker is spent.

    http.server's own parser goes through the email package, which cost a fifth of
    a small request; this one takes what HTTP/1.1 clients send (RFC 9112) and refuses
    the rest with a 400 that closes the connection: a number that is not ASCII digits,
    a header name that is no token, two lengths that disagree. Lenient framing is how
    one request hides inside another on the way through a proxy.
    """

    def __init__(self, block):
        lines = block.decode("latin-1").split("\n")
        self.requestline = lines[0].rstrip("\r")
        if not REQUEST_LINE.fullmatch(self.requestline):
            raise bad_request("bad request line")
        self.command, self.path, self.version = self.requestline.split(" ")
        if len(lines) > MAX_HEADERS + 1:
            raise SyncError(431, "more than %d headers" % MAX_HEADERS)
        self.headers = RequestHeaders()
        lengths = set()
        for line in lines[1:]:
            match = HEADER_LINE.fullmatch(line.rstrip("\r"))
            if not match:
                raise bad_request("bad header line %r" % line[:QUOTED_MAX])
            name, value = match.group(1).lower(), match.group(2).strip(" \t")
            if name == "content-length":
                lengths.add(value)
            elif name == "transfer-encoding" and name in self.headers:
                value = self.headers[name] + ", " + value
            self.headers[name] = value
        connection = self.headers.get("connection", "").lower()
        self.close = connection == "close" or (self.version == "HTTP/1.0"
                                               and connection != "keep-alive")
        self.expect_continue = self.version == "HTTP/1.1" and \
            self.headers.get("expect", "").lower() == "100-continue"
        coding = self.headers.get("transfer-encoding")
        self.chunked = coding is not None
        if self.chunked and coding.lower() != "chunked":
            raise bad_request("transfer coding %r: ankisync takes chunked bodies only"
                              % coding[:QUOTED_MAX])
        if len(lengths) > 1:
            raise bad_request("two different Content-Length headers")
        length = lengths.pop() if lengths else "0"
        if not CONTENT_LENGTH.fullmatch(length):
            raise bad_request("bad Content-Length %r: ASCII digits expected" % length[:QUOTED_MAX])
        self.length = 0 if self.chunked else int(length)
        if self.chunked and lengths:
            self.close = True       # RFC 9112 6.3: chunked wins, and the connection ends

    def preread(self):
        """How much of the body the listener gathers before a worker reads on.

        A modern request carries its key in a header: the worker checks it before
        reading a byte of the body, so it needs no gathering, but for hostKey. The
        other requests show their key, if any, in the body.
        """
        if "anki-sync" in self.headers and \
                not self.path.split("?", 1)[0].rstrip("/").endswith("hostKey"):
            return 0
        return BODY_PREREAD if self.chunked else min(self.length, BODY_PREREAD)

    def gathered(self, buffer, wanted):
        # A chunked body that ends before `wanted` ends with the last chunk; a data
        # chunk ending the same way only hands the request over a little early.
        return len(buffer) >= wanted or (self.chunked and buffer.endswith(b"0\r\n\r\n"))


def response_bytes(status, text, close=True, phrase=None, headers=""):
    """A short plain-text answer, for the listener, which has no handler to write it;
    `phrase` instead of the status's usual reason phrase, `headers` lines of more."""
    body = (text + "\n").encode("utf-8")
    if phrase is None:
        phrase = BaseHTTPRequestHandler.responses.get(status, ("",))[0]
    return ("HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d"
            "\r\n%s%s\r\n" % (status, phrase, len(body), headers,
                               "Connection: close\r\n" if close else "")
            ).encode("latin-1") + body


class Handler(BaseHTTPRequestHandler):
    """One request, on a worker thread; the listener has read its head already.

    HTTP/1.1 with keep-alive: modern clients reuse their connection for a whole sync,
    and between requests the connection goes back to the listener, not holding a thread.
    """

    protocol_version = "HTTP/1.1"
    server_version = "ankisync/" + __version__

    def date_time_string(self, timestamp=None):
        # http.server formats the Date header through the email package on every reply.
        now = int(time.time()) if timestamp is None else int(timestamp)
        if HTTP_DATE[0] != now:
            HTTP_DATE[:] = [now, super().date_time_string(now)]
        return HTTP_DATE[1]

    def setup(self):
        self.conn = self.request
        self.connection = self.conn.sock
        self.connection.settimeout(SEND_TIMEOUT)
        self.rfile = SocketReader(self.conn)
        self.wfile = SocketWriter(self.connection)

    def handle(self):
        head = self.conn.head
        self.requestline, self.command = head.requestline, head.command
        self.path, self.request_version = head.path, head.version
        self.headers, self.close_connection = head.headers, head.close
        if head.expect_continue:
            self.handle_expect_100()
            self.wfile.flush()          # the client waits for it before sending its body
        verb = getattr(self, "do_" + self.command, None)
        if verb is None:
            self.close_connection = True
            self.send_text(405, "%s is not an HTTP method ankisync answers: use GET or POST"
                           % self.command[:QUOTED_MAX])
        else:
            verb()
        self.wfile.flush()

    def finish(self):
        super().finish()
        self.conn.keep = not self.close_connection

    def do_GET(self):
        self.serve()

    def do_POST(self):
        self.serve()

    def do_HEAD(self):
        self.send_text(405, "use GET or POST")

    def serve(self):
        app = self.server.app
        started = time.monotonic()
        req, status, sent, what = None, 200, 0, "-"
        body = None
        try:
            body = BodyReader(self.rfile, self.conn.head, app.config.max_payload)
            area, method = route(self.path, app.base_path)
            what = "%s/%s" % (area, method)
            if area == "page" and method in PAGES:
                status, sent = self.serve_pages(method, body)
                return
            if area == "page":
                self.finish_body(body)
                sent = self.send_page(method)
                return
            address = app.client_address(self.headers, self.client_address[0])
            req = app.envelopes.decode(self.conn.head, address, area, method, body)
            body.drain()
            with app.turn_of(req):
                reply = app.dispatch(req)
                try:
                    sent = self.send_reply(req, reply)
                finally:
                    reply.close()
        except SyncError as e:
            status = e.status
            self.finish_body(body)
            sent = self.send_text(e.status, e.reason, e.retry_after, e.location, e.phrase)
        except (ConnectionError, socket.timeout) as e:
            status, self.close_connection = 499, True
            log.info("connection lost during %s: %s", what, e)
        except Exception as e:
            self.finish_body(body)
            if out_of_space(e):
                status, free = 507, free_space(app.config.data) // MIB
                log.error("disk full during %s: %s; %d MiB free in %s", what, e, free,
                          app.config.data)
                sent = self.send_text(507, "the sync server's disk is full (%d MiB free): sync "
                                      "again once its admin has made room" % free)
            else:
                status = 500
                log.exception("internal error during %s", what)
                sent = self.send_text(500, "internal server error: see the server log")
        finally:
            if req is not None:
                req.close()
            elapsed = time.monotonic() - started
            received = body.received if body else 0
            log.info("%s %s %s %d in=%d out=%d %dms",
                     req.address if req else app.client_address(self.headers,
                                                                self.client_address[0]),
                     (req.user if req and req.user else "-"), what, status,
                     received, sent, elapsed * 1000)
            app.metrics.request(what, status, received, sent, elapsed)

    def finish_body(self, body):
        """Keep the connection only if the rest of the body is small enough to skip."""
        if body is None:                # refused before reading: its body is still unread
            self.close_connection = True
            return
        try:
            if body.finished:
                return
            if not body.chunked and body.remaining <= IO_BLOCK:
                body.drain()
                return
        except SyncError:
            pass
        self.close_connection = True

    def send_page(self, name):
        if name == "health":
            return self.send_text(200, "ok")
        if name == "metrics":
            return self.send_metrics()
        if name in ("ca.pem", "ca.crt"):
            return self.send_ca(name)
        app = self.server.app
        scheme = "https" if isinstance(self.connection, ssl.SSLSocket) else "http"
        reached, proxied = app.page_address(self.headers, self.client_address[0], scheme)
        page = front_page(app.config, reached, scheme, proxied)
        return self.send_body("text/html; charset=utf-8", page)

    def serve_pages(self, name, body):
        """/account, /api/stats (Pages) and /admin (AdminPage): (status, bytes sent)."""
        app = self.server.app
        peer = self.client_address[0]
        # Behind a proxy that ends TLS, the proxy says so: believed from trusted_proxies only.
        secure = isinstance(self.connection, ssl.SSLSocket) or (
            app.is_proxy(peer) and self.headers.get("X-Forwarded-Proto", "").lower() == "https")
        pages = app.admin if name == "admin" else app.pages
        # The host the browser asked for, which its Origin names: behind a proxy that
        # keeps its own Host (Apache), the one it forwards.
        reached, _ = app.page_address(self.headers, peer, "https" if secure else "http")
        answer = pages.answer(PageRequest(
            self.command, self.headers, app.client_address(self.headers, peer), secure, body,
            name, self.path.partition("?")[2], urllib.parse.urlsplit(reached).netloc
            if reached else ""))
        # A download's package is deleted whatever happens from here: a client gone
        # while the rest of its body is read must not leave a copy of a collection.
        try:
            self.finish_body(body)
            self.send_response(answer.status)
            for header, value in answer.headers:
                self.send_header(header, value)
            self.send_header("Content-Type", answer.content_type)
            if self.close_connection:
                self.send_header("Connection", "close")
            if answer.file is None:
                self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                self.wfile.write(answer.body)
                return answer.status, len(answer.body)
            with open(answer.file, "rb") as f:
                self.send_header("Content-Length", str(os.fstat(f.fileno()).st_size))
                self.end_headers()
                return answer.status, copy_stream(f.read, self.wfile.write)
        finally:
            if answer.file is not None:
                os.unlink(answer.file)

    def send_ca(self, name):
        """The private CA's certificate, for devices to trust (appendix E): PEM for Anki
        and AnkiDroid's setting, DER with the type phones install as a CA."""
        ca = private_ca(self.server.app.config)
        if ca is None:
            return self.send_text(404, "no private CA here: it is made with tls = self-signed")
        with open(ca, encoding="ascii") as f:
            text = f.read()
        if name == "ca.pem":
            return self.send_body("application/x-pem-file", text.encode("ascii"))
        return self.send_body("application/x-x509-ca-cert", pem_body(text, "CERTIFICATE"))

    def send_body(self, content_type, data):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        return len(data)

    def send_metrics(self):
        """/metrics, when the ini turns it on: to this machine, or to whoever shows the
        token (behind a proxy, the forwarded address counts)."""
        app = self.server.app
        if app.config.metrics != "on":
            return self.send_text(404, "metrics are off: set metrics = on in the ini")
        token = app.config.metrics_token
        shown = self.headers.get("Authorization", "")
        address = app.client_address(self.headers, self.client_address[0])
        allowed = (token and same_secret(shown, "Bearer " + token)) or \
            is_loopback(address)
        if not allowed:
            return self.send_text(403, "metrics are for this machine, or with the token the "
                                       "ini sets (Authorization: Bearer TOKEN)")
        return self.send_body("text/plain; version=0.0.4; charset=utf-8",
                              app.metrics.render(app).encode("utf-8"))

    def send_text(self, status, text, retry_after=None, location=None, phrase=None):
        data = (text + "\n").encode("utf-8")
        if phrase:      # a status line holds printable ASCII only
            phrase = "".join(c if " " <= c <= "~" else "?" for c in phrase)
        self.send_response(status, phrase)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        if retry_after is not None:
            self.send_header("Retry-After", str(retry_after))
        if location is not None:
            self.send_header("Location", location)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        return len(data)

    def send_reply(self, req, reply):
        zstd = self.server.app.zstd
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if not req.modern:
            self.send_header("Content-Length", str(reply.size))
            self.end_headers()
            if reply.stream is None:
                self.wfile.write(reply.body)
                return reply.size
            return copy_stream(reply.stream.read, self.wfile.write)
        self.send_header("anki-original-size", str(reply.size))
        if reply.stream is not None and reply.size <= ONE_SHOT_REPLY_MAX:
            reply.body, reply.stream = reply.stream.read(), None   # a media zip, usually
        if reply.stream is None:
            data = raw_frame(reply.body) if reply.size <= RAW_REPLY_MAX else \
                zstd.compress(reply.body)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return len(data)
        # Large answers stream through the compressor with chunked framing.
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunked = ChunkedWriter(self.wfile)
        zstd.compress_stream(reply.stream.read, chunked.write)
        chunked.close()
        return chunked.sent

    def log_message(self, format, *args):
        log.debug(format, *args)


class ChunkedWriter:
    """HTTP/1.1 chunked framing for an answer whose compressed size is not known ahead."""

    def __init__(self, wfile):
        self.wfile = wfile
        self.sent = 0

    def write(self, data):
        if data:
            self.wfile.write(b"%x\r\n" % len(data) + data + b"\r\n")
            self.sent += len(data)
        return len(data)

    def close(self):
        self.wfile.write(b"0\r\n\r\n")


class SocketWriter:
    """A request's wfile: buffered, so headers and a small body leave in one packet, and
    paced: past SEND_GRACE the client must take the answer at SEND_MIN_RATE on average,
    so a reader that stalls or trickles holds a worker for seconds, not for hours."""

    closed = False

    def __init__(self, sock):
        self.sock = sock
        self.buffer = bytearray()
        self.started = None
        self.sent = 0

    def write(self, data):
        self.buffer += data
        if len(self.buffer) >= IO_BLOCK:
            self.flush()
        return len(data)

    def flush(self):
        data, offset = memoryview(bytes(self.buffer)), 0
        self.buffer.clear()
        if self.started is None:
            self.started = time.monotonic()
        try:
            while offset < len(data):
                wait = self.started + SEND_GRACE + self.sent / SEND_MIN_RATE - time.monotonic()
                if wait <= 0:
                    raise socket.timeout("the client takes its answer under %d bytes a second"
                                         % SEND_MIN_RATE)
                self.sock.settimeout(min(wait, SEND_TIMEOUT))
                sent = self.sock.send(data[offset:])
                offset += sent
                self.sent += sent
        finally:
            self.sock.settimeout(SEND_TIMEOUT)

    def close(self):
        self.closed = True


def can_send(sock):
    """True when the socket takes bytes at once: its client reads the answers it has.
    A worker serves a kept-alive connection only then, so pipelined requests whose
    answers nobody reads cannot hold it in a blocked send."""
    try:
        poller = select.poll()
    except AttributeError:          # Windows: no poll(); its sends are paced all the same
        return True
    poller.register(sock, select.POLLOUT)
    return bool(poller.poll(0))


class SocketReader:
    """A request's rfile: the bytes the listener gathered, then the socket, at a pace.

    Past BODY_GRACE the body must average BODY_MIN_RATE, so a client that trickles a
    byte now and then loses its worker in seconds. What the request leaves unread
    stays in the connection's buffer: the start of the next request.
    """

    def __init__(self, conn):
        self.sock = conn.sock
        self.buffer = conn.buffer
        self.started = time.monotonic()
        self.received = 0

    def _fill(self):
        wait = self.started + BODY_GRACE + self.received / BODY_MIN_RATE - time.monotonic()
        try:
            if wait <= 0:
                raise socket.timeout
            self.sock.settimeout(wait)
            data = self.sock.recv(IO_BLOCK)
        except socket.timeout:
            raise SyncError(408, "the request arrives too slowly: under %d bytes a second"
                            % BODY_MIN_RATE)
        finally:
            self.sock.settimeout(SEND_TIMEOUT)
        self.received += len(data)
        self.buffer += data
        return len(data)

    def _take(self, n):
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    def read(self, n=IO_BLOCK):
        if not self.buffer and not self._fill():
            return b""
        return self._take(n if n >= 0 else len(self.buffer))

    def readline(self, limit=-1):
        searched = 0
        while True:
            at = self.buffer.find(b"\n", searched)
            if at >= 0 and (limit < 0 or at < limit):
                return self._take(at + 1)
            if 0 <= limit <= len(self.buffer):
                return self._take(limit)
            searched = len(self.buffer)
            if not self._fill():
                return self._take(len(self.buffer))

    def close(self):
        pass


# --- connections: one listener, a pool of workers -------------------------------------
class Connection:
    """A client connection, and the request arriving on it."""

    def __init__(self, sock, address, now):
        self.sock = sock
        self.address = address          # (host, port) of the TCP peer
        self.peer = address[0]
        self.buffer = bytearray()       # bytes read and not yet used
        self.state = "hello"            # hello, handshake, idle, head, body; busy; blocked; linger
        self.since = now                # when it last began to wait: the oldest goes first
        self.deadline = now + HEADER_TIMEOUT
        self.head = None
        self.wanted = 0                 # body bytes to gather before a worker takes over
        self.body_started = now
        self.keep = False               # the worker's verdict: keep alive or close
        self.registered = False         # in the listener's care, not a worker's
        self.ended = False              # the client closed its side
        self.lingered = 0

    def advance(self, now, max_payload):
        """Take in what has arrived: True once the request can go to a worker.
        Raises SyncError for a request to refuse before a worker sees it."""
        if self.state == "head":
            while self.buffer[:1] in (b"\r", b"\n"):    # blank lines before a request
                del self.buffer[:1]
            end = HEAD_END.search(self.buffer, 0, HEAD_MAX + 4)
            if end is None:
                if len(self.buffer) > HEAD_MAX:
                    raise SyncError(431, "request head over %d KiB" % (HEAD_MAX // 1024))
                return False
            self.head = RequestHead(bytes(self.buffer[:end.start()]))
            del self.buffer[:end.end()]
            if self.head.length > max_payload:
                raise body_too_large(self.head.length, max_payload)
            self.wanted = self.head.preread()
            if not self.wanted:
                return True
            self.state, self.body_started = "body", now
            if self.head.expect_continue:
                self.head.expect_continue = False
                self.send_quietly(b"HTTP/1.1 100 Continue\r\n\r\n")
        if self.head.gathered(self.buffer, self.wanted):
            return True
        self.deadline = self.body_started + BODY_GRACE + len(self.buffer) / BODY_MIN_RATE
        return False

    def send_quietly(self, data):
        try:
            self.sock.send(data)
        except OSError:
            pass            # a short answer to a client that went away or stopped reading


class Workers:
    """Threads that serve one request at a time: started when requests wait, ended
    after WORKER_IDLE, so a burst's threads and their caches do not stay."""

    def __init__(self, serve, maximum):
        self.serve = serve
        self.maximum = maximum
        self.jobs = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.threads = 0
        self.idle = 0
        self.waiting = 0                # jobs queued and not yet taken

    def submit(self, job):
        self.jobs.put(job)
        with self.lock:
            self.waiting += 1
            start = self.waiting > self.idle and self.threads < self.maximum
            if start:
                self.threads += 1
        if start:
            threading.Thread(target=self._work, name="ankisync-worker", daemon=True).start()

    def _work(self):
        while True:
            with self.lock:
                self.idle += 1
            try:
                job = self.jobs.get(timeout=WORKER_IDLE)
            except queue.Empty:
                with self.lock:
                    self.idle -= 1
                    if not self.waiting:
                        self.threads -= 1
                        break
                continue
            with self.lock:
                self.idle -= 1
                self.waiting -= 1
            try:
                self.serve(job)
            except Exception:       # a fault of ours: logged, and the thread serves on
                log.exception("worker fault")
        release_memory()

    def busy(self):
        """Jobs being served or waiting: 0 once every request has had its answer."""
        with self.lock:
            return self.threads - self.idle + self.waiting


def release_memory():
    """Hand freed heap back to the system: glibc keeps it for the threads that are gone."""
    glibc_call("malloc_trim", 0)


def glibc_call(name, *args):
    """A glibc malloc tuning call; elsewhere (macOS, musl, Windows) nothing to tune."""
    try:
        getattr(ctypes.CDLL(None), name)(*args)
    except (OSError, AttributeError, TypeError):
        pass


def raise_fd_limit():
    """The soft limit on open files raised to the hard one; the limit, or None."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or hard > soft):
            soft = hard if hard != resource.RLIM_INFINITY else 1 << 16
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        return None if soft == resource.RLIM_INFINITY else soft
    except (ImportError, ValueError, OSError):
        return None


# --- the certificate: one context, swapped whole when it changes ----------------------
def context_from_pem(cert_pem, key_pem, folder):
    """load_certificate() of PEM text: `ssl` reads files only, so a 0600 one, gone after."""
    fd, path = tempfile.mkstemp(prefix=TEMP_TLS, dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(cert_pem + key_pem)
        return load_certificate(path, None)
    finally:
        os.remove(path)


def file_times(paths):
    """What tells a changed file: modification time, size and inode of each (a certbot
    renewal moves symbolic links, which stat follows); None for one that is missing."""
    times = []
    for path in paths:
        try:
            info = os.stat(path)
            times.append((info.st_mtime_ns, info.st_size, info.st_ino))
        except OSError:
            times.append(None)
    return times


class ServerTls:
    """The listener's certificate: the ssl.SSLContext each new connection is wrapped with.

    A renewal (ACME's, the private CA's) or new certfile/keyfile swap in a new context
    whole: connections in progress keep the one their handshake used, so nothing is cut.
    While a TLS-ALPN-01 validation is open (RFC 8737), a connection that offers ALPN
    acme-tls/1 gets the challenge's certificate instead; nothing else does.
    """

    def __init__(self, context, files=()):
        self.context = context
        self.files = tuple(files)           # (certfile, keyfile) watched, or ()
        self.seen = file_times(self.files)
        self.next_check = time.monotonic() + CERT_CHECK_INTERVAL
        self.challenge = None               # the acme-tls/1 context while one is open

    def swap(self, context, why):
        self.context = context              # one assignment: atomic for the listener
        log.info("HTTPS certificate replaced (%s): new connections get it", why)

    def wrap_socket(self, sock, hello=b"", **options):
        context = self.context
        challenge = self.challenge
        if challenge is not None and ALPN_ACME in client_alpn(hello):
            context = challenge
        return context.wrap_socket(sock, **options)

    def check_files(self):
        """Reload certfile and keyfile once they changed; a pair that does not load is
        refused, with a log line, and the old one kept until the files change again."""
        if not self.files or time.monotonic() < self.next_check:
            return
        self.next_check = time.monotonic() + CERT_CHECK_INTERVAL
        times = file_times(self.files)
        if times == self.seen:
            return
        self.seen = times
        try:
            context = load_certificate(*self.files)
        except (OSError, ssl.SSLError, ValueError) as e:
            log.warning("%s changed but does not load (%s): the certificate served so far "
                        "stays until the files change again", " and ".join(
                            f for f in self.files if f), getattr(e, "reason", None) or e)
            return
        self.swap(context, "%s changed" % self.files[0])


def client_alpn(hello):
    """The ALPN protocols a ClientHello (one TLS record, RFC 8446 4.1.2) offers, as
    strings; () when it is not whole or not one."""
    try:
        if hello[0] != 0x16 or hello[5] != 1:       # handshake record, ClientHello
            return ()
        end = 5 + int.from_bytes(hello[3:5], "big")
        if len(hello) < end:
            return ()
        pos = 5 + 4 + 2 + 32                        # header, version, random
        pos += 1 + hello[pos]                       # session id
        pos += 2 + int.from_bytes(hello[pos:pos + 2], "big")    # cipher suites
        pos += 1 + hello[pos]                       # compression methods
        pos += 2
        while pos + 4 <= end:
            kind = int.from_bytes(hello[pos:pos + 2], "big")
            size = int.from_bytes(hello[pos + 2:pos + 4], "big")
            pos += 4
            if kind == 16:                          # application_layer_protocol_negotiation
                names, at = [], pos + 2
                while at < pos + size:
                    names.append(hello[at + 1:at + 1 + hello[at]].decode("ascii", "replace"))
                    at += 1 + hello[at]
                return tuple(names)
            pos += size
    except IndexError:
        pass
    return ()


def hello_is_whole(hello):
    return len(hello) >= 5 and len(hello) >= 5 + int.from_bytes(hello[3:5], "big")


class Server(ThreadingHTTPServer):
    """The listener: one thread that owns every connection while no request is running.

    It accepts, does TLS handshakes, reads each request's head (and a form's first
    bytes, BODY_PREREAD) without blocking, and only then hands the connection to a
    worker; after the answer the connection comes back here to wait. So an idle, slow
    or silent client costs a socket and a small buffer, never a thread, and nothing
    one client does can stall another. Deadlines: HEADER_TIMEOUT for a head,
    BODY_GRACE and BODY_MIN_RATE for a body, IDLE_TIMEOUT between requests. Past
    max_connections, or an address's share of them, a new connection closes the one
    that has waited longest.
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512        # the kernel's queue of connections not yet accepted

    def __init__(self, address, app, tls=None):
        self.app = app
        self.tls = tls                  # a ServerTls, or None for plain HTTP
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, Handler)
        self.max_connections = app.config.max_connections
        # A share for each address; not for a trusted proxy, through which everyone comes.
        self.max_per_address = app.config.max_connections_per_address
        files = raise_fd_limit()
        if files is not None and self.max_connections > files - FD_RESERVE:
            self.max_connections = max(16, files - FD_RESERVE)
            log.warning("only %d open files allowed: at most %d connections (raise the "
                        "limit with ulimit -n)", files, self.max_connections)
        self.connections = set()
        self.per_address = {}
        self.selector = selectors.DefaultSelector()
        self.returned = queue.SimpleQueue()         # connections workers are done with
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_w.setblocking(False)
        self.workers = Workers(self.serve_request, MAX_WORKERS)
        self.notices = Notices()
        self.running = False

    # -- the loop -------------------------------------------------------------

    def serve_forever(self, poll_interval=SWEEP_INTERVAL):
        self.socket.setblocking(False)
        self.wake_r.setblocking(False)
        self.selector.register(self.socket, selectors.EVENT_READ, "accept")
        self.selector.register(self.wake_r, selectors.EVENT_READ, "wake")
        self.running = True
        next_sweep = time.monotonic() + poll_interval
        while self.running:
            for key, _ in self.selector.select(poll_interval):
                self.guarded(self.on_event, key.data)
            now = time.monotonic()
            if now >= next_sweep:
                for conn in [c for c in self.connections if c.registered and c.deadline < now]:
                    self.guarded(self.expire, conn)
                next_sweep = now + poll_interval

    def guarded(self, step, what):
        """One step of the loop; a fault of ours costs that connection, never the listener."""
        try:
            step(what)
        except Exception:
            log.exception("listener fault on %s", what)
            if isinstance(what, Connection):
                try:
                    self.close(what)
                except Exception:
                    log.exception("and again while closing it")

    def on_event(self, what):
        if what == "accept":
            self.accept()
        elif what == "wake":
            self.take_back()
        elif what.state in ("hello", "handshake") and self.tls is not None:
            self.on_hello(what)
        elif what.state == "plain":
            self.on_plain(what)
        elif what.state == "linger":
            self.on_linger(what)
        elif what.state == "blocked":      # its client reads again: on to the waiting request
            self.hand_over(what)
        else:
            self.on_read(what)

    def shutdown(self):
        self.running = False
        self.wake()

    def server_close(self):
        super().server_close()
        for conn in list(self.connections):
            self.close(conn)
        self.selector.close()
        self.wake_r.close()
        self.wake_w.close()

    def wake(self):
        try:
            self.wake_w.send(b"\0")
        except OSError:
            pass            # full: the listener is woken already

    # -- admitting ------------------------------------------------------------

    def accept(self):
        """One connection; select() reports the listening socket again while more wait."""
        try:
            sock, address = self.socket.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:                # out of file descriptors: make room
            self.notices.warn("accept", "cannot accept connections: %s", e)
            self.evict()
            return
        self.admit(sock, address)

    def admit(self, sock, address):
        sock.setblocking(False)
        try:
            # Without it, Nagle's algorithm and the client's delayed ACK add 40 ms to
            # every request of a sync.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass
        peer = address[0]
        if self.per_address.get(peer, 0) >= self.max_per_address and \
                not (self.app.ip_header and self.app.is_proxy(peer)):
            self.evict(peer)        # its share is a soft limit: a burst of its own gets in
        if len(self.connections) >= self.max_connections and not self.evict():
            self.notices.warn(peer, "connection from %s refused: all %d connections are busy",
                        peer, len(self.connections))
            sock.close()
            return
        conn = Connection(sock, address, time.monotonic())
        self.connections.add(conn)
        self.per_address[peer] = self.per_address.get(peer, 0) + 1
        self.listen_to(conn)
        if self.tls is None:
            self.on_read(conn)      # the request has often come with the connection

    def evict(self, peer=None):
        """Close the connection (of `peer`, or of anyone) that has waited longest,
        sparing requests on their way in while a silent or idle one is left, and
        connections younger than EVICT_AFTER."""
        old = time.monotonic() - EVICT_AFTER
        waiting = [c for c in self.connections
                   if c.registered and c.since < old and (peer is None or c.peer == peer)]
        if not waiting:
            return False
        self.close(min(waiting, key=lambda c: (c.state in ("head", "body"), c.since)))
        return True

    def on_hello(self, conn):
        """A TLS port's connection: its first byte tells a handshake from plain HTTP."""
        if conn.state == "handshake":
            return self.handshake(conn)
        # While a TLS-ALPN-01 validation is open the whole ClientHello is looked at (its
        # ALPN picks the certificate); else its first byte is enough.
        peek = TLS_HELLO_PEEK if self.tls.challenge is not None else 1
        try:
            hello = conn.sock.recv(peek, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return self.close(conn)
        first = hello[:1]
        if peek > 1 and first == b"\x16" and not hello_is_whole(hello) and \
                time.monotonic() - conn.since < TLS_HELLO_WAIT:
            return                          # the rest of it is on its way
        if first != b"\x16":                # not a TLS handshake record
            if not first.isupper():         # no HTTP method either: nothing to answer
                return self.close(conn)
            # Plain HTTP: someone typed http:// for this port. Its head is read (for the
            # Host it names) and answered in plain HTTP by wrong_scheme().
            conn.state = "plain"
            return self.on_plain(conn)
        self.unlisten(conn)
        conn.sock = self.tls.wrap_socket(conn.sock, hello, server_side=True,
                                         do_handshake_on_connect=False)
        conn.state = "handshake"
        self.listen_to(conn)
        self.handshake(conn)

    def on_plain(self, conn):
        """Plain HTTP on the TLS port: its head, up to HEAD_MAX, then wrong_scheme()."""
        try:
            data = conn.sock.recv(HEAD_MAX)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return self.close(conn)
        if not data:
            return self.close(conn)
        conn.buffer += data
        if HEAD_END.search(conn.buffer) or len(conn.buffer) >= HEAD_MAX:
            self.wrong_scheme(conn)

    def wrong_scheme(self, conn):
        """The answer to plain HTTP on the TLS port. Which status, tried with the clients
        themselves (docs/protocol.md 3.6): 400, what this port answered at first, makes
        Anki 2.1.28 and later say "Please use the Check Database function", sending the
        user to repair a healthy collection; 403 says the password is wrong; 308 and 301
        to https:// confuse both generations (a raw "HttpError { code: 308 ...", a GET
        answered 405); a closed connection is "error sending request". 421, 426 and 505
        are each "A network error occurred ... HTTP status client error (426 Upgrade
        Required) for url ()"; Anki 26.9 shows the reason phrase the server sends (2.1.54
        the standard one), so the phrase carries the fix; 426 is HTTP's own "use another
        protocol" (RFC 9110 15.5.22, with the Upgrade header it requires)."""
        host = HOST_HEADER.search(conn.buffer)
        host = host.group(1).decode("ascii") if host else url_host(conn.sock.getsockname()[0])
        address = "https://%s:%d%s" % (host, self.server_address[1], self.app.base_path)
        self.notices.warn(conn.peer, "%s sent plain HTTP to this HTTPS port (told to use %s)",
                          conn.peer, address)
        text = "this port speaks HTTPS: use %s" % address
        conn.send_quietly(response_bytes(WRONG_SCHEME_STATUS, text, phrase=text,
                                         headers="Upgrade: TLS/1.2, HTTP/1.1\r\n"))
        self.linger(conn)

    def handshake(self, conn):
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            return self.listen_to(conn, selectors.EVENT_READ)
        except ssl.SSLWantWriteError:
            return self.listen_to(conn, selectors.EVENT_WRITE)
        except (ssl.SSLError, OSError) as e:
            self.notices.warn(conn.peer, "TLS handshake with %s failed: %s", conn.peer,
                        getattr(e, "reason", None) or e)
            return self.close(conn)
        conn.state = "head"             # the first request's deadline runs on from connect
        self.listen_to(conn, selectors.EVENT_READ)
        self.on_read(conn)

    # -- reading requests -----------------------------------------------------

    def on_read(self, conn):
        size = HEAD_MAX if conn.state != "body" else max(1, conn.wanted - len(conn.buffer))
        try:
            data = conn.sock.recv(size)
            # TLS: select() sees the socket, not the records already decrypted.
            while data and isinstance(conn.sock, ssl.SSLSocket) and conn.sock.pending() and \
                    len(data) < size:
                data += conn.sock.recv(size - len(data))
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except OSError:
            return self.close(conn)
        if not data:
            return self.close(conn)
        now = time.monotonic()
        if conn.state == "hello":           # the plain port's first bytes
            if data[:1] == b"\x16":
                self.notices.warn(conn.peer, "%s spoke HTTPS to this HTTP port: clients must use "
                            "http://, or set certfile and keyfile", conn.peer)
                return self.close(conn)
            conn.state = "head"
        elif conn.state == "idle":
            conn.state, conn.deadline = "head", now + HEADER_TIMEOUT
        conn.buffer += data
        self.advance(conn, now)

    def advance(self, conn, now):
        try:
            arrived = conn.advance(now, self.app.config.max_payload)
        except SyncError as e:
            return self.refuse(conn, e)
        if arrived:
            self.hand_over(conn)

    def hand_over(self, conn):
        self.unlisten(conn)
        conn.state = "busy"
        self.workers.submit(conn)

    def serve_request(self, conn):
        """On a worker: answer the request, and the next ones while they come at once;
        then give the connection back, whatever happened on the way."""
        try:
            while True:
                if not can_send(conn.sock):
                    conn.keep, conn.state = True, "blocked"
                    break
                conn.keep = False
                self.finish_request(conn, conn.address)
                if not (conn.keep and self.next_request(conn)):
                    break
        except OSError as e:            # the client went away: no fault of anyone's here
            log.debug("connection from %s ended: %s", conn.peer, e)
            conn.keep = False
        except Exception:
            log.exception("fault while serving %s: its connection is closed", conn.peer)
            conn.keep = False
        finally:
            self.returned.put(conn)
            self.wake()

    def next_request(self, conn):
        """True when the next request has arrived whole within HOT_WAIT: a client in
        the middle of a sync sends it at once, and the trip through the listener
        would cost a third of a small request. Anything less goes back to wait."""
        conn.state, conn.head = "idle", None
        if not conn.buffer:
            try:
                conn.sock.settimeout(HOT_WAIT)
                data = conn.sock.recv(HEAD_MAX)
            except (socket.timeout, ssl.SSLWantReadError):
                return False
            except OSError:
                data = b""
            if not data:
                conn.keep, conn.ended = False, True
                return False
            conn.buffer += data
        conn.state = "head"
        try:
            return conn.advance(time.monotonic(), self.app.config.max_payload)
        except SyncError as e:
            conn.send_quietly(response_bytes(e.status, e.reason))
            conn.keep = False
            return False

    def take_back(self):
        try:
            while self.wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        while True:
            try:
                conn = self.returned.get_nowait()
            except queue.Empty:
                return
            self.guarded(self.welcome_back, conn)

    def welcome_back(self, conn):
        if conn.keep:
            self.park(conn)
        elif conn.ended:            # the client closed: nothing left to linger for
            self.close(conn)
        else:
            self.linger(conn)

    def park(self, conn):
        """A kept-alive connection waits here for its next request, for the rest of one
        whose start the worker saw, or, blocked, for its client to read the answers it
        has before the request that came behind them is served."""
        now = time.monotonic()
        conn.sock.setblocking(False)
        conn.since = now
        if conn.state == "blocked":
            conn.deadline = now + SEND_TIMEOUT
            return self.listen_to(conn, selectors.EVENT_WRITE)
        self.listen_to(conn)
        if conn.state == "head":
            conn.deadline = now + HEADER_TIMEOUT
        elif conn.state == "idle":
            conn.deadline = now + IDLE_TIMEOUT
        if isinstance(conn.sock, ssl.SSLSocket) and conn.sock.pending():
            self.on_read(conn)

    # -- closing --------------------------------------------------------------

    def expire(self, conn):
        """A connection past its deadline: a request too slow to arrive, or an idle one."""
        if conn.state in ("head", "body"):
            self.refuse(conn, SyncError(408, "the request took too long to arrive"))
        elif conn.state == "plain":
            self.wrong_scheme(conn)         # a head unfinished at its deadline: answered too
        elif conn.state in ("hello", "handshake") and self.tls is not None:
            self.notices.warn(conn.peer, "TLS handshake with %s unfinished after %d s: dropped",
                        conn.peer, HEADER_TIMEOUT)
            self.close(conn)
        else:
            self.close(conn)

    def refuse(self, conn, error):
        """Answer what the listener will not hand on, and close: the client learns why."""
        self.notices.warn(conn.peer, "%s %s refused %d: %s", conn.peer, self.user_of(conn.head),
                          error.status, error.reason)
        conn.send_quietly(response_bytes(error.status, error.reason))
        self.linger(conn)

    def user_of(self, head):
        """Who sent a modern request, by the key in its head (the body need not arrive),
        as the log names users; "-" for a stranger or a form."""
        header = head.headers.get("anki-sync") if head is not None else None
        if header:
            try:
                user = self.app.users.remembered_user(client_json(header, "").get("k"))
            except (SyncError, AttributeError):     # not JSON, or not an object
                user = None
            if user:
                return user
        return "-"

    def linger(self, conn):
        """Close after the answer, reading what the client still sends for a moment:
        closing with unread bytes resets the connection, and the answer with it."""
        if isinstance(conn.sock, ssl.SSLSocket):
            return self.close(conn)
        try:
            conn.sock.setblocking(False)
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return self.close(conn)
        conn.buffer.clear()
        now = time.monotonic()
        conn.state, conn.since, conn.deadline = "linger", now, now + LINGER_SECONDS
        self.listen_to(conn)

    def on_linger(self, conn):
        try:
            data = conn.sock.recv(IO_BLOCK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        conn.lingered += len(data)
        if not data or conn.lingered > LINGER_BYTES:
            self.close(conn)

    def close(self, conn):
        self.unlisten(conn)
        if conn in self.connections:
            self.connections.discard(conn)
            left = self.per_address.pop(conn.peer) - 1
            if left:
                self.per_address[conn.peer] = left
        try:
            conn.sock.close()
        except OSError:
            pass

    def listen_to(self, conn, events=selectors.EVENT_READ):
        if conn.registered:
            self.selector.modify(conn.sock, events, conn)
        else:
            self.selector.register(conn.sock, events, conn)
            conn.registered = True

    def unlisten(self, conn):
        if conn.registered:
            self.selector.unregister(conn.sock)
            conn.registered = False



def housekeeping(app, stop, tls=None, renew=None):
    """Roll back sync sessions of clients that vanished, reload certfile and keyfile when
    they change, and have `renew` (the private CA's) run daily; beside the server."""
    every = min(30, max(1, app.config.session_timeout // 4))
    next_sessions = time.monotonic() + every
    next_renewal = time.monotonic() + PRIVATE_CA_CHECK
    while not stop.wait(min(every, CERT_CHECK_INTERVAL) if tls else every):
        try:
            if tls is not None:
                tls.check_files()
            if time.monotonic() >= next_sessions:
                next_sessions = time.monotonic() + every
                app.expire_idle_sessions()
            if renew is not None and time.monotonic() >= next_renewal:
                next_renewal = time.monotonic() + PRIVATE_CA_CHECK
                renew()
        except Exception:
            log.exception("housekeeping failed")


# ---------------------------------------------------------------------------
# Command line
#   One table of commands. User commands write auth.db and take effect at
#   once, also while the server runs.
# ---------------------------------------------------------------------------

def read_password(name, stdin=None, prompt="Password for %s: "):
    """getpass twice on a terminal; one line from stdin for scripts and Docker."""
    stdin = stdin or sys.stdin
    if stdin.isatty():
        first = getpass.getpass(prompt % name)
        if first != getpass.getpass("Again: "):
            raise ValueError("the two passwords differ: nothing changed")
    else:
        first = stdin.readline().rstrip("\r\n")
    if not first:
        raise ValueError("an empty password is not allowed: nothing changed")
    return first


def command_hash(config, args):
    """A PHC string for a secret, to paste where a hash is taken instead of the secret:
    SYNC_USERn=name:<hash> with PASSWORDS_HASHED=1."""
    print(hash_password(read_password("", prompt="Password to hash: %s")))


def command_adduser(config, args):
    users = UserStore(config.data)
    name = users.check_new(args.name)        # before asking for a password in vain
    folder = os.path.join(config.data, folder_name(name))
    left = os.path.exists(os.path.join(folder, "collection.anki2"))
    if left and args.fresh:
        aside = "%s.old-%s" % (folder, time.strftime("%Y%m%d-%H%M%S"))
        users.add(name, read_password(name))
        os.replace(folder, aside)
        print("added user %s with an empty collection; the old data folder is now %s"
              % (name, aside))
        return
    users.add(name, read_password(name))
    if left:
        print("added user %s, who takes over the collection and media still in %s (left by "
              "an earlier user of that name); `deluser %s` then `adduser --fresh %s` starts "
              "them empty instead" % (name, folder, name, name))
    else:
        print("added user %s; their collection will live in %s" % (name, folder))


def command_passwd(config, args):
    users = UserStore(config.data)
    name = users.canonical(args.name)
    users.set_password(name, read_password(name))
    print("changed the password of %s; their devices must log in again" % name)
    warn_if_from_environment(users, name, "sets the old password again")


def warn_if_from_environment(users, name, what):
    note = environment_note(users, name, what)
    if note:
        print("note: " + note)


def environment_note(users, name, what):
    """Why a change of `passwd` or `deluser` may not last, for the CLI and the admin page."""
    if users.source(name) != "env":
        return ""
    return ("%s comes from a SYNC_USERn variable of the server, whose next start %s: change "
            "or remove that variable too" % (name, what))


def command_deluser(config, args):
    users = UserStore(config.data)
    name = users.canonical(args.name)
    warn_if_from_environment(users, name, "adds the user again")
    print(delete_user(config, users, name, args.delete_data))


def delete_user(config, users, name, delete_data):
    """`deluser`, for the CLI and the admin page: what was done, in a line."""
    name = users.delete(name)
    folder = os.path.join(config.data, folder_name(name))
    if delete_data and os.path.isdir(folder):
        shutil.rmtree(folder)
        return "deleted user %s and their data" % name
    return ("deleted user %s; their data stays in %s (add --delete-data to remove it)"
            % (name, folder))


def command_status(config, args):
    users = UserStore(config.data)
    names = [users.canonical(args.name)] if args.name else users.names()
    print("ankisync %s, data folder %s, %s free" % (__version__, config.data,
                                                   human_size(free_space(config.data))))
    rows = status_rows(config, users, names)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    if args.name:
        print()
        for client, address, first, last_seen, kind in users.devices(names[0]):
            print("device %s from %s: first %s, last %s (%s)" % (
                client, address, time.strftime("%Y-%m-%d", time.localtime(first)),
                time.strftime("%Y-%m-%d %H:%M", time.localtime(last_seen)), kind))
        folder = os.path.join(config.data, folder_name(names[0]))
        for point in RestorePoints(folder, config).list():
            print("restore point " + describe_point(point).rstrip())


def status_rows(config, users, names):
    """`status`'s table, for the CLI and the admin page: a heading, then a row per user."""
    month = time.time() - STATUS_DEVICE_DAYS * 86400
    rows = [("user", "collection", "notes", "cards", "media", "last sync", "devices",
             "restore points")]
    for name in names:
        counts = user_counts(config, users, name)
        seen = counts["devices"]
        last = ("%s %s from %s" % (time.strftime("%Y-%m-%d %H:%M", time.localtime(seen[0][3])),
                                   seen[0][0], seen[0][1]) if seen else "never")
        rows.append((name, human_size(counts["collection_bytes"]), str(counts["notes"]),
                     str(counts["cards"]), "%d files, %s" % (
                         counts["media_files"], human_size(counts["media_bytes"])), last,
                     str(len(recent_devices(seen, month))), str(counts["restore_points"])))
    return rows


def user_counts(config, users, name):
    """What `status`, the account page and /api/stats tell of a user, read only: nothing
    is made for a user who never synced."""
    folder = os.path.join(config.data, folder_name(name))
    notes, cards, size = collection_counts(os.path.join(folder, "collection.anki2"))
    files, media_bytes = media_totals(os.path.join(folder, "media.db"))
    return {"notes": notes, "cards": cards, "collection_bytes": size,
            "media_files": files, "media_bytes": media_bytes, "devices": users.devices(name),
            "restore_points": len(RestorePoints(folder, config).list())}


def recent_devices(seen, since):
    """The devices among `devices()` rows seen since `since`: a row per client version,
    so a device that updated Anki, seen again from the same address, counts once."""
    return {(re.sub(r"\d+(\.\d+)*|\([^)]*\)", "#", client), address)     # (build hash)
            for client, address, _, last_seen, _ in seen if last_seen >= since}


def collection_counts(path):
    """(notes, cards, bytes) of a collection file, read only; zeros when there is none."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return 0, 0, 0
    db = sqlite3.connect("file:%s?mode=ro" % urllib.parse.quote(os.path.abspath(path)),
                         uri=True, timeout=LOCK_WAIT)
    try:
        return (db.execute("select count() from notes").fetchone()[0],
                db.execute("select count() from cards").fetchone()[0], os.path.getsize(path))
    except sqlite3.Error:
        return 0, 0, os.path.getsize(path)
    finally:
        db.close()


def study_counts(path, now=None):
    """What a user has to study and has studied, as Anki counts it for the collection's
    own day: due (Anki's is:due), new (ready, before daily limits), reviewed_today (its
    "Studied N cards today") and streak (days in a row with a review, up to today or,
    while today has none yet, yesterday); zeros when there is no collection."""
    zeros = {"due": 0, "new": 0, "reviewed_today": 0, "streak": 0}
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return zeros
    now = int(time.time() if now is None else now)
    db = sqlite3.connect("file:%s?mode=ro" % urllib.parse.quote(os.path.abspath(path)),
                         uri=True, timeout=LOCK_WAIT)
    try:
        crt, conf = db.execute("select crt, conf from col").fetchone()
        conf = json.loads(conf)
        if not isinstance(conf, dict):
            return zeros
        days_elapsed, next_day_at = collection_timing(conf, crt, now)
        learn_ahead = config_int(conf, "collapseTime", LEARN_AHEAD_DEFAULT)
        due = db.execute(
            "select count() from cards where (queue in (2, 3) and due <= ?) or "
            "(queue in (1, 4) and due <= ?)", (days_elapsed, now + learn_ahead)).fetchone()[0]
        new = db.execute("select count() from cards where queue = 0").fetchone()[0]
        # Anki's studied_today.sql: manual entries (4) and reschedulings (5) were no study.
        end = next_day_at * 1000
        reviewed = db.execute(
            "select count() from revlog where id > ? and type != 4 and type != 5",
            (end - 86_400_000,)).fetchone()[0]
        # A day is (start, end] in revlog ids, as studied_today counts it, so the streak
        # takes in today exactly when reviewed_today is above zero.
        days_ago = [row[0] for row in db.execute(
            "select distinct (? - id) / 86400000 from revlog where id < ? and type != 4 "
            "and type != 5 order by 1", (end, end))]
    except (sqlite3.Error, TypeError, ValueError, OverflowError, OSError):
        return zeros            # a broken file is the next sync's to mend, not a page's
    finally:
        db.close()
    return {"due": due, "new": new, "reviewed_today": reviewed,
            "streak": study_streak(days_ago)}


def study_streak(days_ago):
    """Consecutive days with a review among `days_ago` (0 today, 1 yesterday, ascending):
    a day without one yet is not over, so the streak may end yesterday."""
    if not days_ago or days_ago[0] > 1:
        return 0
    streak = 0
    for day in days_ago:
        if day != days_ago[0] + streak:
            break
        streak += 1
    return streak


# Anki's day, as rslib's scheduler/timing.rs reckons it on a server: the server has no
# time zone of the user's, only the offset their devices last wrote into the config.

def collection_timing(conf, crt, now):
    """(days_elapsed, next_day_at) of a schema-11 collection: its `col.conf` and `crt`."""
    rollover = None                 # the v1 scheduler's day starts at crt's hour
    if conf.get("schedVer") == 2:
        rollover = min(config_int(conf, "rollover", DEFAULT_ROLLOVER), ROLLOVER_MAX)
    current = utc_offset(conf.get("localOffset"))
    return sched_timing_today(crt, now, utc_offset(conf.get("creationOffset")),
                              datetime.timezone.utc if current is None else current, rollover)


def config_int(conf, key, default):
    """A whole number >= 0 of the config, or the default when missing or not one: Anki
    reads these as unsigned and falls back on its default."""
    value = conf.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        return default
    return value


def utc_offset(minutes_west):
    """A config's offset (minutes west of UTC: Nepal's is -345) as a time zone; None when
    missing or invalid, as chrono's FixedOffset::west_opt answers."""
    if not isinstance(minutes_west, int) or isinstance(minutes_west, bool) or \
            abs(minutes_west) >= UTC_OFFSET_LIMIT:
        return None
    return datetime.timezone(datetime.timedelta(minutes=-minutes_west))


def sched_timing_today(crt, now, creation_offset, current_offset, rollover):
    """(days_elapsed, next_day_at) as rslib's sched_timing_today: rollover None is the
    v1 scheduler; a v2 collection without a creation offset takes the "legacy" path."""
    # Days stay >= 0 where Anki's u32 would wrap: a clock behind the collection's birth.
    if rollover is None:
        days = int((now - crt) / 86400)             # Rust's division: toward zero
        return max(days, 0), crt + (days + 1) * 86400
    if creation_offset is None:
        crt_at_rollover = rollover_datetime(datetime.datetime.fromtimestamp(
            crt, current_offset), rollover).timestamp()
        days = int((now - crt_at_rollover) / 86400)
        next_day_at = rollover_datetime(datetime.datetime.fromtimestamp(
            now, current_offset), rollover).timestamp()
        if next_day_at < now:
            next_day_at += 86400
        return max(days, 0), int(next_day_at)
    created = datetime.datetime.fromtimestamp(crt, creation_offset)
    today = datetime.datetime.fromtimestamp(now, current_offset)
    rollover_today = rollover_datetime(today, rollover)
    passed = rollover_today <= today
    next_day_at = rollover_today + datetime.timedelta(days=1) if passed else rollover_today
    days = today.date().toordinal() - created.date().toordinal() - (0 if passed else 1)
    return max(days, 0), int(next_day_at.timestamp())


def rollover_datetime(moment, hour):
    """`hour`:00 of the same day, in the same offset, as rslib's rollover_datetime."""
    return moment.replace(hour=hour % 24, minute=0, second=0, microsecond=0)


def media_totals(path):
    """(files, bytes) from a user's media.db, read only; zeros when there is none."""
    if not os.path.exists(path):
        return 0, 0
    db = sqlite3.connect("file:%s?mode=ro" % urllib.parse.quote(os.path.abspath(path)),
                         uri=True, timeout=LOCK_WAIT)
    try:
        files, size = db.execute("select total_nonempty_files, total_bytes from meta").fetchone()
        return files, size
    except (sqlite3.Error, TypeError):
        return 0, 0
    finally:
        db.close()


def command_lsuser(config, args):
    for name in UserStore(config.data).names():
        print(name)


def user_folder_of(config, name):
    return UserFolder(config, UserStore(config.data).canonical(name))


def describe_point(point):
    return "%-17s  %s  %-7s %6d notes %7d cards %9s  %s" % (
        point["id"], time.strftime("%Y-%m-%d %H:%M", time.localtime(point["time"])),
        point["why"], point["notes"], point["cards"], human_size(point["size"]),
        point.get("note", ""))


def human_size(size):
    for unit, scale in (("GiB", 1024 * MIB), ("MiB", MIB), ("KiB", 1024)):
        if size >= scale:
            return "%.1f %s" % (size / scale, unit)
    return "%d B" % size


def command_backups(config, args):
    folder = user_folder_of(config, args.name)
    points = folder.points.list()
    for point in points:
        print(describe_point(point).rstrip())
    if not points:
        print("no restore points of %s yet: one is made before each full upload and once a "
              "day after a sync; `backup %s` makes one now" % (folder.name, folder.name))


def command_backup(config, args):
    folder = user_folder_of(config, args.name)
    point = folder.backup()
    if point is None:
        raise ValueError("nothing to keep: %s's collection is empty, or the disk too full "
                         "(see the message above)" % folder.name)
    print(describe_point(point).rstrip())


def command_restore(config, args):
    folder = user_folder_of(config, args.name)
    print(restored_text(folder, *folder.restore(args.id)))


def restored_text(folder, point, before, media, on_page=False):
    """What a restore did, for the CLI and the pages (which undo by a button)."""
    lines = ["restored %s of %s: %d notes, %d cards%s" % (
        point["id"], folder.name, point["notes"], point["cards"],
        ", %d media files back" % len(media) if media else "")]
    if before:
        lines.append("the collection before it is restore point %s: %s undoes this" % (
            before["id"], "restoring it" if on_page else "`restore %s %s`" % (
                folder.name, before["id"])))
    lines.append("every device of %s is asked for a full sync at its next sync: choose "
                 "Download" % folder.name)
    return "\n".join(lines)


def command_export(config, args):
    folder = user_folder_of(config, args.name)
    where = os.path.dirname(os.path.abspath(args.file))
    if not os.path.isdir(where):
        raise ValueError("cannot write %s: there is no folder %s (make it first)"
                         % (args.file, where))
    notes, cards, files = export_package(folder, args.file, args.point)
    print("wrote %s: %d notes, %d cards, %d media files; import it in Anki with File > "
          "Import" % (args.file, notes, cards, files))


def command_import(config, args):
    folder = user_folder_of(config, args.name)
    if not os.path.isfile(args.file):
        raise ValueError("cannot import %s: there is no such file" % args.file)
    zstd = choose_zstd(config.zstd)
    try:
        before, files = import_package(folder, args.file, zstd)
    except PackageError as e:
        # A damaged file is news for the admin, in one line that names it: not a traceback.
        raise ValueError("cannot import %s: %s" % (args.file, e)) from None
    print("imported %s for %s (%d media files new or changed)%s; every device is asked for "
          "a full sync: choose Download" % (args.file, folder.name, files,
                                             "; the collection before it is restore point %s"
                                             % before["id"] if before else ""))


def command_import_ankisyncd(config, args):
    zstd = choose_zstd(config.zstd)
    try:
        report = import_ankisyncd(config, args.path, zstd)
    except PackageError as e:
        raise ValueError("cannot import %s" % e) from None
    for name, what, _ in report:
        print("%s: %s" % (name, what))
    imported = sum(1 for _, what, _ in report if not what.startswith("skipped"))
    if imported:
        print("%d user%s imported; they log in with their old passwords (point each device "
              "at this server and log in again)" % (imported, "s" * (imported != 1)))
    else:
        print("no users imported")
    left = [trouble for _, _, troubles in report for trouble in troubles]
    if left:
        # The users came over, but not everything: a script running this should know.
        raise ValueError("cannot import %s" % "; ".join(left))


def command_health(config, args):
    """The server answers /health at the address and scheme its settings give."""
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    secure = config.certfile or config.tls == "self-signed" or config.acme_domain
    scheme = "https" if secure else "http"
    url = "%s://%s:%d%shealth" % (scheme, url_host(host), config.port,
                                   config.normalized_base_path())
    context = ssl._create_unverified_context() if secure else None
    try:
        with urllib.request.urlopen(url, timeout=HEALTH_TIMEOUT, context=context) as reply:
            ok = reply.status == 200
    except OSError as e:
        try:
            # A certificate mistake may be what kept the server from starting.
            load_certificate(config.certfile, config.keyfile)
            why = ""
        except CertificateError as mistake:
            why = "; %s" % mistake
        raise SystemExit("ankisync: no answer from %s: %s%s" % (url, e, why))
    if not ok:
        raise SystemExit("ankisync: %s answered %d" % (url, reply.status))
    print("ok: %s" % url)


def limit_malloc_arenas():
    """glibc gives each busy thread its own heap; a few suffice and keep RSS down."""
    glibc_call("mallopt", GLIBC_M_ARENA_MAX, GLIBC_ARENAS)


def command_serve(config, args):
    limit_malloc_arenas()
    # Certificates first: an unreadable privkey.pem must not be blamed on the data folder.
    try:
        context = load_certificate(config.certfile, config.keyfile)
    except CertificateError as e:
        raise SystemExit("ankisync: %s" % e)
    check_bindable(config)          # before the data folder is made: a typo costs nothing
    check_writable(config.data)
    lock = DataFolderLock(config.data)       # held, open, for as long as the server runs
    app = SyncApp(config)
    if config.admin_token:
        app.recent_log = RecentLog(ADMIN_LOG_LINES)
        log.addHandler(app.recent_log)
    app.users.apply_environment(config.env_users, config.passwords_hashed)
    log.info("ankisync %s, Python %s, zstd backend: %s", __version__,
             sys.version.split()[0], app.zstd.name)
    if app.zstd.name == "python":
        log.warning("zstd runs in pure Python here: large uploads from modern clients will be "
                    "slow. Python 3.14+ or the system libzstd (libzstd1) make them fast.")
    log.info("data folder: %s", config.data)
    if not app.users.names():
        offer_first_user(app, config)
    renew, acme = None, None
    if context is None and config.acme_domain:
        acme = AcmeCertificates(config)
        context = acme.first_context()
    if context is None and config.tls == "self-signed":
        context = private_ca_context(config)
    watched = (config.certfile, config.keyfile) if config.certfile else ()
    tls = ServerTls(context, watched) if context else None
    if private_ca(config):
        renew = functools.partial(renew_private_ca, config, tls)
    try:
        server = Server((config.host, config.port), app, tls)
    except OSError as e:
        raise SystemExit("ankisync: %s" % unbindable(config, e))
    if acme:
        acme.start(tls)
    scheme = "https" if context else "http"
    if config.public_url:
        log.info("listening on %s port %d; clients use %s (public_url)", config.host,
                 config.port, config.public_address())
    elif in_container() and (is_loopback(config.host) or config.host == "localhost"):
        log.warning("listening on %s inside a container: nothing outside the container "
                    "reaches it; set host = 0.0.0.0 (SYNC_HOST), as the image does",
                    config.host)
    elif in_container():
        # The bridge address (10.88.0.2) is no phone's to reach: the host's is, which
        # the container cannot see.
        log.info("listening on port %d in a container: phones and other computers use this "
                 "computer's address, port %d (or the one published with -p), as "
                 "%s://HOST:%d%s; set public_url to have it shown", config.port,
                 config.port, scheme, config.port, app.base_path)
    else:
        for address, where in addresses_to_show(config.host):
            log.info("listening on %s://%s:%d%s%s", scheme, url_host(address), config.port,
                     app.base_path, "  " + where if where else "")
        if config.ip_header:
            log.info("ip_header is set, so clients come through a proxy: they use its "
                     "address; set public_url to have it shown here and on the page")
    log.info("open the address in a browser for each client's setup")
    if config.admin_token:
        log.info("admin page on at %sadmin, from %s", app.base_path,
                 ", ".join(str(network) for network in config.admin_from))
    stop = threading.Event()
    threading.Thread(target=housekeeping, args=(app, stop, tls, renew), daemon=True).start()
    install_sigterm()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("shutting down")
    finally:
        stop.set()
        server.server_close()
        lock.close()


def check_bindable(config):
    """The address and port can be listened on, or a one-line error with the fix."""
    try:
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)    # as the server
            probe.bind((config.host, config.port))
    except OSError as e:
        raise SystemExit("ankisync: %s" % unbindable(config, e))


def unbindable(config, error):
    """One line on an address or port the server cannot listen on, with what to do."""
    where = "%s port %d" % (config.host, config.port)
    if isinstance(error, socket.gaierror):
        return ("host %r is no address this machine knows: set `host` to 0.0.0.0 (every "
                "network) or 127.0.0.1 (this machine only)" % config.host)
    if error.errno == errno.EADDRINUSE:
        return ("%s is already in use, by another program or another ankisync: stop it, or "
                "set another `port` in the ini (or SYNC_PORT)" % where)
    if error.errno == errno.EACCES:
        return ("%s needs more rights than this user has (ports below 1024 are for root): "
                "use a port above 1023, such as 27701, behind a reverse proxy for 80 or 443"
                % where)
    if error.errno == errno.EADDRNOTAVAIL:
        return ("%s: %s is not an address of this machine: set `host` to 0.0.0.0 (every "
                "network) or 127.0.0.1 (this machine only)" % (where, config.host))
    return "cannot listen on %s: %s" % (where, error.strerror or error)


class CertificateError(ValueError):
    """certfile or keyfile unusable: one line naming the option, the file and the fix."""


class KeyEncrypted(Exception):
    """Raised instead of asking for a key's passphrase: a server has no one to ask."""


def no_passphrase():
    raise KeyEncrypted()


def load_certificate(certfile, keyfile):
    """The TLS context of a certificate chain and its key (PEM files), for the listener;
    None for plain HTTP. The files are read and looked at first, as OpenSSL names neither
    the file nor the mistake ("[SSL] PEM lib") and an unreadable one is only an errno:
    CertificateError says which, at start and when a changed file is reloaded."""
    if not certfile:
        if keyfile:
            raise CertificateError(
                "keyfile is set (%s) but certfile is not: set certfile to the certificate "
                "chain (certbot: fullchain.pem), or empty keyfile for plain HTTP" % keyfile)
        return None
    cert = read_pem("certfile", certfile)
    if not PEM_CERTIFICATE.search(cert):
        if PEM_KEY.search(cert):
            problem = ("holds a private key, no certificate: certfile is the certificate "
                       "chain (certbot: fullchain.pem), keyfile its key (privkey.pem)")
        else:
            problem = ("is no PEM certificate (no -----BEGIN CERTIFICATE----- line): set "
                       "certfile to the PEM chain (certbot: fullchain.pem); a DER one converts "
                       "with `openssl x509 -inform der -in FILE -out cert.pem`")
        raise CertificateError("certfile %s %s" % (certfile, problem))
    option, path = ("keyfile", keyfile) if keyfile else ("certfile", certfile)
    key = read_pem(option, path) if keyfile else cert
    if not PEM_KEY.search(key):
        if not keyfile:
            problem = ("holds no private key and keyfile is empty: set keyfile to the "
                       "certificate's key (certbot: privkey.pem)")
        elif PEM_CERTIFICATE.search(key):
            problem = ("holds a certificate, no private key: keyfile is the certificate's key "
                       "(certbot: privkey.pem)")
        else:
            problem = ("is no PEM private key (no -----BEGIN PRIVATE KEY----- line): set "
                       "keyfile to the certificate's key (certbot: privkey.pem)")
        raise CertificateError("%s %s %s" % (option, path, problem))
    encrypted = CertificateError(
        "%s %s is encrypted with a passphrase, which a server has no one to ask for: save it "
        "decrypted, readable by this user only, with `openssl pkey -in FILE -out key.pem`"
        % (option, path))
    if PEM_ENCRYPTED.search(key):
        raise encrypted
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(certfile, keyfile or None, password=no_passphrase)
    except KeyEncrypted:
        raise encrypted from None
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            raise CertificateError(
                "%s %s is not the key of certfile %s: set keyfile to the key made with this "
                "certificate (certbot: privkey.pem beside fullchain.pem)"
                % (option, path, certfile)) from None
        raise CertificateError("certfile %s%s: OpenSSL cannot use it: %s" % (
            certfile, " with keyfile %s" % keyfile if keyfile else "",
            e.reason or e.strerror or e)) from None
    except OSError as e:                # changed since it was read
        raise CertificateError("certfile %s: %s" % (certfile, e.strerror or e)) from None
    return context


def read_pem(option, path):
    """The start of a certfile or keyfile, or CertificateError saying why it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(PEM_READ_MAX)
    except FileNotFoundError:
        problem = "does not exist: set %s to the file's full path" % option
    except PermissionError:
        problem = ("is not readable by %s, which ankisync runs as: run ankisync as root, or "
                   "give a group it is in read access to the file and its folders (as "
                   "`chgrp -R ssl-cert DIR && chmod -R g+rX DIR`, with the user in group "
                   "ssl-cert), or copy the file where this user can read it" % running_user())
    except IsADirectoryError:
        problem = "is a folder: set %s to a file in it (certbot: %s)" % (
            option, "fullchain.pem" if option == "certfile" else "privkey.pem")
    except OSError as e:
        problem = "cannot be read: %s" % (e.strerror or e)
    raise CertificateError("%s %s %s" % (option, path, problem))


def running_user():
    """'uid 1000 (alice)': who a permission error is about."""
    if not hasattr(os, "getuid"):
        return "this user"
    uid = os.getuid()
    try:
        import pwd      # Unix only, as getuid
        return "uid %d (%s)" % (uid, pwd.getpwuid(uid).pw_name)
    except (ImportError, KeyError):
        return "uid %d" % uid


LAN_ADDRESSES = {}                  # listening on IPv6 too -> (expiry, addresses)


def in_container():
    """True in a Docker or podman container (the files they put in each, CONTAINER_MARKERS),
    where this machine's addresses are the container's, which no phone reaches.
    ANKISYNC_CONTAINER=1 or 0 says so instead: for a runtime that leaves no marker, and
    for the tests, which may themselves run in one."""
    said = os.environ.get("ANKISYNC_CONTAINER", "").strip()
    if said in ("0", "1"):
        return said == "1"
    return any(os.path.exists(marker) for marker in CONTAINER_MARKERS)


def addresses_to_show(host):
    """(address, what it is for) to put in the log and on the front page."""
    if host not in ("0.0.0.0", "::", ""):
        return [(host, "")]
    shown = [("127.0.0.1", "(from the computer ankisync runs on)")]
    ipv6 = host == "::"
    # The front page asks at every visit; the host name's lookup may wait on a slow DNS.
    expiry, found = LAN_ADDRESSES.get(ipv6, (0, []))
    if expiry < time.monotonic():
        found = lan_addresses(ipv6)
        LAN_ADDRESSES[ipv6] = (time.monotonic() + LAN_ADDRESSES_FRESH, found)
    return shown + [(address, "(from phones and other computers)") for address in found]


def lan_addresses(ipv6=False):
    """The addresses other devices reach this machine at: the one a UDP socket would
    leave by (connect() on UDP sends nothing), then the host name's; IPv6 ones only for
    a server listening on ::."""
    found = []
    probes = [(socket.AF_INET, "192.0.2.1")] + [(socket.AF_INET6, "2001:db8::1")] * ipv6
    for family, probe in probes:
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect((probe, 9))       # documentation addresses (RFC 5737, 3849)
                found.append(s.getsockname()[0])
        except OSError:
            pass
    try:
        found += [info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None,
                                                             socket.AF_INET)]
    except OSError:
        pass
    unique = []
    for address in found:
        if address not in unique and not address.startswith(("127.", "::1", "fe80")):
            unique.append(address)
    return unique


def url_host(address):
    return "[%s]" % address if ":" in address else address


def tls_path(config, name):
    return os.path.join(config.data, TLS_FOLDER, name)


def private_ca(config):
    """ca.pem's path when the server's certificate comes from its own CA, else None."""
    if config.tls != "self-signed" or config.certfile or config.acme_domain:
        return None
    return tls_path(config, "ca.pem")


DNS_NAME = re.compile(r"(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)+",
                      re.ASCII)     # what a certificate's dNSName holds (RFC 5280 4.2.1.6)


def certificate_names(config):
    """(DNS names, IP addresses) the server certificate is for: this machine's names,
    127.0.0.1, ::1, the LAN addresses the front page shows, and the names or addresses in
    ANKISYNC_TLS_NAMES (commas between): those lan_addresses() cannot see, such as a
    Docker host's address or a router's DNS name."""
    names, addresses = ["localhost"], [ipaddress.ip_address("127.0.0.1"),
                                       ipaddress.ip_address("::1")]
    hostname = socket.gethostname()
    found = [hostname, socket.getfqdn()] + ([hostname + ".local"] if "." not in hostname
                                            else [])
    if config.host not in ("0.0.0.0", "::", ""):
        found.append(config.host)
    found += lan_addresses(config.host == "::")
    found += [part.strip() for part in os.environ.get("ANKISYNC_TLS_NAMES", "").split(",")]
    for name in found:
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            name = name.rstrip(".").lower()
            if DNS_NAME.fullmatch(name) and name not in names:
                names.append(name)
            continue
        if address not in addresses:
            addresses.append(address)
    return names, addresses


def ensure_private_ca(config, renew=False):
    """Make <data>/.tls/'s CA if there is none, and a server certificate from it when
    there is none, it lacks one of certificate_names(), ends within CERT_RENEW_DAYS, or
    `renew`. Returns what was made, as words for the log. Each file is written whole, by
    mkstemp: 0600 whatever the umask."""
    folder = os.path.join(config.data, TLS_FOLDER)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    ca, ca_key = tls_path(config, "ca.pem"), tls_path(config, "ca.key")
    made = []
    if not os.path.exists(ca) and not os.path.exists(ca_key):
        ca_pem, ca_key_pem = make_ca(socket.gethostname(), now)
        write_atomically(ca_key, ca_key_pem.encode("ascii"), TEMP_TLS)
        write_atomically(ca, ca_pem.encode("ascii"), TEMP_TLS)
        made.append("a new CA")
    for path in (ca, ca_key):
        if not os.path.exists(path):
            raise SystemExit("ankisync: %s is missing: put it back, or move %s away for a new "
                             "CA (every device then trusts the new one)" % (path, folder))
    with open(ca, encoding="ascii") as f:
        ca_pem = f.read()
    with open(ca_key, encoding="ascii") as f:
        ca_key_pem = f.read()
    names, addresses = certificate_names(config)
    reason = ("asked for" if renew else "for the new CA" if made
              else server_certificate_stale(config, names, addresses, now))
    if reason:
        try:
            cert_pem, key_pem = make_server_certificate(ca_pem, ca_key_pem, names, addresses,
                                                        now)
        except (ValueError, IndexError) as e:
            raise SystemExit("ankisync: %s and %s are no CA ankisync made (%s): move %s away "
                             "for a new one" % (ca, ca_key, e, folder))
        write_atomically(tls_path(config, "server.key"), key_pem.encode("ascii"), TEMP_TLS)
        write_atomically(tls_path(config, "server.pem"), cert_pem.encode("ascii"), TEMP_TLS)
        made.append("a server certificate (%s) for %s" % (
            reason, ", ".join(names + [str(a) for a in addresses])))
    return made


def server_certificate_stale(config, names, addresses, now):
    """Why the server certificate must be made anew, or '' while it serves."""
    cert, key = tls_path(config, "server.pem"), tls_path(config, "server.key")
    if not (os.path.exists(cert) and os.path.exists(key)):
        return "none yet"
    try:
        with open(cert, encoding="ascii") as f:
            expires, has_names, has_addresses = certificate_facts(f.read())
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
    except (ValueError, IndexError, UnicodeDecodeError, ssl.SSLError):
        return "unreadable"
    if expires - now < datetime.timedelta(days=CERT_RENEW_DAYS):
        return "the old one ends %s" % expires.date()
    missing = [n for n in names if n not in has_names]
    missing += [str(a) for a in addresses if a not in has_addresses]
    return "new: %s" % ", ".join(missing) if missing else ""


def private_ca_context(config):
    """The server's TLS context for tls = self-signed: the files made or renewed first."""
    for line in ensure_private_ca(config):
        log.info("made %s in %s", line, os.path.join(config.data, TLS_FOLDER))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls_path(config, "server.pem"), tls_path(config, "server.key"))
    log.info("HTTPS from the private CA %s: devices trust it once (the front page says how)",
             tls_path(config, "ca.pem"))
    return context


def renew_private_ca(config, tls):
    """A running server's daily look at its private certificate: a new one, from the same
    CA, served at once when it ends within CERT_RENEW_DAYS or the machine has a new name."""
    try:
        made = ensure_private_ca(config)
        if made:
            tls.swap(load_certificate(tls_path(config, "server.pem"),
                                      tls_path(config, "server.key")), "; ".join(made))
    except (SystemExit, OSError, ValueError, ssl.SSLError) as e:
        log.warning("the private CA's certificate could not be renewed (%s): the one served "
                    "stays", str(e).replace("ankisync: ", ""))


def command_tls(config, args):
    made = ensure_private_ca(config, renew=True)
    folder = os.path.join(config.data, TLS_FOLDER)
    for line in made:
        print("made %s" % line)
    print("in %s: ca.pem (the CA's certificate, for devices to trust), ca.key (keep it "
          "here), server.pem, server.key" % folder)
    if config.tls != "self-signed" or config.certfile:
        print("set tls = self-signed in the ini (and certfile, keyfile empty) to serve them")
    print("each device trusts ca.pem once: the front page (https://...:%d%s) offers it and "
          "says how, per client" % (config.port, config.normalized_base_path()))


def offer_first_user(app, config):
    hint = "python3 %s%s adduser NAME" % (os.path.basename(__file__),
                                          " --config %s" % config.source if config.source else "")
    if in_container():
        hint = "docker exec -it <container> python %s adduser NAME" % os.path.basename(__file__)
    while sys.stdin.isatty():
        name = input("No users yet. Name of the first user (empty to skip): ").strip()
        if not name:
            break
        try:
            name = app.users.check_new(name)
            app.users.add(name, read_password(name))
        except ValueError as e:
            print("ankisync: %s" % e)
            continue
        log.info("added user %s", name)
        return
    log.warning("no users yet: add one with `%s` (it works while the server runs), "
                "or set SYNC_USER1=name:password", hint)


def install_sigterm():
    """Docker stops containers with SIGTERM: shut down as on Ctrl-C."""
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt
    try:
        signal.signal(signal.SIGTERM, stop)
    except ValueError:
        pass        # not the main thread (tests): nothing to install


class Command:
    """One subcommand: its name, the function that runs it, its help, its arguments."""

    def __init__(self, name, run, summary, description, arguments=()):
        self.name, self.run, self.summary = name, run, summary
        self.description, self.arguments = description, arguments


USER_NAME = (("name",), {"help": "the user's name, as typed at the client's login"})
COMMANDS = (
    Command("serve", command_serve, "run the sync server",
            "Serve every user's collection and media until Ctrl-C or SIGTERM. With no users "
            "yet, asks for the first one on a terminal."),
    Command("adduser", command_adduser, "add a user (password from the terminal or stdin)",
            "Add a user. The password is asked twice on a terminal, or read as one line "
            "from stdin. Works while the server runs.",
            [USER_NAME, (("--fresh",), {"action": "store_true",
                                        "help": "set aside a data folder an earlier user of "
                                                "the name left, instead of taking it over"})]),
    Command("passwd", command_passwd, "change a user's password and log out their devices",
            "Change a user's password; each of their devices must log in again.",
            [USER_NAME]),
    Command("deluser", command_deluser, "remove a user and log out their devices",
            "Remove a user. Their collection and media stay in the data folder unless "
            "--delete-data is given.",
            [USER_NAME, (("--delete-data",), {"action": "store_true",
                                               "help": "also delete the collection and media"})]),
    Command("lsuser", command_lsuser, "list the users", "List the users, one per line."),
    Command("status", command_status, "users, their collections, media, devices and backups",
            "One row per user: collection size, notes, cards, media, the last sync (when, "
            "which client, from where), devices seen in the last 30 days and restore points; "
            "with a name, that user's devices and restore points too. Works with or without "
            "a running server.",
            [(("name",), {"nargs": "?", "help": "one user, in more detail"})]),
    Command("hash", command_hash, "print a password's hash, for PASSWORDS_HASHED=1",
            "Print the PBKDF2 hash (a PHC string) of a password, asked twice on a terminal "
            "or read as one line from stdin, for SYNC_USERn=name:HASH with PASSWORDS_HASHED=1: "
            "the password itself then appears in no file or variable."),
    Command("health", command_health, "check that the server answers (for health checks)",
            "Ask the running server's /health at the address and scheme the settings give; "
            "exits with 0 when it answers. Docker's HEALTHCHECK uses it."),
    Command("backups", command_backups, "list a user's restore points",
            "List the user's restore points, newest first: id, when, why, notes, cards, "
            "size.", [USER_NAME]),
    Command("backup", command_backup, "make a restore point now",
            "Keep the user's collection as it is now as a restore point.", [USER_NAME]),
    Command("restore", command_restore, "put a restore point back",
            "Make a restore point the user's collection again, with the media deleted since "
            "then; the current collection becomes a restore point itself, so this can be "
            "undone. Every device is asked for a full sync. Works while the server runs.",
            [USER_NAME, (("id",), {"help": "the restore point, as `backups` lists it"})]),
    Command("export", command_export, "write a user's collection as a .colpkg",
            "Write the user's collection and media as a collection package that Anki "
            "imports with File > Import, without syncing; with --point, a restore point's "
            "collection instead, with the media it used.",
            [USER_NAME, (("file",), {"help": "the .colpkg to write"}),
             (("--point",), {"metavar": "ID", "help": "a restore point, as `backups` lists "
                             "it"})]),
    Command("import", command_import, "make a .colpkg the user's collection",
            "Make a collection package (from Anki's File > Export) the user's collection; "
            "the current one becomes a restore point first. Every device is asked for a "
            "full sync.", [USER_NAME, (("file",), {"help": "the .colpkg to read"})]),
    Command("tls", command_tls, "make a private CA and a certificate for this machine",
            "Make (or renew) the private CA and the server certificate of tls = self-signed "
            "in <data>/.tls/: the CA once, a server certificate for this machine's names and "
            "LAN addresses each time. Devices that trust the CA trust the new certificate "
            "too. The server uses it at its next start."),
    Command("import-ankisyncd", command_import_ankisyncd, "bring users over from ankisyncd",
            "Bring the users, collections and media of an ankisyncd or anki-sync-server-rs "
            "data folder (the one with auth.db and collections/) over; users keep their "
            "passwords.", [(("path",), {"help": "ankisyncd's folder"})]),
)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="ankisync.py", description="A self-hosted Anki sync server in one file.")
    config_help = "ini file (default: ankisync.ini beside this script, if present)"
    parser.add_argument("--config", metavar="PATH", help=config_help)
    parser.add_argument("--version", action="version", version="ankisync " + __version__)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        sub = subparsers.add_parser(command.name, help=command.summary,
                                    description=command.description)
        # --config may also come after the command; SUPPRESS keeps one given before it.
        sub.add_argument("--config", metavar="PATH", help=config_help,
                         default=argparse.SUPPRESS)
        for flags, options in command.arguments:
            sub.add_argument(*flags, **options)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        raise SystemExit(2)
    return args


# ---------------------------------------------------------------------------
# Appendix A. zstd
#   Anki clients compress every request body with zstd and expect zstd back.
#   Three interchangeable backends, best first:
#   stdlib   compression.zstd (Python 3.14+) or its twin `backports.zstd`
#   libzstd  the system library through ctypes
#   python   a pure-Python decoder (RFC 8878) and a writer of raw blocks
#   choose_zstd() picks one. All decode every frame of a stream, skip skippable
#   frames, refuse corrupt or truncated input with ZstdError and stop with
#   ZstdLimitError before output passes a caller-given limit.
# ---------------------------------------------------------------------------

ZSTD_MAGIC = 0xFD2FB528               # RFC 8878 3.1.1: Magic_Number of a zstd frame
SKIPPABLE_MAGIC = 0x184D2A50          # RFC 8878 3.1.2: skippable frames use 0x184D2A5?
SKIPPABLE_MAGIC_MASK = 0xFFFFFFF0     # ...so the low nibble is free
WINDOW_LOG_MAX = 27                   # 128 MiB, libzstd's default ceiling: more needs --long=28+
WINDOW_SIZE_MAX = 1 << WINDOW_LOG_MAX
BLOCK_SIZE_MAX = 128 * 1024           # RFC 8878 3.1.1.2.3: no block decodes to more than 128 KiB
INPUT_CHUNK = 64 * 1024               # read compressed input this much at a time
OUTPUT_CHUNK = 128 * 1024             # hand decoded output over this much at a time
COMPRESSION_LEVEL = 3                 # zstd's default level: fast, good enough for sync payloads
COMPRESSION_WORKERS = 2               # a 56 MB download compresses in 0.13 s instead of 0.18 s
COMPRESSION_JOB = 1024 * 1024         # per worker job: the default (8 MB here) cost 55 MB of RSS


class ZstdError(ValueError):
    """Corrupt or truncated zstd input, or a backend that cannot be used."""


class ZstdLimitError(ZstdError):
    """Decoded output would exceed the caller's limit."""


def _limit_error(limit):
    return ZstdLimitError("zstd data decodes to more than the %d byte limit" % limit)


class Zstd:
    """One zstd implementation; subclasses supply the two stream methods."""

    name = "?"

    def decompress_stream(self, read, write, limit):
        """Decode all frames from read(n) into write(bytes); return bytes written."""
        raise NotImplementedError

    def compress_stream(self, read, write):
        """Encode read(n) until b'' into one frame for write(bytes); return bytes written."""
        raise NotImplementedError

    def compress(self, data):
        parts = []
        self.compress_stream(io.BytesIO(data).read, parts.append)
        return b"".join(parts)

    def decompress(self, data, limit):
        parts = []
        self.decompress_stream(io.BytesIO(data).read, parts.append, limit)
        return b"".join(parts)

    def __repr__(self):
        return "<Zstd %s>" % self.name


# --- backend: libzstd through ctypes --------------------------------------------------
ZSTD_d_windowLogMax = 100             # zstd.h: ZSTD_dParameter
ZSTD_c_compressionLevel = 100         # zstd.h: ZSTD_cParameter
ZSTD_c_checksumFlag = 201             # zstd.h: ZSTD_cParameter
ZSTD_c_nbWorkers = 400                # zstd.h: ZSTD_cParameter (needs a multithreaded build)
ZSTD_c_jobSize = 401                  # zstd.h: ZSTD_cParameter
ZSTD_reset_session_only = 1           # zstd.h: ZSTD_ResetDirective
REUSED_CONTEXT_MAX = 1024 * 1024      # decoders of bigger bodies are freed, not kept per thread
ZSTD_e_continue = 0                   # zstd.h: ZSTD_EndDirective
ZSTD_e_end = 2
LIBZSTD_MIN_VERSION = 10400           # 1.4.0 made ZSTD_compressStream2 and *_setParameter stable


class ZSTD_inBuffer(ctypes.Structure):
    _fields_ = [("src", ctypes.c_char_p), ("size", ctypes.c_size_t), ("pos", ctypes.c_size_t)]


class ZSTD_outBuffer(ctypes.Structure):
    _fields_ = [("dst", ctypes.c_void_p), ("size", ctypes.c_size_t), ("pos", ctypes.c_size_t)]


class LibZstd(Zstd):
    """The system libzstd, called through ctypes with its streaming API."""

    name = "libzstd"

    def __init__(self, lib):
        size_t, ptr, c_int = ctypes.c_size_t, ctypes.c_void_p, ctypes.c_int
        out_p, in_p = ctypes.POINTER(ZSTD_outBuffer), ctypes.POINTER(ZSTD_inBuffer)
        try:
            version = self._bind(lib, "ZSTD_versionNumber", ctypes.c_uint)()
            self._is_error = self._bind(lib, "ZSTD_isError", ctypes.c_uint, size_t)
            self._error_name = self._bind(lib, "ZSTD_getErrorName", ctypes.c_char_p, size_t)
            self._create_dstream = self._bind(lib, "ZSTD_createDStream", ptr)
            self._free_dstream = self._bind(lib, "ZSTD_freeDStream", size_t, ptr)
            self._set_dparameter = self._bind(
                lib, "ZSTD_DCtx_setParameter", size_t, ptr, c_int, c_int)
            self._decompress = self._bind(lib, "ZSTD_decompressStream", size_t, ptr, out_p, in_p)
            self._create_cstream = self._bind(lib, "ZSTD_createCStream", ptr)
            self._free_cstream = self._bind(lib, "ZSTD_freeCStream", size_t, ptr)
            self._set_cparameter = self._bind(
                lib, "ZSTD_CCtx_setParameter", size_t, ptr, c_int, c_int)
            self._compress = self._bind(
                lib, "ZSTD_compressStream2", size_t, ptr, out_p, in_p, c_int)
            self._compress_bound = self._bind(lib, "ZSTD_compressBound", size_t, size_t)
            self._reset_dstream = self._bind(lib, "ZSTD_DCtx_reset", size_t, ptr, c_int)
            self._create_cctx = self._bind(lib, "ZSTD_createCCtx", ptr)
            self._free_cctx = self._bind(lib, "ZSTD_freeCCtx", size_t, ptr)
            self._compress_once = self._bind(lib, "ZSTD_compressCCtx", size_t, ptr,
                                             ctypes.c_char_p, size_t, ctypes.c_char_p, size_t,
                                             c_int)
        except AttributeError as e:
            raise ZstdError("libzstd lacks %s: install libzstd 1.4 or newer" % e) from None
        if version < LIBZSTD_MIN_VERSION:
            raise ZstdError("libzstd %d is too old: install libzstd 1.4 or newer" % version)
        self.version = version
        # Each thread's contexts and buffer, reused: creating them took a third of the
        # time of a small request.
        self._threads = threading.local()

    @staticmethod
    def _bind(lib, name, restype, *argtypes):
        function = getattr(lib, name)
        function.restype = restype
        function.argtypes = argtypes
        return function

    def _check(self, result):
        if self._is_error(result):
            message = self._error_name(result).decode("ascii", "replace")
            raise ZstdError("corrupt zstd data: %s" % message)
        return result

    def _mine(self):
        mine = getattr(self._threads, "contexts", None)
        if mine is None:
            mine = self._threads.contexts = _ThreadContexts(self)
        return mine

    def decompress_stream(self, read, write, limit):
        mine = self._mine()
        dstream, mine.dstream = mine.dstream, None
        if dstream is None:
            dstream = self._create_dstream()
            if not dstream:
                raise MemoryError("ZSTD_createDStream failed")
            self._check(self._set_dparameter(dstream, ZSTD_d_windowLogMax, WINDOW_LOG_MAX))
        keep = False
        try:
            produced = self._decompress_with(dstream, read, write, limit)
            # A context that decoded much holds a large window: better freed.
            keep = produced <= REUSED_CONTEXT_MAX
            return produced
        finally:
            if keep and not self._is_error(self._reset_dstream(dstream, ZSTD_reset_session_only)):
                mine.dstream = dstream
            else:
                self._free_dstream(dstream)

    def _output_buffer(self):
        mine = self._mine()
        if mine.buffer is None:
            mine.buffer = ctypes.create_string_buffer(OUTPUT_CHUNK)
        return mine.buffer

    def _decompress_with(self, dstream, read, write, limit):
        buffer = self._output_buffer()
        out = ZSTD_outBuffer(ctypes.addressof(buffer), 0, 0)
        produced = 0
        frame_done = True                 # no input at all is an empty, valid stream
        while True:
            data = bytes(read(INPUT_CHUNK))       # c_char_p takes bytes only
            if not data:
                break
            src = ZSTD_inBuffer(data, len(data), 0)
            while True:
                room = limit - produced
                # One byte more than the room tells "over the limit" from "exactly at it".
                out.size, out.pos = min(OUTPUT_CHUNK, room + 1), 0
                consumed = src.pos
                hint = self._check(self._decompress(dstream, out, src))
                if out.pos > room:
                    raise _limit_error(limit)
                if out.pos:
                    write(ctypes.string_at(buffer, out.pos))
                    produced += out.pos
                # A call that moved nothing leaves the frame state as it was.
                if out.pos or src.pos != consumed:
                    frame_done = hint == 0
                if src.pos == src.size and out.pos < out.size:
                    break
        if not frame_done:
            raise ZstdError("truncated zstd data: input ends inside a frame")
        return produced

    def compress(self, data):
        # One shot: libzstd sizes its tables to the data, where a stream assumes megabytes.
        data = bytes(data)
        mine = self._mine()
        if mine.cctx is None:
            mine.cctx = self._create_cctx()
            if not mine.cctx:
                raise MemoryError("ZSTD_createCCtx failed")
        cctx = mine.cctx
        bound = self._compress_bound(len(data))
        if bound <= OUTPUT_CHUNK:
            buffer = self._output_buffer()
        else:
            buffer = ctypes.create_string_buffer(bound)
        size = self._check(self._compress_once(cctx, buffer, bound, data, len(data),
                                               COMPRESSION_LEVEL))
        return ctypes.string_at(buffer, size)

    def compress_stream(self, read, write):
        cstream = self._create_cstream()
        if not cstream:
            raise MemoryError("ZSTD_createCStream failed")
        try:
            self._check(self._set_cparameter(cstream, ZSTD_c_compressionLevel, COMPRESSION_LEVEL))
            self._check(self._set_cparameter(cstream, ZSTD_c_checksumFlag, 1))
            # An error here only means a single-threaded libzstd: compress on this thread.
            if not self._is_error(self._set_cparameter(cstream, ZSTD_c_nbWorkers,
                                                       COMPRESSION_WORKERS)):
                self._set_cparameter(cstream, ZSTD_c_jobSize, COMPRESSION_JOB)
            return self._compress_with(cstream, read, write)
        finally:
            self._free_cstream(cstream)

    def _compress_with(self, cstream, read, write):
        buffer = ctypes.create_string_buffer(OUTPUT_CHUNK)
        out = ZSTD_outBuffer(ctypes.addressof(buffer), OUTPUT_CHUNK, 0)
        written = 0
        while True:
            data = bytes(read(INPUT_CHUNK))       # c_char_p takes bytes only
            directive = ZSTD_e_continue if data else ZSTD_e_end
            src = ZSTD_inBuffer(data, len(data), 0)
            while True:
                out.pos = 0
                pending = self._check(self._compress(cstream, out, src, directive))
                if out.pos:
                    write(ctypes.string_at(buffer, out.pos))
                    written += out.pos
                if directive == ZSTD_e_end and pending == 0:
                    return written
                if directive == ZSTD_e_continue and src.pos == src.size:
                    break


class _ThreadContexts:
    """One thread's libzstd contexts and buffer, freed when the thread ends: workers
    come and go with the load."""

    def __init__(self, zstd):
        self.zstd = zstd
        self.dstream = None
        self.cctx = None
        self.buffer = None

    def __del__(self):
        if self.dstream:
            self.zstd._free_dstream(self.dstream)
        if self.cctx:
            self.zstd._free_cctx(self.cctx)


# --- backend: compression.zstd (3.14+) or backports.zstd ------------------------------
class StdlibZstd(Zstd):
    """compression.zstd; `module` is it or backports.zstd, which has the same API."""

    name = "stdlib"

    def __init__(self, module):
        self._zstd = module

    def compress(self, data):
        # One shot: the library sizes its tables to the data, where a stream assumes megabytes.
        return self._zstd.compress(data, level=COMPRESSION_LEVEL)

    def decompress_stream(self, read, write, limit):
        zstd = self._zstd
        options = {zstd.DecompressionParameter.window_log_max: WINDOW_LOG_MAX}
        produced = 0
        frame = None                      # decompressor of the frame being decoded
        data = b""
        try:
            while True:
                if not data:
                    data = read(INPUT_CHUNK)
                    if not data:
                        break
                if frame is None:
                    # A ZstdDecompressor decodes one frame (or skips one skippable frame).
                    frame = zstd.ZstdDecompressor(options=options)
                while True:
                    room = limit - produced
                    chunk = frame.decompress(data, max_length=min(OUTPUT_CHUNK, room + 1))
                    data = b""
                    if len(chunk) > room:
                        raise _limit_error(limit)
                    if chunk:
                        write(chunk)
                        produced += len(chunk)
                    if frame.eof:
                        data, frame = frame.unused_data, None
                        break
                    if frame.needs_input:
                        break
        except zstd.ZstdError as e:
            raise ZstdError("corrupt zstd data: %s" % e) from None
        if frame is not None:
            raise ZstdError("truncated zstd data: input ends inside a frame")
        return produced

    def compress_stream(self, read, write):
        zstd = self._zstd
        options = {zstd.CompressionParameter.compression_level: COMPRESSION_LEVEL,
                   zstd.CompressionParameter.checksum_flag: 1}
        if zstd.CompressionParameter.nb_workers.bounds()[1] >= COMPRESSION_WORKERS:
            options[zstd.CompressionParameter.nb_workers] = COMPRESSION_WORKERS
            options[zstd.CompressionParameter.job_size] = COMPRESSION_JOB
        compressor = zstd.ZstdCompressor(options=options)
        written = 0
        while True:
            data = read(INPUT_CHUNK)
            chunk = compressor.compress(data) if data else compressor.flush()
            if chunk:
                write(chunk)
                written += len(chunk)
            if not data:
                return written


# --- backend: pure Python -------------------------------------------------------------
#
# The decoder follows RFC 8878; section numbers below refer to it. Speed comes
# from the two hot loops (Huffman literals, sequences), which keep their bit
# reader in local variables: `container` holds the next `bits` unread bits of a
# backward bitstream, the next bit to read being its highest. Reading a backward
# stream means walking its bytes from the end, and a little-endian int of bytes
# [p-k:p] is exactly those k bytes in reading order, so a refill is one
# int.from_bytes(). The writer stores raw blocks: valid zstd, no compressor.
MAGIC_SIZE = 4                        # 3.1.1: Magic_Number, and a skippable frame's Frame_Size
BLOCK_HEADER_SIZE = 3                 # 3.1.1.2: Last_Block, Block_Type and Block_Size
FRAME_HEADER_RESERVED_BIT = 0x08      # 3.1.1.1.1: must be zero
CONTENT_CHECKSUM_FLAG = 0x04          # 3.1.1.1.1: the frame ends with a checksum
DICTIONARY_ID_SIZES = (0, 1, 2, 4)    # 3.1.1.1.1: by Dictionary_ID_Flag
FRAME_CONTENT_SIZE_SIZES = (0, 2, 4, 8)   # 3.1.1.1.1: by Frame_Content_Size_Flag
FCS_TWO_BYTE_OFFSET = 256             # 3.1.1.1.4: a 2-byte Frame_Content_Size is stored minus 256
WINDOW_LOG_MIN = 10                   # 3.1.1.1.2: Window_Descriptor exponent counts from 2**10
CHECKSUM_SIZE = 4                     # 3.1.1: low 4 bytes of the XXH64 of the content

BLOCK_RAW, BLOCK_RLE, BLOCK_COMPRESSED = 0, 1, 2    # 3.1.1.2: Block_Type
LITERALS_RAW, LITERALS_RLE, LITERALS_COMPRESSED, LITERALS_TREELESS = 0, 1, 2, 3
MODE_PREDEFINED, MODE_RLE, MODE_FSE, MODE_REPEAT = 0, 1, 2, 3   # 3.1.1.3.2.1
SEQUENCE_COUNT_TWO_BYTES = 128        # 3.1.1.3.2.1: byte0 from here on starts a 2-byte count
SEQUENCE_COUNT_THREE_BYTES = 255      # ...and this byte0 starts a 3-byte count
LONG_SEQUENCE_COUNT_BASE = 0x7F00     # ...which is stored minus this
HUFFMAN_DIRECT_WEIGHTS = 128          # 4.2.1.1: a headerByte from here on means 4-bit weights
HUFFMAN_MAX_BITS = 11                 # 4.2.1: Max_Number_of_Bits
HUFFMAN_MAX_SYMBOLS = 256             # literals are bytes
HUFFMAN_WEIGHTS_FSE_LOG = 6           # 4.2.1.2: weights' FSE Accuracy_Log is at most 6
HUFFMAN_MAX_WEIGHT = 12               # highest weight an FSE-coded weight stream may hold
JUMP_TABLE_SIZE = 6                   # 3.1.1.3.1.6: three 2-byte stream sizes
FSE_ACCURACY_LOG_MIN = 5              # 4.1.1: Accuracy_Log is stored minus 5
FSE_DESCRIPTION_MAX = 128             # bytes of an FSE table description: 53 symbols fit in ~75
INITIAL_REPEATED_OFFSETS = (1, 4, 8)  # 3.1.2.5: Repeated_Offset1..3 at the start of a frame
BITSTREAM_PADDING = 32                # zeros before a sequence stream: > a refill + a sequence
HUFFMAN_REFILL_BYTES = 7              # 56 bits: several literals per refill, container < 2**67
SEQUENCE_REFILL_BYTES = 12            # 96 bits: one refill covers a whole sequence
SEQUENCE_BITS_MAX = 89                # per sequence: 31 + 16 + 16 extra bits, 9 + 9 + 8 state bits
HISTORY_SLACK_MIN = 1 << 20           # trim the history at most once per MiB: del is a memmove
RAW_WINDOW_DESCRIPTOR = 0x38          # 3.1.1.1.2: exponent 7, mantissa 0 = 128 KiB, one raw block
SINGLE_SEGMENT_FLAG = 0x20            # 3.1.1.1.1: no Window_Descriptor, window = content size
MASK64 = (1 << 64) - 1
MASK32 = (1 << 32) - 1
BIT_MASKS = tuple((1 << n) - 1 for n in range(128))   # BIT_MASKS[n] keeps the low n bits

# 3.1.1.3.2.1.1: Literals_Length codes -> (Baseline, Number_of_Bits); codes 0..15 are the length.
LITERALS_LENGTH_CODES = tuple((n, 0) for n in range(16)) + (
    (16, 1), (18, 1), (20, 1), (22, 1), (24, 2), (28, 2), (32, 3), (40, 3), (48, 4), (64, 6),
    (128, 7), (256, 8), (512, 9), (1024, 10), (2048, 11), (4096, 12), (8192, 13), (16384, 14),
    (32768, 15), (65536, 16))

# 3.1.1.3.2.1.1: Match_Length codes -> (Baseline, Number_of_Bits); codes 0..31 are length - 3.
MATCH_LENGTH_CODES = tuple((n + 3, 0) for n in range(32)) + (
    (35, 1), (37, 1), (39, 1), (41, 1), (43, 2), (47, 2), (51, 3), (59, 3), (67, 4), (83, 4),
    (99, 5), (131, 7), (259, 8), (515, 9), (1027, 10), (2051, 11), (4099, 12), (8195, 13),
    (16387, 14), (32771, 15), (65539, 16))
OFFSET_CODE_MAX = 31                  # 3.1.1.3.2.1.1: Offset_Value = 2**code + code extra bits

# 3.1.1.3.2.2: largest Accuracy_Log of a described table, and of the predefined one.
LITERALS_LENGTH_MAX_LOG, LITERALS_LENGTH_DEFAULT_LOG = 9, 6
MATCH_LENGTH_MAX_LOG, MATCH_LENGTH_DEFAULT_LOG = 9, 6
OFFSET_MAX_LOG, OFFSET_DEFAULT_LOG = 8, 5

# 3.1.1.3.2.2: predefined distributions (-1 means "less than 1").
LITERALS_LENGTH_DEFAULT = (4, 3, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2,
                           2, 3, 2, 1, 1, 1, 1, 1, -1, -1, -1, -1)
MATCH_LENGTH_DEFAULT = (1, 4, 3, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
                        1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1,
                        -1, -1, -1, -1)
OFFSET_DEFAULT = (1, 1, 1, 1, 1, 1, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
                  -1, -1, -1, -1, -1)

# XXH64 primes (xxhash spec).
XXH_PRIME1 = 0x9E3779B185EBCA87
XXH_PRIME2 = 0xC2B2AE3D27D4EB4F
XXH_PRIME3 = 0x165667B19E3779F9
XXH_PRIME4 = 0x85EBCA77C2B2AE63
XXH_PRIME5 = 0x27D4EB2F165667C5
XXH_STRIPE = 32                       # bytes per round of the four accumulators


def _corrupt(reason):
    return ZstdError("corrupt zstd data: %s" % reason)


def _truncated():
    return ZstdError("truncated zstd data: input ends inside a frame")


class XXH64:
    """Streaming xxHash64 with seed 0: the frame's Content_Checksum (3.1.1)."""

    def __init__(self):
        self._lanes = ((XXH_PRIME1 + XXH_PRIME2) & MASK64, XXH_PRIME2, 0, -XXH_PRIME1 & MASK64)
        self._pending = b""               # the tail that does not fill a stripe yet
        self._length = 0

    def update(self, data):
        self._length += len(data)
        if self._pending:
            data = self._pending + data
        whole = len(data) - len(data) % XXH_STRIPE
        if whole:
            self._lanes = self._stripes(data, whole)
        self._pending = bytes(data[whole:])

    def _stripes(self, data, size):
        words = struct.unpack_from("<%dQ" % (size // 8), data)
        lanes = []
        # Each of the four accumulators eats every fourth 8-byte word.
        for lane, acc in enumerate(self._lanes):
            for word in words[lane::4]:   # self._round(acc, word), inlined
                acc = (acc + word * XXH_PRIME2) & MASK64
                acc = ((acc << 31 | acc >> 33) & MASK64) * XXH_PRIME1 & MASK64
            lanes.append(acc)
        return tuple(lanes)

    @staticmethod
    def _round(acc, word):
        acc = (acc + word * XXH_PRIME2) & MASK64
        return ((acc << 31 | acc >> 33) & MASK64) * XXH_PRIME1 & MASK64

    def intdigest(self):
        rotl = self._rotl
        if self._length >= XXH_STRIPE:
            v1, v2, v3, v4 = self._lanes
            h = (rotl(v1, 1) + rotl(v2, 7) + rotl(v3, 12) + rotl(v4, 18)) & MASK64
            for v in self._lanes:
                h = ((h ^ self._round(0, v)) * XXH_PRIME1 + XXH_PRIME4) & MASK64
        else:
            h = XXH_PRIME5
        h = (h + self._length) & MASK64
        tail, i = self._pending, 0
        while i + 8 <= len(tail):
            h ^= self._round(0, int.from_bytes(tail[i:i + 8], "little"))
            h = (rotl(h, 27) * XXH_PRIME1 + XXH_PRIME4) & MASK64
            i += 8
        if i + 4 <= len(tail):
            h ^= int.from_bytes(tail[i:i + 4], "little") * XXH_PRIME1 & MASK64
            h = (rotl(h, 23) * XXH_PRIME2 + XXH_PRIME3) & MASK64
            i += 4
        for byte in tail[i:]:
            h ^= byte * XXH_PRIME5 & MASK64
            h = rotl(h, 11) * XXH_PRIME1 & MASK64
        h = (h ^ h >> 33) * XXH_PRIME2 & MASK64
        h = (h ^ h >> 29) * XXH_PRIME3 & MASK64
        return h ^ h >> 32

    @staticmethod
    def _rotl(x, n):
        return (x << n | x >> (64 - n)) & MASK64


class _Input:
    """Exact reads over read(n), which may return less than asked, with bounded buffering."""

    def __init__(self, read):
        self._read = read
        self._buffer = b""
        self._pos = 0

    def at_eof(self):
        if self._pos < len(self._buffer):
            return False
        self._buffer, self._pos = self._read(INPUT_CHUNK), 0
        return not self._buffer

    def read_exact(self, size):
        buffer, pos = self._buffer, self._pos
        if pos + size <= len(buffer):
            self._pos = pos + size
            return buffer[pos:pos + size]
        parts, have = [buffer[pos:]], len(buffer) - pos
        while have < size:
            chunk = self._read(INPUT_CHUNK)
            if not chunk:
                raise _truncated()
            parts.append(chunk)
            have += len(chunk)
        self._buffer, self._pos = b"".join(parts), size
        return self._buffer[:size]

    def skip(self, size):
        while size:
            if self.at_eof():
                raise _truncated()
            step = min(size, len(self._buffer) - self._pos)
            self._pos += step
            size -= step


class _BackwardBits:
    """A short backward bitstream (4.1) read a few bits at a time; for the cold paths."""

    def __init__(self, data):
        if not data or not data[-1]:
            raise _corrupt("bitstream without its end mark")
        self._value = int.from_bytes(data, "little")
        self.left = self._value.bit_length() - 1      # bits below the end mark

    def read(self, count):
        """Next `count` bits; past the start they read as zeros and `left` goes negative."""
        self.left -= count
        if self.left >= 0:
            return (self._value >> self.left) & ((1 << count) - 1)
        return (self._value << -self.left) & ((1 << count) - 1)


def _read_fse_distribution(data, pos, max_log, max_symbol):
    """4.1.1: the FSE table description at data[pos:].

    Returns (Accuracy_Log, probabilities, position after the description)."""
    available = min(FSE_DESCRIPTION_MAX, len(data) - pos) * 8
    bits = int.from_bytes(data[pos:pos + FSE_DESCRIPTION_MAX], "little")
    accuracy_log = (bits & 15) + FSE_ACCURACY_LOG_MIN
    if accuracy_log > max_log:
        raise _corrupt("FSE Accuracy_Log %d above %d" % (accuracy_log, max_log))
    offset = 4
    remaining = 1 << accuracy_log
    probabilities = []
    while remaining > 0 and len(probabilities) <= max_symbol:
        # A value needs as many bits as remaining + 1 has, but small values save one.
        width = (remaining + 1).bit_length()
        value = (bits >> offset) & ((1 << width) - 1)
        low_mask = (1 << (width - 1)) - 1
        threshold = (1 << width) - 1 - (remaining + 1)
        if value & low_mask < threshold:
            value &= low_mask
            offset += width - 1
        else:
            if value > low_mask:
                value -= threshold
            offset += width
        probability = value - 1           # -1 is "less than 1": one cell, full reset
        remaining -= abs(probability)
        probabilities.append(probability)
        if probability == 0:
            while len(probabilities) <= max_symbol:     # 2-bit repeat flags of more zeros
                repeat = (bits >> offset) & 3
                offset += 2
                probabilities.extend([0] * repeat)
                if repeat != 3:
                    break
    if remaining != 0 or len(probabilities) > max_symbol + 1 or offset > available:
        raise _corrupt("bad FSE table description")
    return accuracy_log, probabilities, pos + (offset + 7) // 8


def _build_fse_table(accuracy_log, probabilities):
    """4.1.1: decoding table as a list of (symbol, Number_of_Bits, Baseline) per state."""
    size = 1 << accuracy_log
    symbols = [0] * size
    next_state = list(probabilities)
    high = size                           # "less than 1" symbols take the top cells
    for symbol, probability in enumerate(probabilities):
        if probability == -1:
            high -= 1
            symbols[high] = symbol
            next_state[symbol] = 1
    step = (size >> 1) + (size >> 3) + 3  # odd, so the walk visits every cell once
    mask = size - 1
    pos = 0
    for symbol, probability in enumerate(probabilities):
        for _ in range(probability):
            symbols[pos] = symbol
            pos = (pos + step) & mask
            while pos >= high:
                pos = (pos + step) & mask
    if pos != 0:
        raise _corrupt("FSE probabilities do not fill the table")
    table = []
    for symbol in symbols:
        state = next_state[symbol]
        next_state[symbol] = state + 1
        bits = accuracy_log - (state.bit_length() - 1)
        table.append((symbol, bits, (state << bits) - size))
    return table


class _SequenceTable:
    """An FSE table for one sequence field, entries ready for the hot loop:
    (value Baseline, value Number_of_Bits, state Number_of_Bits, state Baseline)."""

    def __init__(self, accuracy_log, entries):
        self.accuracy_log = accuracy_log
        self.entries = entries


class _SequenceField:
    """What differs between Literals_Length, Match_Length and Offset (3.1.1.3.2.1)."""

    def __init__(self, name, codes, max_log, default, default_log):
        self.name = name
        self.codes = codes                # code -> (Baseline, Number_of_Bits)
        self.max_log = max_log
        self.default = self.table(default_log, default)

    def table(self, accuracy_log, probabilities):
        if len(probabilities) > len(self.codes):
            raise _corrupt("%s code out of range" % self.name)
        codes = self.codes
        entries = [codes[symbol] + (bits, baseline)
                   for symbol, bits, baseline in _build_fse_table(accuracy_log, probabilities)]
        return _SequenceTable(accuracy_log, entries)

    def rle_table(self, code):
        if code >= len(self.codes):
            raise _corrupt("%s code out of range" % self.name)
        return _SequenceTable(0, [self.codes[code] + (0, 0)])


class _HuffmanTable:
    """4.2.1: a literals prefix code, decoded Max_Number_of_Bits bits at a time.

    `symbols`/`bits` give one literal per index; `runs`/`run_bits` give all the
    literals whose codes fit entirely in the index, so one lookup yields several."""

    def __init__(self, weights):
        total = sum(1 << (w - 1) for w in weights if w)
        if not total:
            raise _corrupt("Huffman weights all zero")
        max_bits = total.bit_length()
        left = (1 << max_bits) - total    # the last weight is implied: it fills the tree
        if max_bits > HUFFMAN_MAX_BITS or left & (left - 1):
            raise _corrupt("bad Huffman weights")
        weights = list(weights) + [left.bit_length()]
        if len(weights) > HUFFMAN_MAX_SYMBOLS:
            raise _corrupt("too many Huffman weights")
        self.max_bits = max_bits
        symbols, bits = [], []
        # Longest codes first, each weight in symbol order: that is the canonical order.
        for weight, symbol in sorted((w, s) for s, w in enumerate(weights) if w):
            cells = 1 << (weight - 1)
            symbols.extend([bytes((symbol,))] * cells)
            bits.extend([max_bits + 1 - weight] * cells)
        self.symbols, self.bits = symbols, bits
        self.runs, self.run_bits = self._runs(symbols, bits, max_bits)

    @staticmethod
    def _runs(symbols, bits, max_bits):
        mask = (1 << max_bits) - 1
        runs, run_bits = [], []
        for index in range(1 << max_bits):
            used = bits[index]
            run = symbols[index]
            while True:
                follow = (index << used) & mask
                size = bits[follow]
                if used + size > max_bits:
                    break
                run += symbols[follow]
                used += size
            runs.append(run)
            run_bits.append(used)
        return runs, run_bits

    def decode_stream(self, data, start, end, count):
        """Decode the backward bitstream data[start:end] into exactly `count` literals."""
        if end <= start or not data[end - 1]:
            raise _corrupt("Huffman stream without its end mark")
        width = self.max_bits
        mask = (1 << width) - 1
        runs, run_bits = self.runs, self.run_bits
        parts = []
        append = parts.append
        pos = end - 1
        last = data[pos]
        bits = last.bit_length() - 1
        container = last
        while True:
            take = min(HUFFMAN_REFILL_BYTES, pos - start)
            if take:
                container = ((container & ((1 << bits) - 1)) << (8 * take)) | \
                    int.from_bytes(data[pos - take:pos], "little")
                pos -= take
                bits += 8 * take
            while bits >= width:
                index = (container >> (bits - width)) & mask
                bits -= run_bits[index]
                append(runs[index])
            if pos == start:
                break
        # Fewer than Max_Number_of_Bits bits left: decode one by one, zero-padded.
        symbols, symbol_bits = self.symbols, self.bits
        while bits > 0:
            index = (container << (width - bits)) & mask
            bits -= symbol_bits[index]
            if bits < 0:
                raise _corrupt("Huffman stream overrun")
            append(symbols[index])
        literals = b"".join(parts)
        if len(literals) != count:
            raise _corrupt("Huffman stream holds %d literals, not %d" % (len(literals), count))
        return literals


class _FrameDecoder:
    """Decodes one zstd frame (3.1.1) after its magic number, block by block."""

    def __init__(self, fields, source, write, room):
        self.fields = fields              # the _SequenceFields: literals length, offset, match
        self.source = source
        self.write = write
        self.room = room                  # bytes this frame may still produce
        self.produced = 0
        self.history = bytearray()        # the window: recent output, for matches
        self.repeated_offsets = INITIAL_REPEATED_OFFSETS
        self.huffman = None               # the previous Huffman table, for Treeless literals
        self.tables = [None, None, None]  # previous LL, OF, ML tables, for Repeat_Mode
        self.checksum = None
        self.window_size = 0
        self.block_max = 0                # Block_Maximum_Size: min(Window_Size, 128 KiB)

    def run(self):
        content_size, window_size, has_checksum = self._frame_header()
        if content_size is not None and content_size > self.room:
            raise ZstdLimitError("zstd frame declares %d bytes, over the limit" % content_size)
        self.checksum = XXH64() if has_checksum else None
        self.window_size = window_size
        self.block_max = min(window_size, BLOCK_SIZE_MAX)
        keep = window_size + max(window_size, HISTORY_SLACK_MIN)
        last = False
        while not last:
            header = int.from_bytes(self.source.read_exact(BLOCK_HEADER_SIZE), "little")
            last, block_type, block_size = header & 1, (header >> 1) & 3, header >> 3
            start = len(self.history)
            self._block(block_type, block_size)
            self._emit(start)
            if len(self.history) > keep:
                del self.history[:len(self.history) - window_size]
        if content_size is not None and self.produced != content_size:
            raise _corrupt("frame holds %d bytes, not the %d its header says"
                           % (self.produced, content_size))
        if has_checksum:
            expected = int.from_bytes(self.source.read_exact(CHECKSUM_SIZE), "little")
            if expected != self.checksum.intdigest() & MASK32:
                raise _corrupt("content checksum mismatch")
        return self.produced

    def _frame_header(self):
        """3.1.1.1: returns (Frame_Content_Size or None, Window_Size, Content_Checksum_Flag)."""
        descriptor = self.source.read_exact(1)[0]
        fcs_flag, single_segment = descriptor >> 6, descriptor & SINGLE_SEGMENT_FLAG
        if descriptor & FRAME_HEADER_RESERVED_BIT:
            raise _corrupt("reserved frame header bit set")
        did_size = DICTIONARY_ID_SIZES[descriptor & 3]
        fcs_size = FRAME_CONTENT_SIZE_SIZES[fcs_flag] or (1 if single_segment else 0)
        header = self.source.read_exact((0 if single_segment else 1) + did_size + fcs_size)
        pos = 0
        if not single_segment:
            exponent, mantissa = header[0] >> 3, header[0] & 7
            window_base = 1 << (WINDOW_LOG_MIN + exponent)
            window_size = window_base + (window_base >> 3) * mantissa
            pos = 1
        if int.from_bytes(header[pos:pos + did_size], "little"):
            raise ZstdError("zstd dictionaries are not supported")
        pos += did_size
        content_size = None
        if fcs_size:
            content_size = int.from_bytes(header[pos:pos + fcs_size], "little")
            if fcs_size == 2:
                content_size += FCS_TWO_BYTE_OFFSET
        if single_segment:
            window_size = content_size
        if window_size > WINDOW_SIZE_MAX:
            raise ZstdError("zstd frame needs a %d byte window, over the %d limit"
                            % (window_size, WINDOW_SIZE_MAX))
        return content_size, window_size, bool(descriptor & CONTENT_CHECKSUM_FLAG)

    def _block(self, block_type, block_size):
        """3.1.1.2: one block; appends its output to the history."""
        if block_size > self.block_max:
            raise _corrupt("block of %d bytes, over %d" % (block_size, self.block_max))
        if block_type != BLOCK_COMPRESSED and block_size > self.room - self.produced:
            raise _limit_error(self.room)
        if block_type == BLOCK_RAW:
            self.history += self.source.read_exact(block_size)
        elif block_type == BLOCK_RLE:
            self.history += self.source.read_exact(1) * block_size
        elif block_type == BLOCK_COMPRESSED:
            block = self.source.read_exact(block_size)
            try:
                self._compressed_block(block)
            except ZstdError:
                raise
            except (IndexError, ValueError, struct.error) as e:
                raise _corrupt("malformed compressed block (%s)" % e) from None
        else:
            raise _corrupt("reserved block type")

    def _emit(self, start):
        if len(self.history) == start:
            return
        chunk = bytes(self.history[start:])
        self.produced += len(chunk)
        if self.checksum is not None:
            self.checksum.update(chunk)
        self.write(chunk)

    def _compressed_block(self, block):
        """3.1.1.3: Literals_Section then Sequences_Section."""
        literals, pos = self._literals_section(block)
        # 3.1.1.3.2.1: Number_of_Sequences.
        count = block[pos]
        if count < SEQUENCE_COUNT_TWO_BYTES:
            pos += 1
        elif count < SEQUENCE_COUNT_THREE_BYTES:
            count = ((count - SEQUENCE_COUNT_TWO_BYTES) << 8) + block[pos + 1]
            pos += 2
        else:
            count = block[pos + 1] + (block[pos + 2] << 8) + LONG_SEQUENCE_COUNT_BASE
            pos += 3
        if count == 0:
            if pos != len(block):
                raise _corrupt("bytes after an empty sequences section")
            self._check_room(len(literals))
            self.history += literals
            return
        modes = block[pos]
        pos += 1
        if modes & 3:
            raise _corrupt("reserved Symbol_Compression_Modes bits set")
        for i, field in enumerate(self.fields):
            mode = (modes >> (6 - 2 * i)) & 3
            if mode == MODE_PREDEFINED:
                table = field.default
            elif mode == MODE_RLE:
                table = field.rle_table(block[pos])
                pos += 1
            elif mode == MODE_FSE:
                log, probabilities, pos = _read_fse_distribution(
                    block, pos, field.max_log, len(field.codes) - 1)
                table = field.table(log, probabilities)
            else:
                table = self.tables[i]
                if table is None:
                    raise _corrupt("Repeat_Mode without a previous %s table" % field.name)
            self.tables[i] = table
        self._sequences(block, pos, count, literals)

    def _check_room(self, size):
        """Raise if the block being decoded would grow by `size` past its caps."""
        if self.produced + size > self.room:
            raise _limit_error(self.room)
        if size > self.block_max:
            raise _corrupt("block decodes to more than %d bytes" % self.block_max)

    def _literals_section(self, block):
        """3.1.1.3.1: returns (literals, position after the section)."""
        first = block[0]
        literals_type, size_format = first & 3, (first >> 2) & 3
        if literals_type in (LITERALS_RAW, LITERALS_RLE):
            if size_format in (0, 2):
                size, pos = first >> 3, 1
            elif size_format == 1:
                size, pos = (first >> 4) + (block[1] << 4), 2
            else:
                size, pos = (first >> 4) + (block[1] << 4) + (block[2] << 12), 3
            if size > self.block_max:
                raise _corrupt("literals section too big")
            if literals_type == LITERALS_RLE:
                return block[pos:pos + 1] * size, pos + 1
            if pos + size > len(block):
                raise _corrupt("raw literals past the block")
            return block[pos:pos + size], pos + size
        header_size, size_bits = ((3, 10), (3, 10), (4, 14), (5, 18))[size_format]
        header = int.from_bytes(block[:header_size], "little")
        size_mask = (1 << size_bits) - 1
        size = (header >> 4) & size_mask
        compressed_size = (header >> (4 + size_bits)) & size_mask
        pos, end = header_size, header_size + compressed_size
        if end > len(block) or size > self.block_max:
            raise _corrupt("literals section past the block")
        if literals_type == LITERALS_COMPRESSED:
            pos = self._huffman_description(block, pos, end)
        elif self.huffman is None:
            raise _corrupt("treeless literals without a previous Huffman table")
        huffman = self.huffman
        if size_format == 0:              # a single stream
            return huffman.decode_stream(block, pos, end, size), end
        if end - pos < JUMP_TABLE_SIZE:
            raise _corrupt("literals jump table past the section")
        sizes = struct.unpack_from("<3H", block, pos)
        segment = (size + 3) // 4
        counts = (segment, segment, segment, size - 3 * segment)
        if counts[3] < 0:
            raise _corrupt("too few literals for four streams")
        parts = []
        start = pos + JUMP_TABLE_SIZE
        for i, count in enumerate(counts):
            stop = start + sizes[i] if i < 3 else end
            if stop > end:
                raise _corrupt("literals stream past the section")
            parts.append(huffman.decode_stream(block, start, stop, count))
            start = stop
        return b"".join(parts), end

    def _huffman_description(self, block, pos, end):
        """4.2.1.1: read the Huffman tree description at block[pos:]; returns its end."""
        header = block[pos]
        pos += 1
        if header >= HUFFMAN_DIRECT_WEIGHTS:      # weights stored directly, 4 bits each
            count = header - (HUFFMAN_DIRECT_WEIGHTS - 1)
            stop = pos + (count + 1) // 2
            if stop > end:
                raise _corrupt("Huffman weights past the section")
            weights = []
            for byte in block[pos:stop]:
                weights += (byte >> 4, byte & 15)
            self.huffman = _HuffmanTable(weights[:count])
            return stop
        stop = pos + header               # weights compressed with FSE
        if stop > end:
            raise _corrupt("Huffman weights past the section")
        log, probabilities, start = _read_fse_distribution(
            block[:stop], pos, HUFFMAN_WEIGHTS_FSE_LOG, HUFFMAN_MAX_WEIGHT)
        table = _build_fse_table(log, probabilities)
        stream = _BackwardBits(block[start:stop])
        # Two interleaved states share the stream, until it runs dry (4.2.1.2).
        states = [stream.read(log), stream.read(log)]
        weights = []
        turn = 0
        while True:
            symbol, bits, baseline = table[states[turn]]
            weights.append(symbol)
            states[turn] = baseline + stream.read(bits)
            if stream.left < 0:
                weights.append(table[states[1 - turn]][0])
                break
            if len(weights) >= HUFFMAN_MAX_SYMBOLS:
                raise _corrupt("too many Huffman weights")
            turn = 1 - turn
        self.huffman = _HuffmanTable(weights)
        return stop

    def _sequences(self, block, pos, count, literals):
        """3.1.1.3.2.2 and 3.1.2.5: decode `count` sequences, executing each one at once."""
        if pos >= len(block) or not block[-1]:
            raise _corrupt("sequences bitstream without its end mark")
        ll_table, of_table, ml_table = self.tables
        ll_entries, of_entries, ml_entries = ll_table.entries, of_table.entries, ml_table.entries
        masks = BIT_MASKS
        # Zeros in front let a refill run past the stream's start harmlessly; whether
        # they were consumed shows in the unread bit count, bits + (p - padding) * 8.
        padding = BITSTREAM_PADDING
        stream = bytes(padding) + block[pos:]
        refill_size = SEQUENCE_REFILL_BYTES
        refill_bits = refill_size * 8
        p = len(stream) - 1
        container = stream[p]
        bits = container.bit_length() - 1      # the end mark is not data
        container = ((container & masks[bits]) << refill_bits) | \
            int.from_bytes(stream[p - refill_size:p], "little")
        p -= refill_size
        bits += refill_bits
        bits -= ll_table.accuracy_log
        ll_state = (container >> bits) & masks[ll_table.accuracy_log]
        bits -= of_table.accuracy_log
        of_state = (container >> bits) & masks[of_table.accuracy_log]
        bits -= ml_table.accuracy_log
        ml_state = (container >> bits) & masks[ml_table.accuracy_log]

        out = self.history
        block_start = len(out)
        cap = block_start + min(self.block_max, self.room - self.produced)
        window_size = self.window_size
        r1, r2, r3 = self.repeated_offsets
        lit_pos, lit_count = 0, len(literals)
        for left in range(count - 1, -1, -1):
            if bits < SEQUENCE_BITS_MAX:
                if bits + (p - padding) * 8 < 0:
                    raise _corrupt("sequences bitstream overrun")
                container = ((container & masks[bits]) << refill_bits) | \
                    int.from_bytes(stream[p - refill_size:p], "little")
                p -= refill_size
                bits += refill_bits
            of_base, of_bits, of_state_bits, of_state_base = of_entries[of_state]
            ml_base, ml_bits, ml_state_bits, ml_state_base = ml_entries[ml_state]
            ll_base, ll_bits, ll_state_bits, ll_state_base = ll_entries[ll_state]
            # Extra bits come offset, match length, literals length; then the
            # states are updated in the order literals length, match length, offset.
            bits -= of_bits
            offset_value = of_base + ((container >> bits) & masks[of_bits])
            if ml_bits:
                bits -= ml_bits
                match_length = ml_base + ((container >> bits) & masks[ml_bits])
            else:
                match_length = ml_base
            if ll_bits:
                bits -= ll_bits
                literals_length = ll_base + ((container >> bits) & masks[ll_bits])
            else:
                literals_length = ll_base
            if left:                          # the last sequence updates no state
                bits -= ll_state_bits
                ll_state = ll_state_base + ((container >> bits) & masks[ll_state_bits])
                bits -= ml_state_bits
                ml_state = ml_state_base + ((container >> bits) & masks[ml_state_bits])
                bits -= of_state_bits
                of_state = of_state_base + ((container >> bits) & masks[of_state_bits])

            # 3.1.2.5: Offset_Value 1-3 picks a repeated offset, shifted by one when
            # there are no literals; bigger values are a new offset plus 3.
            if offset_value > 3:
                offset = offset_value - 3
                r1, r2, r3 = offset, r1, r2
            else:
                if not literals_length:
                    offset_value += 1
                if offset_value == 1:
                    offset = r1
                elif offset_value == 2:
                    offset = r2
                    r1, r2 = offset, r1
                elif offset_value == 3:
                    offset = r3
                    r1, r2, r3 = offset, r1, r2
                else:
                    offset = r1 - 1
                    if not offset:
                        raise _corrupt("repeated offset of zero")
                    r1, r2, r3 = offset, r1, r2

            if literals_length:
                lit_end = lit_pos + literals_length
                if lit_end > lit_count:
                    raise _corrupt("sequences use more literals than there are")
                out += literals[lit_pos:lit_end]
                lit_pos = lit_end
            size = len(out)
            if size + match_length > cap:
                self._check_room(size + match_length - block_start)
            if offset > size or offset > window_size:
                raise _corrupt("match offset %d outside the window" % offset)
            start = size - offset
            if match_length <= offset:
                out += out[start:start + match_length]
            else:                             # the match overlaps its own output: repeat it
                out += (out[start:] * (match_length // offset + 1))[:match_length]

        if bits + (p - padding) * 8 != 0:
            raise _corrupt("sequences bitstream not fully used")
        self._check_room(len(out) - block_start + lit_count - lit_pos)
        out += literals[lit_pos:]
        self.repeated_offsets = (r1, r2, r3)


class PythonZstd(Zstd):
    """Pure Python: an RFC 8878 decoder, and a writer of uncompressed (raw block) frames."""

    name = "python"

    def __init__(self):
        offset_codes = tuple((1 << code, code) for code in range(OFFSET_CODE_MAX + 1))
        # In the order of Symbol_Compression_Modes, with 3.1.1.3.2.2's accuracy logs.
        self._fields = (
            _SequenceField("Literals_Length", LITERALS_LENGTH_CODES, LITERALS_LENGTH_MAX_LOG,
                           LITERALS_LENGTH_DEFAULT, LITERALS_LENGTH_DEFAULT_LOG),
            _SequenceField("Offset", offset_codes, OFFSET_MAX_LOG,
                           OFFSET_DEFAULT, OFFSET_DEFAULT_LOG),
            _SequenceField("Match_Length", MATCH_LENGTH_CODES, MATCH_LENGTH_MAX_LOG,
                           MATCH_LENGTH_DEFAULT, MATCH_LENGTH_DEFAULT_LOG),
        )

    def decompress_stream(self, read, write, limit):
        source = _Input(read)
        produced = 0
        while not source.at_eof():
            magic = int.from_bytes(source.read_exact(MAGIC_SIZE), "little")
            if magic == ZSTD_MAGIC:
                frame = _FrameDecoder(self._fields, source, write, limit - produced)
                produced += frame.run()
            elif magic & SKIPPABLE_MAGIC_MASK == SKIPPABLE_MAGIC:
                source.skip(int.from_bytes(source.read_exact(MAGIC_SIZE), "little"))
            else:
                raise ZstdError("not zstd data: unknown frame magic 0x%08x" % magic)
        return produced

    def compress_stream(self, read, write):
        # Content size unknown: a 128 KiB window, one raw block per 128 KiB read.
        header = struct.pack("<IBB", ZSTD_MAGIC, 0, RAW_WINDOW_DESCRIPTOR)
        write(header)
        written = len(header)
        block = _read_up_to(read, BLOCK_SIZE_MAX)
        while True:
            following = _read_up_to(read, BLOCK_SIZE_MAX) if len(block) == BLOCK_SIZE_MAX else b""
            written += _write_raw_block(write, block, last=not following)
            if not following:
                return written
            block = following

    def compress(self, data):
        return raw_frame(data)


def raw_frame(data):
    """A zstd frame of raw blocks: `data` uncompressed, its size declared (single segment)."""
    size = len(data)
    if size < 256:
        fcs_flag, fcs = 0, struct.pack("<B", size)
    elif size < 0x10000 + FCS_TWO_BYTE_OFFSET:
        fcs_flag, fcs = 1, struct.pack("<H", size - FCS_TWO_BYTE_OFFSET)
    elif size < 1 << 32:
        fcs_flag, fcs = 2, struct.pack("<I", size)
    else:
        fcs_flag, fcs = 3, struct.pack("<Q", size)
    parts = [struct.pack("<IB", ZSTD_MAGIC, fcs_flag << 6 | SINGLE_SEGMENT_FLAG), fcs]
    view = memoryview(data)
    for start in range(0, max(size, 1), BLOCK_SIZE_MAX):
        block = view[start:start + BLOCK_SIZE_MAX]
        _write_raw_block(parts.append, block, last=start + BLOCK_SIZE_MAX >= size)
    return b"".join(parts)


def _read_up_to(read, size):
    parts, have = [], 0
    while have < size:
        chunk = read(size - have)
        if not chunk:
            break
        parts.append(chunk)
        have += len(chunk)
    return b"".join(parts)


def _write_raw_block(write, block, last):
    header = (len(block) << 3 | BLOCK_RAW << 1 | int(last)).to_bytes(3, "little")
    write(header)
    write(bytes(block))
    return len(header) + len(block)


# --- choosing a backend ---------------------------------------------------------------
LIBZSTD_FALLBACK_NAMES = ("libzstd.so.1", "libzstd.1.dylib")   # when find_library has no answer


def _load_stdlib():
    try:
        import compression.zstd as module
    except ImportError:
        try:
            import backports.zstd as module
        except ImportError:
            raise ZstdError("zstd backend 'stdlib' needs Python 3.14+ or "
                            "'pip install backports.zstd'") from None
    return StdlibZstd(module)


def _load_libzstd():
    names = [ctypes.util.find_library("zstd")] + list(LIBZSTD_FALLBACK_NAMES)
    for name in names:
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        return LibZstd(lib)
    raise ZstdError("zstd backend 'libzstd' needs the zstd library: "
                    "install it (e.g. apt-get install libzstd1) or choose another backend")


def _load_python():
    return PythonZstd()


def choose_zstd(preference=None):
    """The zstd backend for `preference`: None/"auto", "stdlib", "libzstd" or "python"."""
    choice = (preference or "auto").strip().lower()
    loaders = {"stdlib": _load_stdlib, "libzstd": _load_libzstd, "python": _load_python}
    if choice == "auto":
        for name in ZSTD_BACKENDS:
            try:
                return loaders[name]()
            except ZstdError:
                continue
    if choice not in loaders:
        raise ZstdError("unknown zstd backend %r: use auto, %s"
                        % (preference, ", ".join(ZSTD_BACKENDS)))
    return loaders[choice]()


# ---------------------------------------------------------------------------
# Appendix B. Schema 18 to 11
#   Modern clients upload schema 18: notetypes, decks and deck configs as
#   protobuf blobs in their own tables. ankisync stores schema 11, so an upload
#   is converted once, the way the official code would write it, and checked.
# ---------------------------------------------------------------------------

# --- JSON as the official writer formats it (docs/protocol.md 5.11) -------------------
def loads_strict(text):
    """JSON inside an upload, decoded as client_json decodes a request's; every failure
    is a ValueError, as the conversion expects."""
    try:
        return client_json(text, "JSON")
    except SyncError as e:
        raise ValueError(e.reason) from None


def _finite(obj):
    """A copy of `obj` with NaN and +-Infinity replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: _finite(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(value) for value in obj]
    return obj


def dumps_compact(obj):
    """Compact JSON with raw UTF-8; NaN and Infinity become null, because
    the official writer emits null and the NaN token is not JSON."""
    try:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False)
    except ValueError:  # rare: only pay for the walk when needed
        return json.dumps(_finite(obj), separators=(",", ":"),
                          ensure_ascii=False, allow_nan=False)


# --- 32-bit floats --------------------------------------------------------------------
F32_MAX_DIGITS = 9  # 9 significant digits always round-trip an IEEE single
U16_MAX = 0xFFFF
U32_MAX = 0xFFFFFFFF


def f32(x):
    """Round a Python float to the nearest 32-bit float (overflow -> inf)."""
    try:
        return struct.unpack("<f", struct.pack("<f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def f32_json(x):
    """The shortest decimal that reads back as the same single; NaN/Inf ->
    None, because the official writer emits null for them."""
    if math.isnan(x) or math.isinf(x):
        return None
    target = struct.pack("<f", x)
    for digits in range(1, F32_MAX_DIGITS + 1):
        text = "%.*g" % (digits, x)
        try:
            if struct.pack("<f", float(text)) == target:
                return float(text)
        except OverflowError:  # rounding up went past the largest single
            continue
    return x  # not reached: 9 digits always round-trip


def f32_scaled_to_int(x, scale, maximum):
    """Rust's `(x * scale) as uN` on an f32: the product is rounded to single
    precision, truncated toward zero, then saturated; NaN gives 0."""
    product = f32(x * scale)
    if math.isnan(product) or product <= 0:
        return 0
    if product >= maximum:
        return maximum
    return int(product)


# --- protobuf wire reader (docs/protocol.md 5.5) --------------------------------------
WIRE_VARINT = 0
WIRE_FIXED64 = 1
WIRE_LEN = 2
WIRE_FIXED32 = 5  # 3 and 4 are groups, which Anki never writes

MAX_FIELD_NUMBER = (1 << 29) - 1  # protobuf's limit: the key is 32 bits
WIRE_TYPE_BITS = 3  # a record key is (field_number << 3) | wire_type
VARINT_MAX_BYTES = 10  # 64 bits in 7-bit groups
VARINT_LAST_BYTE_MAX = 1  # the 10th byte may only carry bit 63 (prost rule)
VARINT_PAYLOAD = 0x7F  # low 7 bits of each byte carry the value
VARINT_MORE = 0x80  # high bit set: another byte follows
FIXED64_SIZE = 8
FIXED32_SIZE = 4
U64_MASK = (1 << 64) - 1
OTHER_FIELD = 255  # `bytes other = 255`: legacy keys with no typed home


def read_varint(buf, pos):
    """Decode one base-128 varint at `pos`; return (value, next_pos)."""
    value = 0
    for index in range(VARINT_MAX_BYTES):
        if pos >= len(buf):
            raise CorruptCollection("truncated varint")
        byte = buf[pos]
        pos += 1
        if index == VARINT_MAX_BYTES - 1 and byte > VARINT_LAST_BYTE_MAX:
            raise CorruptCollection("varint longer than 64 bits")
        value |= (byte & VARINT_PAYLOAD) << (7 * index)
        if not byte & VARINT_MORE:
            return value & U64_MASK, pos
    raise CorruptCollection("varint longer than 64 bits")


def _take(buf, pos, size):
    if size > len(buf) - pos:
        raise CorruptCollection("truncated protobuf record")
    return bytes(buf[pos:pos + size]), pos + size


def proto_records(blob):
    """Every (field_number, wire_type, value) of a message, in stored order.
    Varints are unsigned 64-bit ints, fixed32/64 raw bytes, LEN raw bytes."""
    buf = bytes(blob)
    records = []
    pos = 0
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        number, wire = key >> WIRE_TYPE_BITS, key & ((1 << WIRE_TYPE_BITS) - 1)
        if not 0 < number <= MAX_FIELD_NUMBER:
            raise CorruptCollection("invalid protobuf field number")
        if wire == WIRE_VARINT:
            value, pos = read_varint(buf, pos)
        elif wire == WIRE_FIXED64:
            value, pos = _take(buf, pos, FIXED64_SIZE)
        elif wire == WIRE_LEN:
            size, pos = read_varint(buf, pos)
            value, pos = _take(buf, pos, size)
        elif wire == WIRE_FIXED32:
            value, pos = _take(buf, pos, FIXED32_SIZE)
        else:
            raise CorruptCollection("unexpected protobuf wire type %d" % wire)
        records.append((number, wire, value))
    return records


def proto_fields(blob):
    """{field_number: [(wire_type, value), ...]} in stored order."""
    fields = {}
    for number, wire, value in proto_records(blob):
        fields.setdefault(number, []).append((wire, value))
    return fields


def _values(fields, number, wire):
    """All values of a field, insisting on one wire type (as prost does)."""
    found = fields.get(number, [])
    for got, _ in found:
        if got != wire:
            raise CorruptCollection(
                "field %d has wire type %d, expected %d" % (number, got, wire))
    return [value for _, value in found]


def _signed(value, bits):
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def pb_present(fields, number):
    return number in fields


def pb_uint64(fields, number):
    values = _values(fields, number, WIRE_VARINT)
    return values[-1] if values else 0


def pb_int64(fields, number):
    return _signed(pb_uint64(fields, number), 64)


def pb_int32(fields, number):
    """int32 and enums: the low 32 bits as a signed value."""
    return _signed(pb_uint64(fields, number), 32)


def pb_uint32(fields, number):
    return pb_uint64(fields, number) & U32_MAX


def pb_bool(fields, number):
    return pb_uint64(fields, number) != 0


def pb_float(fields, number):
    values = _values(fields, number, WIRE_FIXED32)
    return struct.unpack("<f", values[-1])[0] if values else 0.0


def pb_bytes(fields, number):
    values = _values(fields, number, WIRE_LEN)
    return values[-1] if values else b""


def pb_string(fields, number):
    # Every occurrence is validated, as the official decoder does.
    values = _values(fields, number, WIRE_LEN)
    try:
        texts = [value.decode("utf-8") for value in values]
    except UnicodeDecodeError:
        raise CorruptCollection("invalid UTF-8 in field %d" % number) from None
    return texts[-1] if texts else ""


def pb_message(fields, number):
    """A sub-message's fields, or None if absent. Repeated occurrences merge,
    which is exactly what parsing their concatenation does."""
    values = _values(fields, number, WIRE_LEN)
    return proto_fields(b"".join(values)) if values else None


def pb_messages(fields, number):
    """A repeated sub-message: one parsed message per record, in order."""
    return [proto_fields(value) for value in _values(fields, number, WIRE_LEN)]


def pb_floats(fields, number):
    """repeated float, packed or not, or a mixture of both."""
    result = []
    for wire, value in fields.get(number, []):
        if wire == WIRE_FIXED32:
            result.append(struct.unpack("<f", value)[0])
        elif wire == WIRE_LEN and len(value) % FIXED32_SIZE == 0:
            count = len(value) // FIXED32_SIZE
            result.extend(struct.unpack("<%df" % count, value))
        else:
            raise CorruptCollection("bad repeated float in field %d" % number)
    return result


def pb_uint32s(fields, number):
    """repeated uint32, packed or not, or a mixture of both."""
    result = []
    for wire, value in fields.get(number, []):
        if wire == WIRE_VARINT:
            result.append(value & U32_MAX)
        elif wire == WIRE_LEN:
            pos = 0
            while pos < len(value):
                item, pos = read_varint(value, pos)
                result.append(item & U32_MAX)
        else:
            raise CorruptCollection("bad repeated uint32 in field %d" % number)
    return result


# --- the "other" extras (docs/protocol.md 5.6) ----------------------------------------
NOTETYPE_RESERVED = frozenset((
    "latexPost", "flds", "css", "originalStockKind", "originalId", "id", "usn",
    "mod", "req", "latexPre", "name", "did", "tmpls", "type", "sortf",
    "latexsvg"))
FIELD_RESERVED = frozenset((
    "name", "ord", "sticky", "rtl", "plainText", "font", "size", "collapsed",
    "description", "excludeFromSearch", "id", "tag", "preventDeletion"))
TEMPLATE_RESERVED = frozenset((
    "name", "ord", "did", "afmt", "bafmt", "qfmt", "bqfmt", "bfont", "bsize",
    "id"))
DECK_RESERVED = frozenset((
    "usn", "revToday", "newLimit", "dyn", "reviewLimit", "newToday",
    "timeToday", "reviewLimitToday", "extendNew", "mod", "newLimitToday",
    "desc", "name", "lrnToday", "conf", "browserCollapsed", "extendRev", "id",
    "collapsed", "desiredRetention"))
DECK_CONFIG_RESERVED = frozenset((
    "id", "newSortOrder", "replayq", "newPerDayMinimum", "usn", "autoplay",
    "dyn", "maxTaken", "reviewOrder", "buryInterdayLearning", "newMix", "mod",
    "timer", "name", "interdayLearningMix", "newGatherPriority", "fsrsWeights",
    "fsrsParams5", "fsrsParams6", "desiredRetention", "stopTimerOnAnswer",
    "secondsToShowQuestion", "secondsToShowAnswer", "questionAction",
    "answerAction", "waitForAudio", "sm2Retention", "weightSearch",
    "ignoreRevlogsBeforeDate", "easyDaysPercentages"))
NEW_RESERVED = frozenset(("order", "delays", "bury", "perDay", "initialFactor",
                          "ints"))
REV_RESERVED = frozenset(("maxIvl", "hardFactor", "ease4", "ivlFct", "perDay",
                          "bury"))
LAPSE_RESERVED = frozenset(("leechFails", "mult", "leechAction", "delays",
                            "minInt"))


def other_object(fields):
    """The `other` JSON object, or {} when empty or unreadable: the official
    code only prints a warning for bad extras."""
    raw = pb_bytes(fields, OTHER_FIELD)
    if not raw:
        return {}
    try:
        value = loads_strict(raw)
    except ValueError:  # includes UnicodeDecodeError
        return {}
    return value if isinstance(value, dict) else {}


def extras(obj, reserved):
    return {key: value for key, value in obj.items() if key not in reserved}


# --- note types (docs/protocol.md 5.7) ------------------------------------------------
NOTETYPE_KIND_CLOZE = 1
REQUIREMENT_KINDS = {0: "none", 1: "any", 2: "all"}  # unknown -> "none"
ORD_MASK = 0xFFFF  # sortf, size, card_ord and field_ords are u16 in Rust
BROWSER_FONT_SIZE_MASK = 0xFF  # bsize is u8 in Rust


# In the *_to_legacy functions below, the numbers are protobuf field numbers;
# each function follows its message's table in docs/protocol.md 5.7-5.9 field by field.
def card_requirement_to_legacy(req):
    return [
        pb_uint32(req, 1) & ORD_MASK,
        REQUIREMENT_KINDS.get(pb_int32(req, 2), "none"),
        [ord_ & ORD_MASK for ord_ in pb_uint32s(req, 3)],
    ]


def field_to_legacy(ord_, name, blob):
    config = proto_fields(blob)
    field = {
        "name": name,
        "ord": ord_,
        "sticky": pb_bool(config, 1),
        "rtl": pb_bool(config, 2),
        "font": pb_string(config, 3),
        "size": pb_uint32(config, 4) & ORD_MASK,
        "description": pb_string(config, 5),
        "plainText": pb_bool(config, 6),
        "collapsed": pb_bool(config, 7),
        "excludeFromSearch": pb_bool(config, 8),
        "id": pb_int64(config, 9) if pb_present(config, 9) else None,
        "tag": pb_uint32(config, 10) if pb_present(config, 10) else None,
        "preventDeletion": pb_bool(config, 11),
    }
    field.update(extras(other_object(config), FIELD_RESERVED))
    return field


def template_to_legacy(ord_, name, blob):
    config = proto_fields(blob)
    target_deck = pb_int64(config, 5)
    template = {
        "name": name,
        "ord": ord_,
        "qfmt": pb_string(config, 1),
        "afmt": pb_string(config, 2),
        "bqfmt": pb_string(config, 3),
        "bafmt": pb_string(config, 4),
        "did": target_deck if target_deck > 0 else None,
        "bfont": pb_string(config, 6),
        "bsize": pb_uint32(config, 7) & BROWSER_FONT_SIZE_MASK,
        "id": pb_int64(config, 8) if pb_present(config, 8) else None,
    }
    template.update(extras(other_object(config), TEMPLATE_RESERVED))
    return template


def notetype_to_legacy(row, fields, templates):
    """`row` is (id, name, mtime_secs, usn, config); fields and templates are
    the legacy objects of this note type, already in `ord` order."""
    ntid, name, mtime, usn, blob = row
    config = proto_fields(blob)
    target_deck = pb_int64(config, 4)
    notetype = {
        "id": ntid,
        "name": name,
        "type": 1 if pb_int32(config, 1) == NOTETYPE_KIND_CLOZE else 0,
        "mod": mtime,
        "usn": usn,
        "sortf": pb_uint32(config, 2) & ORD_MASK,
        "did": target_deck or None,
        "tmpls": templates,
        "flds": fields,
        "css": pb_string(config, 3),
        "latexPre": pb_string(config, 5),
        "latexPost": pb_string(config, 6),
        "latexsvg": pb_bool(config, 7),
        "req": [card_requirement_to_legacy(req) for req in pb_messages(config, 8)],
    }
    stock_kind = pb_int32(config, 9)
    if stock_kind:
        notetype["originalStockKind"] = stock_kind
    if pb_present(config, 10):
        notetype["originalId"] = pb_int64(config, 10)
    notetype.update(extras(other_object(config), NOTETYPE_RESERVED))
    return notetype


# --- decks (docs/protocol.md 5.8) -----------------------------------------------------
DECK_KIND_NORMAL = 1
DECK_KIND_FILTERED = 2
PERCENT = 100.0  # a deck's desired retention is a fraction in 18, percent in 11


def deck_kind(blob):
    """(kind, fields) of a KindContainer. A oneof: the last member seen wins;
    repeats of the same member merge."""
    kind, parts = None, []
    for number, wire, value in proto_records(blob):
        if number not in (DECK_KIND_NORMAL, DECK_KIND_FILTERED):
            continue
        if wire != WIRE_LEN:
            raise CorruptCollection("deck kind has wire type %d" % wire)
        if number != kind:
            kind, parts = number, []
        parts.append(value)
    return kind, (proto_fields(b"".join(parts)) if kind else None)


def day_limit_to_legacy(limit):
    if limit is None:
        return None
    return {"limit": pb_uint32(limit, 1), "today": pb_uint32(limit, 2)}


def search_term_to_legacy(term):
    return [pb_string(term, 1), _signed(pb_uint32(term, 2), 32), pb_int32(term, 3)]


def deck_to_legacy(row):
    """`row` is (id, name, mtime_secs, usn, common, kind)."""
    did, name, mtime, usn, common_blob, kind_blob = row
    common = proto_fields(common_blob)
    kind, detail = deck_kind(kind_blob)
    if kind is None:
        raise CorruptCollection("invalid deck kind: %d" % did)
    day = _signed(pb_uint32(common, 3), 32)
    deck = {
        "id": did,
        "mod": mtime,
        "name": name.replace("\x1f", "::"),
        "usn": usn,
        "lrnToday": [day, pb_int32(common, 6)],
        "revToday": [day, pb_int32(common, 5)],
        "newToday": [day, pb_int32(common, 4)],
        "timeToday": [day, pb_int32(common, 7)],
        "collapsed": pb_bool(common, 1),
        "browserCollapsed": pb_bool(common, 2),
    }
    if kind == DECK_KIND_NORMAL:
        deck["desc"] = pb_string(detail, 4)
        if pb_bool(detail, 5):
            deck["md"] = True
        deck["dyn"] = 0
        # Extras sit here in the official output, so an extra `md` (not a
        # reserved key) would win on parse: update() reproduces that.
        deck.update(extras(other_object(common), DECK_RESERVED))
        deck.update(normal_deck_keys(detail))
    else:
        deck["desc"] = ""
        deck["dyn"] = 1
        deck.update(extras(other_object(common), DECK_RESERVED))
        deck.update(filtered_deck_keys(detail))
    return deck


def _optional_uint32(fields, number):
    return pb_uint32(fields, number) if pb_present(fields, number) else None


def normal_deck_keys(normal):
    retention = None
    if pb_present(normal, 10):
        retention = f32_scaled_to_int(pb_float(normal, 10), PERCENT, U32_MAX)
    return {
        "conf": pb_int64(normal, 1),
        "extendNew": _signed(pb_uint32(normal, 2), 32),
        "extendRev": _signed(pb_uint32(normal, 3), 32),
        "reviewLimit": _optional_uint32(normal, 6),
        "newLimit": _optional_uint32(normal, 7),
        "reviewLimitToday": day_limit_to_legacy(pb_message(normal, 8)),
        "newLimitToday": day_limit_to_legacy(pb_message(normal, 9)),
        "desiredRetention": retention,
    }


def filtered_deck_keys(filtered):
    delays = [f32_json(x) for x in pb_floats(filtered, 3)]
    return {
        "resched": pb_bool(filtered, 1),
        "terms": [search_term_to_legacy(t) for t in pb_messages(filtered, 2)],
        "separate": True,  # unused, but old clients need the key
        "delays": delays or None,
        "previewDelay": pb_uint32(filtered, 4),
        "previewAgainSecs": pb_uint32(filtered, 7),
        "previewHardSecs": pb_uint32(filtered, 5),
        "previewGoodSecs": pb_uint32(filtered, 6),
    }


# --- deck config (docs/protocol.md 5.9) -----------------------------------------------

# Field number -> (lowest, highest, default): the official reader replaces an
# out-of-range value by the default before mapping. Float bounds are singles.
INT_CLAMPS = {
    9: (0, 9999, 20),        # new_per_day
    10: (0, 9999, 200),      # reviews_per_day
    16: (1, 36500, 36500),   # maximum_review_interval
    17: (1, 36500, 1),       # minimum_lapse_interval
    18: (1, 36500, 1),       # graduating_interval_good
    19: (1, 36500, 4),       # graduating_interval_easy
    22: (1, 9999, 8),        # leech_threshold
    24: (1, 9999, 60),       # cap_answer_time_to_secs
    35: (0, 9999, 0),        # new_per_day_minimum
}
FLOAT_CLAMPS = {
    11: (1.31, 5.0, 2.5),    # initial_ease
    12: (1.0, 5.0, 1.3),     # easy_multiplier
    13: (0.5, 1.3, 1.2),     # hard_multiplier
    14: (0.0, 1.0, 0.0),     # lapse_multiplier
    15: (0.5, 2.0, 1.0),     # interval_multiplier
    37: (0.7, 0.99, 0.9),    # desired_retention
    40: (0.7, 0.97, 0.9),    # historical_retention
}
EASE_SCALE = 1000.0  # initialFactor is ease x1000 in schema 11
NEW_CARD_INSERT_RANDOM = 1  # proto RANDOM; legacy `order` is inverted (0 random)
LEECH_TAG_ONLY = 1
QUESTION_SHOW_REMINDER = 1
ANSWER_ACTIONS = (1, 2, 3, 4)  # again, good, hard, reminder; else bury (0)


def clamped_int(config, number):
    lowest, highest, default = INT_CLAMPS[number]
    value = pb_uint32(config, number)
    return value if lowest <= value <= highest else default


def clamped_float(config, number):
    lowest, highest, default = FLOAT_CLAMPS[number]
    value = pb_float(config, number)
    return value if f32(lowest) <= value <= f32(highest) else f32(default)


def _floats_json(config, number):
    return [f32_json(x) for x in pb_floats(config, number)]


def _split_other(config):
    """Top-level, new, rev and lapse extras of a deck config (4.4)."""
    other = other_object(config)
    nested = {}
    for key, reserved in (("new", NEW_RESERVED), ("rev", REV_RESERVED),
                          ("lapse", LAPSE_RESERVED)):
        value = other.pop(key, None)
        nested[key] = extras(value, reserved) if isinstance(value, dict) else {}
    return extras(other, DECK_CONFIG_RESERVED), nested


def deck_config_to_legacy(row):
    """`row` is (id, name, mtime_secs, usn, config)."""
    dcid, name, mtime, usn, blob = row
    config = proto_fields(blob)
    top_extras, nested_extras = _split_other(config)
    new = {
        "bury": pb_bool(config, 27),
        "delays": _floats_json(config, 1),
        "initialFactor": f32_scaled_to_int(clamped_float(config, 11),
                                           EASE_SCALE, U16_MAX),
        "ints": [clamped_int(config, 18), clamped_int(config, 19), 0],
        "order": 0 if pb_int32(config, 20) == NEW_CARD_INSERT_RANDOM else 1,
        "perDay": clamped_int(config, 9),
    }
    new.update(nested_extras["new"])
    rev = {
        "bury": pb_bool(config, 28),
        "ease4": f32_json(clamped_float(config, 12)),
        "ivlFct": f32_json(clamped_float(config, 15)),
        "maxIvl": clamped_int(config, 16),
        "perDay": clamped_int(config, 10),
        "hardFactor": f32_json(clamped_float(config, 13)),
    }
    rev.update(nested_extras["rev"])
    lapse = {
        "delays": _floats_json(config, 2),
        "leechAction": 1 if pb_int32(config, 21) == LEECH_TAG_ONLY else 0,
        "leechFails": clamped_int(config, 22),
        "minInt": clamped_int(config, 17),
        "mult": f32_json(clamped_float(config, 14)),
    }
    lapse.update(nested_extras["lapse"])
    answer_action = pb_int32(config, 43)
    conf = {
        "id": dcid,
        "mod": mtime,
        "name": name,
        "usn": usn,
        "maxTaken": clamped_int(config, 24),
        "autoplay": not pb_bool(config, 23),
        "timer": 1 if pb_bool(config, 25) else 0,
        "replayq": not pb_bool(config, 26),
        "new": new,
        "rev": rev,
        "lapse": lapse,
        "dyn": False,
        "newMix": pb_int32(config, 30),
        "newPerDayMinimum": clamped_int(config, 35),
        "interdayLearningMix": pb_int32(config, 31),
        "reviewOrder": pb_int32(config, 33),
        "newSortOrder": pb_int32(config, 32),
        "newGatherPriority": pb_int32(config, 34),
        "buryInterdayLearning": pb_bool(config, 29),
        "fsrsWeights": _floats_json(config, 3),
        "fsrsParams5": _floats_json(config, 5),
        "fsrsParams6": _floats_json(config, 6),
        "desiredRetention": f32_json(clamped_float(config, 37)),
        "ignoreRevlogsBeforeDate": pb_string(config, 46),
        "easyDaysPercentages": _floats_json(config, 4),
        "stopTimerOnAnswer": pb_bool(config, 38),
        "secondsToShowQuestion": f32_json(pb_float(config, 41)),
        "secondsToShowAnswer": f32_json(pb_float(config, 42)),
        "questionAction": 1 if pb_int32(config, 36) == QUESTION_SHOW_REMINDER else 0,
        "answerAction": answer_action if answer_action in ANSWER_ACTIONS else 0,
        "waitForAudio": pb_bool(config, 44),
        "sm2Retention": f32_json(clamped_float(config, 40)),
        "weightSearch": pb_string(config, 45),
    }
    conf.update(top_extras)
    return conf


# --- the 18 -> 11 downgrade (docs/protocol.md 5.12, steps 5-9) ------------------------
SCHEMA11_GRAVES = """CREATE TABLE graves (
  usn integer NOT NULL,
  oid integer NOT NULL,
  type integer NOT NULL
)"""

# The official order; each table's indexes go with it.
SCHEMA18_TABLES = ("config", "deck_config", "tags", "fields", "templates",
                   "notetypes", "decks")
SCHEMA18_INDEXES = ("idx_cards_odid", "idx_notes_mid")


def _rebuild_graves(conn):
    conn.execute("ALTER TABLE graves RENAME TO graves_old")
    conn.execute(SCHEMA11_GRAVES)
    conn.execute("insert into graves (usn, oid, type) "
                 "select usn, oid, type from graves_old")
    conn.execute("DROP TABLE graves_old")


def legacy_dconf(conn):
    rows = conn.execute(
        "select id, name, mtime_secs, usn, config from deck_config")
    return {str(row[0]): deck_config_to_legacy(row) for row in rows}


def legacy_decks(conn):
    rows = conn.execute(
        "select id, name, mtime_secs, usn, common, kind from decks")
    return {str(row[0]): deck_to_legacy(row) for row in rows}


def legacy_models(conn):
    models = {}
    rows = conn.execute(
        "select id, name, mtime_secs, usn, config from notetypes").fetchall()
    for row in rows:
        ntid = row[0]
        fields = [field_to_legacy(*field) for field in conn.execute(
            "select ord, name, config from fields where ntid = ? order by ord",
            (ntid,))]
        templates = [template_to_legacy(*tmpl) for tmpl in conn.execute(
            "select ord, name, config from templates where ntid = ? "
            "ORDER BY ord", (ntid,))]
        models[str(ntid)] = notetype_to_legacy(row, fields, templates)
    return models


def legacy_conf(conn):
    conf = {}
    for key, val in conn.execute("select key, val from config"):
        if not isinstance(val, (bytes, str)):
            raise CorruptCollection("config %r is not JSON text" % key)
        try:
            conf[key] = loads_strict(val)
        except ValueError:
            raise CorruptCollection("config %r is not valid JSON" % key) from None
    return conf


def legacy_tags(conn):
    return {tag: usn for tag, usn in conn.execute("select tag, usn from tags")}


def downgrade_to_schema11(conn):
    """Turn an integrity-checked schema-18 collection into schema 11, as
    `close(downgrade=True)` does. `conn` must be in autocommit mode
    (isolation_level=None) with `unicase` registered."""
    conn.execute("begin exclusive")
    try:
        _rebuild_graves(conn)
        columns = (legacy_dconf(conn), legacy_decks(conn), legacy_models(conn),
                   legacy_conf(conn), legacy_tags(conn))
        conn.execute(
            "update col set dconf = ?, decks = ?, models = ?, conf = ?, tags = ?",
            [dumps_compact(column) for column in columns])
        for table in SCHEMA18_TABLES:
            conn.execute("DROP TABLE " + table)
        for index in SCHEMA18_INDEXES:
            conn.execute("DROP INDEX " + index)
        conn.execute("update col set ver = 11")
        conn.execute("commit")
    except Exception as exc:
        conn.execute("ROLLBACK")
        if isinstance(exc, CorruptCollection):
            raise
        # Unexpected column types, missing tables: still a bad upload.
        raise CorruptCollection("cannot downgrade: %s" % exc) from exc
    # Outside the transaction: checkpoints and removes the -wal file.
    conn.execute("pragma journal_mode = delete")


# --- validating schema-11 JSON (docs/protocol.md 5.13) --------------------------------
I32_MIN, I32_MAX = -(1 << 31), (1 << 31) - 1


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int_or_numeric_string(value):
    if _is_int(value):
        return True
    if isinstance(value, str):
        try:
            int(value)
        except ValueError:
            return False
        return True
    return False


def _is_bool_like(value):
    # The official reader accepts bools, numbers and strings here.
    return isinstance(value, (bool, int, float, str))


def _require(obj, what, key, test):
    if key not in obj:
        raise CorruptCollection("%s: missing %s" % (what, key))
    if not test(obj[key]):
        raise CorruptCollection("%s: bad %s" % (what, key))


def _check_optional(obj, what, key, test):
    if key in obj and not test(obj[key]):
        raise CorruptCollection("%s: bad %s" % (what, key))


def _check_json_object(text, column):
    try:
        value = loads_strict(text)
    except (ValueError, TypeError):
        raise CorruptCollection("col.%s is not JSON" % column) from None
    if not isinstance(value, dict):
        raise CorruptCollection("col.%s is not a JSON object" % column)
    return value


def _check_each(mapping, column):
    for key, value in mapping.items():
        if not isinstance(value, dict):
            raise CorruptCollection("%s %s is not an object" % (column, key))
        yield "%s %s" % (column, key), value


def _is_search_term(term):
    return (isinstance(term, list) and len(term) == 3
            and isinstance(term[0], str)
            and _is_int_or_numeric_string(term[1]) and _is_int(term[2]))


def check_deck(what, deck):
    _require(deck, what, "id", _is_int_or_numeric_string)
    _require(deck, what, "name", lambda v: isinstance(v, str))
    _require(deck, what, "usn", _is_int)
    for key in ("lrnToday", "revToday", "newToday", "timeToday"):
        _require(deck, what, key, lambda v: isinstance(v, list))
    _require(deck, what, "collapsed", lambda v: isinstance(v, bool))
    _require(deck, what, "dyn", lambda v: isinstance(v, (bool, int, float)))
    _check_optional(deck, what, "desc", lambda v: isinstance(v, str))
    if deck["dyn"]:
        _require(deck, what, "resched", _is_bool_like)
        _require(deck, what, "terms", lambda v: isinstance(v, list)
                 and all(_is_search_term(term) for term in v))
    else:
        _require(deck, what, "conf", _is_int_or_numeric_string)


def check_deck_config(what, conf):
    _require(conf, what, "id", _is_int_or_numeric_string)
    _require(conf, what, "mod", _is_int_or_numeric_string)
    _require(conf, what, "name", lambda v: isinstance(v, str))
    _require(conf, what, "usn", _is_int)
    _require(conf, what, "maxTaken", _is_number)
    _require(conf, what, "autoplay", _is_bool_like)
    _require(conf, what, "timer", _is_bool_like)
    # new/rev/lapse are read leniently: a bad one silently becomes the default.
    for key in ("new", "rev", "lapse"):
        _require(conf, what, key, lambda v: True)


def check_notetype(what, notetype):
    _require(notetype, what, "id", _is_int_or_numeric_string)
    _require(notetype, what, "name", lambda v: isinstance(v, str))
    _require(notetype, what, "type", lambda v: _is_int(v) and v in (0, 1))
    _require(notetype, what, "mod", _is_int)
    _require(notetype, what, "usn", _is_int)
    _require(notetype, what, "sortf", _is_int)
    _require(notetype, what, "did", lambda v: v is None or _is_int(v))
    _require(notetype, what, "tmpls", lambda v: isinstance(v, list))
    _require(notetype, what, "flds", lambda v: isinstance(v, list))
    _require(notetype, what, "css", lambda v: isinstance(v, str))
    for field in notetype["flds"]:
        if not isinstance(field, dict):
            raise CorruptCollection("%s: field is not an object" % what)
        _require(field, what + " field", "name", lambda v: isinstance(v, str))
        for key in ("sticky", "rtl"):
            _require(field, what + " field", key, _is_bool_like)
        _require(field, what + " field", "font", lambda v: isinstance(v, str))
        _require(field, what + " field", "size", _is_int)
    for template in notetype["tmpls"]:
        if not isinstance(template, dict):
            raise CorruptCollection("%s: template is not an object" % what)
        for key in ("name", "qfmt"):
            _require(template, what + " template", key,
                     lambda v: isinstance(v, str))


def check_schema11(conn):
    """Reject schema-11 JSON that a modern client could not upgrade."""
    row = conn.execute(
        "select conf, models, decks, dconf, tags from col").fetchone()
    if row is None:
        raise CorruptCollection("col has no row")
    conf, models, decks, dconf, tags = (
        _check_json_object(text, column) for text, column in
        zip(row, ("conf", "models", "decks", "dconf", "tags")))
    for name, usn in tags.items():
        if not (_is_int(usn) and I32_MIN <= usn <= I32_MAX):
            raise CorruptCollection("tag %r has a bad usn" % name)
    for what, deck in _check_each(decks, "deck"):
        check_deck(what, deck)
    for what, config in _check_each(dconf, "deck config"):
        check_deck_config(what, config)
    for what, notetype in _check_each(models, "note type"):
        check_notetype(what, notetype)


# ---------------------------------------------------------------------------
# Appendix C. A new collection
#   What the server creates for a new user: an empty schema-11 collection as
#   Anki itself makes one, with its stock note types, deck and deck config.
# ---------------------------------------------------------------------------

# --- a brand-new collection (docs/protocol.md 5.3, 5.14) ------------------------------
SCHEMA11_DDL = """CREATE TABLE col (
  id integer PRIMARY KEY,
  crt integer NOT NULL,
  mod integer NOT NULL,
  scm integer NOT NULL,
  ver integer NOT NULL,
  dty integer NOT NULL,
  usn integer NOT NULL,
  ls integer NOT NULL,
  conf text NOT NULL,
  models text NOT NULL,
  decks text NOT NULL,
  dconf text NOT NULL,
  tags text NOT NULL
);
CREATE TABLE notes (
  id integer PRIMARY KEY,
  guid text NOT NULL,
  mid integer NOT NULL,
  mod integer NOT NULL,
  usn integer NOT NULL,
  tags text NOT NULL,
  flds text NOT NULL,
  -- The use of type integer for sfld is deliberate, because it means that integer values in this
  -- field will sort numerically.
  sfld integer NOT NULL,
  csum integer NOT NULL,
  flags integer NOT NULL,
  data text NOT NULL
);
CREATE TABLE cards (
  id integer PRIMARY KEY,
  nid integer NOT NULL,
  did integer NOT NULL,
  ord integer NOT NULL,
  mod integer NOT NULL,
  usn integer NOT NULL,
  type integer NOT NULL,
  queue integer NOT NULL,
  due integer NOT NULL,
  ivl integer NOT NULL,
  factor integer NOT NULL,
  reps integer NOT NULL,
  lapses integer NOT NULL,
  left integer NOT NULL,
  odue integer NOT NULL,
  odid integer NOT NULL,
  flags integer NOT NULL,
  data text NOT NULL
);
CREATE TABLE revlog (
  id integer PRIMARY KEY,
  cid integer NOT NULL,
  usn integer NOT NULL,
  ease integer NOT NULL,
  ivl integer NOT NULL,
  lastIvl integer NOT NULL,
  factor integer NOT NULL,
  time integer NOT NULL,
  type integer NOT NULL
);
""" + SCHEMA11_GRAVES + """;
-- syncing
CREATE INDEX ix_notes_usn ON notes (usn);
CREATE INDEX ix_cards_usn ON cards (usn);
CREATE INDEX ix_revlog_usn ON revlog (usn);
-- card spacing
CREATE INDEX ix_cards_nid ON cards (nid);
-- scheduling and deck limiting
CREATE INDEX ix_cards_sched ON cards (did, queue, due);
-- revlog by card
CREATE INDEX ix_revlog_cid ON revlog (cid);
-- field uniqueness
CREATE INDEX ix_notes_csum ON notes (csum);
INSERT INTO col VALUES (1, 0, 0, 0, 0, 0, 0, 0, '{}', '{}', '{}', '{}', '{}');
"""

PAGE_SIZE = 4096  # what the official code uses
ROLLOVER_HOUR = 4  # a collection's day starts at 04:00 local time
DEFAULT_DECK_ID = 1
DEFAULT_DECK_CONFIG_ID = 1


def collection_start(now):
    """04:00 local on the day of `now`, or the day before if earlier: `crt`."""
    local = datetime.datetime.fromtimestamp(now)
    start = local.replace(hour=ROLLOVER_HOUR, minute=0, second=0, microsecond=0)
    if local.hour < ROLLOVER_HOUR:
        start -= datetime.timedelta(days=1)
    return int(start.timestamp())


def default_conf(basic_id):
    return {
        "activeDecks": [DEFAULT_DECK_ID],
        "curDeck": DEFAULT_DECK_ID,
        "newSpread": 0,
        "collapseTime": 1200,
        "timeLim": 0,
        "estTimes": True,
        "dueCounts": True,
        "curModel": basic_id,
        "nextPos": 1,
        "sortType": "noteFld",
        "sortBackwards": False,
        "addToCur": True,
        "dayLearnFirst": False,
        "schedVer": 2,
        "creationOffset": None,  # the server has no timezone of its own
        "sched2021": True,
    }


def default_deck():
    return {
        "id": DEFAULT_DECK_ID, "mod": 0, "name": "Default", "usn": 0,
        "lrnToday": [0, 0], "revToday": [0, 0], "newToday": [0, 0],
        "timeToday": [0, 0], "collapsed": True, "browserCollapsed": True,
        "desc": "", "dyn": 0, "conf": DEFAULT_DECK_CONFIG_ID, "extendNew": 0,
        "extendRev": 0, "reviewLimit": None, "newLimit": None,
        "reviewLimitToday": None, "newLimitToday": None,
        "desiredRetention": None,
    }


def default_deck_config():
    return {
        "id": DEFAULT_DECK_CONFIG_ID, "mod": 0, "name": "Default", "usn": 0,
        "maxTaken": 60, "autoplay": True, "timer": 0, "replayq": True,
        "new": {"bury": False, "delays": [1.0, 10.0], "initialFactor": 2500,
                "ints": [1, 4, 0], "order": 1, "perDay": 20},
        "rev": {"bury": False, "ease4": 1.3, "ivlFct": 1.0, "maxIvl": 36500,
                "perDay": 200, "hardFactor": 1.2},
        "lapse": {"delays": [10.0], "leechAction": 1, "leechFails": 8,
                  "minInt": 1, "mult": 0.0},
        "dyn": False, "newMix": 0, "newPerDayMinimum": 0,
        "interdayLearningMix": 0, "reviewOrder": 0, "newSortOrder": 0,
        "newGatherPriority": 0, "buryInterdayLearning": False,
        "fsrsWeights": [], "fsrsParams5": [], "fsrsParams6": [],
        "desiredRetention": 0.9, "ignoreRevlogsBeforeDate": "",
        "easyDaysPercentages": [1.0] * 7, "stopTimerOnAnswer": False,
        "secondsToShowQuestion": 0.0, "secondsToShowAnswer": 0.0,
        "questionAction": 0, "answerAction": 0, "waitForAudio": True,
        "sm2Retention": 0.9, "weightSearch": "",
    }


# The stock note types' texts (docs/protocol.md 5.14).
LATEX_PRE = (
    "\\documentclass[12pt]{article}\n"
    "\\special{papersize=3in,5in}\n"
    "\\usepackage[utf8]{inputenc}\n"
    "\\usepackage{amssymb,amsmath}\n"
    "\\pagestyle{empty}\n"
    "\\setlength{\\parindent}{0in}\n"
    "\\begin{document}\n"
)
LATEX_POST = "\\end{document}"
CARD_CSS_TOP = ".card {\n    font-family: arial;\n    font-size: 20px;\n"
CARD_CSS_BOTTOM = ("    text-align: center;\n    color: black;\n"
                   "    background-color: white;\n}\n")
STANDARD_CSS = CARD_CSS_TOP + "    line-height: 1.5;\n" + CARD_CSS_BOTTOM
CLOZE_CSS = STANDARD_CSS + (
    ".cloze {\n    font-weight: bold;\n    color: blue;\n}\n"
    ".nightMode .cloze {\n    color: lightblue;\n}\n"
)
IMAGE_OCCLUSION_CSS = (
    "#image-occlusion-canvas {\n"
    "    --inactive-shape-color: #ffeba2;\n"
    "    --active-shape-color: #ff8e8e;\n"
    "    --inactive-shape-border: 1px #212121;\n"
    "    --active-shape-border: 1px #212121;\n"
    "    --highlight-shape-color: #ff8e8e00;\n"
    "    --highlight-shape-border: 1px #ff8e8e;\n"
    "}\n\n"
) + CARD_CSS_TOP + CARD_CSS_BOTTOM
ANSWER_PREFIX = "{{FrontSide}}\n\n<hr id=answer>\n\n"
IMAGE_OCCLUSION_QFMT = (
    "{{#Header}}<div>{{Header}}</div>{{/Header}}\n"
    "<div style=\"display: none\">{{cloze:Occlusion}}</div>\n"
    "<div id=\"err\"></div>\n"
    "<div id=\"image-occlusion-container\">\n"
    "    {{Image}}\n"
    "    <canvas id=\"image-occlusion-canvas\"></canvas>\n"
    "</div>\n"
    "<script>\n"
    "try {\n"
    "    anki.imageOcclusion.setup();\n"
    "} catch (exc) {\n"
    "    document.getElementById(\"err\").innerHTML = `Error loading image "
    "occlusion. Is your Anki version up to date?<br><br>${exc}`;\n"
    "}\n"
    "</script>\n"
)
IMAGE_OCCLUSION_AFMT = (
    IMAGE_OCCLUSION_QFMT
    + "\n<div><button id=\"toggle\">Toggle Masks</button></div>\n"
    + "{{#Back Extra}}<div>{{Back Extra}}</div>{{/Back Extra}}\n"
)
BASIC_CARD_1 = ("Card 1", "{{Front}}", ANSWER_PREFIX + "{{Back}}")

# (name, type, originalStockKind, fields, templates, req, css); a field is
# (name, tag, preventDeletion), a template (name, qfmt, afmt).
STOCK_NOTETYPES = (
    ("Basic", 0, 1,
     [("Front", None, False), ("Back", None, False)],
     [BASIC_CARD_1],
     [[0, "any", [0]]], STANDARD_CSS),
    ("Basic (and reversed card)", 0, 2,
     [("Front", None, False), ("Back", None, False)],
     [BASIC_CARD_1, ("Card 2", "{{Back}}", ANSWER_PREFIX + "{{Front}}")],
     [[0, "any", [0]], [1, "any", [1]]], STANDARD_CSS),
    ("Basic (optional reversed card)", 0, 3,
     [("Front", None, False), ("Back", None, False),
      ("Add Reverse", None, False)],
     [BASIC_CARD_1, ("Card 2", "{{#Add Reverse}}{{Back}}{{/Add Reverse}}",
                     ANSWER_PREFIX + "{{Front}}")],
     [[0, "any", [0]], [1, "all", [1, 2]]], STANDARD_CSS),
    ("Basic (type in the answer)", 0, 4,
     [("Front", None, False), ("Back", None, False)],
     [("Card 1", "{{Front}}\n\n{{type:Back}}",
       "{{Front}}\n\n<hr id=answer>\n\n{{type:Back}}")],
     [[0, "any", [0, 1]]], STANDARD_CSS),
    ("Cloze", 1, 5,
     [("Text", 0, True), ("Back Extra", 1, False)],
     [("Cloze", "{{cloze:Text}}", "{{cloze:Text}}<br>\n{{Back Extra}}")],
     [[0, "any", [0]]], CLOZE_CSS),
    ("Image Occlusion", 1, 6,
     [("Occlusion", 0, True), ("Image", 1, True), ("Header", 2, True),
      ("Back Extra", 3, True), ("Comments", 4, False)],
     [("Image Occlusion", IMAGE_OCCLUSION_QFMT, IMAGE_OCCLUSION_AFMT)],
     [[0, "any", [0, 1, 2]]], IMAGE_OCCLUSION_CSS),
)


def random_id():
    """A random signed 64-bit id, as stock fields and templates get."""
    return random.getrandbits(64) - (1 << 63)


def stock_notetype(ntid, spec):
    name, kind, stock_kind, fields, templates, req, css = spec
    return {
        "id": ntid, "name": name, "type": kind, "mod": 0, "usn": 0,
        "sortf": 0, "did": None,
        "tmpls": [
            {"name": tname, "ord": ord_, "qfmt": qfmt, "afmt": afmt,
             "bqfmt": "", "bafmt": "", "did": None, "bfont": "", "bsize": 0,
             "id": random_id()}
            for ord_, (tname, qfmt, afmt) in enumerate(templates)],
        "flds": [
            {"name": fname, "ord": ord_, "sticky": False, "rtl": False,
             "font": "Arial", "size": 20, "description": "",
             "plainText": False, "collapsed": False,
             "excludeFromSearch": False, "id": random_id(), "tag": tag,
             "preventDeletion": keep}
            for ord_, (fname, tag, keep) in enumerate(fields)],
        "css": css, "latexPre": LATEX_PRE, "latexPost": LATEX_POST,
        "latexsvg": False, "req": req, "originalStockKind": stock_kind,
    }


def _write_new_collection(path, now):
    created_ms = int(now * 1000)
    models = {}
    for offset, spec in enumerate(STOCK_NOTETYPES):
        models[str(created_ms + offset)] = stock_notetype(created_ms + offset, spec)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("pragma page_size = %d" % PAGE_SIZE)
        conn.execute("pragma journal_mode = delete")
        conn.executescript("begin;\n" + SCHEMA11_DDL)  # stays open
        conn.execute(
            "update col set crt = ?, scm = ?, ver = 11, conf = ?, models = ?, "
            "decks = ?, dconf = ?, tags = '{}'",
            (collection_start(now), created_ms, dumps_compact(default_conf(created_ms)),
             dumps_compact(models),
             dumps_compact({str(DEFAULT_DECK_ID): default_deck()}),
             dumps_compact({str(DEFAULT_DECK_CONFIG_ID): default_deck_config()})))
        conn.execute("commit")
    finally:
        conn.close()


# ---------------------------------------------------------------------------
# Appendix D. Media zips
#   The part of the zip format media travels in (docs/protocol.md 6.12): stored
#   or deflated entries, found through the central directory; no zip64, no
#   encryption, no spanning. zipfile makes objects and a file per entry read or
#   written: for 25 small images that was a fifth of the server's work.
# ---------------------------------------------------------------------------
ZIP_LOCAL = struct.Struct("<IHHHHHIIIHH")           # local file header (30 bytes)
ZIP_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")   # central directory header (46 bytes)
ZIP_END = struct.Struct("<IHHHHIIH")                # end of central directory record (22)
ZIP_LOCAL_MAGIC = 0x04034B50
ZIP_CENTRAL_MAGIC = 0x02014B50
ZIP_END_MAGIC = 0x06054B50
ZIP_STORED, ZIP_DEFLATED = 0, 8                     # the compression methods media use
ZIP_ENCRYPTED = 0x0001                              # general purpose flag: bit 0
ZIP_UTF8 = 0x0800                                   # bit 11: the name is UTF-8, else cp437
ZIP_VERSION = 20                                    # 2.0: what stored and deflate need
ZIP_DATE = 0x21                                     # 1980-01-01: entries carry no time
ZIP_COMMENT_MAX = 0xFFFF                            # how far the end record may sit from the end
ZIP64_MARK = 0xFFFFFFFF                             # a size or offset that lives in zip64 fields
ZIP64_COUNT = 0xFFFF                                # an entry count that lives there
ZIP_CRC_AT = 14                                     # where CRC and sizes sit in a local header


class ZipError(ValueError):
    pass


class ZipEntry:
    def __init__(self, name, flags, method, crc, packed, size, offset):
        self.name, self.flags, self.method = name, flags, method
        self.crc, self.packed, self.size, self.offset = crc, packed, size, offset


class ZipReader:
    """An uploaded zip: `entries` by name, from its central directory; each entry is
    read checked against its declared size and CRC, so a lying header gets no further."""

    def __init__(self, file):
        self.file = file
        length = file.seek(0, os.SEEK_END)
        start = max(0, length - ZIP_END.size - ZIP_COMMENT_MAX)
        file.seek(start)
        tail = file.read()
        at = tail.rfind(struct.pack("<I", ZIP_END_MAGIC))
        if at < 0 or len(tail) - at < ZIP_END.size:
            raise ZipError("no end of central directory: not a zip, or cut short")
        _, disk, directory_disk, _, count, size, offset, _ = ZIP_END.unpack_from(tail, at)
        if disk or directory_disk:
            raise ZipError("a zip spanning several files")
        if offset == ZIP64_MARK or count == ZIP64_COUNT:
            raise ZipError("a zip64 archive")
        if offset + size > start + at:
            raise ZipError("the central directory lies past the end: cut short")
        file.seek(offset)
        directory = file.read(size)
        self.entries = {}
        pos = 0
        for _ in range(count):
            if pos + ZIP_CENTRAL.size > len(directory):
                raise ZipError("the central directory is cut short")
            (magic, _, _, flags, method, _, _, crc, packed, size, name_length, extra_length,
             comment_length, _, _, _, local) = ZIP_CENTRAL.unpack_from(directory, pos)
            if magic != ZIP_CENTRAL_MAGIC:
                raise ZipError("a damaged central directory")
            pos += ZIP_CENTRAL.size
            raw = directory[pos:pos + name_length]
            pos += name_length + extra_length + comment_length
            if ZIP64_MARK in (packed, size, local):
                raise ZipError("a zip64 entry")
            name = raw.decode("utf-8" if flags & ZIP_UTF8 else "cp437", "replace")
            self.entries[name] = ZipEntry(name, flags, method, crc, packed, size, local)

    def read(self, entry):
        parts = []
        self.copy(entry, parts.append)
        return b"".join(parts)

    def copy(self, entry, write):
        """The entry's content to write(), in blocks; no more than its header says."""
        if entry.flags & ZIP_ENCRYPTED:
            raise ZipError("%r is encrypted" % entry.name[:QUOTED_MAX])
        if entry.method not in (ZIP_STORED, ZIP_DEFLATED):
            raise ZipError("%r uses compression method %d, not stored or deflate"
                           % (entry.name[:QUOTED_MAX], entry.method))
        self.file.seek(entry.offset)
        header = self.file.read(ZIP_LOCAL.size)
        if len(header) < ZIP_LOCAL.size or ZIP_LOCAL.unpack(header)[0] != ZIP_LOCAL_MAGIC:
            raise ZipError("%r: no local header where the directory says" % entry.name[:80])
        name_length, extra_length = ZIP_LOCAL.unpack(header)[9:]
        self.file.seek(entry.offset + ZIP_LOCAL.size + name_length + extra_length)
        inflate = zlib.decompressobj(-zlib.MAX_WBITS) if entry.method == ZIP_DEFLATED else None
        unread, size, crc = entry.packed, 0, 0
        while unread:
            block = self.file.read(min(IO_BLOCK, unread))
            if not block:
                raise ZipError("%r is cut short" % entry.name[:QUOTED_MAX])
            unread -= len(block)
            while block:
                # Never more than one byte past the declared size: a bomb stops there.
                data = inflate.decompress(block, entry.size - size + 1) if inflate else block
                block = inflate.unconsumed_tail if inflate else b""
                size += len(data)
                if size > entry.size:
                    raise ZipError("%r holds more than its header says"
                                   % entry.name[:QUOTED_MAX])
                crc = zlib.crc32(data, crc)
                write(data)
        if size != entry.size or (inflate is not None and not inflate.eof):
            raise ZipError("%r holds less than its header says" % entry.name[:QUOTED_MAX])
        if crc != entry.crc:
            raise ZipError("%r fails its CRC check" % entry.name[:QUOTED_MAX])


class ZipWriter:
    """A zip of stored entries, written as it goes: each local header with its CRC and
    sizes, then the central directory."""

    def __init__(self, file):
        self.file = file
        self.offset = 0
        self.directory = []

    @staticmethod
    def _flags(name):
        # Names are written as UTF-8: bit 11 says so, else readers decode them as cp437
        # (an ASCII name, the same in both, goes without it, as zipfile writes it).
        return 0 if name.isascii() else ZIP_UTF8

    def _header(self, name, crc, size):
        return ZIP_LOCAL.pack(ZIP_LOCAL_MAGIC, ZIP_VERSION, self._flags(name), ZIP_STORED, 0,
                              ZIP_DATE, crc, size, size, len(name), 0) + name

    def add(self, name, data):
        name = name.encode("utf-8")
        crc = zlib.crc32(data)
        header = self._header(name, crc, len(data))
        self.file.write(header)
        self.file.write(data)
        self.directory.append((name, crc, len(data), self.offset))
        self.offset += len(header) + len(data)

    def add_file(self, name, source):
        """A big file streamed from `source`; its CRC, known at the end, is written back."""
        name = name.encode("utf-8")
        header = self._header(name, 0, 0)
        at = self.file.tell()
        self.file.write(header)
        crc = size = 0
        while True:
            block = source.read(IO_BLOCK)
            if not block:
                break
            crc = zlib.crc32(block, crc)
            size += len(block)
            if size >= ZIP64_MARK:
                raise ValueError("%s: 4 GiB or more does not fit a zip without zip64"
                                 % name.decode("utf-8"))
            self.file.write(block)
        end = self.file.tell()
        self.file.seek(at + ZIP_CRC_AT)
        self.file.write(struct.pack("<III", crc, size, size))
        self.file.seek(end)
        self.directory.append((name, crc, size, self.offset))
        self.offset += len(header) + size

    def close(self):
        parts = [ZIP_CENTRAL.pack(ZIP_CENTRAL_MAGIC, ZIP_VERSION, ZIP_VERSION, self._flags(name),
                                  ZIP_STORED, 0, ZIP_DATE, crc, size, size, len(name), 0, 0, 0, 0,
                                  0, offset)
                 + name for name, crc, size, offset in self.directory]
        directory = b"".join(parts)
        count = len(self.directory)
        self.file.write(directory + ZIP_END.pack(ZIP_END_MAGIC, 0, 0, count, count,
                                                 len(directory), self.offset, 0))


# ---------------------------------------------------------------------------
# Appendix E. A private certificate authority
#   `tls = self-signed` (or `ankisync.py tls`): a CA made once, and a server
#   certificate it signs for this machine's names and LAN addresses, so a LAN
#   without a domain name gets HTTPS that devices trust after one install of
#   the CA. Keys are ECDSA P-256, signed here in pure Python: nothing to install,
#   and no binding to libcrypto, whose ABI differs between OpenSSL 1.1 and 3.x
#   (and which macOS hides). A certificate is one signature, so the speed of
#   Python's integers is irrelevant; nonces are deterministic (RFC 6979), so no
#   signature depends on a random number generator's quality. Only the
#   certificates are made here: the TLS connection itself is the `ssl` module's.
#   docs/tls.md says the same for users; ensure_private_ca() (the command line
#   section) decides when a certificate is made.
# ---------------------------------------------------------------------------

# NIST P-256 (SEC 2, 2.4.2; FIPS 186-4 D.1.2.3): y^2 = x^3 - 3x + b over the prime P256.
P256 = 2 ** 256 - 2 ** 224 + 2 ** 192 + 2 ** 96 - 1
P256_B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551   # the group order
P256_G = (0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296,
          0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5)


def _jacobian_double(point):
    """2P in Jacobian coordinates (x = X/Z^2, y = Y/Z^3): no inversion per step."""
    x, y, z = point
    if not y:
        return (0, 1, 0)
    ysq = y * y % P256
    s = 4 * x * ysq % P256
    m = 3 * (x - z * z) * (x + z * z) % P256         # a = -3: 3x^2 + a z^4 factored
    nx = (m * m - 2 * s) % P256
    ny = (m * (s - nx) - 8 * ysq * ysq) % P256
    return (nx, ny, 2 * y * z % P256)


def _jacobian_add(p, q):
    if not p[2]:
        return q
    if not q[2]:
        return p
    x1, y1, z1 = p
    x2, y2, z2 = q
    z1z1, z2z2 = z1 * z1 % P256, z2 * z2 % P256
    u1, u2 = x1 * z2z2 % P256, x2 * z1z1 % P256
    s1, s2 = y1 * z2 * z2z2 % P256, y2 * z1 * z1z1 % P256
    if u1 == u2:
        return _jacobian_double(p) if s1 == s2 else (0, 1, 0)
    h, r = (u2 - u1) % P256, (s2 - s1) % P256
    hh = h * h % P256
    hhh = h * hh % P256
    v = u1 * hh % P256
    nx = (r * r - hhh - 2 * v) % P256
    ny = (r * (v - nx) - s1 * hhh) % P256
    return (nx, ny, h * z1 * z2 % P256)


def p256_multiply(k, point=P256_G):
    """k times an affine point, as an affine point. Not constant-time: the keys signed
    with stay on this machine, and a certificate is signed once a year, so no timing of
    it is anyone's to observe."""
    result, addend = (0, 1, 0), (point[0], point[1], 1)
    while k:
        if k & 1:
            result = _jacobian_add(result, addend)
        addend = _jacobian_double(addend)
        k >>= 1
    x, y, z = result
    zinv = pow(z, -1, P256)
    return (x * zinv * zinv % P256, y * zinv * zinv * zinv % P256)


def rfc6979_nonce(private, digest):
    """The deterministic k of RFC 6979 3.2 for P-256 with HMAC-SHA256."""
    x = private.to_bytes(32, "big")
    h1 = (int.from_bytes(digest, "big") % P256_N).to_bytes(32, "big")    # bits2octets
    v, k = b"\x01" * 32, b"\x00" * 32
    for marker in (b"\x00", b"\x01"):
        k = hmac.new(k, v + marker + x + h1, hashlib.sha256).digest()
        v = hmac.new(k, v, hashlib.sha256).digest()
    while True:
        v = hmac.new(k, v, hashlib.sha256).digest()
        nonce = int.from_bytes(v, "big")
        if 1 <= nonce < P256_N:
            return nonce
        k = hmac.new(k, v + b"\x00", hashlib.sha256).digest()
        v = hmac.new(k, v, hashlib.sha256).digest()


def ecdsa_sign(private, message):
    """(r, s): the ECDSA P-256 SHA-256 signature of `message` (FIPS 186-4 6.4)."""
    digest = hashlib.sha256(message).digest()
    e = int.from_bytes(digest, "big")
    k = rfc6979_nonce(private, digest)
    r = p256_multiply(k)[0] % P256_N
    s = pow(k, -1, P256_N) * (e + r * private) % P256_N
    if not r or not s:          # probability 2^-256; RFC 6979 would take the next k
        raise ValueError("degenerate ECDSA signature")
    return r, s


def new_private_key():
    return secrets.randbelow(P256_N - 1) + 1


def public_point(private):
    """The public key as SEC 1's uncompressed point: 04 || x || y."""
    x, y = p256_multiply(private)
    return b"\x04" + x.to_bytes(32, "big") + y.to_bytes(32, "big")


# DER (X.690), only what certificates and keys need.
def der(tag, content):
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + content


def der_int(value):
    return der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big", signed=True))


def der_oid(dotted):
    numbers = [int(n) for n in dotted.split(".")]
    body = bytearray([40 * numbers[0] + numbers[1]])
    for number in numbers[2:]:
        chunk = [number & 0x7F]
        number >>= 7
        while number:
            chunk.append(0x80 | number & 0x7F)
            number >>= 7
        body += bytes(reversed(chunk))
    return der(0x06, bytes(body))


def der_seq(*items):
    return der(0x30, b"".join(items))


def der_bits(data, unused=0):
    return der(0x03, bytes([unused]) + data)


def der_octets(data):
    return der(0x04, data)


def der_utf8(text):
    return der(0x0C, text.encode("utf-8"))


def der_time(when):
    """UTCTime until 2049, GeneralizedTime after (RFC 5280 4.1.2.5)."""
    if when.year < 2050:
        return der(0x17, when.strftime("%y%m%d%H%M%SZ").encode("ascii"))
    return der(0x18, when.strftime("%Y%m%d%H%M%SZ").encode("ascii"))


DER_TRUE = b"\x01\x01\xff"
OID_ECDSA_SHA256 = "1.2.840.10045.4.3.2"
OID_EC_PUBLIC_KEY = "1.2.840.10045.2.1"
OID_P256 = "1.2.840.10045.3.1.7"
OID_COMMON_NAME = "2.5.4.3"
OID_ORGANIZATION = "2.5.4.10"
OID_SUBJECT_KEY_ID = "2.5.29.14"
OID_KEY_USAGE = "2.5.29.15"
OID_SUBJECT_ALT_NAME = "2.5.29.17"
OID_BASIC_CONSTRAINTS = "2.5.29.19"
OID_AUTHORITY_KEY_ID = "2.5.29.35"
OID_EXTENDED_KEY_USAGE = "2.5.29.37"
OID_SERVER_AUTH = "1.3.6.1.5.5.7.3.1"
KEY_USAGE_CERT_SIGN = der_bits(b"\x06", 1)          # keyCertSign (bit 5), cRLSign (bit 6)
KEY_USAGE_SIGNATURE = der_bits(b"\x80", 7)          # digitalSignature (bit 0)


def der_name(common_name):
    return der_seq(der(0x31, der_seq(der_oid(OID_ORGANIZATION), der_utf8("ankisync"))),
                   der(0x31, der_seq(der_oid(OID_COMMON_NAME), der_utf8(common_name))))


def der_extension(oid, value, critical=False):
    return der_seq(der_oid(oid), DER_TRUE if critical else b"", der_octets(value))


def key_id(point):
    """A key identifier (RFC 7093 2, method 1): SHA-256 of the key, first 160 bits."""
    return hashlib.sha256(point).digest()[:20]


def certificate_der(subject, issuer, point, issuer_point, issuer_key, not_before, not_after,
                    extensions):
    """An X.509 v3 certificate (RFC 5280 4.1), signed with ECDSA P-256 SHA-256."""
    algorithm = der_seq(der_oid(OID_ECDSA_SHA256))
    spki = der_seq(der_seq(der_oid(OID_EC_PUBLIC_KEY), der_oid(OID_P256)), der_bits(point))
    extensions = list(extensions) + [
        der_extension(OID_SUBJECT_KEY_ID, der_octets(key_id(point))),
        der_extension(OID_AUTHORITY_KEY_ID, der_seq(der(0x80, key_id(issuer_point))))]
    serial = secrets.randbits(CERT_SERIAL_BITS) | 1 << (CERT_SERIAL_BITS - 1)   # positive
    tbs = der_seq(der(0xA0, der_int(2)), der_int(serial), algorithm, issuer,
                  der_seq(der_time(not_before), der_time(not_after)), subject, spki,
                  der(0xA3, der_seq(*extensions)))
    r, s = ecdsa_sign(issuer_key, tbs)
    return der_seq(tbs, algorithm, der_bits(der_seq(der_int(r), der_int(s))))


def private_key_der(private):
    """The key as SEC 1's ECPrivateKey (RFC 5915): what `ssl` loads as "EC PRIVATE KEY"."""
    return der_seq(der_int(1), der_octets(private.to_bytes(32, "big")),
                   der(0xA0, der_oid(OID_P256)), der(0xA1, der_bits(public_point(private))))


def read_private_key(data):
    """The secret number back from private_key_der()'s PEM, or ValueError."""
    body = pem_body(data, "EC PRIVATE KEY")
    # 30 len 02 01 01 04 20 <32 bytes>: the fixed start private_key_der() writes.
    start = body.find(b"\x02\x01\x01\x04\x20")
    if not body.startswith(b"\x30") or start < 0 or start > 4:
        raise ValueError("not a P-256 key as ankisync writes them")
    private = int.from_bytes(body[start + 5:start + 37], "big")
    if not 1 <= private < P256_N:
        raise ValueError("not a P-256 key as ankisync writes them")
    return private


def pem(kind, data):
    text = base64.b64encode(data).decode("ascii")
    lines = [text[i:i + 64] for i in range(0, len(text), 64)]
    return "-----BEGIN %s-----\n%s\n-----END %s-----\n" % (kind, "\n".join(lines), kind)


def pem_body(text, kind):
    match = re.search(r"-----BEGIN %s-----(.*?)-----END %s-----" % (kind, kind), text, re.S)
    if not match:
        raise ValueError("no %s in it" % kind)
    return base64.b64decode("".join(match.group(1).split()))


def der_items(data):
    """The (tag, content) of each DER element in `data`, one after the other."""
    items, pos = [], 0
    while pos < len(data):
        size, start = data[pos + 1], pos + 2
        if size & 0x80:
            start += size & 0x7F
            size = int.from_bytes(data[pos + 2:start], "big")
        if start + size > len(data):
            raise ValueError("truncated DER")
        items.append((data[pos], data[start:start + size]))
        pos = start + size
    return items


def tbs_fields(cert_der):
    """A certificate's TBSCertificate fields (RFC 5280 4.1), as (tag, content) pairs:
    version, serial, algorithm, issuer, validity, subject, key, extensions."""
    return der_items(der_items(der_items(cert_der)[0][1])[0][1])


def certificate_validity(fields):
    """(not before, not after) of a certificate's TBS fields, as UTC datetimes."""
    times = []
    for tag, text in der_items(fields[4][1]):
        when = datetime.datetime.strptime(text.decode("ascii"),
                                          "%y%m%d%H%M%SZ" if tag == 0x17 else "%Y%m%d%H%M%SZ")
        times.append(when.replace(tzinfo=datetime.timezone.utc))
    return tuple(times)


def certificate_facts(pem_text):
    """(not after, DNS names, IP addresses) of a certificate: the first one in the text
    (a chain's leaf)."""
    fields = tbs_fields(pem_body(pem_text, "CERTIFICATE"))
    when = certificate_validity(fields)[1]
    names, addresses = set(), set()
    for _, extension in der_items(der_items(fields[7][1])[0][1]):
        parts = der_items(extension)
        if parts[0] == (0x06, der_oid(OID_SUBJECT_ALT_NAME)[2:]):
            for kind, value in der_items(der_items(parts[-1][1])[0][1]):
                if kind == 0x82:
                    names.add(value.decode("ascii"))
                elif kind == 0x87:
                    addresses.add(ipaddress.ip_address(value))
    return when, names, addresses


def make_ca(hostname, now):
    """(certificate PEM, key PEM) of a new CA, named after this machine and the day, so a
    device that trusted an earlier one tells the two apart."""
    key = new_private_key()
    point = public_point(key)
    made = ", " + now.strftime("%Y-%m-%d %H:%M")      # kept whole: it tells CAs apart
    name = der_name(("ankisync CA on " + hostname)[:CERT_NAME_MAX - len(made)] + made)
    extensions = [der_extension(OID_BASIC_CONSTRAINTS, der_seq(DER_TRUE, der_int(0)), True),
                  der_extension(OID_KEY_USAGE, KEY_USAGE_CERT_SIGN, True)]
    cert = certificate_der(name, name, point, point, key, now - CERT_BACKDATE,
                           now + datetime.timedelta(days=CA_DAYS), extensions)
    return pem("CERTIFICATE", cert), pem("EC PRIVATE KEY", private_key_der(key))


def make_server_certificate(ca_pem, ca_key_pem, names, addresses, now):
    """(certificate PEM, key PEM): a new key and a certificate the CA signs for the names
    and addresses, valid SERVER_CERT_DAYS."""
    ca_key = read_private_key(ca_key_pem)
    ca_point = public_point(ca_key)
    ca_der = pem_body(ca_pem, "CERTIFICATE")
    if ca_point not in ca_der:
        raise ValueError("the CA's key does not belong to its certificate")
    issuer = der(*tbs_fields(ca_der)[5])                # the CA's subject, as written there
    key = new_private_key()
    point = public_point(key)
    alt_names = [der(0x82, name.encode("ascii")) for name in names]
    alt_names += [der(0x87, address.packed) for address in addresses]
    extensions = [der_extension(OID_BASIC_CONSTRAINTS, der_seq(), True),
                  der_extension(OID_KEY_USAGE, KEY_USAGE_SIGNATURE, True),
                  der_extension(OID_EXTENDED_KEY_USAGE, der_seq(der_oid(OID_SERVER_AUTH))),
                  der_extension(OID_SUBJECT_ALT_NAME, der_seq(*alt_names))]
    cert = certificate_der(der_name("ankisync server"), issuer, point, ca_point, ca_key,
                           now - CERT_BACKDATE, now + datetime.timedelta(days=SERVER_CERT_DAYS),
                           extensions)
    return pem("CERTIFICATE", cert), pem("EC PRIVATE KEY", private_key_der(key))


# ---------------------------------------------------------------------------
# Appendix F. Let's Encrypt: an ACME client (RFC 8555)
#   `acme_domain`: a certificate from Let's Encrypt (or another ACME CA), asked
#   for at start and again at two thirds of its life while the server runs, and
#   swapped into the listener's ServerTls. The CA checks that the domain leads
#   here by TLS-ALPN-01 (RFC 8737) on the HTTPS port itself, so one forwarded
#   port is enough, or else by HTTP-01 on port 80 when ankisync can listen there.
#   Requests are JWS signed ES256 with appendix E's ECDSA; the CSR is made with
#   its DER encoder. A failure is logged in the CA's own words with the likely
#   fix and tried again later, less and less often; the server serves meanwhile.
# ---------------------------------------------------------------------------

OID_ACME_IDENTIFIER = "1.3.6.1.5.5.7.1.31"          # RFC 8737 3: id-pe-acmeIdentifier
OID_EXTENSION_REQUEST = "1.2.840.113549.1.9.14"     # PKCS #9: the extensions a CSR asks for
COMMON_NAME_MAX = 64                                # RFC 5280's ub-common-name
STAND_IN_DAYS = 7           # the stand-in and challenge certificates: replaced within minutes
ACME_PROBLEM = "urn:ietf:params:acme:error:"        # RFC 8555 6.7: problem types start so
HTTP01_PATH = "/.well-known/acme-challenge/"        # RFC 8555 8.3


class AcmeError(Exception):
    """The CA's refusal, in its problem document's words (RFC 8555 6.7), or no answer."""

    def __init__(self, detail, kind="", fix=""):
        super().__init__(detail)
        self.kind, self.fix = kind, fix


class ChallengeFailed(AcmeError):
    """The CA could not see this server at the domain by one challenge type."""


def jwk_of(private):
    """The public key as a JWK (RFC 7518 6.2): what newAccount is signed with."""
    point = public_point(private)
    return {"crv": "P-256", "kty": "EC", "x": b64url(point[1:33]), "y": b64url(point[33:])}


def jwk_thumbprint(jwk):
    """RFC 7638: SHA-256 of the required members, in order, without spaces."""
    text = json.dumps(jwk, sort_keys=True, separators=(",", ":"))
    return b64url(hashlib.sha256(text.encode("ascii")).digest())


def jws(private, protected, payload):
    """A flattened JWS (RFC 7515 7.2.2) signed ES256: r || s, 32 bytes each (RFC 7518
    3.4), not DER. A payload of None is the empty one of a POST-as-GET (RFC 8555 6.3)."""
    head = b64url(json.dumps(protected).encode("utf-8"))
    body = "" if payload is None else b64url(json.dumps(payload).encode("utf-8"))
    r, s = ecdsa_sign(private, ("%s.%s" % (head, body)).encode("ascii"))
    return {"protected": head, "payload": body,
            "signature": b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))}


def domain_name(domain):
    """A certificate's subject: the domain as common name, when it fits in one."""
    if len(domain) > COMMON_NAME_MAX:
        return der_seq()                # the subjectAltName alone names it (RFC 5280 4.1.2.6)
    return der_seq(der(0x31, der_seq(der_oid(OID_COMMON_NAME), der_utf8(domain))))


def domain_alt_name(domain):
    return der_extension(OID_SUBJECT_ALT_NAME, der_seq(der(0x82, domain.encode("ascii"))))


def csr_der(private, domain):
    """A PKCS #10 certificate request (RFC 2986 4) for `domain`, signed with its key."""
    spki = der_seq(der_seq(der_oid(OID_EC_PUBLIC_KEY), der_oid(OID_P256)),
                   der_bits(public_point(private)))
    attributes = der(0xA0, der_seq(der_oid(OID_EXTENSION_REQUEST),
                                   der(0x31, der_seq(domain_alt_name(domain)))))
    info = der_seq(der_int(0), domain_name(domain), spki, attributes)
    r, s = ecdsa_sign(private, info)
    return der_seq(info, der_seq(der_oid(OID_ECDSA_SHA256)),
                   der_bits(der_seq(der_int(r), der_int(s))))


def self_signed_certificate(domain, extensions=()):
    """(certificate PEM, key PEM) signed by its own new key, for `domain`: the stand-in
    served until the CA's comes, and with the acmeIdentifier extension the TLS-ALPN-01
    answer."""
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    key = new_private_key()
    point = public_point(key)
    name = domain_name(domain)
    cert = certificate_der(name, name, point, point, key, now - CERT_BACKDATE,
                           now + datetime.timedelta(days=STAND_IN_DAYS),
                           [domain_alt_name(domain)] + list(extensions))
    return pem("CERTIFICATE", cert), pem("EC PRIVATE KEY", private_key_der(key))


class AcmeClient:
    """One conversation with an ACME CA (RFC 8555 7): its directory, the account, then an
    order per certificate. The CA's own HTTPS is verified with the system's CAs, which
    SSL_CERT_FILE replaces when set."""

    def __init__(self, directory, account_key, email=""):
        self.directory_url, self.key, self.email = directory, account_key, email
        self.directory, self.kid, self.nonce = {}, None, None
        self.context = ssl.create_default_context()

    def request(self, url, data=None, method=None):
        """(status, headers, body) of one HTTP request; AcmeError when there is no answer."""
        headers = {"User-Agent": "ankisync/%s" % __version__}
        if data is not None:
            headers["Content-Type"] = "application/jose+json"
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=ACME_TIMEOUT,
                                        context=self.context) as reply:
                return reply.status, reply.headers, reply.read(ACME_REPLY_MAX)
        except urllib.error.HTTPError as e:
            with e:
                return e.code, e.headers, e.read(ACME_REPLY_MAX)
        except (OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise AcmeError("no answer from the CA at %s: %s" % (url, reason), fix=(
                "check this machine's connection to the internet, and acme_directory; a "
                "CA whose certificate no system CA signed is trusted through SSL_CERT_FILE"))

    def post(self, url, payload):
        """(headers, body) of a signed POST (payload None: a POST-as-GET); a badNonce is
        retried with the nonce that came with it (RFC 8555 6.5)."""
        for _ in range(ACME_BAD_NONCE_TRIES):
            if self.nonce is None:
                _, headers, _ = self.request(self.directory["newNonce"], method="HEAD")
                self.nonce = headers.get("Replay-Nonce")
            protected = {"alg": "ES256", "nonce": self.nonce, "url": url}
            if self.kid:
                protected["kid"] = self.kid
            else:
                protected["jwk"] = jwk_of(self.key)
            body = json.dumps(jws(self.key, protected, payload)).encode("ascii")
            status, headers, answer = self.request(url, body)
            self.nonce = headers.get("Replay-Nonce")
            if status < 400:
                return headers, answer
            try:
                problem = json.loads(answer)
            except ValueError:
                problem = {}
            kind = str(problem.get("type", "")).replace(ACME_PROBLEM, "")
            if kind != "badNonce":
                raise AcmeError(str(problem.get("detail") or "HTTP %d from %s" % (status, url)),
                                kind)
        raise AcmeError("the CA refused %d nonces in a row" % ACME_BAD_NONCE_TRIES, "badNonce")

    def post_json(self, url, payload):
        headers, body = self.post(url, payload)
        try:
            return headers, json.loads(body)
        except ValueError:
            raise AcmeError("the CA's answer from %s is no JSON" % url)

    def open_account(self):
        """The directory, then the account of this key: made, or found (RFC 8555 7.3)."""
        status, _, body = self.request(self.directory_url)
        try:
            self.directory = json.loads(body) if status == 200 else None
            self.directory["newNonce"], self.directory["newAccount"], self.directory["newOrder"]
        except (ValueError, TypeError, KeyError):
            raise AcmeError("%s is no ACME directory (HTTP %d)" % (self.directory_url, status),
                            fix="set acme_directory to the CA's directory address")
        account = {"termsOfServiceAgreed": True}
        if self.email:
            account["contact"] = ["mailto:" + self.email]
        headers, _ = self.post_json(self.directory["newAccount"], account)
        self.kid = headers.get("Location")

    def authorize(self, domain, kind, answer):
        """A new order for `domain` whose authorizations are won by challenges of `kind`;
        answer(token, key authorization) sets up the answer while the CA looks, and
        answer(None, None) takes it down. Returns (order address, order)."""
        headers, order = self.post_json(self.directory["newOrder"],
                                        {"identifiers": [{"type": "dns", "value": domain}]})
        for address in order["authorizations"]:
            _, authorization = self.post_json(address, None)
            if authorization["status"] == "valid":
                continue        # won before, within the CA's reuse period
            challenge = [c for c in authorization["challenges"] if c["type"] == kind]
            if not challenge:
                raise ChallengeFailed("the CA offers no %s challenge" % kind)
            token = challenge[0]["token"]
            answer(token, "%s.%s" % (token, jwk_thumbprint(jwk_of(self.key))))
            try:
                self.post_json(challenge[0]["url"], {})
                authorization = self.wait(address, ("valid", "invalid", "deactivated",
                                                    "expired", "revoked"))
            finally:
                answer(None, None)
            if authorization["status"] != "valid":
                errors = [c["error"] for c in authorization["challenges"] if c.get("error")]
                error = errors[0] if errors else {}
                raise ChallengeFailed(str(error.get("detail") or authorization["status"]),
                                      str(error.get("type", "")).replace(ACME_PROBLEM, ""))
        return headers.get("Location"), order

    def finalize(self, address, order, csr):
        """The certificate chain (PEM) of an authorized order, for the CSR."""
        _, order = self.post_json(order["finalize"], {"csr": b64url(csr)})
        if order["status"] != "valid":
            order = self.wait(address, ("valid", "invalid"))
        if order["status"] != "valid":
            raise AcmeError(str(order.get("error", {}).get("detail") or "order " +
                                order["status"]))
        _, chain = self.post(order["certificate"], None)
        return chain.decode("ascii")

    def wait(self, address, ends):
        """The object at `address` once its status is one of `ends` (RFC 8555 7.5.1)."""
        deadline = time.monotonic() + ACME_POLL_MAX
        while True:
            _, thing = self.post_json(address, None)
            if thing.get("status") in ends:
                return thing
            if time.monotonic() > deadline:
                raise AcmeError("the CA did not finish within %d s" % ACME_POLL_MAX)
            time.sleep(ACME_POLL)


class AcmeCertificates:
    """acme_domain's certificate: the stored one, or a stand-in, at start; then a thread
    that obtains one and renews it at ACME_RENEW_AT of its life, each swapped into the
    listener's ServerTls. Files in <data>/.tls/: acme-account.key, acme.key, acme.pem."""

    def __init__(self, config):
        self.config = config
        self.domain = config.acme_domain.rstrip(".")
        if not DNS_NAME.fullmatch(self.domain) or ipaddress_or_none(self.domain):
            raise SystemExit("ankisync: acme_domain takes a domain name, such as "
                             "anki.example.org, not %r" % config.acme_domain)
        self.folder = os.path.join(config.data, TLS_FOLDER)
        self.cert_path, self.key_path = tls_path(config, "acme.pem"), tls_path(config, "acme.key")
        self.tls, self.http, self.tokens = None, None, {}

    def first_context(self):
        """What HTTPS serves from the start: the stored certificate, or a stand-in."""
        os.makedirs(self.folder, mode=0o700, exist_ok=True)
        os.chmod(self.folder, 0o700)
        if self.stored():
            log.info("HTTPS for %s with the certificate in %s", self.domain, self.cert_path)
            return load_certificate(self.cert_path, self.key_path)
        log.info("no certificate for %s yet: until the CA's comes, HTTPS answers with a "
                 "temporary self-signed one that no device trusts", self.domain)
        return context_from_pem(*self_signed_certificate(self.domain), self.folder)

    def stored(self):
        """(not before, not after) of the stored certificate, when it is for the domain,
        loads with its key and has not ended; else None."""
        try:
            with open(self.cert_path, encoding="ascii") as f:
                text = f.read()
            validity = certificate_validity(tbs_fields(pem_body(text, "CERTIFICATE")))
            names = certificate_facts(text)[1]
            load_certificate(self.cert_path, self.key_path)
        except (OSError, ValueError, IndexError, UnicodeDecodeError, ssl.SSLError):
            return None
        now = datetime.datetime.now(datetime.timezone.utc)
        return validity if self.domain in names and validity[1] > now else None

    def start(self, tls):
        self.tls = tls
        self.http = self.listen_http()
        threading.Thread(target=self.run, name="acme", daemon=True).start()

    def run(self):
        retry = ACME_RETRY_FIRST
        while True:
            validity = self.stored()
            if validity:
                start, end = validity
                due = start + (end - start) * ACME_RENEW_AT
                wait = (due - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
                if wait > 0:
                    log.info("the certificate for %s ends %s: renewed from %s on",
                             self.domain, end.strftime("%Y-%m-%d %H:%M:%S"),
                             due.strftime("%Y-%m-%d %H:%M:%S"))
                    time.sleep(wait)
                    continue
            try:
                self.obtain()
                retry = ACME_RETRY_FIRST
                continue
            except AcmeError as e:
                serving = ("the certificate served so far" if validity
                           else "HTTPS serves its temporary certificate")
                log.warning("no certificate from %s for %s: %s%s%s; next try in %d s, %s "
                            "meanwhile", urllib.parse.urlsplit(self.config.acme_directory).netloc,
                            self.domain, "%s: " % e.kind if e.kind else "", e,
                            " (%s)" % e.fix if e.fix else "", retry, serving)
            except Exception:
                log.exception("no certificate for %s; next try in %d s", self.domain, retry)
            time.sleep(retry)
            retry = min(retry * 2, ACME_RETRY_MAX)

    def obtain(self):
        """A new certificate from the CA, stored and swapped in; AcmeError if not."""
        client = AcmeClient(self.config.acme_directory, self.account_key(),
                            self.config.acme_email)
        client.open_account()
        kinds = ["tls-alpn-01"] + ["http-01"] * (self.http is not None)
        failures = []
        for kind in kinds:
            try:
                address, order = client.authorize(self.domain, kind,
                                                  functools.partial(self.answer, kind))
                break
            except ChallengeFailed as e:
                failures.append("%s: %s" % (kind, e))
                if kind != kinds[-1]:
                    log.info("the CA's %s check of %s failed (%s): trying the next kind",
                             kind, self.domain, e)
        else:
            raise AcmeError("; ".join(failures), fix=self.reach_fix())
        key = new_private_key()
        key_pem = pem("EC PRIVATE KEY", private_key_der(key))
        chain = client.finalize(address, order, csr_der(key, self.domain))
        try:
            context = context_from_pem(chain, key_pem, self.folder)
        except (ssl.SSLError, ValueError) as e:
            raise AcmeError("the CA's certificate does not load: %s" % e)
        write_atomically(self.key_path, key_pem.encode("ascii"), TEMP_TLS)
        write_atomically(self.cert_path, chain.encode("ascii"), TEMP_TLS)
        ends = certificate_facts(chain)[0]
        self.tls.swap(context, "from %s for %s by %s, until %s" % (
            urllib.parse.urlsplit(self.config.acme_directory).netloc, self.domain, kind,
            ends.strftime("%Y-%m-%d %H:%M:%S")))

    def reach_fix(self):
        http = ("port 80 to %d (HTTP-01)" % self.config.acme_http_port if self.http
                else "port 80 (HTTP-01, which ankisync could not listen on)")
        return ("the CA must reach this server at %s: its DNS must point at this machine's "
                "public address, and port 443 be forwarded to port %d (TLS-ALPN-01) or %s"
                % (self.domain, self.config.port, http))

    def account_key(self):
        path = tls_path(self.config, "acme-account.key")
        try:
            with open(path, encoding="ascii") as f:
                return read_private_key(f.read())
        except FileNotFoundError:
            key = new_private_key()
            write_atomically(path, pem("EC PRIVATE KEY", private_key_der(key)).encode("ascii"),
                             TEMP_TLS)
            return key
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise AcmeError("%s is unreadable (%s)" % (path, e),
                            fix="move it away: a new account is made")

    def answer(self, kind, token, key_authorization):
        """Set up (or, with token None, take down) the answer to one challenge."""
        if kind == "http-01":
            self.tokens.clear()
            if token is not None:
                self.tokens[token] = key_authorization
            return
        if token is None:
            self.tls.challenge = None
            return
        digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
        extension = der_extension(OID_ACME_IDENTIFIER, der_octets(digest), critical=True)
        context = context_from_pem(*self_signed_certificate(self.domain, [extension]),
                                   self.folder)
        context.set_alpn_protocols([ALPN_ACME])
        self.tls.challenge = context

    def listen_http(self):
        """The HTTP-01 listener on acme_http_port, or None when it cannot be had: then
        TLS-ALPN-01 alone is offered. Anything but a challenge is sent to HTTPS."""
        tokens, domain, port = self.tokens, self.domain, self.config.port

        class Answers(BaseHTTPRequestHandler):
            def do_GET(self):
                token = self.path[len(HTTP01_PATH):] if self.path.startswith(HTTP01_PATH) \
                    else None
                if token in tokens:
                    body = tokens[token].encode("ascii")
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                else:
                    body = b""
                    self.send_response(301)
                    self.send_header("Location", "https://%s%s/" % (
                        domain, "" if port == 443 else ":%d" % port))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        family = socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        listener = type("Http01Server", (ThreadingHTTPServer,),
                        {"address_family": family, "daemon_threads": True})
        try:
            server = listener((self.config.host, self.config.acme_http_port), Answers)
        except OSError as e:
            log.info("HTTP-01 not offered: cannot listen on port %d (%s; below 1024 needs "
                     "root or CAP_NET_BIND_SERVICE); TLS-ALPN-01 on port %d is",
                     self.config.acme_http_port, e.strerror or e, self.config.port)
            return None
        threading.Thread(target=server.serve_forever, name="http-01", daemon=True).start()
        return server


def ipaddress_or_none(text):
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None



# ---------------------------------------------------------------------------
# Main
#   `python3 ankisync.py COMMAND`: one command of the table above, run.
# ---------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.umask(0o077)     # auth.db, collections, media: the users' own, whatever the shell's umask
    config = Config.load(args.config)
    logging.basicConfig(level=getattr(logging, config.log_level, logging.INFO),
                        format=LOG_FORMAT)
    # The format prints neither the caller nor the thread: not worth looking up per line
    # (the logging HOWTO's "Optimization").
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    command = next(c for c in COMMANDS if c.name == args.command)
    try:
        command.run(config, args)
        sys.stdout.flush()              # a closed pipe shows here, not at exit
    except BrokenPipeError:
        # `status | head`: the reader has what it wanted. Python would complain again
        # when flushing stdout at exit, so it goes to /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0)
    except ValueError as e:
        raise SystemExit("ankisync: %s" % e)
    except (ZstdError, CorruptCollection) as e:
        raise SystemExit("ankisync: %s" % e)
    except PermissionError as e:
        raise SystemExit("ankisync: %s" % unwritable(e.filename or config.data, e))
    except OSError as e:
        raise SystemExit("ankisync: %s" % e)
    except sqlite3.OperationalError as e:
        if "readonly" in str(e) or "unable to open" in str(e):
            raise SystemExit("ankisync: %s" % unwritable(os.path.join(config.data, "auth.db"), e))
        raise SystemExit("ankisync: %s: %s" % (os.path.join(config.data, "auth.db"), e))
    except (EOFError, KeyboardInterrupt):
        raise SystemExit("ankisync: cancelled")


if __name__ == "__main__":
    main()
