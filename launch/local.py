"""Runs one `flaxattn.main` command as N CPU processes on this machine, joined by
`jax.distributed` over localhost: the way to exercise multi-host code without hosts.

  python launch/local.py --processes=2 --devices_per_process=4 -- \\
      --config=experiments/lm_tiny.py --workdir=/tmp/lm_tiny_2proc

Everything after `--` goes to every process unchanged; each also gets `--coordinator_address`,
`--num_processes` and `--process_id`. Output lines are prefixed with the process index. Exits
with the first non-zero exit status (after stopping the other processes), else 0.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=1,
                      help="simulated CPU devices in each process")
  parser.add_argument("main_args", nargs=argparse.REMAINDER,
                      help="-- then the flaxattn.main flags")
  args = parser.parse_args(argv)
  if args.processes < 1 or args.devices_per_process < 1:
    parser.error(f"--processes and --devices_per_process must be >= 1, got {args.processes}, "
                 f"{args.devices_per_process}")
  main_args = args.main_args[1:] if args.main_args[:1] == ["--"] else args.main_args
  address = f"127.0.0.1:{free_port()}"
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices_per_process}")
  processes = [
      subprocess.Popen([sys.executable, "-m", "flaxattn.main", *main_args,
                        f"--coordinator_address={address}", f"--num_processes={args.processes}",
                        f"--process_id={index}"],
                       env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for index in range(args.processes)]

  def stream(index, process):
    for line in process.stdout:
      sys.stdout.write(f"[{index}] {line}")

  threads = [threading.Thread(target=stream, args=item, daemon=True) for item in enumerate(processes)]
  for thread in threads:
    thread.start()
  status = 0
  for process in processes:
    code = process.wait()
    if code and not status:
      status = code
      for other in processes:
        if other.poll() is None:
          other.terminate()
  for thread in threads:
    thread.join()
  return status


if __name__ == "__main__":
  sys.exit(main())
