import os

import numpy as np
import pytest

from moetuner.errors import InputError
from moetuner.io import open_npz, read_json, write_atomic, write_json, write_npz


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


def test_outputs_get_the_mode_of_a_plain_open(tmp_path):
    umask = os.umask(0o022)
    try:
        write_npz(tmp_path / "a.npz", a=np.arange(2))
        assert (tmp_path / "a.npz").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(umask)


def test_read_helpers_name_the_file(tmp_path):
    (tmp_path / "x.json").write_text("{nope")
    with pytest.raises(InputError, match="x.json: file: expected a thing"):
        read_json(tmp_path / "x.json", "a thing")
    np.save(tmp_path / "y.npy", np.arange(2))
    with pytest.raises(InputError, match="single .npy"):
        open_npz(tmp_path / "y.npy", "an archive")
    with pytest.raises(InputError, match="an existing file"):
        open_npz(tmp_path / "missing.npz", "an archive")


def test_write_json_encodes_numpy_values(tmp_path):
    write_json(tmp_path / "a.json", {"ids": np.arange(3), "gap": np.float64(0.5),
                                     "nested": [np.int64(7)]})
    assert read_json(tmp_path / "a.json", "json") == {"ids": [0, 1, 2], "gap": 0.5,
                                                      "nested": [7]}


def test_write_together_all_or_none(tmp_path):
    from moetuner.io import write_together

    def fail(handle):
        raise RuntimeError("disk full")

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    with pytest.raises(RuntimeError):
        write_together({a: lambda h: h.write("{}"), b: fail})
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    write_together({a: lambda h: h.write("1"), b: lambda h: h.write("2")})
    assert a.read_text() == "1" and b.read_text() == "2"


def test_check_outputs_refuses_inputs_dirs_and_duplicates(tmp_path):
    from moetuner.io import check_outputs

    source = tmp_path / "in.npz"
    source.write_bytes(b"x")
    for outputs in ([str(source)], [str(tmp_path)], [""], [tmp_path / "o", tmp_path / "o"]):
        with pytest.raises(InputError):
            check_outputs(outputs, [source])
    check_outputs([tmp_path / "out.json"], [source])
