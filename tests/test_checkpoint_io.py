"""Checkpoint and output files: atomic writes, leftovers of killed saves, permissions, bad files."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from selmix import _io
from selmix.models import create_model
from selmix.models.checkpoint import (
    load_checkpoint,
    load_model,
    require_keys,
    save_checkpoint,
    save_model,
    write_json,
    write_yaml,
)

torch.set_num_threads(1)
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_save_removes_leftovers_of_killed_saves_but_not_live_ones(tmp_path: Path) -> None:
    target = tmp_path / "finetune_state.pt"
    dead = tmp_path / f".finetune_state.pt.{_io.HOSTNAME}.{_dead_pid()}.0123abcd.tmp"
    old_style = tmp_path / ".finetune_state.pt.k2j4_x9q"  # tempfile.mkstemp, selmix <= 0.1.0
    live = tmp_path / f".finetune_state.pt.{_io.HOSTNAME}.{os.getppid()}.0123abcd.tmp"
    other_host = tmp_path / f".finetune_state.pt.elsewhere.{_dead_pid()}.0123abcd.tmp"
    other_file = tmp_path / ".model.pt.k2j4_x9q"
    for path in (dead, old_style, live, other_host, other_file):
        path.write_bytes(b"half a checkpoint")
    save_checkpoint(target, {"step": 3})
    assert load_checkpoint(target) == {"step": 3}
    assert not dead.exists() and not old_style.exists()
    assert live.exists() and other_host.exists() and other_file.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == sorted(
        [live.name, other_host.name]
    )


def test_a_killed_save_leaves_the_old_file_and_the_next_save_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "state.pt"
    save_checkpoint(target, {"step": 1})
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {SRC!r})
        from selmix import _io
        real_write = os.write
        def write_then_die(handle, data):
            real_write(handle, bytes(data[:10]))
            os.kill(os.getpid(), signal.SIGKILL)
        os.write = write_then_die
        from selmix.models.checkpoint import save_checkpoint
        save_checkpoint({str(target)!r}, {{"step": 2}})
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert result.returncode == -signal.SIGKILL
    leftovers = list(tmp_path.glob(".state.pt.*"))
    assert len(leftovers) == 1
    assert load_checkpoint(target) == {"step": 1}
    save_checkpoint(target, {"step": 3})
    assert not list(tmp_path.glob(".state.pt.*"))
    assert load_checkpoint(target) == {"step": 3}


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_files_get_the_users_umask_not_0600(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        paths = [
            save_checkpoint(tmp_path / "state.pt", {"step": 1}),
            save_model(tmp_path / "model.pt", create_model("small_cnn", 3, in_channels=1)),
            write_json(tmp_path / "metrics.json", {"a": 1}),
            write_yaml(tmp_path / "config.yaml", {"a": 1}),
        ]
    finally:
        os.umask(previous)
    for path in paths:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name


def test_json_and_yaml_writes_are_atomic_and_leave_the_old_file_on_bad_data(
    tmp_path: Path,
) -> None:
    metrics, config = tmp_path / "out" / "metrics.json", tmp_path / "out" / "config.yaml"
    write_json(metrics, {"after": {"min_recall": 0.5}})
    write_yaml(config, {"lr_head": 0.003, "head_classes": [0, 1]})
    assert json.loads(metrics.read_text()) == {"after": {"min_recall": 0.5}}
    assert list(yaml.safe_load(config.read_text())) == ["lr_head", "head_classes"]
    before = metrics.read_bytes(), config.read_bytes()
    with pytest.raises(TypeError):
        write_json(metrics, {"not json": object()})
    with pytest.raises(yaml.representer.RepresenterError):
        write_yaml(config, {"not yaml": object()})
    assert (metrics.read_bytes(), config.read_bytes()) == before
    assert sorted(p.name for p in metrics.parent.iterdir()) == ["config.yaml", "metrics.json"]


def test_disk_full_during_a_save_is_one_oserror_line_and_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "model.pt"
    save_checkpoint(target, {"step": 1})
    before = target.read_bytes()

    def disk_full(handle: int, data: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", disk_full)
    with pytest.raises(OSError, match="cannot write .*model.pt.*No space left") as raised:
        save_checkpoint(target, {"step": 2, "weights": torch.zeros(1000)})
    monkeypatch.undo()
    assert raised.value.errno == errno.ENOSPC
    assert "\n" not in str(raised.value) and "inline_container" not in str(raised.value)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_a_real_write_failure_file_size_limit_is_one_line(tmp_path: Path) -> None:
    # RLIMIT_FSIZE makes the kernel refuse the write (EFBIG), like a full disk does
    script = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {SRC!r})
        import torch
        from selmix.models.checkpoint import save_checkpoint
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
        try:
            save_checkpoint({str(tmp_path / "big.pt")!r}, {{"w": torch.zeros(100_000)}})
        except OSError as error:
            print(type(error).__name__, error)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OSError [Errno 27] cannot write"), result.stdout
    assert result.stdout.count("\n") == 1
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "is empty"),
        (b"\x00\x01garbage bytes that are not a checkpoint" * 10, "corrupt or not a checkpoint"),
        (b"PK\x03\x04" + b"\x00" * 100, "corrupt or not a checkpoint"),
    ],
    ids=["empty", "garbage", "broken zip"],
)
def test_bad_checkpoint_files_are_one_line_naming_the_file(
    tmp_path: Path, content: bytes, match: str
) -> None:
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match) as raised:
        load_checkpoint(path)
    message = str(raised.value)
    assert "bad.pt" in message and "\n" not in message
    assert "weights_only" not in message and "EOFError'>" not in message


def test_a_pickled_object_checkpoint_never_gets_the_weights_only_false_advice(
    tmp_path: Path,
) -> None:
    path = tmp_path / "object.pt"
    torch.save({"model": torch.nn.Linear(2, 2)}, path)  # pickles a module: code on load
    with pytest.raises(ValueError, match="object.pt.*other than tensors") as raised:
        load_checkpoint(path)
    assert "weights_only" not in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda s: s["spec"].pop("num_classes"), "spec lacks the key\\(s\\) 'num_classes'"),
        (lambda s: s.pop("state_dict"), "lacks the key\\(s\\) 'state_dict'"),
        (lambda s: s.pop("format"), "not a selmix model file"),
        (lambda s: s["spec"].update(name="no_such_model"), "cannot build"),
    ],
    ids=["spec without num_classes", "no state_dict", "no format", "unknown model"],
)
def test_model_files_missing_keys_are_one_line(tmp_path: Path, damage, match: str) -> None:
    path = tmp_path / "model.pt"
    save_model(path, create_model("small_cnn", 3, in_channels=1))
    state = load_checkpoint(path)
    damage(state)
    torch.save(state, path)
    with pytest.raises(ValueError, match=match) as raised:
        load_model(path)
    assert "model.pt" in str(raised.value) and "\n" not in str(raised.value)


def test_require_keys_names_the_file_and_every_missing_key(tmp_path: Path) -> None:
    require_keys({"step": 1, "model": {}}, ["step", "model"], tmp_path / "s.pt")
    with pytest.raises(ValueError, match="'s.pt' is not a complete resume checkpoint: it lacks "
                       "the key\\(s\\) 'optimizer', 'rng'"):  # fmt: skip
        require_keys({"step": 1}, ["step", "optimizer", "rng"], "s.pt", "resume checkpoint")
