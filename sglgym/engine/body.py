"""Reading a request body with a size limit: an oversize body is a 413, never a long parse."""

from __future__ import annotations

from starlette.requests import Request

from .protocol import ApiError, parse_json_body


async def read_json_body(request: Request, limit: int) -> dict:
    """The JSON body; a 413 when it is (or is declared to be) larger than `limit` bytes."""
    declared = request.headers.get("content-length", "")
    parts, size = [], 0
    keep = not (declared.isdigit() and int(declared) > limit)
    async for part in request.stream():
        size += len(part)
        if size > limit:
            keep = False
        if size > 4 * limit:  # a client that never stops: answer now, the connection closes
            break
        if keep:
            parts.append(part)
    # the body is read to its end first: a client still sending would see a reset instead of the 413
    if not keep:
        raise ApiError(f"the request body exceeds {limit} bytes (sglgym serve --max-request-mb)",
                       param="body", status=413, type_="request_too_large")
    return parse_json_body(b"".join(parts))
