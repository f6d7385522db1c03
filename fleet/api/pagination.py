"""The API's one pagination: `limit` and `offset`, with `limit` capped.

An uncapped limit goes into the SQL as given: a 26-digit one made PostgreSQL refuse the
query ("bigint out of range", an HTTP 500), and a merely large one asks one request to
serialise the whole table. A limit over the cap is served as the cap, as DRF does with
`max_limit`; the `next` link then names the cap. An offset past the end is an empty page
(DRF answers it without a query).
"""

from __future__ import annotations

from rest_framework.pagination import LimitOffsetPagination

MAX_PAGE_LIMIT = 1000


class BoundedLimitOffsetPagination(LimitOffsetPagination):
    max_limit = MAX_PAGE_LIMIT
