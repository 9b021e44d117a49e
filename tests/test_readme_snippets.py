"""The README's "Your data, object storage, Ray Tune" snippets, run as they are written: your own arrays, a
regression, a Parquet file, a Ray Dataset, S3 checkpoints (against the loopback S3 server, ``S3_ENDPOINT``) and a
Ray Tune sweep. Each runs in a fresh namespace in a scratch directory, on the session's Ray."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = "## Your data, object storage, Ray Tune"


def snippets() -> list[str]:
    text = README.read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return re.findall(r"```python\n(.*?)```", text[start:end if end != -1 else None], flags=re.S)


def test_the_section_shows_each_kind_of_snippet():
    found = snippets()
    assert len(found) == 6
    for needle in ("Dataset.from_arrays(x, y)", "grad_fn", "load_table_dataset(\"digits.parquet\"",
                   "ray.data.from_items", "checkpoint_dir=(s3,", "tune.Tuner("):
        assert any(needle in code for code in found), needle


@pytest.mark.parametrize("index", range(6))
def test_a_readme_snippet_runs_as_written(index, ray_session, s3_endpoint, tmp_path, monkeypatch, capsys):
    import pyarrow.fs

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("S3_ENDPOINT", s3_endpoint)
    bucket = pyarrow.fs.S3FileSystem(endpoint_override=s3_endpoint, scheme="http", allow_bucket_creation=True)
    if bucket.get_file_info("my-bucket").type == pyarrow.fs.FileType.NotFound:
        bucket.create_dir("my-bucket")
    code = snippets()[index]
    exec(compile(code, f"README.md snippet {index + 1}", "exec"), {"__name__": "__main__"})  # noqa: S102
    printed = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert printed, "every snippet prints its result"
    if index == 0:
        assert printed[-1].startswith("classification ")
    if index == 1:
        assert printed[-1].startswith("regression ")
    if index == 4:  # 20 pushes of ones through Adam (lr 0.1) from zeros: each bias-corrected step is -0.1
        values = [float(v) for v in re.findall(r"-?\d+\.\d*(?:e-?\d+)?", " ".join(printed))]
        assert len(values) == 8 and all(abs(v + 2.0) < 1e-5 for v in values), printed
