"""A TCP proxy between the client and the live server, for what a network does to requests:
an answer lost after the server acted on the request (the connection drops on its way back),
a request lost before it arrives, and a gateway's own answer (a load balancer's 429 or 503).
Everything else passes through untouched; the proxy counts the requests it saw per path."""
from __future__ import annotations

import socket
import threading
from collections import Counter, defaultdict, deque
from dataclasses import dataclass


@dataclass
class Fault:
    kind: str  # "lose_answer" (forward, then drop the answer), "lose_request" (drop it unsent), "answer"
    raw_answer: bytes = b""


def _read_message(sock: socket.socket, buffer: bytearray) -> bytes | None:
    """One HTTP/1.1 message (head and body: Content-Length or chunked) from `sock`; None at EOF."""
    while b"\r\n\r\n" not in buffer:
        data = sock.recv(65536)
        if not data:
            return None
        buffer.extend(data)
    head_end = buffer.index(b"\r\n\r\n") + 4
    head = bytes(buffer[:head_end]).decode("latin-1").lower()
    length = 0
    chunked = False
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name == "content-length":
            length = int(value.strip())
        elif name == "transfer-encoding" and "chunked" in value:
            chunked = True
    if chunked:
        while b"0\r\n\r\n" not in buffer[head_end:]:
            data = sock.recv(65536)
            if not data:
                return None
            buffer.extend(data)
        end = buffer.index(b"0\r\n\r\n", head_end) + 5
    else:
        end = head_end + length
        while len(buffer) < end:
            data = sock.recv(65536)
            if not data:
                return None
            buffer.extend(data)
    message = bytes(buffer[:end])
    del buffer[:end]
    return message


def gateway_answer(status: int, reason: str, *, retry_after: str | None = None) -> bytes:
    body = b"<html><body>gateway says no</body></html>"
    headers = [f"HTTP/1.1 {status} {reason}", "Content-Type: text/html", f"Content-Length: {len(body)}",
               "Connection: close"]
    if retry_after is not None:
        headers.append(f"Retry-After: {retry_after}")
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + body


class Proxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.seen: Counter[str] = Counter()
        self._faults: dict[str, deque[Fault]] = defaultdict(deque)
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def fault(self, path: str, kind: str, *, times: int = 1, raw_answer: bytes = b"") -> None:
        """The next `times` requests to `path` meet this fault."""
        with self._lock:
            self._faults[path].extend(Fault(kind, raw_answer) for _ in range(times))

    def close(self) -> None:
        self._closed = True
        self.listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        from_client, from_upstream = bytearray(), bytearray()
        try:
            while True:
                request = _read_message(client, from_client)
                if request is None:
                    return
                path = request.split(b" ", 2)[1].split(b"?")[0].decode()
                with self._lock:
                    self.seen[path] += 1
                    fault = self._faults[path].popleft() if self._faults[path] else None
                if fault is not None and fault.kind == "lose_request":
                    return  # the connection drops before the server sees anything
                if fault is not None and fault.kind == "answer":
                    client.sendall(fault.raw_answer)
                    return
                upstream.sendall(request)
                answer = _read_message(upstream, from_upstream)
                if answer is None:
                    return
                if fault is not None and fault.kind == "lose_answer":
                    return  # the server acted; its answer never reaches the client
                client.sendall(answer)
        except OSError:
            return
        finally:
            client.close()
            upstream.close()
