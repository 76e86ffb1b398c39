"""`res2net.fileio`: the one module that creates, replaces and deletes files, and its rules."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from res2net import fileio
from res2net.errors import FileRefused

SRC = Path(__file__).resolve().parent.parent / "src" / "res2net"

# Raw ways to create, replace or delete a file; outside fileio.py each needs an entry below.
MODE = r"""(mode=)?["'][rbt]*[wxa+][rwxabt+]*["']"""
RAW_WRITERS = re.compile(
    rf"(?<![\w.])open\([^)]*,\s*{MODE}|\.open\(\s*{MODE}|(?<!fileio)\.write_(text|bytes)\("
    r"|savefig\(|torch\.save\(|save_file\(|\.unlink\(|rmtree|os\.replace\(|\.rename\("
    r"|os\.link\(|os\.symlink\(|SummaryWriter\(|\.mkdir\(|os\.open\(|shutil\.(copy|move)"
    r"|mkdtemp|TemporaryDirectory\(|mkstemp|\.save\([^)]*(/|path|str\()"
)
# (file, text on the line): why it is not a write the project must route through fileio
ALLOWED = {
    ("engine/report.py", "fig.savefig(buffer"): "into memory",
    ("engine/progress.py", "lambda f: fig.savefig(f"): "inside fileio.atomic_write",
    ("cam.py", "lambda f: fig.savefig(f"): "inside fileio.atomic_write",
    (
        "engine/progress.py",
        "SummaryWriter(str(board))",
    ): "board: a new folder, fileio.new_directory",
    ("engine/checkpoint.py", "lambda f: torch.save("): "inside fileio.atomic_write",
    ("saliency/engine.py", "lambda f: torch.save("): "inside fileio.atomic_write",
    ("weights/convert.py", "lambda f: torch.save("): "inside fileio.atomic_write",
    ("guards.py", "os.open(path, os.O_RDONLY"): "reading",
    ("data/demo.py", 'im.save(folder / f"{i:04d}.png")'): "inside fileio.private_directory",
}


def test_the_raw_writer_patterns_catch_writes():
    for line in [
        'with open(path, "w") as f:',
        "open(p, mode='ab')",
        'path.open("wb")',
        "path.write_text(text)",
        "path.unlink(missing_ok=True)",
        "os.replace(tmp, path)",
        "fig.savefig(path)",
        "im.save(folder / name)",
    ]:
        assert RAW_WRITERS.search(line), line
    for line in ['open(path, "rb")', 'path.open("rb")', "fileio.write_text(p, t)", "urlopen(u)"]:
        assert not RAW_WRITERS.search(line), line


def test_no_file_is_written_outside_fileio():
    """By construction: every create, replace and delete in src/ goes through fileio."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel == "fileio.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if not RAW_WRITERS.search(code):
                continue
            if not any(rel == f and text in code for f, text in ALLOWED):
                found.append(f"{rel}:{number}: {line.strip()}")
    assert not found, "write through res2net.fileio:\n" + "\n".join(found)


@pytest.fixture()
def outside(tmp_path) -> Path:
    path = tmp_path / "outside.txt"
    path.write_text("keep me")
    return path


def plant(kind: str, path: Path, outside: Path) -> None:
    """Put a symlink, a named pipe, a folder or a hard link at `path`."""
    if kind == "symlink":
        path.symlink_to(outside)
    elif kind == "dangling":
        path.symlink_to(outside.parent / "nothing-there")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "dir":
        path.mkdir()
    elif kind == "hardlink":
        os.link(outside, path)


KINDS = ["symlink", "dangling", "fifo", "dir"]


@pytest.mark.parametrize("kind", KINDS)
def test_atomic_write_refuses_what_is_not_a_regular_file(tmp_path, outside, kind):
    target = tmp_path / "run" / "file"
    target.parent.mkdir()
    plant(kind, target, outside)
    with pytest.raises(FileRefused, match=re.escape(str(target))) as info:
        fileio.write_bytes(target, b"new")
    assert "\n" not in str(info.value)
    assert outside.read_text() == "keep me"
    assert not (outside.parent / "nothing-there").exists()
    assert [p.name for p in target.parent.iterdir()] == ["file"]  # no temporary file left


def test_atomic_write_replaces_a_hard_link_by_a_new_file(tmp_path, outside):
    target = tmp_path / "file"
    os.link(outside, target)
    fileio.write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and outside.read_text() == "keep me"


@pytest.mark.parametrize("kind", [*KINDS, "hardlink"])
def test_in_place_writes_refuse_links_pipes_folders_and_hard_links(tmp_path, outside, kind):
    target = tmp_path / "metrics.jsonl"
    plant(kind, target, outside)
    with pytest.raises(FileRefused, match=re.escape(str(target))):
        fileio.open_append(target)
    with pytest.raises(FileRefused, match=re.escape(str(target))):
        fileio.open_lock(target)
    assert outside.read_text() == "keep me"


def test_append_creates_and_appends(tmp_path):
    with fileio.open_append(tmp_path / "log") as f:
        f.write("a\n")
    with fileio.open_append(tmp_path / "log") as f:
        f.write("b\n")
    assert (tmp_path / "log").read_text() == "a\nb\n"


@pytest.mark.parametrize("kind", KINDS)
def test_atomic_link_and_replacing_refuse_links(tmp_path, outside, kind):
    source = tmp_path / "source"
    source.write_bytes(b"data")
    for n, use in enumerate(
        [lambda p: fileio.atomic_link(source, p), lambda p: fileio.replacing(p).__enter__()]
    ):
        target = tmp_path / f"target{n}"
        plant(kind, target, outside)
        with pytest.raises(FileRefused, match=re.escape(str(target))):
            use(target)
    assert outside.read_text() == "keep me"


def test_remove_deletes_only_regular_files(tmp_path, outside):
    link = tmp_path / "link"
    link.symlink_to(outside)
    (tmp_path / "dir").mkdir()
    assert not fileio.remove(link) and not fileio.remove(tmp_path / "dir")
    assert not fileio.remove(tmp_path / "missing")
    (tmp_path / "f").write_text("x")
    assert fileio.remove(tmp_path / "f") and not (tmp_path / "f").exists()
    assert link.is_symlink() and outside.read_text() == "keep me"


def test_move_aside_keeps_everything(tmp_path, outside):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"ckpt")
    (run / "training.png").symlink_to(outside)
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events").write_bytes(b"e")
    (run / ".res2net.lock").write_text("held")
    aside = fileio.move_aside(run, ["last.pt", "training.png", "tensorboard", "missing"])
    assert aside is not None and aside.parent == tmp_path
    assert aside.name.startswith("run.replaced-")
    assert (aside / "last.pt").read_bytes() == b"ckpt"
    assert (aside / "training.png").is_symlink() and outside.read_text() == "keep me"
    assert (aside / "tensorboard" / "events").read_bytes() == b"e"
    assert sorted(p.name for p in run.iterdir()) == [".res2net.lock"]
    assert fileio.move_aside(run, ["last.pt"]) is None  # nothing to move: no folder made
    # a second move in the same second gets its own folder
    (run / "last.pt").write_bytes(b"second")
    again = fileio.move_aside(run, ["last.pt"])
    assert again != aside and (again / "last.pt").read_bytes() == b"second"


def test_the_folder_itself_may_be_a_link_the_user_made(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    assert fileio.make_directory(tmp_path / "link") == tmp_path / "link"
    fileio.write_bytes(tmp_path / "link" / "f", b"x")
    assert (real / "f").read_bytes() == b"x"


def test_new_directory_never_reuses_a_name(tmp_path, outside):
    (tmp_path / "board").symlink_to(tmp_path)
    made = fileio.new_directory(tmp_path, "board")
    assert made.name == "board-2" and made.is_dir() and not made.is_symlink()


@pytest.mark.parametrize("kind", ["symlink", "dangling", "fifo", "file"])
def test_make_subdirectory_refuses_what_is_planted_below_the_users_folder(tmp_path, kind):
    """The folder the user named may be a link; a subfolder name the project chooses below it
    is created or checked with `lstat`, at every level, and never followed."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "out").symlink_to(real)  # the user's own link: fine
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (real / "a").mkdir()
    planted = real / "a" / "b"
    if kind == "symlink":
        planted.symlink_to(elsewhere)
    elif kind == "dangling":
        planted.symlink_to(tmp_path / "nothing-there")
    elif kind == "fifo":
        os.mkfifo(planted)
    else:
        planted.write_text("x")
    with pytest.raises(FileRefused, match=re.escape(str(tmp_path / "out" / "a" / "b"))) as e:
        fileio.make_subdirectory(tmp_path / "out", Path("a/b/c"))
    assert len(str(e.value).splitlines()) == 1
    assert list(elsewhere.iterdir()) == [] and not (tmp_path / "nothing-there").exists()


def test_make_subdirectory_creates_each_level(tmp_path):
    made = fileio.make_subdirectory(tmp_path / "out", Path("a/b"))
    assert made == tmp_path / "out" / "a" / "b" and made.is_dir() and not made.is_symlink()
    assert fileio.make_subdirectory(tmp_path / "out", Path(".")) == tmp_path / "out"
    with pytest.raises(FileRefused):
        fileio.make_subdirectory(tmp_path / "out", Path("../x"))


@pytest.mark.parametrize("kind", KINDS)
def test_reads_of_names_the_project_replaces_never_follow_or_block(tmp_path, outside, kind):
    """`open_read` / `read_existing`: a link is refused, never followed; a named pipe is
    refused at once (opened non-blocking, checked on the descriptor), naming the path."""
    target = tmp_path / "checkpoints.json"
    plant(kind, target, outside)
    with pytest.raises(FileRefused, match=re.escape(str(target))) as e:
        fileio.read_existing(target, 1 << 10)
    assert "\n" not in str(e.value)


def test_read_existing_reads_a_regular_file_within_its_bound(tmp_path):
    assert fileio.read_existing(tmp_path / "missing", 10) is None
    (tmp_path / "f").write_bytes(b"0123456789")
    assert fileio.read_existing(tmp_path / "f", 10) == b"0123456789"
    with pytest.raises(FileRefused, match="more than the 9 expected"):
        fileio.read_existing(tmp_path / "f", 9)
    os.link(tmp_path / "f", tmp_path / "g")  # another name of a regular file: read
    assert fileio.read_existing(tmp_path / "g", 10) == b"0123456789"


@pytest.mark.parametrize("kind", ["symlink", "dangling", "fifo", "file"])
def test_check_below_refuses_what_make_subdirectory_and_atomic_write_would(tmp_path, kind):
    """An output's folders and name, checked before the work and without creating anything."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    (out / "a").mkdir(parents=True)
    assert fileio.check_below(out, Path("a/new/x.png")) == out / "a" / "new" / "x.png"
    assert not (out / "a" / "new").exists()
    planted = out / "a" / "b"
    if kind == "symlink":
        planted.symlink_to(elsewhere)
    elif kind == "dangling":
        planted.symlink_to(tmp_path / "nothing-there")
    elif kind == "fifo":
        os.mkfifo(planted)
    else:
        planted.write_text("x")
    with pytest.raises(FileRefused, match=re.escape(str(planted))):
        fileio.check_below(out, Path("a/b/x.png"))
    with pytest.raises(FileRefused, match=re.escape(str(planted))):
        fileio.check_below(out, Path("a/b"), folder=True)
    if kind != "file":
        with pytest.raises(FileRefused, match=re.escape(str(planted))):
            fileio.check_below(out, Path("a/b"))  # as the output file itself
    else:
        assert fileio.check_below(out, Path("a/b")) == planted
    with pytest.raises(FileRefused):
        fileio.check_below(out, Path("../x"))


@pytest.mark.parametrize("kind", ["symlink", "fifo", "dir"])
def test_metrics_log_reads_its_file_at_its_own_name(tmp_path, outside, kind):
    """A run folder's metrics.jsonl is read where it is, never through a planted link (whose
    target could be any size) and never blocking on a pipe."""
    from res2net.engine.progress import MetricsLog

    outside.write_text('{"global_step": 1}\n')
    plant(kind, tmp_path / "metrics.jsonl", outside)
    log = MetricsLog(tmp_path, enabled=True)
    for read in (log.read, lambda: log.rewind(0)):
        with pytest.raises(FileRefused, match=re.escape(str(tmp_path / "metrics.jsonl"))):
            read()
    assert outside.read_text() == '{"global_step": 1}\n'


def test_metrics_log_rewind_drops_later_and_torn_records(tmp_path):
    from res2net.engine.progress import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"global_step": 1}\n{"global_step": 5}\n{"glob')
    log = MetricsLog(tmp_path, enabled=True)
    log.rewind(3)
    assert path.read_text() == '{"global_step": 1}\n'
    assert log.read() == [{"global_step": 1}]
    log.rewind(3)  # nothing left to drop
    assert path.read_text() == '{"global_step": 1}\n'
