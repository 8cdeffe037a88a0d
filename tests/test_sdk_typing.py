"""The SDKs' public API is typed (PEP 561 `py.typed`, `mypy --strict` clean), so that mistakes
in calling it are type errors and results have their real types, not Any."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

mypy_api = pytest.importorskip("mypy.api", reason="mypy comes with the test extra")

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_mypy(*args: str) -> tuple[str, int]:
    stdout, stderr, status = mypy_api.run(list(args))
    return stdout + stderr, status


def test_both_sdks_pass_mypy_strict():
    # The [tool.mypy] section of pyproject.toml names the packages and sets strict = true.
    output, status = run_mypy("--config-file", str(REPO_ROOT / "pyproject.toml"))
    assert status == 0, output


def test_user_code_gets_real_types_and_typos_are_errors(tmp_path):
    user_code = tmp_path / "user_code.py"
    user_code.write_text(
        textwrap.dedent(
            """
            from client_sdk import Client, SyncClient

            async def main() -> None:
                async with Client(["127.0.0.1:4730"]) as client:
                    reveal_type(await client.submit_background("f", 1))
                    reveal_type(await client.status("H:x:1"))
                    await client.submit("f", 1, priorty="high")
                    await client.submit("f", 1, priority="hihg")

            def sync() -> None:
                with SyncClient(["127.0.0.1:4730"]) as client:
                    reveal_type(client.submit_background("f", 1))
                    reveal_type(client.status("H:x:1"))
            """
        )
    )
    no_config = tmp_path / "mypy.ini"
    no_config.write_text("[mypy]\n")
    output, status = run_mypy("--strict", "--config-file", str(no_config), str(user_code))
    assert status == 1, output
    said = said_per_line(output, user_code.name)
    assert 'Unexpected keyword argument "priorty"' in said[8], output
    assert "incompatible type \"Literal['hihg']\"" in said[9], output
    for line in (6, 13):  # submit_background
        assert "Revealed type is" in said[line] and "JobHandle" in said[line], output
    for line in (7, 14):  # status
        assert "Revealed type is" in said[line] and "JobStatus" in said[line], output
    assert "Any" not in said[6] + said[7] + said[13] + said[14], output


def said_per_line(output: str, file_name: str) -> dict[int, str]:
    """mypy's messages for each line of `file_name` ("file:line: kind: text")."""
    said: dict[int, str] = {}
    for line in output.splitlines():
        where, _, message = line.partition(": ")
        name, _, number = where.rpartition(":")
        if name.endswith(file_name) and number.isdigit():
            said[int(number)] = said.get(int(number), "") + message + "\n"
    return said
