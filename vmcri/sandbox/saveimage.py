"""The header of a libvirt QEMU save image, read and rewritten in place.

A save image is: a fixed header, the domain XML (NUL-padded), libvirt's cookie, then QEMU's
migration stream. libvirt restores a saved image only under the UUID it was saved with, and
runs one domain per UUID, so a template that many pods are cloned from needs a new UUID,
name and set of host paths per clone. The XML region has room to spare and every id vmcri
puts into it has a fixed length, so a clone's XML is written over the template's, in the same
bytes, just before its restore; the migration stream after it is never touched.

Layout (libvirt src/qemu/qemu_saveimage.h, format version 2): magic[16] "LibvirtQemudSave",
then little-endian uint32 version, data_len, was_running, compressed, cookieOffset,
unused[14]; the XML starts right after the 92-byte header, and the cookie at cookieOffset
bytes into the data.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass

MAGIC = b"LibvirtQemudSave"
HEADER = struct.Struct("<16s5I56x")  # 92 bytes
VERSION = 2
MAX_XML = 1 << 20


class SaveImageError(Exception):
    pass


@dataclass(frozen=True)
class SaveHeader:
    data_len: int
    was_running: int
    compressed: int
    cookie_offset: int

    @property
    def xml_room(self) -> int:
        """Bytes the XML may take, its terminating NUL included."""
        return self.cookie_offset or self.data_len


def read(path: str) -> tuple[SaveHeader, str]:
    """The header and the domain XML of a save image; SaveImageError if it is not one
    we can rewrite (wrong magic or version, compressed, implausible sizes)."""
    with open(path, "rb") as f:
        raw = f.read(HEADER.size)
        if len(raw) != HEADER.size:
            raise SaveImageError(f"{path}: shorter than a save image header")
        magic, version, data_len, was_running, compressed, cookie = HEADER.unpack(raw)
        if magic != MAGIC:
            raise SaveImageError(f"{path}: not a (complete) libvirt save image")
        if version != VERSION or compressed != 0:
            raise SaveImageError(f"{path}: save image version {version}, compression "
                                 f"{compressed}: only uncompressed version {VERSION} is supported")
        if not 0 < data_len <= MAX_XML or cookie > data_len:
            raise SaveImageError(f"{path}: implausible header (data {data_len}, cookie {cookie})")
        header = SaveHeader(data_len, was_running, compressed, cookie)
        region = f.read(header.xml_room)
    xml, nul, _ = region.partition(b"\0")
    if not nul:
        raise SaveImageError(f"{path}: the domain XML is not terminated")
    return header, xml.decode()


def rewrite_xml(path: str, header: SaveHeader, xml: str) -> None:
    """Put `xml` in place of the image's XML (same file, same offsets)."""
    data = xml.encode() + b"\0"
    if len(data) > header.xml_room:
        raise SaveImageError(f"{path}: the new domain XML ({len(data)} bytes) does not fit the "
                             f"{header.xml_room} bytes the image has for it")
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.pwrite(fd, data.ljust(header.xml_room, b"\0"), HEADER.size)
    finally:
        os.close(fd)
