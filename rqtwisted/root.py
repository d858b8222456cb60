"""
The root directory: its layout, C{config/config.json}, queue configs, and
C{rq init}.

This module does not import Twisted: C{rq init} uses it from the command line.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field
from typing import Any, Mapping

from rqtwisted.fsync import read_config, sync_paths
from rqtwisted.message import JSON_READ_ERRORS, MessageError, valid_queue_name

#: The queues every root has (cli.md, C{rq-install}).
DEFAULT_QUEUES = ("relay", "webhook", "cleaner", "rq_router")

#: Schedules of the default queues: the cleaner runs daily on every queue,
#: keeping 2 days of finished messages (special-queues.md).
DEFAULT_SCHEDULES: dict[str, tuple[Mapping[str, Any], ...]] = {
    "cleaner": ({"cron": "@daily", "params": {"param1": "ALLQUEUES", "param2": "2"}},),
}

#: Built-in queues are listed after user queues, in this order.
BUILTIN_ORDER = ("cleaner", "relay", "rq_router", "webhook")

_TRUTHY = (True, "true", "yes", "1", 1)

#: Default of C{max_upload_size}: the largest request body (bytes) the web
#: accepts for an attachment upload; larger ones get 413.
DEFAULT_MAX_UPLOAD_SIZE = 4 * 1024**3


#: The highest TCP port.
MAX_PORT = 65535


def parse_port(value: Any) -> int:
    """
    A TCP port given as an integer or as decimal digits (blanks around
    them allowed): 0, meaning any free port, to L{MAX_PORT}.

    @raise ValueError: anything else (text that is not a number, a
        boolean, a number out of range).
    """
    if isinstance(value, bool):
        raise ValueError(f"not a port: {value!r}")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        number = int(value)
    else:
        raise ValueError(f"not a port: {value!r}")
    if not 0 <= number <= MAX_PORT:
        raise ValueError(f"not a port: {value!r}")
    return number


def port_error(option: str, value: Any) -> str:
    """
    Why C{value} of C{option} (e.g. C{--port}) is refused by
    L{parse_port}.
    """
    return f"{option} must be an integer from 0 to {MAX_PORT}, not {value!r}"


class ConfigError(Exception):
    """
    A configuration file is missing or invalid; C{reason} says how.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class RootConfig:
    """
    The instance configuration, C{config/config.json} (layout.md).
    """

    host: str
    port: int
    env: str = "development"
    addr: str = "127.0.0.1"
    tmpdir: str | None = None
    relative_root: str = "/"
    allow_new_queue: bool = False
    basic_auth: Mapping[str, Any] | None = None
    allowed_ips: tuple[str, ...] = ()
    max_upload_size: int = DEFAULT_MAX_UPLOAD_SIZE
    raw: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def fromDict(cls, data: Any) -> "RootConfig":
        """
        Validate a parsed C{config.json}.

        @raise ConfigError: a required key is missing or malformed.
        """
        if not isinstance(data, dict):
            raise ConfigError("config.json must hold a JSON object")
        for key in ("host", "port"):
            if key not in data:
                raise ConfigError(f"config.json is missing {key}")
        try:
            port = parse_port(data["port"])
        except ValueError:
            raise ConfigError(f"config.json has an invalid port: {data['port']!r} (0 to {MAX_PORT})")
        root = str(data.get("relative_root") or "/")
        if not root.startswith("/"):
            raise ConfigError("relative_root must start with /")
        if not root.endswith("/"):
            root += "/"
        auth = data.get("basic_auth")
        if auth is not None and not isinstance(auth, dict):
            raise ConfigError("basic_auth must be an object")
        ips = data.get("allowed_ips") or []
        if not isinstance(ips, list):
            raise ConfigError("allowed_ips must be a list")
        max_upload = data.get("max_upload_size", DEFAULT_MAX_UPLOAD_SIZE)
        if isinstance(max_upload, bool) or not isinstance(max_upload, int) or max_upload < 1:
            raise ConfigError("max_upload_size must be a positive number of bytes")
        return cls(
            host=str(data["host"]),
            port=port,
            env=str(data.get("env", "development")),
            addr=str(data.get("addr") or "127.0.0.1"),
            tmpdir=data.get("tmpdir") or None,
            relative_root=root,
            allow_new_queue=data.get("allow_new_queue") in _TRUTHY,
            basic_auth=auth,
            allowed_ips=tuple(str(ip) for ip in ips),
            max_upload_size=max_upload,
            raw=dict(data),
        )

    @property
    def base_url(self) -> str:
        """
        C{http://<host>:<port><relative_root>}: the prefix of every full id.
        """
        return f"http://{self.host}:{self.port}{self.relative_root}"


def _param_list(value: Any) -> tuple[int, ...]:
    """
    The param numbers (1-4) of a C{coalesce_params} / C{blocking_params}
    list; anything else in it (text that is no number, C{1e999} read as an
    infinity) is left out.
    """
    if not isinstance(value, list):
        return ()
    out = []
    for v in value:
        try:
            n = int(v)
        except (TypeError, ValueError, OverflowError):
            continue
        if 1 <= n <= 4 and n not in out:
            out.append(n)
    return tuple(out)


def _schedule(value: Any) -> tuple[dict[str, Any], ...]:
    """
    C{schedule} normalised to C{({"cron", "params"}, ...)}, invalid entries
    dropped (L{rqtwisted.schedule.normalize_schedule}; imported only when
    there is a schedule: it loads croniter).
    """
    if not value:
        return ()
    from rqtwisted.schedule import normalize_schedule

    return normalize_schedule(value)


@dataclass(frozen=True)
class QueueConfig:
    """
    One queue's C{config.json} (queues.md), normalised.
    """

    name: str
    script: str
    num_workers: int = 1
    exec_prefix: str | None = None
    env_vars: Mapping[str, Any] = field(default_factory=dict)
    coalesce_params: tuple[int, ...] = ()
    blocking_params: tuple[int, ...] = ()
    schedule: tuple[Mapping[str, Any], ...] = ()

    @classmethod
    def fromDict(cls, data: Any, dirname: str | None = None) -> "QueueConfig":
        """
        Validate a parsed queue config. The directory name, when given, is the
        queue's name (as the original's supervisor uses it).

        @raise ConfigError: the config cannot run a queue.
        """
        if not isinstance(data, dict):
            raise ConfigError("queue config must hold a JSON object")
        name = dirname if dirname is not None else data.get("name")
        if not valid_queue_name(name):
            raise ConfigError("queue name has invalid characters")
        script = data.get("script")
        if not isinstance(script, str) or not script:
            raise ConfigError("json config is missing script field")
        raw_workers = data.get("num_workers", 1)
        try:
            workers = int(raw_workers) if raw_workers not in (None, "") else 1
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"json config has invalid num_workers field ({raw_workers})")
        if not 1 <= workers <= 128:
            raise ConfigError("json config has invalid num_workers field (out of range 1..128)")
        prefix = data.get("exec_prefix")
        if prefix is not None and not isinstance(prefix, str):
            raise ConfigError("exec_prefix must be a string")
        env_vars = data.get("env_vars")
        if not isinstance(env_vars, dict):
            env_vars = {}
        coalesce = _param_list(data.get("coalesce_params"))
        if not coalesce and data.get("coalesce") in _TRUTHY:
            coalesce = tuple(n for n in range(1, 5) if data.get(f"coalesce_param{n}") in _TRUTHY)
        schedule = data.get("schedule")
        return cls(
            name=str(name),
            script=script,
            num_workers=workers,
            exec_prefix=prefix,
            env_vars={str(k): v for k, v in env_vars.items()},
            coalesce_params=coalesce,
            blocking_params=_param_list(data.get("blocking_params")),
            schedule=_schedule(schedule),
        )

    def toDict(self) -> dict[str, Any]:
        """
        The normalised form C{create_queue} writes (queues.md).
        """
        return {
            "name": self.name,
            "script": self.script,
            "num_workers": self.num_workers,
            "exec_prefix": self.exec_prefix,
            "env_vars": dict(self.env_vars),
            "coalesce_params": list(self.coalesce_params),
            "blocking_params": list(self.blocking_params),
            "schedule": [dict(s) for s in self.schedule],
        }


class Root:
    """
    The paths of one RQ root.
    """

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)

    def join(self, *parts: str) -> str:
        """
        A path below the root.
        """
        return os.path.join(self.path, *parts)

    @property
    def config_path(self) -> str:
        """
        C{config/config.json}.
        """
        return self.join("config", "config.json")

    @property
    def queue_dir(self) -> str:
        """
        C{queue/}: one sub-directory per queue.
        """
        return self.join("queue")

    def queue_path(self, name: str) -> str:
        """
        The directory of queue C{name}.
        """
        return os.path.join(self.queue_dir, name)

    def marker(self, name: str, kind: str) -> str:
        """
        The admin marker file C{config/<name>.<kind>} (C{down} or C{pause}).
        """
        return self.join("config", f"{name}.{kind}")

    def load_config(self, overrides: Mapping[str, Any] | None = None) -> RootConfig:
        """
        Read and validate C{config/config.json}, then apply C{overrides}
        (the daemon's command line, the port its web server got), which
        outrank it.

        @raise ConfigError: missing, unreadable or invalid (with or without
            the overrides).
        """
        try:
            data = json.loads(read_config(self.config_path))
        except JSON_READ_ERRORS as e:
            raise ConfigError(f"cannot read {self.config_path}: {e}")
        config = RootConfig.fromDict(data)
        if overrides:
            config = RootConfig.fromDict({**config.raw, **overrides})
        return config

    def queue_names(self) -> list[str]:
        """
        Names of the queue directories that qualify to run: a valid name
        and a readable C{config.json}.
        """
        try:
            entries = sorted(os.listdir(self.queue_dir))
        except FileNotFoundError:
            return []
        return [
            e
            for e in entries
            if valid_queue_name(e) and os.path.isfile(os.path.join(self.queue_dir, e, "config.json"))
        ]

    def load_queue_config(self, name: str) -> QueueConfig:
        """
        Read and validate C{queue/<name>/config.json}.

        @raise ConfigError: missing, unreadable or invalid.
        """
        path = os.path.join(self.queue_path(name), "config.json")
        try:
            # (Never waiting on a FIFO put there, nor reading a huge file:
            # see read_config.)
            data = json.loads(read_config(path))
        except JSON_READ_ERRORS as e:
            raise ConfigError(f"could not read queue config [ {path} ]: {e}")
        return QueueConfig.fromDict(data, dirname=name)


def default_host() -> str:
    """
    The host name the installer writes: the FQDN, else C{localhost}.
    """
    try:
        name = socket.getfqdn()
    except OSError:
        name = ""
    return name or "localhost"


#: The placeholder script of the built-in queues: its first two lines mark it
#: (rqtwisted.builtin runs the queue in-process while they are there); run
#: without a built-in handler, it leaves the message in err with a clear
#: status.
_BUILTIN_STUB = """#!/bin/sh
# Queue script of the built-in queue '{name}'.
# While this file starts with the two lines above, the daemon runs this
# queue's messages itself (rqtwisted.builtin); a script of your own put here
# runs instead. This one only runs when the daemon has no handler for it.
echo "err the {name} queue does not deliver messages in this release" >&3
exit 0
"""


def json_file(data: Any) -> bytes:
    """
    The content of a JSON file of the root (C{config.json}s): C{data} as
    JSON on one line.
    """
    return (json.dumps(data) + "\n").encode("utf-8")


def write_json(path: str, data: Any) -> None:
    """
    Write C{data} as JSON to C{path} atomically (temp file, fsync, rename),
    blocking: for C{rq init}, before any reactor runs (the daemon writes
    with L{rqtwisted.durable.replace_durably}).
    """
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(json_file(data))
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


#: The state directories a new queue directory is made with.
QUEUE_STATE_DIRS = ("prep", "que", "run", "done", "relayed", "err", "tmp")


def make_dirs(path: str) -> list[str]:
    """
    C{mkdir -p}: make C{path} and its missing parents.

    @return: the directories whose entries changed (the parent of each
        directory made), to sync for the new ones to last.
    """
    missing = []
    p = os.path.abspath(path)
    while not os.path.isdir(p):
        missing.append(p)
        p = os.path.dirname(p)
    changed = []
    for d in reversed(missing):
        try:
            os.mkdir(d)
        except FileExistsError:
            if not os.path.isdir(d):
                raise
            continue
        changed.append(os.path.dirname(d))
    return changed


def make_queue_state_dirs(path: str) -> list[str]:
    """
    Make the queue directory C{path} and its state directories (those
    missing).

    @return: the directories whose entries changed (L{make_dirs}).
    """
    changed = make_dirs(path)
    for state in QUEUE_STATE_DIRS:
        changed.extend(make_dirs(os.path.join(path, state)))
    return list(dict.fromkeys(changed))


def create_queue_dir(root: Root, config: QueueConfig) -> list[str]:
    """
    Create C{queue/<name>/} with its state directories and C{config.json}
    (written to a temp file, fsynced, renamed), blocking: for C{rq init}
    (the daemon's L{rqtwisted.supervisor.Instance.create_queue} syncs off
    the reactor thread).

    @return: the directories whose entries changed: the queue is there to
        stay once they are synced.
    @raise MessageError: the queue exists already.
    """
    path = root.queue_path(config.name)
    if os.path.exists(os.path.join(path, "config.json")):
        raise MessageError("already created")
    changed = make_queue_state_dirs(path)
    write_json(os.path.join(path, "config.json"), config.toDict())
    return list(dict.fromkeys([*changed, path]))


def init_root(
    path: str,
    *,
    force: bool = False,
    host: str | None = None,
    port: int | str | None = None,
    env: str | None = None,
    addr: str | None = None,
    tmpdir: str | None = None,
    allow_new_queue: bool = True,
) -> Root:
    """
    Lay out a root the way C{rq-install} does: C{config/config.json} on one
    line, C{queue.noindex/} behind a C{queue} symlink, C{log/}, C{code/} and
    the default queues. An existing config is kept unless C{force}. Returns
    once all of it is on disk (every file written and every directory whose
    entries changed fsynced).

    The options are checked before anything is created: a refused one
    leaves no half-made root behind.

    @raise ConfigError: C{Already installed} (config present, no C{force}),
        or an invalid C{port} (L{parse_port}).
    """
    root = Root(path)
    exists = os.path.exists(root.config_path)
    if exists and not force:
        raise ConfigError("Already installed")
    try:
        port_number = parse_port(port) if port is not None else 3333
    except ValueError:
        raise ConfigError(port_error("--port", port))
    # The root itself and config/ (which the daemon may have made before
    # calling this) are synced whatever was made here.
    changed = [*make_dirs(root.path), root.path, root.join("config")]
    for sub in ("config", "log", "code", "scandir", "timers"):
        changed.extend(make_dirs(root.join(sub)))
    if not os.path.lexists(root.queue_dir):
        changed.extend(make_dirs(root.join("queue.noindex")))
        os.symlink("queue.noindex", root.queue_dir)
    config = {
        "env": env or "development",
        "host": host or default_host(),
        "port": port_number,
        "addr": addr or "127.0.0.1",
        "tmpdir": tmpdir or root.join("tmp"),
        "allow_new_queue": allow_new_queue,
    }
    changed.extend(make_dirs(config["tmpdir"]))
    write_json(root.config_path, config)
    for name in DEFAULT_QUEUES:
        script = root.join("code", f"{name}_script")
        if not os.path.exists(script):
            with open(script, "w", encoding="utf-8") as f:
                f.write(_BUILTIN_STUB.format(name=name))
            os.chmod(script, 0o755)
            changed.extend([script, root.join("code")])
        if not os.path.exists(os.path.join(root.queue_path(name), "config.json")):
            changed.extend(
                create_queue_dir(
                    root,
                    QueueConfig(
                        name=name,
                        script=f"./code/{name}_script",
                        exec_prefix="",
                        schedule=DEFAULT_SCHEDULES.get(name, ()),
                    ),
                )
            )
    sync_paths(dict.fromkeys(changed))
    return root


def ensure_root(path: str, **options: Any) -> Root:
    """
    Use an existing root as it is; lay out an empty or missing one.
    """
    root = Root(path)
    if not os.path.exists(root.config_path):
        init_root(path, **options)
    return root


def queue_sort_key(name: str) -> tuple[int, str]:
    """
    User queues by name, then the built-ins in their fixed order.
    """
    if name in BUILTIN_ORDER:
        return (1, str(BUILTIN_ORDER.index(name)))
    return (0, name)
