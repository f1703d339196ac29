"""The real-data fixtures: a missing dataset is a skip that says why, or a failure where CI requires the data."""

from __future__ import annotations

import pytest

from conftest import REQUIRE_DATA, real_dataset


def test_missing_real_data_skips_with_its_reason(tmp_path, monkeypatch):
    monkeypatch.delenv(REQUIRE_DATA, raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"real data not found: {tmp_path} has no imagesTr.*"
                                                     f"{REQUIRE_DATA}=1 makes this a failure"):
        real_dataset(tmp_path)


def test_missing_real_data_fails_where_it_is_required(tmp_path, monkeypatch):
    monkeypatch.setenv(REQUIRE_DATA, "1")
    with pytest.raises(pytest.fail.Exception, match=f"real data not found: {tmp_path}.*{REQUIRE_DATA}=1 requires it"):
        real_dataset(tmp_path)
    (tmp_path / "imagesTr").mkdir()
    assert real_dataset(tmp_path) == tmp_path  # present: the test runs
