"""Credentials, mirrors and corrupt content, each against a real docker-registry."""
import base64
import json
import os

import pytest

from tests.support.fx_registry import free_port, push_layout
from vmcri.config import Config, RegistryHost
from vmcri.errors import InvalidArgument, Unauthenticated, Unavailable, Unimplemented, VmcriError
from vmcri.image.service import ImageService
from vmcri.store import Store

pytestmark = pytest.mark.registry


def make_service(tmp_path, skopeo="skopeo", **cfg_kw):
    cfg = Config(root_dir=str(tmp_path / "root"), run_dir=str(tmp_path / "run"), **cfg_kw)
    return ImageService(cfg, Store(cfg.db_path), skopeo=skopeo)


def assert_nothing_stored(svc):
    assert svc.list() == []
    assert os.listdir(svc.store.blobs_dir) == []
    assert os.listdir(svc.store.layers_dir) == []
    assert os.listdir(svc.store.staging_dir) == []
    assert svc.store.db.query("SELECT * FROM image_layers") == []


@pytest.fixture(scope="module")
def auth_registry(registry_factory, test_images):
    reg = registry_factory(users={"alice": "s3cret"})
    ref = f"{reg}/vmcri-test/private:1.0"
    push_layout(test_images.layout, "single", ref, creds="alice:s3cret")
    return reg, ref


def test_right_credentials_pull(tmp_path, auth_registry, test_images):
    reg, ref = auth_registry
    svc = make_service(tmp_path)
    assert svc.pull(ref, auth={"username": "alice", "password": "s3cret"}) == \
        test_images.single.image_id
    svc.remove(ref)
    encoded = base64.b64encode(b"alice:s3cret").decode()
    assert svc.pull(ref, auth={"auth": encoded}) == test_images.single.image_id
    # the credentials never stay on disk after the pull
    assert os.listdir(svc.store.staging_dir) == []


@pytest.mark.parametrize("auth", [None, {"username": "alice", "password": "wrong"},
                                  {"username": "mallory", "password": "s3cret"}])
def test_wrong_or_missing_credentials_are_a_clear_error(tmp_path, auth_registry, auth):
    reg, ref = auth_registry
    svc = make_service(tmp_path)
    with pytest.raises(Unauthenticated) as e:
        svc.pull(ref, auth=auth)
    assert str(reg) in str(e.value) and "credentials" in str(e.value)
    assert_nothing_stored(svc)


def test_malformed_auth_field_is_named(tmp_path, auth_registry):
    svc = make_service(tmp_path)
    with pytest.raises(InvalidArgument, match="auth.auth"):
        svc.pull(auth_registry[1], auth={"auth": "!!not base64!!"})


def test_mirror_serves_an_unresolvable_registry(tmp_path, test_images):
    upstream = "registry.example.invalid"
    dead = f"http://127.0.0.1:{free_port()}"
    svc = make_service(tmp_path, registries={
        upstream: RegistryHost(mirrors=[dead, f"http://{test_images.registry}"])})
    ref = f"{upstream}/vmcri-test/busybox:1.0"
    assert svc.pull(ref) == test_images.single.image_id
    got = svc.resolve(ref)
    assert got.repo_tags == [ref]  # recorded under the name asked for, not the mirror's
    assert got.repo_digests == [f"{upstream}/vmcri-test/busybox@{test_images.single.digest}"]


def test_all_endpoints_failing_names_each(tmp_path):
    upstream = "registry.example.invalid"
    dead = f"127.0.0.1:{free_port()}"
    svc = make_service(tmp_path, registries={upstream: RegistryHost(mirrors=[f"http://{dead}"])})
    with pytest.raises(Unavailable) as e:
        svc.pull(f"{upstream}/vmcri-test/busybox:1.0")
    assert dead in str(e.value) and upstream in str(e.value)
    svc_skip = make_service(tmp_path / "skip", registries={
        upstream: RegistryHost(mirrors=[f"http://{dead}"], skip_upstream=True)})
    with pytest.raises(Unavailable) as e:
        svc_skip.pull(f"{upstream}/vmcri-test/busybox:1.0")
    assert dead in str(e.value) and "every endpoint" not in str(e.value)


def test_insecure_registry_from_config(tmp_path, registry_factory, test_images):
    # 127.0.0.2 is loopback too, but not a name vmcri trusts for plain HTTP by itself
    reg = registry_factory(address="127.0.0.2")
    ref = f"{reg}/vmcri-test/busybox:1.0"
    push_layout(test_images.layout, "single", ref)
    with pytest.raises(Unavailable) as e:
        make_service(tmp_path / "strict").pull(ref)
    assert str(reg) in str(e.value)
    svc = make_service(tmp_path / "insecure", insecure_registries=[str(reg)])
    assert svc.pull(ref) == test_images.single.image_id


def test_endpoint_order_and_tls(tmp_path):
    from vmcri.image.reference import parse
    from vmcri.image.transport import endpoints_for
    cfg = Config(registries={"docker.io": RegistryHost(mirrors=["http://m1:5000", "https://m2"])},
                 insecure_registries=["reg.example:5000"])
    eps = endpoints_for(cfg, parse("busybox"))
    assert [(e.host, e.tls_verify, e.mirror) for e in eps] == [
        ("m1:5000", False, True), ("m2", True, True), ("docker.io", True, False)]
    (ep,) = endpoints_for(cfg, parse("reg.example:5000/x/y:1"))
    assert ep.host == "reg.example:5000" and not ep.tls_verify


def multi_manifest(test_images) -> dict:
    import json
    layout = test_images.layout
    with open(os.path.join(layout, "index.json")) as f:
        (desc,) = [m for m in json.load(f)["manifests"]
                   if m["annotations"]["org.opencontainers.image.ref.name"] == "multi"]
    with open(os.path.join(layout, "blobs/sha256", desc["digest"].split(":")[1])) as f:
        return json.load(f)


def test_config_lying_about_diff_ids_stores_nothing(tmp_path, test_images):
    from tests.support.fx_registry import build_layer, set_layout_index, write_oci_image
    layout = str(tmp_path / "layout")
    layers = [test_images.base_layer, build_layer([("file", "x", b"x")])]
    honest = write_oci_image(layout, layers, {})
    lying = write_oci_image(layout, layers, {}, diff_ids=[honest["diff_ids"][0], "sha256:" + "e" * 64])
    set_layout_index(layout, "lying", [lying])
    ref = f"{test_images.registry}/vmcri-test/lying:1.0"
    push_layout(layout, "lying", ref)
    svc = make_service(tmp_path)
    with pytest.raises(VmcriError, match="diff_id mismatch"):
        svc.pull(ref)
    assert_nothing_stored(svc)


def test_corrupt_blob_in_registry_stores_nothing(tmp_path, registry_factory, test_images):
    reg = registry_factory()
    ref = f"{reg}/vmcri-test/corrupt:1.0"
    push_layout(test_images.layout, "multi", ref)
    svc = make_service(tmp_path)
    # corrupt the top layer blob as stored by the registry (same size, other bytes)
    top_blob = None
    for name in os.listdir(os.path.join(reg.storage, "docker/registry/v2/blobs/sha256")):
        for hexd in os.listdir(os.path.join(reg.storage, "docker/registry/v2/blobs/sha256", name)):
            path = reg.blob_data_path("sha256:" + hexd)
            if os.path.getsize(path) < 1000 and os.path.getsize(path) > 100:
                data = open(path, "rb").read()
                if data[:2] == b"\x1f\x8b":
                    top_blob = path
    assert top_blob
    data = bytearray(open(top_blob, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(top_blob, "wb").write(bytes(data))
    with pytest.raises(VmcriError):
        svc.pull(ref)
    assert_nothing_stored(svc)


def test_transport_delivering_wrong_bytes_is_caught_by_our_check(tmp_path, test_images):
    """skopeo verifies too, so the boundary is faked: a wrapper corrupts the top layer
    blob the real skopeo wrote into the staging area, as a faulty transport would. The
    layers below it verify and unpack first, and must not stay behind either."""
    top = multi_manifest(test_images)["layers"][-1]["digest"].split(":")[1]
    wrapper = tmp_path / "corrupting-skopeo"
    wrapper.write_text(f"""#!/bin/sh
skopeo "$@" || exit $?
[ "$1" = copy ] || exit 0
for a in "$@"; do case "$a" in --dest-shared-blob-dir=*) dir=${{a#*=}};; esac; done
printf 'X' | dd of="$dir/sha256/{top}" bs=1 seek=100 conv=notrunc 2>/dev/null
""")
    wrapper.chmod(0o755)
    svc = make_service(tmp_path, skopeo=str(wrapper))
    with pytest.raises(VmcriError, match="hashes to"):
        svc.pull(test_images.multi.ref)
    assert_nothing_stored(svc)
    # a healthy transport afterwards pulls fine into the same store
    svc.skopeo = "skopeo"
    assert svc.pull(test_images.multi.ref) == test_images.multi.image_id


def test_credentials_reach_skopeo_in_a_0600_authfile_not_argv(tmp_path, auth_registry):
    """identity_token and registry_token need a token server the test registry lacks, so
    this checks what skopeo is handed; the real server still judges it (and refuses)."""
    reg, ref = auth_registry
    seen = tmp_path / "seen"
    seen.mkdir()
    wrapper = tmp_path / "recording-skopeo"
    wrapper.write_text(f"""#!/bin/sh
echo "$@" >> {seen}/args
for a in "$@"; do case "$a" in --authfile=*|--src-authfile=*)
  f=${{a#*=}}; stat -c %a "$f" >> {seen}/modes; cat "$f" >> {seen}/authfiles; echo >> {seen}/authfiles;;
esac; done
exec skopeo "$@"
""")
    wrapper.chmod(0o755)
    svc = make_service(tmp_path, skopeo=str(wrapper))
    svc.pull(ref, auth={"username": "alice", "password": "s3cret"})
    with pytest.raises(Unauthenticated):
        svc.pull(ref, auth={"identity_token": "idtok-123"})
    # skopeo takes a registry token only on its command line: refused, never passed
    with pytest.raises(Unimplemented, match="auth.registry_token"):
        svc.pull(ref, auth={"registry_token": "regtok-456"})
    args = (seen / "args").read_text()
    assert "s3cret" not in args and "idtok-123" not in args and "regtok-456" not in args
    assert set((seen / "modes").read_text().split()) == {"600"}
    files = [json.loads(line) for line in (seen / "authfiles").read_text().splitlines() if line]
    entries = [f["auths"].get(str(reg)) for f in files]
    assert {"auth": base64.b64encode(b"alice:s3cret").decode()} in entries
    assert any(e and e.get("identitytoken") == "idtok-123" for e in entries)


class HeaderLoggingMirror:
    """A loopback "mirror" that asks for Basic auth on every request and logs what it got.
    While it holds each request it reads every process's command line for `secret`:
    the real skopeo is connected to it then."""

    def __init__(self, secret: str):
        import http.server
        import threading
        self.requests: list[dict] = []
        self.secret_in_argv: list[int] = []
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the stdlib's name
                mirror.requests.append({"path": self.path,
                                        "authorization": self.headers.get("Authorization")})
                mirror.secret_in_argv += _pids_with_in_cmdline(secret.encode())
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="mirror"')
                self.send_header("Content-Length", "0")
                self.end_headers()
            do_HEAD = do_GET

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _pids_with_in_cmdline(needle: bytes) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if needle in f.read():
                    found.append(int(pid))
        except OSError:
            pass  # gone meanwhile
    return found


@pytest.fixture
def logging_mirror():
    m = HeaderLoggingMirror("s3cret")
    yield m
    m.close()


def test_a_mirror_gets_no_credentials_unless_configured(tmp_path, auth_registry, test_images,
                                                        logging_mirror):
    reg, ref = auth_registry
    auth = {"username": "alice", "password": "s3cret"}
    svc = make_service(tmp_path / "plain", registries={
        str(reg): RegistryHost(mirrors=[logging_mirror.url])})
    assert svc.pull(ref, auth=auth) == test_images.single.image_id  # from upstream
    assert logging_mirror.requests, "skopeo never asked the mirror"
    # skopeo answers a Basic challenge with empty credentials ("Og==" is ":") at most
    assert {r["authorization"] for r in logging_mirror.requests} <= {None, "Basic Og=="}
    assert logging_mirror.secret_in_argv == []

    logging_mirror.requests.clear()
    svc = make_service(tmp_path / "opted-in", registries={
        str(reg): RegistryHost(mirrors=[logging_mirror.url],
                               credential_mirrors=[logging_mirror.url])})
    assert svc.pull(ref, auth=auth) == test_images.single.image_id
    basic = "Basic " + base64.b64encode(b"alice:s3cret").decode()
    assert basic in [r["authorization"] for r in logging_mirror.requests]
    assert logging_mirror.secret_in_argv == []  # the real skopeo's argv, while it was connected


def test_credential_mirrors_must_be_mirrors():
    from vmcri.config import ConfigError, from_dict
    with pytest.raises(ConfigError, match="credential_mirrors"):
        from_dict({"registries": {"r.example": {"mirrors": ["http://m:5000"],
                                                "credential_mirrors": ["http://other:5000"]}}})
    cfg = from_dict({"registries": {"r.example": {"mirrors": ["http://m:5000"],
                                                  "credential_mirrors": ["http://m:5000"]}}})
    from vmcri.image.reference import parse
    from vmcri.image.transport import endpoints_for
    assert [(e.host, e.credentials) for e in endpoints_for(cfg, parse("r.example/a/b:1"))] == \
        [("m:5000", True), ("r.example", True)]
