"""
The repository store: every blocking filesystem operation of the server.

All methods here block (fsync, rename, directory walks) and are meant to run
in the worker thread pool, never on the reactor thread.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .errors import Conflict, Forbidden, NotFound
from .listing import Entry
from .nolinks import never_link_free, system_openat2
from .paths import HASHED_TYPES, Layout, Repo, Target, data_subdirs, is_inside, is_object_name
from .spool import SpoolFile


#: Where a path has a name starting with a dot.
_DOT_NAME = os.sep + "."


@dataclass(frozen=True)
class Modes:
    """
    File and directory permission bits for everything the store creates.
    """

    file: int = 0o600
    directory: int = 0o700

    @classmethod
    def for_group(cls, group_accessible: bool) -> Modes:
        """
        Owner-only modes, or group-accessible ones (0660/0770).
        """
        return cls(0o660, 0o770) if group_accessible else cls()


def fsync_dir(path: str) -> None:
    """
    Make the entries of directory C{path} durable.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str) -> str:
    """
    The sha256 of a file's content, as lowercase hex.
    """
    digest = hashlib.sha256()
    with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class _DirectoryState:
    def __init__(self) -> None:
        self.condition = threading.Condition()
        self.requested = 0
        self.done = 0
        self.running = False


class DirectorySyncs:
    """
    fsync of directories shared between concurrent uploads (group commit):
    an fsync makes every entry created before it started durable, so uploads
    that link into the same directory while one fsync runs all wait for the
    next one, which then covers them together.
    """

    def __init__(self, fsync: Callable[[str], None] = fsync_dir) -> None:
        self._fsync = fsync
        self._lock = threading.Lock()
        self._states: dict[str, _DirectoryState] = {}

    def sync(self, path: str) -> None:
        """
        Return once everything created in directory C{path} before this call
        is durable (blocking).
        """
        with self._lock:
            state = self._states.setdefault(path, _DirectoryState())
        with state.condition:
            state.requested += 1
            mine = state.requested
            while state.done < mine:
                if state.running:
                    state.condition.wait()
                    continue
                state.running = True
                covered = state.requested
                state.condition.release()
                try:
                    self._fsync(path)
                finally:
                    state.condition.acquire()
                    state.running = False
                    state.condition.notify_all()
                state.done = max(state.done, covered)


class Store:
    """
    Repositories under one data root, in restic's local layout.
    """

    def __init__(
        self,
        layout: Layout,
        modes: Modes = Modes(),
        open_link_free: Callable[[str, int], int | None] | None = None,
    ) -> None:
        """
        C{open_link_free(path, flags)} opens a path none of whose components
        is a symbolic link, or returns L{None} (a link, or no way to tell in
        one call); by default this system's C{openat2}, where it has one.
        """
        self.layout = layout
        self.modes = modes
        self.directory_syncs = DirectorySyncs()
        self._real_root = os.path.realpath(layout.root)
        self._below_root = os.path.join(self._real_root, "")
        if open_link_free is None:
            openat2 = system_openat2()
            open_link_free = openat2.open if openat2 is not None else never_link_free
        self._open_link_free = open_link_free

    # -- containment -------------------------------------------------------

    def contained(self, path: str) -> str:
        """
        C{path} itself, after checking that it does not lead outside the data
        root through a symbolic link; L{NotFound} if it does.
        """
        if not is_inside(self._real_root, os.path.realpath(path)):
            raise NotFound("not found")
        return path

    def _named_inside(self, path: str) -> bool:
        """
        Whether C{path} is the root's resolved name and names below it none
        of which is C{.}, C{..} or hidden (as every path L{Layout} makes of
        a checked target is): without symbolic links on the way, it lies
        inside the root.
        """
        below = self._below_root
        return path.startswith(below) and path.find(_DOT_NAME, len(below) - 1) < 0

    def open_contained(self, path: str, flags: int = os.O_RDONLY) -> int:
        """
        A descriptor of the file at C{path}, opened with C{flags}, after
        checking that the file it opened lies inside the data root;
        L{NotFound} if it is missing or outside. A path below the root's
        resolved name with no symbolic link, C{.} or C{..} in it lies inside
        by its very name: such a path is opened in one call that refuses
        links (L{resticd.nolinks}). Any other path (or any path, where that
        call is missing) is opened as it is, and the resolved name of what
        was opened is read back from C{/proc/self/fd}: one call instead of
        one per path component, and no race between check and open.
        """
        try:
            fd = self._open_link_free(path, flags) if self._named_inside(path) else None
            if fd is not None:
                return fd
            fd = os.open(path, flags | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound("not found") from None
        try:
            try:
                real = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                real = os.path.realpath(path)  # no /proc
            if not is_inside(self._real_root, real):
                raise NotFound("not found")
        except BaseException:
            os.close(fd)
            raise
        return fd

    # -- directories ---------------------------------------------------------

    def _mkdir(self, path: str) -> bool:
        """
        Create one directory with the store's mode; whether it was new.
        """
        try:
            os.mkdir(path, self.modes.directory)
        except FileExistsError:
            if not os.path.isdir(path):
                raise
            return False
        os.chmod(path, self.modes.directory)
        return True

    def _ensure_dir(self, path: str) -> None:
        """
        Create C{path} and missing parents below the root, fsyncing each
        parent that got a new entry.
        """
        if os.path.isdir(path):
            return
        parent = os.path.dirname(path)
        if path != self.layout.root:
            self._ensure_dir(parent)
        if self._mkdir(path):
            fsync_dir(parent)

    def prepare_root(self) -> None:
        """
        Create the data root and the spool directory if missing.
        """
        if not os.path.isdir(self.layout.root):
            os.makedirs(self.layout.root, self.modes.directory, exist_ok=True)
            os.chmod(self.layout.root, self.modes.directory)  # not the umask's
        self._mkdir(self.layout.spool_dir())

    def repo_exists(self, repo: Repo) -> bool:
        """
        Whether the repository's directory exists.
        """
        return os.path.isdir(self.contained(self.layout.repo_dir(repo)))

    def create_repo(self, repo: Repo) -> None:
        """
        Create a repository's directories (idempotent); L{Conflict} if it has a
        config already.
        """
        layout = self.layout
        repo_dir = self.contained(layout.repo_dir(repo))
        if os.path.lexists(repo_dir) and not os.path.isdir(repo_dir):
            raise Conflict("a file of that name is in the way")
        if os.path.lexists(layout.config_path(repo)):
            raise Conflict("repository already exists")
        self._ensure_dir(repo_dir)
        created = False
        for kind in HASHED_TYPES:
            created |= self._mkdir(layout.type_dir(repo, kind))
        data = layout.type_dir(repo, "data")
        if any([self._mkdir(os.path.join(data, sub)) for sub in data_subdirs()]):
            fsync_dir(data)
        if created:
            fsync_dir(repo_dir)

    def delete_repo(self, repo: Repo) -> None:
        """
        Remove a repository's config and type directories, and its directory
        when nothing else (a nested repository) is left in it.
        """
        layout = self.layout
        repo_dir = self.contained(layout.repo_dir(repo))
        if not os.path.isdir(repo_dir):
            raise NotFound("no such repository")
        try:
            os.unlink(layout.config_path(repo))
        except FileNotFoundError:
            pass
        for kind in HASHED_TYPES:
            type_dir = layout.type_dir(repo, kind)
            if os.path.islink(type_dir):
                os.unlink(type_dir)  # remove the link, never what it points to
                continue
            try:
                shutil.rmtree(type_dir)
            except FileNotFoundError:
                pass
        if repo:
            try:
                os.rmdir(repo_dir)
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
        fsync_dir(os.path.dirname(repo_dir) if repo else repo_dir)

    # -- objects --------------------------------------------------------------

    def publish(self, spool: SpoolFile, repo: Repo, kind: str, name: str) -> bool:
        """
        Make a finished upload durable under its final name, never replacing a
        file already there.

        Returns C{True} when the object was stored, C{False} when an identical
        object was there already (a client retry). L{Forbidden} when a
        different one is there, L{NotFound} when the repository does not
        exist. The spool file (flushed: no writes queued) is gone afterwards,
        whatever happens.
        """
        directory_fd = None
        try:
            layout = self.layout
            if kind == "config":
                final = layout.config_path(repo)
            else:
                final = layout.object_path(repo, kind, name)
            directory, base = os.path.split(final)
            try:
                # Where the directory is there already (nearly always): one
                # open that also proves it lies inside the data root.
                directory_fd = self.open_contained(directory, os.O_PATH | os.O_DIRECTORY)
            except NotFound:
                if not os.path.isdir(self.contained(layout.repo_dir(repo))):
                    raise NotFound("no such repository") from None
                self.contained(directory)
            path = spool.sync()
            if directory_fd is None:
                self._ensure_dir(directory)
                directory_fd = self.open_contained(directory, os.O_PATH | os.O_DIRECTORY)
            while True:
                try:
                    os.link(path, base, dst_dir_fd=directory_fd)
                    break
                except FileExistsError:
                    same = self._same_content(final, spool, path)
                    if same is None:
                        continue  # deleted meanwhile: store ours after all
                    if same:
                        return False
                    raise Forbidden("a different object with this name exists") from None
            self.directory_syncs.sync(directory)
            return True
        finally:
            if directory_fd is not None:
                os.close(directory_fd)
            spool.remove()

    def _same_content(self, path: str, spool: SpoolFile, spooled: str) -> bool | None:
        """
        Whether the regular file at C{path} (never followed if it is a
        symbolic link) holds exactly what C{spool}, synced to C{spooled},
        holds (read back when it was not hashed); L{None} when there is no
        file there (any more).
        """
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_size != spool.size:
                return False
            return sha256_file(path) == (spool.hexdigest() or sha256_file(spooled))
        except FileNotFoundError:
            return None

    def is_stored(self, target: Target) -> bool:
        """
        Whether the object (or config) C{target} names exists (one stat; cheap
        enough for the reactor thread).
        """
        if target.kind is None or target.name is None:
            return False
        if target.kind == "config":
            return os.path.isfile(self.layout.config_path(target.repo))
        return os.path.isfile(self.layout.object_path(target.repo, target.kind, target.name))

    def delete(self, path: str) -> int | None:
        """
        Remove one object or config file; a missing one is not an error.
        Returns the size of what was removed, L{None} when nothing was.
        """
        self.contained(path)
        try:
            size = os.lstat(path).st_size
            os.unlink(path)
        except FileNotFoundError:
            return None
        except IsADirectoryError:
            raise NotFound("not found") from None
        return size

    def list_dir(self, directory: str) -> list[Entry]:
        """
        The valid object names in C{directory} with their sizes; a missing
        directory, or one that leads outside the root, lists as empty.
        """
        try:
            fd = self.open_contained(directory, os.O_RDONLY | os.O_DIRECTORY)
        except NotFound:
            # Missing, or leading out of the root: nothing to list here.
            return []
        entries = []
        try:
            # Through the directory's descriptor, each entry is looked up
            # in it alone, not along the whole path again.
            with os.scandir(fd) as scan:
                for entry in scan:
                    name = entry.name
                    if not is_object_name(name) or not entry.is_file(follow_symlinks=False):
                        continue
                    try:
                        entries.append((name, entry.stat(follow_symlinks=False).st_size))
                    except FileNotFoundError:
                        continue
        finally:
            os.close(fd)
        return entries

    def list_dirs(self, repo: Repo, kind: str) -> Iterator[str]:
        """
        The directories that hold the objects of one type: the type directory,
        or for data its 256 fan-out subdirectories.
        """
        type_dir = self.layout.type_dir(repo, kind)
        if kind != "data":
            yield type_dir
            return
        for sub in data_subdirs():
            yield os.path.join(type_dir, sub)

