"""Reading calibration and evaluation text from the file formats users give."""

import json

import pytest

from compress.data import read_texts


def test_json_files_hold_an_array_or_json_lines_and_every_row_is_read(tmp_path):
    rows = [{"text": "First document."}, {"text": "Second one."}, {"text": "Third."}]
    pretty = tmp_path / "pretty.json"
    pretty.write_text(json.dumps(rows, indent=2))  # an array over many lines, not one row per line
    assert read_texts(pretty) == ["First document.", "Second one.", "Third."]
    lines = tmp_path / "lines.json"
    lines.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_texts(lines) == read_texts(pretty)
    strings = tmp_path / "strings.json"
    strings.write_text(json.dumps(["a text", "another"]))
    assert read_texts(strings) == ["a text", "another"]


@pytest.mark.parametrize("content,message", [
    ('{"text": "ok"}\n{broken\n', "line 2 is not JSON"),
    ('{"text": "ok"}\n[1, 2]\n', "line 2 is a JSON list"),
    ('{"text": "ok"}\n{"body": "no text"}\n', "line 2 has no text field 'text'"),
    ('[{"text": "ok"}, 5]', "element 1 is a JSON int"),
    ('[{"text": "ok"}', "not a valid JSON array"),
])
def test_a_bad_json_row_is_named(tmp_path, content, message):
    path = tmp_path / "eval.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_texts(path)
