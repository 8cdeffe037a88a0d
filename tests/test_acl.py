"""The `--acl` file (jobserver/acl.py): its parsing and errors, one identity's permissions, and
the start-up errors of the ACL options. No server runs here except to fail at start; the live
screening of packets and admin commands is tests/test_acl_server.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import servers
from servers import HOST
from test_cli_support import one_line, run_jobserver

from jobserver import cli
from jobserver.acl import (
    MAX_CACHED_FUNCTIONS,
    NO_RIGHTS,
    AccessList,
    AclError,
    Permissions,
    Rights,
    load_acl,
    parse_acl,
)

EXAMPLE = """
[identity."webapp"]
invoke = ["resize*"]

[identity."worker-a"]
register = ["resize*"]

[identity."ops"]
invoke = ["*"]
admin = true

[anonymous]
invoke = ["public_*"]
"""
"""The file the module docstring of jobserver/acl.py shows."""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "acl.toml"
    path.write_text(text)
    return path


# --- parsing -----------------------------------------------------------------------------------


def test_the_documented_example_parses_into_each_identitys_rights(tmp_path):
    path = write(tmp_path, EXAMPLE)

    acl = load_acl(path)

    assert acl.path == path
    assert dict(acl.identities) == {
        "webapp": Rights(invoke=("resize*",)),
        "worker-a": Rights(register=("resize*",)),
        "ops": Rights(invoke=("*",), admin=True),
    }
    assert acl.anonymous == Rights(invoke=("public_*",))


def test_an_empty_file_grants_nothing_to_anyone(tmp_path):
    acl = load_acl(write(tmp_path, ""))

    assert dict(acl.identities) == {}
    assert acl.anonymous == NO_RIGHTS
    assert not acl.permissions(None).may_invoke(b"anything")


def test_identity_names_may_hold_any_characters_when_quoted(tmp_path):
    acl = load_acl(write(tmp_path, '[identity."CN with spaces, =signs and é"]\nadmin = true\n'))

    assert acl.knows("CN with spaces, =signs and é")
    assert acl.permissions("CN with spaces, =signs and é").admin


BAD_DOCUMENTS = {
    # case: (the TOML, words the error must hold)
    "unknown table": (
        '[identities."x"]\ninvoke = ["a"]\n',
        'unknown table(s) identities; expected [identity."<name>"] and [anonymous]',
    ),
    "identity is not tables": ("identity = 3\n", '"identity" must be tables'),
    "one identity is not a table": (
        "[identity]\nx = 3\n",
        '[identity."x"] must be a table of invoke, register, admin',
    ),
    "unknown key": (
        '[identity."x"]\ninvok = ["a"]\n',
        '[identity."x"]: unknown key(s) invok; allowed: invoke, register, admin',
    ),
    "admin not a boolean": (
        '[identity."x"]\nadmin = "yes"\n',
        "[identity.\"x\"]: admin must be true or false, not 'yes'",
    ),
    "invoke a string, not a list": (
        '[identity."x"]\ninvoke = "resize*"\n',
        '[identity."x"] invoke must be a list of function globs',
    ),
    "register holding a number": (
        '[identity."x"]\nregister = ["a", 1]\n',
        '[identity."x"] register must be a list of function globs',
    ),
    "an empty glob": (
        '[identity."x"]\ninvoke = [""]\n',
        '[identity."x"] invoke must be a list of function globs',
    ),
    "anonymous not a table": ("anonymous = [1]\n", "[anonymous] must be a table of"),
    "anonymous with an unknown key": (
        "[anonymous]\nregistr = []\n",
        "[anonymous]: unknown key(s) registr",
    ),
}


@pytest.mark.parametrize("case", BAD_DOCUMENTS)
def test_a_bad_acl_file_is_an_error_naming_the_file_and_the_fault(case, tmp_path):
    text, words = BAD_DOCUMENTS[case]
    path = write(tmp_path, text)

    with pytest.raises(AclError) as raised:
        load_acl(path)

    message = str(raised.value)
    assert message.startswith(f"ACL file {path}: "), message
    assert words in message


def test_a_document_without_a_path_is_named_acl_in_errors():
    with pytest.raises(AclError, match=r"^ACL: \[anonymous\]: unknown key\(s\) root;"):
        parse_acl({"anonymous": {"root": True}})


def test_a_file_that_is_not_toml_is_an_error_naming_it_and_the_line(tmp_path):
    path = write(tmp_path, '[identity."x"]\ninvoke = resize*\n')  # a bare word

    with pytest.raises(AclError) as raised:
        load_acl(path)

    assert str(raised.value).startswith(f"ACL file {path} is not valid TOML: ")
    assert "line 2" in str(raised.value)


@pytest.mark.parametrize("what", ["missing", "a directory"])
def test_an_unreadable_acl_file_is_an_error_naming_it(what, tmp_path):
    path = tmp_path / "missing.toml" if what == "missing" else tmp_path
    cause = "No such file or directory" if what == "missing" else "Is a directory"

    with pytest.raises(AclError) as raised:
        load_acl(path)

    assert str(raised.value) == f"cannot read ACL file {path}: {cause}"


# --- one connection's permissions ---------------------------------------------------------------


def permissions(**rights) -> Permissions:
    return Permissions("someone", Rights(**rights))


@pytest.mark.parametrize(
    ("glob", "allowed", "denied"),
    [
        ("resize*", [b"resize", b"resize_png", b"resize*"], [b"Resize", b"xresize", b"resiz"]),
        ("job?", [b"job1", b"jobx", b"job?"], [b"job", b"job12", b"JOB1"]),
        ("[ab]_task", [b"a_task", b"b_task"], [b"c_task", b"ab_task", b"_task", b"A_task"]),
        ("[!ab]_task", [b"c_task"], [b"a_task", b"b_task"]),
        ("exact", [b"exact"], [b"exact ", b"exactly", b"inexact"]),
        ("*", [b"", b"anything", b"with\tcontrol\x01bytes", b"\xff\xfe"], []),
    ],
)
def test_globs_are_shell_patterns_on_the_whole_name_case_sensitive(glob, allowed, denied):
    who = permissions(invoke=(glob,), register=(glob,))

    for function in allowed:
        assert who.may_invoke(function) and who.may_register(function), function
    for function in denied:
        assert not who.may_invoke(function) and not who.may_register(function), function


def test_a_name_that_is_not_utf8_does_not_match_a_glob_of_the_same_characters():
    # "café" in Latin-1 is not "café": the file's globs are text, names on the wire bytes.
    who = permissions(invoke=("café",))

    assert who.may_invoke("café".encode())
    assert not who.may_invoke("café".encode("latin-1"))


def test_invoke_register_and_admin_are_separate_rights():
    invoker = permissions(invoke=("resize*",))
    registrar = permissions(register=("resize*",))
    admin = permissions(admin=True)

    assert invoker.may_invoke(b"resize") and not invoker.may_register(b"resize")
    assert registrar.may_register(b"resize") and not registrar.may_invoke(b"resize")
    assert not invoker.admin and not registrar.admin
    # Admin rights change the server and see every listing; they are not submit rights.
    assert admin.admin and not admin.may_invoke(b"resize") and not admin.may_register(b"resize")


def test_listings_show_a_function_one_may_invoke_or_register_and_every_one_to_an_admin():
    assert permissions(invoke=("a*",)).may_see(b"abc")
    assert permissions(register=("a*",)).may_see(b"abc")
    assert not permissions(invoke=("a*",), register=("b*",)).may_see(b"cde")
    assert permissions(admin=True).may_see(b"cde")


def test_several_globs_grant_the_union():
    who = permissions(invoke=("resize*", "thumb_?", "exact"))

    assert [who.may_invoke(f) for f in (b"resize_a", b"thumb_1", b"exact", b"thumb_12")] == [
        True,
        True,
        True,
        False,
    ]


def test_answers_stay_right_past_the_cache_bound():
    who = permissions(invoke=("even_*",))
    names = [b"even_%d" % n if n % 2 == 0 else b"odd_%d" % n for n in range(MAX_CACHED_FUNCTIONS)]

    for _ in range(2):  # the second round starts after the cache was cleared
        assert [who.may_invoke(name) for name in names] == [n % 2 == 0 for n in range(len(names))]
        assert who.may_invoke(b"even_once_more") and not who.may_invoke(b"odd_once_more")


def test_a_listed_cn_gets_its_table_and_any_other_name_the_anonymous_one(tmp_path):
    acl = load_acl(write(tmp_path, EXAMPLE))

    webapp, stranger, anonymous = (
        acl.permissions("webapp"),
        acl.permissions("stranger"),
        acl.permissions(None),
    )

    assert webapp.may_invoke(b"resize_x") and not webapp.may_invoke(b"public_x")
    assert stranger.may_invoke(b"public_x") and not stranger.may_invoke(b"resize_x")
    assert anonymous.may_invoke(b"public_x") and not anonymous.may_invoke(b"resize_x")
    # The log names who was denied: the certificate's CN even when it gets anonymous rights.
    assert (webapp.name, stranger.name, anonymous.name) == ("'webapp'", "'stranger'", "anonymous")
    assert acl.knows("webapp") and not acl.knows("stranger")


def test_an_access_list_made_in_code_defaults_to_nothing_for_anyone():
    acl = AccessList()

    assert not acl.permissions(None).may_see(b"x")
    assert not acl.permissions("ops").admin


# --- start-up errors ----------------------------------------------------------------------------


def start_failure(tmp_path: Path, *args: str):
    return run_jobserver(
        "-L", HOST, "-p", str(servers.free_port()), "--store", "memory", *args, cwd=tmp_path
    )


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('[identity."x"\n', "is not valid TOML: "),
        ('[identity."x"]\ninvok = ["a"]\n', ': [identity."x"]: unknown key(s) invok'),
        ('[identity."x"]\nadmin = 1\n', ': [identity."x"]: admin must be true or false, not 1'),
        ("[root]\n", ": unknown table(s) root"),
    ],
    ids=["bad TOML", "unknown key", "wrong type", "unknown table"],
)
def test_a_bad_acl_file_stops_the_start_with_one_line_naming_it(text, words, tmp_path):
    path = write(tmp_path, text)

    result = start_failure(tmp_path, "--acl", str(path))

    assert result.returncode == 1
    line = one_line(result)
    assert line.startswith(f"jobserver: ACL file {path}") and words in line, line


def test_a_missing_acl_file_stops_the_start_with_one_line_naming_it(tmp_path):
    path = tmp_path / "missing.toml"

    result = start_failure(tmp_path, "--acl", str(path))

    assert result.returncode == 1
    assert one_line(result) == f"jobserver: cannot read ACL file {path}: No such file or directory"


def test_a_loopback_identity_the_file_does_not_name_stops_the_start(tmp_path):
    path = write(tmp_path, EXAMPLE)

    result = start_failure(tmp_path, "--acl", str(path), "--loopback-identity", "opz")

    assert result.returncode == 1
    assert one_line(result) == f"jobserver: --loopback-identity 'opz' is not an identity in {path}"


def test_a_loopback_identity_without_an_acl_is_a_usage_error(tmp_path):
    result = start_failure(tmp_path, "--loopback-identity", "ops")

    assert result.returncode == 2
    assert "Invalid value for --loopback-identity: needs --acl" in result.stderr


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.53", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.0.2.10", False),
        ("status.example", False),  # a name is not resolved: warned about, to be safe
    ],
)
def test_http_beside_an_acl_is_warned_about_unless_it_is_bound_to_loopback(host, loopback):
    # The warning itself is logged by cli._log_started when this says False; a live test would
    # have to bind a non-loopback address, which the tests never do.
    assert cli._is_loopback(host) is loopback
