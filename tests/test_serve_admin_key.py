"""`stagebatch serve --admin-key-file`: the key comes from a file (a mounted Secret), or a clear error."""

from __future__ import annotations

import pytest

from stagebatch.commands import read_admin_key
from core.errors import BadParameterError


def test_read_admin_key_takes_the_files_single_word(tmp_path):
    path = tmp_path / "admin-key"
    path.write_text("0123abcd\n")
    assert read_admin_key(path) == "0123abcd"


@pytest.mark.parametrize("text", ["", "  \n", "two words\n"])
def test_read_admin_key_refuses_a_file_without_one_key(tmp_path, text):
    path = tmp_path / "admin-key"
    path.write_text(text)
    with pytest.raises(BadParameterError, match="must hold one key"):
        read_admin_key(path)


def test_read_admin_key_names_a_missing_file(tmp_path):
    with pytest.raises(BadParameterError, match="cannot be read"):
        read_admin_key(tmp_path / "absent")
