"""cvlib.inference.inputs: every way to name the files to score resolves to one root and sorted, unique
paths relative to it; explicit lists keep entries that are missing or not images (they get an
error row when scored), a folder walk keeps only names that claim an image."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cvlib.inference.inputs import InputSpecError, holds_input_files, is_glob, list_input_files, resolve_inputs


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for rel in ["a/1.jpg", "a/2.png", "b/c/3.jpeg", "b/notes.txt", ".hidden/4.jpg", "b/.5.jpg", "top.JPG"]:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    return root


def test_folder_is_walked_recursively_for_image_names(tree):
    inputs = resolve_inputs(tree)
    assert inputs.kind == "folder" and inputs.root == tree.resolve()
    assert inputs.paths == ["a/1.jpg", "a/2.png", "b/c/3.jpeg", "top.JPG"]
    assert inputs.paths == list_input_files(tree)


def test_a_folder_is_probed_for_inputs_without_listing_it(tree, tmp_path):
    """What the CLI asks before the flow lists the folder: is there anything to score at all?"""
    assert holds_input_files(tree)
    assert holds_input_files(tree / "b")  # only in a sub-folder
    empty = tmp_path / "empty"
    for rel in [".hidden/1.jpg", "a/.2.jpg", "a/notes.txt"]:
        (empty / rel).parent.mkdir(parents=True, exist_ok=True)
        (empty / rel).write_bytes(b"x")
    assert not holds_input_files(empty) and list_input_files(empty) == []


def test_single_image_file(tree):
    inputs = resolve_inputs(tree / "a" / "1.jpg")
    assert (inputs.kind, inputs.root, inputs.paths) == ("file", (tree / "a").resolve(), ["1.jpg"])


def test_glob_root_is_the_fixed_prefix_and_matches_are_taken_as_given(tree):
    inputs = resolve_inputs(f"{tree}/b/**/*")
    assert inputs.kind == "glob" and inputs.root == (tree / "b").resolve()
    assert inputs.paths == ["c/3.jpeg", "notes.txt"]  # explicit: a non-image still gets its (error) row
    assert resolve_inputs(f"{tree}/**/*.jpg").paths == ["a/1.jpg"]  # glob skips hidden names; *.jpg is case-sensitive
    assert is_glob("x/*.jpg") and not is_glob("x/y.jpg")
    with pytest.raises(InputSpecError, match="matches no files"):
        resolve_inputs(f"{tree}/*.gif")


def test_text_list_relative_to_its_folder_absolute_missing_and_duplicates(tree, tmp_path):
    lst = tree / "list.txt"
    lst.write_text(f"# a comment\na/1.jpg\n\n  b/c/3.jpeg  \n{tree / 'a' / '1.jpg'}\na/gone.jpg\n./a/../a/2.png\n")
    inputs = resolve_inputs(lst)
    assert inputs.kind == "list" and inputs.root == tree.resolve()
    assert inputs.paths == ["a/1.jpg", "a/2.png", "a/gone.jpg", "b/c/3.jpeg"]  # one row per file, missing kept


def test_text_list_root_is_the_common_folder_and_can_be_given(tree, tmp_path):
    lst = tmp_path / "elsewhere" / "paths.lst"
    lst.parent.mkdir()
    lst.write_text(f"{tree / 'a' / '1.jpg'}\n{tree / 'a' / '2.png'}\n")
    assert resolve_inputs(lst).root == (tree / "a").resolve()
    assert resolve_inputs(lst).paths == ["1.jpg", "2.png"]
    given = resolve_inputs(lst, root=tree)
    assert given.root == tree.resolve() and given.paths == ["a/1.jpg", "a/2.png"]
    with pytest.raises(InputSpecError, match="outside the root"):
        resolve_inputs(lst, root=tree / "b")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(InputSpecError, match="names no files"):
        resolve_inputs(empty)


def test_manifest_root_from_metadata_argument_or_its_folder(tree, tmp_path):
    table = pa.Table.from_pandas(pd.DataFrame({"path": ["a/1.jpg", "b/c/3.jpeg", "a/1.jpg"], "label": ["x", "y", "x"]}))
    beside = tree / "manifest.parquet"
    pq.write_table(table, beside)
    assert resolve_inputs(beside).paths == ["a/1.jpg", "b/c/3.jpeg"] and resolve_inputs(beside).kind == "manifest"

    away = tmp_path / "m" / "manifest.parquet"
    away.parent.mkdir()
    pq.write_table(table, away)
    with pytest.raises(InputSpecError, match="--root"):
        resolve_inputs(away)
    assert resolve_inputs(away, root=tree).root == tree.resolve()
    declared = table.replace_schema_metadata({"visionflow.data_dir": str(tree)})
    pq.write_table(declared, away)
    assert resolve_inputs(away).root == tree.resolve()

    no_path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"file": ["a/1.jpg"]}), no_path)
    with pytest.raises(InputSpecError, match="no 'path' column"):
        resolve_inputs(no_path)


def test_missing_spec_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_inputs(tmp_path / "nope")
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\xff\xfe\x00\x80" * 10)
    with pytest.raises(InputSpecError, match="UTF-8"):
        resolve_inputs(binary)
