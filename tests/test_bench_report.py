"""bench/RESULTS.md keeps one section per benchmark and replaces it when the benchmark reruns."""

from bench.report import Section, write_section


def test_rerun_replaces_its_own_section_and_keeps_the_others(tmp_path):
    results = tmp_path / "RESULTS.md"
    write_section(results, "a", Section("A", "a=1"), command="python -m bench a", machine="m")
    write_section(results, "b", Section("B", "b=1"), command="python -m bench b", machine="m")
    write_section(results, "a", Section("A", "a=2"), command="python -m bench a", machine="m")
    text = results.read_text()
    assert "a=2" in text and "a=1" not in text
    assert "b=1" in text
    assert text.count("## A") == 1 and text.index("## A") < text.index("## B")
