"""
The README's shell examples, run as they are written against a real
daemon: what a newcomer types first must work, and print what the README
says it prints.

An example's expected output is the comment line right under a command
(C{#  ok queue created - awesome}).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from .conftest import RQ_CMD, Daemon

README = Path(__file__).resolve().parents[2] / "README.md"


def shell_blocks(section: str) -> list[str]:
    """
    The C{```sh} blocks of README section C{## <section>}.
    """
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    body = text[start : end if end >= 0 else len(text)]
    return re.findall(r"```sh\n(.*?)```", body, flags=re.S)


def expected_lines(block: str) -> list[str]:
    """
    The outputs a block promises: its comment lines that start with C{#  }
    (two spaces), without the mark.
    """
    return [line[3:] for line in block.splitlines() if line.startswith("#  ")]


def workspace(tmp_path: Path, daemon: Daemon) -> Path:
    """
    A directory laid out as the README's set-up command leaves it: the
    daemon's root as C{rqroot}, and C{.venv/bin} holding C{rq}.
    """
    work = tmp_path / "work"
    bin_dir = work / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (work / "rqroot").symlink_to(daemon.root)
    rq = bin_dir / "rq"
    rq.write_text('#!/bin/sh\nexec ' + " ".join(f"'{part}'" for part in RQ_CMD) + ' "$@"\n')
    rq.chmod(0o755)
    return work


def run_block(block: str, work: Path, daemon: Daemon) -> subprocess.CompletedProcess[str]:
    """
    Run C{block} with bash in C{work}, stopping at the first failing
    command.
    """
    env = {k: v for k, v in daemon.env.items() if k != "RQ_ROOT"}
    return subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", block],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_your_first_queue(no_daemon: Daemon, tmp_path: Path) -> None:
    """
    "Your first queue": the script is made, the queue created, a message
    sent and done, shown as JSON, and its log holds the script's output.
    """
    no_daemon.start()
    work = workspace(tmp_path, no_daemon)
    [block] = shell_blocks("Your first queue")
    result = run_block(block, work, no_daemon)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    promised = expected_lines(block)
    assert promised == ["ok queue created - awesome", "ok done - greeted world"]
    found = [line for line in lines if line in promised]
    assert found == promised, result.stdout
    assert '"dest": "hello"' in result.stdout or '"dest":"hello"' in result.stdout
    assert "hello, world" in lines
    assert any(line.endswith(" - RQ START - " + os.path.realpath(no_daemon.root / "code" / "hello.sh"))
               for line in lines), result.stdout


def test_rq_console_from_a_script(no_daemon: Daemon, tmp_path: Path) -> None:
    """
    "rq console": the heredoc example runs every line over one connection,
    with no failure.
    """
    no_daemon.start()
    work = workspace(tmp_path, no_daemon)
    [first] = shell_blocks("Your first queue")
    assert run_block(first, work, no_daemon).returncode == 0
    [block] = shell_blocks("rq console")
    # The example relies on the first one's exports.
    setup = first.splitlines()[0]
    result = run_block(setup + "\n" + block, work, no_daemon)
    assert result.returncode == 0, result.stderr
    assert "something failed" not in result.stdout
    lines = result.stdout.splitlines()
    assert len(lines) == 4 and all(line.startswith("ok ") for line in lines), result.stdout
    sent = [line.split(" ")[1] for line in lines[1:3]]
    assert all(full_id.split("/q/hello/")[1] for full_id in sent)
    for full_id in sent:
        code, out = no_daemon.rq("show", "--msg_id", full_id)
        assert code == 0
