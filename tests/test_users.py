"""
C{resticd-users} (C{python -m resticd.users}): adding, changing, removing and
listing the users of an htpasswd file, which resticd then reads.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys

import pytest

from resticd.auth import Htpasswd, hashes
from resticd.users import main

# htpasswd -nbm bob 'b0b:pass'
BOB = "bob:$apr1$TOIMRHTN$kWOkTINfOc7dcAZOtbIGZ."
# htpasswd -nbs carol carol-pw
CAROL = "carol:{SHA}hsAaMBat8aKiQgxhKhAqvbXOPbw="
# htpasswd -nbB -C 4 alice 'correct horse'
ALICE_OLD = "alice:$2y$04$G3iEXeBw0jCx2TLuPLXBhuIQgfDfaKtpRR1vAVTq6cWPyaNKlilFu"

#: An htpasswd file kept up by hand, with comments and blank lines.
EXISTING = f"# backup users\n{BOB}\n\n# alice's laptop\n{ALICE_OLD}\n{CAROL}\n"


def run(monkeypatch, path, *args: str, password: str | None = None) -> int:
    """
    Run the command on the htpasswd file C{path}; C{password} is its stdin.
    """
    monkeypatch.setattr(sys, "stdin", io.StringIO(password if password is not None else ""))
    return main(["--file", str(path), *args])


def add(monkeypatch, path, user: str, password: str) -> int:
    # "--" so that a user name such as "-x" reaches the name check.
    return run(monkeypatch, path, "add", "--password-stdin", "--", user, password=password + "\n")


def users(path) -> Htpasswd:
    htpasswd = Htpasswd(str(path))
    htpasswd.refresh()
    return htpasswd


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_add_creates_private_file_with_bcrypt(tmp_path, monkeypatch):
    """
    C{add} creates a missing file, readable by its owner only (0600), with
    one bcrypt entry that resticd accepts for that password and no other.
    """
    path = tmp_path / "htpasswd"
    assert add(monkeypatch, path, "alice", "s3cret pass:word") == 0
    assert mode(path) == 0o600
    lines = path.read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("alice:$2")
    assert hashes().identify(lines[0].split(":", 1)[1]) == "bcrypt"
    htpasswd = users(path)
    assert htpasswd.verify("alice", "s3cret pass:word")
    assert not htpasswd.verify("alice", "s3cret pass:word ")
    assert not htpasswd.verify("alice", "")


def test_password_line_end_is_not_part_of_it(tmp_path, monkeypatch):
    """
    The password is the first line of stdin without its line end (LF or
    CRLF); the rest of stdin is ignored.
    """
    path = tmp_path / "htpasswd"
    assert run(monkeypatch, path, "add", "alice", "--password-stdin", password="pw one\r\nsecond line\n") == 0
    assert users(path).verify("alice", "pw one")


def test_add_again_changes_the_password(tmp_path, monkeypatch):
    """
    C{add} for an existing user replaces the password: the new one works,
    the old one no longer does, and there is still one entry for the user.
    """
    path = tmp_path / "htpasswd"
    path.write_text(EXISTING)
    assert add(monkeypatch, path, "alice", "battery staple") == 0
    htpasswd = users(path)
    assert htpasswd.verify("alice", "battery staple")
    assert not htpasswd.verify("alice", "correct horse")
    assert [line.split(":")[0] for line in path.read_text().splitlines() if line.startswith("alice:")] == ["alice"]


def test_other_lines_are_kept(tmp_path, monkeypatch):
    """
    Changing one user keeps every other line as it was, in place: other
    users (whatever their scheme), comments and blank lines.
    """
    path = tmp_path / "htpasswd"
    path.write_text(EXISTING)
    assert add(monkeypatch, path, "alice", "new") == 0
    before, after = EXISTING.splitlines(), path.read_text().splitlines()
    assert len(after) == len(before)
    changed = [i for i, (old, new) in enumerate(zip(before, after)) if old != new]
    assert changed == [before.index(ALICE_OLD)]
    htpasswd = users(path)
    assert htpasswd.verify("bob", "b0b:pass") and htpasswd.verify("carol", "carol-pw")

    assert add(monkeypatch, path, "dave", "dave pw") == 0
    lines = path.read_text().splitlines()
    assert lines[:-1] == after and lines[-1].startswith("dave:$2")


def test_remove_deletes_only_that_user(tmp_path, monkeypatch):
    """
    C{remove} deletes the user's line and nothing else.
    """
    path = tmp_path / "htpasswd"
    path.write_text(EXISTING)
    assert run(monkeypatch, path, "remove", "bob") == 0
    assert path.read_text() == EXISTING.replace(BOB + "\n", "")
    htpasswd = users(path)
    assert not htpasswd.verify("bob", "b0b:pass")
    assert htpasswd.verify("alice", "correct horse") and htpasswd.verify("carol", "carol-pw")


@pytest.mark.parametrize("existing", [True, False], ids=["file", "no-file"])
def test_remove_missing_user_fails(tmp_path, monkeypatch, existing):
    """
    Removing a user who is not there exits non-zero with a message naming
    the user, and leaves the file untouched (or still missing).
    """
    path = tmp_path / "htpasswd"
    if existing:
        path.write_text(EXISTING)
        inode = os.stat(path).st_ino
    with pytest.raises(SystemExit) as e:
        run(monkeypatch, path, "remove", "dave")
    assert isinstance(e.value.code, str) and "dave" in e.value.code
    if existing:
        assert path.read_text() == EXISTING
        assert os.stat(path).st_ino == inode
    else:
        assert not path.exists()


def test_list_prints_users(tmp_path, monkeypatch, capsys):
    """
    C{list} prints the user names, one a line, in file order, without
    comments or hashes; a missing file lists nobody.
    """
    path = tmp_path / "htpasswd"
    path.write_text(EXISTING)
    assert run(monkeypatch, path, "list") == 0
    assert capsys.readouterr().out == "bob\nalice\ncarol\n"
    assert run(monkeypatch, tmp_path / "missing", "list") == 0
    assert capsys.readouterr().out == ""


def test_existing_mode_is_kept(tmp_path, monkeypatch):
    """
    Rewriting an existing file keeps its permission bits (e.g. 0640, for a
    group that runs resticd).
    """
    path = tmp_path / "htpasswd"
    path.write_text(EXISTING)
    os.chmod(path, 0o640)
    assert add(monkeypatch, path, "dave", "pw") == 0
    assert mode(path) == 0o640
    assert run(monkeypatch, path, "remove", "bob") == 0
    assert mode(path) == 0o640


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_owner_is_kept_when_run_as_root(tmp_path, monkeypatch):
    """
    Run as root on a file that belongs to the daemon's user, the tool keeps
    that owner (and group), so the daemon can still read the file.
    """
    path = tmp_path / "htpasswd"
    path.write_text(EXISTING)
    os.chown(path, 4321, 4322)
    assert add(monkeypatch, path, "dave", "pw") == 0
    st = os.stat(path)
    assert (st.st_uid, st.st_gid) == (4321, 4322)


def test_unwritable_location_is_a_message(tmp_path, monkeypatch):
    """
    A file in a directory that does not exist is refused with a one-line
    message naming the file, not a traceback.
    """
    path = tmp_path / "no-such-dir" / "htpasswd"
    with pytest.raises(SystemExit) as e:
        add(monkeypatch, path, "alice", "pw")
    assert isinstance(e.value.code, str) and str(path) in e.value.code


@pytest.mark.parametrize("name", ["a b", "a:b", "../x", "a/b", "", "-x", ".x", "x" * 129])
def test_invalid_user_name_is_refused(tmp_path, monkeypatch, name):
    """
    A user name resticd could not accept (spaces, colons, path characters,
    a leading dash or dot, empty, too long) is refused with a message and
    the file is not created.
    """
    path = tmp_path / "htpasswd"
    with pytest.raises(SystemExit) as e:
        add(monkeypatch, path, name, "pw")
    assert isinstance(e.value.code, str) and "invalid user name" in e.value.code
    assert not path.exists()


def test_empty_password_is_refused(tmp_path, monkeypatch):
    """
    An empty password is refused and nothing is written.
    """
    path = tmp_path / "htpasswd"
    with pytest.raises(SystemExit) as e:
        add(monkeypatch, path, "alice", "")
    assert isinstance(e.value.code, str) and "password" in e.value.code
    assert not path.exists()


def test_password_longer_than_bcrypt_allows(tmp_path, monkeypatch):
    """
    A password longer than bcrypt's 72 bytes is refused with a message (not
    a traceback, and not silently cut short), and nothing is written.
    """
    path = tmp_path / "htpasswd"
    with pytest.raises(SystemExit) as e:
        add(monkeypatch, path, "alice", "p" * 100)
    assert isinstance(e.value.code, str) and e.value.code
    assert not path.exists()


def test_file_is_replaced_atomically(tmp_path, monkeypatch):
    """
    Each change writes a new file and renames it over the old one (a reader
    holding the old file sees all of it; resticd sees a new file), and
    leaves no temporary file in the directory.
    """
    path = tmp_path / "htpasswd"
    path.write_text(EXISTING)
    with open(path) as reader:
        inode = os.stat(path).st_ino
        assert add(monkeypatch, path, "alice", "new") == 0
        assert os.stat(path).st_ino != inode
        assert reader.read() == EXISTING
    inode = os.stat(path).st_ino
    assert run(monkeypatch, path, "remove", "bob") == 0
    assert os.stat(path).st_ino != inode
    assert os.listdir(tmp_path) == ["htpasswd"]


def test_command_line(tmp_path):
    """
    Run as C{python -m resticd.users}: C{add} with C{--password-stdin}
    exits 0 and makes a working entry; removing a missing user exits 1 with
    a one-line message on stderr and no traceback.
    """
    path = str(tmp_path / "htpasswd")
    command = [sys.executable, "-m", "resticd.users", "--file", path]
    added = subprocess.run(
        [*command, "add", "alice", "--password-stdin"], input="pw\n", capture_output=True, text=True, timeout=60
    )
    assert added.returncode == 0, added.stderr
    assert users(path).verify("alice", "pw")
    removed = subprocess.run([*command, "remove", "bob"], capture_output=True, text=True, timeout=60)
    assert removed.returncode == 1
    assert "bob" in removed.stderr and "Traceback" not in removed.stderr
    assert len(removed.stderr.strip().splitlines()) == 1
