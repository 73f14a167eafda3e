"""The one pair-list reader behind both batch faces (``DeepSalRegLib/pairs.py``)."""
import pytest

from DeepSalRegLib.errors import InputError
from DeepSalRegLib.pairs import read_pairs


def test_paths_are_relative_to_the_list_and_names_are_unique(tmp_path):
    (tmp_path / "sub").mkdir()
    pairs = tmp_path / "sub" / "pairs.csv"
    pairs.write_bytes("\ufefffixed , moving,fixed_mask,name\n"
                      "a.nrrd, b.nrrd ,m.nrrd,\n"
                      "/abs/a.nrrd,b.nrrd,,\n"
                      "a.nrrd,c.nii.gz,,mine\n".encode("utf-8"))
    rows = read_pairs(pairs)
    assert [r["name"] for r in rows] == ["001_b", "002_b", "mine"]
    assert rows[0]["fixed"] == str(tmp_path / "sub" / "a.nrrd") and rows[0]["moving"] == str(tmp_path / "sub" / "b.nrrd")
    assert rows[0]["fixed_mask"] == str(tmp_path / "sub" / "m.nrrd") and rows[1]["fixed_mask"] is None
    assert rows[1]["fixed"] == "/abs/a.nrrd" and rows[0]["moving_landmarks"] is None
    (tmp_path / "dup.csv").write_text("fixed,moving,name\na,b,x\na,b,x\n")
    assert [r["name"] for r in read_pairs(tmp_path / "dup.csv")] == ["x", "x_"]


@pytest.mark.parametrize("text", ["a,b\n1,2\n", ""])
def test_a_list_without_fixed_and_moving_is_refused(tmp_path, text):
    (tmp_path / "p.csv").write_text(text)
    with pytest.raises(InputError, match="fixed and moving"):
        read_pairs(tmp_path / "p.csv")
    with pytest.raises(InputError, match="not found"):
        read_pairs(tmp_path / "missing.csv")
