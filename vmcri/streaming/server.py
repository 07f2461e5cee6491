"""The CRI streaming server: Exec/Attach/PortForward hand out single-use URLs on this
HTTP/1.1 server; the kubelet (or crictl) connects and upgrades to SPDY/3.1 or
WebSocket. One thread per connection; a stuck backend only holds its own."""
from __future__ import annotations

import logging
import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from cri_api.v1 import api_pb2

from vmcri import errors
from vmcri.streaming import portforward, remotecommand as rc, websocket
from vmcri.streaming.spdy_session import Connection
from vmcri.streaming.tokens import TokenCache, TokenCacheFull

log = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 4 * 3600.0          # the kubelet's streaming idle timeout
STREAM_CREATION_TIMEOUT_S = 30.0     # the kubelet's too
MAX_CONNECTIONS = 256
KINDS = ("exec", "attach", "portforward")


class StreamingServer:
    def __init__(self, cfg, backend, *, idle_timeout: float | None = None,
                 stream_creation_timeout: float = STREAM_CREATION_TIMEOUT_S,
                 token_ttl: float = 60.0, max_tokens: int = 1000,
                 max_connections: int = MAX_CONNECTIONS):
        self.cfg = cfg
        self.backend = backend
        self.idle_timeout = idle_timeout if idle_timeout is not None else \
            float(getattr(cfg, "streaming_idle_timeout_s", IDLE_TIMEOUT_S))
        self.stream_creation_timeout = stream_creation_timeout
        self.tokens = TokenCache(token_ttl, max_tokens)
        self.max_connections = max_connections
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        handler = type("BoundHandler", (_Handler,), {"streaming": self})
        family = socket.AF_INET6 if ":" in self.cfg.streaming_address else socket.AF_INET
        server_cls = type("StreamingHTTPServer", (_HTTPServer,), {"address_family": family})
        self._httpd = server_cls((self.cfg.streaming_address, self.cfg.streaming_port), handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="streaming-http", daemon=True)
        self._thread.start()
        log.info("streaming server listening on %s", self.base_url)

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        with self._conns_lock:
            conns = list(self._conns)
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._httpd = None

    @property
    def address(self) -> tuple[str, int]:
        return self._httpd.server_address[:2]

    @property
    def base_url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    # -- CRI requests ----------------------------------------------------------------------
    def _url(self, kind: str, req) -> str:
        copy = type(req)()
        copy.CopyFrom(req)
        try:
            token = self.tokens.insert(kind, copy)
        except TokenCacheFull as e:
            raise errors.Unavailable(f"streaming: {e}; retry later") from e
        return f"{self.base_url}/{kind}/{token}"

    @staticmethod
    def _check_streams(req, needs_cmd: bool) -> None:
        if not req.container_id:
            raise errors.InvalidArgument("container_id: must not be empty")
        if needs_cmd and not req.cmd:
            raise errors.InvalidArgument("cmd: must not be empty")
        if req.tty and req.stderr:
            raise errors.InvalidArgument("stderr: must be false when tty is set (a tty merges stderr into stdout)")
        if not (req.stdin or req.stdout or req.stderr):
            raise errors.InvalidArgument("stdin, stdout, stderr: at least one must be set")

    def get_exec(self, req: api_pb2.ExecRequest) -> api_pb2.ExecResponse:
        self._check_streams(req, needs_cmd=True)
        self.backend.check_container(req.container_id)
        return api_pb2.ExecResponse(url=self._url("exec", req))

    def get_attach(self, req: api_pb2.AttachRequest) -> api_pb2.AttachResponse:
        self._check_streams(req, needs_cmd=False)
        self.backend.check_container(req.container_id)
        return api_pb2.AttachResponse(url=self._url("attach", req))

    def get_port_forward(self, req: api_pb2.PortForwardRequest) -> api_pb2.PortForwardResponse:
        if not req.pod_sandbox_id:
            raise errors.InvalidArgument("pod_sandbox_id: must not be empty")
        for i, p in enumerate(req.port):
            if not 1 <= p <= 65535:
                raise errors.InvalidArgument(f"port[{i}]: {p} is not in 1-65535")
        self.backend.check_sandbox(req.pod_sandbox_id)
        return api_pb2.PortForwardResponse(url=self._url("portforward", req))

    # -- connections -----------------------------------------------------------------------
    def _track(self, sock: socket.socket) -> bool:
        with self._conns_lock:
            if len(self._conns) >= self.max_connections:
                return False
            self._conns.add(sock)
            return True

    def _untrack(self, sock: socket.socket) -> None:
        with self._conns_lock:
            self._conns.discard(sock)

    def spdy_connection(self, sock: socket.socket, name: str):
        def factory(on_stream):
            return Connection(sock, server=True, on_stream=on_stream,
                              idle_timeout=self.idle_timeout, name=name).start()
        return factory


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def server_bind(self):
        # HTTPServer.server_bind looks up the FQDN of the address: a DNS wait for nothing
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]
        # a readable listener whose connection is gone by accept() must not block the
        # loop (and shutdown() behind it): accept then fails with EAGAIN and is retried
        self.socket.setblocking(False)


def _offered(headers, name: str) -> list[str]:
    return [p.strip() for v in (headers.get_all(name) or []) for p in v.split(",") if p.strip()]


class _Handler(BaseHTTPRequestHandler):
    streaming: StreamingServer
    protocol_version = "HTTP/1.1"
    server_version = "vmcri-streaming"
    rbufsize = 0          # nothing past the request head may sit in a Python buffer
    timeout = 30          # for reading the request head

    def log_message(self, fmt, *args):
        log.debug("streaming %s: " + fmt, self.client_address[0], *args)

    def _plain(self, code: int, message: str, extra: dict | None = None) -> None:
        body = (message + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.close_connection = True
        srv = self.streaming
        if not srv._track(self.connection):
            self._plain(503, "too many streaming connections")
            return
        try:
            self._route()
        except (ConnectionError, BrokenPipeError) as e:
            log.debug("streaming client %s went away: %s", self.client_address[0], e)
        except Exception:
            log.exception("streaming request %s failed", self.path)
        finally:
            srv._untrack(self.connection)

    do_POST = do_GET

    def _route(self) -> None:
        url = urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        if len(parts) != 2 or parts[0] not in KINDS or not parts[1]:
            self._plain(404, "not found")
            return
        kind, token = parts
        req = self.streaming.tokens.consume(token, kind)
        if req is None:
            self._plain(404, "unknown or expired streaming token")
            return
        upgrade = self.headers.get("Upgrade", "").strip().lower()
        if upgrade == "websocket":
            self._websocket(kind, req, url.query)
        elif upgrade == "spdy/3.1":
            self._spdy(kind, req)
        else:
            self._plain(400, "streaming needs 'Upgrade: SPDY/3.1' or 'Upgrade: websocket'")

    # -- SPDY ------------------------------------------------------------------------------
    def _spdy(self, kind: str, req) -> None:
        supported = [portforward.PROTOCOL_V1] if kind == "portforward" else list(rc.SPDY_PROTOCOLS)
        offered = _offered(self.headers, "X-Stream-Protocol-Version")
        if offered:
            protocol = next((p for p in offered if p in supported), None)
            if protocol is None:
                self._plain(403, f"unable to upgrade: unable to negotiate protocol: client supports "
                                 f"{offered}, server accepts {supported}",
                            {"X-Accepted-Stream-Protocol-Versions": ", ".join(supported)})
                return
        else:
            protocol = ""   # legacy clients that do not negotiate
        self.send_response(101, "Switching Protocols")
        self.send_header("Connection", "Upgrade")
        self.send_header("Upgrade", "SPDY/3.1")
        if protocol:
            self.send_header("X-Stream-Protocol-Version", protocol)
        self.end_headers()
        srv = self.streaming
        factory = srv.spdy_connection(self.connection, f"{kind}-{self.client_address[1]}")
        if kind == "portforward":
            portforward.serve_spdy(factory, srv.backend, req.pod_sandbox_id, list(req.port),
                                   srv.stream_creation_timeout)
            return
        rc.serve_spdy(factory, protocol or rc.V1, self._starter(kind, req),
                      req.stdin, req.stdout, req.stderr, req.tty, srv.stream_creation_timeout,
                      report_exit_code=(kind == "exec"))

    def _starter(self, kind: str, req):
        backend = self.streaming.backend
        if kind == "exec":
            return lambda: backend.exec(req.container_id, list(req.cmd), req.tty, req.stdin)
        return lambda: backend.attach(req.container_id, req.stdin, req.tty)

    # -- WebSocket -------------------------------------------------------------------------
    def _websocket(self, kind: str, req, query: str) -> None:
        if self.command != "GET":
            self._plain(405, "WebSocket upgrades must use GET")
            return
        supported = websocket.PORTFORWARD_PROTOCOLS if kind == "portforward" else websocket.EXEC_PROTOCOLS
        ports: list[int] = []
        tunnel = websocket.choose_protocol(_offered(self.headers, "Sec-WebSocket-Protocol"),
                                           supported) == websocket.SPDY_TUNNEL_PORTFORWARD
        if kind == "portforward" and not tunnel:
            try:
                ports = list(req.port) or [portforward.parse_port(p) for p in parse_qs(query).get("port", [])]
            except ValueError as e:
                self._plain(400, f"port: {e}")
                return
            if not ports:
                self._plain(400, "port: WebSocket port forwarding needs at least one port")
                return
        head = f"{self.command} {self.path} HTTP/1.1\r\n".encode("latin-1")
        head += b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in self.headers.items()) + b"\r\n"
        accepted = websocket.accept(self.connection, head, supported)
        if accepted is None:
            return
        ws, protocol = accepted
        srv = self.streaming
        if kind == "portforward" and protocol == websocket.SPDY_TUNNEL_PORTFORWARD:
            stream = websocket.WSByteStream(self.connection, ws)
            portforward.serve_spdy(srv.spdy_connection(stream, f"pf-tunnel-{self.client_address[1]}"),
                                   srv.backend, req.pod_sandbox_id, list(req.port), srv.stream_creation_timeout)
            return
        if kind == "portforward":
            websocket.serve_port_forward(self.connection, ws, protocol, srv.backend, req.pod_sandbox_id,
                                         ports, srv.idle_timeout)
            return
        websocket.serve_exec(self.connection, ws, protocol, self._starter(kind, req), req.stdin,
                             req.stdout, req.stderr, req.tty, srv.idle_timeout,
                             report_exit_code=(kind == "exec"))
