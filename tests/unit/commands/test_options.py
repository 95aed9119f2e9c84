"""The commands' torch-free choice lists match the library tables they stand for."""

from __future__ import annotations

from qlora_med.artifacts.export import FORMATS
from qlora_med.commands._options import DTYPE_CHOICES, EXPORT_FORMATS, human_size
from qlora_med.model.load import DTYPES


def test_choice_lists_match_the_library():
    assert set(DTYPE_CHOICES) == set(DTYPES)
    assert tuple(EXPORT_FORMATS) == tuple(FORMATS)


def test_human_size():
    assert [human_size(n) for n in (512, 2_500, 3_200_000, 7_000_000_000)] == ["512 B", "2.5 KB", "3.2 MB", "7.0 GB"]
