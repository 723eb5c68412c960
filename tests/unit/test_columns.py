"""Membership tests on pandas' Arrow-backed strings, done in Arrow (cvlib.columns)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from cvlib.columns import isin


def test_isin_agrees_with_pandas_on_every_kind_of_column():
    values = ["a/1.jpg", None, "b/2.jpg", "c/3.jpg", "größe/4.jpg", "a/1.jpg"]
    wanted = {"a/1.jpg", "größe/4.jpg", "missing"}
    arrow = pd.Series(values, dtype="str")  # pandas' own string type: Arrow-backed
    assert isinstance(arrow.array, pd.api.extensions.ExtensionArray)
    for column in (arrow, pd.Series(values, dtype=object), pd.Index(values, dtype=object),
                   pd.Series(pd.arrays.ArrowExtensionArray(pa.array(values, pa.large_string())))):  # fmt: skip
        got = isin(column, wanted)
        assert got.dtype == bool and list(got) == [True, False, False, False, True, True], type(column)
    assert list(isin(pd.Series([1, 2, 3]), [2])) == [False, True, False]  # not strings: pandas' own
    assert not isin(arrow, []).any() and len(isin(arrow.iloc[:0], wanted)) == 0
    assert np.array_equal(isin(arrow, wanted), arrow.isin(wanted).to_numpy())
