#!/usr/bin/env python3
"""An application backend for wsgate's proxies, in the standard library only.

    python3 examples/backend.py 3000      # then, in wsgate.toml:
    connect_proxy = "http://127.0.0.1:3000/connect"
    join_proxy    = "http://127.0.0.1:3000/join"
    publish_proxy = "http://127.0.0.1:3000/publish"

Each proxy POSTs a JSON event and waits for one of
    {"result": {...}}                                  allow (with what result may add)
    {"error": {"message": "...", "code": N}}           deny (the client is told the message)
    {"disconnect": {"code": 4000-4999, "reason": "..."}}  close the client
"""
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BANNED_WORDS = {"darn": "d**n"}
STAFF_ROOMS = ("staff-",)
messages = []  # what a real backend would persist


def connect(event):
    # event: user, username, address, claims (the token's), headers (proxy_headers)
    if event["user"] == "mallory":
        return {"error": {"message": "banned", "code": 4030}}
    return {"result": {"data": {"motd": f"welcome, {event['username']}"}}}


def join(event):
    # event: user, client, room, claims
    roles = (event.get("claims") or {}).get("roles", [])
    if event["room"].startswith(STAFF_ROOMS) and "staff" not in roles:
        return {"error": {"message": f"{event['room']} is for staff", "code": 403}}
    return {"result": {}}


def publish(event):
    # event: user, client, room, message, messageId
    text = event["message"]
    if "http://" in text:
        return {"error": {"message": "links are not allowed"}}
    for word, mask in BANNED_WORDS.items():
        text = text.replace(word, mask)
    messages.append({"room": event["room"], "user": event["user"], "message": text})
    return {"result": {"message": text}}


ROUTES = {"/connect": connect, "/join": join, "/publish": publish}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: wsgate pools its connections
    # Headers and body go out as two writes: without this, Nagle holds the body back until the
    # gateway's delayed ACK (~40 ms per call).
    disable_nagle_algorithm = True

    def do_POST(self):
        route = ROUTES.get(self.path)
        if route is None:
            self.send_error(404)
            return
        event = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        body = json.dumps(route(event)).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
