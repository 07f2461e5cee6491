"""The save-image header rewrite that template clones depend on (no VM needed)."""
import os
import struct

import pytest

from vmcri.sandbox import saveimage
from vmcri.sandbox.template import Template, clone_xml

TPL_ID = "a" * 16 + "b" * 16 + "c" * 32
CLONE_ID = "1" * 16 + "2" * 16 + "3" * 32
UUID = "11111111-2222-3333-4444-555555555555"
XML = (f"<domain><name>vmcri-{TPL_ID[:32]}</name><uuid>{UUID}</uuid>"
       f"<metadata><vmcri:id>{TPL_ID}</vmcri:id></metadata>"
       f"<genid>99999999-2222-3333-4444-555555555555</genid>"
       f"<source dir='/var/lib/vmcri/sandboxes/{TPL_ID}/share'/>"
       f"<source mode='bind' path='/run/vmcri/sandboxes/{TPL_ID[:16]}/agent.sock'/></domain>")


def _image(path, xml=XML, room=4096, magic=saveimage.MAGIC, version=2, compressed=0):
    cookie = b"<cookie/>\0"
    data = xml.encode().ljust(room, b"\0") + cookie
    with open(path, "wb") as f:
        f.write(saveimage.HEADER.pack(magic, version, len(data), 1, compressed, room))
        f.write(data)
        f.write(b"QEVM" + os.urandom(4096))  # the migration stream
    return path


def _stream(path, room=4096):
    with open(path, "rb") as f:
        f.seek(saveimage.HEADER.size + room + len(b"<cookie/>\0"))
        return f.read()


def test_header_is_libvirts_92_bytes():
    assert saveimage.HEADER.size == 92


def test_rewrite_keeps_cookie_and_stream(tmp_path):
    path = _image(str(tmp_path / "s"))
    before = _stream(path)
    header, xml = saveimage.read(path)
    assert xml == XML and header.xml_room == 4096
    saveimage.rewrite_xml(path, header, "<domain>short</domain>")
    header2, xml2 = saveimage.read(path)
    assert xml2 == "<domain>short</domain>" and header2 == header
    assert _stream(path) == before
    with open(path, "rb") as f:
        f.seek(saveimage.HEADER.size + 4096)
        assert f.read(10) == b"<cookie/>\0"


def test_xml_that_does_not_fit_is_refused(tmp_path):
    path = _image(str(tmp_path / "s"), room=len(XML) + 1)
    header, _ = saveimage.read(path)
    with pytest.raises(saveimage.SaveImageError, match="does not fit"):
        saveimage.rewrite_xml(path, header, XML + " ")
    assert saveimage.read(path)[1] == XML  # untouched


@pytest.mark.parametrize("kw, why", [
    ({"magic": b"LibvirtQemudPart"}, "not a"),      # a save that never finished
    ({"version": 3}, "version"),
    ({"compressed": 1}, "compression"),
])
def test_images_we_cannot_rewrite_are_refused(tmp_path, kw, why):
    path = _image(str(tmp_path / "s"), **kw)
    with pytest.raises(saveimage.SaveImageError, match=why):
        saveimage.read(path)


def test_truncated_image_is_refused(tmp_path):
    path = str(tmp_path / "s")
    with open(path, "wb") as f:
        f.write(saveimage.MAGIC + struct.pack("<I", 2))
    with pytest.raises(saveimage.SaveImageError):
        saveimage.read(path)


def test_clone_xml_moves_every_per_vm_value():
    tpl = Template(key="k", dir="/x", template_id=TPL_ID, host_key="", vcpus=1, memory_mib=128,
                   uuid=UUID)
    out = clone_xml(XML, tpl, CLONE_ID, "66666666-7777-8888-9999-000000000000")
    assert TPL_ID[:16] not in out and UUID not in out
    assert f"<name>vmcri-{CLONE_ID[:32]}</name>" in out
    assert f"/sandboxes/{CLONE_ID}/share" in out and f"/sandboxes/{CLONE_ID[:16]}/agent.sock" in out
    assert "99999999-2222" not in out  # a new VM generation id
    assert len(out) == len(XML)


def test_clone_xml_refuses_an_unexpected_template():
    tpl = Template(key="k", dir="/x", template_id=TPL_ID, host_key="", vcpus=1, memory_mib=128,
                   uuid=UUID)
    with pytest.raises(saveimage.SaveImageError):
        clone_xml(XML.replace("<genid>", "<nogenid>").replace("</genid>", "</nogenid>"), tpl,
                  CLONE_ID, UUID)
