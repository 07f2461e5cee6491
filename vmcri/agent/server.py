"""SSH server of the agent over the virtio-serial port (paramiko, auth "none").

The port fd is not a socket, so each host connection is relayed through a socketpair:
one reader thread owns the port for the agent's whole life and feeds the current
session; b'' from read() means the host disconnected (HOST-NOTES §2), so the session
ends and the next bytes (a new banner) start a fresh SSH handshake.
"""
from __future__ import annotations

import os
import select
import socket
import threading
import time

import paramiko
from paramiko.common import MSG_CHANNEL_REQUEST
from paramiko.channel import Channel

from . import pid1, protocol, sync
from .handlers_system import AgentCallError

IDLE_POLL_S = 0.02


def ed25519_host_key() -> paramiko.PKey:
    """paramiko 2.12 cannot generate Ed25519 keys itself; build one from PyNaCl."""
    import nacl.signing
    sk = nacl.signing.SigningKey.generate()
    key = paramiko.Ed25519Key.__new__(paramiko.Ed25519Key)
    key.public_blob = None
    key._signing_key = sk
    key._verifying_key = sk.verify_key
    return key


def _handle_request_then_start(chan: Channel, m) -> None:
    """MSG_CHANNEL_REQUEST handler: adds `signal`, and starts an exec only after paramiko
    has sent its reply (starting earlier races the reply: host sees "Channel closed")."""
    pos = m.packet.tell()
    key = m.get_text()
    m.get_boolean()  # want_reply: paramiko's handler re-reads it
    server = chan.transport.server_object
    if key == "signal":
        name = m.get_text()
        server.on_signal(chan, name)
        return
    m.packet.seek(pos)
    Channel._handle_request(chan, m)
    if key == "exec":
        server.start_pending(chan)


class AgentTransport(paramiko.Transport):
    # paramiko's loop wakes this often to check for a close from another thread; our close
    # also shuts the socket, which wakes it at once. Every wake-up of an idle pod costs
    # emulated CPU under TCG, and at 0.1 s they made idle pods the limit on pods per node.
    _active_check_timeout = 2.0
    _channel_handler_table = dict(paramiko.Transport._channel_handler_table)
    _channel_handler_table[MSG_CHANNEL_REQUEST] = _handle_request_then_start


class SessionServer(paramiko.ServerInterface):
    def __init__(self, agent):
        self.agent = agent
        self._pending: dict[int, tuple] = {}
        self._ptys: dict[int, tuple[int, int]] = {}
        self._procs: dict[int, object] = {}   # chanid -> Process, for signal/window-change
        self._chans: dict[int, Channel] = {}
        self._forwards: dict[int, socket.socket] = {}  # chanid -> connected guest socket
        self._lock = threading.Lock()

    def get_allowed_auths(self, username):
        return "none"

    def check_auth_none(self, username):
        return paramiko.AUTH_SUCCESSFUL

    def check_channel_request(self, kind, chanid):
        if kind == "session":
            return paramiko.OPEN_SUCCEEDED
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_direct_tcpip_request(self, chanid, origin, destination):
        """Port-forward: only to the guest's own loopback (what CRI PortForward means)."""
        host, port = destination
        if host not in protocol.FORWARD_HOSTS or not 0 < int(port) < 65536:
            return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        conn = socket.socket(family, socket.SOCK_STREAM)
        conn.settimeout(5)
        try:
            conn.connect((host if host != "localhost" else "127.0.0.1", int(port)))
        except OSError:
            conn.close()
            return paramiko.OPEN_FAILED_CONNECT_FAILED
        conn.settimeout(None)
        with self._lock:
            self._forwards[chanid] = conn
        return paramiko.OPEN_SUCCEEDED

    def start_forward(self, chan) -> bool:
        """Called for every accepted channel: relays it if it is a port-forward."""
        with self._lock:
            conn = self._forwards.pop(chan.get_id(), None)
        if conn is None:
            return False
        threading.Thread(target=_relay, args=(chan, conn, True), daemon=True).start()
        threading.Thread(target=_relay, args=(chan, conn, False), daemon=True).start()
        return True

    def check_channel_pty_request(self, chan, term, width, height, pw, ph, modes):
        with self._lock:
            self._ptys[chan.get_id()] = (width, height)
        return True

    def check_channel_window_change_request(self, chan, width, height, pw, ph):
        with self._lock:
            self._ptys[chan.get_id()] = (width, height)
            proc = self._procs.get(chan.get_id())
        if proc is not None:
            proc.resize(width, height)
        return True

    def check_channel_exec_request(self, chan, command):
        try:
            method, params = protocol.decode_request(command)
            item = (method, params, None)
        except (protocol.ProtocolError, UnicodeDecodeError) as e:
            item = (None, None, ("InvalidArgument", str(e)))
        with self._lock:
            self._pending[chan.get_id()] = item
        return True

    def on_signal(self, chan, name):
        with self._lock:
            proc = self._procs.get(chan.get_id())
        if proc is not None:
            try:
                proc.signal(name)
            except protocol.ProtocolError as e:
                print(f"vmcri-agent: {e}", flush=True)

    def start_pending(self, chan):
        with self._lock:
            item = self._pending.pop(chan.get_id(), None)
        if item is not None:
            threading.Thread(target=self._serve_call, args=(chan, *item), daemon=True).start()

    # -- calls ------------------------------------------------------------------
    def _serve_call(self, chan, method, params, error):
        try:
            if error is None and method in protocol.STREAMING:
                self._serve_stream(chan, method, params)
                return
            if error is None:
                try:
                    handler = self.agent.handlers.get(method)
                    if handler is None:
                        raise AgentCallError("Unimplemented", f"method: {method} is not available here")
                    result = handler(self.agent, params)
                    reply = protocol.encode_reply(result)
                except AgentCallError as e:
                    reply = protocol.encode_reply(error=(e.kind, str(e)))
                except protocol.ProtocolError as e:
                    reply = protocol.encode_reply(error=("InvalidArgument", str(e)))
                except Exception as e:
                    reply = protocol.encode_reply(error=("Internal", f"{type(e).__name__}: {e}"))
            else:
                reply = protocol.encode_reply(error=error)
            chan.sendall(reply)
            chan.send_exit_status(0 if reply.startswith(b'{"ok":true') else 1)
            chan.shutdown_write()
            chan.close()
        except Exception as e:  # host vanished mid-reply: nothing to tell anyone
            print(f"vmcri-agent: call {method} reply failed: {e}", flush=True)

    def _serve_stream(self, chan, method, params):
        procs = self.agent.procs
        if method == "run":
            with self._lock:
                size = self._ptys.get(chan.get_id())
            if size is not None:
                params = dict(params, tty=True)
            on_end = spawner = None
            try:
                if "container_exec" in params:
                    from .execproc import prepare
                    launch = prepare(self.agent, params["container_exec"])
                    on_end, spawner = launch.on_end, launch.spawner
                    params = dict(params, argv=launch.argv)
                proc = procs.start(params, size, on_end, spawner)
            except AgentCallError as e:
                return self._fail(chan, e.kind, str(e))
            except FileExistsError as e:
                return self._fail(chan, "AlreadyExists", str(e))
            except (OSError, ValueError) as e:
                if on_end is not None:
                    on_end(0)
                return self._fail(chan, "Failed", f"starting {params['argv'][0]!r}: {e}")
            with_stdin = params["stdin"] or params["tty"]
        else:
            proc = procs.get(params["id"])
            if proc is None or proc.delivered:
                return self._fail(chan, "NotFound", f"id: no process {params['id']!r}")
            if params["live"] and not getattr(proc, "supports_live", False):
                return self._fail(chan, "InvalidArgument", "live: only a container can be attached live")
            with_stdin = params["stdin"]
        with self._lock:
            # forget closed channels so a long-lived connection does not pin old processes
            for cid in [cid for cid, ch in self._chans.items() if ch.closed]:
                self._chans.pop(cid, None)
                self._procs.pop(cid, None)
                self._ptys.pop(cid, None)
            self._procs[chan.get_id()] = proc
            self._chans[chan.get_id()] = chan
        head = {"id": proc.id, "pid": proc.pid, "dropped": proc.dropped, "exited": proc.status is not None}
        start = None
        if method == "attach" and not params["live"] and hasattr(proc, "resume_point"):
            start, head["dropped"] = proc.resume_point(params.get("offsets"))
            head["offsets"] = {"stdout": start[1], "stderr": start[2]}
        chan.sendall(protocol.encode_reply(head))
        if method == "attach" and params["live"]:
            proc.attach(chan, with_stdin, live=True)
        elif start is not None:
            proc.attach(chan, with_stdin, offsets=start)
        else:
            proc.attach(chan, with_stdin)

    def _fail(self, chan, kind, msg):
        chan.sendall(protocol.encode_reply(error=(kind, msg)))
        chan.send_exit_status(1)
        chan.shutdown_write()
        chan.close()


class PortServer:
    """Owns the port fd; runs one SSH session per host connection.

    A session starts at the host's HELLO (see sync.py), not at a hang-up, which a quick
    reconnect can hide. The fd is non-blocking: while the host is disconnected a blocking
    write() would sleep until the *next* connection and then inject the old session's
    bytes into it, so a writer stops once its session has ended; the next session's
    writer starts with the HELLO echo. (Only one open() of a virtio port is allowed, so
    reads are non-blocking too, driven by poll().)
    """

    def __init__(self, agent, port_path: str):
        self.agent = agent
        self.fd = os.open(port_path, os.O_RDWR | os.O_NONBLOCK)
        self.host_key = ed25519_host_key()
        self.sessions = 0
        self._current = 0   # number of the live session, 0 when none
        self._echoed = 0    # the last session whose echo reached the port
        self._sock = None   # our end of the live session's socketpair
        self._write_lock = threading.Lock()  # a session's writes vs. ending it

    def serve_forever(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        scanner = sync.HelloScanner()
        while True:
            if not poller.poll(1000):
                continue
            try:
                data = os.read(self.fd, 65536)
            except (BlockingIOError, InterruptedError):
                continue
            if not data:
                # host disconnected (poll reports POLLIN|POLLHUP and read gives b''). A
                # session whose echo is still unwritten began at a HELLO that reached us
                # before the port-open of its connection, so this hang-up is the previous
                # connection's: ending it would lose that HELLO for good.
                if self._echoed == self._current:
                    self._end_session()
                time.sleep(IDLE_POLL_S)
                continue
            for kind, chunk in scanner.feed(data):
                if kind == "hello":
                    self._end_session()
                    self._start_session(echo=chunk)
                elif self._sock is not None:
                    try:
                        self._sock.sendall(chunk)
                    except OSError:
                        self._end_session()  # the session died on its own (bad input)

    def _start_session(self, echo: bytes) -> None:
        ours, theirs = socket.socketpair()
        # the session's own writer sends the echo, ahead of the SSH banner
        theirs.sendall(echo)
        self._sock = ours
        self.sessions += 1
        n = self._current = self.sessions
        threading.Thread(target=self._to_port, args=(ours, n), daemon=True, name=f"to-port-{n}").start()
        threading.Thread(target=self._run_transport, args=(theirs, n), daemon=True, name=f"ssh-{n}").start()

    def _end_session(self) -> None:
        with self._write_lock:  # after this, the old writer cannot write another byte
            self._current = 0
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
            self._sock = None

    def _to_port(self, sock, n: int) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            view = memoryview(data)
            while view:
                with self._write_lock:
                    if self._current != n:
                        return  # session over: never let its bytes reach the next connection
                    try:
                        view = view[os.write(self.fd, view):]
                        self._echoed = n  # the echo goes first, so it has begun
                        continue
                    except (BlockingIOError, InterruptedError):
                        pass
                    except OSError:
                        return
                if any(ev & select.POLLHUP for _, ev in poller.poll(50)):
                    time.sleep(IDLE_POLL_S)  # no host yet: poll does not wait, so we do

    def _run_transport(self, sock, n: int) -> None:
        t = AgentTransport(sock)
        t.add_server_key(self.host_key)
        try:
            t.start_server(server=SessionServer(self.agent))
            if n == 1:
                pid1.phase("ssh-handshake")
            _serve_channels(t)
        except Exception as e:
            print(f"vmcri-agent: ssh session {n} ended: {e}", flush=True)
        finally:
            t.close()
            sock.close()


def _serve_channels(t) -> None:
    # session channels are served from the exec callback, port-forwards from here; the
    # references kept here matter: paramiko closes a Channel when it is garbage collected
    live = []
    while t.is_active():
        chan = t.accept(5.0)
        live = [c for c in live if not c.closed]
        if chan is not None:
            t.server_object.start_forward(chan)
            live.append(chan)


def _relay(chan, conn, to_guest: bool) -> None:
    """One direction of a port-forward; EOF is passed on as a half-close."""
    try:
        while True:
            data = chan.recv(65536) if to_guest else conn.recv(65536)
            if not data:
                break
            if to_guest:
                conn.sendall(data)
            else:
                chan.sendall(data)
    except (OSError, EOFError, paramiko.SSHException):
        pass
    finally:
        try:
            if to_guest:
                conn.shutdown(socket.SHUT_WR)
            else:
                chan.shutdown_write()
        except (OSError, EOFError, paramiko.SSHException):
            pass
        if chan.closed or (chan.eof_received and chan.eof_sent):
            chan.close()
            conn.close()


def serve_unix(agent, path: str) -> None:
    """Development/test mode: serve SSH on a unix socket instead of the virtio port."""
    host_key = ed25519_host_key()
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(8)
    print(protocol.READY_MARKER, flush=True)
    while True:
        conn, _ = lsock.accept()
        threading.Thread(target=_serve_conn, args=(agent, conn, host_key), daemon=True).start()


def _serve_conn(agent, conn, host_key) -> None:
    try:
        conn.sendall(sync.read_hello(conn.recv))  # the host sends nothing more before the echo
    except (OSError, sync.SyncError) as e:
        print(f"vmcri-agent: no session sync: {e}", flush=True)
        conn.close()
        return
    t = AgentTransport(conn)
    t.add_server_key(host_key)
    try:
        t.start_server(server=SessionServer(agent))
        _serve_channels(t)
    except Exception as e:
        print(f"vmcri-agent: ssh session ended: {e}", flush=True)
    finally:
        t.close()
