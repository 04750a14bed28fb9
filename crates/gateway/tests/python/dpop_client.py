"""An MCP client built on the official Python SDK (`mcp`), speaking to remit's gateway.

It exists so that the gateway is tested end to end with a real MCP client library, not only
with hand-written JSON-RPC: `crates/gateway/tests/it/mcp_client.rs` runs it against remit in
front of a real MCP server. The SDK drives the protocol (initialize, the initialized
notification, its GET stream, session ids, session termination); this script only adds what
remit requires on every HTTP request, through an `httpx.Auth`: `Authorization: DPoP <token>`
and a fresh DPoP proof (RFC 9449) signed for that request's method and URL.

Usage: dpop_client.py BASE_URL TOOL TOKEN PRIVATE_JWK_FILE [--allowed NAME] [--denied NAME]

It lists the tools, calls an allowed one and a denied one, and prints one JSON object:
`tools` (names listed), `allowed` (the call's text content and isError), `denied` (the
`McpError` the SDK raised: code, message, data), `http` (method, path and status of every
HTTP request, each with its own proof) and `response_headers` (every header the client
received, so the test can check that no upstream secret reached it).
"""

import argparse
import asyncio
import base64
import hashlib
import json
import sys
import time
import uuid
from collections.abc import Generator

import httpx
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from mcp import ClientSession, McpError
from mcp.client.streamable_http import streamable_http_client


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def canonical(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


class DPoPAuth(httpx.Auth):
    """Adds the task token and a fresh DPoP proof to every request the SDK sends."""

    def __init__(self, token: str, jwk: dict[str, str]) -> None:
        if jwk.get("kty") != "EC" or jwk.get("crv") != "P-256":
            raise ValueError("the key must be an EC P-256 private JWK")
        self.token = token
        self.key = ec.derive_private_key(int.from_bytes(b64url_decode(jwk["d"]), "big"), ec.SECP256R1())
        self.public = {"kty": "EC", "crv": "P-256", "x": jwk["x"], "y": jwk["y"]}
        self.ath = b64url(hashlib.sha256(token.encode("ascii")).digest())
        self.http: list[dict[str, object]] = []
        self.response_headers: list[list[str]] = []

    def proof(self, method: str, url: httpx.URL) -> str:
        header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": self.public}
        claims = {
            "htm": method,
            "htu": str(url.copy_with(query=None, fragment=None)),
            "iat": int(time.time()),
            "jti": str(uuid.uuid4()),
            "ath": self.ath,
        }
        signing_input = f"{b64url(canonical(header))}.{b64url(canonical(claims))}".encode("ascii")
        r, s = decode_dss_signature(self.key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return f"{signing_input.decode('ascii')}.{b64url(signature)}"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"DPoP {self.token}"
        request.headers["DPoP"] = self.proof(request.method, request.url)
        response = yield request
        self.http.append({"method": request.method, "path": request.url.path, "status": response.status_code})
        self.response_headers.extend([name, value] for name, value in response.headers.items())


async def run(args: argparse.Namespace) -> dict[str, object]:
    with open(args.jwk, encoding="utf-8") as file:
        auth = DPoPAuth(args.token, json.load(file))
    url = f"{args.base.rstrip('/')}/mcp/{args.tool}"
    output: dict[str, object] = {}
    async with httpx.AsyncClient(auth=auth, timeout=httpx.Timeout(30, read=60)) as http:
        async with streamable_http_client(url, http_client=http) as (read, write, _):
            async with ClientSession(read, write) as session:
                initialized = await session.initialize()
                output["server"] = initialized.serverInfo.name
                listed = await session.list_tools()
                output["tools"] = [tool.name for tool in listed.tools]

                called = await session.call_tool(args.allowed, json.loads(args.arguments))
                output["allowed"] = {
                    "text": [block.text for block in called.content if block.type == "text"],
                    "is_error": called.isError,
                }

                try:
                    refused = await session.call_tool(args.denied, json.loads(args.arguments))
                    output["denied"] = {"unexpected_result": refused.model_dump(mode="json")}
                except McpError as error:
                    output["denied"] = {
                        "code": error.error.code,
                        "message": error.error.message,
                        "data": error.error.data,
                    }
    # After the session closed: its termination (DELETE) is in the record too.
    output["http"] = auth.http
    output["response_headers"] = auth.response_headers
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="remit's public URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("tool", help="the remit tool fronting the MCP server (/mcp/{tool})")
    parser.add_argument("token", help="the task token")
    parser.add_argument("jwk", help="file holding the agent's private JWK (EC P-256)")
    parser.add_argument("--allowed", default="read_file", help="an MCP tool the task may call")
    parser.add_argument("--denied", default="write_file", help="an MCP tool outside the task's scopes")
    parser.add_argument("--arguments", default='{"path": "notes.txt"}', help="the calls' arguments, JSON")
    output = asyncio.run(run(parser.parse_args()))
    json.dump(output, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
