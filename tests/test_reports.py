"""Measurement files: every run's table is kept, each under its own command."""
from slt_probe.reports import append_table


def test_append_table_keeps_earlier_runs_and_creates_folders(tmp_path):
    path = tmp_path / "new" / "measurements.md"
    append_table(path, "Measured with `first`.", ["a", "b"], [[1, 2]])
    text = append_table(path, "Measured with `second`.", ["a", "b"], [[3, 4], [5, 6]])
    assert text == "Measured with `second`.\n\n| a | b |\n|---|---|\n| 3 | 4 |\n| 5 | 6 |\n"
    assert path.read_text() == ("Measured with `first`.\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n"
                                + text)
    assert not [p for p in path.parent.iterdir() if p.name != path.name]  # no temporary left
