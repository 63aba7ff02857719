"""Observation search parameters: each value's precision decides its bounds; bad ones name themselves."""

from __future__ import annotations

import pytest

from gateway.fhir.search import SearchError, parse_observation_query

NOW = 1_800_000_000_000
DAY = 86_400_000


def q(**kw):
    return parse_observation_query({k: v if isinstance(v, list) else [v] for k, v in kw.items()}, NOW)


def test_date_prefixes_take_the_range_of_the_value_s_precision():
    day = 1_764_547_200_000  # 2025-12-01T00:00:00Z
    assert (q(device="d", date=["ge2025-12-01", "lt2025-12-02"]).frm, q(device="d", date=["ge2025-12-01", "lt2025-12-02"]).to) == (day, day + DAY)
    s = q(device="d", date=["gt2025-12-01T00:00:10Z", "le2025-12-01T01:00:20+01:00"])
    assert (s.frm, s.to) == (day + 11_000, day + 21_000)
    m = q(device="d", date=["ge2025-12-01T00:01Z", "le2025-12-01T00:02Z"])
    assert (m.frm, m.to) == (day + 60_000, day + 180_000)
    ms = q(device="d", date=["gt2025-12-01T00:00:00.5Z"])
    assert (ms.frm, ms.to) == (day + 501, NOW + DAY)
    assert (q(device="d").frm, q(device="d").to) == (NOW, NOW + DAY)  # the day before the default upper bound


def test_subjects_codes_and_result_parameters():
    s = q(subject="Patient/MRN 7", code="http://loinc.org|8867-4,150456", _count="5", _sort="-date")
    assert s.subject == ("patient", "MRN 7") and s.codes == [("http://loinc.org", "8867-4"), (None, "150456")]
    assert s.count == 5 and s.desc
    assert q(device="Device/po-1").subject == ("device", "po-1")


@pytest.mark.parametrize("params, word", [
    ({}, "patient|subject|device"), ({"device": "a", "patient": "b"}, "patient|subject|device"),
    ({"device": "a b"}, "device"), ({"device": "a", "date": "eq2025-01-01"}, "date"),
    ({"device": "a", "date": "ge2025-02-30"}, "date"), ({"device": "a", "date": "le9999-12-31"}, "date"),
    ({"device": "a", "_count": "1001"}, "_count"), ({"device": "a", "_sort": "value"}, "_sort"),
    ({"device": "a", "status": "final"}, "status"), ({"device": ["a", "b"]}, "device"),
])
def test_bad_parameters_are_refused_naming_them(params, word):
    with pytest.raises(SearchError) as e:
        q(**params)
    assert str(e.value).startswith(word)
