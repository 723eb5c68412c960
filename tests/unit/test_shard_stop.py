"""``score_to_parts(stop=...)``: a shard told to stop (its Dask task was cancelled because its
client died) ends after the batch in hand, keeps what it wrote, and a rerun scores only the rest."""

from __future__ import annotations

from cvlib.inference.inputs import list_input_files
from cvlib.inference.output import read_predictions
from cvlib.inference.predict import score_to_parts
from tests.unit.test_predict import META, cfg, folder, model  # noqa: F401 - fixtures


def test_a_stopped_shard_keeps_its_rows_and_a_rerun_scores_the_rest(model, folder, tmp_path):  # noqa: F811
    files = list_input_files(folder)
    out = tmp_path / "ds"
    asked = []

    def stop() -> bool:
        asked.append(1)
        return True  # cancelled from the first batch on

    first = score_to_parts(model, META, folder, files, out, model_version="7", config=cfg(batch_size=2, part_size=2), stop=stop)
    assert first.stopped and first.processed == 2 and len(asked) == 1
    assert read_predictions(out)["path"].tolist() == files[:2]
    rest = score_to_parts(model, META, folder, files, out, model_version="7", config=cfg(batch_size=2))
    assert not rest.stopped and (rest.skipped, rest.processed) == (2, len(files) - 2)
    assert sorted(read_predictions(out)["path"]) == sorted(files)
