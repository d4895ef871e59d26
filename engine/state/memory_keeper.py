"""A keeper: a process outside the training ranks that holds their state snapshots in host memory.

Each failure domain (a node; on one machine, a keeper process of its own) runs one keeper. Every
`checkpoint.memory_interval` steps each rank sends its shard's snapshot to the keeper of its own
domain and to the keeper of the next domain (engine/state/memory_snapshots.py), so the snapshot
outlives the rank (a killed process) and its whole domain (a lost node). A restart reads the
freshest step every rank can still find, which costs no disk I/O.

    python -m engine.state.memory_keeper --port P [--host 0.0.0.0]   # one per node (the launcher's job)

The keeper is told its authentication key by the environment (APOGEE_KEEPER_KEY, hex): connections
without it are refused (multiprocessing's HMAC handshake). Messages are a JSON header, then raw
bytes; nothing received is unpickled. It keeps the `KEEP` latest-sent snapshots of each (run, rank):
at most one save is in flight per rank, so the newest step every rank finished is always still held.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from typing import Optional

KEY_ENV = "APOGEE_KEEPER_KEY"
"""Environment variable holding the keepers' shared authentication key (hex)."""

KEEP = 2
"""Snapshots kept per (run, rank): the newest and the one before (a peer may still be sending the newest)."""


class KeeperError(RuntimeError):
    """A keeper could not be reached or answered with an error."""


def _send(conn: Connection, header: dict, payload: Optional[bytes] = None) -> None:
    conn.send_bytes(json.dumps(header).encode())
    if payload is not None:
        conn.send_bytes(payload)


def _receive_header(conn: Connection) -> dict:
    header = json.loads(conn.recv_bytes().decode())
    if not isinstance(header, dict):
        raise KeeperError(f"a keeper message is a {type(header).__name__}, not an object")
    return header


class Keeper:
    """The in-memory store and its request loop (one thread per connection)."""

    def __init__(self, host: str, port: int, key: bytes, exit_on_stop: bool = False):
        self.exit_on_stop = exit_on_stop  # a keeper process: a blocked accept() would outlive a closed listener
        self.listener = Listener((host, port), authkey=key)
        self.address = self.listener.address
        self.snapshots: dict[tuple[str, int], dict[int, tuple[dict, bytes]]] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def serve(self) -> None:
        """Answer requests until told to stop."""
        while not self.stopping.is_set():
            try:
                conn = self.listener.accept()
            except AuthenticationError:
                print(f"apogee keeper {self.address}: refused a connection without the key", file=sys.stderr, flush=True)
                continue
            except OSError:  # the listener was closed by `stop`, or a handshake broke off
                if self.stopping.is_set():
                    return
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: Connection) -> None:
        with conn:
            try:
                while True:
                    try:
                        header = _receive_header(conn)
                    except EOFError:
                        return
                    self._answer(conn, header)
            except (OSError, EOFError, ValueError, KeeperError) as err:
                print(f"apogee keeper {self.address}: dropped a connection: {err}", file=sys.stderr, flush=True)

    def _answer(self, conn: Connection, header: dict) -> None:
        op = header.get("op")
        if op == "put":
            payload = conn.recv_bytes()
            key, step = (str(header["run"]), int(header["rank"])), int(header["step"])
            with self.lock:  # newest by arrival: after a rewind, lower steps are the newer ones
                held = self.snapshots.setdefault(key, {})
                held.pop(step, None)
                held[step] = (header, payload)
                while len(held) > KEEP:
                    del held[next(iter(held))]
            _send(conn, {"ok": True})
        elif op == "drop_after":
            key, step = (str(header["run"]), int(header["rank"])), int(header["step"])
            with self.lock:
                held = self.snapshots.get(key, {})
                for later in [s for s in held if s > step]:
                    del held[later]
            _send(conn, {"ok": True})
        elif op == "list":
            run = str(header["run"])
            with self.lock:
                listing = {str(rank): sorted(held) for (r, rank), held in self.snapshots.items() if r == run}
            _send(conn, {"ok": True, "snapshots": listing})
        elif op == "get":
            key, step = (str(header["run"]), int(header["rank"])), int(header["step"])
            with self.lock:
                found = self.snapshots.get(key, {}).get(step)
            if found is None:
                _send(conn, {"ok": False, "error": f"no snapshot of rank {key[1]} at step {step}"})
            else:
                _send(conn, {"ok": True, "meta": found[0]}, found[1])
        elif op in ("stop", "lose_everything"):
            with self.lock:
                self.snapshots.clear()
            _send(conn, {"ok": True})
            self.stop()
            if op == "lose_everything" or self.exit_on_stop:  # a node loss takes the memory with the process
                os._exit(0)
        else:
            _send(conn, {"ok": False, "error": f"unknown operation {op!r}"})

    def stop(self) -> None:
        """Stop serving (from any thread)."""
        self.stopping.set()
        self.listener.close()


class KeeperClient:
    """One connection to one keeper, opened on first use and reopened after a failure."""

    def __init__(self, address: str, key: bytes, timeout_s: float = 30.0):
        host, _, port = address.rpartition(":")
        self.address, self.endpoint, self.key, self.timeout_s = address, (host, int(port)), key, timeout_s
        self.conn: Optional[Connection] = None

    def _request(self, header: dict, payload: Optional[bytes] = None) -> tuple[dict, Optional[bytes]]:
        try:
            if self.conn is None:
                self.conn = Client(self.endpoint, authkey=self.key)
            _send(self.conn, header, payload)
            if not self.conn.poll(self.timeout_s):
                raise TimeoutError(f"no answer within {self.timeout_s:.0f} s")
            answer = _receive_header(self.conn)
            data = self.conn.recv_bytes() if answer.get("ok") and header["op"] == "get" else None
        except (OSError, EOFError, ValueError, AuthenticationError) as err:
            self.close()
            raise KeeperError(f"keeper {self.address}: {type(err).__name__}: {err}") from err
        if not answer.get("ok"):
            raise KeeperError(f"keeper {self.address}: {answer.get('error')}")
        return answer, data

    def put(self, run: str, rank: int, step: int, meta: dict, payload: bytes) -> None:
        """Store rank `rank`'s snapshot of step `step` (replacing the oldest beyond KEEP)."""
        self._request({**meta, "op": "put", "run": run, "rank": rank, "step": step}, payload)

    def steps(self, run: str) -> dict[int, list[int]]:
        """{rank: steps held} for `run`."""
        answer, _ = self._request({"op": "list", "run": run})
        return {int(rank): list(steps) for rank, steps in answer["snapshots"].items()}

    def drop_after(self, run: str, rank: int, step: int) -> None:
        """Forget rank `rank`'s snapshots of steps after `step` (a rewind abandoned them)."""
        self._request({"op": "drop_after", "run": run, "rank": rank, "step": step})

    def get(self, run: str, rank: int, step: int) -> tuple[dict, bytes]:
        """(the header it was stored with, the snapshot's bytes)."""
        answer, data = self._request({"op": "get", "run": run, "rank": rank, "step": step})
        return answer["meta"], data

    def send_stop(self, lose_everything: bool = False) -> None:
        """Stop the keeper (lose_everything: it exits at once, as its node would)."""
        self._request({"op": "lose_everything" if lose_everything else "stop"})
        self.close()

    def close(self) -> None:
        """Drop the connection (the next request reopens it)."""
        if self.conn is not None:
            try:
                self.conn.close()
            except OSError:
                pass
            self.conn = None


def main(argv: Optional[list[str]] = None) -> None:
    """Run one keeper until it is told to stop; prints 'keeper listening on HOST:PORT' when ready."""
    parser = argparse.ArgumentParser(prog="python -m engine.state.memory_keeper", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    args = parser.parse_args(argv)
    key = os.environ.get(KEY_ENV)
    if not key:
        raise SystemExit(f"{KEY_ENV} is not set: the keeper needs the ranks' authentication key (hex)")
    keeper = Keeper(args.host, args.port, bytes.fromhex(key), exit_on_stop=True)
    host, port = keeper.address
    print(f"keeper listening on {host}:{port}", flush=True)
    keeper.serve()


if __name__ == "__main__":
    main()
