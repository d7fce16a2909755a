"""`--http-restricted-api`: an HTTP request to a restricted API group is answered only when it
carries the header its group asks for, as tritonserver's HTTP server does
(http_server.cc `RespondIfRestricted`): otherwise 403 with
`{"error": "This API is restricted, expecting header '<key>'"}`, before the body is parsed.

The groups are the gRPC ones (server/protocol/access.py); the header is the key itself (no
`triton-grpc-protocol-` prefix). As on gRPC, the expected value is kept only as a SHA-256
digest and compared with `hmac.compare_digest`, so no answer, log line or timing reveals it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Sequence

from server.http.transport import Response
from server.settings import Restriction


class HttpAccess:
    """group -> (header, digest) for every restricted group; `refusal` is None for an allowed request."""

    def __init__(self, restrictions: Sequence[Restriction]) -> None:
        self._rules: dict[str, tuple[str, bytes]] = {
            group: (r.header, hashlib.sha256(r.value.encode()).digest()) for r in restrictions for group in r.groups
        }

    def __bool__(self) -> bool:
        return bool(self._rules)

    def refusal(self, group: str, headers: dict[str, str]) -> Response | None:
        rule = self._rules.get(group)
        if rule is None:
            return None
        header, digest = rule
        value = headers.get(header)
        # latin-1: the transport decoded the header's bytes that way, so this gives them back.
        if value is not None and hmac.compare_digest(hashlib.sha256(value.encode("latin-1")).digest(), digest):
            return None
        message = f"This API is restricted, expecting header '{header}'"
        return Response(403, json.dumps({"error": message}).encode())
