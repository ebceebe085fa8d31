"""Slurm, the cluster side: ``sbatch``, ``squeue``, ``sacct``, ``scancel`` and the job logs,
run on this machine or on a login node over SSH (the user's own ssh configuration and keys).
The only module of the Slurm launcher that runs a command.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from taskcodec.errors import ConfigError, TaskcodecError

#: Marks the jobs slurm-launch submits (``--comment``); followed by JSON: run ids and UI link.
COMMENT_PREFIX = "taskcodec "
JOB_ID = re.compile(r"^\d+(?:_\d+)?$")
_WAITING = ("PENDING", "REQUEUED", "REQUEUE_HOLD", "SUSPENDED")  # no run time, no node (yet)
_ACTIVE = "PENDING,RUNNING,SUSPENDED,COMPLETING,CONFIGURING,REQUEUED,RESIZING,SIGNALING,STAGE_OUT"
_HOST = re.compile(r"^[A-Za-z0-9_.@\[\]:%-]+$")


class SlurmError(TaskcodecError):
    """A Slurm command failed or could not be run (names the command and its message)."""


@dataclass
class JobInfo:
    """One array task (or a pending range of tasks) as ``slurm-status`` shows it."""

    job_id: str            # "123_4" (or "123_[5-9]" for tasks not started yet)
    name: str
    state: str
    elapsed: str
    where: str             # node list, or the reason it waits
    run_id: str = ""
    link: str = ""
    stdout: str = ""


class Cluster:
    """Runs Slurm commands on this machine or, with ``host``, over SSH (the user's own ssh
    configuration and keys; ``ssh_options`` are added before the host)."""

    def __init__(self, host: str = "", ssh_options: Sequence[str] = (), timeout: float = 60) -> None:
        if host and (host.startswith("-") or not _HOST.match(host)):
            raise ConfigError(f"--host {host!r} is not an SSH host name")
        self.host = host
        self.ssh_options = list(ssh_options)
        self.timeout = timeout

    def argv(self, command: Sequence[str], env: Mapping[str, str] | None = None) -> list[str]:
        """The local argv that runs ``command`` (with ``env`` added) here or on the host."""
        if not self.host:
            return list(command)
        prefix = ["env", *(f"{k}={v}" for k, v in (env or {}).items())] if env else []
        return ["ssh", *self.ssh_options, "--", self.host, shlex.join([*prefix, *command])]

    def run(self, command: Sequence[str], *, input: str | None = None,
            env: Mapping[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
        local_env = {**os.environ, **(env or {})} if not self.host else None
        try:
            done = subprocess.run(self.argv(command, env), input=input, capture_output=True,
                                  text=True, env=local_env, timeout=self.timeout,
                                  stdin=None if input is not None else subprocess.DEVNULL)
        except FileNotFoundError:
            where = "ssh" if self.host else command[0]
            raise SlurmError(f"{where} not found: is Slurm installed here (or use --host LOGIN)?") \
                from None
        except subprocess.TimeoutExpired:
            raise SlurmError(f"{command[0]} did not answer within {self.timeout:.0f} s"
                             f"{' on ' + self.host if self.host else ''}") from None
        if check and done.returncode != 0:
            message = (done.stderr.strip() or done.stdout.strip()).splitlines()
            where = f" on {self.host}" if self.host else ""
            raise SlurmError(f"{command[0]}{where} failed (exit {done.returncode}): "
                             f"{message[-1] if message else 'no message'}")
        return done

    # -- submit ---------------------------------------------------------------------------------
    def mkdir(self, path: str) -> None:
        self.run(["mkdir", "-p", "--", path])

    def write_private(self, path: str, text: str) -> str:
        """Write a file readable by the user only (mode 0600); returns its absolute path.
        A relative ``path`` is taken from the user's home (here or on the host)."""
        script = ('cd && umask 077 && mkdir -p "$(dirname "$1")" && cat > "$1" && chmod 600 "$1" '
                  '&& readlink -f "$1"')
        return self.run(["sh", "-c", script, "sh", path], input=text).stdout.strip()

    def submit(self, script: str, *, env: Mapping[str, str], comment: str = "") -> str:
        """``sbatch --parsable`` with the script on stdin; returns the job id."""
        command = ["sbatch", "--parsable"] + ([f"--comment={comment}"] if comment else [])
        done = self.run(command, input=script, env=env)
        job_id = done.stdout.strip().split(";")[0]
        if not JOB_ID.match(job_id):
            raise SlurmError(f"sbatch printed no job id: {done.stdout.strip()!r}")
        return job_id

    # -- watch ----------------------------------------------------------------------------------
    def jobs(self, *, all_users: bool = False, all_jobs: bool = False) -> list[JobInfo]:
        """The user's taskcodec jobs from ``squeue --json`` (``all_jobs``: not only taskcodec's)."""
        command = ["squeue", "--json"] + ([] if all_users else ["--me"])
        data = json.loads(self.run(command).stdout or "{}")
        return parse_squeue(data, all_jobs=all_jobs)

    def unfinished(self, job_id: str) -> bool:
        """True while the job (any task of an array ``123``, or task ``123_4``) is queued or
        running; False once it has ended, or when Slurm no longer knows it."""
        _check_job_id(job_id)
        done = self.run(["squeue", "--noheader", "--jobs", job_id, "--states", _ACTIVE,
                         "--format", "%i"], check=False)
        return done.returncode == 0 and bool(done.stdout.strip())

    def cancel(self, job_ids: Sequence[str]) -> list[str]:
        """``scancel`` the jobs that are still queued or running; returns the others, which
        had already finished (nothing to cancel)."""
        for job_id in job_ids:
            _check_job_id(job_id)
        active = [job_id for job_id in job_ids if self.unfinished(job_id)]
        if active:
            self.run(["scancel", *active])
        return [job_id for job_id in job_ids if job_id not in active]

    def log_files(self, job_id: str, output_dir: str = "") -> list[str]:
        """The output files of a job (all its array tasks) or of one task (``123_4``)."""
        _check_job_id(job_id)
        files = []
        shown = self.run(["scontrol", "show", "job", "-o", job_id], check=False)
        if shown.returncode == 0:
            for line in shown.stdout.splitlines():
                m = re.search(r"\bStdOut=(.*?)(?= \w+=|$)", line)
                if m and m.group(1) not in files:
                    files.append(m.group(1))
        if not files and output_dir:  # finished long ago: look for %x-%A_%a.out by name
            array_id, _, task = job_id.partition("_")
            pattern = f"*-{array_id}_{task or '*'}.out"
            found = self.run(["sh", "-c", 'cd "$1" 2>/dev/null && ls -1 -- $2', "sh",
                              output_dir, pattern], check=False)
            files = [f"{output_dir.rstrip('/')}/{name}" for name in found.stdout.split("\n") if name]
        return sorted(files, key=_task_order)

    def read(self, path: str) -> str:
        done = self.run(["cat", "--", path], check=False)
        if done.returncode != 0:
            raise SlurmError(f"cannot read {path}{' on ' + self.host if self.host else ''}: "
                             f"{done.stderr.strip() or 'no such file'}")
        return done.stdout

    def follow_argv(self, paths: Sequence[str]) -> list[str]:
        """The argv that prints the files and follows them as they grow (Ctrl-C stops)."""
        return self.argv(["tail", "-n", "+1", "-F", "--", *paths])


def _check_job_id(job_id: str) -> None:
    if not JOB_ID.match(job_id):
        raise ConfigError(f"{job_id!r} is not a Slurm job id (123 or 123_4)")


def _task_order(path: str) -> tuple[int, str]:
    m = re.search(r"_(\d+)\.out$", path)
    return (int(m.group(1)) if m else -1, path)


def _number(value: Any) -> int | None:
    """squeue --json numbers are plain in Slurm 22.05 and {"set", "number"} objects later."""
    if isinstance(value, dict):
        return value.get("number") if value.get("set", True) else None
    return value if isinstance(value, int) else None


def _duration(seconds: int) -> str:
    days, rest = divmod(max(seconds, 0), 86400)
    hours, rest = divmod(rest, 3600)
    text = f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"
    return f"{days}-{text}" if days else text


def parse_comment(comment: str) -> dict[str, Any]:
    """The JSON that slurm-launch put after ``taskcodec `` in the job's comment ({} otherwise)."""
    if not comment.startswith(COMMENT_PREFIX):
        return {}
    try:
        value = json.loads(comment[len(COMMENT_PREFIX):])
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def make_comment(run_ids: Sequence[str], links: Sequence[str]) -> str:
    return COMMENT_PREFIX + json.dumps({"runs": list(run_ids), "links": list(links)},
                                       separators=(",", ":"))


def parse_squeue(data: Mapping[str, Any], *, all_jobs: bool = False,
                 now: float | None = None) -> list[JobInfo]:
    """``squeue --json`` output -> one :class:`JobInfo` per array task (pure)."""
    now = time.time() if now is None else now
    rows = []
    for job in data.get("jobs", []):
        comment = job.get("comment") or ""
        meta = parse_comment(comment)
        if not meta and not all_jobs:
            continue
        state = job.get("job_state") or ""
        state = state[0] if isinstance(state, list) and state else str(state)
        task = _number(job.get("array_task_id"))
        array_id = _number(job.get("array_job_id")) or 0
        pending = _expand_tasks(job.get("array_task_string") or "")
        if task is None and array_id and pending:
            # Tasks not yet started are one squeue record ("12_[0-3]"): list each with its run.
            for index in pending:
                rows += parse_squeue({"jobs": [{**job, "array_task_id": index,
                                                "array_task_string": ""}]},
                                     all_jobs=all_jobs, now=now)
            continue
        if task is not None and array_id:
            job_id = f"{array_id}_{task}"
        elif job.get("array_task_string"):
            job_id = f"{array_id or job.get('job_id')}_[{job['array_task_string']}]"
        else:
            job_id = str(job.get("job_id"))
        start = _number(job.get("start_time")) or 0
        end = _number(job.get("end_time")) or 0
        if state in ("RUNNING", "COMPLETING") and start:
            elapsed = _duration(int(now - start))
        elif state not in _WAITING and start and end >= start:  # finished: its run time
            elapsed = _duration(end - start)
        else:
            elapsed = "-"
        where = job.get("nodes") or "" if state not in _WAITING else ""
        if not where:
            reason = job.get("state_reason") or ""
            where = f"({reason})" if reason and reason != "None" else ""
        runs, links = meta.get("runs") or [], meta.get("links") or []
        run_id = runs[task] if task is not None and task < len(runs) else ""
        link = links[task] if task is not None and task < len(links) else ""
        rows.append(JobInfo(job_id=job_id, name=job.get("name") or "", state=state,
                            elapsed=elapsed, where=where, run_id=run_id, link=link,
                            stdout=job.get("standard_output") or ""))
    return sorted(rows, key=lambda r: _job_sort_key(r.job_id))


def _expand_tasks(text: str) -> list[int] | None:
    """Slurm's array task string ("0-3", "0,2,5-7", "0-9:2%4") as task ids; None if unknown."""
    text = text.split("%", 1)[0].strip()
    if not text:
        return None
    tasks: list[int] = []
    for part in text.split(","):
        span, _, step = part.partition(":")
        first, _, last = span.partition("-")
        if not first.isdigit() or (last and not last.isdigit()) or (step and not step.isdigit()):
            return None
        tasks += range(int(first), int(last or first) + 1, int(step or 1))
    return tasks if len(tasks) <= 10_000 else None


def _job_sort_key(job_id: str) -> tuple[int, int]:
    array_id, _, task = job_id.partition("_")
    return (int(array_id) if array_id.isdigit() else 0,
            int(task) if task.isdigit() else 1 << 30)


def format_jobs(rows: Sequence[JobInfo], links: bool = True) -> str:
    """A plain table: JOB, NAME, STATE, ELAPSED, NODES/REASON, MLFLOW RUN (and its link)."""
    header = ["JOB", "NAME", "STATE", "ELAPSED", "NODES/REASON", "MLFLOW RUN"]
    table = [[r.job_id, r.name, r.state, r.elapsed, r.where,
              (r.link or r.run_id or "-") if links else (r.run_id or "-")] for r in rows]
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                     for row in [header, *table])
