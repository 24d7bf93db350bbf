"""
Manage the users of an htpasswd file without Apache's tools.

    python -m resticd.users --file /srv/restic/.htpasswd add alice
    python -m resticd.users --file /srv/restic/.htpasswd remove alice
    python -m resticd.users --file /srv/restic/.htpasswd list

Passwords are stored as bcrypt hashes. The file is replaced atomically (a
temporary file beside it, fsync, rename), keeping its permission bits, so a
running resticd never reads half a file and picks the change up by itself.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import tempfile

import bcrypt

from .auth import BCRYPT_MAX_PASSWORD, is_valid_user_name

#: bcrypt's work factor: about 50 ms per check on a small server; checks run
#: in resticd's thread pool and verified credentials are cached.
ROUNDS = 10


def hash_password(password: str, rounds: int = ROUNDS) -> str:
    """
    A bcrypt hash of C{password} for an htpasswd file.
    """
    return bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt(rounds)).decode("ascii")


def read_lines(path: str) -> list[str]:
    """
    The lines of an htpasswd file; none when it does not exist.
    """
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def user_of(line: str) -> str | None:
    """
    The user an htpasswd line is for, or L{None} for comments and blanks.
    """
    stripped = line.strip()
    if not stripped or stripped.startswith("#") or ":" not in stripped:
        return None
    return stripped.split(":", 1)[0]


def set_user(lines: list[str], user: str, hashed: str) -> list[str]:
    """
    The lines with C{user}'s entry replaced, or added at the end.
    """
    entry = f"{user}:{hashed}"
    out = [entry if user_of(line) == user else line for line in lines]
    if entry not in out:
        out.append(entry)
    return out


def remove_user(lines: list[str], user: str) -> list[str]:
    """
    The lines without C{user}'s entry.
    """
    return [line for line in lines if user_of(line) != user]


def write_atomically(path: str, lines: list[str]) -> None:
    """
    Replace C{path} with C{lines}, durably and all at once, keeping the
    permission bits and owner of the file it replaces (0600 for a new file).
    """
    owner: tuple[int, int] | None = None
    try:
        st = os.stat(path)
    except FileNotFoundError:
        mode = 0o600
    else:
        mode = st.st_mode & 0o7777
        owner = (st.st_uid, st.st_gid)
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".htpasswd-")
    try:
        os.fchmod(fd, mode)
        if owner is not None and owner != (os.geteuid(), os.getegid()):
            # Run as root on the daemon's file: keep it the daemon's.
            os.fchown(fd, *owner)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"Password for {args.user}: ")
        if getpass.getpass("Again: ") != password:
            raise SystemExit("resticd-users: the passwords differ")
    if not password:
        raise SystemExit("resticd-users: empty password")
    if len(password.encode("utf-8")) > BCRYPT_MAX_PASSWORD:
        raise SystemExit(f"resticd-users: bcrypt passwords are at most {BCRYPT_MAX_PASSWORD} bytes long")
    return password


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="resticd-users",
        description="Add, remove and list the users of a resticd htpasswd file (bcrypt).",
    )
    parser.add_argument("--file", "-f", required=True, help="the htpasswd file (created by add if missing)")
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="add a user or set a user's password")
    add.add_argument("user")
    add.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    remove = commands.add_parser("remove", help="remove a user")
    remove.add_argument("user")
    commands.add_parser("list", help="list the users")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except OSError as e:
        raise SystemExit(f"resticd-users: {args.file}: {e.strerror}") from None


def _run(args: argparse.Namespace) -> int:
    lines = read_lines(args.file)
    if args.command == "list":
        for line in lines:
            user = user_of(line)
            if user is not None:
                print(user)
        return 0
    if args.command == "add":
        if not is_valid_user_name(args.user):
            raise SystemExit(f"resticd-users: invalid user name {args.user!r}")
        write_atomically(args.file, set_user(lines, args.user, hash_password(_password(args))))
        return 0
    if all(user_of(line) != args.user for line in lines):
        raise SystemExit(f"resticd-users: no user {args.user!r} in {args.file}")
    write_atomically(args.file, remove_user(lines, args.user))
    return 0


if __name__ == "__main__":
    sys.exit(main())
