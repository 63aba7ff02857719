"""The import file of `vitalgate devices import`, parsed with no I/O: rows, or errors naming line and column."""

from __future__ import annotations

import pytest

from gateway.registry_import import ImportRow, RowError, parse_devices

KNOWN = {"pulse_oximeter", "thermometer"}


def test_rows_keep_their_line_and_skip_header_comments_and_blank_lines():
    text = "# ward 3\n\ndevice_id,profile\npo-a,pulse_oximeter\n\n  th-b , thermometer \n#po-x,toaster\n"
    assert parse_devices(text, KNOWN) == (
        [ImportRow(4, "po-a", "pulse_oximeter"), ImportRow(6, "th-b", "thermometer")], [])


def test_without_header_and_with_a_byte_order_mark():
    assert parse_devices("\ufeffpo-a,pulse_oximeter\r\npo-b,thermometer", KNOWN) == (
        [ImportRow(1, "po-a", "pulse_oximeter"), ImportRow(2, "po-b", "thermometer")], [])
    rows, errors = parse_devices("\ufeffDevice_ID,Profile\npo-a,pulse_oximeter\n", KNOWN)
    assert (rows, errors) == ([ImportRow(2, "po-a", "pulse_oximeter")], [])


def test_a_header_after_the_first_row_is_a_bad_row():
    rows, errors = parse_devices("po-a,pulse_oximeter\ndevice_id,profile\n", KNOWN)
    assert rows == [ImportRow(1, "po-a", "pulse_oximeter")]
    assert errors == [RowError(2, "profile", "unknown profile 'profile'")]


def test_every_error_is_reported_with_line_and_column():
    text = "device_id,profile\npo-a,pulse_oximeter\npo a,pulse_oximeter\npo-a,thermometer\npo-b,toaster\npo-c\n" \
           "bad id,toaster\npo-d,thermometer,extra\n" + "x" * 65 + ",thermometer\n"
    rows, errors = parse_devices(text, KNOWN)
    assert rows == [ImportRow(2, "po-a", "pulse_oximeter")]  # a row with an error is never returned
    assert errors == [
        RowError(3, "device_id", "'po a' must match [A-Za-z0-9._-]{1,64}"),
        RowError(4, "device_id", "'po-a' already on line 2"),
        RowError(5, "profile", "unknown profile 'toaster'"),
        RowError(6, None, "expected 2 columns (device_id,profile), got 1"),
        RowError(7, "device_id", "'bad id' must match [A-Za-z0-9._-]{1,64}"),
        RowError(7, "profile", "unknown profile 'toaster'"),
        RowError(8, None, "expected 2 columns (device_id,profile), got 3"),
        RowError(9, "device_id", f"{'x' * 65!r} must match [A-Za-z0-9._-]{{1,64}}"),
    ]
    assert [str(e) for e in errors[3:6]] == [
        "6: expected 2 columns (device_id,profile), got 1",
        "7: device_id: 'bad id' must match [A-Za-z0-9._-]{1,64}",
        "7: profile: unknown profile 'toaster'",
    ]


def test_a_duplicate_refers_to_the_first_valid_occurrence():
    _, errors = parse_devices("po-a,toaster\npo-a,thermometer\npo-a,thermometer\n", KNOWN)
    # line 1's id is valid, so it is the one a duplicate names, though its profile is not
    assert errors == [RowError(1, "profile", "unknown profile 'toaster'"),
                      RowError(2, "device_id", "'po-a' already on line 1"),
                      RowError(3, "device_id", "'po-a' already on line 1")]


@pytest.mark.parametrize("text", ["", "\n\n", "device_id,profile\n", "# nothing yet\n \n"])
def test_an_empty_file_has_neither_rows_nor_errors(text):
    assert parse_devices(text, KNOWN) == ([], [])


def test_quoted_fields_and_no_profiles_known():
    assert parse_devices('"po-a","pulse_oximeter"\n', KNOWN) == ([ImportRow(1, "po-a", "pulse_oximeter")], [])
    assert parse_devices("po-a,pulse_oximeter\n", set()) == ([], [RowError(1, "profile", "unknown profile 'pulse_oximeter'")])


def test_a_quoted_field_spanning_lines_keeps_later_line_numbers_exact():
    rows, errors = parse_devices('device_id,profile\n"po-a\n",pulse_oximeter\npo b,thermometer\n"po\nc",thermometer\n', KNOWN)
    assert rows == [ImportRow(2, "po-a", "pulse_oximeter")]  # fields are stripped, the newline with them
    assert errors == [RowError(4, "device_id", "'po b' must match [A-Za-z0-9._-]{1,64}"),
                      RowError(5, "device_id", "'po\\nc' must match [A-Za-z0-9._-]{1,64}")]


def test_a_field_csv_cannot_read_is_an_error_not_an_exception():
    rows, errors = parse_devices("po-a,thermometer\npo-b," + "x" * 200_000 + "\n", KNOWN)
    assert rows == [ImportRow(1, "po-a", "thermometer")]
    assert [(e.line, e.column) for e in errors] == [(2, None)] and "not readable as CSV: field larger than" in errors[0].message
