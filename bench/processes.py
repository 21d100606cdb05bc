#!/usr/bin/env python3
"""Would serving from two processes help many users at once? Measured before choosing.

    python bench/processes.py             # 12 rounds (~1 min on 2 cores)
    python bench/processes.py --rounds 20

Eight users, each with a device holding a 1,000-note collection, add 100 notes, edit
200 and sync at the same moment (the `users8` scenario of bench.py). The same work runs
against three layouts, alternated round by round:
  one process     one ankisync server with all eight users
  two processes   two ankisync servers, four users each: what pinning each user to one
                  of two processes would give at best (no hand-over between them)
  official        the official server
Prints the median wall time for all eight syncs and the servers' CPU time (from /proc).
Run it with a Python that has the test requirements (see bench.py).
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench  # noqa: E402  (the bench's servers, collections and devices)

USERS = 8


def cpu_seconds(server):
    with open("/proc/%d/stat" % server.proc.pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--cache", default=None, help="folder of built collections (bench.py's)")
    args = parser.parse_args(argv)
    root = tempfile.mkdtemp(prefix="ankisync-processes-")
    servers = {name: bench.Server(kind, os.path.join(root, name)) for name, kind in
               (("one", "ankisync"), ("A", "ankisync"), ("B", "ankisync"),
                ("official", "official"))}
    try:
        for server in servers.values():
            server.start()
        half = USERS // 2
        layouts = {"one process": [servers["one"]] * USERS,
                   "two processes": [servers["A"]] * half + [servers["B"]] * half,
                   "official": [servers["official"]] * USERS}
        source = bench.Builder(args.cache or os.path.join(root, "cache")).get(1000)
        setups = {}
        for name, route in layouts.items():
            auths = [bench.login(route[i], i, root) for i in range(USERS)]
            devices = []
            for i in range(USERS):
                device = bench.Device(os.path.join(root, name.replace(" ", "-"), str(i)),
                                      source)
                device.full(auths[i], True)
                devices.append(device)
            setups[name] = (auths, devices)
        walls = {name: [] for name in layouts}
        cpus = {name: [] for name in layouts}
        for rnd in range(args.rounds):
            for name, route in layouts.items():
                auths, devices = setups[name]
                for i, device in enumerate(devices):
                    bench.add_and_edit(device.col, 100, 200, "r%d-%s-%d" % (rnd, name, i))
                used = set(route)
                before = sum(cpu_seconds(server) for server in used)
                walls[name].append(bench.sync_at_once(devices, auths, 600))
                cpus[name].append(sum(cpu_seconds(server) for server in used) - before)
        for name in layouts:
            print("%-14s 8 users at once: %.3f s   server CPU %.3f s   (medians of %d)"
                  % (name, statistics.median(walls[name]), statistics.median(cpus[name]),
                     args.rounds))
        for _, devices in setups.values():
            for device in devices:
                device.close()
    finally:
        for server in servers.values():
            server.kill()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
