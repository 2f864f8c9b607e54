"""The journal's chunks: what goes in comes back, and a chunk is built in steps."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kport.journal.chunks import SOURCES, chunk_items, chunk_of, row_of


@given(
    st.lists(
        st.tuples(st.sampled_from(["proc", "file", "net", "kport", "other"]), st.binary()),
        min_size=1,
        max_size=50,
    ),
    st.integers(1, 2**40),
)
def test_a_chunk_gives_back_its_events(events: list[tuple[str, bytes]], first: int) -> None:
    rows = [(first + i, i, source, data) for i, (source, data) in enumerate(events)]
    chunk = chunk_of(rows)
    assert chunk[:5] == (first, first + len(rows) - 1, 0, len(rows) - 1, len(rows))
    items = list(chunk_items(*chunk[5:]))
    assert [(seq, SOURCES[code] or "other", data) for seq, code, data in items] == [
        (seq, source, data) for seq, _, source, data in rows
    ]


def test_a_chunk_is_built_in_steps_that_let_the_delivery_path_have_the_gil() -> None:
    rows = [row_of(seq, {"source": "proc", "ts": seq}, b"x" * seq) for seq in range(1, 600)]
    pauses: list[int] = []
    stepped = chunk_of(rows, lambda: pauses.append(1))
    assert len(pauses) >= 3  # between each step that holds the GIL
    assert stepped == chunk_of(rows)  # and the same chunk
