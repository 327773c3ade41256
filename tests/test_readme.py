"""The README's Python example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # it writes logs/ and sulora-bbc-news/
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1
    exec(compile(blocks[0], str(README), "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "live_adapter_params" in out and "A_last" in out
    assert (tmp_path / "sulora-bbc-news" / "backbone.safetensors").is_file()
    assert list((tmp_path / "logs" / "bbc-news").glob("*.csv"))
