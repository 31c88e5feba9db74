#!/usr/bin/env python3
"""CPU time by process group while a `credit-worker bench` run's worker process is alive.

Usage: scripts/cpu-share.py target/release/credit-worker bench --messages 100000 --users 1000

Runs the command, samples /proc every 250 ms, and prints, for the window in which the bench's
`credit-worker run` process existed, the CPU seconds (user + system) spent by RabbitMQ
(beam.smp), PostgreSQL (every postgres process), the worker and the bench, beside the
window's length and the CPU seconds the machine had. Linux only; the services must run on the
same machine. Divide by the messages of the run for CPU time per message.
"""
import os
import subprocess
import sys
import time


def snapshot(exe):
    procs = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/cmdline") as f:
                cmd = f.read().replace("\0", " ")
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        procs[int(pid)] = (group(comm, cmd, exe), int(fields[11]) + int(fields[12]))
    return procs


def group(comm, cmd, exe):
    if "beam" in comm:
        return "rabbitmq"
    if comm == "postgres":
        return "postgres"
    args = cmd.split()
    if not args or os.path.basename(args[0]) != exe:
        return None
    if "run" in args[1:2]:
        return "worker"
    if "bench" in args[1:]:
        return "bench"
    return None


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    hz = os.sysconf("SC_CLK_TCK")
    exe = os.path.basename(sys.argv[1])
    run = subprocess.Popen(sys.argv[1:])
    samples = []
    while run.poll() is None:
        samples.append((time.monotonic(), snapshot(exe)))
        time.sleep(0.25)
    alive = [s for s in samples if any(g == "worker" for g, _ in s[1].values())]
    if not alive:
        sys.exit("no `credit-worker run` process was seen")
    (t0, first), (t1, last) = alive[0], alive[-1]
    cpu = {}
    for pid, (g, ticks) in last.items():
        if g:
            before = first[pid][1] if pid in first else 0
            cpu[g] = cpu.get(g, 0) + ticks - before
    window = t1 - t0
    print(f"worker window {window:.2f} s, {os.cpu_count() * window:.2f} CPU s available")
    for g in ("rabbitmq", "postgres", "worker", "bench"):
        print(f"{g:10s} {cpu.get(g, 0) / hz:8.2f} CPU s")
    sys.exit(run.returncode)


if __name__ == "__main__":
    main()
