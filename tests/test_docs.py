"""
The documentation against the command line it documents: README.md and
man/resticd.8 describe every option of C{twistd resticd --help} and no other,
man/resticd-users.8 every command and option of C{resticd-users --help} and
no other, the manual pages lint clean, README.md starts with the two make
commands, and the C{--listen} examples mean what they say.

The options are taken from L{resticd.tap.Options} and its C{--help} output,
and the commands of C{resticd-users} from the parser L{resticd.users.main}
builds, never from a list kept here, so a new option or command fails these
tests until it is documented.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn, cast

import pytest
from twisted.internet import endpoints
from twisted.internet.interfaces import IStreamServerEndpointStringParser
from twisted.internet.testing import MemoryReactor
from twisted.plugin import getPlugins

from resticd import users
from resticd.tap import Options, endpoint_description

from .tools import required_program

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MANPAGE = ROOT / "man" / "resticd.8"
USERS_MANPAGE = ROOT / "man" / "resticd-users.8"
MANPAGES = [MANPAGE, USERS_MANPAGE]
MAKEFILE = ROOT / "Makefile"
UNIT = ROOT / "etc" / "systemd" / "resticd.service"
DEFAULTS = ROOT / "etc" / "default" / "resticd"

#: mandoc -Tlint notes that are about mdoc(7) conventions, not errors.
IGNORED_LINT = re.compile(r"STYLE: .*(Mdocdate|operating system)")


# -- the options -----------------------------------------------------------


def option_names() -> set[str]:
    """
    Every long option of L{Options}: its C{optParameters}, C{optFlags} and
    C{opt_*} methods (C{--help} and C{--version} included).
    """
    return {name.rstrip("=") for name in Options().longOpt}


def help_output() -> str:
    """
    What C{twistd resticd --help} prints after its usage line.
    """
    return str(Options())


def options_in_help() -> list[str]:
    """
    The long options C{--help} lists, in its order: the option column of its
    lines, not options mentioned in help sentences.
    """
    return re.findall(r"^ {0,8}(?:-\w, )?--([a-z0-9][a-z0-9-]*)", help_output(), re.MULTILINE)


def help_sentence(name: str) -> str:
    """
    The help sentence of one option, as C{--help} shows it (whitespace
    folded).
    """
    return " ".join(Options().docs[name].split())


# -- reading roff ----------------------------------------------------------

_ESCAPE = re.compile(r"\\(f\(..|f\[[^]]*\]|f.|\(..|\[[^]]*\]|.)")
_NAMED = {"(aq": "'", "(dq": '"', "(em": "--", "(en": "-", "(bu": "*", "[aq]": "'", "[dq]": '"'}
_JOINED = {"BR", "RB", "BI", "IB", "IR", "RI"}
_SPACED = {"B", "I", "SM", "SB"}


def _unescape(text: str) -> str:
    def one(match: re.Match[str]) -> str:
        code = match.group(1)
        if code.startswith("f"):
            return ""
        if code in _NAMED:
            return _NAMED[code]
        return {"-": "-", "e": "\\", "&": "", "~": " ", " ": " ", "|": "", "^": ""}.get(code, "")

    return _ESCAPE.sub(one, text)


def _macro_args(rest: str) -> list[str]:
    return [
        quoted.replace('""', '"') if quoted is not None and bare == "" else bare
        for quoted, bare in re.findall(r'"((?:[^"]|"")*)"|(\S+)', rest)
    ]


def deroff_line(line: str) -> str:
    """
    The text one line of man(7) source shows: font macros applied (the
    alternating ones join their arguments), escapes resolved, other
    requests and comments dropped.
    """
    if line.startswith(('.\\"', "'\\\"")):
        return ""
    if line.startswith("."):
        macro, _, rest = line[1:].partition(" ")
        if macro in _JOINED:
            return "".join(_unescape(arg) for arg in _macro_args(rest))
        if macro in _SPACED:
            return " ".join(_unescape(arg) for arg in _macro_args(rest))
        return ""
    return _unescape(line)


def deroff(lines: list[str]) -> str:
    """
    The text of man(7) source lines, whitespace folded.
    """
    return " ".join(" ".join(deroff_line(line) for line in lines).split())


def man_lines(page: Path = MANPAGE) -> list[str]:
    return page.read_text(encoding="utf-8").splitlines()


def man_section(title: str, page: Path = MANPAGE) -> list[str]:
    """
    The source lines of one C{.SH} section of a manual page (by default
    man/resticd.8).
    """
    section: list[str] | None = None
    for line in man_lines(page):
        if line.startswith(".SH"):
            if section is not None:
                break
            if _macro_args(line[3:]) == [title]:
                section = []
            continue
        if section is not None:
            section.append(line)
    assert section is not None, f"man/{page.name} has no {title} section"
    return section


def man_tags(lines: list[str]) -> list[str]:
    """
    The tags of the C{.TP} entries among some manual page lines, as text.
    """
    return [
        " ".join(deroff_line(lines[i + 1]).split())
        for i, line in enumerate(lines[:-1])
        if re.match(r"\.TP\b", line)
    ]


class ManOption:
    """
    One C{.TP} entry of the OPTIONS section: the option, its metavariable
    (C{DIR} of C{--path=DIR}) and the entry's text.
    """

    def __init__(self, name: str, metavar: str | None, text: str) -> None:
        self.name = name
        self.metavar = metavar
        self.text = text


def man_options() -> list[ManOption]:
    """
    The options the OPTIONS section describes, one per C{.TP} entry whose
    tag is an option, in order.
    """
    lines = man_section("OPTIONS")
    entries: list[ManOption] = []
    for i, line in enumerate(lines):
        if not line.startswith(".TP") or i + 1 >= len(lines):
            continue
        tag = deroff_line(lines[i + 1])
        match = re.fullmatch(r"--([a-z0-9][a-z0-9-]*)(?:[= ](\S+))?", tag.strip())
        if match is None:
            continue
        body: list[str] = []
        for following in lines[i + 1 :]:
            if body and re.match(r"\.(TP|SS|SH|PP|P|LP)\b", following):
                break
            body.append(following)
        entries.append(ManOption(match.group(1), match.group(2), deroff(body)))
    return entries


def roff_option(name: str) -> str:
    """
    How an option is written in roff source: its two leading dashes as
    C{\\-\\-}, the hyphens inside its name as they are.
    """
    return "\\-\\-" + name


def facts(sentence: str) -> list[str]:
    """
    The concrete facts of a help sentence: the words that hold a digit, a
    path, an endpoint or a placeholder (C{/ : < =}), and upper-case names
    (C{TLS}, C{PEM}, C{DELETE}), without surrounding punctuation.
    """
    found = []
    for word in sentence.split():
        word = word.lstrip("(").rstrip(".,;:)")
        if re.search(r"[0-9/:<=]", word) or re.fullmatch(r"[A-Z][A-Z0-9]+", word):
            found.append(word)
    return found


# -- the tests ---------------------------------------------------------------


def test_help_lists_every_option() -> None:
    """
    The two ways the tests derive the options agree: C{--help} lists exactly
    the long options of L{Options}, and there are some (so the other tests
    do not pass vacuously).
    """
    listed = options_in_help()
    assert len(listed) == len(set(listed))
    assert set(listed) == option_names()
    assert {"path", "listen", "help", "version"} <= option_names()


def test_every_option_is_in_readme_and_manpage() -> None:
    """
    Every long option of L{Options} appears in README.md as C{--name} and in
    man/resticd.8 as C{\\-\\-name} (the leading dashes escaped), each as a whole option
    (C{--tls} is not satisfied by C{--tls-cert}).
    """
    readme = README.read_text(encoding="utf-8")
    man = MANPAGE.read_text(encoding="utf-8")
    missing_readme = sorted(
        name for name in option_names() if not re.search(re.escape("--" + name) + r"(?![\w-])", readme)
    )
    missing_man = sorted(
        name for name in option_names() if not re.search(re.escape(roff_option(name)) + r"(?!\w|\\-)", man)
    )
    assert missing_readme == [], "README.md does not mention these options"
    assert missing_man == [], "man/resticd.8 does not mention these options"


def readme_section(title: str) -> str:
    """
    The text of one C{## } section of README.md, its subsections included.
    """
    readme = README.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", readme, re.MULTILINE | re.DOTALL)
    assert match is not None, f"README.md has no section {title!r}"
    return match.group(1)


def test_readme_options_section_lists_exactly_the_help_options() -> None:
    """
    The Options section of README.md has one list entry (a line starting
    C{- `--name}) for every option C{--help} lists and none for an option it
    does not, so an option merely named elsewhere in the README does not
    count as documented.
    """
    described = re.findall(r"^- `--([a-z0-9][a-z0-9-]*)", readme_section("Options"), re.MULTILINE)
    assert len(described) == len(set(described)), "options described twice"
    assert sorted(described) == sorted(options_in_help())


def test_readme_does_not_call_an_existing_option_missing() -> None:
    """
    The README's list of rest-server options that resticd does not have
    names none that it has (it must shrink as such options are added).
    """
    section = readme_section("Where it differs from rest-server")
    match = re.search(r"^- \*\*rest-server options resticd does not have:\*\*(.*?)(?=^- |\Z)", section, re.M | re.S)
    assert match is not None, "the list of rest-server options resticd lacks is gone"
    named = set(re.findall(r"`--([a-z0-9][a-z0-9-]*)`", match.group(1)))
    assert named, "the list names no options"
    assert sorted(named & option_names()) == []


def test_manpage_options_section_lists_exactly_the_help_options() -> None:
    """
    The OPTIONS section of the manual page has one entry for every option
    C{--help} lists, and none for an option it does not (no stale or
    misspelt entries, no duplicates).
    """
    described = [entry.name for entry in man_options()]
    assert len(described) == len(set(described)), "options described twice"
    assert sorted(described) == sorted(options_in_help())


def test_manpage_entries_carry_the_help_sentences() -> None:
    """
    Each option's manual page entry says what its C{--help} sentence says:
    every concrete fact of the sentence (values, defaults, paths, endpoint
    forms, names such as TLS or PEM) appears in the entry, and so does a
    parameter's default. A placeholder C{<path>} in the help stands for the
    value of C{--path} and may appear as that option's metavariable in the
    manual page; colons may be shown escaped (C{\\:}) as endpoint strings
    need.
    """
    entries = {entry.name: entry for entry in man_options()}
    metavars = {name: entry.metavar for name, entry in entries.items() if entry.metavar}
    parameters = [list(cast(Sequence[Any], entry)) for entry in Options.optParameters]
    defaults = {entry[0]: entry[2] for entry in parameters if entry[2] is not None}

    def normal(text: str) -> str:
        text = re.sub(r"<([a-z0-9-]+)>", lambda m: metavars.get(m.group(1), m.group(1)), text)
        return text.replace("\\", "")

    lacking = {}
    for name in options_in_help():
        entry = entries.get(name)
        if entry is None:
            lacking[name] = ["(no entry)"]
            continue
        expected = facts(help_sentence(name))
        if name in defaults:
            expected.append(str(defaults[name]))
        absent = [fact for fact in expected if normal(fact) not in normal(entry.text)]
        if absent:
            lacking[name] = absent
    assert lacking == {}, "manual page entries lack these facts of --help"


@pytest.mark.parametrize("page", MANPAGES, ids=lambda page: page.name)
def test_manpage_has_no_mandoc_lint_output(page: Path) -> None:
    """
    C{mandoc -Tlint} reports nothing for man/resticd.8 and
    man/resticd-users.8 (apart from mdoc-only style notes); without mandoc
    the test is skipped, except on CI.
    """
    mandoc = required_program("mandoc")
    result = subprocess.run(
        [mandoc, "-Tlint", str(page)], capture_output=True, text=True, check=False, timeout=60
    )
    output = [line for line in (result.stdout + result.stderr).splitlines() if not IGNORED_LINT.search(line)]
    assert output == []


@pytest.mark.parametrize("page", MANPAGES, ids=lambda page: page.name)
def test_manpage_has_no_groff_warnings(page: Path) -> None:
    """
    C{groff -man -ww -z} prints no warning for man/resticd.8 and
    man/resticd-users.8 (skipped without groff).
    """
    groff = shutil.which("groff")
    if groff is None:
        pytest.skip("groff is not installed")
    result = subprocess.run(
        [groff, "-man", "-ww", "-z", str(page)], capture_output=True, text=True, check=False, timeout=60
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_manpage_sections() -> None:
    """
    The manual page has the sections of a daemon's page, in order.
    """
    titles = [" ".join(_macro_args(line[3:])) for line in man_lines() if line.startswith(".SH")]
    assert titles == [
        "NAME",
        "SYNOPSIS",
        "DESCRIPTION",
        "OPTIONS",
        "ACCESS FILE",
        "PROTOCOL",
        "SIGNALS",
        "ENVIRONMENT",
        "FILES",
        "EXIT STATUS",
        "EXAMPLES",
        "SEE ALSO",
    ]


def test_readme_starts_with_make_serve_and_make_test() -> None:
    """
    README.md shows C{make serve} and C{make test} as commands (in code
    blocks) before any installation instructions, and both are targets of
    the Makefile.
    """
    readme = README.read_text(encoding="utf-8")
    makefile = MAKEFILE.read_text(encoding="utf-8")
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", readme, re.MULTILINE | re.DOTALL)
    commands = {line.strip() for block in blocks for line in block.splitlines()}
    for target in ("serve", "test"):
        assert re.search(rf"^{target}:", makefile, re.MULTILINE), f"no {target} target in the Makefile"
        assert f"make {target}" in commands, f"README.md does not show make {target}"
        assert readme.index(f"make {target}") < readme.index("pip install"), f"make {target} is not up front"


def documented_listen_values() -> list[tuple[str, str]]:
    """
    Every C{--listen VALUE} written in README.md, the manual page, the
    systemd unit and its options file, with where it was found. Values in
    quotes are taken whole; words without a colon (a metavariable such as
    C{ENDPOINT}, prose) are not values.
    """
    sources = {
        "README.md": README.read_text(encoding="utf-8"),
        "man/resticd.8": "\n".join(deroff_line(line) for line in man_lines()),
        "etc/systemd/resticd.service": UNIT.read_text(encoding="utf-8"),
        "etc/default/resticd": DEFAULTS.read_text(encoding="utf-8"),
    }
    found = []
    for where, text in sources.items():
        for match in re.finditer(r"""--listen[ =](?:'([^']*)'|([^\s'"`]+))""", text):
            value = match.group(1) if match.group(1) is not None else match.group(2)
            if ":" in value:
                found.append((where, value))
    return found


def endpoint_types() -> set[str]:
    """
    The endpoint types Twisted knows: its built-in parsers and the
    C{IStreamServerEndpointStringParser} plugins.
    """
    plugins = {str(parser.prefix) for parser in getPlugins(IStreamServerEndpointStringParser)}
    return set(endpoints._serverParsers) | plugins


def endpoint_problem(value: str) -> str | None:
    """
    What is wrong with C{--listen value}, or L{None}: an endpoint string
    (C{tcp:}, C{unix:}, C{systemd:} ...) must reach Twisted unchanged, a
    rest-server address is translated, and the result must be an endpoint
    description Twisted parses (not tried for C{systemd:}, which needs
    inherited sockets).
    """
    try:
        description = endpoint_description(value)
    except ValueError as e:
        return str(e)
    kind = value.split(":", 1)[0]
    if kind in endpoint_types() and description != value:
        return f"taken as {description}"
    if kind == "systemd":
        return None
    try:
        endpoints.serverFromString(MemoryReactor(), description)
    except (ValueError, KeyError, TypeError) as e:
        return f"{description}: {e}"
    return None


def endpoint_examples(text: str) -> list[str]:
    """
    The endpoint examples in a piece of prose: words with a colon that start
    with an endpoint type or a colon, or hold a digit (so C{host:port} is a
    placeholder, not an example), without surrounding punctuation.
    """
    types = endpoint_types()
    found = []
    for word in text.split():
        word = word.lstrip("(").rstrip(".,;:)")
        if ":" not in word:
            continue
        if word.split(":", 1)[0] in types or word.startswith(":") or re.search(r"[0-9]", word):
            found.append(word)
    return found


def test_documented_listen_values_mean_what_they_say() -> None:
    """
    Every C{--listen VALUE} in README.md, the manual page, the systemd unit
    and its options file is usable as written (see L{endpoint_problem}).
    """
    values = documented_listen_values()
    assert values, "no --listen examples found"
    wrong = [f"{where}: --listen {value}: {problem}" for where, value in values if (problem := endpoint_problem(value))]
    assert wrong == []


def test_manpage_listen_examples_are_usable() -> None:
    """
    Every endpoint example in the manual page's C{--listen} entry is usable
    as written (see L{endpoint_problem}).
    """
    entry = next(entry for entry in man_options() if entry.name == "listen")
    examples = endpoint_examples(entry.text)
    assert len(examples) >= 5, examples
    wrong = [f"{value}: {problem}" for value in examples if (problem := endpoint_problem(value))]
    assert wrong == []


def test_help_listen_examples_are_usable() -> None:
    """
    Every endpoint example in the C{--listen} help sentence is usable as
    written (see L{endpoint_problem}).
    """
    examples = endpoint_examples(help_sentence("listen"))
    assert examples, "no examples in the --listen help"
    wrong = [f"{value}: {problem}" for value in examples if (problem := endpoint_problem(value))]
    assert wrong == []


# -- resticd-users -----------------------------------------------------------


class _Built(Exception):
    """
    Carries the parser L{resticd.users.main} built, out of C{main}.
    """

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__()
        self.parser = parser


def users_parser() -> argparse.ArgumentParser:
    """
    The argument parser of C{resticd-users}: the one L{resticd.users.main}
    builds, taken from it when it starts parsing (nothing else runs).
    """

    def caught(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> NoReturn:
        raise _Built(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", caught)
        with pytest.raises(_Built) as built:
            users.main([])
    return built.value.parser


def users_commands() -> dict[str, argparse.ArgumentParser]:
    """
    The commands of C{resticd-users} and the parser of each.
    """
    subparsers = [a for a in users_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(subparsers) == 1
    return dict(subparsers[0].choices)


def option_strings(parser: argparse.ArgumentParser) -> list[str]:
    """
    Every option string (C{-f}, C{--file}, ...) of one parser.
    """
    return [s for action in parser._actions for s in action.option_strings]


def positionals(parser: argparse.ArgumentParser) -> list[str]:
    """
    The positional arguments of a command's parser, as the manual page
    writes them (C{USER}).
    """
    return [
        (a.metavar if isinstance(a.metavar, str) else a.dest).upper()
        for a in parser._actions
        if not a.option_strings and not isinstance(a, argparse._SubParsersAction)
    ]


def users_help(*argv: str) -> str:
    """
    What C{resticd-users ARGV... --help} prints.
    """
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
        users.main([*argv, "--help"])
    assert exited.value.code == 0
    return out.getvalue()


def users_man_options() -> list[str]:
    """
    The option strings the OPTIONS section of man/resticd-users.8 has
    entries for (C{--file, -f FILE} gives C{--file} and C{-f}).
    """
    found: list[str] = []
    for tag in man_tags(man_section("OPTIONS", USERS_MANPAGE)):
        found.extend(piece.split()[0] for piece in tag.split(", ") if piece.strip())
    return found


def test_users_parser_is_what_help_shows() -> None:
    """
    The parser these tests read is the one C{resticd-users --help} prints:
    every command and every option string appears in the help of
    C{resticd-users} or of its command, and there are some.
    """
    commands = users_commands()
    assert {"add", "remove", "list"} <= set(commands)
    main_help = users_help()
    for name in commands:
        assert re.search(rf"\b{name}\b", main_help), name
    for option in option_strings(users_parser()):
        assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", main_help), option
    for name, parser in commands.items():
        command_help = users_help(name)
        for option in option_strings(parser):
            assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", command_help), (name, option)


def test_users_manpage_lists_exactly_the_commands() -> None:
    """
    The COMMANDS section of man/resticd-users.8 has one entry for every
    command of C{resticd-users} and none for a command it does not have.
    """
    described = [tag.split()[0] for tag in man_tags(man_section("COMMANDS", USERS_MANPAGE))]
    assert len(described) == len(set(described)), "commands described twice"
    assert sorted(described) == sorted(users_commands())


def test_users_manpage_command_entries_show_their_arguments() -> None:
    """
    Each command's entry names its own options (other than C{--help}) and
    its positional arguments, and so does the SYNOPSIS.
    """
    tags = {tag.split()[0]: tag for tag in man_tags(man_section("COMMANDS", USERS_MANPAGE))}
    synopsis = deroff(man_section("SYNOPSIS", USERS_MANPAGE))
    lacking = {}
    for name, parser in users_commands().items():
        wanted = [o for o in option_strings(parser) if o not in ("-h", "--help")] + positionals(parser)
        absent = [w for w in wanted if not re.search(rf"(?<![\w-]){re.escape(w)}(?![\w-])", tags.get(name, ""))]
        usage = rf"(?<![\w-]){name}( \[[^]]*\])*" + "".join(f" {p}" for p in positionals(parser)) + r"(?![\w-])"
        if not re.search(usage, synopsis):
            absent.append("(synopsis)")
        if absent:
            lacking[name] = absent
    assert lacking == {}


def test_users_manpage_options_section_lists_exactly_the_options() -> None:
    """
    The OPTIONS section of man/resticd-users.8 has an entry for every option
    string of C{resticd-users} and of its commands, and none for an option
    they do not have.
    """
    parsers = [users_parser(), *users_commands().values()]
    options = {s for parser in parsers for s in option_strings(parser)}
    described = users_man_options()
    assert len(described) == len(set(described)), "options described twice"
    assert sorted(described) == sorted(options)


def test_users_manpage_sections() -> None:
    """
    The manual page of C{resticd-users} has the sections of a command's
    page, in order.
    """
    titles = [" ".join(_macro_args(line[3:])) for line in man_lines(USERS_MANPAGE) if line.startswith(".SH")]
    assert titles == [
        "NAME",
        "SYNOPSIS",
        "DESCRIPTION",
        "COMMANDS",
        "OPTIONS",
        "EXIT STATUS",
        "FILES",
        "EXAMPLES",
        "SEE ALSO",
    ]
