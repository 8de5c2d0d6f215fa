import numpy as np
import pytest

from moetuner.io import write_atomic, write_npz


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "out.json"

    def explode(handle):
        handle.write("partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_atomic(target, explode)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_previous_file(tmp_path):
    target = tmp_path / "out.npz"
    write_npz(target, a=np.arange(3))
    with pytest.raises(RuntimeError):
        write_atomic(target, lambda handle: (_ for _ in ()).throw(RuntimeError("x")), binary=True)
    with np.load(target) as data:
        np.testing.assert_array_equal(data["a"], np.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["out.npz"]
