"""CCF's X.509 time parser (``ccf::ds::time_point_from_string``, include/ccf/ds/x509_time_fmt.h), as the sandbox
reads a ``valid_from``: three ``strptime`` formats that must match the whole text, then seven ``sscanf`` formats
that need only match a prefix (so trailing text is ignored), tried in CCF's order. Its quirks are kept: ``%y``
reads 69-99 as 19xx and 00-68 as 20xx while the ``sscanf`` path reads 50-99 as 19xx, and an offset's minutes are
subtracted with the sign they are written with (``-05:30`` moves the time by 4:30).

Independent of the agent's own reading (``signing_agent.proposals.ccf_x509_time``), which accepts only the forms
both agree on.
"""

from __future__ import annotations

import datetime
import re
from typing import Final

_STRPTIME: Final = ("%y%m%d%H%M%SZ", "%Y%m%d%H%M%SZ", "%Y-%m-%d %H:%M:%S")

# Each conversion reads as much as it can and never gives back (atomic groups), as sscanf does.
_U2, _U4 = r"\s*\+?((?>\d{1,2}))", r"\s*\+?((?>\d{1,4}))"
_F = r"\s*((?>[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?))"
_F2 = r"\s*((?>[+-]\d|\d{1,2}))"  # %02f: two characters, the sign included
_D = r"\s*((?>[+-]?\d+))"
_D3 = r"\s*((?>[+-]\d{1,2}|\d{1,3}))"  # %03d: three characters, the sign included
# (pattern, whether the year has two digits, how many fields sscanf must fill)
_SSCANF: Final = (
    (re.compile(rf"{_U4}-{_U2}-{_U2}\s*{_U2}:{_U2}:{_F}\s*{_D}:{_U2}"), False, 8),
    (re.compile(rf"{_U4}-{_U2}-{_U2}T{_U2}:{_U2}:{_F}\s*{_D}:{_U2}"), False, 8),
    (re.compile(rf"{_U4}-{_U2}-{_U2}\s*{_U2}:{_U2}:{_F}\s*{_D3}\s*{_U2}"), False, 8),
    (re.compile(rf"{_U2}{_U2}{_U2}{_U2}{_U2}{_F2}{_D3}{_U2}"), True, 8),
    (re.compile(rf"{_U4}{_U2}{_U2}{_U2}{_U2}{_F2}{_D3}{_U2}"), False, 8),
    (re.compile(rf"{_U4}-{_U2}-{_U2}T{_U2}:{_U2}:{_F}"), False, 6),
    (re.compile(rf"{_U4}-{_U2}-{_U2}\s*{_U2}:{_U2}:{_F}"), False, 6),
)


def parse_x509_time(text: str) -> datetime.datetime:
    """The UTC time CCF reads in ``text``; ``ValueError`` with CCF's message when it reads none."""
    for fmt in _STRPTIME:
        try:
            return datetime.datetime.strptime(text, fmt).replace(tzinfo=datetime.UTC)
        except ValueError:
            continue
    for pattern, two_digit_year, fields in _SSCANF:
        match = pattern.match(text)
        if match is None or len(match.groups()) != fields:
            continue
        when = _sscanf_time(match.groups(), two_digit_year=two_digit_year)
        if when is not None:
            return when
    raise ValueError(f"'{text}' does not match any accepted time format")


def _sscanf_time(groups: tuple[str | None, ...], *, two_digit_year: bool) -> datetime.datetime | None:
    y, m, d, h, mn = (int(g or 0) for g in groups[:5])
    s = float(groups[5] or 0)
    oh, om = (int(groups[6] or 0), int(groups[7] or 0)) if len(groups) == 8 else (0, 0)
    if two_digit_year:
        y += 1900 if y >= 50 else 2000
    if h > 24 or mn > 60 or s < 0.0 or (len(groups) == 8 and (s > 60.0 or not -23 <= oh <= 23 or om > 60)):
        return None
    try:
        date = datetime.datetime(y, m, d, tzinfo=datetime.UTC)
    except ValueError:
        return None
    moment = datetime.timedelta(hours=h, minutes=mn, microseconds=int(s * 1e6))
    return date + moment - datetime.timedelta(hours=oh) - datetime.timedelta(minutes=om)
