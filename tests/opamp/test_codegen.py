from __future__ import annotations

from opamp.codegen import stale_modules


def test_the_committed_protobuf_modules_match_the_proto_files():
    assert stale_modules() == [], "run: python -m opamp.codegen"
