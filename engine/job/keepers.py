"""The local launcher's keeper processes (engine/state/memory_keeper.py), one per failure domain.

On one machine the failure domains are simulated: `domains` keepers (2 when there are 2 ranks or
more), ranks split between them as nodes would hold them. They are started before the ranks and
outlive every restart of the ranks; before each attempt a keeper that died (a rehearsed node loss)
is started again, empty, as a replacement node's would be. The ranks find them through
APOGEE_KEEPERS and APOGEE_KEEPER_KEY, set in this process's environment, which the agent's
workers inherit.
"""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Optional

from engine.state.memory_keeper import KEY_ENV, KeeperClient, KeeperError
from engine.state.memory_snapshots import KEEPERS_ENV

_ROOT = Path(__file__).resolve().parents[2]


class KeeperPool:
    """Keeper processes on this machine; a context manager that stops them and restores the environment."""

    def __init__(self, domains: int):
        self.domains = domains
        self.key = secrets.token_hex(16)
        self.processes: list[Optional[subprocess.Popen]] = [None] * domains
        self.addresses: list[str] = [""] * domains
        self._saved_env = {name: os.environ.get(name) for name in (KEEPERS_ENV, KEY_ENV)}

    @classmethod
    def for_run(cls, memory_interval: int, world_size: int) -> Optional["KeeperPool"]:
        """The keepers a run needs: None without memory snapshots (or when the environment already names keepers)."""
        if not memory_interval or os.environ.get(KEEPERS_ENV):
            return None
        return cls(2 if world_size >= 2 else 1)

    def _start(self, index: int) -> None:
        env = {**os.environ, KEY_ENV: self.key, "PYTHONPATH": str(_ROOT)}
        process = subprocess.Popen([sys.executable, "-m", "engine.state.memory_keeper", "--port", "0"], env=env,
                                   stdout=subprocess.PIPE, text=True, cwd=_ROOT)
        line = process.stdout.readline().strip()
        if not line.startswith("keeper listening on "):
            process.kill()
            raise RuntimeError(f"a memory keeper did not start (it printed {line!r})")
        self.processes[index], self.addresses[index] = process, line.rsplit(" ", 1)[1]

    def ensure_alive(self, attempt: int = 0) -> None:
        """Start every keeper that is not running (all of them the first time); publish their addresses."""
        for index, process in enumerate(self.processes):
            if process is None or process.poll() is not None:
                if process is not None:
                    print(f"apogee: memory keeper {index} ({self.addresses[index]}) is gone: starting an empty one",
                          file=sys.stderr, flush=True)
                self._start(index)
        os.environ[KEEPERS_ENV] = ",".join(self.addresses)
        os.environ[KEY_ENV] = self.key

    def __enter__(self) -> "KeeperPool":
        self.ensure_alive()
        return self

    def __exit__(self, *exc) -> None:
        for index, process in enumerate(self.processes):
            if process is None or process.poll() is not None:
                continue
            try:
                KeeperClient(self.addresses[index], bytes.fromhex(self.key), timeout_s=5).send_stop()
                process.wait(timeout=10)
            except (KeeperError, subprocess.TimeoutExpired):
                process.kill()
                process.wait()
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
