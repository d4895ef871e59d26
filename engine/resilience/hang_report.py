"""Hang attribution: which rank is behind, in which group, at which collective and its sequence number.

Every rank counts the collectives it enters per group, and the p2p messages it posts per peer, in
its comm ledger (parallel/collectives.py; counters only, no host sync). The training groups may be
wedged when a hang is suspected, so the counters travel through the run directory instead: once a
rank has been silent for half the hang timeout its watchdog writes them to
RUN_DIR/hang-progress/rank{r}.json at every poll, and the watchdog that fires reads every rank's
file and compares them here.

In a group whose members entered different numbers of collectives, the members with the lowest
count are behind: they have not entered collective #lowest+1, in which the others wait (or which
they passed, when collectives are asynchronous). For p2p, a send posted that its peer has not
posted the receive of (or the reverse) puts the peer behind. A rank can be behind in one group
because it waits in another (rank 0 stuck in a TP all-reduce has not entered the DP one its DP
peer waits in), so the ranks named are those behind somewhere and waiting nowhere: the root of
the wait. When every rank waits somewhere (a cycle, a mismatched call) all the findings are named.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

PROGRESS_DIR = "hang-progress"


def write_progress(run_dir: Path, rank: int, steps_completed: int, snapshot: dict) -> None:
    """This rank's counters (`CommLedger.progress_snapshot()`), atomically, with the time written."""
    folder = Path(run_dir) / PROGRESS_DIR
    folder.mkdir(exist_ok=True)
    path = folder / f"rank{rank}.json"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"rank": rank, "pid": os.getpid(), "time": time.time(),
                               "steps_completed": steps_completed, **snapshot}))
    os.replace(tmp, path)


def read_progress(run_dir: Path, since: float) -> dict[int, dict]:
    """Every rank's counters written at or after wall time `since` (older files: a past attempt)."""
    found = {}
    for path in sorted((Path(run_dir) / PROGRESS_DIR).glob("rank*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):  # being replaced right now, or torn by a crash: skip it
            continue
        if record.get("time", 0) >= since:
            found[int(record["rank"])] = record
    return found


def _collective_findings(ranks: dict[int, dict]) -> list[dict]:
    groups: dict[tuple, dict[int, dict]] = {}
    for rank, record in ranks.items():
        for name, entry in record.get("groups", {}).items():
            groups.setdefault((name, tuple(entry["members"])), {})[rank] = entry
    findings = []
    for (name, members), entries in sorted(groups.items()):
        seqs = {r: entries[r]["seq"] if r in entries else 0 for r in members if r in ranks}
        if len(seqs) < 2 or min(seqs.values()) == max(seqs.values()):
            continue
        seq = min(seqs.values()) + 1  # the first collective the lowest members have not entered
        behind = sorted(r for r, n in seqs.items() if n < seq)
        waiting = sorted(r for r, n in seqs.items() if n >= seq)
        call = purpose = None
        for r in waiting:
            for s, c, p in entries[r]["recent"]:
                if s == seq:
                    call, purpose = c, p
        call = call or "collective"
        findings.append({"group": name, "group_ranks": list(members), "collective": call, "purpose": purpose,
                         "seq": seq, "behind": behind, "waiting": waiting,
                         "message": f"{_ranks(behind)} not entered {call} #{seq} of the {name} group "
                                    f"{list(members)}{_purpose(call, purpose)}; {_ranks(waiting, 'waits', 'wait')} in it"})
    return findings


def _p2p_findings(ranks: dict[int, dict]) -> list[dict]:
    posted: dict[tuple, int] = {}  # (group, kind, from rank, to rank) -> messages posted
    members_of: dict[str, list] = {}
    for rank, record in ranks.items():
        for name, entry in record.get("p2p", {}).items():
            members_of[name] = entry["members"]
            for kind, peer, n in entry["posted"]:
                posted[(name, kind, rank, peer)] = n
    findings = []
    for (name, kind, rank, peer), n in sorted(posted.items()):
        if kind != "send" or peer not in ranks:
            continue
        received = posted.get((name, "recv", peer, rank), 0)
        if n > received:  # the peer has not posted the receive of message #received+1
            behind, waiting, what = peer, rank, f"recv #{received + 1} from rank {rank}"
        else:
            continue
        findings.append({"group": name, "group_ranks": members_of[name], "collective": "recv", "seq": received + 1,
                         "behind": [behind], "waiting": [waiting],
                         "message": f"rank {behind} has not entered {what} (p2p) of the {name} group "
                                    f"{members_of[name]}; rank {waiting} waits in its send"})
    for (name, kind, rank, peer), n in sorted(posted.items()):
        if kind != "recv" or peer not in ranks:
            continue
        sent = posted.get((name, "send", peer, rank), 0)
        if n > sent:  # this rank waits for a message its peer has not posted
            findings.append({"group": name, "group_ranks": members_of[name], "collective": "send", "seq": sent + 1,
                             "behind": [peer], "waiting": [rank],
                             "message": f"rank {peer} has not entered send #{sent + 1} to rank {rank} (p2p) of the "
                                        f"{name} group {members_of[name]}; rank {rank} waits in its recv"})
    return findings


def attribute(ranks: dict[int, dict], world_size: Optional[int] = None) -> dict:
    """Compare every rank's counters: the rank(s) behind and where, as the `hang` event's fields
    (behind, group, group_ranks, collective, seq), a one-line `attribution` and every finding."""
    findings = _collective_findings(ranks) + _p2p_findings(ranks)
    missing = sorted(set(range(world_size)) - set(ranks)) if world_size else []
    waiting = {r for f in findings for r in f["waiting"]}
    roots = sorted({r for f in findings for r in f["behind"]} - waiting)
    primary = [f for f in findings if set(f["behind"]) & set(roots)] or findings
    result = {"behind": roots or sorted({r for f in primary for r in f["behind"]}),
              "group": None, "group_ranks": None, "collective": None, "seq": None,
              "findings": [f["message"] for f in findings], "unreported_ranks": missing}
    if primary:
        first = primary[0]
        result.update(group=first["group"], group_ranks=first["group_ranks"], collective=first["collective"],
                      seq=first["seq"], attribution="; ".join(f["message"] for f in primary))
    else:
        result["attribution"] = ("every rank that reported entered the same collectives: the hang is outside "
                                 "the collectives (or in a rank that did not report)")
    if missing:
        result["attribution"] += f"; no progress record from {_ranks(missing, 'rank', 'ranks', verb=False)}"
    return result


def report_text(result: dict, ranks: dict[int, dict], stack_dump: Optional[Path]) -> str:
    """The readable RUN_DIR/hang-report.txt: the attribution, each rank's counters, the stack files."""
    lines = ["hang attribution:", f"  {result['attribution']}", "", "all findings:"]
    lines += [f"  {m}" for m in result["findings"]] or ["  (none)"]
    lines += ["", "collectives entered per rank (group: count, last):"]
    for rank, record in sorted(ranks.items()):
        parts = [f"{name}={entry['seq']} ({entry['recent'][-1][1]})" if entry["recent"] else f"{name}={entry['seq']}"
                 for name, entry in sorted(record.get("groups", {}).items())]
        lines.append(f"  rank {rank} (after step {record.get('steps_completed')}): {', '.join(parts) or '-'}")
    folder = Path(stack_dump).parent if stack_dump else None
    if folder is not None:
        lines += ["", "stacks of every thread, per rank:"]
        lines += [f"  {p}" for p in sorted(folder.glob("hang-rank*.txt"))]
    return "\n".join(lines) + "\n"


def _ranks(ranks: list, one: str = "has", many: str = "have", verb: bool = True) -> str:
    if not verb:
        return f"{one if len(ranks) == 1 else many} {', '.join(map(str, ranks))}"
    return f"rank {ranks[0]} {one}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))} {many}"


def _purpose(call: str, purpose: Optional[str]) -> str:
    return f" ({purpose})" if purpose and purpose != call else ""
