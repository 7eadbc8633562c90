"""The man page documents the inventory, the files on each host, the JSON output and the options it names."""

from pathlib import Path

MAN = Path(__file__).resolve().parents[2] / "man" / "drtool.1"


def test_man_page_has_the_sections_operators_look_for():
    text = MAN.read_text()
    for section in (".SH INVENTORY", ".SH FILES", ".SH JSON OUTPUT", ".SH SSH", ".SH EXIT STATUS"):
        assert section in text
    for words in ("replica_dir", "source_dir", "drtool_dir", "history/", "manifest.json", "schema_version",
                  "ProxyJump", "\\-\\-wait", "\\-\\-keep", "\\-\\-max\\-lag", "\\-q"):
        assert words in text, words
