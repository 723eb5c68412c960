"""Column operations pandas does slowly on its Arrow-backed strings (pandas 3's default ``str``
type), done in Arrow instead: at 100k rows the difference is a second against milliseconds."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc


def isin(column: pd.Series | pd.Index, values: Iterable) -> np.ndarray:
    """``column.isin(values)`` as a boolean array, in one Arrow hash lookup for string columns
    (pandas' own turns every value into an Arrow scalar first: 1.2 s for 100k paths)."""
    array = pa.array(column, from_pandas=True)
    if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
        return np.asarray(column.isin(list(values)), dtype=bool)
    value_set = pa.array(np.asarray(list(values), dtype=object), type=array.type, from_pandas=True)
    return pc.fill_null(pc.is_in(array, value_set=value_set), False).to_numpy(zero_copy_only=False).astype(bool)
