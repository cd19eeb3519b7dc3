"""Give concurrent local GPU jobs distinct devices: `python -m blockpruner.gpus N -- cmd ...`.

Snakemake counts a `gpu` resource (`--resources gpu=4`) but does not say which device a
job should use. This wrapper claims N free slots -- one lock file per device in a slots
folder (default `.snakemake/gpu-slots`), held with `fcntl.flock` -- sets
`CUDA_VISIBLE_DEVICES` to those devices and replaces itself with the command (`exec`), so
the locks stay held exactly as long as the command runs and the kernel releases them when
it exits, however it exits. A job that finds too few free slots waits for them (it takes
all N at once or none, so two jobs never deadlock holding half each).

- N = 0, or no GPU at all: the command runs with `CUDA_VISIBLE_DEVICES=""` (CPU).
- The devices are `--devices 0,1,...`, else `$BLOCKPRUNER_GPU_DEVICES`, else the
  `CUDA_VISIBLE_DEVICES` the wrapper was started with, else what `nvidia-smi` lists.
- Inside a SLURM job (`SLURM_JOB_ID` set) the scheduler has already assigned the devices:
    the command runs unchanged (but with no devices when N = 0).
  `BLOCKPRUNER_GPU_ALLOCATOR=off` does the same anywhere.
- The slots folder is `--slots-dir`, else `$BLOCKPRUNER_GPU_SLOTS`, else `.snakemake/gpu-slots`;
  every job sharing the machine's GPUs must use the same one.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_SLOTS = ".snakemake/gpu-slots"


def available_devices(devices: str | None = None) -> list[str]:
    """Device ids the slots stand for (see the module docstring for the order)."""
    for spec in (devices, os.environ.get("BLOCKPRUNER_GPU_DEVICES"), os.environ.get("CUDA_VISIBLE_DEVICES")):
        if spec is not None:
            return [d.strip() for d in spec.split(",") if d.strip() and d.strip() != "-1"]
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=30, check=True).stdout
        except (subprocess.SubprocessError, OSError):
            return []
        return [line.strip() for line in out.splitlines() if line.strip()]
    return []


def scheduler_assigns() -> bool:
    """True where devices are assigned by a scheduler (SLURM) or allocation is switched off."""
    mode = os.environ.get("BLOCKPRUNER_GPU_ALLOCATOR", "auto").lower()
    if mode in ("off", "0", "no", "false"):
        return True
    return mode == "auto" and "SLURM_JOB_ID" in os.environ


def try_claim(slots_dir: Path, devices: list[str], n: int) -> tuple[list[str], list[int]] | None:
    """Lock n free slots at once; returns (device ids, open lock fds) or None (nothing held)."""
    slots_dir.mkdir(parents=True, exist_ok=True)
    got, fds = [], []
    for dev in devices:
        fd = os.open(slots_dir / f"gpu{dev}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        got.append(dev)
        fds.append(fd)
        if len(got) == n:
            return got, fds
    for fd in fds:
        os.close(fd)  # closing the only descriptor releases the lock
    return None


def claim(slots_dir: Path, devices: list[str], n: int, timeout: float | None = None, poll: float = 0.5,
          log=None) -> tuple[list[str], list[int]]:
    """Wait until n slots are free and lock them (all or none)."""
    if n > len(devices):
        raise SystemExit(f"blockpruner.gpus: error: the job needs {n} GPU(s) but {len(devices)} are available "
                         f"({','.join(devices) or 'none'}); lower its gpu count or set --devices")
    start, said = time.monotonic(), False
    while True:
        got = try_claim(slots_dir, devices, n)
        if got:
            return got
        if timeout is not None and time.monotonic() - start > timeout:
            raise SystemExit(f"blockpruner.gpus: error: no {n} free GPU slot(s) in {slots_dir} after {timeout:.0f} s")
        if not said and log:
            log(f"blockpruner.gpus: waiting for {n} free GPU slot(s) of {len(devices)} in {slots_dir}")
            said = True
        time.sleep(poll)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print("usage: python -m blockpruner.gpus [--slots-dir DIR] [--devices 0,1] [--timeout S] N -- command ...",
              file=sys.stderr)
        return 2
    i = argv.index("--")
    p = argparse.ArgumentParser(prog="python -m blockpruner.gpus", description=__doc__.split("\n\n")[0])
    p.add_argument("n", type=int, help="GPUs the command needs (0 = CPU)")
    p.add_argument("--slots-dir", default=os.environ.get("BLOCKPRUNER_GPU_SLOTS") or DEFAULT_SLOTS,
                   help=f"lock-file folder (default: $BLOCKPRUNER_GPU_SLOTS or {DEFAULT_SLOTS})")
    p.add_argument("--devices", default=None, help="device ids to share out, e.g. 0,1,2,3 (default: detected)")
    p.add_argument("--timeout", type=float, default=None, help="give up after this many seconds of waiting")
    a = p.parse_args(argv[:i])
    cmd = argv[i + 1:]
    if not cmd:
        p.error("no command after --")
    if a.n < 0:
        p.error("N must be >= 0")
    env = dict(os.environ)
    if a.n == 0:
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif scheduler_assigns():
        pass  # the scheduler's CUDA_VISIBLE_DEVICES stands
    else:
        devices, fds = claim(Path(a.slots_dir), available_devices(a.devices), a.n, a.timeout,
                             log=lambda m: print(m, file=sys.stderr, flush=True))
        for fd in fds:
            os.set_inheritable(fd, True)  # held by the command through exec, released when it exits
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
        print(f"blockpruner.gpus: CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}", file=sys.stderr, flush=True)
    try:
        os.execvpe(cmd[0], cmd, env)
    except OSError as e:
        print(f"blockpruner.gpus: error: cannot run {cmd[0]!r}: {e}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main())
