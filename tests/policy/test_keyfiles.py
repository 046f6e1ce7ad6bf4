"""keyfiles: what tokens.py and cloudstack.py share (key-file reading, strict JSON, excerpts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from consoleproxy.errors import ConsoleProxyError
from consoleproxy.policy.keyfiles import json_document, load_key_file, short, strict_json


class FileError(ConsoleProxyError):
    pass


def parse(text: str) -> dict[str, object]:
    doc = json_document(text, "test file", FileError)
    if not isinstance(doc, dict):
        raise FileError("test file is not a JSON object")
    return doc


def test_short() -> None:
    assert short("abc") == "'abc'"
    assert short("x" * 100) == repr("x" * 100)[:37] + "..."
    assert len(short("x" * 10_000)) == 40


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'{"a": 1, "a": 2}', "duplicate key 'a'"),
        (b'{"a": NaN}', "NaN is not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"a": "\xff"}', "utf-8"),
        (b"{", "Expecting"),
    ],
)
def test_strict_json_refuses(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        strict_json(data)


def test_strict_json_reads_json() -> None:
    assert strict_json(b'{"a": [1, "\xc3\xa9"]}') == {"a": [1, "\u00e9"]}


def test_json_document_names_the_place() -> None:
    with pytest.raises(FileError, match=r"^test file is not JSON \(line 2 column 1\)$"):
        parse('{"a":\n')
    with pytest.raises(FileError, match=r"^test file is not JSON$"):
        parse("[" * 100_000)


def test_load_key_file(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text('{"k": 1}', encoding="utf-8")
    assert load_key_file(good, parse, FileError) == {"k": 1}
    bad = tmp_path / "bad.json"
    bad.write_text("[1]", encoding="utf-8")
    with pytest.raises(FileError, match=f"^{bad}: test file is not a JSON object$"):
        load_key_file(bad, parse, FileError)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(FileError, match=f"^{binary}: not UTF-8 text$"):
        load_key_file(binary, parse, FileError)
    with pytest.raises(FileError, match=f"^{tmp_path}: cannot read"):
        load_key_file(tmp_path, parse, FileError)  # a directory
    with pytest.raises(FileNotFoundError):  # each caller words a missing file itself
        load_key_file(tmp_path / "missing.json", parse, FileError)
